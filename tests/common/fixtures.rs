//! The fixture matrix: qcow2 images built by qemu-img / qemu-io at test time.
//!
//! Here are the types and the builders; the `matrix` submodule lists the
//! fixtures, and `compressed` builds the compressed ones.

use std::path::{Path, PathBuf};

use crate::ops::OpMix;
use crate::tools::{path_str, qemu_img, qemu_img_in, qemu_info_json, qemu_io, qemu_io_abort};

mod compressed;
mod matrix;

pub use matrix::matrix;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// What a fixture is expected to look like (checked by the self-check tests
/// against `qemu-img info`/`map`; also useful to select fixtures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// `cluster-size` of the top image.
    pub cluster_size: u64,
    /// `"1.1"` (v3) or `"0.10"` (v2).
    pub compat: &'static str,
    /// `refcount-bits`.
    pub refcount_bits: u64,
    /// `extended-l2` (subclusters).
    pub extended_l2: bool,
    /// `compression-type`: `"zlib"` or `"zstd"`.
    pub compression_type: &'static str,
    /// The top image contains compressed clusters (`qemu-img map` shows
    /// `"compressed": true`).
    pub compressed: bool,
    /// Number of images below the top one in the backing chain.
    pub backing_depth: usize,
    /// The top image uses an external data file.
    pub data_file: bool,
    /// The external data file is in raw mode (`data_file_raw=on`).
    pub data_file_raw: bool,
    /// Number of internal snapshots.
    pub snapshots: usize,
    /// Names of the persistent dirty bitmaps.
    pub bitmaps: &'static [&'static str],
    /// `lazy_refcounts=on`.
    pub lazy_refcounts: bool,
    /// The dirty bit (incompatible bit 0) is left set: the image "crashed"
    /// with lazy refcounts; `qemu-img check` (read-only) reports refcount
    /// errors (exit 2) until repaired, but the data reads back correctly.
    pub dirty: bool,
}

impl Expect {
    /// A plain v3 image: 64 KiB clusters, 16-bit refcounts, zlib, no extras.
    pub const V3: Expect = Expect {
        cluster_size: 64 * KIB,
        compat: "1.1",
        refcount_bits: 16,
        extended_l2: false,
        compression_type: "zlib",
        compressed: false,
        backing_depth: 0,
        data_file: false,
        data_file_raw: false,
        snapshots: 0,
        bitmaps: &[],
        lazy_refcounts: false,
        dirty: false,
    };
}

/// One built fixture. The images live in `dir` and are deleted when the
/// fixture is dropped.
#[derive(Debug)]
pub struct Fixture {
    /// The fixture's name in the matrix (e.g. `"cluster-512"`).
    pub name: String,
    /// Temporary directory holding the image and everything it refers to
    /// (backing files, data file).
    pub dir: tempfile::TempDir,
    /// The top image: what the test feeds to our engine.
    pub image: PathBuf,
    /// Format of `image`; always `"qcow2"`.
    pub format: &'static str,
    /// Virtual size of `image` in bytes, as reported by `qemu-img info`.
    pub virtual_size: u64,
    /// What the image is expected to contain.
    pub expect: Expect,
}

impl Fixture {
    /// QEMU's reading of the guest disk ([`crate::raw_reference`]).
    pub fn raw_reference(&self) -> Vec<u8> {
        crate::raw_reference(&self.image, self.format)
    }

    /// `qemu-img info --output=json` of the top image.
    pub fn info_json(&self) -> serde_json::Value {
        qemu_info_json(&self.image)
    }

    /// `qemu-img map --output=json` of the top image.
    pub fn map_json(&self) -> serde_json::Value {
        crate::qemu_map_json(&self.image)
    }
}

