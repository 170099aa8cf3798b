//! Crash images of workloads on real files, several tasks at once, with the page cache and
//! with O_DIRECT (the harness: `crash/`).

mod crash;

use crash::torture;

#[test]
fn crash_on_real_files() {
    torture("files-4k");
}

#[test]
fn crash_on_real_files_with_o_direct() {
    torture("files-direct-64k");
}
