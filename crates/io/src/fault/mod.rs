//! The fault-injecting backend: wraps any backend so that a test can fail, hold, release and
//! reorder its requests, and read back the log of what reached the file.
//!
//! A [`FaultInjector`] and its [`FaultController`]s share one state. Every request gets a
//! [`RequestInfo`]. When it arrives, the fault rules are checked first (a failing request
//! returns the rule's errno without reaching the inner backend), then the hold filters: a held
//! request waits until the test picks it with [`FaultController::next_held`] and decides with
//! [`HeldRequest::release`] or [`HeldRequest::fail`], in any order. Nothing here sleeps; the
//! waiting uses tokio's `Notify` and `oneshot`, which work on any tokio runtime, tokio-uring's
//! included, and without one.
//!
//! Over a backend that completes on its own (a real file, io_uring), a test stepping its tasks
//! on a local executor knows every task waits for something held when none can go on and
//! [`FaultController::running`] is 0 ([`FaultController::idle`] waits for that).
//!
//! ## Requests whose futures are dropped
//!
//! The injector behaves as the kernel does: a request it has accepted completes even if the
//! future that issued it is dropped. A request dropped while held becomes an *orphan*: it
//! stays held (the test still picks it and decides), and once released it is run on the
//! inner backend by an orphan driver ([`FaultInjector::orphan_driver`],
//! [`FaultOpener::orphan_driver`]), a future the test spawns beside its work; its [`Keep`]
//! (in its buffer, or its argument) lives until then. A test that drops requests and releases
//! them must run a driver: releasing an orphan without one panics. A request dropped after
//! it reached the inner backend is the inner backend's to finish (it does, with its keep);
//! it is then not in the log (it counts as finished unlogged, so no crash image is built from
//! that log).
//!
//! ## The log, and crash images
//!
//! Every finished request is appended to the log in completion order as a [`LogEntry`], with
//! the bytes of each successful write and, for every request, `issued_after`: how many
//! entries had completed when it reached the inner backend. That is enough to build crash
//! images later: replaying the successful writes, zeroings, hole punches and length changes on
//! a copy of the initial contents reproduces the file; a write is durable once a `Flush` that
//! was issued after it completed (`write.seq < flush.issued_after` and the flush succeeded), and
//! a crash image is the durable prefix plus any subset (some torn) of the later writes.
//!
//! [`CrashImage::from_log`] builds one (and [`FaultController::crash`] /
//! [`crash_image`](FaultController::crash_image) from the controller's own log): a crash
//! after any number of completed requests ([`CrashSpec::at`]), the surviving subset and the
//! torn sector chosen by a seed. Note what `issued_after` means for a flush: a write that
//! completed while the flush was already running (`write.seq >= flush.issued_after`) is *not*
//! covered by it, even though it completed before the flush did; an fsync promises nothing
//! about writes it may have raced with. Requests on several files (an image and its data
//! file) are told apart by [`RequestInfo::file`]; a flush makes only its own file durable.

use bytes::Bytes;
use std::ops::Range;

mod controller;
mod crash;
mod injector;
mod state;
pub use controller::{FaultController, HeldRequest};
pub use crash::{CrashImage, CrashSpec, TornSector, CRASH_SECTOR};
pub use injector::{FaultInjector, FaultOpener};

/// The kind of a backend request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`Backend::read_at`].
    Read,
    /// [`Backend::write_at`].
    Write,
    /// [`Backend::flush`].
    Flush,
    /// [`Backend::punch_hole`].
    PunchHole,
    /// [`Backend::write_zeroes`].
    WriteZeroes,
    /// [`Backend::set_len`].
    SetLen,
}

impl OpKind {
    /// Whether requests of this kind cover a byte range (all but `Flush` and `SetLen`).
    pub fn has_range(self) -> bool {
        !matches!(self, OpKind::Flush | OpKind::SetLen)
    }
}

/// What a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestInfo {
    /// Unique per injector, in arrival order (from 0).
    pub id: u64,
    /// Which file: 0 for an injector made by [`FaultInjector::new`]; files opened through one
    /// [`FaultOpener`] (or added with [`FaultInjector::with_controller`]) are numbered in the
    /// order they were first opened, the same path always getting the same number (see
    /// [`FaultController::file_id`]).
    pub file: u32,
    /// The kind of request.
    pub op: OpKind,
    /// The byte offset; for `SetLen` the new length, for `Flush` 0.
    pub offset: u64,
    /// The byte count (the buffer's window for reads and writes); 0 for `Flush` and `SetLen`.
    pub len: u64,
}

