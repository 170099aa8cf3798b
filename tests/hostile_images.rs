//! Hostile images: QEMU-made fixtures with their metadata damaged (seeded random bit flips,
//! random and "interesting" values in the header, L1 and L2 tables, refcount table and blocks,
//! snapshot table and bitmap directory; truncations; hand-crafted cases), opened with the
//! engine read-only and read-write, read in full, written to and closed.
//!
//! Every case must finish in time (a tokio timeout, and a watchdog for loops that never
//! yield), never panic, keep its allocations bounded (a counting global allocator), never
//! write to a file it opened read-only, to a backing file, or to an image that failed to
//! open, and never grow a file without bound. Errors are the engine's typed [`Error`]s.
//!
//! Environment (all optional):
//! - `HOSTILE_CASES`: random cases to run (default 1500; `just soak` runs many more);
//! - `HOSTILE_BASE`: base seed of the random cases (default fixed, so CI is reproducible);
//! - `HOSTILE_SEED`: run the one random case with this seed, verbosely (the failure report
//!   prints it);
//! - `HOSTILE_CRAFTED`: run only the crafted cases whose `fixture/file/name` contains this;
//! - `HOSTILE_CRAFTED_ALL=1`: the crafted cases on every fixture (default: a subset);
//! - `HOSTILE_FIXTURES`: comma-separated fixture names to use;
//! - `HOSTILE_THREADS`: worker threads (default: the number of CPUs, at most 4);
//! - `HOSTILE_TIMEOUT_MS`: per-case time limit (default 5000);
//! - `HOSTILE_STRICT=1`: fail on known engine bugs too.

mod hostile;

use blockio::{FileOpener, MemoryBackend, MemoryOpener, Opener};
use hostile::exercise::{self, Outcome, Plan};
use hostile::guard::{self, GuardedOpener};
use hostile::layout::Layout;
use hostile::mutate::{self, Mutation};
use qcow2_format::Header;
use qcow2_tests::{fixture, Fixture, Prng};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: guard::GuardAlloc = guard::GuardAlloc;

/// The fixtures cases are drawn from, with their weights (large images weigh less: every
/// case copies and reads them in full).
const FIXTURES: &[(&str, u64)] = &[
    ("cluster-512", 6),
    ("cluster-4k", 4),
    ("cluster-64k", 6),
    ("cluster-2m", 2),
    ("refcount-1", 3),
    ("refcount-64", 3),
    ("v2", 3),
    ("v2-zero-backing", 3),
    ("extl2-64k", 4),
    ("extl2-16k", 4),
    ("extl2-backing", 3),
    ("compressed-zlib", 5),
    ("compressed-zstd-rewritten", 5),
    ("compressed-zlib-512", 4),
    ("compressed-zlib-2m", 1),
    ("zero-clusters", 3),
    ("chain", 4),
    ("backing-short-raw", 2),
    ("snapshot", 6),
    ("bitmap", 6),
    ("data-file", 3),
    ("data-file-raw", 2),
    ("lazy-refcounts", 2),
    ("lazy-refcounts-dirty", 2),
    ("prealloc-metadata", 2),
    ("resized", 2),
];

/// The fixtures the crafted cases run on by default (`HOSTILE_CRAFTED_ALL=1`: all of them):
/// one of each cluster size class, refcount width, format version and feature.
const CRAFTED_FIXTURES: &[&str] = &[
    "cluster-512",
    "cluster-64k",
    "refcount-1",
    "refcount-64",
    "v2",
    "extl2-16k",
    "compressed-zlib",
    "compressed-zstd-rewritten",
    "compressed-zlib-512",
    "zero-clusters",
    "chain",
    "snapshot",
    "bitmap",
    "data-file-raw",
    "lazy-refcounts-dirty",
];

/// How much a file may grow in one case before the guard refuses (EFBIG). Refusals up to
/// [`ABSURD_OFFSET`] are counted, not failed: an image whose refcounts claim every cluster
/// makes the allocator look past them, as QEMU's does, and a real file would just grow
/// sparsely (the memory backend would not).
const GROWTH: u64 = 128 << 20;
/// A write ending beyond 16 TiB (ext4's largest file) is a failure: no allocation puts
/// anything there, so the offset came from disk unchecked.
const ABSURD_OFFSET: u64 = 1 << 44;

/// Engine bugs already reported, recognised in a failure's text: `(needle, label)`. A case
/// failing only on these counts as "known" (reported, not failed) unless `HOSTILE_STRICT=1`.
/// Each has an `#[ignore]`d regression test below.
const KNOWN: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    cases: u64,
    base: u64,
    seed: Option<u64>,
    crafted: Option<String>,
    crafted_all: bool,
    fixtures: Option<Vec<String>>,
    threads: usize,
    timeout: Duration,
    strict: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

impl Config {
    fn from_env() -> Config {
        Config {
            cases: env_u64("HOSTILE_CASES").unwrap_or(1500),
            base: env_u64("HOSTILE_BASE").unwrap_or(0x5EED_CAFE_0000_0001),
            seed: env_u64("HOSTILE_SEED"),
            crafted: std::env::var("HOSTILE_CRAFTED").ok(),
            crafted_all: std::env::var("HOSTILE_CRAFTED_ALL").is_ok_and(|v| v == "1")
                || std::env::var("HOSTILE_CRAFTED").is_ok(),
            fixtures: std::env::var("HOSTILE_FIXTURES")
                .ok()
                .map(|s| s.split(',').map(|x| x.trim().to_string()).collect()),
            threads: env_u64("HOSTILE_THREADS")
                .map(|n| n as usize)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(2)
                        .min(4)
                }),
            timeout: Duration::from_millis(env_u64("HOSTILE_TIMEOUT_MS").unwrap_or(5000)),
            strict: std::env::var("HOSTILE_STRICT").is_ok_and(|v| v == "1"),
        }
    }

    fn verbose(&self) -> bool {
        self.seed.is_some() || self.crafted.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures in memory

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Top,
    Backing,
    DataFile,
}

struct FileData {
    path: PathBuf,
    bytes: Arc<Vec<u8>>,
    layout: Option<Layout>,
    role: Role,
    /// A shared copy for cases that only read this file (handed out as read-only views).
    shared: MemoryBackend,
}

