//! The crash checks themselves: workloads with doctored logs, as broken engines would have
//! written them, must fail them; `repro` checks one crash image from the environment (the
//! harness and its variables: `crash/mod.rs`).

mod crash;

use blockio::{CrashImage, CrashSpec, OpKind};
use crash::checker::Checker;
use crash::configs::config;
use crash::env_u64;
use crash::workload::run_workload;
use qcow2_format::Header;
use std::path::Path;

/// The checks have teeth: the same workloads with the log doctored as a broken engine would
/// have written it must fail. Without its flushes (an engine whose flush did not reach the
/// disk) acknowledged data goes missing; without its refcount block writes (an engine that
/// wrote L2 tables before refcounts, and crashed) `qemu-img check` finds corruption.
#[test]
fn broken_engines_are_caught() {
    let mut cfg = config("64k");
    cfg.points = 30;
    let mut lost_data = 0;
    let mut corrupt = 0;
    for seed in 0..2 {
        let mut run = run_workload(&cfg, seed);
        let full = run.log.clone();
        run.log.retain(|e| e.info.op != OpKind::Flush);
        let mut failures = Vec::new();
        Checker::new().check_run(&run, None, &mut failures);
        lost_data += failures.iter().filter(|f| f.contains("(c) data")).count();

        // The refcount block(s) of the new image: every write to them vanishes.
        let h = Header::parse(&run.base[..65536]).unwrap();
        let t = h.refcount_table_offset as usize;
        let cs = cfg.cluster;
        let blocks: Vec<u64> = run.base[t..t + cs as usize]
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .filter(|&o| o != 0)
            .collect();
        run.log = full;
        run.log.retain(|e| {
            !(e.info.op == OpKind::Write
                && blocks
                    .iter()
                    .any(|&b| e.info.offset < b + cs && b < e.info.offset + e.info.len))
        });
        let mut failures = Vec::new();
        Checker::new().check_run(&run, None, &mut failures);
        corrupt += failures
            .iter()
            .filter(|f| f.contains("`qemu-img check` exit Some(2)"))
            .count();
    }
    eprintln!("doctored logs: {lost_data} images lost flushed data, {corrupt} were corrupt");
    assert!(lost_data > 0, "dropping every flush went unnoticed");
    assert!(
        corrupt > 0,
        "dropping the refcount block writes went unnoticed"
    );
}

/// Reproduces one crash image from the environment (see the module documentation); without
/// `QCOW2_CRASH_CONFIG` it does nothing.
#[test]
fn repro() {
    let Ok(name) = std::env::var("QCOW2_CRASH_CONFIG") else {
        return;
    };
    let cfg = config(&name);
    let seed = env_u64("QCOW2_CRASH_RUN").expect("QCOW2_CRASH_RUN");
    let run = run_workload(&cfg, seed);
    let at = env_u64("QCOW2_CRASH_POINT").unwrap_or(run.log.len() as u64);
    let image_seed = env_u64("QCOW2_CRASH_SEED").unwrap_or(0);
    let tear = env_u64("QCOW2_CRASH_TEAR").unwrap_or(0) != 0;
    eprintln!("{} requests; ops:", run.log.len());
    for op in run.ops.iter().flatten() {
        eprintln!("  {op:?}");
    }
    let mut checker = Checker::new();
    checker.verbose = true;
    let mut failures = Vec::new();
    checker.check_run(&run, Some((at, image_seed, tear)), &mut failures);
    if let Ok(dir) = std::env::var("QCOW2_CRASH_KEEP") {
        let crash = CrashImage::from_log(
            &run.log,
            &run.base,
            &CrashSpec::new(image_seed).at(at).tear(tear),
        );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join("repro.qcow2"), &crash.bytes).unwrap();
        let log: Vec<String> = run
            .log
            .iter()
            .map(|e| {
                format!(
                    "{} {:?} {:#x}+{:#x} after {}",
                    e.seq, e.info.op, e.info.offset, e.info.len, e.issued_after
                )
            })
            .collect();
        std::fs::write(Path::new(&dir).join("repro.log"), log.join("\n")).unwrap();
        eprintln!("kept {dir}/repro.qcow2 and repro.log");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
