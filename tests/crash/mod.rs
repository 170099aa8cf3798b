//! Crash torture: random workloads through the fault-injecting backend, then the image as a
//! crash at many points could leave it (`blockio::CrashImage`: what was durable at the last
//! completed flush, any seeded subset of what was written since, sometimes one torn sector).
//! Every crash image must
//!
//! (a) show no corruption in `qemu-img check` (exit 0 or 3). A crash image with the dirty bit
//!     set (lazy refcounts) is repaired first with `qemu-img check -r all`, which must leave it
//!     clean (the repair a read-write open does, QEMU's or ours, which tests/check.rs covers);
//! (b) open read-only with our engine;
//! (c) hold every write acknowledged before the last completed flush. The model, per byte:
//!     the value after every request that returned before the last completed flush began,
//!     or the value of any later request covering the byte that had been issued by the crash
//!     (old or new data, nothing else: no garbage, no stale data from a reused cluster).
//!
//! Samples of the crash images are also read by QEMU (`qemu-img convert`, which must agree
//! with our engine) and opened read-write by our engine, written to and closed (the engine
//! must carry on from a crashed image: the result is checked again).
//!
//! A workload runs once per (configuration, run seed) against an in-memory copy of an image
//! made by `qemu-img create` (one configuration uses real files); the crash points are
//! positions in its request log: a crash after `at` requests completed, with the requests in
//! flight at that moment free to land or not. The image is dropped without `close`.
//!
//! Environment:
//! - `QCOW2_CRASH_SOAK=N`: N times more runs per configuration (`just soak`-style runs);
//! - `QCOW2_CRASH_BASE_SEED=S`: start the run seeds at S (default 0);
//! - `QCOW2_CRASH_CONFIG`, `QCOW2_CRASH_RUN`, `QCOW2_CRASH_POINT`, `QCOW2_CRASH_SEED` and
//!   `QCOW2_CRASH_TEAR`: the `repro` test (in crash_checker.rs) checks that one crash image
//!   and says what it sees (a failure prints this command line); `QCOW2_CRASH_KEEP=DIR` keeps
//!   the failing images.
//!
//! This module is the harness; the tests are in `tests/crash_*.rs`, one file per kind of
//! image: cluster sizes and refcount widths (`crash_cluster_sizes`), format versions and
//! features (`crash_features`), QEMU fixtures with existing content (`crash_over_fixtures`),
//! real files (`crash_real_files`); `crash_checker` tests the checks themselves and holds
//! `repro`. The pieces: the configurations ([`configs`]), the workloads and their logs
//! ([`workload`]), what a crash image must hold ([`model`]), and the checks of one crash
//! image ([`checker`]).
// Each crash_*.rs binary uses a part of the harness.
#![allow(dead_code)]

pub mod checker;
pub mod configs;
pub mod model;
pub mod workload;

use checker::Checker;
use configs::config;
use std::time::Instant;
use workload::run_workload;

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

pub fn torture(name: &str) {
    let cfg = config(name);
    let soak = env_u64("QCOW2_CRASH_SOAK").unwrap_or(1).max(1);
    let base_seed = env_u64("QCOW2_CRASH_BASE_SEED").unwrap_or(0);
    let t0 = Instant::now();
    let mut checker = Checker::new();
    let mut failures = Vec::new();
    for k in 0..cfg.runs * soak {
        let run = run_workload(&cfg, base_seed + k);
        checker.check_run(&run, None, &mut failures);
        if failures.len() >= 20 {
            break;
        }
    }
    let s = &checker.stats;
    eprintln!(
        "crash {name}: {} runs ({} moved the refcount table), {} guest ops, {} backend requests, \
         {} crash points, {} crash images ({} torn; {} distinct, each checked by qemu-img; {} \
         dirty ones repaired), {} read by QEMU too, {} recovered read-write, {:.1?}",
        s.runs,
        s.table_moves,
        s.ops,
        s.requests,
        s.points,
        s.images,
        s.torn,
        s.distinct,
        s.dirty_repaired,
        s.qemu_reads,
        s.recoveries,
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failing crash images:\n{}",
        failures.len(),
        failures.join("\n")
    );
    if name == "512-r64" {
        assert!(s.table_moves > 0, "{name}: no run grew the refcount table");
    }
}
