//! What an image must be after a fault: what the guest reads, what `qemu-img check` and our
//! checker say, and the same for crashes during the recovery.

use super::case::Fault;
use super::image::Prepared;
use super::model::Model;
use super::{G, MIB};
use blockio::{CrashSpec, FaultController, MemoryBackend, MemoryOpener};
use qcow2_engine::{Image, ImageOptions};
use qcow2_format::Header;
use qcow2_tests::{only_safe_copied_errors, path_str, qemu_img_status};
use std::collections::HashSet;

/// The guest view of image bytes `bytes` (with `p`'s backing files), read-only.
pub async fn guest_view(p: &Prepared, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let mem = MemoryOpener::new();
    for (path, b) in &p.files {
        mem.insert(path, MemoryBackend::from_vec(b.clone()));
    }
    mem.insert(&p.image, MemoryBackend::from_vec(bytes));
    let img = Image::open(mem, &p.image, ImageOptions::new().read_only(true))
        .await
        .map_err(|e| format!("our engine cannot open it read-only: {e}"))?;
    let size = img.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(MIB);
        let b = img
            .read(pos, n)
            .await
            .map_err(|e| format!("our engine cannot read it: {e}"))?;
        out.extend_from_slice(&b);
        pos += n;
    }
    Ok(out)
}

/// `qemu-img check` of image bytes: leaks at most (a dirty image is repaired first).
pub fn qemu_ok(p: &Prepared, bytes: &[u8], tag: &str) -> Result<(), String> {
    qemu_check_code(p, bytes, tag, &[]).map(|_| ())
}

/// `qemu-img check` of image bytes a crash (or a failure as bad as one) left after the
/// requests `since`: leaks at most, and, when a snapshot operation is among them, the COPIED
/// flag errors of its crash windows that are harmless ([`only_safe_copied_errors`]). Returns
/// qemu-img's exit code.
pub fn qemu_check_code(
    p: &Prepared,
    bytes: &[u8],
    tag: &str,
    since: &[(G, usize)],
) -> Result<i32, String> {
    let path = p.scratch(bytes, tag);
    let dirty = Header::parse(&bytes[..bytes.len().min(2 * MIB as usize)])
        .map(|h| h.is_dirty())
        .unwrap_or(false);
    let snapshot_op = since
        .iter()
        .any(|(g, _)| matches!(g, G::SnapCreate(_) | G::SnapDelete(_) | G::SnapApply(_)));
    let out_text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let res = (|| {
        if dirty {
            let r = qemu_img_status(&["check", "-r", "all", path_str(&path)]);
            if r.status.code() != Some(0) {
                return Err(format!(
                    "dirty image: qemu-img check -r all exit {:?}: {}",
                    r.status.code(),
                    out_text(&r)
                ));
            }
        }
        let out = qemu_img_status(&["check", path_str(&path)]);
        match out.status.code() {
            Some(c @ (0 | 3)) => Ok(c),
            Some(2) if snapshot_op => only_safe_copied_errors(&out_text(&out), p.cluster)
                .map(|()| 2)
                .map_err(|e| format!("qemu-img check: {e}\n{}", out_text(&out))),
            c => Err(format!("qemu-img check exit {c:?}: {}", out_text(&out))),
        }
    })();
    if res.is_err() && std::env::var_os("QCOW2_ERRORS_KEEP").is_some() {
        eprintln!("kept {}", path.display());
        let _ = std::fs::copy(&path, format!("/tmp/errors-{tag}.qcow2"));
    }
    let _ = std::fs::remove_file(&path);
    res
}

