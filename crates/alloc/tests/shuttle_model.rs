//! Randomised exploration of the lease rule under shuttle: larger scenarios than loom can
//! enumerate, under shuttle's random scheduler and its PCT scheduler (which finds bugs of
//! small depth with a probability it guarantees).
//!
//! Run by scripts/models.sh (`just shuttle`):
//! `RUSTFLAGS="--cfg shuttle" cargo test -p qcow2-alloc --features shuttle --test shuttle_model`.
//!
//! The model is model/mod.rs: the crate's own LeaseTable, Allocator and Gates, with the
//! `sync` module's Mutex switched to shuttle's. async-lock's RwLock is used as is: shuttle
//! runs one task at a time, switches at every shuttle Mutex operation and every `.await`
//! that returns `Pending`, and learns of wake-ups through the wakers async-lock calls; each
//! RwLock operation is one atomic step to it (loom_model.rs looks inside them).
//!
//! `QCOW2_SHUTTLE_ITERATIONS` sets the schedules per scenario and scheduler (default
//! [`DEFAULT_ITERATIONS`]); a failure prints the schedule that replays it.
#![cfg(shuttle)]

mod model;

use model::World;
use shuttle::future::{block_on, spawn};
use shuttle::rand::{thread_rng, Rng};
use std::sync::Arc;
use std::time::Instant;

/// Schedules per scenario and scheduler.
const DEFAULT_ITERATIONS: usize = 10_000;
/// PCT's bug depth: how many ordering constraints a bug may need.
const PCT_DEPTH: usize = 3;

fn iterations() -> usize {
    std::env::var("QCOW2_SHUTTLE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

/// Runs `scenario` under the random scheduler and under PCT, and prints the figures.
fn explore(name: &str, scenario: fn()) {
    let n = iterations();
    let start = Instant::now();
    shuttle::check_random(scenario, n);
    let random = start.elapsed().as_secs_f64();
    let start = Instant::now();
    shuttle::check_pct(scenario, n, PCT_DEPTH);
    let pct = start.elapsed().as_secs_f64();
    println!(
        "shuttle {name}: {n} random schedules in {random:.1} s, {n} PCT schedules (depth \
         {PCT_DEPTH}) in {pct:.1} s"
    );
}

/// Runs the actors as shuttle tasks, waits for all of them, and checks the end state.
fn run(
    w: Arc<World>,
    actors: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) {
    block_on(async move {
        let handles: Vec<_> = actors.into_iter().map(spawn).collect();
        for h in handles {
            h.await.expect("actor panicked");
        }
        w.check_final();
    });
}

macro_rules! actors {
    ($w:expr; $($body:expr),* $(,)?) => {{
        let mut v: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = Vec::new();
        $(
            {
                let w = $w.clone();
                #[allow(clippy::redundant_closure_call)]
                v.push(Box::pin(async move { ($body)(w).await }));
            }
        )*
        v
    }};
}

/// The seed race, as in loom_model.rs.
#[test]
fn write_discard_reallocate() {
    explore("write_discard_reallocate", || {
        let w = World::new(2, 1);
        let a = actors![w;
            |w: Arc<World>| async move { w.write(0, 2).await },
            |w: Arc<World>| async move { w.discard(0).await; w.write_back(true); },
            |w: Arc<World>| async move { w.write(1, 3).await },
        ];
        run(w, a);
    });
}

/// Two reads in flight on the freed cluster, two allocations competing for it.
#[test]
fn reads_discard_two_reallocations() {
    explore("reads_discard_two_reallocations", || {
        let w = World::new(3, 1);
        let a = actors![w;
            |w: Arc<World>| async move { let v = w.read(0).await; assert!(v <= 1); },
            |w: Arc<World>| async move { let v = w.read(0).await; assert!(v <= 1); },
            |w: Arc<World>| async move { w.discard(0).await; w.write_back(true); },
            |w: Arc<World>| async move { w.write(1, 3).await },
            |w: Arc<World>| async move { w.write(2, 4).await; w.write_back(false); },
        ];
        run(w, a);
    });
}

/// I6 with four writers of one unallocated guest cluster, a reader of it, and a freer of
/// another cluster that the writers' allocation could pick up.
#[test]
fn four_writers_one_cluster() {
    explore("four_writers_one_cluster", || {
        let w = World::new(2, 1);
        let mut a = actors![w;
            |w: Arc<World>| async move { w.discard(0).await; w.write_back(true); },
            |w: Arc<World>| async move { let _ = w.read(1).await; },
        ];
        for v in 2..6u8 {
            let w = w.clone();
            a.push(Box::pin(async move { w.write(1, v).await }));
        }
        run(w.clone(), a);
        assert_eq!(
            w.allocations(1),
            1,
            "I6 violated: guest 1 allocated more than once"
        );
    });
}

/// Random programs: five actors, each doing six operations chosen at random (write, a write
/// cancelled in flight, read, discard, write-back with or without punch) on five guest
/// clusters, three of them mapped at the start. Shuttle's random source drives the choices, so a failing run replays.
#[test]
fn random_programs() {
    explore("random_programs", || {
        const GUESTS: usize = 5;
        let w = World::new(GUESTS, 3);
        let mut a: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
            Vec::new();
        for actor in 0..5u8 {
            let w = w.clone();
            a.push(Box::pin(async move {
                for i in 0..6u8 {
                    let g = thread_rng().gen_range(0..GUESTS);
                    match thread_rng().gen_range(0..10) {
                        0..=2 => w.write(g, 10 + actor * 8 + i).await,
                        3 => w.cancelled_write(g, 10 + actor * 8 + i).await,
                        4..=5 => {
                            let _ = w.read(g).await;
                        }
                        6..=7 => w.discard(g).await,
                        8 => {
                            w.write_back(true);
                        }
                        _ => {
                            w.write_back(false);
                        }
                    }
                }
            }));
        }
        run(w, a);
    });
}

/// I9: writes cancelled in flight (in place and allocating), allocations and a freer whose
/// punches are cancelled, all at once.
#[test]
fn cancelled_requests() {
    explore("cancelled_requests", || {
        let w = World::new(4, 2);
        let a = actors![w;
            |w: Arc<World>| async move { w.cancelled_write(0, 2).await },
            |w: Arc<World>| async move { w.discard(0).await; w.write_back_then(true, true); },
            |w: Arc<World>| async move { w.cancelled_write(2, 3).await },
            |w: Arc<World>| async move { w.write(3, 4).await },
            |w: Arc<World>| async move { w.write(2, 5).await; w.write_back_then(true, true); },
        ];
        run(w, a);
    });
}
