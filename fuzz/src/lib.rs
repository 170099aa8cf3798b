//! The bodies of the fuzz targets, in a library so that `cargo test` can replay a corpus on
//! the stable toolchain without cargo-fuzz (see docs/FUZZING.md).

use blockio::{
    Allocation, Backend, BufResult, IoBuf, Keep, MemoryBackend, MemoryOpener, OpenOptions, Opener,
};
use qcow2_engine::{Image, ImageOptions};
use qcow2_format::{
    BitmapDirectoryEntry, BitmapTableEntry, ClusterGeometry, CompressedDescriptor, Header,
    HeaderExtension, L1Entry, L2Entry, RefcountWidth, ReftableEntry, Snapshot,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::Path;

/// Where the fuzz input lives in the in-memory file system.
pub const IMAGE: &str = "/fuzz/image.qcow2";

/// Guest bytes read per session at most (keeps executions fast whatever size the header
/// claims).
const READ_BUDGET: u64 = 1 << 20;
/// Largest single read.
const READ_CHUNK: u64 = 64 << 10;

/// The largest single allocation an input may cause: the inputs are under 1 MiB, so nothing
/// legitimate comes near. libFuzzer's `-malloc_limit_mb=512` is the same check, but it only
/// works through a sanitizer's malloc hooks; a build without one (`cargo fuzz run -s none`,
/// as CI's short run does) gets it here. The process aborts, and libFuzzer saves the input.
const ALLOC_LIMIT: usize = 512 << 20;

/// The system allocator, refusing single allocations of [`ALLOC_LIMIT`] or more.
struct LimitedAlloc;

fn check_size(size: usize) {
    if size >= ALLOC_LIMIT {
        // Unbuffered, and no allocation on the way.
        let _ =
            std::io::stderr().write_all(b"qcow2-fuzz: a single allocation of 512 MiB or more\n");
        std::process::abort();
    }
}

// SAFETY: every call goes to `System` unchanged once the size is checked.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check_size(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

/// A 256 KiB patterned raw file, for images that name a backing file or data file.
fn side_file() -> MemoryBackend {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let bytes = BYTES.get_or_init(|| (0..256u32 << 10).map(|i| (i / 512) as u8 | 1).collect());
    MemoryBackend::from_vec(bytes.clone())
}

/// Files may not grow past this (EFBIG): the memory backend would allocate what a real file
/// system leaves sparse. The engine may legitimately grow a file far (a repair resizes the
/// image to hold a refcount block that the table places beyond its end, as `qemu-img check
/// -r` does).
const FILE_CAP: u64 = 64 << 20;

/// A memory file that refuses to grow past [`FILE_CAP`].
#[derive(Clone)]
pub struct Capped(MemoryBackend);

fn efbig(end: Option<u64>) -> std::io::Result<()> {
    match end {
        Some(e) if e <= FILE_CAP => Ok(()),
        _ => Err(std::io::Error::from_raw_os_error(27)),
    }
}

impl Backend for Capped {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        self.0.read_at(buf, offset).await
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        if let Err(e) = efbig(offset.checked_add(buf.len() as u64)) {
            return (Err(e), buf);
        }
        self.0.write_at(buf, offset).await
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.0.flush().await
    }

    fn flush_failures(&self) -> u64 {
        self.0.flush_failures()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> std::io::Result<()> {
        self.0.punch_hole(offset, len, keep).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> std::io::Result<()> {
        efbig(offset.checked_add(len))?;
        self.0.write_zeroes(offset, len, keep).await
    }

    async fn len(&self) -> std::io::Result<u64> {
        self.0.len().await
    }

    async fn set_len(&self, len: u64) -> std::io::Result<()> {
        efbig(Some(len))?;
        self.0.set_len(len).await
    }

    fn alignment(&self) -> usize {
        self.0.alignment()
    }

    fn is_writable(&self) -> bool {
        self.0.is_writable()
    }

    async fn allocation(&self, offset: u64, len: u64) -> std::io::Result<Allocation> {
        self.0.allocation(offset, len).await
    }
}

/// Opens [`Capped`] files from a [`MemoryOpener`].
#[derive(Clone)]
pub struct CappedOpener(MemoryOpener);

impl Opener for CappedOpener {
    type Backend = Capped;

    async fn open(&self, path: &Path, options: OpenOptions) -> std::io::Result<Capped> {
        self.0.open(path, options).await.map(Capped)
    }
}

/// An in-memory file system holding `image` at [`IMAGE`] and side files under the names the
/// seed corpus uses (`backing.qcow2` is raw data: a qcow2 backing of the wrong format is
/// just another hostile input).
fn files(image: &[u8]) -> (CappedOpener, MemoryBackend, MemoryBackend) {
    let op = MemoryOpener::new();
    let img = MemoryBackend::from_vec(image.to_vec());
    op.insert(IMAGE, img.clone());
    // Backing files are opened read-only: they can share one copy.
    thread_local! {
        static BACKING: MemoryBackend = side_file();
    }
    let backing = BACKING.with(|b| b.read_only());
    for name in ["/fuzz/backing.raw", "/fuzz/backing.qcow2"] {
        op.insert(name, backing.clone());
    }
    // Data files are written by read-write sessions; relative names resolve as given.
    let data = side_file();
    for name in ["/fuzz/data.raw", "data.raw"] {
        op.insert(name, data.clone());
    }
    (CappedOpener(op), img, data)
}

/// Reads what `block_status` says is there, then a spread of the disk, within the budget.
async fn read_some(img: &Image<CappedOpener>) {
    let size = img.size();
    if size == 0 {
        return;
    }
    let mut ranges = Vec::new();
    if let Ok(extents) = img.block_status(0, size.min(64 << 20)).await {
        for e in extents.iter().take(64) {
            ranges.push((e.offset, e.len.min(READ_CHUNK)));
        }
    }
    for i in 0..16u64 {
        let off = size / 16 * i;
        ranges.push((off, READ_CHUNK.min(size - off)));
    }
    ranges.push((size - 1, 1));
    let mut budget = READ_BUDGET;
    for (off, len) in ranges {
        if len == 0 || len > budget || off.checked_add(len).is_none_or(|e| e > size) {
            continue;
        }
        budget -= len;
        let _ = img.read(off, len).await;
    }
}

/// Opens `data` as an image read-only (read, snapshots, bitmaps, check), then read-write
/// (write, zero, discard, flush, read, close), then read-only again. Panics if a read-only
/// session or a failed read-write open changed the image.
pub fn open_read_write(data: &[u8]) {
    RT.with(|rt| rt.block_on(session(data)));
}

async fn session(data: &[u8]) {
    let path = Path::new(IMAGE);
    // Read-only.
    let (op, img_file, _) = files(data);
    if let Ok(img) = Image::open(op, path, ImageOptions::new().read_only(true)).await {
        read_some(&img).await;
        let _ = img.snapshots().await;
        let _ = img.bitmaps().await;
        let _ = img.check().await;
        let _ = img.close().await;
    }
    assert!(
        img_file.snapshot() == data,
        "a read-only session changed the image"
    );

    // Read-write.
    let (op, img_file, _) = files(data);
    let img = match Image::open(op.clone(), path, ImageOptions::new()).await {
        Ok(img) => img,
        Err(_) => {
            assert!(
                img_file.snapshot() == data,
                "a read-write open that failed changed the image"
            );
            return;
        }
    };
    let size = img.size();
    let cs = img.cluster_size();
    let mut x = data.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    });
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if size > 0 {
        for i in 0..6u64 {
            let off = next() % size.min(4 << 20);
            let len = (1 + next() % (2 * cs)).min(size - off).min(READ_CHUNK);
            let _ = match i % 4 {
                0 | 1 => img.write(off, &vec![0x5a ^ i as u8; len as usize]).await,
                2 => img.write_zeroes(off, len, i % 3 == 0).await,
                _ => img.discard(off, len).await,
            };
        }
        let _ = img.flush().await;
    }
    read_some(&img).await;
    let _ = img.close().await;

    // What the engine wrote opens again.
    if let Ok(img) = Image::open(op, path, ImageOptions::new().read_only(true)).await {
        read_some(&img).await;
        let _ = img.close().await;
    }
}

