//! What an embedder (a VMM's disk layer) relies on beyond read and write: vectored requests
//! on odd boundaries, per-request FUA and the cache modes (seen in the backend's request
//! log), and errors that carry an errno.

use blockio::{FaultController, FaultOpener, IoBuf, MemoryOpener, OpKind};
use futures::executor::block_on;
use qcow2_engine::{
    create, create_raw, CacheMode, CreateOptions, Disk, Error, Image, ImageFormat, ImageOptions,
    Preallocation, SnapshotLookup, WriteFlags,
};

const SIZE: u64 = 4 << 20;

/// A new 4 MiB image (64 KiB clusters) in memory, behind a request log (which starts
/// empty after the open).
fn image(options: ImageOptions) -> (Image<FaultOpener<MemoryOpener>>, FaultController) {
    let opener = FaultOpener::new(MemoryOpener::new());
    let ctl = opener.controller();
    block_on(async {
        create(&opener, "disk.qcow2", &CreateOptions::new().size(SIZE))
            .await
            .unwrap();
        let img = Image::open(opener, "disk.qcow2", options).await.unwrap();
        ctl.clear_log();
        (img, ctl)
    })
}

fn flushes(ctl: &FaultController) -> usize {
    ctl.log()
        .iter()
        .filter(|e| e.info.op == OpKind::Flush)
        .count()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn vectored_requests_are_their_parts_in_order() {
    let (img, _) = image(ImageOptions::new());
    block_on(async {
        // Odd sizes across cluster boundaries, at an odd offset.
        let sizes = [1000usize, 70_000, 3, 65_536, 12_345];
        let parts: Vec<Vec<u8>> = sizes
            .iter()
            .zip(1u8..)
            .map(|(&n, s)| pattern(n, s))
            .collect();
        let whole: Vec<u8> = parts.concat();
        let offset = 65_536 - 517;
        let bufs = parts.iter().map(|p| IoBuf::from_slice(p)).collect();
        let (res, bufs) = img
            .write_vectored_at(bufs, offset, WriteFlags::default())
            .await;
        res.unwrap();
        assert_eq!(bufs.len(), sizes.len());
        let back = img.read(offset, whole.len() as u64).await.unwrap();
        assert!(
            back[..] == whole[..],
            "a vectored write is its parts in order"
        );
        // Read back through a different split.
        let split = [7usize, 65_536, whole.len() - 7 - 65_536];
        let bufs = split.iter().map(|&n| IoBuf::new(n)).collect();
        let (res, bufs) = img.read_vectored_at(bufs, offset).await;
        res.unwrap();
        let got: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
        assert!(got == whole, "a vectored read is its parts in order");
        // Past the end: refused before anything is written.
        let bufs = vec![IoBuf::from_slice(&[9; 512]), IoBuf::from_slice(&[9; 1024])];
        let (res, _) = img
            .write_vectored_at(bufs, SIZE - 1024, WriteFlags::FUA)
            .await;
        assert!(
            matches!(res, Err(Error::OutOfRange { len: 1536, .. })),
            "{res:?}"
        );
        let tail = img.read(SIZE - 1024, 1024).await.unwrap();
        assert!(tail.iter().all(|&b| b == 0));
        img.close().await.unwrap();
    });
}

#[test]
fn fua_and_write_through_flush_each_write() {
    let (img, ctl) = image(ImageOptions::new());
    block_on(async {
        img.write(0, &[1; 4096]).await.unwrap();
        assert_eq!(flushes(&ctl), 0, "a write without FUA is not flushed");
        let before = ctl.log().len();
        let (res, _) = img
            .write_at_with(IoBuf::from_slice(&[2; 4096]), 1 << 20, WriteFlags::FUA)
            .await;
        res.unwrap();
        // A successful flush makes durable every write that completed before it was issued.
        let log = ctl.log();
        let flush = log[before..]
            .iter()
            .rfind(|e| e.info.op == OpKind::Flush && e.is_ok())
            .expect("FUA: a flush");
        let writes: Vec<_> = log[before..]
            .iter()
            .filter(|e| e.info.op == OpKind::Write)
            .collect();
        assert!(writes.len() >= 2, "the data and the L2 entry mapping it");
        assert!(
            writes.iter().all(|w| w.seq < flush.issued_after),
            "FUA: every write of the request is durable when it completes"
        );
        img.close().await.unwrap();
    });
    let (img, ctl) = image(ImageOptions::new().cache(CacheMode::Writethrough));
    block_on(async {
        img.write(0, &[1; 4096]).await.unwrap();
        assert!(flushes(&ctl) > 0, "writethrough flushes each write");
        let n = flushes(&ctl);
        img.write_zeroes(0, 65_536, false).await.unwrap();
        assert!(flushes(&ctl) > n, "and each write-zeroes");
        img.close().await.unwrap();
    });
}

#[test]
fn unsafe_cache_never_flushes_the_file() {
    let (img, ctl) = image(ImageOptions::new().cache(CacheMode::Unsafe));
    block_on(async {
        img.write(0, &[1; 70_000]).await.unwrap();
        img.flush().await.unwrap();
        img.close().await.unwrap();
    });
    assert_eq!(flushes(&ctl), 0, "unsafe: no flush reaches the file");
    let writes = ctl
        .log()
        .iter()
        .filter(|e| e.info.op == OpKind::Write)
        .count();
    assert!(writes > 1, "but the data and metadata are written");
}

#[test]
fn cache_modes_by_qemus_names() {
    for name in ["writeback", "writethrough", "none", "directsync", "unsafe"] {
        let mode = CacheMode::from_name(name).unwrap();
        assert_eq!(mode.name(), name);
        assert_eq!(ImageOptions::new().cache(mode).cache_mode(), mode);
        assert_eq!(ImageOptions::new().cache(mode).is_direct(), mode.direct());
    }
    assert_eq!(CacheMode::from_name("off"), Some(CacheMode::None));
    assert_eq!(CacheMode::from_name("bogus"), None);
}

#[test]
fn errors_carry_the_errno_a_device_completes_with() {
    let (img, _) = image(ImageOptions::new());
    block_on(async {
        let e = img.read(SIZE, 512).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "past the end: {e}");
        img.close().await.unwrap();
    });
    let opener = FaultOpener::new(MemoryOpener::new());
    block_on(async {
        create(&opener, "ro.qcow2", &CreateOptions::new().size(SIZE))
            .await
            .unwrap();
        let ro = Image::open(opener, "ro.qcow2", ImageOptions::new().read_only(true))
            .await
            .unwrap();
        let e = ro.write(0, &[1; 512]).await.unwrap_err();
        assert!(matches!(e, Error::ReadOnly));
        assert_eq!(e.errno(), libc::EPERM);
    });
}

