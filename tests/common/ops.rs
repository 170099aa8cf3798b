//! Deterministic qemu-io command scripts and read ranges.

use crate::prng::Prng;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Parameters of a seeded mixed qemu-io workload (see [`OpMix::script`]).
///
/// Construct with [`OpMix::new`] and adjust fields with struct-update syntax.
#[derive(Clone, Debug)]
pub struct OpMix {
    /// PRNG seed; the same parameters always give the same script.
    pub seed: u64,
    /// Virtual size of the image the script is meant for.
    pub size: u64,
    /// Cluster size of the image (drives alignment and lengths).
    pub cluster: u64,
    /// Number of commands to generate (the first few are fixed edge cases).
    pub ops: usize,
    /// Pattern byte of the first write; each further write uses the next
    /// value (0x00 is skipped so that written data is never zero).
    pub first_pattern: u8,
    /// Emit `write -z` and `write -z -u`.
    pub zero_writes: bool,
    /// Emit `discard`.
    pub discards: bool,
    /// Extended L2 image: also emit writes/zeroes/discards at subcluster
    /// (`cluster/32`) granularity, including writes smaller than a subcluster.
    pub subclusters: bool,
    /// Bytes per L2 entry (8 standard, 16 extended): used to place one write
    /// across an L2-table boundary when the disk is large enough.
    pub l2_entry_bytes: u64,
    /// Restrict all commands to `[lo, hi)` (default: the whole disk).
    pub window: Option<(u64, u64)>,
    /// Largest length of a single command (default: 4 clusters, at least
    /// 16 KiB, at most 4 MiB).
    pub max_len: Option<u64>,
}

impl OpMix {
    /// 40 commands over the whole disk, writes + zero writes + discards,
    /// standard L2 entries, patterns from 0x01.
    pub fn new(seed: u64, size: u64, cluster: u64) -> Self {
        OpMix {
            seed,
            size,
            cluster,
            ops: 40,
            first_pattern: 0x01,
            zero_writes: true,
            discards: true,
            subclusters: false,
            l2_entry_bytes: 8,
            window: None,
            max_len: None,
        }
    }

    /// Generates the qemu-io commands (`write -P 0xNN OFF LEN`,
    /// `write -z OFF LEN`, `write -z -u OFF LEN`, `discard OFF LEN`).
    ///
    /// Always included first: a write ending exactly at the end of the window
    /// (the disk end by default), an unaligned write across a cluster
    /// boundary, a write across an L2-table boundary (if the window spans
    /// one), and a single 512-byte sector. Zero writes and discards hit
    /// previously written clusters about half the time, so allocated clusters
    /// become zero/unallocated ones.
    pub fn script(&self) -> Vec<String> {
        Gen::new(self).run()
    }
}

struct Gen<'a> {
    m: &'a OpMix,
    r: Prng,
    lo: u64,
    hi: u64,
    max_len: u64,
    pat: u8,
    written: Vec<(u64, u64)>,
    out: Vec<String>,
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

impl<'a> Gen<'a> {
    fn new(m: &'a OpMix) -> Self {
        let (lo, hi) = m.window.unwrap_or((0, m.size));
        assert!(
            lo < hi && hi <= m.size,
            "bad window {lo}..{hi} for size {}",
            m.size
        );
        let max_len = m
            .max_len
            .unwrap_or_else(|| (4 * m.cluster).clamp(16 * KIB, 4 * MIB))
            .min(hi - lo)
            .max(1);
        Gen {
            m,
            r: Prng::new(m.seed),
            lo,
            hi,
            max_len,
            pat: m.first_pattern,
            written: Vec::new(),
            out: Vec::new(),
        }
    }

    fn next_pattern(&mut self) -> u8 {
        if self.pat == 0 {
            self.pat = 1;
        }
        let p = self.pat;
        self.pat = self.pat.wrapping_add(1);
        p
    }

    /// Clips `[off, off+len)` into the window; None if nothing is left.
    fn clip(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        let off = off.clamp(self.lo, self.hi - 1);
        let end = off.saturating_add(len.max(1)).min(self.hi);
        (end > off).then_some((off, end - off))
    }

