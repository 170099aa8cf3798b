//! The checks of a crash image: `qemu-img check`, our engine's read against the model, QEMU's
//! read, and a read-write recovery.

use super::configs::Config;
use super::model::{model_mismatch, Model};
use super::workload::{apply, crash_points, pattern, runtime, Kind, Op, Run, IMAGE};
use blockio::{CrashImage, CrashSpec, MemoryBackend, MemoryOpener};
use qcow2_engine::{Image, ImageOptions};
use qcow2_format::Header;
use qcow2_tests::{path_str, qemu_img, qemu_img_status, Prng};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Default, Debug)]
pub struct Stats {
    pub runs: u64,
    pub ops: u64,
    pub requests: u64,
    pub points: u64,
    pub images: u64,
    pub distinct: u64,
    pub torn: u64,
    pub dirty_repaired: u64,
    pub qemu_reads: u64,
    pub recoveries: u64,
    /// Runs whose refcount table moved (grew).
    pub table_moves: u64,
}

/// Checks one crash image; `Err` says what is wrong.
pub struct Checker {
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    pub seen: HashSet<(u64, u64)>,
    pub keep: Option<PathBuf>,
    pub stats: Stats,
    pub verbose: bool,
}

/// A fast 128-bit fingerprint of a crash image (to check each distinct image once).
pub fn digest(bytes: &[u8]) -> (u64, u64) {
    let (mut a, mut b) = (0x243F_6A88_85A3_08D3u64, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        a = (a ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        b = b.wrapping_add(x).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    }
    for &x in words.remainder() {
        a = (a ^ u64::from(x)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    (a, b)
}

pub async fn engine_read(bytes: Vec<u8>, size: u64) -> Result<Vec<u8>, String> {
    let mem = MemoryOpener::new();
    mem.insert(IMAGE, MemoryBackend::from_vec(bytes));
    let img = Image::open(mem, IMAGE, ImageOptions::new().read_only(true))
        .await
        .map_err(|e| format!("our engine cannot open it read-only: {e}"))?;
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20);
        let buf = img
            .read(pos, n)
            .await
            .map_err(|e| format!("our engine cannot read {pos:#x}+{n:#x}: {e}"))?;
        out.extend_from_slice(&buf);
        pos += n;
    }
    Ok(out)
}

/// Opens the crash image read-write, writes, closes: the image must stay consistent and
/// show the old contents with the new writes on top.
pub async fn recover(
    bytes: Vec<u8>,
    cfg: &Config,
    seed: u64,
    old: &[u8],
) -> Result<Vec<u8>, String> {
    let mem = MemoryOpener::new();
    let file = MemoryBackend::from_vec(bytes);
    mem.insert(IMAGE, file.clone());
    let img = Image::open(mem, IMAGE, ImageOptions::new())
        .await
        .map_err(|e| format!("recovery: our engine cannot open it read-write: {e}"))?;
    let mut want = old.to_vec();
    let mut r = Prng::new(seed ^ 0x5eed);
    for k in 0..6 {
        let len = 1 + r.below(cfg.max_len.min(4 * cfg.cluster));
        let off = r.below(cfg.size - len + 1);
        let op = Op {
            id: 1_000_000 + k,
            kind: if k == 3 { Kind::Discard } else { Kind::Write },
            off,
            len,
            start_io: 0,
            end_io: 0,
            start_clk: 0,
            end_clk: 0,
        };
        let res = match op.kind {
            Kind::Write => {
                let data: Vec<u8> = (off..off + len).map(|b| pattern(op.id, b)).collect();
                img.write(off, &data).await
            }
            _ => img.discard(off, len).await,
        };
        res.map_err(|e| format!("recovery: {op:?}: {e}"))?;
        apply(&mut want, &op, cfg);
    }
    img.close()
        .await
        .map_err(|e| format!("recovery: close: {e}"))?;
    let got = engine_read(file.snapshot(), cfg.size).await?;
    if got != want {
        let b = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "recovery: after writing to the crashed image, byte {b:#x} is {:#x}, want {:#x}",
            got[b], want[b]
        ));
    }
    Ok(file.snapshot())
}

