//! The subcommands of `qimg`, one module each: its clap arguments (`#[derive(clap::Args)]`)
//! and its `run`. Each follows the qemu-img (or, for `io`, qemu-io) command of the same name:
//! options, output, messages and exit status.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod io;
pub mod map;
pub mod measure;
pub mod option_help;
pub mod rebase;
pub mod resize;
pub mod snapshot;