/// A row of the fixture matrix: a name, what to expect, and a builder that
/// creates the image(s) in a given directory with qemu-img / qemu-io.
#[derive(Clone, Copy)]
pub struct FixtureSpec {
    /// Unique name, e.g. `"cluster-512"`, `"compressed-zstd-rewritten"`.
    pub name: &'static str,
    /// One-line description of what the image exercises.
    pub description: &'static str,
    /// What the built image is expected to look like.
    pub expect: Expect,
    build: fn(&Path) -> PathBuf,
}

impl std::fmt::Debug for FixtureSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixtureSpec")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

impl FixtureSpec {
    /// Builds the fixture in a fresh temporary directory. Deterministic:
    /// the same spec always gives the same guest content.
    ///
    /// # Panics
    ///
    /// Panics if any qemu-img / qemu-io step fails.
    pub fn build(&self) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix(&format!("qcow2-fixture-{}-", self.name))
            .tempdir()
            .expect("create fixture tempdir");
        let image = self.build_in(dir.path());
        let info = qemu_info_json(&image);
        let virtual_size = info["virtual-size"]
            .as_u64()
            .unwrap_or_else(|| panic!("no virtual-size in qemu-img info of {}", image.display()));
        Fixture {
            name: self.name.to_string(),
            dir,
            image,
            format: "qcow2",
            virtual_size,
            expect: self.expect,
        }
    }

    /// Builds the image(s) into the existing directory `dir` (which should
    /// be empty) and returns the path of the top image.
    pub fn build_in(&self, dir: &Path) -> PathBuf {
        (self.build)(dir)
    }
}

/// Looks up a fixture of [`matrix`] by name.
///
/// # Panics
///
/// Panics if there is no fixture called `name`.
pub fn fixture(name: &str) -> FixtureSpec {
    matrix()
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no fixture named {name:?}"))
}

// ---------------------------------------------------------------------------
// Building blocks

fn size_arg(size: u64) -> String {
    size.to_string()
}

/// `qemu-img create -q -f qcow2 [-o OPTS] DIR/NAME SIZE`
fn create(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let size = size_arg(size);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(&p), &size]);
    qemu_img(&args);
    p
}

/// Like [`create`] with a backing file given by absolute path.
fn create_over(
    dir: &Path,
    name: &str,
    size: u64,
    opts: &str,
    backing: &Path,
    backing_fmt: &str,
) -> PathBuf {
    let p = dir.join(name);
    let size = size_arg(size);
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(backing),
        "-F",
        backing_fmt,
    ];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(&p), &size]);
    qemu_img(&args);
    p
}

fn io(image: &Path, script: &[String]) {
    qemu_io("qcow2", image, script);
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Creates a sparse raw file of `size` bytes.
fn sparse_raw(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create raw file");
    f.set_len(size).expect("size raw file");
}

/// A plain image: create with `opts`, then run `mix`.
fn plain(dir: &Path, size: u64, opts: &str, mix: OpMix) -> PathBuf {
    let img = create(dir, "image.qcow2", size, opts);
    io(&img, &mix.script());
    img
}

// ---------------------------------------------------------------------------
// Backing chains

/// raw base <- qcow2 mid (backing_fmt raw) <- qcow2 top (backing_fmt qcow2),
/// each layer writing its own ranges. With `relative`, the images are
/// created from inside `dir` and refer to each other by relative names.
fn chain(dir: &Path, relative: bool) -> PathBuf {
    let size = 32 * MIB;
    let base = dir.join("base.raw");
    sparse_raw(&base, size);
    let base_mix = OpMix {
        first_pattern: 0x40,
        zero_writes: false,
        discards: false,
        ops: 20,
        ..OpMix::new(0xBA5E, size, 64 * KIB)
    };
    qemu_io("raw", &base, &base_mix.script());
    let mid;
    let top;
    if relative {
        let s = size_arg(size);
        qemu_img_in(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "mid.qcow2",
                &s,
            ],
        );
        qemu_img_in(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                &s,
            ],
        );
        mid = dir.join("mid.qcow2");
        top = dir.join("top.qcow2");
    } else {
        mid = create_over(dir, "mid.qcow2", size, "", &base, "raw");
        top = create_over(dir, "top.qcow2", size, "", &mid, "qcow2");
    }
    let mid_mix = OpMix {
        first_pattern: 0x80,
        ops: 24,
        ..OpMix::new(0x0111D, size, 64 * KIB)
    };
    io(&mid, &mid_mix.script());
    let top_mix = OpMix {
        first_pattern: 0xc0,
        ops: 24,
        ..OpMix::new(0x7095, size, 64 * KIB)
    };
    io(&top, &top_mix.script());
    top
}

