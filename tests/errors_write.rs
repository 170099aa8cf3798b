//! Error injection on guest writes: an allocating write, one in place (with an L2 load),
//! copy-on-write from a backing file, of a snapshot's clusters and of compressed clusters,
//! write-zeroes and discard, and writes to images with extended L2 entries and to compat 0.10
//! images. Every backend request of the target fails in turn (the harness: `errors/`).

mod errors;

use errors::torture::scenario;

#[test]
fn allocating_write() {
    scenario("allocating-write");
}

#[test]
fn in_place_write_and_l2_load() {
    scenario("in-place-write-l2-load");
}

#[test]
fn copy_on_write_from_backing_file() {
    scenario("cow-from-backing");
}

#[test]
fn copy_on_write_of_snapshot_clusters() {
    scenario("cow-snapshot");
}

#[test]
fn copy_on_write_of_compressed_clusters() {
    scenario("cow-compressed");
}

#[test]
fn write_zeroes() {
    scenario("write-zeroes");
}

#[test]
fn discard() {
    scenario("discard");
}

#[test]
fn extended_l2_write() {
    scenario("extended-l2-write");
}

#[test]
fn v2_write_zeroes() {
    scenario("v2-write-zeroes");
}