pub fn check_output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Checker {
    pub fn new() -> Self {
        let tmp = Path::new("/dev/shm");
        let dir = if tmp.is_dir() {
            tempfile::tempdir_in(tmp)
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir");
        Checker {
            rt: runtime(),
            dir,
            seen: HashSet::new(),
            keep: std::env::var_os("QCOW2_CRASH_KEEP").map(PathBuf::from),
            stats: Stats::default(),
            verbose: false,
        }
    }

    /// `qemu-img check` (repairing a dirty image first): `Err` on corruption.
    pub fn qemu_check(&mut self, path: &Path, dirty: bool) -> Result<(), String> {
        if dirty {
            let out = qemu_img_status(&["check", "-r", "all", path_str(path)]);
            if out.status.code() != Some(0) {
                return Err(format!(
                    "dirty image: `qemu-img check -r all` exit {:?}: {}",
                    out.status.code(),
                    check_output(&out)
                ));
            }
            self.stats.dirty_repaired += 1;
        }
        let out = qemu_img_status(&["check", path_str(path)]);
        match out.status.code() {
            Some(0) | Some(3) => {
                if self.verbose {
                    eprintln!("qemu-img check: {}", check_output(&out));
                }
                Ok(())
            }
            code => Err(format!(
                "`qemu-img check`{} exit {code:?}: {}",
                if dirty { " after -r all" } else { "" },
                check_output(&out)
            )),
        }
    }

    pub fn check_image(
        &mut self,
        run: &Run,
        crash: &CrashImage,
        model: &Model,
        maybe: &[&Op],
        sample: u64,
    ) -> Result<(), String> {
        let cfg = &run.cfg;
        self.stats.images += 1;
        if crash.torn.is_some() {
            self.stats.torn += 1;
        }
        if !self.seen.insert(digest(&crash.bytes)) {
            return Ok(()); // the same bytes were checked already
        }
        self.stats.distinct += 1;
        let header = Header::parse(&crash.bytes[..crash.bytes.len().min(1 << 16)])
            .map_err(|e| format!("the header does not parse: {e}"))?;
        let dirty = header.is_dirty();
        // (b) and (c): our engine opens it read-only and reads what the model allows.
        let got = self
            .rt
            .block_on(engine_read(crash.bytes.clone(), cfg.size))?;
        if let Some(m) = model_mismatch(&got, model, maybe, cfg) {
            return Err(format!("(c) data: {m}"));
        }
        // (a) QEMU finds no corruption (after repairing a dirty image).
        let path = self.dir.path().join("crash.qcow2");
        std::fs::write(&path, &crash.bytes).expect("write the crash image");
        self.qemu_check(&path, dirty)?;
        let repaired = if dirty {
            let bytes = std::fs::read(&path).expect("read the repaired image");
            let after = self.rt.block_on(engine_read(bytes.clone(), cfg.size))?;
            if after != got {
                let b = after
                    .iter()
                    .zip(&got)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "the repair changed guest byte {b:#x} from {:#x} to {:#x}",
                    got[b], after[b]
                ));
            }
            bytes
        } else {
            crash.bytes.clone()
        };
        if sample % 16 == 0 {
            // QEMU reads what our engine reads.
            self.stats.qemu_reads += 1;
            let raw = self.dir.path().join("crash.raw");
            qemu_img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                path_str(&path),
                path_str(&raw),
            ]);
            let theirs = std::fs::read(&raw).expect("read the raw image");
            if theirs != got {
                let b = theirs
                    .iter()
                    .zip(&got)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "QEMU reads guest byte {b:#x} as {:#x}, our engine as {:#x}",
                    theirs.get(b).copied().unwrap_or(0),
                    got[b]
                ));
            }
        }
        if sample % 8 == 3 {
            // Our engine carries on from the crashed (repaired) image.
            self.stats.recoveries += 1;
            let after = self.rt.block_on(recover(repaired, cfg, sample, &got))?;
            std::fs::write(&path, &after).expect("write the recovered image");
            self.qemu_check(&path, false)
                .map_err(|e| format!("after recovery writes: {e}"))?;
        }
        Ok(())
    }

    /// Checks the crash points of one run; failures are appended as reproduction lines.
    pub fn check_run(
        &mut self,
        run: &Run,
        only: Option<(u64, u64, bool)>,
        failures: &mut Vec<String>,
    ) {
        self.stats.runs += 1;
        self.stats.ops += run.ops.iter().map(Vec::len).sum::<usize>() as u64;
        self.stats.requests += run.log.len() as u64;
        let end = CrashImage::from_log(
            &run.log,
            &run.base,
            &CrashSpec::new(0).survival_percent(100),
        );
        let table = |b: &[u8]| {
            Header::parse(&b[..b.len().min(1 << 16)])
                .map(|h| h.refcount_table_offset)
                .ok()
        };
        if table(&end.bytes) != table(&run.base) {
            self.stats.table_moves += 1;
        }
        let points = match only {
            Some((at, _, _)) => vec![at],
            None => crash_points(run),
        };
        let mut model = Model::new(run);
        for at in points {
            self.stats.points += 1;
            let maybe = model.at(run, at);
            let specs: Vec<(u64, bool)> = match only {
                Some((_, seed, tear)) => vec![(seed, tear)],
                None => {
                    let s = run.seed.wrapping_mul(1_000_003) ^ at.wrapping_mul(7919);
                    vec![(s, false), (s + 1, true)]
                }
            };
            for (seed, tear) in specs {
                let spec = CrashSpec::new(seed).at(at).tear(tear);
                let crash = CrashImage::from_log(&run.log, &run.base, &spec);
                if self.verbose {
                    eprintln!("{crash:?}");
                }
                let sample = self.stats.images;
                if let Err(e) = self.check_image(run, &crash, &model, &maybe, sample) {
                    let repro = format!(
                        "QCOW2_CRASH_CONFIG={} QCOW2_CRASH_RUN={} QCOW2_CRASH_POINT={at} \
                         QCOW2_CRASH_SEED={seed} QCOW2_CRASH_TEAR={} cargo test -p qcow2-tests \
                         --test crash_checker -- repro --nocapture",
                        run.cfg.name,
                        run.seed,
                        u8::from(tear)
                    );
                    if let Some(dir) = &self.keep {
                        let name = format!(
                            "{}-run{}-at{at}-seed{seed}-tear{}.qcow2",
                            run.cfg.name,
                            run.seed,
                            u8::from(tear)
                        );
                        std::fs::create_dir_all(dir).expect("QCOW2_CRASH_KEEP dir");
                        std::fs::write(dir.join(name), &crash.bytes).expect("keep the image");
                    }
                    failures.push(format!(
                        "{} run {} crash point {at}/{} (durable {}, {} survived, {} lost, torn {:?}): {e}\n  reproduce: {repro}",
                        run.cfg.name,
                        run.seed,
                        run.log.len(),
                        crash.durable,
                        crash.survived.len(),
                        crash.lost.len(),
                        crash.torn,
                    ));
                }
            }
        }
    }
}
