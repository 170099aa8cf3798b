//! Crash images of QEMU fixtures the workload rewrites: internal snapshots, compressed
//! clusters, zero clusters, preallocated metadata (the harness: `crash/`).

mod crash;

use crash::torture;

#[test]
fn crash_over_snapshots() {
    torture("fixture-snapshot");
}

#[test]
fn crash_over_compressed_clusters() {
    torture("fixture-compressed");
}

#[test]
fn crash_over_zero_clusters() {
    torture("fixture-zero-clusters");
}

#[test]
fn crash_over_preallocated_metadata() {
    torture("fixture-prealloc-metadata");
}