struct Loaded {
    name: &'static str,
    _fx: Fixture,
    files: Vec<FileData>,
}

impl Loaded {
    fn load(name: &'static str) -> Loaded {
        let fx = fixture(name).build();
        let top_bytes = std::fs::read(&fx.image).unwrap();
        let top_layout = Layout::parse(&top_bytes).expect("fixture header parses");
        let data_file = top_layout
            .header
            .data_file_name()
            .map(|n| fx.dir.path().join(n));
        let mut files = Vec::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(fx.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for path in entries {
            let bytes = std::fs::read(&path).unwrap();
            let role = if path == fx.image {
                Role::Top
            } else if Some(&path) == data_file.as_ref() {
                Role::DataFile
            } else {
                Role::Backing
            };
            let layout = if role == Role::DataFile {
                None
            } else {
                Layout::parse(&bytes)
            };
            files.push(FileData {
                shared: MemoryBackend::from_vec(bytes.clone()),
                path,
                bytes: Arc::new(bytes),
                layout,
                role,
            });
        }
        Loaded {
            name,
            _fx: fx,
            files,
        }
    }

    fn top(&self) -> usize {
        self.files.iter().position(|f| f.role == Role::Top).unwrap()
    }

    fn data_file(&self) -> Option<usize> {
        self.files.iter().position(|f| f.role == Role::DataFile)
    }

    /// qcow2 files a case may damage.
    fn targets(&self) -> Vec<usize> {
        (0..self.files.len())
            .filter(|&i| self.files[i].layout.is_some())
            .collect()
    }

    /// The shared copies must still hold the fixture's bytes.
    fn assert_pristine(&self) {
        for f in &self.files {
            assert!(
                f.shared.snapshot() == *f.bytes,
                "{}: the shared copy of {} was modified",
                self.name,
                f.path.display()
            );
        }
    }
}

/// Every fixture (of `HOSTILE_FIXTURES`), built once for all the tests of this binary.
fn all_fixtures(cfg: &Config) -> &'static [Loaded] {
    static ALL: std::sync::OnceLock<Vec<Loaded>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| load_fixtures(cfg, None))
}

fn load_fixtures(cfg: &Config, only: Option<&str>) -> Vec<Loaded> {
    FIXTURES
        .iter()
        .filter(|(n, _)| only.is_none_or(|o| o == *n))
        .filter(|(n, _)| {
            cfg.fixtures
                .as_ref()
                .is_none_or(|l| l.iter().any(|x| x == n))
        })
        .map(|(n, _)| Loaded::load(n))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Cases

#[derive(Debug, Clone)]
struct Case {
    /// Random cases: the seed everything was drawn from. Crafted: the case's index.
    seed: u64,
    /// "random" or the crafted case's name.
    label: String,
    fixture: usize,
    target: usize,
    mutations: Vec<Mutation>,
    plan: Plan,
    /// Real files through `FileOpener` instead of memory.
    file_mode: bool,
}

fn case_seed(base: u64, i: u64) -> u64 {
    Prng::new(base ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// The fixture a seed selects (the first draw, so that a reproduction builds only it).
fn fixture_of(seed: u64, names: &[&str]) -> &'static str {
    let mut r = Prng::new(seed);
    let pool: Vec<(&str, u64)> = FIXTURES
        .iter()
        .filter(|(n, _)| names.contains(n))
        .copied()
        .collect();
    let total: u64 = pool.iter().map(|(_, w)| w).sum();
    let mut x = r.below(total);
    for (n, w) in &pool {
        if x < *w {
            return FIXTURES.iter().find(|(m, _)| m == n).unwrap().0;
        }
        x -= w;
    }
    unreachable!()
}

fn draw_case(seed: u64, fixtures: &[Loaded], names: &[&str]) -> Case {
    let name = fixture_of(seed, names);
    let fixture = fixtures.iter().position(|f| f.name == name).unwrap();
    let mut r = Prng::new(seed);
    r.next_u64(); // the fixture draw
    let fx = &fixtures[fixture];
    let targets = fx.targets();
    let target = if targets.len() == 1 || r.chance(75) {
        fx.top()
    } else {
        *r.pick(&targets)
    };
    let file = &fx.files[target];
    let layout = file.layout.as_ref().unwrap();
    let mutations = mutate::random_set(&file.bytes, layout, &mut r);
    let plan = Plan::draw(&mut r);
    let file_mode = target == fx.top() && r.chance(10);
    Case {
        seed,
        label: "random".into(),
        fixture,
        target,
        mutations,
        plan,
        file_mode,
    }
}

fn crafted_cases(fixtures: &[Loaded], filter: Option<&str>, all: bool) -> Vec<Case> {
    let mut out = Vec::new();
    for (fi, fx) in fixtures.iter().enumerate() {
        if !all && !CRAFTED_FIXTURES.contains(&fx.name) {
            continue;
        }
        let top = fx.files[fx.top()].path.to_str().unwrap().to_string();
        for ti in fx.targets() {
            let file = &fx.files[ti];
            let layout = file.layout.as_ref().unwrap();
            let own = file.path.to_str().unwrap();
            for (k, c) in hostile::crafted::cases(layout, own, &top)
                .into_iter()
                .enumerate()
            {
                let label = format!("{}/{}/{}", fx.name, file_name(&file.path), c.name);
                if filter.is_some_and(|f| !label.contains(f)) {
                    continue;
                }
                let mut r = Prng::new(
                    label
                        .bytes()
                        .fold(0u64, |h, b| h.wrapping_mul(0x100_0000_01B3) ^ u64::from(b)),
                );
                let plan = Plan::draw(&mut r);
                let file_mode = ti == fx.top() && k % 8 == 0;
                out.push(Case {
                    seed: out.len() as u64,
                    label,
                    fixture: fi,
                    target: ti,
                    mutations: c.mutations,
                    plan,
                    file_mode,
                });
            }
        }
    }
    out
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("?")
}

// ---------------------------------------------------------------------------------------------
// Running one case

/// What a case produced.
struct Report {
    outcome: Outcome,
    panic: Option<String>,
    hang: bool,
    /// The operation running when the case ended (the one that hung, after a timeout).
    op: &'static str,
    alloc: guard::AllocStats,
    elapsed: Duration,
}

thread_local! {
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records a case's panic, with the engine's frames of the
/// backtrace, instead of printing it (printing too when verbose).
fn install_panic_hook(verbose: bool) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CASE.with(|c| c.get()) {
                prev(info);
                return;
            }
            guard::unaccounted(|| {
                let bt = std::backtrace::Backtrace::force_capture().to_string();
                let mut frames = Vec::new();
                let mut lines = bt.lines().peekable();
                while let Some(l) = lines.next() {
                    let t = l.trim_start();
                    let ours = ["qcow2_engine", "qcow2_format", "qcow2_alloc", "blockio::"]
                        .iter()
                        .any(|k| t.contains(k));
                    if ours && frames.len() < 16 {
                        let mut f = t.to_string();
                        if let Some(at) = lines.peek().filter(|n| n.trim_start().starts_with("at "))
                        {
                            f.push_str(&format!(" ({})", at.trim_start()));
                        }
                        frames.push(f);
                    }
                }
                let msg = format!(
                    "{info}\n      backtrace (engine frames):\n        {}",
                    frames.join("\n        ")
                );
                PANIC.with(|p| *p.borrow_mut() = Some(msg));
                if verbose {
                    prev(info);
                }
            });
        }));
    });
}

