//! The refcount table moves when it fills up, and the clusters of the old table are freed and
//! handed out again. Whatever reads the refcounts afterwards must follow the table to its new
//! place: block status (`Disk::map`) asks, on first use, whether the image looks
//! metadata-preallocated by counting refcounts, and once read the table at the offset it had
//! when the image was opened, by then guest data.

use blockio::{MemoryBackend, MemoryOpener};
use qcow2_engine::{create, CreateOptions, Disk, ImageFormat, ImageOptions};

const CS: u64 = 512;

#[test]
fn block_status_reads_the_moved_refcount_table() {
    futures::executor::block_on(async {
        let mem = MemoryOpener::new();
        mem.insert("/img.qcow2", MemoryBackend::new());
        // 512-byte clusters, 16-bit refcounts: the first table (one cluster, 64 blocks of 256
        // clusters) covers 8 MiB of file; 9 MiB of data outgrow it.
        let size = 16 << 20;
        let opts = CreateOptions::new().size(size).cluster_size(CS);
        create(&mem, "/img.qcow2", &opts).await.unwrap();
        let disk = Disk::open(
            mem.clone(),
            "/img.qcow2",
            Some(ImageFormat::Qcow2),
            ImageOptions::new(),
        )
        .await
        .unwrap();
        let img = disk.as_qcow2().unwrap();
        let old_table = img.header().refcount_table_offset;
        // The L2 table for the guest cluster written last, in place before anything moves.
        let last = (12 << 20) + CS;
        img.write(last - CS, &[0x22; CS as usize]).await.unwrap();
        let chunk = vec![0x11u8; 1 << 20];
        for i in 0..9u64 {
            img.write(i << 20, &chunk).await.unwrap();
        }
        // Twice: the move, then (its header switch on disk) the old table's clusters freed.
        img.flush().await.unwrap();
        img.flush().await.unwrap();
        // Garbage for a refcount table, written where the engine allocates next: the old
        // table's cluster, the lowest one free.
        img.write(last, &[0xff; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let ext = img.block_status(last, CS).await.unwrap();
        let host = match ext[0].kind {
            qcow2_engine::ExtentKind::Data { host, .. } => host,
            k => panic!("not data: {k:?}"),
        };
        assert_eq!(
            host, old_table,
            "the old table's cluster was not reused: no test"
        );
        let map = disk
            .map(0, size)
            .await
            .expect("block status after the table moved");
        disk.close().await.unwrap();
        let again = Disk::open(
            mem,
            "/img.qcow2",
            Some(ImageFormat::Qcow2),
            ImageOptions::new().read_only(true),
        )
        .await
        .unwrap();
        assert_eq!(
            map,
            again.map(0, size).await.unwrap(),
            "the map differs after a reopen"
        );
    });
}
