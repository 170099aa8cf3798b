//! Error injection where metadata must reach the disk before other writes: the bitmaps
//! directory and unknown autoclear bits before the first write, the L2 update before a
//! discard's refcount decrement (the harness: `errors/`).

mod errors;

use errors::torture::scenario;

#[test]
fn first_write_clears_bitmaps_bit() {
    scenario("first-write-bitmaps");
}

#[test]
fn first_write_clears_unknown_autoclear_bits() {
    scenario("first-write-unknown-autoclear");
}

#[test]
fn discard_then_flush() {
    scenario("discard-flush");
}