    fn write(&mut self, off: u64, len: u64) {
        if let Some((o, l)) = self.clip(off, len) {
            let p = self.next_pattern();
            self.written.push((o, l));
            self.out.push(format!("write -P 0x{p:02x} {o} {l}"));
        }
    }

    fn zero(&mut self, off: u64, len: u64, unmap: bool) {
        if !self.m.zero_writes {
            return self.write(off, len);
        }
        if let Some((o, l)) = self.clip(off, len) {
            let u = if unmap { " -u" } else { "" };
            self.out.push(format!("write -z{u} {o} {l}"));
        }
    }

    fn discard(&mut self, off: u64, len: u64) {
        if !self.m.discards {
            return self.write(off, len);
        }
        if let Some((o, l)) = self.clip(off, len) {
            self.out.push(format!("discard {o} {l}"));
        }
    }

    fn rand_off(&mut self) -> u64 {
        self.r.range(self.lo, self.hi - 1)
    }

    /// A range covering whole clusters of some earlier write (or a random
    /// aligned one), to turn allocated clusters into zero/unallocated ones.
    fn target_clusters(&mut self) -> (u64, u64) {
        let c = self.m.cluster;
        let n = self.r.range(1, 2);
        if !self.written.is_empty() && self.r.chance(60) {
            let (o, l) = *self.r.pick(&self.written);
            let start = align_down(o + self.r.below(l), c).max(align_down(self.lo, c));
            (start.max(self.lo), n * c)
        } else {
            let start = align_down(self.rand_off(), c);
            (start.max(self.lo), n * c)
        }
    }

    fn rand_len(&mut self) -> u64 {
        if self.r.chance(20) {
            self.r.range(1, 511.min(self.max_len))
        } else {
            self.r.range(512.min(self.max_len), self.max_len)
        }
    }

    fn run(mut self) -> Vec<String> {
        let c = self.m.cluster;
        let (lo, hi) = (self.lo, self.hi);
        // 1. The very end of the window, unaligned length.
        let len = self.r.range(1, self.max_len.min(c + 1000));
        self.write(hi - len.min(hi - lo), len);
        // 2. Unaligned write across a cluster boundary.
        let first_b = align_down(lo, c) + c;
        if first_b < hi {
            let last_b = align_down(hi - 1, c);
            let b = first_b + align_down(self.r.below(last_b - first_b + 1), c);
            let before = self
                .r
                .range(1, (c - 1).min(self.max_len.saturating_sub(1)).max(1));
            let after = self.r.range(1, c.min(self.max_len));
            self.write(b - before, before + after);
        }
        // 3. Across an L2-table boundary.
        let span = c * (c / self.m.l2_entry_bytes);
        let first_l2 = (lo / span + 1) * span;
        if first_l2 < hi {
            let k = self.r.range(first_l2 / span, (hi - 1) / span);
            let b = k * span;
            let before = c + self.r.below(c) + 1;
            let after = c + self.r.below(c) + 1;
            self.write(b.saturating_sub(before).max(lo), before + after);
        }
        // 4. One 512-byte sector.
        let o = align_down(self.rand_off(), 512).max(lo);
        self.write(o, 512);

        while self.out.len() < self.m.ops {
            if self.m.subclusters && self.r.chance(40) {
                self.subcluster_op();
                continue;
            }
            match self.r.below(100) {
                0..=19 => {
                    let o = align_down(self.rand_off(), c);
                    let n = self.r.range(1, (self.max_len / c).clamp(1, 4));
                    self.write(o, n * c);
                }
                20..=44 => {
                    let o = self.rand_off();
                    let l = self.rand_len();
                    self.write(o, l);
                }
                45..=54 => {
                    let o = align_down(self.rand_off(), 512);
                    let l = 512 * self.r.range(1, (self.max_len / 512).max(1));
                    self.write(o, l);
                }
                55..=66 => {
                    let (o, l) = if self.r.chance(65) {
                        self.target_clusters()
                    } else {
                        (self.rand_off(), self.rand_len())
                    };
                    self.zero(o, l, false);
                }
                67..=74 => {
                    let (o, l) = if self.r.chance(65) {
                        self.target_clusters()
                    } else {
                        (self.rand_off(), self.rand_len())
                    };
                    self.zero(o, l, true);
                }
                75..=86 => {
                    let (o, l) = if self.r.chance(65) {
                        self.target_clusters()
                    } else {
                        (self.rand_off(), self.rand_len())
                    };
                    self.discard(o, l);
                }
                _ => {
                    // Partial, unaligned rewrite of earlier data (COW paths).
                    if let Some(&(o, l)) =
                        (!self.written.is_empty()).then(|| self.r.pick(&self.written))
                    {
                        let start = o + self.r.below(l);
                        let len = self.r.range(1, self.max_len.min(c));
                        self.write(start, len);
                    }
                }
            }
        }
        self.out
    }

