//! The image as the guest sees it, and what each request does to it.

use super::{pattern, G};
use std::ops::Range;

/// The image as seen by the guest, with what each request does to it.
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
    pub cluster: u64,
}

impl Model {
    /// The bytes `g` changes and what it leaves there.
    pub fn effect(&self, g: G, id: usize) -> Option<(Range<u64>, Option<usize>)> {
        let size = self.bytes.len() as u64;
        match g {
            G::Write(off, len) => Some((off..off + len, Some(id))),
            G::Zero(off, len, _) => Some((off..off + len, None)),
            G::Discard(off, len) => {
                let cs = self.cluster;
                let end = off + len;
                let first = off.div_ceil(cs) * cs;
                let last = if end == size { end } else { end / cs * cs };
                (first < last).then_some((first..last, None))
            }
            _ => None,
        }
    }

    pub fn apply(&mut self, g: G, id: usize) {
        if let Some((r, w)) = self.effect(g, id) {
            for b in r {
                self.bytes[b as usize] = w.map_or(0, |id| pattern(id, b));
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
                .map(|(_, w)| w.map_or(0, |id| pattern(id, b)));
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