/// Selects requests by kind and byte range. An absent criterion matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Only requests of this kind.
    pub op: Option<OpKind>,
    /// Only requests whose bytes `[offset, offset+len)` overlap this range (a zero-length
    /// request matches if its offset lies in it). Requests without a byte range (`Flush`,
    /// `SetLen`) never match a filter with a range.
    pub range: Option<Range<u64>>,
    /// Only requests on this file (see [`RequestInfo::file`]).
    pub file: Option<u32>,
}

impl RequestFilter {
    /// Matches every request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Matches requests of kind `op`.
    pub fn op(op: OpKind) -> Self {
        Self {
            op: Some(op),
            ..Self::default()
        }
    }

    /// Also requires an overlap with `range`.
    pub fn in_range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Also requires the request to be on file `file`.
    pub fn on_file(mut self, file: u32) -> Self {
        self.file = Some(file);
        self
    }

    /// Whether `req` is selected.
    pub fn matches(&self, req: &RequestInfo) -> bool {
        matches_request(self.op, self.range.as_ref(), self.file, req)
    }
}

fn matches_request(
    op: Option<OpKind>,
    range: Option<&Range<u64>>,
    file: Option<u32>,
    req: &RequestInfo,
) -> bool {
    if op.is_some_and(|o| o != req.op) || file.is_some_and(|f| f != req.file) {
        return false;
    }
    match range {
        None => true,
        Some(_) if !req.op.has_range() => false,
        Some(r) if req.len == 0 => r.contains(&req.offset),
        Some(r) => req.offset < r.end && r.start < req.offset.saturating_add(req.len),
    }
}

/// A rule making matching requests fail: after letting `nth` matching requests through, the
/// next `times` matching ones (every later one if `None`) return `errno` without reaching the
/// inner backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// Only requests of this kind (any if `None`).
    pub op: Option<OpKind>,
    /// Only requests overlapping this byte range (see [`RequestFilter::range`]).
    pub range: Option<Range<u64>>,
    /// Only requests on this file (see [`RequestInfo::file`]).
    pub file: Option<u32>,
    /// The error returned (`io::Error::from_raw_os_error(errno)`).
    pub errno: i32,
    /// How many matching requests pass before the rule starts failing them.
    pub nth: u64,
    /// How many requests fail (then the rule is spent); `None` for all of them.
    pub times: Option<u64>,
}

impl Default for FaultRule {
    /// Every request fails with EIO, forever.
    fn default() -> Self {
        Self::new(libc::EIO)
    }
}

impl FaultRule {
    /// Every request fails with `errno`, forever.
    pub fn new(errno: i32) -> Self {
        Self {
            op: None,
            range: None,
            file: None,
            errno,
            nth: 0,
            times: None,
        }
    }

    /// Only requests of kind `op`.
    pub fn op(mut self, op: OpKind) -> Self {
        self.op = Some(op);
        self
    }

    /// Only requests overlapping `range`.
    pub fn range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Only requests on file `file`.
    pub fn file(mut self, file: u32) -> Self {
        self.file = Some(file);
        self
    }

    /// Lets `n` matching requests pass first.
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = n;
        self
    }

    /// Fails only `n` requests.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// Whether `req` is one this rule looks at (ignoring the counts).
    pub fn matches(&self, req: &RequestInfo) -> bool {
        matches_request(self.op, self.range.as_ref(), self.file, req)
    }
}

/// One finished request in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in completion order, from 0 (not reset by [`FaultController::clear_log`]).
    pub seq: u64,
    /// The request.
    pub info: RequestInfo,
    /// How many requests had completed when this one reached the inner backend: entries with
    /// a smaller `seq` finished before it started. A successful `Flush` makes durable every
    /// write with `seq < issued_after`.
    pub issued_after: u64,
    /// For a successful write, the bytes written.
    pub data: Option<Bytes>,
    /// The error number if the request failed (`EIO` for an error without one).
    pub error: Option<i32>,
    /// Whether the failure was injected (a rule or [`HeldRequest::fail`]), in which case the
    /// inner backend never saw the request.
    pub injected: bool,
}

impl LogEntry {
    /// Whether the request succeeded.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}