/// A copy of the fixture's files in a fresh memory opener: the target holds `mutated`, the
/// data file is a private copy, every other file a read-only view of the shared copy.
fn memory_files(
    fx: &Loaded,
    target: usize,
    mutated: &[u8],
) -> (MemoryOpener, MemoryBackend, Option<MemoryBackend>) {
    let op = MemoryOpener::new();
    let mut tgt = None;
    let mut data = None;
    for (i, f) in fx.files.iter().enumerate() {
        if i == target {
            let b = MemoryBackend::from_vec(mutated.to_vec());
            tgt = Some(b.clone());
            op.insert(&f.path, b);
        } else if f.role == Role::DataFile {
            let b = MemoryBackend::from_vec(f.bytes.to_vec());
            data = Some(b.clone());
            op.insert(&f.path, b);
        } else {
            op.insert(&f.path, f.shared.read_only());
        }
    }
    (op, tgt.unwrap(), data)
}

/// Findings about what the engine wrote where.
fn check_writes<O: Opener>(
    g: &GuardedOpener<O>,
    session: &str,
    allowed: &[&Path],
    out: &mut Outcome,
) {
    for (path, log) in g.logs() {
        let writes = log.writes.load(Ordering::Relaxed);
        if writes > 0 && !allowed.contains(&path.as_path()) {
            out.findings.push(format!(
                "{session}: {writes} write request(s) to {}, which must not be written",
                path.display()
            ));
        }
        let past = log.past_cap.load(Ordering::Relaxed);
        let end = log.past_cap_end.load(Ordering::Relaxed);
        if past > 0 && end > ABSURD_OFFSET {
            out.findings.push(format!(
                "{session}: {past} request(s) to write {} up to {end:#x}, beyond what any file \
                 system allows: an unchecked on-disk number used as a file offset (during: {})",
                path.display(),
                log.past_cap_op.lock().unwrap()
            ));
        } else if past > 0 {
            out.growth_refused += past;
        }
        out.growth_refused += log.set_len_past_cap.load(Ordering::Relaxed);
    }
}

/// " of a dirty image" when the header has the dirty bit (a read-write open then repairs the
/// refcounts first, as QEMU does).
fn dirty(bytes: &[u8]) -> &'static str {
    let cs = Header::peek_cluster_bits(bytes).map_or(0, |b| 1usize << b);
    match Header::parse(&bytes[..cs.min(bytes.len())]) {
        Ok(h) if h.is_dirty() => " of a dirty image",
        _ => "",
    }
}

fn unchanged(b: &MemoryBackend, want: &[u8], what: &str, out: &mut Outcome) {
    let same = guard::unaccounted(|| b.snapshot() == want);
    if !same {
        out.findings.push(format!("{what} changed the file"));
    }
}

async fn memory_case(case: &Case, fx: &Loaded, mutated: &[u8], out: &mut Outcome) {
    let path = &fx.files[case.target].path;
    let data_path = fx.data_file().map(|i| fx.files[i].path.clone());
    let data_orig = fx.data_file().map(|i| fx.files[i].bytes.clone());

    // Read-only: nothing may change anywhere.
    let (op, tgt, data) = memory_files(fx, case.target, mutated);
    let g = GuardedOpener::new(op, GROWTH);
    exercise::read_only_session(g.clone(), path, None, &case.plan, true, out).await;
    unchanged(&tgt, mutated, "read-only session", out);
    if let (Some(d), Some(o)) = (&data, &data_orig) {
        unchanged(d, o, "read-only session (data file)", out);
    }
    check_writes(&g, "read-only session", &[], out);

    // Read-write: only the image and its data file may be written, and only if it opened.
    let (op, tgt, data) = memory_files(fx, case.target, mutated);
    let g = GuardedOpener::new(op.clone(), GROWTH);
    let opened = exercise::read_write_session(g.clone(), path, None, &case.plan, out).await;
    if opened {
        let mut allowed = vec![path.as_path()];
        if let Some(d) = &data_path {
            allowed.push(d);
        }
        check_writes(&g, "read-write session", &allowed, out);
        // What the engine left behind must open and read without harm, and read-only.
        let after = guard::unaccounted(|| tgt.snapshot());
        let g = GuardedOpener::new(op, GROWTH);
        exercise::read_only_session(g.clone(), path, None, &case.plan, false, out).await;
        unchanged(
            &tgt,
            &after,
            "read-only session after the read-write one",
            out,
        );
        check_writes(&g, "read-only session after the read-write one", &[], out);
    } else {
        let what = format!(
            "a read-write open{} that failed ({})",
            dirty(mutated),
            out.rw_refusal
        );
        unchanged(&tgt, mutated, &what, out);
        if let (Some(d), Some(o)) = (&data, &data_orig) {
            unchanged(d, o, &format!("{what} (data file)"), out);
        }
        check_writes(&g, &what, &[], out);
    }

    if case.plan.repair {
        let (op, tgt, _data) = memory_files(fx, case.target, mutated);
        let g = GuardedOpener::new(op.clone(), GROWTH);
        exercise::repair_session(g.clone(), path, None, out).await;
        let mut allowed = vec![path.as_path()];
        if let Some(d) = &data_path {
            allowed.push(d);
        }
        check_writes(&g, "repair session", &allowed, out);
        let after = guard::unaccounted(|| tgt.snapshot());
        let g = GuardedOpener::new(op, GROWTH);
        exercise::read_only_session(g.clone(), path, None, &case.plan, false, out).await;
        unchanged(&tgt, &after, "read-only session after repair", out);
    }
}

