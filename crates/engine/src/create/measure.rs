//! Measuring a new image before it exists (`qemu-img measure`): the file size an image with
//! given [`CreateOptions`] needs, for a virtual size or for the contents of an existing image.
//!
//! The arithmetic is QEMU 10's (`qcow2_measure`, `qcow2_calc_prealloc_size`,
//! `qcow2_refcount_metadata_size`, `qcow2_get_persistent_dirty_bitmap_size`, `raw_measure`),
//! so the figures are qemu-img's to the byte. Like QEMU's they are upper bounds: `required`
//! counts the metadata of a fully allocated image even when little data is measured.

use super::*;
use qcow2_alloc::refcount_metadata_blocks;
use qcow2_format::limits;

/// What `qemu-img measure` reports: the file size a new image needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs to hold what was measured: the metadata of a fully
    /// allocated image plus the clusters the measured data occupies.
    pub required: u64,
    /// Bytes the new image takes with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent dirty bitmaps would take in the new image, when both
    /// the source and the new image can hold persistent bitmaps (a version 3 qcow2 source
    /// measured for a version 3 qcow2 image).
    pub bitmaps: Option<u64>,
}

/// The new image of a measurement: its format and, for qcow2, its options.
///
/// Of the options, measuring reads the cluster size, extended L2, the refcount width, the
/// version, the preallocation mode and whether a backing file is named (its format and
/// whether it exists are not looked at, as QEMU does not open it). The size in `opts` is the
/// one measured by [`measure_size`]; [`measure_disk`] takes the source's size instead, but
/// still refuses a size in `opts` whose L1 table would be too large, as qemu-img does.
#[derive(Debug, Clone, Copy)]
pub enum MeasureTarget<'a> {
    /// A raw image (`-O raw`, qemu-img's default).
    Raw,
    /// A qcow2 image created with these options.
    Qcow2(&'a CreateOptions),
}