/// An overlay whose backing file is shorter than the overlay.
fn backing_short(dir: &Path) -> PathBuf {
    let base = create(dir, "base.qcow2", 8 * MIB, "");
    let base_mix = OpMix {
        first_pattern: 0x30,
        ops: 30,
        ..OpMix::new(0x5407, 8 * MIB, 64 * KIB)
    };
    io(&base, &base_mix.script());
    // Make sure the base's last cluster has data to "fall off" from.
    io(&base, &cmds(&["write -P 0x2f 8323072 65536"]));
    let size = 32 * MIB;
    let top = create_over(dir, "top.qcow2", size, "", &base, "qcow2");
    let mut script = cmds(&[
        // Partial write into the base's last cluster and into the first
        // cluster past the base's end (COW reads past the backing end).
        "write -P 0xa1 8355000 4000",
        "write -P 0xa2 8389000 3000",
        // Straddles the base end.
        "write -P 0xa3 8380000 20000",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0xb0,
            ops: 24,
            ..OpMix::new(0x5408, size, 64 * KIB)
        }
        .script(),
    );
    io(&top, &script);
    top
}

/// An overlay over a raw backing file whose size is not a multiple of 512.
fn backing_short_raw(dir: &Path) -> PathBuf {
    use std::io::Write;
    let base_len = 5 * MIB + 12345;
    let base = dir.join("base.raw");
    let mut data = vec![0u8; base_len as usize];
    for (i, chunk) in data.chunks_mut(4096 + 17).enumerate() {
        if i % 3 != 2 {
            chunk.fill((i as u8).wrapping_mul(13) | 1);
        }
    }
    std::fs::File::create(&base)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let size = 16 * MIB;
    let top = create_over(dir, "top.qcow2", size, "", &base, "raw");
    let mut script = cmds(&[
        // Partial writes into the cluster holding the backing end.
        "write -P 0xa1 5243000 100",
        "write -P 0xa2 5255000 3000",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0xb0,
            ops: 20,
            ..OpMix::new(0x5409, size, 64 * KIB)
        }
        .script(),
    );
    io(&top, &script);
    top
}

/// v3 zero clusters of every flavour, no backing file.
fn zero_clusters(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let img = create(dir, "image.qcow2", size, "");
    let mut script = cmds(&[
        "write -P 0x11 0 262144",
        "write -P 0x12 4194304 131072",
        // allocated -> zero flag with the offset kept (zero-alloc)
        "write -z 0 65536",
        // allocated -> zero flag, unallocated (zero-plain)
        "write -z -u 65536 65536",
        // unallocated -> zero-plain
        "write -z 1048576 131072",
        "write -z -u 2097152 65536",
        // discard allocated -> zero-plain (v3, no backing)
        "discard 131072 65536",
        // partial zero write inside an allocated cluster: data zeros
        "write -z 200000 1000",
        // writes into zero clusters: allocate, rest reads zero
        "write -P 0x13 1048676 300",
        "write -P 0x14 4096 4096",
        // zero write spanning allocated and unallocated clusters, unaligned
        "write -z 4190000 200000",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0x20,
            ops: 30,
            ..OpMix::new(0x2E80, size, 64 * KIB)
        }
        .script(),
    );
    io(&img, &script);
    img
}