fn file_state(p: &Path) -> (Vec<u8>, Option<std::time::SystemTime>) {
    guard::unaccounted(|| {
        (
            std::fs::read(p).unwrap_or_default(),
            std::fs::metadata(p).and_then(|m| m.modified()).ok(),
        )
    })
}

async fn file_case(case: &Case, fx: &Loaded, mutated: &[u8], tmp: &Path, out: &mut Outcome) {
    let img = tmp.join(file_name(&fx.files[case.target].path));
    let data = fx.data_file().map(|i| {
        (
            tmp.join(file_name(&fx.files[i].path)),
            fx.files[i].bytes.clone(),
        )
    });
    let reset = || {
        guard::unaccounted(|| {
            std::fs::write(&img, mutated).unwrap();
            if let Some((p, b)) = &data {
                std::fs::write(p, &b[..]).unwrap();
            }
        })
    };
    let data_path = data.as_ref().map(|(p, _)| p.as_path());

    reset();
    let before = file_state(&img);
    let g = GuardedOpener::new(FileOpener, GROWTH);
    exercise::read_only_session(g.clone(), &img, data_path, &case.plan, true, out).await;
    if file_state(&img) != before {
        out.findings
            .push("read-only session (file) changed the file or its mtime".into());
    }
    check_writes(&g, "read-only session (file)", &[], out);

    reset();
    let g = GuardedOpener::new(FileOpener, GROWTH);
    let opened = exercise::read_write_session(g.clone(), &img, data_path, &case.plan, out).await;
    if opened {
        let mut allowed = vec![img.as_path()];
        allowed.extend(data_path);
        check_writes(&g, "read-write session (file)", &allowed, out);
        let after = file_state(&img);
        let g = GuardedOpener::new(FileOpener, GROWTH);
        exercise::read_only_session(g.clone(), &img, data_path, &case.plan, false, out).await;
        if file_state(&img) != after {
            out.findings
                .push("read-only session after the read-write one (file) changed the file".into());
        }
    } else {
        let what = format!(
            "a read-write open{} that failed ({}; file)",
            dirty(mutated),
            out.rw_refusal
        );
        if guard::unaccounted(|| std::fs::read(&img).unwrap_or_default() != mutated) {
            out.findings.push(format!("{what} changed the file"));
        }
        check_writes(&g, &what, &[], out);
    }
}

