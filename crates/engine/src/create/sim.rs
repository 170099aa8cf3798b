//! The allocator model: QEMU 10's creation sequence (`qcow2_co_create`, `qcow2_co_truncate`,
//! `preallocate_co`, the cluster allocator, refcount block and table growth) replayed on
//! refcounts kept as sets of allocated cluster ranges, so that the layout written is QEMU's to
//! the byte.

use super::*;
use qcow2_alloc::refcount_metadata_blocks;

// ---------------------------------------------------------------------------------------
// The allocator model.
// ---------------------------------------------------------------------------------------

/// QEMU's `INV_OFFSET`.
pub(super) const INV: u64 = u64::MAX;
/// `QCOW_MAX_L1_SIZE`.
pub(super) const MAX_L1_SIZE: u64 = 32 << 20;
/// `QCOW_MAX_REFTABLE_SIZE` (QEMU compares entry counts against it).
pub(super) const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// `QCOW_MAX_CLUSTER_OFFSET`.
pub(super) const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// `BDRV_REQUEST_MAX_BYTES`.
pub(super) const REQUEST_MAX_BYTES: u64 = 0x7FFF_FE00;
/// `INT_MAX`.
pub(super) const INT_MAX: u64 = 0x7FFF_FFFF;

/// Why a modelled QEMU operation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SimErr {
    /// `-EAGAIN`: a refcount block was allocated; the caller restarts its search.
    Again,
    /// `-EFBIG`.
    TooLarge,
    /// A state QEMU would assert against (never expected).
    Bug(&'static str),
}

pub(super) type SimResult<T> = std::result::Result<T, SimErr>;

/// Disjoint, merged ranges of cluster indices `[start, end)`: the clusters whose refcount
/// is 1 (during creation a refcount is only ever 0 or 1).
#[derive(Debug, Default)]
pub(super) struct Ranges(pub(super) BTreeMap<u64, u64>);

impl Ranges {
    pub(super) fn contains(&self, c: u64) -> bool {
        self.0.range(..=c).next_back().is_some_and(|(_, &e)| e > c)
    }

    /// The first used cluster in `[a, b)` and the end of its run.
    pub(super) fn first_in(&self, a: u64, b: u64) -> Option<(u64, u64)> {
        if let Some((_, &e)) = self.0.range(..=a).next_back() {
            if e > a {
                return Some((a, e));
            }
        }
        self.0
            .range(a..b)
            .next()
            .map(|(&s, &e)| (s, e))
            .filter(|&(s, _)| s < b)
    }

    /// Whether every cluster of `[a, b)` is used.
    pub(super) fn covers(&self, a: u64, b: u64) -> bool {
        self.0.range(..=a).next_back().is_some_and(|(_, &e)| e >= b)
    }

    pub(super) fn insert(&mut self, mut a: u64, mut b: u64) {
        if a >= b {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
                self.0.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.0.range(a..=b).next() {
            b = b.max(e);
            self.0.remove(&s);
        }
        self.0.insert(a, b);
    }

    pub(super) fn remove(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..a).next_back() {
            if e > a {
                self.0.insert(s, a);
                if e > b {
                    self.0.insert(b, e);
                }
            }
        }
        let inside: Vec<(u64, u64)> = self.0.range(a..b).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            if e > b {
                self.0.insert(b, e);
            }
        }
    }

    /// The highest used cluster below `n`.
    pub(super) fn last_below(&self, n: u64) -> Option<u64> {
        self.0.range(..n).next_back().map(|(_, &e)| e.min(n) - 1)
    }

    /// The used runs clipped to `[a, b)`.
    pub(super) fn runs_in(&self, a: u64, b: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .0
            .range(..a)
            .next_back()
            .filter(|(_, &e)| e > a)
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(self.0.range(a..b).map(|(&s, &e)| (s, e)))
            .map(move |(s, e)| (s.max(a), e.min(b)))
    }
}

/// An L2 table of the model: where it is and the runs of entries that are set
/// (`index, count, host offset of the first`; every entry is `host | COPIED`, subcluster
/// bitmap 0, as QEMU's preallocation leaves them).
#[derive(Debug)]
pub(super) struct L2Plan {
    pub(super) offset: u64,
    pub(super) runs: Vec<(u64, u64, u64)>,
}