/// Guest lengths are `u64` in every method; a read longer than any buffer this platform can
/// allocate is `Error::RequestTooLarge` (EINVAL), from `Image`, `Disk` (qcow2 and raw, which
/// otherwise reads zeros past its end) and `SnapshotView` alike, before any I/O. A length
/// that could be a buffer but runs past the end of a qcow2 disk is `OutOfRange`, found before
/// allocating (an 8 EiB allocation would abort the test).
#[test]
fn a_read_longer_than_any_buffer_is_a_typed_error() {
    let max = isize::MAX as u64 + 1 - blockio::DEFAULT_ALIGN as u64;
    let too_large = |e: Error, len: u64| {
        let Error::RequestTooLarge {
            offset,
            len: l,
            max: m,
        } = e
        else {
            panic!("{len:#x}: {e:?}");
        };
        assert_eq!((offset, l, m), (512, len, max));
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
    };
    let (img, ctl) = image(ImageOptions::new());
    block_on(async {
        img.snapshot_create("s").await.unwrap();
        let view = img
            .snapshot_view(SnapshotLookup::IdOrName("s"))
            .await
            .unwrap();
        ctl.clear_log();
        for len in [u64::MAX, max + 1] {
            too_large(img.read(512, len).await.unwrap_err(), len);
            too_large(view.read(512, len).await.unwrap_err(), len);
        }
        let e = view.read(512, max).await.unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e:?}");
        drop(view);
        let e = img.read(512, max).await.unwrap_err();
        assert!(
            matches!(e, Error::OutOfRange { offset: 512, len, size: SIZE } if len == max),
            "{e:?}"
        );
        assert!(ctl.log().is_empty(), "a refused read did I/O");
        let disk = Disk::Qcow2(img);
        too_large(disk.read(512, u64::MAX).await.unwrap_err(), u64::MAX);
        assert!(matches!(
            disk.read(512, max).await.unwrap_err(),
            Error::OutOfRange { .. }
        ));
        disk.close().await.unwrap();
    });
    let opener = MemoryOpener::new();
    block_on(async {
        create_raw(&opener, "disk.raw", SIZE, Preallocation::Off)
            .await
            .unwrap();
        let raw = Disk::open(
            opener,
            "disk.raw",
            Some(ImageFormat::Raw),
            ImageOptions::new(),
        )
        .await
        .unwrap();
        too_large(raw.read(512, u64::MAX).await.unwrap_err(), u64::MAX);
        too_large(raw.read(512, max + 1).await.unwrap_err(), max + 1);
        let past = raw.read(SIZE - 512, 1024).await.unwrap();
        assert!(
            past.iter().all(|&b| b == 0),
            "a raw disk reads zeros past its end"
        );
        raw.close().await.unwrap();
    });
}

