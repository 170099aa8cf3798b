//! What a case does with an image: open it (read-only or read-write), read every cluster,
//! look at its snapshots, bitmaps and allocation, check it, write to it, close it; and what
//! counts as a finding along the way.

use blockio::Opener;
use qcow2_engine::{Error, Image, ImageOptions};
use qcow2_tests::Prng;
use std::collections::BTreeMap;
use std::path::Path;

/// Guest bytes read in full by the first read-only session; beyond that, a sample.
const READ_BUDGET: u64 = 48 << 20;
/// The same for the later sessions (read-write, and read-only after it): they read the start
/// of the disk, where the fixtures and the writes are, and a sample of the rest.
const LATER_READ_BUDGET: u64 = 4 << 20;

/// Print every operation as it starts (set by a verbose run: `HOSTILE_SEED`/`HOSTILE_CRAFTED`).
pub static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// When the running case started (for the trace).
    pub static CASE_START: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Time since the case started, for the trace.
pub fn since_start() -> std::time::Duration {
    CASE_START.with(|s| s.get().map(|t| t.elapsed()).unwrap_or_default())
}

/// Names the operation about to run (for hang and memory reports) and, when tracing,
/// prints it.
macro_rules! trace {
    ($op:literal) => {
        super::guard::set_op($op);
        if TRACE.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("  [trace {:>9.3?}] {}", super::exercise::since_start(), $op);
        }
    };
    ($op:literal, $($t:tt)*) => {
        super::guard::set_op($op);
        if TRACE.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "  [trace {:>9.3?}] {} {}",
                super::exercise::since_start(),
                $op,
                format!($($t)*)
            );
        }
    };
}

/// The requests of one case, drawn from its seed before anything runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Random numbers for offsets and lengths of reads and writes (scaled to the disk size,
    /// which a mutation may have changed).
    pub words: Vec<u64>,
    /// Run `Image::check` in the read-only session.
    pub check: bool,
    /// Write operations of the read-write session.
    pub writes: usize,
    /// Repair instead of writing (open_for_repair + repair(All)).
    pub repair: bool,
}

impl Plan {
    /// A plan from a generator.
    pub fn draw(r: &mut Prng) -> Plan {
        Plan {
            words: (0..96).map(|_| r.next_u64()).collect(),
            check: r.chance(50),
            writes: r.range(2, 10) as usize,
            repair: r.chance(8),
        }
    }
}

/// What happened in the sessions of one case.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Variant names of the errors seen, with counts.
    pub errors: BTreeMap<String, u64>,
    /// Things that must not happen (each one fails the case).
    pub findings: Vec<String>,
    /// Opens that succeeded (read-only, read-write).
    pub opened: [u64; 2],
    /// Opens that failed (read-only, read-write).
    pub refused: [u64; 2],
    /// Successful reads and their bytes.
    pub reads: u64,
    /// Successful writes (write, zeroes, discard).
    pub writes: u64,
    /// Guest bytes read.
    pub read_bytes: u64,
    /// Why the last read-write open failed.
    pub rw_refusal: String,
    /// Requests to grow a file far past its end, refused by the guard (not a failure below
    /// 16 TiB: see `GROWTH` in hostile_images.rs).
    pub growth_refused: u64,
}

impl Outcome {
    /// Records an error from an operation `what` and says whether it is acceptable.
    pub fn error(&mut self, what: &str, e: &Error, rw: bool, in_range: bool) {
        let name = variant(e);
        *self.errors.entry(format!("{what}: {name}")).or_default() += 1;
        let msg = e.to_string();
        if msg.trim().is_empty() {
            self.findings
                .push(format!("{what}: error {name} with an empty message"));
        }
        match e {
            Error::OutOfRange { .. } if in_range => self.findings.push(format!(
                "{what}: OutOfRange for a request inside the disk: {msg}"
            )),
            Error::ReadOnly if rw => self
                .findings
                .push(format!("{what}: ReadOnly in a read-write session: {msg}")),
            _ => {}
        }
    }
}

