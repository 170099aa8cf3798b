//! One image shared by the tasks of a multi-thread runtime through the per-thread io_uring
//! backend (`blockio::RingOpener`): spawned tasks write disjoint and overlapping ranges and
//! read ranges no one writes meanwhile, round after round; every read matches the model, and
//! after close QEMU finds the image clean and reads what the model says.

use blockio::RingOpener;
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};
use std::sync::Arc;

const CS: u64 = 4096;
const SIZE: u64 = 4 << 20;
const TASKS: u64 = 8;
const ROUNDS: u64 = 6;

/// The byte at guest offset `x` written in round `r`: the same whoever writes it, so that
/// overlapping writes of one round leave one outcome in any order.
fn byte(x: u64, r: u64) -> u8 {
    (x.wrapping_mul(31).wrapping_add(r * 17 + 1) % 251) as u8
}

fn data(off: u64, len: u64, r: u64) -> Vec<u8> {
    (off..off + len).map(|x| byte(x, r)).collect()
}

/// Round `r` writes one half of the disk and reads the other.
fn halves(r: u64) -> (u64, u64) {
    let half = SIZE / 2;
    match r % 2 {
        0 => (0, half),
        _ => (half, 0),
    }
}

/// A seeded range of `len_max` bytes at most inside `[base, base + span)`.
fn range(seed: u64, base: u64, span: u64, len_max: u64) -> (u64, u64) {
    let z = blockio::splitmix64(seed);
    let len = 1 + z % len_max;
    let off = base + (z >> 24) % (span - len);
    (off, len)
}

/// What task `t` writes in round `r`: its own slice of the written half (disjoint from the
/// other tasks'), then three seeded ranges anywhere in that half (overlapping theirs).
fn writes(t: u64, r: u64) -> Vec<(u64, u64)> {
    let (w, _) = halves(r);
    let slice = SIZE / 2 / TASKS;
    let mut v = vec![(w + t * slice + 100, slice - 200)];
    for i in 0..3 {
        v.push(range(r << 32 | t << 8 | i, w, SIZE / 2, 5 * CS));
    }
    v
}

#[test]
fn tasks_on_worker_threads_share_one_image() {
    shared_image(false, None);
}

/// The same with O_DIRECT (`cache=none`), on the disk holding the target directory.
#[test]
fn tasks_on_worker_threads_share_one_image_direct() {
    shared_image(true, None);
}

/// The same with the workers polling their rings before they park
/// (`RingOpener::park_hook`): requests queued behind others wait for the park, the reaper or
/// a full batch instead of yielding.
#[test]
fn tasks_on_polling_worker_threads_share_one_image_direct() {
    shared_image(true, Some(std::time::Duration::from_micros(32)));
}

fn shared_image(direct: bool, poll: Option<std::time::Duration>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("shared.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path_str(&path),
        &SIZE.to_string(),
    ]);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(poll) = poll {
        rt.on_thread_park(RingOpener::park_hook(poll));
    }
    let rt = rt.worker_threads(4).enable_all().build().unwrap();
    let model = rt.block_on(async {
        let img = Arc::new(
            Image::open(RingOpener, &path, ImageOptions::new().direct(direct))
                .await
                .unwrap(),
        );
        let mut model = vec![0u8; SIZE as usize];
        for r in 0..ROUNDS {
            let before = Arc::new(model.clone());
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let (img, model) = (img.clone(), before.clone());
                    tokio::spawn(async move {
                        let (_, rd) = halves(r);
                        let (off, len) = range(r << 32 | t << 8 | 99, rd, SIZE / 2, 9 * CS);
                        let read = img.read(off, len);
                        let wr = writes(t, r).into_iter().map(|(off, len)| {
                            let img = img.clone();
                            async move { img.write(off, &data(off, len, r)).await.unwrap() }
                        });
                        let (got, _) = futures::join!(read, futures::future::join_all(wr));
                        let got = got.unwrap();
                        assert!(
                            got[..] == model[off as usize..(off + len) as usize],
                            "round {r} task {t}: read of {len} at {off}"
                        );
                        if t % 2 == 0 {
                            img.flush().await.unwrap();
                        }
                    })
                })
                .collect();
            for t in futures::future::join_all(tasks).await {
                t.unwrap();
            }
            for t in 0..TASKS {
                for (off, len) in writes(t, r) {
                    model[off as usize..(off + len) as usize].copy_from_slice(&data(off, len, r));
                }
            }
        }
        let whole = img.read(0, SIZE).await.unwrap();
        assert!(
            whole[..] == model[..],
            "the image reads other data than the model"
        );
        let img = Arc::into_inner(img).expect("tasks done");
        img.close().await.unwrap();
        model
    });
    let out = qemu_check(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("No errors"), "{text}");
    assert!(
        raw_reference(&path, "qcow2") == model,
        "QEMU reads other data than the model"
    );
}