/// `Image::map` walks the chain below a shared image as `qemu-img map` does.
#[test]
fn the_chain_map_through_a_shared_image() {
    use qcow2_tests::{path_str, qemu_img, qemu_img_json, qemu_io};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io("qcow2", &base, &["write -P 1 0 1M", "write -z 2M 64k"]);
    qemu_io("qcow2", &top, &["write -P 2 512k 128k", "write -z 3M 64k"]);
    let want: Vec<(u64, u64, u64, bool, bool, bool)> =
        qemu_img_json(&["map", "--output=json", path_str(&top)])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let n = |k: &str| e[k].as_u64().unwrap();
                let b = |k: &str| e[k].as_bool().unwrap();
                (
                    n("start"),
                    n("length"),
                    n("depth"),
                    b("present"),
                    b("zero"),
                    b("data"),
                )
            })
            .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got: Vec<_> = rt.block_on(async {
        let opts = ImageOptions::new().read_only(true);
        let img = std::sync::Arc::new(Image::open(blockio::FileOpener, &top, opts).await.unwrap());
        let map = img.map(0, 4 << 20).await.unwrap();
        map.iter()
            .map(|e| (e.start, e.length, e.depth as u64, e.present, e.zero, e.data))
            .collect()
    });
    assert_eq!(got, want, "ours, then qemu-img map's");
}

/// The image over a `Send` backend can be shared across threads, and its request futures
/// can be spawned on a multi-thread runtime (this fails to compile otherwise).
#[test]
fn images_over_send_backends_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<F: std::future::Future + Send>(_: &F) {}
    send_sync::<Image<blockio::FileOpener>>();
    send_sync::<Image<MemoryOpener>>();
    let (img, _) = image(ImageOptions::new());
    let bufs = vec![IoBuf::new(512)];
    send(&img.read(0, 512));
    send(&img.write(0, &[1; 512]));
    send(&img.write_at_with(IoBuf::new(512), 0, WriteFlags::FUA));
    send(&img.read_vectored_at(bufs, 0));
    send(&img.write_zeroes(0, 512, true));
    send(&img.discard(0, 65_536));
    send(&img.flush());
    send(&img.map(0, SIZE));
    send(&img.block_status(0, SIZE));
}

/// A caller's memory (a guest's RAM) goes through the engine without a copy, and the owner
/// that keeps it valid is dropped with the buffer, not before.
#[test]
fn caller_memory_without_a_copy() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    /// The memory and a flag set when it is released.
    struct Guest {
        _memory: Vec<u8>,
        released: Arc<AtomicBool>,
    }
    impl Drop for Guest {
        fn drop(&mut self) {
            self.released.store(true, Ordering::SeqCst);
        }
    }
    let (img, _) = image(ImageOptions::new());
    block_on(async {
        let released = Arc::new(AtomicBool::new(false));
        let mut mem = pattern(3 * 4096, 7);
        let ptr = std::ptr::NonNull::new(mem.as_mut_ptr()).unwrap();
        let len = mem.len();
        let want = mem.clone();
        // SAFETY: the Vec's heap block does not move with the Vec, lives as long as the
        // Guest owning it, and nothing else touches it meanwhile.
        let buf = unsafe {
            IoBuf::from_raw_parts(
                ptr,
                len,
                Guest {
                    _memory: mem,
                    released: released.clone(),
                },
            )
        };
        assert!(buf.is_external());
        let (res, buf) = img.write_at(buf, 8192).await;
        res.unwrap();
        assert!(
            !released.load(Ordering::SeqCst),
            "released while the caller has the buffer"
        );
        assert_eq!(
            buf.as_ptr(),
            ptr.as_ptr().cast_const(),
            "the same memory, not a copy"
        );
        drop(buf);
        assert!(released.load(Ordering::SeqCst), "released with the buffer");
        let back = img.read(8192, len as u64).await.unwrap();
        assert!(back[..] == want[..]);
        img.close().await.unwrap();
    });
}