fn run_case(case: &Case, fx: &Loaded, tmp: &Path, timeout: Duration) -> Report {
    let start = Instant::now();
    exercise::CASE_START.with(|s| s.set(Some(start)));
    let file = &fx.files[case.target];
    let layout = file.layout.as_ref().unwrap();
    let mut mutated = file.bytes.to_vec();
    for m in &case.mutations {
        m.apply(&mut mutated, layout);
    }
    let mutated = mutated;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut outcome = Outcome::default();
    IN_CASE.with(|c| c.set(true));
    PANIC.with(|p| p.borrow_mut().take());
    guard::arm(case.seed);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            tokio::time::timeout(timeout, async {
                if case.file_mode {
                    file_case(case, fx, &mutated, tmp, &mut outcome).await;
                } else {
                    memory_case(case, fx, &mutated, &mut outcome).await;
                }
            })
            .await
        })
    }));
    let op = guard::op();
    let alloc = guard::disarm();
    IN_CASE.with(|c| c.set(false));
    drop(rt);
    let (panic, hang) = match res {
        Ok(Ok(())) => (None, false),
        Ok(Err(_elapsed)) => (None, true),
        Err(_) => (
            Some(
                PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "panic without a message".into()),
            ),
            false,
        ),
    };
    Report {
        outcome,
        panic,
        hang,
        op,
        alloc,
        elapsed: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------------------------
// Running many cases

#[derive(Default)]
struct Summary {
    cases: u64,
    failed: Vec<String>,
    known: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    opened: [u64; 2],
    refused: [u64; 2],
    reads: u64,
    read_bytes: u64,
    writes: u64,
    growth_refused: u64,
    slowest: (Duration, String),
    largest_alloc: usize,
    peak_growth: isize,
}

fn describe(case: &Case, fx: &Loaded) -> String {
    let mut muts: Vec<String> = case
        .mutations
        .iter()
        .take(8)
        .map(|m| m.to_string())
        .collect();
    if case.mutations.len() > 8 {
        muts.push(format!("... ({} more)", case.mutations.len() - 8));
    }
    format!(
        "{} fixture={} file={} mode={}\n    mutations: {}",
        if case.label == "random" {
            format!("seed={:#018x}", case.seed)
        } else {
            format!("crafted={}", case.label)
        },
        fx.name,
        file_name(&fx.files[case.target].path),
        if case.file_mode { "file" } else { "memory" },
        muts.join("; ")
    )
}

fn reproduce(case: &Case) -> String {
    if case.label == "random" {
        format!(
            "HOSTILE_SEED={:#018x} cargo test -p qcow2-tests --test hostile_images -- hostile_mutations --nocapture",
            case.seed
        )
    } else {
        format!(
            "HOSTILE_CRAFTED='{}' cargo test -p qcow2-tests --test hostile_images -- hostile_crafted --nocapture",
            case.label
        )
    }
}

fn record(summary: &mut Summary, case: &Case, fx: &Loaded, rep: Report, cfg: &Config) {
    summary.cases += 1;
    let o = &rep.outcome;
    for (k, v) in &o.errors {
        *summary.errors.entry(k.clone()).or_default() += v;
    }
    for i in 0..2 {
        summary.opened[i] += o.opened[i];
        summary.refused[i] += o.refused[i];
    }
    summary.reads += o.reads;
    summary.read_bytes += o.read_bytes;
    summary.writes += o.writes;
    summary.growth_refused += o.growth_refused;
    summary.largest_alloc = summary.largest_alloc.max(rep.alloc.largest);
    summary.peak_growth = summary.peak_growth.max(rep.alloc.peak_growth);
    if rep.elapsed > summary.slowest.0 {
        summary.slowest = (rep.elapsed, describe(case, fx));
    }
    let mut problems: Vec<String> = o.findings.clone();
    if let Some(p) = &rep.panic {
        problems.push(format!("PANIC: {p}"));
    }
    if rep.hang {
        problems.push(format!(
            "HANG: did not finish within {:?} (tokio timeout; in: {})",
            cfg.timeout, rep.op
        ));
    }
    if rep.alloc.largest > guard::SINGLE_ALLOC_LIMIT {
        problems.push(format!(
            "ALLOCATION: a single allocation of {} MiB (limit {} MiB; in: {}): sized by an unchecked on-disk number?",
            rep.alloc.largest >> 20,
            guard::SINGLE_ALLOC_LIMIT >> 20,
            rep.alloc.largest_op
        ));
    }
    if rep.alloc.peak_growth > guard::LIVE_GROWTH_LIMIT {
        problems.push(format!(
            "MEMORY: live heap grew by {} MiB during the case (limit {} MiB; peak in: {})",
            rep.alloc.peak_growth >> 20,
            guard::LIVE_GROWTH_LIMIT >> 20,
            rep.alloc.peak_op
        ));
    }
    if cfg.verbose() {
        eprintln!(
            "case {}\n  {:?}, errors: {:?}, opened {:?}, refused {:?}, reads {}, writes {}, alloc {:?}",
            describe(case, fx),
            rep.elapsed,
            o.errors,
            o.opened,
            o.refused,
            o.reads,
            o.writes,
            rep.alloc
        );
    }
    if problems.is_empty() {
        return;
    }
    let text = problems.join("\n    ");
    let known: Vec<&'static str> = KNOWN
        .iter()
        .filter(|(needle, _)| text.contains(needle))
        .map(|(_, label)| *label)
        .collect();
    let all_known = problems
        .iter()
        .all(|p| KNOWN.iter().any(|(needle, _)| p.contains(needle)));
    if !cfg.strict && all_known {
        for k in known {
            *summary.known.entry(k).or_default() += 1;
        }
        if cfg.verbose() {
            eprintln!("  known engine bug:\n    {text}");
        }
        return;
    }
    let msg = format!(
        "FAIL {}\n    {text}\n    reproduce: {}",
        describe(case, fx),
        reproduce(case)
    );
    eprintln!("hostile_images: {msg}");
    summary.failed.push(msg);
}

/// Runs `cases` on worker threads under a watchdog; returns the summary.
fn run_all(cases: &[Case], fixtures: &[Loaded], cfg: &Config) -> Summary {
    install_panic_hook(cfg.verbose());
    exercise::TRACE.store(cfg.verbose(), Ordering::Relaxed);
    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let summary = Mutex::new(Summary::default());
    let slots: Vec<Mutex<Option<(Instant, String)>>> =
        (0..cfg.threads).map(|_| Mutex::new(None)).collect();
    let hard_limit = (cfg.timeout * 4).max(Duration::from_secs(30));
    std::thread::scope(|s| {
        // The watchdog: a case stuck in a loop that never yields is beyond tokio's timeout.
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                for slot in &slots {
                    if let Some((t, what)) = &*slot.lock().unwrap() {
                        if t.elapsed() > hard_limit {
                            eprintln!(
                                "hostile_images: HANG (no progress for {hard_limit:?}, the case never yields):\n  {what}"
                            );
                            std::process::exit(70);
                        }
                    }
                }
            }
        });
        let workers: Vec<_> = (0..cfg.threads)
            .map(|w| {
                let (next, summary, slot) = (&next, &summary, &slots[w]);
                s.spawn(move || {
                    let tmp = tempfile::tempdir().unwrap();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(case) = cases.get(i) else { break };
                        let fx = &fixtures[case.fixture];
                        *slot.lock().unwrap() = Some((
                            Instant::now(),
                            format!("{}\n  reproduce: {}", describe(case, fx), reproduce(case)),
                        ));
                        let rep = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run_case(case, fx, tmp.path(), cfg.timeout)
                        }))
                        .unwrap_or_else(|_| Report {
                            outcome: Outcome {
                                findings: vec!["the test harness itself panicked".into()],
                                ..Outcome::default()
                            },
                            panic: None,
                            hang: false,
                            op: "-",
                            alloc: guard::AllocStats::default(),
                            elapsed: Duration::ZERO,
                        });
                        *slot.lock().unwrap() = None;
                        record(&mut summary.lock().unwrap(), case, fx, rep, cfg);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
    });
    for fx in fixtures {
        fx.assert_pristine();
    }
    summary.into_inner().unwrap()
}

