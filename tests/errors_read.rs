//! Error injection on reads: of allocated, compressed and backing-file data (the harness:
//! `errors/`).

mod errors;

use errors::torture::scenario;

#[test]
fn read() {
    scenario("read");
}

#[test]
fn read_compressed() {
    scenario("read-compressed");
}

#[test]
fn read_backing_file() {
    scenario("read-backing");
}