/// One `QCowL2Meta`: `n` clusters from guest `guest` mapped to host `host` onwards; the
/// request ends `end` bytes after `guest` (QEMU copies-on-write from there to the end of the
/// subcluster, writing zeros at creation, when there is no backing file yet).
#[derive(Debug, Clone, Copy)]
pub(super) struct L2Link {
    pub(super) guest: u64,
    pub(super) host: u64,
    pub(super) n: u64,
    pub(super) end: u64,
}

/// The preallocated areas truncation decided on, beyond the metadata.
pub(super) struct TruncateOutcome {
    pub(super) data_area: Option<(u64, u64)>,
    pub(super) data_file_area: Option<(u64, u64)>,
}

/// The model of QEMU's qcow2 state during creation (`BDRVQcow2State`, reduced to what
/// creation touches).
#[derive(Debug)]
pub(super) struct Sim {
    pub(super) bits: u32,
    pub(super) cs: u64,
    pub(super) width: RefcountWidth,
    /// `refcount_block_bits`.
    pub(super) rb_bits: u32,
    /// Entries per L2 table.
    pub(super) l2_entries: u64,
    pub(super) l2_bits: u32,
    pub(super) extended_l2: bool,
    pub(super) has_data_file: bool,
    pub(super) reftable: Vec<u64>,
    pub(super) reftable_offset: u64,
    pub(super) max_reftable_index: u64,
    pub(super) used: Ranges,
    pub(super) free_cluster_index: u64,
    pub(super) l1: Vec<u64>,
    pub(super) l1_offset: u64,
    pub(super) l2: BTreeMap<u64, L2Plan>,
    /// Length of the image file as QEMU's writes and truncations leave it.
    pub(super) file_len: u64,
    /// Superseded structures still in the file (old refcount tables), oldest first.
    pub(super) stale: Vec<(u64, Vec<u8>)>,
    /// Length of the external data file.
    pub(super) data_file_len: u64,
    /// Zeros written by copy-on-write: (in the data file?, offset, length).
    pub(super) zero_writes: Vec<(bool, u64, u64)>,
}

impl Sim {
    /// The state right after `qcow2_co_create` wrote its minimal image (header, one-cluster
    /// refcount table pointing at an empty refcount block in cluster 2) and reopened it.
    pub(super) fn new(
        bits: u32,
        width: RefcountWidth,
        extended_l2: bool,
        has_data_file: bool,
    ) -> Sim {
        let cs = 1u64 << bits;
        let l2_bits = bits - if extended_l2 { 4 } else { 3 };
        let mut reftable = vec![0u64; (cs / 8) as usize];
        reftable[0] = 2 * cs;
        Sim {
            bits,
            cs,
            width,
            rb_bits: bits + 3 - width.order(),
            l2_entries: 1 << l2_bits,
            l2_bits,
            extended_l2,
            has_data_file,
            reftable,
            reftable_offset: cs,
            max_reftable_index: 0,
            used: Ranges::default(),
            free_cluster_index: 0,
            l1: Vec::new(),
            l1_offset: 0,
            l2: BTreeMap::new(),
            file_len: 3 * cs,
            stale: Vec::new(),
            data_file_len: 0,
            zero_writes: Vec::new(),
        }
    }

    pub(super) fn rb_size(&self) -> u64 {
        1 << self.rb_bits
    }

    pub(super) fn written(&mut self, offset: u64, len: u64) {
        self.file_len = self.file_len.max(offset + len);
    }

