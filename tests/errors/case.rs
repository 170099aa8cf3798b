//! One case: a scenario's setup, then its target with one fault, then the checks of the
//! failure, the recovery and the image left.

use super::checks::{
    allowed, crash_during_recovery, guest_view, qemu_check_code, qemu_ok, CrashChecks,
};
use super::image::{exec, exec_closing, open, MetaMap, Prepared};
use super::model::Model;
use super::{typed, Class, Img, Scenario, EIO, G};
use blockio::{
    CrashSpec, FaultController, FaultOpener, FaultRule, LogEntry, MemoryBackend, MemoryOpener,
    OpKind,
};
use qcow2_engine::Error;

/// How a fault is injected.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// The target's request that fails first (0-based).
    pub k: u64,
    pub errno: i32,
    /// Every later request fails too, until the rules are cleared.
    pub persistent: bool,
}

impl Fault {
    pub fn rule(&self) -> FaultRule {
        let r = FaultRule::new(self.errno).nth(self.k);
        if self.persistent {
            r
        } else {
            r.times(1)
        }
    }
}

/// What one case saw.
#[derive(Default)]
pub struct Outcome {
    pub class: Option<Class>,
    /// The target succeeded although a request failed.
    pub tolerated: bool,
}

/// The id of the target request (the pattern it writes).
pub const TARGET: usize = 100;

/// A case under way: the image (none once closed), the guest view as the model has it, and
/// the disk at the last successful flush with the requests since.
pub struct CaseState {
    pub img: Option<Img>,
    pub model: Model,
    pub flushed: Model,
    pub since: Vec<(G, usize)>,
}

/// A case whose target ran with a fault: what the checks after it need.
pub struct Faulted<'a> {
    pub scn: &'a Scenario,
    pub p: &'a Prepared,
    pub file: &'a MemoryBackend,
    pub ctl: &'a FaultController,
    /// Log position of the target's first request.
    pub start: u64,
    pub fault: Fault,
}

/// Runs the setup, then the target with `fault` (none: the reference run, returning the
/// target's requests).
pub async fn run_case(
    scn: &Scenario,
    p: &Prepared,
    map: &MetaMap,
    fault: Option<Fault>,
    reference: &[LogEntry],
    out_checks: &mut CrashChecks,
) -> Result<(Outcome, Vec<LogEntry>, Vec<u8>), String> {
    let (opener, file) = p.opener();
    let ctl: FaultController = opener.controller();
    let mut st = run_setup(&opener, p, scn).await?;
    let g = scn.target;
    let start = ctl.completed();
    if let Some(f) = fault {
        ctl.add_rule(f.rule());
    }
    let (res, closed) = match g.closes() {
        true => (
            exec_closing(st.img.take().unwrap(), g).await.map(|()| None),
            true,
        ),
        false => (exec(st.img.as_ref().unwrap(), g, TARGET).await, false),
    };
    let log = ctl.log();
    let during: Vec<LogEntry> = log.iter().filter(|e| e.seq >= start).cloned().collect();
    let Some(f) = fault else {
        res.map_err(|e| format!("reference run: {g:?}: {e}"))?;
        if !closed {
            st.img
                .take()
                .unwrap()
                .close()
                .await
                .map_err(|e| format!("close: {e}"))?;
        }
        return Ok((Outcome::default(), during, file.snapshot()));
    };
    let failed = injected_request(&during, f, reference)?;
    let class = map.classify(failed);
    check_target_result(scn, &res, class, f)?;
    let out = Outcome {
        class: Some(class),
        tolerated: res.is_ok(),
    };
    read_while_faulty(&st, g, res.is_ok()).await?;
    ctl.clear_rules();

    // A failed file flush is never followed by a successful one (through the page cache, the
    // kernel may have dropped what it covered): the next flush fails, and so does close.
    let sticky = !closed && failed.info.op == OpKind::Flush;
    if sticky {
        flush_fails_again(&mut st, g).await?;
    }
    let case = Faulted {
        scn,
        p,
        file: &file,
        ctl: &ctl,
        start,
        fault: f,
    };
    if closed || sticky {
        check_after_failed_close(&case, &st, out_checks).await?;
        return Ok((out, during, file.snapshot()));
    }
    let img = st.img.take().unwrap();
    recover(&case, &img, &mut st, res.is_err(), out_checks).await?;
    let bytes = finish(&case, img, st.model).await?;
    Ok((out, during, bytes))
}

