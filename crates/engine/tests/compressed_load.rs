//! Compressed clusters under load, on a real file and a multi-thread runtime: compressed
//! writes packed into shared host clusters, some of them dropped after their first poll
//! (I9), then overwrites and discards of those clusters racing reads (I2, I3). QEMU must find
//! the image clean (no leak: every shared host cluster freed exactly when its last
//! compressed cluster went) and read what the model says.

use blockio::{FileOpener, IoBuf};
use futures::FutureExt;
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};
use std::sync::Arc;

const CS: u64 = 4096;
const N: u64 = 48;

#[test]
fn shared_compressed_clusters_overwritten_and_discarded_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path_str(&path),
        &(N * CS).to_string(),
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let model = rt.block_on(async {
        let img = Arc::new(
            Image::open(FileOpener, &path, ImageOptions::new())
                .await
                .unwrap(),
        );
        let mut model = vec![0u8; (N * CS) as usize];
        // Clusters 40.. : compressed writes dropped after their first poll.
        for c in 40..N {
            let mut buf = IoBuf::new(CS as usize);
            buf.fill(c as u8);
            let _ = img.write_compressed(buf, c * CS).now_or_never();
        }
        let tasks: Vec<_> = (0..40)
            .map(|c| {
                let img = img.clone();
                tokio::spawn(async move {
                    let mut buf = IoBuf::new(CS as usize);
                    buf.fill(c as u8 + 1);
                    img.write_compressed(buf, c * CS).await.0.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for c in 0..40u64 {
            model[(c * CS) as usize..((c + 1) * CS) as usize].fill(c as u8 + 1);
        }
        img.flush().await.unwrap();
        // Overwrite every third, discard every third, read the rest, all at once.
        let tasks: Vec<_> = (0..40u64)
            .map(|c| {
                let img = img.clone();
                tokio::spawn(async move {
                    match c % 3 {
                        0 => img.write(c * CS + 512, &[0xee; 512]).await.unwrap(),
                        1 => img.discard(c * CS, CS).await.unwrap(),
                        _ => {
                            let d = img.read(c * CS, CS).await.unwrap();
                            assert!(d.iter().all(|&b| b == c as u8 + 1), "cluster {c}");
                        }
                    }
                    img.flush().await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for c in 0..40u64 {
            let at = (c * CS) as usize;
            match c % 3 {
                0 => model[at + 512..at + 1024].fill(0xee),
                1 => model[at..at + CS as usize].fill(0),
                _ => {}
            }
        }
        let img = Arc::into_inner(img).expect("tasks done");
        img.close().await.unwrap();
        model
    });
    let out = qemu_check(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("No errors"), "{text}");
    let data = raw_reference(&path, "qcow2");
    // The dropped writes: each cluster reads old (zeros) or new data.
    for c in 40..N {
        let at = (c * CS) as usize;
        let got = &data[at..at + CS as usize];
        assert!(
            got.iter().all(|&b| b == 0) || got.iter().all(|&b| b == c as u8),
            "cluster {c}"
        );
    }
    let end = (40 * CS) as usize;
    assert!(data[..end] == model[..end], "the guest data differs");
}
