//! QEMU-interop fixture library for the qcow2-engine tests.
//!
//! Everything here drives the real QEMU tools (`qemu-img`, `qemu-io`) at
//! test time; no binary image is committed. The pieces:
//!
//! - tool access: [`tool`], [`qemu_img`], [`qemu_img_status`],
//!   [`qemu_img_json`], [`qemu_io`], [`raw_reference`], [`qemu_info_json`],
//!   [`qemu_map_json`], ...;
//! - the fixture matrix: [`matrix`] lists [`FixtureSpec`]s, each of which
//!   [builds](FixtureSpec::build) a [`Fixture`] (a qcow2 image, possibly
//!   with backing files or a data file, in its own temporary directory);
//! - deterministic workloads: [`OpMix`] (qemu-io scripts), [`random_ranges`]
//!   (read ranges) and the [`Prng`] behind them;
//! - the qimg command-line harness: [`Pair`] runs qimg and QEMU's tools side by side.
//!
//! The library deliberately does not use the engine crates (but for blockio's
//! `splitmix64`, the project's one pseudo-random mixer): it is QEMU's view of the
//! images, the reference our implementation is compared to.
#![warn(missing_docs)]

mod copied;
mod fixtures;
mod legacy;
mod ops;
mod pair;
mod prng;
mod tools;

pub use copied::only_safe_copied_errors;
pub use fixtures::{fixture, matrix, Expect, Fixture, FixtureSpec};
pub use legacy::strip_snapshot_extra_data;
pub use ops::{random_ranges, OpMix};
pub use pair::{Pair, Run};
pub use prng::Prng;
pub use tools::{
    path_str, qemu_check, qemu_img, qemu_img_in, qemu_img_json, qemu_img_status,
    qemu_info_chain_json, qemu_info_json, qemu_io, qemu_io_abort, qemu_map_json, raw_reference,
    raw_reference_file, raw_reference_snapshot, said, tool, without_timings, QemuIoHolder,
};
