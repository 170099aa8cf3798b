//! Crash images of snapshot operations (issue 13, invariant I4): a workload of writes,
//! snapshot creates, a delete and an apply runs over the fault injector; at every crash
//! point of its request log, with a few choices of the volatile writes that survive (one
//! torn sector or none), the file must pass `qemu-img check` without corruption (leaks are
//! allowed: a crash may leak, it never corrupts), and every snapshot the crash image lists
//! must read as the snapshot of that name read when it was made.

use blockio::{CrashSpec, FaultOpener, FileOpener};
use qcow2_engine::{Image, ImageOptions, SnapshotLookup};
use qcow2_tests::{only_safe_copied_errors, path_str, qemu_check, qemu_img};
use std::collections::HashMap;

const CS: u64 = 4096;
const SIZE: u64 = 256 * 1024;
/// Volatile subsets tried per crash point.
const SEEDS: u64 = 3;

async fn whole(img: &Image<FaultOpener<FileOpener>>) -> Vec<u8> {
    img.read(0, SIZE).await.unwrap().to_vec()
}

/// Runs the workload; returns the file before it, the controller (with its log) and what
/// each snapshot read when it was made.
async fn workload(
    path: &std::path::Path,
) -> (Vec<u8>, blockio::FaultController, HashMap<String, Vec<u8>>) {
    let base = std::fs::read(path).unwrap();
    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    let img = Image::open(opener, path, ImageOptions::new())
        .await
        .unwrap();
    let mut contents = HashMap::new();
    img.write(0, &vec![1; (8 * CS) as usize]).await.unwrap();
    img.write(20 * CS, &vec![2; (2 * CS) as usize])
        .await
        .unwrap();
    img.snapshot_create("a").await.unwrap();
    contents.insert("a".to_owned(), whole(&img).await);
    img.write(CS, &vec![3; (3 * CS) as usize]).await.unwrap();
    img.discard(20 * CS, CS).await.unwrap();
    img.snapshot_create("b").await.unwrap();
    contents.insert("b".to_owned(), whole(&img).await);
    img.write(6 * CS, &vec![4; CS as usize]).await.unwrap();
    img.snapshot_delete(SnapshotLookup::Name("a"))
        .await
        .unwrap();
    img.write(40 * CS, &vec![5; CS as usize]).await.unwrap();
    img.snapshot_apply(SnapshotLookup::IdOrName("b"))
        .await
        .unwrap();
    img.write(0, &vec![6; CS as usize]).await.unwrap();
    img.close().await.unwrap();
    (base, ctl, contents)
}

#[test]
fn crash_during_snapshot_operations_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path_str(&path),
        "256K",
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (base, ctl, contents) = rt.block_on(workload(&path));
    let completed = ctl.completed();
    let crashed = dir.path().join("crash.qcow2");
    let mut seen = std::collections::HashSet::new();
    let mut checked = 0;
    let mut copied_windows = 0;
    for at in 0..=completed {
        for seed in 0..SEEDS {
            let spec = CrashSpec::new(seed).at(at).tear(seed == 2);
            let image = ctl.crash(&base, &spec).bytes;
            if !seen.insert(image.clone()) {
                continue;
            }
            std::fs::write(&crashed, &image).unwrap();
            let check = qemu_check(&crashed);
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let code = check.status.code();
            if code == Some(2) {
                if let Err(e) = only_safe_copied_errors(&report, CS) {
                    panic!("crash at {at} (seed {seed}): {e}\n{report}");
                }
                copied_windows += 1;
            } else {
                assert!(
                    code == Some(0) || code == Some(3),
                    "crash at {at} (seed {seed}): qemu-img check exit {code:?}\n{report}"
                );
            }
            let list = qemu_img(&["snapshot", "-l", path_str(&crashed)]);
            for line in String::from_utf8_lossy(&list.stdout).lines().skip(2) {
                let name = line.split_whitespace().nth(1).unwrap();
                let got = qcow2_tests::raw_reference_snapshot(&crashed, name);
                assert!(
                    got == contents[name],
                    "crash at {at} (seed {seed}): snapshot {name} reads otherwise"
                );
            }
            checked += 1;
        }
    }
    eprintln!(
        "{completed} crash points, {checked} distinct crash images checked, {copied_windows} \
         in a COPIED window"
    );
    assert!(checked > 20, "too few crash images: {checked}");
}
