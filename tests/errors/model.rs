//! The image as the guest sees it, and what each request does to it.

use super::{pattern, G};
use std::collections::BTreeMap;
use std::ops::Range;
use std::rc::Rc;

/// The image as seen by the guest, with what each request does to it.
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
    pub cluster: u64,
    /// The guest view each internal snapshot holds, by the number in its name.
    pub snapshots: BTreeMap<u8, Rc<Vec<u8>>>,
}

/// What a request leaves in the bytes it changes.
#[derive(Clone)]
pub enum New {
    /// The pattern of request `id`.
    Pattern(usize),
    Zero,
    /// A snapshot's bytes (an applied snapshot).
    Snapshot(Rc<Vec<u8>>),
}

impl New {
    pub fn at(&self, b: u64) -> u8 {
        match self {
            New::Pattern(id) => pattern(*id, b),
            New::Zero => 0,
            New::Snapshot(s) => s.get(b as usize).copied().unwrap_or(0),
        }
    }
}

impl Model {
    pub fn new(bytes: Vec<u8>, cluster: u64) -> Model {
        Model {
            bytes,
            cluster,
            snapshots: BTreeMap::new(),
        }
    }

    /// The bytes `g` changes and what it leaves there.
    pub fn effect(&self, g: G, id: usize) -> Option<(Range<u64>, New)> {
        let size = self.bytes.len() as u64;
        match g {
            G::Write(off, len) | G::Compressed(off, len) => {
                Some((off..off + len, New::Pattern(id)))
            }
            G::Zero(off, len, _) => Some((off..off + len, New::Zero)),
            G::Discard(off, len) => {
                let cs = self.cluster;
                let end = off + len;
                let first = off.div_ceil(cs) * cs;
                let last = if end == size { end } else { end / cs * cs };
                (first < last).then_some((first..last, New::Zero))
            }
            G::SnapApply(n) => Some((0..size, New::Snapshot(self.snapshots[&n].clone()))),
            // A shrink discards what it cuts before the size changes (as QEMU's does): if it
            // fails in between, the old size reads zeros there.
            G::Resize(new) if new < size => Some((new..size, New::Zero)),
            _ => None,
        }
    }

    pub fn apply(&mut self, g: G, id: usize) {
        match g {
            G::SnapCreate(n) => {
                self.snapshots.insert(n, Rc::new(self.bytes.clone()));
            }
            G::SnapDelete(n) => {
                self.snapshots.remove(&n);
            }
            G::SnapApply(n) => self.bytes = self.snapshots[&n].to_vec(),
            G::Resize(size) => self.bytes.resize(size as usize, 0),
            _ => {
                if let Some((r, new)) = self.effect(g, id) {
                    for b in r {
                        self.bytes[b as usize] = new.at(b);
                    }
                }
            }
        }
    }

    /// Whether `got` (the guest bytes of `range`) shows each byte either as the model has it
    /// or as `g` would leave it.
    pub fn old_or_new(&self, got: &[u8], range: Range<u64>, g: G, id: usize) -> Result<(), String> {
        let eff = self.effect(g, id);
        for (b, &v) in range.clone().zip(got) {
            let old = self.bytes[b as usize];
            let new = eff
                .as_ref()
                .filter(|(r, _)| r.contains(&b))
                .map(|(_, w)| w.at(b));
            if v != old && Some(v) != new {
                return Err(format!(
                    "guest byte {b:#x} is {v:#x}: neither the old {old:#x} nor the new {new:?}"
                ));
            }
        }
        Ok(())
    }

    pub fn diff(&self, got: &[u8]) -> Option<String> {
        if got == &self.bytes[..] {
            return None;
        }
        if got.len() != self.bytes.len() {
            return Some(format!(
                "{} guest bytes, the model has {}",
                got.len(),
                self.bytes.len()
            ));
        }
        // Find the first difference chunk by chunk (memcmp), then byte by byte.
        let chunk = got
            .chunks(4096)
            .zip(self.bytes.chunks(4096))
            .position(|(a, b)| a != b)?;
        let b = chunk * 4096
            + got[chunk * 4096..]
                .iter()
                .zip(&self.bytes[chunk * 4096..])
                .position(|(a, b)| a != b)?;
        Some(format!(
            "guest byte {b:#x} is {:#x}, the model says {:#x}",
            got[b], self.bytes[b]
        ))
    }
}