/// v3 zero clusters and discards over backing data.
fn zero_clusters_backing(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let base = create(dir, "base.qcow2", size, "");
    let mut base_script = cmds(&["write -P 0x21 0 4194304"]);
    base_script.extend(
        OpMix {
            first_pattern: 0x22,
            zero_writes: false,
            discards: false,
            ops: 20,
            ..OpMix::new(0x2E81, size, 64 * KIB)
        }
        .script(),
    );
    io(&base, &base_script);
    let top = create_over(dir, "top.qcow2", size, "", &base, "qcow2");
    let mut script = cmds(&[
        "write -z 0 65536",
        "write -z -u 65536 65536",
        "discard 131072 131072",
        "write -P 0x51 300000 5000",
        "write -z 300000 65536",
        "write -z 1000000 3000",
        "discard 1048576 65536",
        "write -P 0x52 1049000 512",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0x60,
            ops: 24,
            ..OpMix::new(0x2E82, size, 64 * KIB)
        }
        .script(),
    );
    io(&top, &script);
    top
}

/// v2 overlay over a v2 base: `write -z` must allocate real zeros.
fn v2_zero_backing(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let base = create(dir, "base.qcow2", size, "compat=0.10");
    let mut base_script = cmds(&["write -P 0x41 0 2097152"]);
    base_script.extend(
        OpMix {
            first_pattern: 0x42,
            zero_writes: false,
            discards: false,
            ops: 20,
            ..OpMix::new(0x7201, size, 64 * KIB)
        }
        .script(),
    );
    io(&base, &base_script);
    let top = create_over(dir, "top.qcow2", size, "compat=0.10", &base, "qcow2");
    let mut script = cmds(&[
        "write -z 0 65536",
        "write -z -u 131072 131072",
        "write -z 500000 70000",
        "discard 1048576 65536",
        "write -P 0x91 1048600 100",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0x92,
            ops: 24,
            ..OpMix::new(0x7202, size, 64 * KIB)
        }
        .script(),
    );
    io(&top, &script);
    top
}

/// Extended L2 over a standard backing file: subclusters fall through.
fn extl2_backing(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let base = create(dir, "base.qcow2", size, "");
    let mut base_script = cmds(&["write -P 0x31 0 8388608"]);
    base_script.extend(
        OpMix {
            first_pattern: 0x32,
            zero_writes: false,
            discards: false,
            ops: 16,
            ..OpMix::new(0xE7B0, size, 64 * KIB)
        }
        .script(),
    );
    io(&base, &base_script);
    let top = create_over(dir, "top.qcow2", size, "extended_l2=on", &base, "qcow2");
    let mut script = cmds(&[
        // One subcluster (2 KiB) of a backed cluster; the rest falls through.
        "write -P 0xa1 2048 2048",
        // Smaller than a subcluster, unaligned.
        "write -P 0xa2 70000 100",
        // Zero and discard of single subclusters over backing data.
        "write -z 139264 2048",
        "discard 200704 4096",
        "write -z -u 262144 6144",
        // Unaligned write across a cluster boundary.
        "write -P 0xa3 327000 4000",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0xb0,
            ops: 50,
            subclusters: true,
            l2_entry_bytes: 16,
            ..OpMix::new(0xE7B1, size, 64 * KIB)
        }
        .script(),
    );
    io(&top, &script);
    top
}

fn extl2(dir: &Path, size: u64, cluster: u64, seed: u64) -> PathBuf {
    let sc = cluster / 32;
    let img = create(
        dir,
        "image.qcow2",
        size,
        &format!("extended_l2=on,cluster_size={cluster}"),
    );
    let mut script = vec![
        // A sub-subcluster write at +512 into a fresh cluster.
        format!("write -P 0x71 {} {}", 4 * cluster + 512, sc.min(1536)),
        // Full-cluster zero over allocated, discard part of a cluster.
        format!("write -P 0x72 {} {}", 6 * cluster, 2 * cluster),
        format!("write -z {} {}", 6 * cluster, cluster),
        format!("discard {} {}", 7 * cluster + sc, 3 * sc),
        format!("write -z -u {} {}", 7 * cluster + 8 * sc, sc),
        format!("write -P 0x73 {} {}", 7 * cluster + 9 * sc + 7, 100),
    ];
    script.extend(
        OpMix {
            first_pattern: 0x80,
            ops: 60,
            subclusters: true,
            l2_entry_bytes: 16,
            ..OpMix::new(seed, size, cluster)
        }
        .script(),
    );
    io(&img, &script);
    img
}

