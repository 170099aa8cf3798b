//! Crash images: what a file could hold after a crash, built from the injector's log of
//! finished requests (see the parent module's documentation for the model).

use super::{FaultController, LogEntry, OpKind};
use std::fmt;
use std::ops::Range;

/// The unit a crash tears at. A disk writes a 512-byte sector atomically (QEMU counts on it
/// for its one-sector header and L1 updates), so a torn write keeps old bytes for whole
/// sectors of its range, never for part of one.
pub const CRASH_SECTOR: u64 = 512;

/// Where and how a crash happens: see [`CrashImage::from_log`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrashSpec {
    /// The file whose crash image is built (see [`RequestInfo::file`](crate::RequestInfo::file)).
    pub file: u32,
    /// The crash comes once this many requests have completed (any file): entries with a
    /// smaller `seq` finished before it, requests issued by then (`issued_after <= at`) may
    /// or may not have reached the file, later ones never did. `None`: after everything in
    /// the log (for [`FaultController::crash`], after every request completed so far;
    /// requests still in flight are then lost).
    pub at: Option<u64>,
    /// Chooses which of the volatile requests survive, and the torn sector.
    pub seed: u64,
    /// Tears one sector of one surviving write.
    pub tear: bool,
    /// The chance (percent) of each volatile request to survive; `None` lets the seed pick one
    /// of 0, 25, 50, 75 and 100 %, so that some crash images keep nothing volatile and some
    /// keep everything.
    pub survival_percent: Option<u8>,
    /// Linux's fsync semantics after an error: a failed flush may already have lost the
    /// writes it was to make durable (the kernel drops or cleans the dirty pages and reports
    /// the error once), so no later flush makes them durable: they stay volatile unless
    /// written again. Without this, a failed flush changes nothing (it failed before reaching
    /// the file, as an injected failure does).
    pub failed_flush_loses: bool,
}

impl CrashSpec {
    /// A crash of file 0 after everything in the log, the volatile subset chosen by `seed`,
    /// nothing torn.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// The crash image of file `file`.
    pub fn file(mut self, file: u32) -> Self {
        self.file = file;
        self
    }

    /// Crashes once `at` requests have completed.
    pub fn at(mut self, at: u64) -> Self {
        self.at = Some(at);
        self
    }

    /// Tears one sector of one surviving write (if any spans two sectors or more).
    pub fn tear(mut self, yes: bool) -> Self {
        self.tear = yes;
        self
    }

    /// Each volatile request survives with this chance (0..=100).
    pub fn survival_percent(mut self, percent: u8) -> Self {
        self.survival_percent = Some(percent.min(100));
        self
    }

    /// Failed flushes lose what they covered (see [`CrashSpec::failed_flush_loses`]).
    pub fn failed_flush_loses(mut self, yes: bool) -> Self {
        self.failed_flush_loses = yes;
        self
    }
}

/// The torn write of a [`CrashImage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornSector {
    /// The request ([`LogEntry::seq`]).
    pub seq: u64,
    /// The bytes of its range that kept their old contents: its part of one sector.
    pub range: Range<u64>,
}

/// A file as a crash could leave it, and how it was made.
///
/// The model: everything durable is there, in completion order. A request is *durable* when
/// it completed before a successful flush of its file was issued: `seq < flush.issued_after`
/// (see [`LogEntry::issued_after`]), for a flush that completed before the crash; so the
/// durable requests are the log entries below `durable`, the largest such `issued_after`. A
/// flush that failed, or that was still in flight, makes nothing durable. Of the *volatile*
/// requests that change the file (write, write-zeroes, punch-hole, set-len) completed after
/// that point, or in flight at the crash, any subset survives (chosen by the seed), applied
/// with the durable ones in completion order; with [`CrashSpec::tear`], one sector of one
/// surviving ranged request keeps the bytes it had before that request. With
/// [`CrashSpec::failed_flush_loses`], what a failed flush covered stays volatile for good.
///
/// Requests that failed (injected or not) are taken to have changed nothing: true of injected
/// failures, which never reach the inner backend, and of [`MemoryBackend`](crate::MemoryBackend).
/// The image is built in memory: keep the files small.
#[derive(Clone, PartialEq, Eq)]
pub struct CrashImage {
    /// The file's contents.
    pub bytes: Vec<u8>,
    /// The crash point: how many requests had completed.
    pub at: u64,
    /// Entries with a smaller `seq` were durable.
    pub durable: u64,
    /// The volatile requests that survived (by `seq`, ascending).
    pub survived: Vec<u64>,
    /// The volatile requests that were lost.
    pub lost: Vec<u64>,
    /// The torn write, if one was torn.
    pub torn: Option<TornSector>,
}

