//! Crash images of compat 0.10 images, of images with extended L2 entries and of lazy
//! refcounts images, whose crash images are dirty (the harness: `crash/`).

mod crash;

use crash::torture;

#[test]
fn crash_v2() {
    torture("v2-64k");
}

#[test]
fn crash_extended_l2() {
    torture("extl2-32k");
}

#[test]
fn crash_lazy_refcounts() {
    torture("lazy-64k");
}

#[test]
fn crash_lazy_refcounts_512_byte_clusters() {
    torture("lazy-512-r64");
}
