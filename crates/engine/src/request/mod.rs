//! Guest requests (layer 8): reads, writes (in place and allocating), write-zeroes and
//! discard, flush and close, resize (with its preallocation), the VM state area, and what happens when one
//! finds corruption. Each plans under the metadata lock through the mapping layer (`map`) and the metadata store (`meta`), takes the
//! leases and gates its I/O needs (I2, I6), and does its data I/O without the lock (I7), its
//! guards travelling with the I/O (I9).
//!
//! These are the methods behind the [`Image`](crate::Image) facade (defined in `image`, which
//! never names this module); they use the layers below (files, aligned I/O, meta, map,
//! bitmaps) and reach each other's items only where `pub(super)` says so.

mod allocate;
mod compressed;
mod corrupt;
mod flush;
mod prealloc;
mod read;
mod resize;
mod vectored;
mod vmstate;
mod write;
mod zero;

pub use vectored::VectoredResult;