/// Opens the image and runs the scenario's setup on it.
pub async fn run_setup(
    opener: &FaultOpener<MemoryOpener>,
    p: &Prepared,
    scn: &Scenario,
) -> Result<CaseState, String> {
    let model = Model::new(p.initial.clone(), p.cluster);
    let mut st = CaseState {
        flushed: model.clone(),
        model,
        since: Vec::new(),
        img: Some(open(opener, p, scn).await),
    };
    for (i, &g) in scn.setup.iter().enumerate() {
        match g {
            G::Reopen => {
                st.img
                    .take()
                    .unwrap()
                    .close()
                    .await
                    .map_err(|e| format!("setup close: {e}"))?;
                st.img = Some(open(opener, p, scn).await);
                st.flushed = st.model.clone();
                st.since.clear();
            }
            G::Close => unreachable!("setups reopen"),
            _ => {
                exec(st.img.as_ref().unwrap(), g, i)
                    .await
                    .map_err(|e| format!("setup {g:?}: {e}"))?;
                st.model.apply(g, i);
                if g == G::Flush {
                    st.flushed = st.model.clone();
                    st.since.clear();
                } else {
                    st.since.push((g, i));
                }
            }
        }
    }
    Ok(st)
}

/// The target's request that failed: it must be the one the reference run made at `f.k`.
pub fn injected_request<'a>(
    during: &'a [LogEntry],
    f: Fault,
    reference: &[LogEntry],
) -> Result<&'a LogEntry, String> {
    let Some(failed) = during.iter().find(|e| e.injected) else {
        return Err(format!("request {} was not reached", f.k));
    };
    let want = &reference[f.k as usize];
    if (
        failed.info.file,
        failed.info.op,
        failed.info.offset,
        failed.info.len,
    ) != (
        want.info.file,
        want.info.op,
        want.info.offset,
        want.info.len,
    ) {
        return Err(format!(
            "not deterministic: request {} is {:?}, the reference run had {:?}",
            f.k, failed.info, want.info
        ));
    }
    Ok(failed)
}

/// A failed target reports a typed error with the injected errno; one that succeeded anyway
/// is reported unless the failed request was a hole punch.
pub fn check_target_result(
    scn: &Scenario,
    res: &Result<Option<Vec<u8>>, Error>,
    class: Class,
    f: Fault,
) -> Result<(), String> {
    let g = scn.target;
    match res {
        Err(e) => {
            typed(e, f.errno).map_err(|m| format!("{g:?} failed untyped: {m}"))?;
            // A failed guest write says which guest range it was, whatever step failed.
            let request = match g {
                G::Write(o, l) => Some(format!("guest write {o:#x}+{l:#x}: ")),
                G::Zero(o, l, _) => Some(format!("guest write-zeroes {o:#x}+{l:#x}: ")),
                G::Discard(o, l) => Some(format!("guest discard {o:#x}+{l:#x}: ")),
                _ => None,
            };
            if let Some(prefix) = request {
                if !e.to_string().starts_with(&prefix) {
                    return Err(format!("{g:?} failed without its range: {e}"));
                }
            }
        }
        Ok(_) => {
            if class != Class::PunchHole {
                // Not an error the engine may swallow; the checks below show whether the
                // request really took effect.
                eprintln!(
                    "{}: {g:?} succeeded although its {class:?} request failed ({})",
                    scn.name, f.errno
                );
            }
        }
    }
    Ok(())
}

/// While the fault is still set: what does the range read now? (Only when a failed write
/// could be half done; reads may fail again with a persistent fault.)
pub async fn read_while_faulty(st: &CaseState, g: G, acknowledged: bool) -> Result<(), String> {
    let model = &st.model;
    if let (Some(img), Some((r, _))) = (st.img.as_ref(), model.effect(g, TARGET)) {
        if let Ok(b) = img.read(r.start, r.end - r.start).await {
            if acknowledged {
                let mut m2 = model.clone();
                m2.apply(g, TARGET);
                if b[..] != m2.bytes[r.start as usize..r.end as usize] {
                    return Err(format!(
                        "{g:?} was acknowledged but does not read back: {}",
                        m2.old_or_new(&b, r.clone(), G::Read(0, 0), 0)
                            .err()
                            .unwrap_or_default()
                    ));
                }
            } else {
                model
                    .old_or_new(&b, r.clone(), g, TARGET)
                    .map_err(|m| format!("after the failed {g:?}: {m}"))?;
            }
        }
    }
    Ok(())
}