    /// `qcow2_co_create` from the reopen on, and `qcow2_co_truncate(size, prealloc)`.
    pub(super) fn create_and_truncate(
        &mut self,
        size: u64,
        mode: Preallocation,
    ) -> SimResult<TruncateOutcome> {
        // qcow2_alloc_clusters(3 clusters): header, refcount table, refcount block.
        let off = self.alloc_clusters(3 * self.cs)?;
        if off != 0 {
            return Err(SimErr::Bug("first cluster already in use"));
        }
        let l1_size = size.div_ceil(1u64 << (self.bits + self.l2_bits));
        self.grow_l1(l1_size)?;
        let mut out = TruncateOutcome {
            data_area: None,
            data_file_area: None,
        };
        match mode {
            Preallocation::Off => {
                if self.has_data_file {
                    self.data_file_len = size;
                }
            }
            Preallocation::Metadata => self.preallocate(size, mode, &mut out)?,
            Preallocation::Falloc | Preallocation::Full if self.has_data_file => {
                self.preallocate(size, mode, &mut out)?
            }
            Preallocation::Falloc | Preallocation::Full => {
                let file_size = self.file_len;
                let last = self
                    .used
                    .last_below(file_size.div_ceil(self.cs))
                    .ok_or(SimErr::Bug("no references in the refcount table"))?;
                let old_file_size = (last + 1) * self.cs;
                let nb_data = size.div_ceil(self.cs);
                let nb_l2 = nb_data.div_ceil(self.l2_entries) + 1;
                let start = self.refcount_area(old_file_size, nb_data + nb_l2, true, 0, 0)?;
                let got = self.alloc_clusters_at(start, nb_data)?;
                if got != nb_data {
                    return Err(SimErr::Bug("data clusters not allocated"));
                }
                let end = start + nb_data * self.cs;
                self.file_len = self.file_len.max(end);
                out.data_area = Some((start, end));
                let (mut guest, mut host, mut left) = (0u64, start, nb_data);
                while left > 0 {
                    let index = (guest >> self.bits) & (self.l2_entries - 1);
                    let n = left.min(self.l2_entries - index);
                    self.link_l2(L2Link {
                        guest,
                        host,
                        n,
                        end: n * self.cs,
                    })?;
                    guest += n * self.cs;
                    host += n * self.cs;
                    left -= n;
                }
            }
        }
        Ok(out)
    }

    /// `preallocate_co(0, size)`: allocate L2 tables and data clusters in guest order, then
    /// extend the file holding the data (with `mode`'s preallocation) to cover them.
    pub(super) fn preallocate(
        &mut self,
        size: u64,
        mode: Preallocation,
        out: &mut TruncateOutcome,
    ) -> SimResult<()> {
        let chunk = INT_MAX & !(self.cs - 1);
        let (mut offset, mut bytes) = (0u64, size);
        let (mut host, mut cur) = (0u64, 0u64);
        while bytes > 0 {
            cur = bytes.min(chunk);
            let (h, done, metas) = self.alloc_host_offset(offset, cur)?;
            host = h;
            cur = done;
            for m in metas {
                self.link_l2(m)?;
            }
            bytes -= cur;
            offset += cur;
        }
        if size == 0 {
            return Ok(());
        }
        let end = host + cur;
        if self.has_data_file {
            if end > self.data_file_len {
                if mode != Preallocation::Metadata {
                    out.data_file_area = Some((self.data_file_len, end));
                }
                self.data_file_len = end;
            }
        } else if end > self.file_len {
            self.file_len = end;
        }
        Ok(())
    }