/// The variant's name (for statistics).
pub fn variant(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "Io",
        Error::Format { .. } => "Format",
        Error::Corrupt { .. } => "Corrupt",
        Error::MarkedCorrupt(_) => "MarkedCorrupt",
        Error::OutOfRange { .. } => "OutOfRange",
        Error::ReadOnly => "ReadOnly",
        Error::BackingChainTooDeep { .. } => "BackingChainTooDeep",
        Error::BackingLoop { .. } => "BackingLoop",
        Error::OpenFile { .. } => "OpenFile",
        Error::Unsupported { .. } => "Unsupported",
        Error::Decompress { .. } => "Decompress",
        Error::RefcountOverflow { .. } => "RefcountOverflow",
        _ => "other",
    }
}

/// Offsets to read: every chunk of the disk up to the budget, then a sample, then some
/// unaligned reads drawn from the plan.
fn read_ranges(size: u64, cs: u64, words: &[u64], budget: u64) -> Vec<(u64, u64)> {
    let chunk = cs.clamp(1 << 20, 4 << 20);
    let mut out = Vec::new();
    let full = size.min(budget);
    let mut off = 0;
    while off < full {
        let len = chunk.min(size - off);
        out.push((off, len));
        off += len;
    }
    if size > full {
        // A sample of the rest: whole chunks when the whole disk was meant to be read, a
        // cluster (at least 64 KiB) otherwise.
        let (n, len) = if budget >= READ_BUDGET {
            (32, chunk)
        } else {
            (8, cs.max(64 << 10))
        };
        for w in words.iter().take(n) {
            let o = (w % size) & !(cs - 1);
            out.push((o, len.min(size - o)));
        }
        out.push((size - len.min(size), len.min(size)));
    }
    if size > 0 {
        for w in words.iter().skip(32).take(8) {
            let o = w % size;
            let len = (1 + (w >> 40) % (3 * cs)).min(size - o);
            out.push((o, len));
        }
    }
    out
}

fn opts(read_only: bool, data_file: Option<&Path>) -> ImageOptions {
    let o = ImageOptions::new().read_only(read_only);
    match data_file {
        Some(p) => o.data_file(p),
        None => o,
    }
}

/// Reads every range; counts errors per operation.
async fn read_all<O: Opener>(
    img: &Image<O>,
    words: &[u64],
    budget: u64,
    rw: bool,
    out: &mut Outcome,
) {
    for (off, len) in read_ranges(img.size(), img.cluster_size(), words, budget) {
        trace!("read", "{off:#x}+{len:#x}");
        match img.read(off, len).await {
            Ok(_) => {
                out.reads += 1;
                out.read_bytes += len;
            }
            Err(e) => out.error("read", &e, rw, true),
        }
    }
}

/// A read-only session: open, read everything (`first`: the whole disk; otherwise its start
/// and a sample), snapshots, bitmaps, block status, check.
pub async fn read_only_session<O: Opener>(
    opener: O,
    path: &Path,
    data_file: Option<&Path>,
    plan: &Plan,
    first: bool,
    out: &mut Outcome,
) {
    trace!("open read-only", "{}", path.display());
    let img = match Image::open(opener, path, opts(true, data_file)).await {
        Ok(i) => i,
        Err(e) => {
            trace!("refused", "{e}");
            out.refused[0] += 1;
            out.error("open ro", &e, false, true);
            return;
        }
    };
    out.opened[0] += 1;
    let budget = if first {
        READ_BUDGET
    } else {
        LATER_READ_BUDGET
    };
    read_all(&img, &plan.words, budget, false, out).await;
    trace!("snapshots");
    if let Err(e) = img.snapshots().await {
        out.error("snapshots", &e, false, true);
    }
    trace!("bitmaps");
    if let Err(e) = img.bitmaps().await {
        out.error("bitmaps", &e, false, true);
    }
    let size = img.size().min(READ_BUDGET);
    trace!("block_status", "0+{size:#x}");
    if let Err(e) = img.block_status(0, size).await {
        out.error("block_status", &e, false, true);
    }
    if plan.check && first {
        trace!("check");
        if let Err(e) = img.check().await {
            out.error("check", &e, false, true);
        }
    }
    trace!("close read-only");
    if let Err(e) = img.close().await {
        out.error("close ro", &e, false, true);
    }
}

