//! What a crash image must hold: the data flushed, or newer data of the requests issued by the
//! crash.

use super::configs::Config;
use super::workload::{apply, changed, value, Kind, Op, Run};

/// What a crash image must hold at crash point `at`.
///
/// A flush completed before the crash when every backend request it made had (its `end_io`
/// is at most `at`); it guarantees every request that returned before it began
/// (`end_clk < flush.start_clk`). Those are a prefix of each task's list: `required` is the
/// disk after them. The task's later requests issued by the crash (`start_io <= at`) may or
/// may not have reached the disk, in part or whole.
pub struct Model {
    pub required: Vec<u8>,
    /// How many ops of each task `required` holds.
    pub applied: Vec<usize>,
}

impl Model {
    pub fn new(run: &Run) -> Self {
        Model {
            required: run.initial.clone(),
            applied: vec![0; run.cfg.tasks as usize],
        }
    }

    /// Moves the model to crash point `at` (never backwards); returns the ops whose data may
    /// or may not be there.
    pub fn at<'a>(&mut self, run: &'a Run, at: u64) -> Vec<&'a Op> {
        let since = run
            .ops
            .iter()
            .flatten()
            .filter(|o| o.kind == Kind::Flush && o.end_io <= at)
            .map(|o| o.start_clk)
            .max();
        let mut maybe = Vec::new();
        for (t, ops) in run.ops.iter().enumerate() {
            let guaranteed = since.map_or(0, |s| ops.iter().take_while(|o| o.end_clk < s).count());
            assert!(guaranteed >= self.applied[t], "crash points go forwards");
            for op in &ops[self.applied[t]..guaranteed] {
                apply(&mut self.required, op, &run.cfg);
            }
            self.applied[t] = guaranteed;
            maybe.extend(
                ops[guaranteed..]
                    .iter()
                    .filter(|o| o.start_io <= at && o.kind != Kind::Flush),
            );
        }
        maybe
    }
}

/// The first byte of `got` the model does not allow.
pub fn model_mismatch(got: &[u8], model: &Model, maybe: &[&Op], cfg: &Config) -> Option<String> {
    // Sweep the guest bytes with the set of later requests covering each.
    let mut later: Vec<(std::ops::Range<u64>, &Op)> = maybe
        .iter()
        .map(|&op| (changed(op, cfg), op))
        .filter(|(r, _)| !r.is_empty())
        .collect();
    later.sort_by_key(|(r, _)| r.start);
    let mut next = 0;
    let mut active: Vec<(std::ops::Range<u64>, &Op)> = Vec::new();
    const CHUNK: usize = 4096;
    let chunks = got.chunks(CHUNK).zip(model.required.chunks(CHUNK));
    let bytes = chunks
        .enumerate()
        // Equal chunks (the common case) are skipped with one comparison.
        .filter(|(_, (g, w))| g != w)
        .flat_map(|(k, (g, w))| {
            g.iter()
                .zip(w)
                .enumerate()
                .map(move |(j, (&g, &w))| (k * CHUNK + j, g, w))
        });
    for (b, g, want) in bytes {
        if g == want {
            continue;
        }
        let b = b as u64;
        while next < later.len() && later[next].0.start <= b {
            active.push(later[next].clone());
            next += 1;
        }
        active.retain(|(r, _)| r.end > b);
        if active.iter().any(|(_, op)| value(op, cfg, b) == Some(g)) {
            continue;
        }
        let covering: Vec<String> = active
            .iter()
            .filter_map(|(_, op)| {
                value(op, cfg, b).map(|v| format!("op {} {:?}={v:#x}", op.id, op.kind))
            })
            .collect();
        return Some(format!(
            "guest byte {b:#x} is {g:#x}; flushed value {want:#x}, later writes {covering:?}"
        ));
    }
    None
}
