//! Every fault of a scenario: the reference run lists the target's requests, then each one
//! fails in turn (EIO once, ENOSPC once, EIO until cleared).

use super::case::{run_case, Fault};
use super::checks::CrashChecks;
use super::image::{prepare, MetaMap, Prepared};
use super::scenarios::scenarios;
use super::{Class, Scenario, EIO, ENOSPC, G};
use blockio::LogEntry;
use std::collections::BTreeMap;
use std::time::Instant;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs every fault of a scenario; returns the classes hit and the number of faults.
pub fn torture(scn: &Scenario, bugs_only: bool) -> (BTreeMap<Class, u64>, u64) {
    let t0 = Instant::now();
    let rt = runtime();
    let p = prepare(scn.source);
    let (reference, map, classes) = reference_run(&rt, scn, &p);
    let n = reference.len() as u64;
    let ks: Vec<u64> = requests_to_fail(&reference, &map, &classes)
        .into_iter()
        .filter(|k| scn.bugs.contains(k) == bugs_only)
        .collect();
    let mut hit = BTreeMap::new();
    let mut faults = 0;
    let mut failures = Vec::new();
    let mut tolerated = BTreeMap::<Class, u64>::new();
    let mut checks = CrashChecks::default();
    for &k in &ks {
        for (errno, persistent) in [(EIO, false), (ENOSPC, false), (EIO, true)] {
            let f = Fault {
                k,
                errno,
                persistent,
            };
            faults += 1;
            match rt.block_on(run_case(scn, &p, &map, Some(f), &reference, &mut checks)) {
                Ok((o, _, _)) => {
                    let c = o.class.expect("classified");
                    *hit.entry(c).or_default() += 1;
                    if o.tolerated {
                        *tolerated.entry(c).or_default() += 1;
                    }
                }
                Err(e) => failures.push(format!(
                    "{}: request {k} ({:?} {:?} {:#x}+{:#x}) failing with {} {}: {e}",
                    scn.name,
                    map.classify(&reference[k as usize]),
                    reference[k as usize].info.op,
                    reference[k as usize].info.offset,
                    reference[k as usize].info.len,
                    if errno == EIO { "EIO" } else { "ENOSPC" },
                    if persistent { "until cleared" } else { "once" }
                )),
            }
        }
    }
    eprintln!(
        "errors {}: {} requests in the target, {} faults injected, classes {:?}, tolerated {:?}; \
         {} crash points during recoveries, {} crash images ({} distinct, {} by qemu-img too), \
         {:.1?}",
        scn.name,
        n,
        faults,
        hit,
        tolerated,
        checks.points,
        checks.images,
        checks.seen.len(),
        checks.by_qemu,
        t0.elapsed()
    );
    // Failures the engine may ignore, as QEMU does: punching holes in freed clusters, and
    // cutting the file's tail after a shrink (QEMU warns "Failed to truncate the tail of the
    // image").
    let may_ignore = |c: &Class| match c {
        Class::PunchHole => true,
        Class::SetLen => matches!(scn.target, G::Resize(_)),
        _ => false,
    };
    let bad_tolerance: Vec<_> = tolerated.keys().filter(|c| !may_ignore(c)).collect();
    assert!(
        failures.is_empty(),
        "{} of {faults} faults mishandled:\n{}",
        failures.len(),
        failures[..failures.len().min(25)].join("\n")
    );
    assert!(
        bad_tolerance.is_empty(),
        "{}: the target succeeded although a {bad_tolerance:?} request failed",
        scn.name
    );
    (hit, faults)
}

/// The scenario's run without a fault: the target's requests, the map of the image's
/// metadata that classifies them, and how many there are of each class. The target must make
/// a request of every class the scenario expects.
pub fn reference_run(
    rt: &tokio::runtime::Runtime,
    scn: &Scenario,
    p: &Prepared,
) -> (Vec<LogEntry>, MetaMap, BTreeMap<Class, u64>) {
    let (_, reference, closed) = rt
        .block_on(run_case(
            scn,
            p,
            &MetaMap::default(),
            None,
            &[],
            &mut CrashChecks::default(),
        ))
        .unwrap_or_else(|e| panic!("{}: {e}", scn.name));
    let mut map = MetaMap::default();
    map.add(p.base());
    map.add(&closed);
    let classes: BTreeMap<Class, u64> = reference.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(map.classify(e)).or_default() += 1;
        m
    });
    if std::env::var_os("QCOW2_ERRORS_VERBOSE").is_some() {
        for e in &reference {
            eprintln!(
                "{}: {:?} file {} {:?} {:#x}+{:#x}",
                scn.name,
                map.classify(e),
                e.info.file,
                e.info.op,
                e.info.offset,
                e.info.len
            );
        }
    }
    for c in scn.expect {
        assert!(
            classes.contains_key(c),
            "{}: the target makes no {c:?} request: {classes:?}",
            scn.name
        );
    }
    (reference, map, classes)
}

/// The requests to fail: every request of short paths; long ones (512-byte clusters)
/// sampled, ends included, with every request of a class seen only a few times.
pub fn requests_to_fail(
    reference: &[LogEntry],
    map: &MetaMap,
    classes: &BTreeMap<Class, u64>,
) -> Vec<u64> {
    let n = reference.len() as u64;
    if n <= 60 {
        return (0..n).collect();
    }
    let mut v: Vec<u64> = (0..10).chain(n - 10..n).collect();
    v.extend((1..40).map(|i| 10 + i * (n - 20) / 40));
    // Every request of a class seen only a few times.
    for (k, e) in reference.iter().enumerate() {
        if classes[&map.classify(e)] <= 4 {
            v.push(k as u64);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

pub fn scenario(name: &str) {
    let all = scenarios();
    let scn = all
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name}"));
    torture(scn, false);
}