impl fmt::Debug for CrashImage {
    /// The bytes' length, not the bytes; long lists of requests as their counts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Seqs<'a>(&'a [u64]);
        impl fmt::Debug for Seqs<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.0.len() <= 16 {
                    f.debug_list().entries(self.0).finish()
                } else {
                    write!(f, "<{} requests>", self.0.len())
                }
            }
        }
        f.debug_struct("CrashImage")
            .field("len", &self.bytes.len())
            .field("at", &self.at)
            .field("durable", &self.durable)
            .field("survived", &Seqs(&self.survived))
            .field("lost", &Seqs(&self.lost))
            .field("torn", &self.torn)
            .finish()
    }
}

/// The crash images' randomness: a SplitMix64 sequence (deterministic per seed).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(crate::SPLITMIX64_GAMMA);
        crate::splitmix64(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

fn changes_file(op: OpKind) -> bool {
    matches!(
        op,
        OpKind::Write | OpKind::WriteZeroes | OpKind::PunchHole | OpKind::SetLen
    )
}

/// Whether a ranged request covers two sectors or more (a tear is then a new state; tearing
/// a one-sector request is the same as losing it).
fn tearable(e: &LogEntry) -> bool {
    let i = &e.info;
    matches!(
        i.op,
        OpKind::Write | OpKind::WriteZeroes | OpKind::PunchHole
    ) && i.len > 0
        && (i.offset + i.len - 1) / CRASH_SECTOR > i.offset / CRASH_SECTOR
}

fn index(v: u64) -> usize {
    usize::try_from(v).expect("crash images are built in memory: offsets must fit in usize")
}

/// Applies one logged request to `file`, leaving the bytes of `skip` as they were.
fn apply_entry(file: &mut Vec<u8>, e: &LogEntry, skip: Option<&Range<u64>>) {
    let saved: Option<(Range<usize>, Vec<u8>)> = skip.map(|r| {
        let r = index(r.start)..index(r.end);
        let old = r
            .clone()
            .map(|i| file.get(i).copied().unwrap_or(0))
            .collect();
        (r, old)
    });
    let (off, len) = (index(e.info.offset), index(e.info.len));
    match e.info.op {
        OpKind::Write => {
            let data = e.data.as_ref().unwrap_or_else(|| {
                panic!(
                    "crash image: write seq {} has no data in the log (logging was off)",
                    e.seq
                )
            });
            assert_eq!(
                data.len(),
                len,
                "crash image: write seq {}: data length",
                e.seq
            );
            if file.len() < off + len {
                file.resize(off + len, 0);
            }
            file[off..off + len].copy_from_slice(data);
        }
        OpKind::WriteZeroes => {
            if file.len() < off + len {
                file.resize(off + len, 0);
            }
            file[off..off + len].fill(0);
        }
        OpKind::PunchHole => {
            let l = file.len();
            file[off.min(l)..(off + len).min(l)].fill(0);
        }
        OpKind::SetLen => file.resize(off, 0),
        OpKind::Read | OpKind::Flush => {}
    }
    if let Some((r, old)) = saved {
        for (i, b) in r.zip(old) {
            if let Some(x) = file.get_mut(i) {
                *x = b;
            }
        }
    }
}

impl CrashImage {
    /// Builds the crash image of `spec.file` from a log of its requests and the file's bytes
    /// when the log began (the log must be complete since then: no [`clear_log`] without a new
    /// base, no logging turned off). See [`CrashImage`] for the model.
    ///
    /// # Panics
    ///
    /// If a successful write in the log has no data (logged while logging was off), or an
    /// offset does not fit in memory.
    ///
    /// [`clear_log`]: FaultController::clear_log
    pub fn from_log(log: &[LogEntry], base: &[u8], spec: &CrashSpec) -> CrashImage {
        let mut entries: Vec<&LogEntry> = log.iter().filter(|e| e.info.file == spec.file).collect();
        entries.sort_by_key(|e| e.seq);
        let at = spec
            .at
            .unwrap_or_else(|| log.iter().map(|e| e.seq + 1).max().unwrap_or(0));
        // The durable point as of log position `before`.
        let durable_before = |before: u64| {
            entries
                .iter()
                .filter(|e| e.info.op == OpKind::Flush && e.is_ok() && e.seq < before)
                .map(|e| e.issued_after)
                .max()
                .unwrap_or(0)
        };
        let durable = durable_before(at);
        // With Linux's fsync semantics, the writes a failed flush covered never become
        // durable: as `seq` ranges.
        let forgotten: Vec<Range<u64>> = if spec.failed_flush_loses {
            entries
                .iter()
                .filter(|e| e.info.op == OpKind::Flush && !e.is_ok() && e.seq < at)
                .map(|e| durable_before(e.seq)..e.issued_after)
                .collect()
        } else {
            Vec::new()
        };
        let is_durable =
            |e: &LogEntry| e.seq < durable && !forgotten.iter().any(|r| r.contains(&e.seq));
        let useful = |e: &&&LogEntry| changes_file(e.info.op) && e.is_ok() && !e.injected;
        let mut bytes = base.to_vec();
        let volatile: Vec<&LogEntry> = entries
            .iter()
            .filter(useful)
            .filter(|e| !is_durable(e) && (e.seq < at || e.issued_after <= at))
            .copied()
            .collect();

        let mut rng = SplitMix(spec.seed ^ 0x6372_6173_6821_u64);
        let percent = match spec.survival_percent {
            Some(p) => u64::from(p.min(100)),
            None => [0, 25, 50, 75, 100][rng.below(5) as usize],
        };
        let mut keep: Vec<bool> = volatile.iter().map(|_| rng.below(100) < percent).collect();
        let mut torn = None;
        if spec.tear {
            let survivors: Vec<usize> = (0..volatile.len())
                .filter(|&i| keep[i] && tearable(volatile[i]))
                .collect();
            let pool = if survivors.is_empty() {
                (0..volatile.len())
                    .filter(|&i| tearable(volatile[i]))
                    .collect()
            } else {
                survivors
            };
            if !pool.is_empty() {
                let i = pool[rng.below(pool.len() as u64) as usize];
                keep[i] = true;
                let info = volatile[i].info;
                let first = info.offset / CRASH_SECTOR;
                let last = (info.offset + info.len - 1) / CRASH_SECTOR;
                let s = first + rng.below(last - first + 1);
                let start = (s * CRASH_SECTOR).max(info.offset);
                let end = ((s + 1) * CRASH_SECTOR).min(info.offset + info.len);
                torn = Some(TornSector {
                    seq: volatile[i].seq,
                    range: start..end,
                });
            }
        }
        // Everything that is there, in completion order (durable requests all come first,
        // unless a failed flush forgot some).
        let (mut survived, mut lost) = (Vec::new(), Vec::new());
        let mut v = volatile.iter().zip(&keep).peekable();
        for e in entries.iter().filter(useful) {
            if is_durable(e) {
                apply_entry(&mut bytes, e, None);
                continue;
            }
            let Some((_, &k)) = v.next_if(|(x, _)| x.seq == e.seq) else {
                continue; // issued after the crash
            };
            if k {
                let skip = torn.as_ref().filter(|t| t.seq == e.seq).map(|t| &t.range);
                apply_entry(&mut bytes, e, skip);
                survived.push(e.seq);
            } else {
                lost.push(e.seq);
            }
        }
        CrashImage {
            bytes,
            at,
            durable,
            survived,
            lost,
            torn,
        }
    }
}

impl FaultController {
    /// The file as a crash now could leave it: `base` is its contents when the log began,
    /// `seed` picks which writes since the last completed flush survive, `tear` tears one
    /// sector of one of them. File 0 (the injector made by [`FaultInjector::new`](crate::FaultInjector::new), or the
    /// first file a [`FaultOpener`](crate::FaultOpener) opened). See [`CrashImage`] for the model and
    /// [`crash`](Self::crash) for more control.
    ///
    /// # Panics
    ///
    /// As [`crash`](Self::crash).
    pub fn crash_image(&self, base: &[u8], seed: u64, tear: bool) -> Vec<u8> {
        self.crash(base, &CrashSpec::new(seed).tear(tear)).bytes
    }

    /// The crash image `spec` describes, from this controller's log: see
    /// [`CrashImage::from_log`]. Without [`CrashSpec::at`] the crash comes now: requests
    /// still in flight are lost.
    ///
    /// # Panics
    ///
    /// If requests finished while logging was off since the log was last emptied (the log
    /// has holes), or as [`CrashImage::from_log`].
    pub fn crash(&self, base: &[u8], spec: &CrashSpec) -> CrashImage {
        let (log, completed) = {
            let st = self.shared.lock();
            assert_eq!(
                st.unlogged, 0,
                "crash image: {} requests finished while logging was off",
                st.unlogged
            );
            (st.log.clone(), st.completed)
        };
        let spec = CrashSpec {
            at: Some(spec.at.unwrap_or(completed)),
            ..spec.clone()
        };
        CrashImage::from_log(&log, base, &spec)
    }
}

#[cfg(test)]
mod crash_tests {
    use super::*;
    use crate::{Backend, FaultInjector, IoBuf, Keep, RequestInfo};
    use bytes::Bytes;
    use std::collections::HashSet;

    /// A hand-made log entry (successful).
    fn entry(seq: u64, issued_after: u64, op: OpKind, offset: u64, data: &[u8]) -> LogEntry {
        let len = match op {
            OpKind::Write => data.len() as u64,
            OpKind::Flush | OpKind::SetLen => 0,
            _ => data[0] as u64,
        };
        LogEntry {
            seq,
            info: RequestInfo {
                id: seq,
                file: 0,
                op,
                offset,
                len,
            },
            issued_after,
            data: (op == OpKind::Write).then(|| Bytes::copy_from_slice(data)),
            error: None,
            injected: false,
        }
    }

    fn write(seq: u64, issued_after: u64, offset: u64, data: &[u8]) -> LogEntry {
        entry(seq, issued_after, OpKind::Write, offset, data)
    }

    fn flush(seq: u64, issued_after: u64) -> LogEntry {
        entry(seq, issued_after, OpKind::Flush, 0, &[])
    }

    /// Every distinct image over `n` seeds.
    fn images(log: &[LogEntry], base: &[u8], spec: CrashSpec, n: u64) -> HashSet<Vec<u8>> {
        (0..n)
            .map(|s| {
                let spec = CrashSpec {
                    seed: s,
                    ..spec.clone()
                };
                CrashImage::from_log(log, base, &spec).bytes
            })
            .collect()
    }

    #[test]
    fn durable_prefix_always_there_and_any_subset_of_the_rest() {
        let log = [
            write(0, 0, 0, b"aa"),
            flush(1, 1),
            write(2, 2, 2, b"bb"),
            write(3, 3, 4, b"cc"),
        ];
        let got = images(&log, b"______", CrashSpec::default(), 400);
        let want: HashSet<Vec<u8>> = [&b"aa____"[..], b"aabb__", b"aa__cc", b"aabbcc"]
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(
            got, want,
            "every subset of the volatile writes, nothing else"
        );
        let c = CrashImage::from_log(&log, b"______", &CrashSpec::new(7));
        assert_eq!((c.at, c.durable), (4, 1));
        assert_eq!(c.survived.len() + c.lost.len(), 2);
    }

    #[test]
    fn a_flush_covers_only_writes_completed_before_it_was_issued() {
        // The write completed (seq 1) after the flush was issued (issued_after 0) and before
        // the flush completed: the flush does not make it durable.
        let log = [write(1, 0, 0, b"new"), flush(2, 0)];
        let log = [
            entry(0, 0, OpKind::Read, 0, &[3]),
            log[0].clone(),
            log[1].clone(),
        ];
        let got = images(&log, b"old", CrashSpec::default(), 100);
        assert_eq!(got.len(), 2, "the write may be lost: {got:?}");
        // The same write completed before the flush was issued: always there.
        let log = [write(0, 0, 0, b"new"), flush(1, 1)];
        assert_eq!(
            images(&log, b"old", CrashSpec::default(), 100),
            HashSet::from([b"new".to_vec()])
        );
    }

    #[test]
    fn failed_and_injected_requests() {
        let mut failed_flush = flush(1, 1);
        failed_flush.error = Some(libc::EIO);
        let mut injected_write = write(2, 1, 0, b"X");
        injected_write.injected = true;
        injected_write.error = Some(libc::ENOSPC);
        injected_write.data = None;
        let log = [write(0, 0, 0, b"a"), failed_flush, injected_write];
        // A failed flush makes nothing durable; an injected failure never reaches the file.
        assert_eq!(
            images(&log, b"-", CrashSpec::default(), 100),
            HashSet::from([b"a".to_vec(), b"-".to_vec()])
        );
    }

    #[test]
    fn a_failed_flush_can_lose_what_it_covered_for_good() {
        let mut failed = flush(1, 1);
        failed.error = Some(libc::EIO);
        let log = [
            write(0, 0, 0, b"a"),
            failed,
            write(2, 2, 1, b"b"),
            flush(3, 3),
            write(4, 4, 0, b"c"),
            flush(5, 5),
        ];
        // By default the later flush makes both writes durable.
        assert_eq!(
            images(&log, b"--", CrashSpec::default(), 50),
            HashSet::from([b"cb".to_vec()])
        );
        let spec = CrashSpec::default().failed_flush_loses(true).at(4);
        assert_eq!(
            images(&log, b"--", spec, 100),
            HashSet::from([b"-b".to_vec(), b"ab".to_vec(), b"cb".to_vec()]),
            "the write the failed flush covered stays volatile (c may be in flight)"
        );
        // Written again after the failure, it is durable again; order is kept.
        let spec = CrashSpec::default().failed_flush_loses(true);
        assert_eq!(
            images(&log, b"--", spec, 100),
            HashSet::from([b"cb".to_vec()])
        );
    }

    #[test]
    fn crash_point_in_the_middle_of_the_log() {
        let log = [
            write(0, 0, 0, b"a"),
            write(1, 0, 1, b"b"), // in flight at crash point 1
            flush(2, 2),          // issued after the crash
            write(3, 3, 2, b"c"), // issued after the crash
        ];
        let spec = CrashSpec::default().at(1);
        let got = images(&log, b"---", spec.clone(), 200);
        let want: HashSet<Vec<u8>> = [&b"---"[..], b"a--", b"-b-", b"ab-"]
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(got, want);
        // At point 3 the flush completed: a and b are durable, c was not issued yet.
        let c = CrashImage::from_log(&log, b"---", &CrashSpec::new(1).at(3));
        assert_eq!((c.bytes.as_slice(), c.durable), (&b"ab-"[..], 2));
        // A flush in flight at the crash counts for nothing.
        let c = CrashImage::from_log(&log, b"---", &CrashSpec::new(1).at(2));
        assert_eq!(c.durable, 0);
    }

    #[test]
    fn tearing_keeps_old_bytes_for_one_sector_of_a_surviving_write() {
        let base = vec![0xEEu8; 4096];
        let data = vec![0x11u8; 3 * 512 - 100];
        let log = [write(0, 0, 100, &data), write(1, 0, 3000, b"tiny")];
        let mut seen_sectors = HashSet::new();
        for seed in 0..200 {
            let c = CrashImage::from_log(&log, &base, &CrashSpec::new(seed).tear(true));
            let t = c.torn.clone().expect("the long write is tearable");
            assert_eq!(t.seq, 0, "a one-sector write is never torn");
            assert!(c.survived.contains(&0));
            for (i, &b) in c.bytes.iter().enumerate() {
                let i = i as u64;
                let want = if t.range.contains(&i) || !(100..1536).contains(&i) {
                    if (3000..3004).contains(&i) && c.survived.contains(&1) {
                        continue;
                    }
                    0xEE
                } else {
                    0x11
                };
                assert_eq!(b, want, "seed {seed} byte {i} torn {t:?}");
            }
            assert_eq!(t.range.start / 512, (t.range.end - 1) / 512, "one sector");
            seen_sectors.insert(t.range);
        }
        let want: HashSet<Range<u64>> = [100..512, 512..1024, 1024..1536].into_iter().collect();
        assert_eq!(seen_sectors, want);
        // Without a tearable write, nothing is torn.
        let c = CrashImage::from_log(&log[1..], &base, &CrashSpec::new(0).tear(true));
        assert_eq!(c.torn, None);
    }

    #[test]
    fn zeroes_holes_and_length_changes() {
        let mut pz = entry(1, 1, OpKind::PunchHole, 6, &[10]); // past the end: no growth
        pz.info.len = 10;
        let mut wz = entry(2, 2, OpKind::WriteZeroes, 7, &[3]);
        wz.info.len = 3;
        let read = entry(3, 3, OpKind::Read, 0, &[1]);
        let trunc = entry(4, 4, OpKind::SetLen, 2, &[]);
        let log = [write(0, 0, 0, b"abcdefgh"), pz, wz, read, trunc];
        let all = CrashImage::from_log(&log, b"", &CrashSpec::new(0).survival_percent(100));
        assert_eq!(all.bytes, b"ab");
        let spec = CrashSpec::new(0).survival_percent(100).at(3);
        assert_eq!(
            CrashImage::from_log(&log, b"", &spec).bytes,
            b"abcdef\0\0\0\0",
            "hole punched, zeroes extended the file"
        );
        let none = CrashImage::from_log(&log, b"", &CrashSpec::new(0).survival_percent(0));
        assert_eq!(none.bytes, b"");
    }

    #[test]
    fn only_the_files_own_flushes_count() {
        let mut other_flush = flush(1, 1);
        other_flush.info.file = 1;
        let mut other_write = write(2, 1, 0, b"Z");
        other_write.info.file = 1;
        let log = [write(0, 0, 0, b"a"), other_flush, other_write];
        assert_eq!(images(&log, b"-", CrashSpec::default(), 100).len(), 2);
        let spec = CrashSpec::default().file(1);
        assert_eq!(
            images(&log, b"?", spec, 100),
            HashSet::from([b"?".to_vec(), b"Z".to_vec()])
        );
    }

    #[test]
    fn same_seed_same_image_and_seeds_pick_every_survival_rate() {
        let log: Vec<LogEntry> = (0..40).map(|i| write(i, i, i, &[1])).collect();
        let base = vec![0u8; 40];
        let a = CrashImage::from_log(&log, &base, &CrashSpec::new(42).tear(true));
        let b = CrashImage::from_log(&log, &base, &CrashSpec::new(42).tear(true));
        assert_eq!(a, b);
        let counts: HashSet<usize> = (0..100)
            .map(|s| {
                CrashImage::from_log(&log, &base, &CrashSpec::new(s))
                    .survived
                    .len()
            })
            .collect();
        assert!(counts.contains(&0) && counts.contains(&40), "{counts:?}");
    }

    /// Through a real injector: the memory file after the requests is the image where
    /// everything survived, the durable prefix the one where nothing did.
    #[tokio::test]
    async fn controller_crash_images_match_the_file() {
        let mem = crate::MemoryBackend::from_vec(b"base-contents".to_vec());
        let f = FaultInjector::new(mem.clone());
        let ctl = f.controller();
        let base = mem.snapshot();
        f.write_at(IoBuf::from_slice(b"DURABLE"), 0)
            .await
            .0
            .unwrap();
        f.flush().await.unwrap();
        let durable = mem.snapshot();
        f.write_at(IoBuf::from_slice(b"later"), 20).await.0.unwrap();
        f.punch_hole(0, 2, Keep::none()).await.unwrap();
        let all = ctl.crash(&base, &CrashSpec::new(0).survival_percent(100));
        assert_eq!(all.bytes, mem.snapshot());
        let none = ctl.crash(&base, &CrashSpec::new(0).survival_percent(0));
        assert_eq!(none.bytes, durable);
        assert_eq!((none.durable, none.lost.len()), (1, 2));
        let any = ctl.crash_image(&base, 3, true);
        assert!(any.starts_with(b"\0\0RABLE") || any.starts_with(b"DURABLE"));
    }

    #[test]
    #[should_panic(expected = "logging was off")]
    fn a_log_with_holes_is_refused() {
        let f = FaultInjector::new(crate::MemoryBackend::new());
        let ctl = f.controller();
        ctl.set_logging(false);
        futures_lite_block_on(f.flush()).unwrap();
        ctl.set_logging(true);
        ctl.crash_image(&[], 0, false);
    }

    /// Polls a future that never waits (the memory backend's) to completion.
    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }
}
