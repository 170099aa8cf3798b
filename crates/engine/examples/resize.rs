//! Resizing an image with qcow2-engine: grow it (across L1 table growth, then with
//! preallocated metadata), shrink it below data that is then gone, and see what each
//! refusal says; reads and writes keep going on the same `Image` throughout.
//!
//! ```text
//! cargo run -p qcow2-engine --example resize
//! ```
//!
//! The image lives in a temporary directory; at the end it is closed and checked by the
//! engine's own `check` (no corruption, no leak).

use blockio::FileOpener;
use qcow2_engine::{
    CreateOptions, Error, Image, ImageOptions, Preallocation, ResizeError, ResizeOptions,
};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const M: u64 = 1 << 20;

fn main() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("resize.qcow2");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // 512-byte clusters: one L2 table maps 32 KiB, so the L1 table grows soon.
        let opts = CreateOptions::new().size(M).cluster_size(512);
        qcow2_engine::create(&FileOpener, &path, &opts).await?;
        let img = Image::open(FileOpener, &path, ImageOptions::new()).await?;
        img.write(0, &[0xaa; 4096]).await?;
        report(&img, "created, 4 KiB written").await;

        // Grow: the L1 table needs 128 entries instead of 32; a new table is written and
        // counted before the header names it, the old one freed after.
        img.resize(4 * M, ResizeOptions::new()).await?;
        img.write(3 * M, &[0xbb; 4096]).await?;
        report(&img, "grown to 4 MiB, 4 KiB written at 3 MiB").await;

        // Grow with every L2 table and data cluster of the new area allocated up front.
        let prealloc = ResizeOptions::new().preallocation(Preallocation::Metadata);
        img.resize(6 * M, prealloc).await?;
        report(&img, "grown to 6 MiB, metadata preallocated").await;

        // A shrink must be asked for; then everything past the new end is deallocated, and
        // the file is cut after the last cluster still in use.
        match img.resize(2 * M, ResizeOptions::new()).await {
            Err(Error::Resize(e @ ResizeError::ShrinkNotAllowed { .. })) => {
                println!("refused: {e}");
            }
            other => return Err(format!("expected a refusal, got {other:?}").into()),
        }
        img.resize(2 * M, ResizeOptions::new().shrink(true)).await?;
        report(&img, "shrunk to 2 MiB").await;
        if let Err(e) = img.read(3 * M, 4096).await {
            println!("reading at 3 MiB now: {e}");
        }

        // Grown back, what was cut is gone: the area reads as zeros.
        img.resize(4 * M, ResizeOptions::new()).await?;
        let back = img.read(3 * M, 4096).await?;
        println!(
            "grown back to 4 MiB: 3 MiB reads {}",
            if back.iter().all(|&b| b == 0) {
                "zeros"
            } else {
                "old data (wrong)"
            }
        );
        match img.resize(4 * M + 1, ResizeOptions::new()).await {
            Err(e) => println!("refused: {e}"),
            Ok(()) => return Err("an unaligned size was accepted".into()),
        }

        let report = img.check().await?;
        println!(
            "check: {} corruptions, {} leaks",
            report.corruptions, report.leaks
        );
        img.close().await?;
        Res::Ok(())
    })
}

async fn report(img: &Image<FileOpener>, what: &str) {
    println!(
        "{what}: size {} bytes, file {} bytes",
        img.size(),
        img.file_len()
    );
}
