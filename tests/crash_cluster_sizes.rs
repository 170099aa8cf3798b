//! Crash images of new images of every cluster size (512 bytes to 2 MiB) and of refcount
//! widths 1, 8, 16 and 64 bits, the refcount table growing too (the harness: `crash/`).

mod crash;

use crash::torture;

#[test]
fn crash_64k() {
    torture("64k");
}

#[test]
fn crash_4k_refcount_1() {
    torture("4k-r1");
}

#[test]
fn crash_4k_refcount_8() {
    torture("4k-r8");
}

#[test]
fn crash_512_byte_clusters() {
    torture("512-r16");
}

#[test]
fn crash_512_byte_clusters_refcount_table_growth() {
    torture("512-r64");
}

#[test]
fn crash_2m_clusters() {
    torture("2m");
}