/// A read-write session: open, write, zero, discard, flush, read back, read everything, close.
/// Returns whether the image opened.
pub async fn read_write_session<O: Opener>(
    opener: O,
    path: &Path,
    data_file: Option<&Path>,
    plan: &Plan,
    out: &mut Outcome,
) -> bool {
    trace!("open read-write", "{}", path.display());
    let img = match Image::open(opener, path, opts(false, data_file)).await {
        Ok(i) => i,
        Err(e) => {
            trace!("refused", "{e}");
            out.rw_refusal = e.to_string();
            out.refused[1] += 1;
            out.error("open rw", &e, true, true);
            return false;
        }
    };
    out.opened[1] += 1;
    let size = img.size();
    let cs = img.cluster_size();
    let mut r = Prng::new(plan.words[0]);
    for i in 0..plan.writes {
        if size == 0 {
            break;
        }
        // Half the requests land in the first MiB (where the fixtures have most data).
        let span = if r.chance(50) {
            size.min(1 << 20)
        } else {
            size
        };
        let off = r.below(span);
        let len = r.range(1, 3 * cs).min(size - off);
        let op = r.below(10);
        let res = match op {
            0..=5 => {
                trace!("write", "{off:#x}+{len:#x}");
                let pat = (i as u8).wrapping_mul(37) | 1;
                let data = vec![pat; len as usize];
                match img.write(off, &data).await {
                    Ok(()) => {
                        // An acknowledged write reads back.
                        trace!("read back", "{off:#x}+{len:#x}");
                        match img.read(off, len).await {
                            Ok(b) if b[..] != data[..] => out.findings.push(format!(
                                "write {off:#x}+{len:#x} acknowledged, but reads back differently"
                            )),
                            Ok(_) => {}
                            Err(e) => out.error("read back", &e, true, true),
                        }
                        Ok(())
                    }
                    Err(e) => Err(("write", e)),
                }
            }
            6..=7 => {
                let unmap = r.chance(50);
                trace!("write_zeroes", "{off:#x}+{len:#x} unmap={unmap}");
                img.write_zeroes(off, len, unmap)
                    .await
                    .map_err(|e| ("write_zeroes", e))
            }
            8 => {
                trace!("discard", "{off:#x}+{len:#x}");
                img.discard(off, len).await.map_err(|e| ("discard", e))
            }
            _ => {
                trace!("flush");
                img.flush().await.map_err(|e| ("flush", e))
            }
        };
        match res {
            Ok(()) => out.writes += 1,
            Err((what, e)) => out.error(what, &e, true, true),
        }
    }
    read_all(&img, &plan.words[40..], LATER_READ_BUDGET, true, out).await;
    trace!("close");
    if let Err(e) = img.close().await {
        out.error("close rw", &e, true, true);
    }
    true
}

/// A repair session: `open_for_repair` and `repair(All)` (what `qimg check -r all` does).
pub async fn repair_session<O: Opener>(
    opener: O,
    path: &Path,
    data_file: Option<&Path>,
    out: &mut Outcome,
) {
    trace!("open for repair", "{}", path.display());
    let img = match Image::open_for_repair(opener, path, opts(true, data_file)).await {
        Ok(i) => i,
        Err(e) => {
            out.error("open for repair", &e, true, true);
            return;
        }
    };
    trace!("repair");
    if let Err(e) = img.repair(qcow2_engine::RepairMode::All).await {
        out.error("repair", &e, true, true);
    }
}