/// After the target's failed file flush: the next flush fails too, and so does close.
pub async fn flush_fails_again(st: &mut CaseState, g: G) -> Result<(), String> {
    let img = st.img.take().unwrap();
    match img.flush().await {
        Ok(()) => return Err(format!("a flush succeeded after the failed {g:?}")),
        Err(e) => typed(&e, EIO).map_err(|m| format!("the flush after a failed one: {m}"))?,
    }
    if img.close().await.is_ok() {
        return Err(format!("close succeeded after the failed {g:?}"));
    }
    st.since.push((g, TARGET));
    Ok(())
}

/// A failed close (or flush): the file is what a crash after it would leave, at best.
/// Everything flushed before is there; the rest may or may not be (the model allows old or
/// new for what was written since the last flush of the setup).
pub async fn check_after_failed_close(
    c: &Faulted<'_>,
    st: &CaseState,
    checks: &mut CrashChecks,
) -> Result<(), String> {
    let bytes = c.file.snapshot();
    qemu_check_code(c.p, &bytes, "closed", &st.since)
        .map_err(|m| format!("after the failed close: {m}"))?;
    let got = guest_view(c.p, bytes).await?;
    allowed(&got, &st.flushed, &st.since).map_err(|m| format!("after the failed close: {m}"))?;
    crash_during_recovery(c.p, c.ctl, c.start, &st.flushed, &st.since, c.fault, checks).await
}

/// The fault is gone: the target works again (`retry`: it failed), a flush succeeds, a crash
/// during that recovery keeps what was flushed, and one after it loses nothing.
pub async fn recover(
    c: &Faulted<'_>,
    img: &Img,
    st: &mut CaseState,
    retry: bool,
    checks: &mut CrashChecks,
) -> Result<(), String> {
    let g = c.scn.target;
    if retry {
        let again = exec(img, g, TARGET)
            .await
            .map_err(|e| format!("{g:?} still fails after the fault cleared: {e}"))?;
        if let (G::Read(off, len), Some(data)) = (g, again) {
            if data[..] != st.model.bytes[off as usize..(off + len) as usize] {
                return Err("the read after the fault cleared returns wrong data".into());
            }
        }
    }
    st.model.apply(g, TARGET);
    st.since.push((g, TARGET));
    img.flush()
        .await
        .map_err(|e| format!("flush after the fault cleared: {e}"))?;
    // A crash anywhere from the failed request to the end of that flush: the write-back
    // order must hold across the failure (leaks at most), and what was flushed before it
    // must be there.
    crash_during_recovery(c.p, c.ctl, c.start, &st.flushed, &st.since, c.fault, checks).await?;
    // Everything acknowledged is durable now: a crash here loses nothing.
    let durable = c
        .ctl
        .crash(c.p.base(), &CrashSpec::new(0).survival_percent(0))
        .bytes;
    let got = guest_view(c.p, durable.clone()).await?;
    if let Some(d) = st.model.diff(&got) {
        return Err(format!(
            "a crash after the successful flush loses acknowledged data: {d}"
        ));
    }
    qemu_ok(c.p, &durable, "durable").map_err(|m| format!("crash after the flush: {m}"))
}

/// Later requests work; close; the image is consistent and holds what the model says.
/// Returns the closed image's bytes.
pub async fn finish(c: &Faulted<'_>, img: Img, mut model: Model) -> Result<Vec<u8>, String> {
    let (p, size) = (c.p, model.bytes.len() as u64);
    let more = [
        G::Write(size / 3 + 12345, 3 * p.cluster),
        G::Discard(size / 2, 2 * p.cluster),
        G::Write(size / 2 + 7, p.cluster),
    ];
    for (i, &m) in more.iter().enumerate() {
        exec(&img, m, 200 + i)
            .await
            .map_err(|e| format!("{m:?} after recovery: {e}"))?;
        model.apply(m, 200 + i);
    }
    img.close()
        .await
        .map_err(|e| format!("close after recovery: {e}"))?;
    let bytes = c.file.snapshot();
    qemu_ok(p, &bytes, "final").map_err(|m| format!("after close: {m}"))?;
    let got = guest_view(p, bytes.clone()).await?;
    if let Some(d) = model.diff(&got) {
        return Err(format!("after close: {d}"));
    }
    if let Some(check) = c.scn.after {
        check(&bytes)?;
    }
    Ok(bytes)
}