    fn subcluster_op(&mut self) {
        let c = self.m.cluster;
        let sc = c / 32;
        let o = self.rand_off();
        match self.r.below(5) {
            // Smaller than one subcluster, unaligned, inside it.
            0 => {
                let base = align_down(o, sc);
                let start = base + self.r.below(sc - 1);
                let len = self.r.range(1, base + sc - start);
                self.write(start, len);
            }
            // A run of whole subclusters.
            1 => {
                let n = self.r.range(1, 8);
                self.write(align_down(o, sc), n * sc);
            }
            // Unaligned, spanning a few subclusters.
            2 => {
                let len = self.r.range(sc / 2, 3 * sc);
                self.write(o, len);
            }
            3 => {
                let n = self.r.range(1, 6);
                let unmap = self.r.chance(50);
                self.zero(align_down(o, sc), n * sc, unmap);
            }
            _ => {
                let n = self.r.range(1, 6);
                self.discard(align_down(o, sc), n * sc);
            }
        }
    }
}

/// Deterministic read ranges `(offset, length)` over a disk of `size` bytes,
/// each `1 <= length <= max_len` and `offset + length <= size`.
///
/// The first ranges are fixed edge cases: one ending exactly at the end of
/// the disk, the very last byte, and the start of the disk. The rest mix
/// fully random (unaligned) ranges, ranges straddling 512 B / 4 KiB /
/// 64 KiB / 2 MiB boundaries, 512-aligned ones, 64 KiB-aligned ones and
/// ranges near the end of the disk.
pub fn random_ranges(seed: u64, size: u64, n: usize, max_len: u64) -> Vec<(u64, u64)> {
    assert!(size > 0, "random_ranges on an empty disk");
    let max_len = max_len.clamp(1, size);
    let mut r = Prng::new(seed ^ 0x05EE_D0F4_A9E5);
    let mut out = Vec::with_capacity(n);
    let fit = |off: u64, len: u64| -> (u64, u64) {
        let len = len.clamp(1, max_len);
        let off = off.min(size - len);
        (off, len)
    };
    for i in 0..n {
        let range = match i {
            0 => {
                let len = r.range(1, max_len);
                (size - len, len)
            }
            1 => (size - 1, 1),
            2 => (0, r.range(1, max_len)),
            _ => match r.below(6) {
                0 => fit(r.below(size), r.range(1, max_len)),
                1 | 2 => {
                    let g = *r.pick(&[512u64, 4 * KIB, 64 * KIB, 2 * MIB]);
                    if max_len < 2 || size <= g {
                        fit(r.below(size), r.range(1, max_len))
                    } else {
                        let b = g * r.range(1, (size - 1) / g);
                        let before = r.range(1, max_len - 1).min(b);
                        let after = r.range(1, max_len - before);
                        fit(b - before, before + after)
                    }
                }
                3 => {
                    let len = 512 * r.range(1, (max_len / 512).max(1));
                    fit(align_down(r.below(size), 512), len)
                }
                4 => {
                    let len = 4 * KIB * r.range(1, (max_len / (4 * KIB)).max(1));
                    fit(align_down(r.below(size), 64 * KIB), len)
                }
                _ => {
                    let len = r.range(1, max_len);
                    let back = r.range(len, (2 * max_len).min(size));
                    fit(size - back, len)
                }
            },
        };
        debug_assert!(range.1 >= 1 && range.0 + range.1 <= size);
        out.push(range);
    }
    out
}
