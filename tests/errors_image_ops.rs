//! Error injection on image operations: compressed writes, internal snapshots (create,
//! delete, apply), resize (growing the L1 table, shrinking over data) and persistent bitmap
//! edits. Every backend request of the operation fails in turn (the harness: `errors/`); the
//! image stays consistent, a retry works, and nothing acknowledged is lost.

mod errors;

use errors::torture::scenario;

#[test]
fn compressed_write() {
    scenario("compressed-write");
}

#[test]
fn compressed_write_allocating_an_l2_table() {
    scenario("compressed-write-new-l2");
}

#[test]
fn snapshot_create() {
    scenario("snapshot-create");
}

#[test]
fn snapshot_delete() {
    scenario("snapshot-delete");
}

#[test]
fn snapshot_apply() {
    scenario("snapshot-apply");
}

#[test]
fn resize_growing_the_l1_table() {
    scenario("resize-grow-l1");
}

#[test]
fn resize_shrinking_over_data() {
    scenario("resize-shrink");
}

#[test]
fn bitmap_add() {
    scenario("bitmap-add");
}

#[test]
fn bitmap_clear() {
    scenario("bitmap-clear");
}