fn be64(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    let s = b.get(i..).unwrap_or(&[]);
    let n = s.len().min(8);
    w[..n].copy_from_slice(&s[..n]);
    u64::from_be_bytes(w)
}

/// Every parser of the format crate on `data`, with the round trips the format promises:
/// what parses serializes to something that parses to the same value.
pub fn format_parse(data: &[u8]) {
    // The header, as the start of a file of this length and of any length.
    let _ = Header::peek_cluster_bits(data);
    if let Ok(h) = Header::parse(data) {
        let _ = h.validate_layout(data.len() as u64);
        let _ = h.validate_layout(be64(data, 24));
        let _ = (h.geometry(), h.refcount_width(), h.extensions_end());
        let _ = (h.backing_format(), h.data_file_name(), h.bitmaps());
        assert!(h.unknown_incompatible().is_none());
        if let Ok(b) = h.serialize() {
            assert_eq!(Header::parse(&b).expect("serialized header parses"), h);
        }
        let mut fixed = h.clone();
        fixed.fix_backing_location();
        if let Ok(b) = fixed.serialize() {
            assert_eq!(Header::parse(&b).expect("serialized header parses"), fixed);
        }
    }
    if data.len() < 6 {
        return;
    }
    // Tables: the first bytes choose the geometry, a count and an extension type.
    let bits = 9 + u32::from(data[0]) % 13;
    let geo = ClusterGeometry::new(bits, data[1] & 1 == 1 && bits >= 14).expect("valid geometry");
    let cs = geo.cluster_size();
    let count = u32::from_be_bytes(data[2..6].try_into().unwrap());
    let count = if data[1] & 2 == 0 { count % 16 } else { count };
    let rest = &data[6..];

    for (i, w) in rest.chunks(8).take(4096).enumerate() {
        let word = be64(w, 0);
        let bitmap = if geo.extended_l2() {
            be64(rest, (i + 1) * 8)
        } else {
            0
        };
        let _ = L1Entry(word).l2_offset(&geo);
        let e = L2Entry { word, bitmap };
        // Decoding reads past the bits QEMU ignores; encoding leaves them clear.
        let ignored = if word & qcow2_format::L2_COMPRESSED != 0 {
            qcow2_format::L2_COPIED
        } else if geo.extended_l2() {
            L2Entry::RESERVED_MASK | qcow2_format::L2_ZERO
        } else {
            L2Entry::RESERVED_MASK
        };
        let canonical = L2Entry {
            word: word & !ignored,
            bitmap,
        };
        for zero_ok in [false, true] {
            if let Ok(m) = e.decode(&geo, zero_ok) {
                assert_eq!(L2Entry::try_encode(m, &geo, bitmap), Ok(canonical));
            }
        }
        let _ = e.cluster_type(&geo, data[1] & 4 != 0);
        if let Ok(d) = CompressedDescriptor::decode(word, &geo) {
            assert!(d.read_len() >= 1);
            let _ = (d.host_clusters(&geo), d.span_start(), d.span_len());
            if let Ok(w2) = d.encode(&geo) {
                assert_eq!(CompressedDescriptor::decode(w2, &geo).unwrap(), d);
            }
        }
        let _ = CompressedDescriptor::decode_unchecked(word, &geo).host_clusters(&geo);
        let _ = ReftableEntry(word).block_offset(cs);
        let _ = BitmapTableEntry(word).decode(cs);
    }

    // Refcount blocks of every width.
    let width = RefcountWidth::from_order(u32::from(data[1] >> 4) % 7).unwrap();
    let mut block = rest.to_vec();
    let entries = (block.len() as u64 * 8) / u64::from(width.bits());
    for i in 0..entries.min(256) {
        let v = width.get(&block, i);
        assert!(v <= width.max());
        let nv = be64(rest, i as usize) & width.max();
        width.set(&mut block, i, nv).expect("value fits");
        assert_eq!(width.get(&block, i), nv);
    }

    // Snapshot table and bitmap directory.
    if let Ok(t) = Snapshot::parse_table(rest, count) {
        if let Ok(b) = Snapshot::try_serialize_table(&t) {
            assert_eq!(Snapshot::parse_table(&b, count).expect("reparses"), t);
        }
    }
    let _ = Snapshot::entry_len(rest, 0);
    if let Ok(d) = BitmapDirectoryEntry::parse_directory(rest, count) {
        assert_eq!(BitmapDirectoryEntry::serialize_directory(&d), rest);
        for (i, e) in d.iter().enumerate() {
            let _ = e.validate(i, cs, be64(data, 0));
        }
    }

    // Header extensions.
    let kind = [
        0,
        HeaderExtension::BACKING_FORMAT,
        HeaderExtension::FEATURE_NAME_TABLE,
        HeaderExtension::BITMAPS,
        HeaderExtension::FULL_DISK_ENCRYPTION,
        HeaderExtension::EXTERNAL_DATA_FILE,
        be64(data, 2) as u32,
    ][usize::from(data[0] >> 5).min(6)];
    if let Ok(e) = HeaderExtension::decode(kind, rest) {
        if let Ok(p) = e.encode_payload() {
            assert_eq!(HeaderExtension::decode(kind, &p).expect("reparses"), e);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Replays the corpus and the artifacts on the stable toolchain: `cargo test` in fuzz/
    //! (`FUZZ_REPLAY=dir` replays another directory).

    use std::path::PathBuf;

    fn inputs(target: &str) -> Vec<PathBuf> {
        let dirs: Vec<PathBuf> = match std::env::var_os("FUZZ_REPLAY") {
            Some(d) => vec![d.into()],
            None => vec![
                format!("corpus/{target}").into(),
                format!("artifacts/{target}").into(),
            ],
        };
        let mut out = Vec::new();
        for d in dirs {
            if let Ok(rd) = std::fs::read_dir(&d) {
                out.extend(rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn replay_open_read_write() {
        for p in inputs("open_read_write") {
            eprintln!("{}", p.display());
            super::open_read_write(&std::fs::read(&p).unwrap());
        }
    }

    #[test]
    fn replay_format_parse() {
        for p in inputs("format_parse") {
            super::format_parse(&std::fs::read(&p).unwrap());
        }
    }

    #[test]
    fn smoke() {
        super::open_read_write(b"QFI\xfb\0\0\0\x03");
        super::format_parse(&[0u8; 64]);
    }
}