fn print_summary(what: &str, s: &Summary, elapsed: Duration) {
    let mut errs: Vec<(&String, &u64)> = s.errors.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    let top: Vec<String> = errs
        .iter()
        .take(12)
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    eprintln!(
        "hostile_images {what}: {} cases in {:.1?} ({:.0}/s); opens ro {}/{} rw {}/{} (ok/refused); \
         {} reads ({} MiB), {} writes, {} file growths refused; largest allocation {} KiB, peak heap growth {} KiB; \
         slowest {:.1?}: {}\n  errors: {}\n  known engine bugs hit: {:?}\n  failures: {}",
        s.cases,
        elapsed,
        s.cases as f64 / elapsed.as_secs_f64(),
        s.opened[0],
        s.refused[0],
        s.opened[1],
        s.refused[1],
        s.reads,
        s.read_bytes >> 20,
        s.writes,
        s.growth_refused,
        s.largest_alloc >> 10,
        s.peak_growth >> 10,
        s.slowest.0,
        s.slowest.1,
        top.join(", "),
        s.known,
        s.failed.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The tests

/// Seeded random mutations of the fixtures' metadata.
#[test]
fn hostile_mutations() {
    let cfg = Config::from_env();
    let start = Instant::now();
    let names: Vec<&str> = FIXTURES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| {
            cfg.fixtures
                .as_ref()
                .is_none_or(|l| l.iter().any(|x| x == n))
        })
        .collect();
    let single;
    let (fixtures, cases): (&[Loaded], Vec<Case>) = match cfg.seed {
        Some(seed) => {
            let name = fixture_of(seed, &names);
            single = load_fixtures(&cfg, Some(name));
            let case = draw_case(seed, &single, &[name]);
            (&single, vec![case])
        }
        None => {
            let fixtures = all_fixtures(&cfg);
            let cases = (0..cfg.cases)
                .map(|i| draw_case(case_seed(cfg.base, i), fixtures, &names))
                .collect();
            (fixtures, cases)
        }
    };
    eprintln!(
        "hostile_images: {} fixtures loaded in {:.1?}; base seed {:#x}",
        fixtures.len(),
        start.elapsed(),
        cfg.base
    );
    let t = Instant::now();
    let s = run_all(&cases, fixtures, &cfg);
    print_summary("random mutations", &s, t.elapsed());
    assert!(
        s.failed.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        s.failed.len(),
        s.cases,
        s.failed.join("\n")
    );
}

/// The hand-crafted cases, on every qcow2 file of every fixture.
#[test]
fn hostile_crafted() {
    let cfg = Config::from_env();
    let start = Instant::now();
    let fixtures = all_fixtures(&cfg);
    let cases = crafted_cases(fixtures, cfg.crafted.as_deref(), cfg.crafted_all);
    assert!(!cases.is_empty(), "no crafted case matches");
    eprintln!(
        "hostile_images: {} fixtures loaded in {:.1?}; {} crafted cases",
        fixtures.len(),
        start.elapsed(),
        cases.len()
    );
    let t = Instant::now();
    let s = run_all(&cases, fixtures, &cfg);
    print_summary("crafted", &s, t.elapsed());
    assert!(
        s.failed.is_empty(),
        "{} of {} crafted cases failed:\n{}",
        s.failed.len(),
        s.cases,
        s.failed.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Engine bugs found by the cases above, one test each (ignored until fixed; run them with
// `cargo test -p qcow2-tests --test hostile_images -- --ignored`).

/// Runs one crafted case in strict mode (known bugs fail too).
fn crafted_strict(fixture_name: &'static str, label: &str) {
    let cfg = Config {
        strict: true,
        crafted: Some(label.into()),
        fixtures: Some(vec![fixture_name.into()]),
        ..Config::from_env()
    };
    let fixtures = load_fixtures(&cfg, Some(fixture_name));
    let cases: Vec<Case> = crafted_cases(&fixtures, Some(label), true)
        .into_iter()
        .filter(|c| c.label == label)
        .collect();
    assert_eq!(cases.len(), 1, "no crafted case {label}");
    let s = run_all(&cases, &fixtures, &cfg);
    assert!(s.failed.is_empty(), "{}", s.failed.join("\n"));
}

/// A refcount of 0 for cluster 0 (the header) must not let the allocator hand cluster 0 out
/// for a new L2 table (the L1 entry would read as "unallocated", the acknowledged write as
/// zeros, and the L2 write-back would overwrite the header). A read-write open checks that
/// every referenced cluster is counted and refuses the image as corrupt, writing nothing;
/// were it to open, the allocator skips live metadata and reports the lie as corruption.
#[test]
fn allocation_over_the_header() {
    use qcow2_engine::{Image, ImageOptions};
    let fx = fixture("cluster-512").build();
    let mut bytes = std::fs::read(&fx.image).unwrap();
    let layout = Layout::parse(&bytes).unwrap();
    assert!(layout.set_refcount(&mut bytes, qcow2_format::HostCluster(0), 0));
    let (op, file, rt) = in_memory(&fx.image, bytes);
    let before = file.snapshot();
    rt.block_on(async {
        let img = match Image::open(op.clone(), &fx.image, ImageOptions::new()).await {
            Ok(img) => img,
            Err(e) => {
                assert!(e.is_corruption(), "refused, but not as corrupt: {e}");
                assert!(
                    file.snapshot() == before,
                    "a refused open wrote to the image"
                );
                return;
            }
        };
        // Guest 0xc5f059 lies in an L1 range without an L2 table: the write allocates one.
        let data = vec![0xab; 0x2fc];
        let written = img.write(0xc5f059, &data).await;
        if written.is_ok() {
            let back = img.read(0xc5f059, data.len() as u64).await.unwrap();
            assert!(
                back[..] == data[..],
                "an acknowledged write reads back differently"
            );
        }
        let _ = img.close().await;
        let after = file.snapshot();
        assert_eq!(&after[..4], b"QFI\xfb", "the header was overwritten");
        let img = Image::open(op, &fx.image, ImageOptions::new().read_only(true))
            .await
            .expect("the image opens after the session");
        if written.is_ok() {
            let back = img.read(0xc5f059, data.len() as u64).await.unwrap();
            assert!(back[..] == data[..], "the write was lost");
        }
    });
}

/// The refcount table's first entry pointing at the L1 table, whose (mostly zero) entries
/// then read as free refcounts: allocations land on live metadata unless the overlap guard
/// stops them (it did not before commit 46f639b; this case found it).
#[test]
fn allocation_when_the_reftable_points_at_the_l1_table() {
    crafted_strict("cluster-512", "cluster-512/image.qcow2/reftable-into-l1");
}

/// `Image::check` and `Image::repair` on an image whose l1_size stretches the L1 table to
/// the end of the file (valid for the header checks: the table is inside the file and under
/// 32 MiB), so that every garbage word with an offset names an L2 table, and every garbage L2
/// entry is a corruption with its diagnostic line. Both must finish promptly with bounded
/// memory: at most `MAX_MESSAGES` lines kept (the rest counted), no L2 table past the end of
/// the file walked, and the walk given up, as a failed check with a typed
/// `CheckReport::gave_up`, once an L1 table names more L2 tables inside the file than the
/// file has clusters or the walk found `MAX_WALK_CORRUPTIONS` corruptions (here the latter
/// comes first). (Unbounded, the check had not finished after 120 s here, with 285 MiB of
/// heap; on the 2 MiB cluster fixture with l1_size at its maximum the messages alone took
/// 1.8 GiB.)
#[test]
fn check_on_a_garbage_l1_table() {
    crafted_strict(
        "compressed-zlib",
        "compressed-zlib/image.qcow2/l1-size-to-eof",
    );
    let fx = fixture("compressed-zlib").build();
    let mut bytes = std::fs::read(&fx.image).unwrap();
    let layout = Layout::parse(&bytes).unwrap();
    let l1 = layout.header.l1_table_offset;
    let l1_size = (bytes.len() as u64 - l1) / 8;
    bytes[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
    let (op, _, rt) = in_memory(&fx.image, bytes);
    rt.block_on(async {
        use qcow2_engine::{Image, ImageOptions, RepairMode, MAX_MESSAGES};
        let ro = ImageOptions::new().read_only(true);
        let img = Image::open(op.clone(), &fx.image, ro).await.unwrap();
        let report = img.check().await.unwrap();
        drop(img);
        let img = Image::open_for_repair(op, &fx.image, ImageOptions::new())
            .await
            .unwrap();
        let repaired = img.repair(RepairMode::All).await.unwrap();
        for (what, r) in [("check", report), ("repair", repaired)] {
            eprintln!(
                "{what}: gave up: {:?}, {} corruptions, {} lines + {} suppressed",
                r.gave_up,
                r.corruptions,
                r.messages.len(),
                r.messages_suppressed
            );
            // (The repair may stop earlier: fixing an "L2 entry" inside the L1 table trips the
            // overlap guard.)
            assert!(r.failure.is_some() && r.exit_code() == 1, "{what}: {r:?}");
            assert!(
                r.gave_up.is_some() || what == "repair",
                "{what}: no limit hit"
            );
            assert!(r.messages.len() <= MAX_MESSAGES, "{what}");
        }
    });
}

/// With an external data file, every allocated L2 entry must map its guest cluster at the
/// same offset of the data file (the identity mapping QEMU enforces): any other host offset
/// is corruption (a typed error, and the corrupt bit on a read-write image), never an offset
/// to read or write. Here every entry says 2^54, which a real file system refuses (EFBIG)
/// and a smaller absurd offset would silently grow the data file.
#[test]
fn data_file_offsets_must_equal_guest_offsets() {
    crafted_strict(
        "data-file-raw",
        "data-file-raw/image.qcow2/every-l2-entry-past-eof",
    );
}

/// `bytes` as the in-memory file at `path`: its opener, the file (to look at afterwards) and a
/// current-thread runtime to drive the engine with.
fn in_memory(
    path: &Path,
    bytes: Vec<u8>,
) -> (MemoryOpener, MemoryBackend, tokio::runtime::Runtime) {
    let op = MemoryOpener::new();
    let file = MemoryBackend::from_vec(bytes);
    op.insert(path, file.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (op, file, rt)
}

/// Opens the image bytes read-only in memory and runs `f` on it.
fn with_read_only_image(
    path: &Path,
    bytes: Vec<u8>,
    f: impl AsyncFnOnce(&qcow2_engine::Image<MemoryOpener>),
) {
    let (op, _, rt) = in_memory(path, bytes);
    rt.block_on(async {
        let img =
            qcow2_engine::Image::open(op, path, qcow2_engine::ImageOptions::new().read_only(true))
                .await
                .expect("the image opens read-only");
        f(&img).await;
    });
}

/// A snapshot table that starts less than 4 KiB before the end of the file (here: the file
/// cut 100 bytes into it) makes `Image::snapshots` panic: `(n * 64).clamp(4096, limit)` with
/// `limit` = the bytes left in the file, below 4096 ("min > max", image.rs, in `snapshots`).
/// `qimg info` calls it, so a truncated image crashes `qimg info`. Clamp the guess to the
/// limit (`.min(limit).max(1)`), not between 4096 and the limit.
#[test]
fn snapshots_near_the_end_of_the_file() {
    let fx = fixture("snapshot").build();
    let mut bytes = std::fs::read(&fx.image).unwrap();
    let layout = Layout::parse(&bytes).unwrap();
    bytes.truncate(layout.header.snapshots_offset as usize + 100);
    with_read_only_image(&fx.image, bytes, async |img| {
        let r = img.snapshots().await;
        assert!(r.is_err(), "a cut snapshot table must be an error: {r:?}");
    });
}

/// A refcount table entry of 2^64 - cluster size (here all entries 0xff..ff, which the
/// checker's alignment test accepts for 512-byte clusters) makes `Image::check` read that
/// "refcount block" with `read_bytes(offset, cluster)`, whose `offset + len` overflows: a
/// panic in debug builds (`qimg check` exits 101), unchecked wrapping arithmetic on an
/// offset from disk in release. `read_bytes` should use checked arithmetic and fail with a
/// typed error, and the checker should treat a refcount block past the end of the file as
/// missing (its "outside image" check runs after the first refcount lookups).
#[test]
fn check_refcount_block_offset_overflow() {
    let fx = fixture("cluster-512").build();
    let mut bytes = std::fs::read(&fx.image).unwrap();
    let layout = Layout::parse(&bytes).unwrap();
    let rt = layout.header.refcount_table_offset as usize;
    let len = layout.header.refcount_table_clusters as usize * 512;
    bytes[rt..rt + len].fill(0xff);
    with_read_only_image(&fx.image, bytes, async |img| {
        let _ = img.check().await;
    });
}

/// A read-write open of an image with the dirty bit repairs its refcounts first (as QEMU's
/// qcow2_do_open does), but only after a read-only check found nothing a repair cannot fix.
/// Here an L1 entry points at an L2 table past the end of the file: the open fails and, as
/// DESIGN.md demands of an image that fails validation, the file is not written. (QEMU
/// repairs what it can, and fails only on internal errors of its check.)
#[test]
fn failed_open_of_a_dirty_image_writes_nothing() {
    crafted_strict(
        "lazy-refcounts-dirty",
        "lazy-refcounts-dirty/image.qcow2/l2-past-eof",
    );
}

/// An enabled persistent bitmap is written back at close, at the offsets its directory entry
/// and bitmap table give: a read-write open must refuse (a typed error, the file untouched,
/// as QEMU refuses a bitmap it cannot load) tables and data clusters outside the file or
/// overlapping other metadata. Here a bitmap table entry points at the L1 table (close would
/// write bitmap bits over it and lose the disk's data), then the table itself lies at 2^50
/// (close would write there: EFBIG on a real file system; the open_read_write fuzz target
/// found 0x3333_3333_3333_0000, which the memory backend tried to allocate). Read-only opens,
/// which leave the bitmaps alone, still work. With the dirty bit set too, the check before
/// the repair-on-open already refuses the image (a repair would only count the L1 cluster
/// twice), so that the failed open writes nothing either. Last, a bitmap data cluster that is
/// also a guest data cluster (close would write bitmap bits over the guest's data; the
/// refcounts call it used, so only a walk of the L2 tables sees it).
#[test]
fn bitmaps_at_bad_offsets_refuse_a_read_write_open() {
    let fx = fixture("bitmap").build();
    let pristine = std::fs::read(&fx.image).unwrap();
    let layout = Layout::parse(&pristine).unwrap();
    let cs = layout.cs();
    let table = layout.of(hostile::layout::Kind::BitmapTable)[0];
    let dir = layout.of(hostile::layout::Kind::BitmapDirectory)[0];
    let l1 = layout.header.l1_table_offset & !(cs - 1);
    // The host cluster of the first allocated guest cluster.
    let l2 = layout.of(hostile::layout::Kind::L2)[0];
    let data = (l2.start..l2.start + l2.len)
        .step_by(8)
        .map(|at| u64::from_be_bytes(pristine[at as usize..at as usize + 8].try_into().unwrap()))
        .map(|e| e & 0x00ff_ffff_ffff_fe00)
        .find(|&h| h != 0)
        .expect("the fixture has data");
    let damage = [
        // The first data cluster of the first bitmap is the L1 table's.
        Mutation::Put {
            at: table.start,
            width: 8,
            value: l1,
        },
        // The first bitmap's table lies far past the end of the file.
        Mutation::Put {
            at: dir.start,
            width: 8,
            value: 1 << 50,
        },
        // The first data cluster of the first bitmap holds guest data.
        Mutation::Put {
            at: table.start,
            width: 8,
            value: data,
        },
    ];
    let variants = damage
        .iter()
        .map(|m| (m.clone(), false))
        .chain([(damage[0].clone(), true)]);
    for (m, dirty) in variants {
        let mut bytes = pristine.clone();
        m.apply(&mut bytes, &layout);
        if dirty {
            bytes[79] |= qcow2_format::features::INCOMPAT_DIRTY as u8;
        }
        let why = refused_read_write(&fx.image, bytes, &format!("{m:?}, dirty {dirty}"));
        eprintln!("{m:?}, {dirty}: refused: {why}");
    }
}

/// Opens `bytes` read-only (which must work and read the whole disk), then read-write, which
/// must fail with [`qcow2_engine::Error::Corrupt`] and leave the bytes as they were; returns
/// the error's description. `case` names the case in failures.
fn refused_read_write(path: &Path, bytes: Vec<u8>, case: &str) -> String {
    use qcow2_engine::{Error, Image, ImageOptions};
    let (op, file, rt) = in_memory(path, bytes.clone());
    rt.block_on(async {
        let ro = ImageOptions::new().read_only(true);
        let img = Image::open(op.clone(), path, ro).await.unwrap();
        img.read(0, img.size()).await.unwrap();
        drop(img);
        let why = match Image::open(op, path, ImageOptions::new()).await {
            Err(Error::Corrupt { what, .. }) => what,
            Err(e) => panic!("{case}: not a corruption error: {e}"),
            Ok(_) => panic!("{case}: the read-write open took the image"),
        };
        assert!(file.snapshot() == bytes, "{case}: the failed open wrote");
        why
    })
}

/// A cluster only a snapshot refers to (one of its data clusters, or its own L2 table) with
/// refcount 0 looks free to the allocator, which would hand it out again: reverting to the
/// snapshot would bring back another guest offset's data. A read-write open refuses it (a
/// typed error, the file untouched); a read-only open still works. The clusters are found
/// independently of the engine: the snapshot's tables minus the active ones, as parsed here.
#[test]
fn snapshot_clusters_with_refcount_zero_refuse_a_read_write_open() {
    use std::collections::BTreeSet;
    let fx = fixture("snapshot").build();
    let pristine = std::fs::read(&fx.image).unwrap();
    let layout = Layout::parse(&pristine).unwrap();
    let cs = layout.cs();
    let offset = |at: u64| {
        let e = u64::from_be_bytes(pristine[at as usize..at as usize + 8].try_into().unwrap());
        e & 0x00ff_ffff_ffff_fe00
    };
    let l2_tables = |l1: u64, n: u64| -> BTreeSet<u64> {
        (0..n)
            .map(|i| offset(l1 + 8 * i))
            .filter(|&o| o != 0)
            .collect()
    };
    let data = |tables: &BTreeSet<u64>| -> BTreeSet<u64> {
        tables
            .iter()
            .flat_map(|&t| (0..cs / 8).map(move |i| offset(t + 8 * i)))
            .filter(|&h| h != 0)
            .collect()
    };
    let active = l2_tables(
        layout.header.l1_table_offset,
        u64::from(layout.header.l1_size),
    );
    let snap_l1 = layout.of(hostile::layout::Kind::SnapshotL1)[0];
    let snap = l2_tables(snap_l1.start, snap_l1.len / 8);
    let snap_table = *snap
        .difference(&active)
        .next()
        .expect("the snapshot's own L2 table");
    let snap_data = *data(&snap)
        .difference(&data(&active))
        .next()
        .expect("a data cluster only the snapshot uses");
    for (what, host) in [("data cluster", snap_data), ("L2 table", snap_table)] {
        let mut bytes = pristine.clone();
        let c = qcow2_format::HostCluster(host / cs);
        assert!(layout.set_refcount(&mut bytes, c, 0));
        let why = refused_read_write(&fx.image, bytes, what);
        assert!(why.contains("snapshot"), "{what}: {why}");
    }
}
