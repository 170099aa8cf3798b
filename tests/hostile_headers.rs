//! Hostile headers: one image per validation rule, made by editing a valid image that
//! `qemu-img create` wrote. Opening it must fail with the typed error for that rule, never
//! panic, and never change a byte of the file (it is opened read-write on purpose).

use blockio::FileOpener;
use qcow2_engine::{Error, Image, ImageOptions};
use qcow2_format::FormatError;
use qcow2_tests::{path_str, qemu_img};
use std::path::{Path, PathBuf};

/// A fresh 1 GiB image with the given `-o` options; returns its directory and path.
fn base_image(opts: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(&path), "1G"]);
    qemu_img(&args);
    (dir, path)
}

fn put_be(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

/// Opens read-write and returns the format error; asserts the file is unchanged.
fn open_error(path: &Path) -> FormatError {
    let before = std::fs::read(path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let res = rt.block_on(Image::open(FileOpener, path, ImageOptions::new()));
    let after = std::fs::read(path).unwrap();
    assert!(before == after, "a failed open must not write to the image");
    match res {
        Err(Error::Format { source, path: p }) => {
            assert_eq!(p, path, "the error names the file");
            source
        }
        Err(other) => panic!("expected a format error, got {other}"),
        Ok(_) => panic!("a hostile header was accepted"),
    }
}

fn hostile(opts: &str, offset: usize, bytes: &[u8]) -> FormatError {
    let (_dir, path) = base_image(opts);
    put_be(&path, offset, bytes);
    open_error(&path)
}

#[test]
fn bad_magic() {
    assert!(matches!(
        hostile("", 0, b"QFI\0"),
        FormatError::BadMagic(0x5146_4900)
    ));
}

#[test]
fn version_1_and_4() {
    for v in [1u32, 4] {
        assert_eq!(
            hostile("", 4, &v.to_be_bytes()),
            FormatError::UnsupportedVersion(v)
        );
    }
}

#[test]
fn cluster_bits_8_and_22() {
    for bits in [8u32, 22] {
        assert_eq!(
            hostile("", 20, &bits.to_be_bytes()),
            FormatError::ClusterBits(bits)
        );
    }
}

#[test]
fn header_length_too_small() {
    assert_eq!(
        hostile("", 100, &96u32.to_be_bytes()),
        FormatError::HeaderLength(96)
    );
}

#[test]
fn l1_misaligned() {
    // qemu-img puts the L1 table at 0x30000 for 64 KiB clusters.
    let e = hostile("", 40, &0x30008u64.to_be_bytes());
    assert!(
        matches!(
            e,
            FormatError::Misaligned {
                offset: 0x30008,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn l1_past_the_end() {
    let e = hostile("", 40, &(1u64 << 40).to_be_bytes());
    assert!(
        matches!(e, FormatError::PastEnd { offset, .. } if offset == 1 << 40),
        "{e:?}"
    );
}

#[test]
fn reftable_misaligned() {
    let e = hostile("", 48, &0x10200u64.to_be_bytes());
    assert!(
        matches!(
            e,
            FormatError::Misaligned {
                offset: 0x10200,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn reftable_past_the_end() {
    let e = hostile("", 48, &(1u64 << 40).to_be_bytes());
    assert!(
        matches!(e, FormatError::PastEnd { offset, .. } if offset == 1 << 40),
        "{e:?}"
    );
}

#[test]
fn l1_too_small_for_the_virtual_size() {
    // 1 GiB at 64 KiB clusters needs 2 L1 entries.
    let e = hostile("", 36, &1u32.to_be_bytes());
    assert_eq!(
        e,
        FormatError::L1TooSmall {
            l1_size: 1,
            needed: 2
        }
    );
}

#[test]
fn virtual_size_too_large_for_the_l1_limit() {
    // 2^62 bytes at 64 KiB clusters would need 2^33 L1 entries: QEMU says "Image is too
    // big" (more than INT_MAX entries).
    let e = hostile("", 24, &(1u64 << 62).to_be_bytes());
    assert_eq!(e, FormatError::ImageTooBig(1 << 62));
    assert_eq!(e.to_string(), "Image is too big");
}

#[test]
fn l1_size_beyond_the_limit() {
    let e = hostile("", 36, &0x0800_0000u32.to_be_bytes());
    assert!(matches!(e, FormatError::TooLarge { .. }), "{e:?}");
}

#[test]
fn unknown_incompatible_bit_is_named() {
    let e = hostile("", 72, &(1u64 << 5).to_be_bytes());
    match &e {
        FormatError::UnknownIncompatibleFeatures { bits, .. } => assert_eq!(*bits, 1 << 5),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"
    );
}

#[test]
fn backing_name_too_long() {
    let (_dir, path) = base_image("");
    put_be(&path, 8, &0x400u64.to_be_bytes());
    put_be(&path, 16, &2000u32.to_be_bytes());
    assert!(matches!(
        open_error(&path),
        FormatError::TooLarge { value: 2000, .. }
    ));
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let e = hostile("extended_l2=on,cluster_size=16k", 20, &13u32.to_be_bytes());
    assert_eq!(e, FormatError::ExtendedL2ClusterTooSmall(13));
}

#[test]
fn refcount_order_7() {
    assert_eq!(
        hostile("", 96, &7u32.to_be_bytes()),
        FormatError::RefcountOrder(7)
    );
}

#[test]
fn truncated_file() {
    let (_dir, path) = base_image("");
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..50]).unwrap();
    assert!(matches!(open_error(&path), FormatError::Truncated { .. }));
}