/// Each byte of `got` is as flushed, or as one of the requests since left it; its length is
/// the flushed one or one a resize since gave, and what lies past the flushed end reads zeros
/// unless a request since wrote it.
pub fn allowed(got: &[u8], flushed: &Model, since: &[(G, usize)]) -> Result<(), String> {
    let len = got.len();
    if len != flushed.bytes.len() && !since.iter().any(|&(g, _)| g == G::Resize(len as u64)) {
        return Err(format!(
            "{len} guest bytes: neither the flushed size {} nor one resized to since",
            flushed.bytes.len()
        ));
    }
    // What each request since changes, each against the model as the ones before left it.
    let mut effects = Vec::new();
    let mut m = flushed.clone();
    for &(op, id) in since {
        effects.extend(m.effect(op, id));
        m.apply(op, id);
    }
    let mut before = flushed.bytes.clone();
    before.resize(len, 0);
    for (k, (g, f)) in got.chunks(4096).zip(before.chunks(4096)).enumerate() {
        if g == f {
            continue;
        }
        for (j, (&v, &old)) in g.iter().zip(f).enumerate() {
            let b = (k * 4096 + j) as u64;
            if v == old {
                continue;
            }
            let ok = effects
                .iter()
                .any(|(r, new)| r.contains(&b) && new.at(b) == v);
            if !ok {
                return Err(format!(
                    "guest byte {b:#x} is {v:#x}: neither the flushed {old:#x} nor written since"
                ));
            }
        }
    }
    Ok(())
}

/// Counts of the crash images checked during recoveries.
#[derive(Default, Debug)]
pub struct CrashChecks {
    pub points: u64,
    pub images: u64,
    pub seen: HashSet<u64>,
    /// Checked by qemu-img too (a sample, and every dirty one).
    pub by_qemu: u64,
}

pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in bytes.chunks(8) {
        let mut x = [0u8; 8];
        x[..w.len()].copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(x))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(17);
    }
    h
}

/// Crash images at every point between log position `from` and now (six of them when there
/// are more than 12), two subsets each: each must hold what was flushed (or newer data) and
/// be consistent. Our engine's checker (itself tested against qemu-img) judges them;
/// qemu-img confirms every finding, checks every dirty image, and every eighth one.
pub async fn crash_during_recovery(
    p: &Prepared,
    ctl: &FaultController,
    from: u64,
    flushed: &Model,
    since: &[(G, usize)],
    f: Fault,
    checks: &mut CrashChecks,
) -> Result<(), String> {
    let log = ctl.log();
    let to = ctl.completed();
    let n = to - from;
    let points: Vec<u64> = if n <= 12 {
        (from..=to).collect()
    } else {
        let seed = f.k * 31 + f.errno as u64 + u64::from(f.persistent);
        let mut r = qcow2_tests::Prng::new(seed);
        let mut v: Vec<u64> = (0..5).map(|_| from + r.below(n)).collect();
        v.push(to - 1);
        v
    };
    for at in points {
        checks.points += 1;
        for seed in [at * 2, at * 2 + 1] {
            let c = blockio::CrashImage::from_log(&log, p.base(), &CrashSpec::new(seed).at(at));
            checks.images += 1;
            if !checks.seen.insert(fingerprint(&c.bytes)) {
                continue;
            }
            let what = |m: String| format!("crash at {at} (seed {seed}, during the recovery): {m}");
            let got = guest_view(p, c.bytes.clone()).await.map_err(what)?;
            allowed(&got, flushed, since).map_err(what)?;
            let dirty = Header::parse(&c.bytes[..c.bytes.len().min(2 * MIB as usize)])
                .map(|h| h.is_dirty())
                .unwrap_or(false);
            let ours = if dirty {
                None
            } else {
                Some(our_check(p, c.bytes.clone()).await.map_err(what)?)
            };
            let sample = checks.seen.len() % 8 == 0;
            let bad = ours.filter(|code| *code != 0 && *code != 3);
            if dirty || sample || bad.is_some() {
                checks.by_qemu += 1;
                let theirs = qemu_check_code(p, &c.bytes, "recovery", since).map_err(what)?;
                if let Some(code) = bad.filter(|&code| i32::from(code) != theirs) {
                    return Err(what(format!(
                        "our checker says exit {code}, qemu-img check finds nothing wrong"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Our engine's `check` of image bytes (read-only): its qemu-img exit status.
pub async fn our_check(p: &Prepared, bytes: Vec<u8>) -> Result<u8, String> {
    let mem = MemoryOpener::new();
    for (path, b) in &p.files {
        mem.insert(path, MemoryBackend::from_vec(b.clone()));
    }
    mem.insert(&p.image, MemoryBackend::from_vec(bytes));
    let img = Image::open(mem, &p.image, ImageOptions::new().read_only(true))
        .await
        .map_err(|e| format!("our engine cannot open it read-only: {e}"))?;
    let report = img.check().await.map_err(|e| format!("our check: {e}"))?;
    Ok(report.exit_code())
}
