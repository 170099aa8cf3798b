//! Unit newtypes: guest and host byte offsets, host cluster indices and cluster counts are all
//! `u64` on disk, and confusing them is the classic qcow2 bug. The geometry converts between them.

use crate::FormatError;

/// A byte offset in the guest's view of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file (or the external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// The index of a host cluster: `host offset >> cluster_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostCluster(pub u64);

/// A number of clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterCount(pub u64);

impl std::fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest offset {:#x}", self.0)
    }
}

impl std::fmt::Display for HostOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host offset {:#x}", self.0)
    }
}

impl std::fmt::Display for HostCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host cluster {}", self.0)
    }
}

/// Smallest cluster size the format allows (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Subclusters per cluster in an extended-L2 image.
pub const SUBCLUSTERS: u32 = 32;

/// The cluster geometry of an image: cluster size and L2 entry format, and every address
/// computation that follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterGeometry {
    cluster_bits: u32,
    extended_l2: bool,
}

impl ClusterGeometry {
    /// A geometry, checked against the format's limits (9..=21 bits; extended L2 needs >= 14).
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Result<Self, FormatError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::ClusterBits(cluster_bits));
        }
        if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(FormatError::ExtendedL2ClusterTooSmall(cluster_bits));
        }
        Ok(Self {
            cluster_bits,
            extended_l2,
        })
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Whether L2 entries are 128-bit extended entries with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Size of one L2 entry in bytes (8, or 16 for extended entries).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Bytes of guest address space one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    /// Subclusters per cluster: 32 with extended L2, else 1.
    pub fn subclusters(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS
        } else {
            1
        }
    }

    /// Size of one subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }

    /// Index of the L1 entry that maps `off`.
    pub fn l1_index(&self, off: GuestOffset) -> u64 {
        off.0 >> (self.cluster_bits + self.l2_bits())
    }

    /// Index, inside its L2 table, of the entry that maps `off`.
    pub fn l2_index(&self, off: GuestOffset) -> usize {
        ((off.0 >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }

    /// The guest cluster number of `off`.
    pub fn guest_cluster(&self, off: GuestOffset) -> u64 {
        off.0 >> self.cluster_bits
    }

    /// Offset of `off` inside its cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// The first byte of the cluster that contains `off` (`off` rounded down to a cluster).
    pub fn cluster_start(&self, off: u64) -> u64 {
        off - self.offset_in_cluster(off)
    }

    /// Whether `off` is a multiple of the cluster size.
    pub fn is_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }

    /// The host cluster that contains `off`.
    pub fn host_cluster(&self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }

    /// The first byte of host cluster `c`.
    pub fn cluster_offset(&self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }

    /// Clusters needed to hold `bytes` bytes (rounded up).
    pub fn clusters_for(&self, bytes: u64) -> ClusterCount {
        ClusterCount(bytes.div_ceil(self.cluster_size()))
    }

    /// Minimum number of L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }
}