/// The figures for a new image of `size` bytes with nothing written (`qemu-img measure
/// --size`).
///
/// # Errors
///
/// [`CreateError`] for options QEMU refuses when measuring: the cluster size, a cluster size
/// too small for extended L2, the refcount width (or one other than 16 bits with compat
/// 0.10: [`CreateError::MeasureRefcountBitsNeedV3`]), or a size whose L1 table exceeds 32 MiB ([`CreateError::MeasureTooLarge`]).
pub fn measure_size(target: MeasureTarget<'_>, size: u64) -> Result<Measurement, CreateError> {
    match target {
        MeasureTarget::Raw => {
            let required = size.div_ceil(512).saturating_mul(512);
            Ok(Measurement {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        MeasureTarget::Qcow2(opts) => {
            let geo = Qcow2Measure::new(opts, size)?;
            let virtual_size = geo.round_up(size);
            let prealloc = matches!(
                opts.preallocation,
                Preallocation::Full | Preallocation::Falloc
            );
            Ok(geo.finish(virtual_size, if prealloc { virtual_size } else { 0 }, None))
        }
    }
}

/// The figures for a new image holding `source`'s contents (`qemu-img measure FILENAME`):
/// the clusters that read as data anywhere in its chain count, zeros and holes do not; with a
/// backing file named in the target's options every cluster counts (the new backing file may
/// share nothing with the source).
///
/// # Errors
///
/// As [`measure_size`] for the options; [`Error`] when the source's allocation cannot be
/// read (an I/O error, or metadata the engine refuses).
///
/// # Cancel safety
///
/// Reads the source's metadata only: dropping the future leaves nothing behind.
pub async fn measure_disk<O: Opener>(
    target: MeasureTarget<'_>,
    source: &Disk<O>,
) -> Result<Measurement> {
    // QEMU measures the source's length in whole sectors.
    let source_size = source.size().div_ceil(512) * 512;
    let MeasureTarget::Qcow2(opts) = target else {
        return Ok(Measurement {
            required: source_size,
            fully_allocated: source_size,
            bitmaps: None,
        });
    };
    let geo = Qcow2Measure::new(opts, opts.size.unwrap_or(0))?;
    let virtual_size = geo.round_up(source_size);
    let data = if opts.backing.is_some()
        || matches!(
            opts.preallocation,
            Preallocation::Full | Preallocation::Falloc
        ) {
        virtual_size
    } else {
        geo.data_clusters_bytes(source, source_size).await?
    };
    let bitmaps = match source.as_qcow2() {
        Some(img) if img.header().version >= 3 && opts.compat == Compat::V3 => {
            Some(geo.bitmaps_bytes(&img.bitmaps().await?, source.size()))
        }
        _ => None,
    };
    Ok(geo.finish(virtual_size, data, bitmaps))
}

/// The qcow2 options a measurement uses, validated as `qcow2_measure` validates them.
struct Qcow2Measure {
    cs: u64,
    refcount_order: u32,
    l2_entry: u64,
}

impl Qcow2Measure {
    fn new(opts: &CreateOptions, size: u64) -> Result<Self, CreateError> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two()
            || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cs)
        {
            return Err(CreateError::ClusterSize(cs));
        }
        if opts.extended_l2 && cs < 16 << 10 {
            return Err(CreateError::ExtendedL2ClusterSize(cs));
        }
        let width = opts.width()?;
        if opts.compat == Compat::V2 && opts.refcount_bits != 16 {
            return Err(CreateError::MeasureRefcountBitsNeedV3);
        }
        let geo = Qcow2Measure {
            cs,
            refcount_order: width.order(),
            l2_entry: if opts.extended_l2 { 16 } else { 8 },
        };
        let l2_tables = (geo.round_up(size) / cs).div_ceil(cs / geo.l2_entry);
        if l2_tables.saturating_mul(8) > limits::MAX_L1_BYTES {
            return Err(CreateError::MeasureTooLarge);
        }
        Ok(geo)
    }

    fn round_up(&self, n: u64) -> u64 {
        n.div_ceil(self.cs).saturating_mul(self.cs)
    }

    /// `qcow2_calc_prealloc_size`: header, L2 tables, L1 table, refcount structures and data
    /// of a fully allocated image of `virtual_size` bytes (already rounded to clusters).
    fn fully_allocated(&self, virtual_size: u64) -> u64 {
        let cs = self.cs;
        let mut meta = cs;
        let l2_entries = (virtual_size / cs).next_multiple_of(cs / self.l2_entry);
        meta += l2_entries * self.l2_entry;
        let l1_entries = (l2_entries * self.l2_entry / cs).next_multiple_of(cs / 8);
        meta += l1_entries * 8;
        let clusters = (meta + virtual_size) / cs;
        let blocks = refcount_metadata_blocks(clusters, cs, self.refcount_order, false);
        let table = blocks.div_ceil(cs / 8);
        meta += (blocks + table) * cs;
        meta + virtual_size
    }

    fn finish(&self, virtual_size: u64, data: u64, bitmaps: Option<u64>) -> Measurement {
        let fully_allocated = self.fully_allocated(virtual_size);
        Measurement {
            required: fully_allocated - virtual_size + data,
            fully_allocated,
            bitmaps,
        }
    }

    /// The bytes of the clusters that hold data in `source`'s chain, counted as QEMU counts
    /// them: each run of data is extended to the end of its cluster, and the walk goes on from
    /// there; zeros and unallocated ranges count nothing.
    async fn data_clusters_bytes<O: Opener>(&self, source: &Disk<O>, size: u64) -> Result<u64> {
        let map = source.map(0, size).await?;
        let mut required = 0u64;
        let mut offset = 0u64;
        let mut runs = map.iter().peekable();
        while offset < size {
            while runs.next_if(|r| r.start + r.length <= offset).is_some() {}
            let Some(run) = runs.peek() else { break };
            let end = (run.start + run.length).min(size);
            let mut pnum = end - offset;
            if !run.zero && run.data {
                pnum = self.round_up(offset + pnum) - offset;
                required += offset % self.cs + pnum;
            }
            offset += pnum;
        }
        Ok(required)
    }

    /// `qcow2_get_persistent_dirty_bitmap_size`: every bitmap's data and table, whole
    /// clusters each, and the directory, for a disk of `disk_size` bytes.
    fn bitmaps_bytes(&self, bitmaps: &[qcow2_format::BitmapDirectoryEntry], disk_size: u64) -> u64 {
        let mut bytes = 0u64;
        let mut directory = 0u64;
        for b in bitmaps {
            let bits = disk_size.div_ceil(1u64 << b.granularity_bits);
            let clusters = bits.div_ceil(8).div_ceil(self.cs);
            bytes += clusters * self.cs + self.round_up(clusters * 8);
            directory += (qcow2_format::BitmapDirectoryEntry::FIXED_LEN as u64
                + b.name.len() as u64)
                .next_multiple_of(8);
        }
        bytes + self.round_up(directory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(opts: CreateOptions, size: u64) -> Measurement {
        measure_size(MeasureTarget::Qcow2(&opts), size).unwrap()
    }

    /// Figures printed by qemu-img measure 10.0.2 (Debian qemu-utils) for `-O qcow2 --size`.
    #[test]
    fn empty_images_measure_as_qemu_img_does() {
        let m = qcow2(CreateOptions::new(), 1 << 30);
        assert_eq!((m.required, m.fully_allocated), (393_216, 1_074_135_040));
        let m = qcow2(CreateOptions::new(), 0);
        assert_eq!((m.required, m.fully_allocated), (196_608, 196_608));
        let m = qcow2(CreateOptions::new().extended_l2(true), 1 << 30);
        assert_eq!((m.required, m.fully_allocated), (524_288, 1_074_266_112));
        let m = qcow2(CreateOptions::new().cluster_size(2 << 20), 2 << 40);
        assert_eq!(
            (m.required, m.fully_allocated),
            (18_874_368, 2_199_042_129_920)
        );
        let m = qcow2(
            CreateOptions::new().preallocation(Preallocation::Full),
            3 << 30,
        );
        assert_eq!(
            (m.required, m.fully_allocated),
            (3_221_946_368, 3_221_946_368)
        );
        let raw = measure_size(MeasureTarget::Raw, 1000).unwrap();
        assert_eq!((raw.required, raw.fully_allocated), (1024, 1024));
    }

    #[test]
    fn options_qemu_refuses_are_refused() {
        let too_large = CreateOptions::new().cluster_size(512);
        assert_eq!(
            measure_size(MeasureTarget::Qcow2(&too_large), 100 << 40),
            Err(CreateError::MeasureTooLarge)
        );
        let v2 = CreateOptions::new().compat(Compat::V2).refcount_bits(8);
        assert_eq!(
            measure_size(MeasureTarget::Qcow2(&v2), 1 << 30),
            Err(CreateError::MeasureRefcountBitsNeedV3)
        );
        let odd = CreateOptions::new().cluster_size(1000);
        assert_eq!(
            measure_size(MeasureTarget::Qcow2(&odd), 1 << 30),
            Err(CreateError::ClusterSize(1000))
        );
    }
}