    /// `qcow2_alloc_host_offset`: returns the host offset, the bytes covered, and the L2
    /// updates to make.
    pub(super) fn alloc_host_offset(
        &mut self,
        offset: u64,
        bytes: u64,
    ) -> SimResult<(u64, u64, Vec<L2Link>)> {
        let (mut start, mut remaining) = (offset, bytes);
        let mut cluster_offset = INV;
        let mut host = INV;
        let mut cur = 0u64;
        let mut metas = Vec::new();
        loop {
            if host == INV && cluster_offset != INV {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if cluster_offset != INV {
                cluster_offset += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            // handle_copied: loads (allocating) the L2 table; nothing is allocated yet.
            self.get_cluster_table(start)?;
            // handle_alloc
            if !self.handle_alloc(start, &mut cluster_offset, &mut cur, &mut metas)? {
                break;
            }
        }
        let done = bytes - remaining;
        if done == 0 || host == INV {
            return Err(SimErr::Bug("nothing allocated"));
        }
        Ok((host, done, metas))
    }

    /// `handle_alloc`: false when the contiguous allocation cannot be extended.
    pub(super) fn handle_alloc(
        &mut self,
        guest: u64,
        host: &mut u64,
        bytes: &mut u64,
        metas: &mut Vec<L2Link>,
    ) -> SimResult<bool> {
        let cs = self.cs;
        let oic = guest & (cs - 1);
        let index = (guest >> self.bits) & (self.l2_entries - 1);
        let mut nb = (oic + *bytes).div_ceil(cs);
        nb = nb.min(self.l2_entries - index);
        nb = nb.min(REQUEST_MAX_BYTES >> self.bits);
        self.get_cluster_table(guest)?;
        let mut alloc = if *host == INV { INV } else { *host & !(cs - 1) };
        if self.has_data_file {
            alloc = guest & !(cs - 1);
        } else if alloc == INV {
            alloc = self.alloc_clusters(nb * cs)?;
        } else {
            nb = self.alloc_clusters_at(alloc, nb)?;
        }
        if nb == 0 {
            *bytes = 0;
            return Ok(false);
        }
        let requested = *bytes + oic;
        let avail = nb << self.bits;
        let nb_bytes = requested.min(avail);
        *host = alloc + oic;
        *bytes = (*bytes).min(nb_bytes - oic);
        metas.push(L2Link {
            guest: guest & !(cs - 1),
            host: alloc,
            n: (oic + *bytes).div_ceil(cs),
            end: oic + *bytes,
        });
        Ok(true)
    }

    /// `qcow2_alloc_cluster_link_l2` for a preallocation: entries `host | COPIED`.
    pub(super) fn link_l2(&mut self, m: L2Link) -> SimResult<()> {
        self.get_cluster_table(m.guest)?;
        let l1_index = m.guest >> (self.bits + self.l2_bits);
        let index = (m.guest >> self.bits) & (self.l2_entries - 1);
        if index + m.n > self.l2_entries {
            return Err(SimErr::Bug("L2 update crosses a table"));
        }
        let l2 = self
            .l2
            .get_mut(&l1_index)
            .ok_or(SimErr::Bug("L2 table missing"))?;
        l2.runs.push((index, m.n, m.host));
        // perform_cow: the rest of the last subcluster the request touched.
        let sc = if self.extended_l2 {
            self.cs / 32
        } else {
            self.cs
        };
        let cow_to = m.end.div_ceil(sc) * sc;
        if cow_to > m.end {
            let off = m.host + m.end;
            let len = cow_to - m.end;
            self.zero_writes.push((self.has_data_file, off, len));
            if self.has_data_file {
                self.data_file_len = self.data_file_len.max(off + len);
            } else {
                self.written(off, len);
            }
        }
        Ok(())
    }

    /// `get_cluster_table`: allocates the L2 table for `guest` if there is none.
    pub(super) fn get_cluster_table(&mut self, guest: u64) -> SimResult<()> {
        let l1_index = guest >> (self.bits + self.l2_bits);
        let entry = *self
            .l1
            .get(l1_index as usize)
            .ok_or(SimErr::Bug("L1 index beyond the table"))?;
        if entry & L1Entry::COPIED == 0 {
            self.l2_allocate(l1_index)?;
        }
        Ok(())
    }

    /// `l2_allocate` for an empty L1 entry.
    pub(super) fn l2_allocate(&mut self, l1_index: u64) -> SimResult<()> {
        let off = self.alloc_clusters(self.cs)?;
        if off == 0 {
            return Err(SimErr::Bug("L2 table at offset 0"));
        }
        self.written(off, self.cs);
        self.l2.insert(
            l1_index,
            L2Plan {
                offset: off,
                runs: Vec::new(),
            },
        );
        self.l1[l1_index as usize] = off | L1Entry::COPIED;
        Ok(())
    }

    /// `qcow2_grow_l1_table(min_size, exact_size = true)` from an empty table.
    pub(super) fn grow_l1(&mut self, min_size: u64) -> SimResult<()> {
        if min_size <= self.l1.len() as u64 {
            return Ok(());
        }
        if min_size > INT_MAX / 8 || min_size > MAX_L1_SIZE / 8 {
            return Err(SimErr::TooLarge);
        }
        let bytes = min_size * 8;
        let off = self.alloc_clusters(bytes)?;
        self.written(off, bytes);
        self.l1 = vec![0; min_size as usize];
        self.l1_offset = off;
        Ok(())
    }

    /// `qcow2_get_refcount` (0 or 1 during creation).
    pub(super) fn refcount(&self, c: u64) -> u64 {
        let t = c >> self.rb_bits;
        match self.reftable.get(t as usize) {
            Some(&b) if b != 0 => u64::from(self.used.contains(c)),
            _ => 0,
        }
    }

    /// `alloc_clusters_noref`: the first run of `n` free clusters from the free cursor.
    pub(super) fn alloc_clusters_noref(&mut self, n: u64, max: u64) -> SimResult<u64> {
        let mut p = self.free_cluster_index;
        while let Some((_, run_end)) = self.used.first_in(p, p + n) {
            p = run_end;
        }
        // Refcounts of clusters in unhooked refcount blocks read as 0: the model's `used`
        // set agrees except for a block that describes itself before it is hooked up,
        // which no search can meet.
        self.free_cluster_index = p + n;
        if self.free_cluster_index > 0 && self.free_cluster_index - 1 > (max >> self.bits) {
            return Err(SimErr::TooLarge);
        }
        Ok(p << self.bits)
    }

    /// `qcow2_alloc_clusters(size)`.
    pub(super) fn alloc_clusters(&mut self, size: u64) -> SimResult<u64> {
        loop {
            let n = size.div_ceil(self.cs);
            let off = self.alloc_clusters_noref(n, MAX_CLUSTER_OFFSET)?;
            match self.update_refcount(off, size, false) {
                Ok(()) => return Ok(off),
                Err(SimErr::Again) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// `qcow2_alloc_clusters_at(offset, n)`: how many of the clusters from `offset` could be
    /// allocated (it stops at the first one in use).
    pub(super) fn alloc_clusters_at(&mut self, offset: u64, n: u64) -> SimResult<u64> {
        if n == 0 {
            return Ok(0);
        }
        loop {
            let first = offset >> self.bits;
            let mut i = 0;
            while i < n && self.refcount(first + i) == 0 {
                i += 1;
            }
            match self.update_refcount(offset, i << self.bits, false) {
                Ok(()) => return Ok(i),
                Err(SimErr::Again) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// `update_refcount(offset, length, 1, decrease)`, with QEMU's undo of the clusters
    /// already updated when it fails (including with `Again`).
    pub(super) fn update_refcount(
        &mut self,
        offset: u64,
        length: u64,
        decrease: bool,
    ) -> SimResult<()> {
        if length == 0 {
            return Ok(());
        }
        let start = offset >> self.bits;
        let last = (offset + length - 1) >> self.bits;
        let mut c = start;
        let mut old_table_index = None;
        let res = loop {
            if c > last {
                break Ok(());
            }
            let t = c >> self.rb_bits;
            if old_table_index != Some(t) {
                if let Err(e) = self.alloc_refcount_block(c) {
                    if e == SimErr::Again && self.free_cluster_index > start {
                        self.free_cluster_index = start;
                    }
                    break Err(e);
                }
            }
            old_table_index = Some(t);
            let seg_end = (last + 1).min((t + 1) << self.rb_bits);
            if decrease {
                if !self.used.covers(c, seg_end) {
                    break Err(SimErr::Bug("refcount would drop below zero"));
                }
                self.used.remove(c, seg_end);
                if c < self.free_cluster_index {
                    self.free_cluster_index = c;
                }
            } else {
                if self.used.first_in(c, seg_end).is_some() {
                    break Err(SimErr::Bug("allocating a cluster that is in use"));
                }
                self.used.insert(c, seg_end);
            }
            c = seg_end;
        };
        if res.is_err() && c > start {
            // Undo [offset, c): the clusters this call already changed.
            let _ = self.update_refcount(offset, (c << self.bits) - offset, !decrease);
        }
        res
    }

    /// `alloc_refcount_block(cluster_index)`: Ok when the block exists; otherwise allocates
    /// one (growing the refcount table if needed) and returns `Again`.
    pub(super) fn alloc_refcount_block(&mut self, c: u64) -> SimResult<()> {
        let t = c >> self.rb_bits;
        if let Some(&b) = self.reftable.get(t as usize) {
            if b != 0 {
                return Ok(());
            }
        }
        let new_block = self.alloc_clusters_noref(1, i64::MAX as u64)?;
        if new_block == 0 {
            return Err(SimErr::Bug("refcount block at offset 0"));
        }
        let nb = new_block >> self.bits;
        if nb >> self.rb_bits == t {
            // The block describes itself.
            self.used.insert(nb, nb + 1);
        } else {
            self.update_refcount(new_block, self.cs, false)?;
        }
        self.written(new_block, self.cs);
        if (t as usize) < self.reftable.len() {
            self.reftable[t as usize] = new_block;
            self.max_reftable_index = self.max_reftable_index.max(t);
            return Err(SimErr::Again);
        }
        let blocks_used = (c + 1).max(nb + 1).div_ceil(self.rb_size());
        let meta_offset = blocks_used * self.rb_size() * self.cs;
        self.refcount_area(meta_offset, 0, false, t, new_block)?;
        Err(SimErr::Again)
    }

    /// `qcow2_refcount_area`: new refcount blocks and a new refcount table at `start`
    /// covering everything up to their own end plus `additional` clusters; switches to the
    /// new table and frees the old one. Returns the end of the new structures.
    pub(super) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_index: u64,
        new_offset: u64,
    ) -> SimResult<u64> {
        let cs = self.cs;
        let total =
            refcount_metadata_blocks(start / cs + additional, cs, self.width.order(), !exact);
        if total > MAX_REFTABLE_SIZE {
            return Err(SimErr::TooLarge);
        }
        let area_index = (start / cs) / self.rb_size();
        let mut table_size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        table_size = table_size.div_ceil(cs / 8) * (cs / 8);
        let table_clusters = table_size * 8 / cs;
        if table_size > MAX_REFTABLE_SIZE {
            return Err(SimErr::TooLarge);
        }
        let mut new_table = vec![0u64; table_size as usize];
        let keep = if table_size > self.max_reftable_index {
            self.max_reftable_index + 1
        } else {
            table_size
        } as usize;
        new_table[..keep].copy_from_slice(&self.reftable[..keep]);
        if new_offset != 0 {
            if new_index >= total {
                return Err(SimErr::Bug("new refcount block outside the new table"));
            }
            new_table[new_index as usize] = new_offset;
        }
        let additional_blocks = (area_index..total)
            .filter(|&i| new_table[i as usize] == 0)
            .count() as u64;
        let table_offset = start + additional_blocks * cs;
        let end_offset = table_offset + table_clusters * cs;
        let mut block_offset = start;
        for i in area_index..total {
            if new_table[i as usize] == 0 {
                new_table[i as usize] = block_offset;
                self.written(block_offset, cs);
                block_offset += cs;
            }
            let first = i * self.rb_size() * cs;
            if first < end_offset {
                let j = if first < start {
                    (start - first) / cs
                } else {
                    0
                };
                let end_index = ((end_offset - first) / cs).min(self.rb_size());
                let (a, b) = (first / cs + j, first / cs + end_index);
                if a < b {
                    if self.used.first_in(a, b).is_some() {
                        return Err(SimErr::Bug("refcount area not empty"));
                    }
                    self.used.insert(a, b);
                }
            }
        }
        if block_offset != table_offset {
            return Err(SimErr::Bug("refcount area miscounted"));
        }
        self.written(table_offset, table_size * 8);
        let old_offset = self.reftable_offset;
        let old = std::mem::replace(&mut self.reftable, new_table);
        self.stale.push((
            old_offset,
            old.iter().flat_map(|e| e.to_be_bytes()).collect(),
        ));
        self.reftable_offset = table_offset;
        self.max_reftable_index = self.reftable.iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        self.update_refcount(old_offset, old.len() as u64 * 8, true)?;
        Ok(end_offset)
    }

    /// The bytes of refcount block `index` (its clusters' refcounts, 0 or 1).
    pub(super) fn render_refblock(&self, index: u64, out: &mut [u8]) {
        out.fill(0);
        let (a, b) = (index << self.rb_bits, (index + 1) << self.rb_bits);
        for (s, e) in self.used.runs_in(a, b) {
            for c in s..e {
                // Cannot fail: 1 fits every width.
                let _ = self.width.set(out, c - a, 1);
            }
        }
    }

    /// The bytes of the L2 table for L1 index `l1_index`.
    pub(super) fn render_l2(&self, l1_index: u64, out: &mut [u8]) {
        out.fill(0);
        let geo = qcow2_format::ClusterGeometry::new(self.bits, self.extended_l2)
            .expect("validated geometry");
        if let Some(l2) = self.l2.get(&l1_index) {
            for &(index, n, host) in &l2.runs {
                for i in 0..n {
                    let entry = L2Entry {
                        word: (host + (i << self.bits)) | qcow2_format::L2_COPIED,
                        bitmap: 0,
                    };
                    entry.write(out, &geo, (index + i) as usize);
                }
            }
        }
    }
}