fn snapshot(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let img = create(dir, "image.qcow2", size, "");
    let p = path_str(&img).to_string();
    io(
        &img,
        &OpMix {
            first_pattern: 0x01,
            ops: 30,
            ..OpMix::new(0x5A01, size, 64 * KIB)
        }
        .script(),
    );
    qemu_img(&["snapshot", "-c", "snap1", &p]);
    let mut script = cmds(&[
        "write -P 0x5a 0 100000",
        "write -z 1048576 1048576",
        "discard 2097152 2097152",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0x60,
            ops: 30,
            ..OpMix::new(0x5A02, size, 64 * KIB)
        }
        .script(),
    );
    io(&img, &script);
    qemu_img(&["snapshot", "-c", "snap2", &p]);
    io(
        &img,
        &OpMix {
            first_pattern: 0xc0,
            ops: 12,
            ..OpMix::new(0x5A03, size, 64 * KIB)
        }
        .script(),
    );
    img
}

fn bitmap(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let img = create(dir, "image.qcow2", size, "");
    let p = path_str(&img).to_string();
    qemu_img(&["bitmap", "--add", &p, "bm0"]);
    qemu_img(&["bitmap", "--add", "-g", "131072", "--disable", &p, "bm1"]);
    io(&img, &OpMix::new(0xB17, size, 64 * KIB).script());
    img
}

fn data_file(dir: &Path, raw: bool) -> PathBuf {
    let size = 32 * MIB;
    // Absolute name: QEMU resolves a relative data-file name against the
    // current working directory, not the image's directory.
    let data = dir.join("image.data");
    let mut opts = format!("data_file={}", path_str(&data));
    if raw {
        opts.push_str(",data_file_raw=on");
    }
    plain(
        dir,
        size,
        &opts,
        OpMix::new(if raw { 0xDA7B } else { 0xDA7A }, size, 64 * KIB),
    )
}

fn lazy_dirty(dir: &Path) -> PathBuf {
    let size = 32 * MIB;
    let img = create(dir, "image.qcow2", size, "lazy_refcounts=on");
    let mix = OpMix {
        ops: 30,
        ..OpMix::new(0x1A2D, size, 64 * KIB)
    };
    qemu_io_abort("qcow2", &img, &mix.script());
    img
}

fn prealloc(dir: &Path, mode: &str) -> PathBuf {
    let size = 8 * MIB;
    plain(
        dir,
        size,
        &format!("preallocation={mode}"),
        OpMix {
            ops: 30,
            ..OpMix::new(0x9E + mode.len() as u64, size, 64 * KIB)
        },
    )
}

fn resized(dir: &Path) -> PathBuf {
    let img = create(dir, "image.qcow2", 16 * MIB, "");
    io(
        &img,
        &OpMix {
            ops: 24,
            ..OpMix::new(0x2E51, 16 * MIB, 64 * KIB)
        }
        .script(),
    );
    qemu_img(&["resize", "-q", path_str(&img), "80M"]);
    let size = 80 * MIB;
    let mut script = cmds(&[
        // Straddles the old end of the disk.
        "write -P 0xe1 16770000 20000",
        "write -P 0xe2 16777216 65536",
    ]);
    script.extend(
        OpMix {
            first_pattern: 0xf0,
            ops: 24,
            window: Some((15 * MIB, size)),
            ..OpMix::new(0x2E52, size, 64 * KIB)
        }
        .script(),
    );
    io(&img, &script);
    img
}
