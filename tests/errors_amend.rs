//! Error injection on amendments: a refcount width change (16 to 64 bits, then 64 to 4 with
//! a downgrade-free narrowing) on 512-byte clusters, with data, a compressed cluster, zero
//! clusters and an internal snapshot. Every backend request the amendment makes fails in
//! turn: once (EIO, then ENOSPC) and from there on (a dead disk, EIO). For each:
//!
//! - the amendment fails with `Error::Io` carrying the errno, or succeeds (a failure the
//!   engine may ignore: punching freed clusters) and then did its job;
//! - the file left behind shows no corruption in `qemu-img check` (leaks allowed) and reads
//!   as before through our engine;
//! - the same amendment then works on it, leaving it clean, with the new width, reading the
//!   same.
//!
//! Amend consumes the image, so it does not fit the `errors/` harness's targets (guest
//! requests on an open image); only its errno test is used.

mod errors;

use blockio::{FaultOpener, FaultRule, MemoryBackend, MemoryOpener};
use errors::{typed, EIO, ENOSPC};
use qcow2_engine::{AmendOptions, Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_info_json, qemu_io};
use std::path::Path;

const IMAGE: &str = "/errors/amend.qcow2";
const SIZE: u64 = 256 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn base_image(dir: &Path) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    let args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    qemu_img(&[&args[..], &[path_str(&path), "256K"]].concat());
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 1 0 40k",
            "write -c -P 2 64k 2k",
            "write -z 96k 8k",
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", path_str(&path)]);
    qemu_io("qcow2", &path, &["write -P 3 8k 4k"]);
    std::fs::read(&path).unwrap()
}

/// How the amendment went: its result, and the file afterwards.
struct Outcome {
    result: qcow2_engine::Result<()>,
    bytes: Vec<u8>,
    /// Requests the amendment made (open not counted).
    requests: u64,
}

/// Opens `bytes` and amends it, with `rule` (if any) added once the image is open.
async fn amend(bytes: &[u8], opts: &AmendOptions, rule: Option<FaultRule>) -> Outcome {
    let mem = MemoryOpener::new();
    let file = MemoryBackend::from_vec(bytes.to_vec());
    mem.insert(IMAGE, file.clone());
    let opener = FaultOpener::new(mem);
    let ctl = opener.controller();
    let img = Image::open(opener, IMAGE, ImageOptions::new())
        .await
        .expect("open");
    let start = ctl.completed();
    if let Some(rule) = rule {
        ctl.add_rule(rule);
    }
    let result = img.amend(opts).await;
    let requests = ctl.completed() - start;
    ctl.clear_rules();
    Outcome {
        result,
        bytes: file.snapshot(),
        requests,
    }
}

async fn engine_disk(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mem = MemoryOpener::new();
    mem.insert(IMAGE, MemoryBackend::from_vec(bytes.to_vec()));
    let img = Image::open(mem, IMAGE, ImageOptions::new().read_only(true))
        .await
        .map_err(|e| format!("our engine cannot open it: {e}"))?;
    let buf = img
        .read(0, SIZE)
        .await
        .map_err(|e| format!("our engine cannot read it: {e}"))?;
    Ok(buf.to_vec())
}

/// `qemu-img check` exit status of `bytes` (0 clean, 3 leaks, 2 corruption).
fn check(dir: &Path, bytes: &[u8]) -> (Option<i32>, String) {
    let path = dir.join("left.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = qemu_check(&path);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn refcount_bits(dir: &Path, bytes: &[u8]) -> u64 {
    let path = dir.join("left.qcow2");
    std::fs::write(&path, bytes).unwrap();
    qemu_info_json(&path)["format-specific"]["data"]["refcount-bits"]
        .as_u64()
        .expect("refcount-bits in qemu-img info")
}

/// One fault: `nth` request of the amendment fails (`times` of them, or all from there).
fn one_fault(
    dir: &Path,
    base: &[u8],
    before: &[u8],
    opts: &AmendOptions,
    bits: u64,
    rule: FaultRule,
    errno: i32,
) -> Result<(), String> {
    let rt = runtime();
    let out = rt.block_on(amend(base, opts, Some(rule)));
    if let Err(e) = &out.result {
        typed(e, errno)?;
    } else if refcount_bits(dir, &out.bytes) != bits {
        return Err("the amendment succeeded but the width did not change".into());
    }
    let (code, report) = check(dir, &out.bytes);
    if code != Some(0) && code != Some(3) {
        return Err(format!("qemu-img check exit {code:?}: {report}"));
    }
    if rt.block_on(engine_disk(&out.bytes))? != before {
        return Err("the guest data changed".into());
    }
    let again = rt.block_on(amend(&out.bytes, opts, None));
    again
        .result
        .map_err(|e| format!("the amendment again: {e}"))?;
    let (code, report) = check(dir, &again.bytes);
    if code != Some(0) && code != Some(3) {
        return Err(format!(
            "after the amendment again: check {code:?}: {report}"
        ));
    }
    if refcount_bits(dir, &again.bytes) != bits {
        return Err("after the amendment again: not the new width".into());
    }
    if rt.block_on(engine_disk(&again.bytes))? != before {
        return Err("after the amendment again: the guest data changed".into());
    }
    Ok(())
}

#[test]
fn every_failed_request_of_a_width_change_leaves_a_sound_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = base_image(d);
    let rt = runtime();
    let before = rt.block_on(engine_disk(&base)).unwrap();
    let mut failures = Vec::new();
    let mut faults = 0;
    for bits in [64u64, 4] {
        let opts = AmendOptions::new().refcount_bits(bits);
        let start = if bits == 64 {
            base.clone()
        } else {
            // Narrowing: from the 64-bit image the widening leaves.
            rt.block_on(amend(&base, &AmendOptions::new().refcount_bits(64), None))
                .bytes
        };
        let clean = rt.block_on(amend(&start, &opts, None));
        clean.result.expect("the amendment without faults");
        assert_eq!(check(d, &clean.bytes).0, Some(0), "{bits} bits: not clean");
        assert!(clean.requests > 10, "only {} requests", clean.requests);
        for n in 0..clean.requests {
            for (errno, times) in [(EIO, Some(1)), (ENOSPC, Some(1)), (EIO, None)] {
                let mut rule = FaultRule::new(errno).nth(n);
                if let Some(t) = times {
                    rule = rule.times(t);
                }
                faults += 1;
                if let Err(e) = one_fault(d, &start, &before, &opts, bits, rule, errno) {
                    failures.push(format!(
                        "{bits} bits, request {n} ({errno}, {times:?}): {e}"
                    ));
                }
            }
        }
    }
    eprintln!("errors amend: {faults} faults");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
