//! Unit tests of the allocator model and the plan.

use super::file::*;
use super::sim::*;
use super::*;
use crate::Image;

#[test]
pub(super) fn ranges_merge_and_split() {
    let mut r = Ranges::default();
    r.insert(0, 3);
    r.insert(5, 7);
    r.insert(3, 5);
    assert_eq!(r.0.len(), 1);
    assert!(r.covers(0, 7));
    r.remove(2, 4);
    assert!(r.contains(1) && !r.contains(2) && !r.contains(3) && r.contains(4));
    assert_eq!(r.first_in(2, 10), Some((4, 7)));
    assert_eq!(r.last_below(100), Some(6));
    assert_eq!(r.last_below(5), Some(4));
    let runs: Vec<_> = r.runs_in(1, 6).collect();
    assert_eq!(runs, vec![(1, 2), (4, 6)]);
}

#[test]
pub(super) fn small_image_layout_matches_qemu() {
    // qemu-img create -f qcow2 img 1M: reftable at 0x10000, refblock at 0x20000, L1 at
    // 0x30000, file length 0x30008.
    let opts = CreateOptions::new().size(1 << 20);
    let p = plan(&opts, 1 << 20).unwrap();
    assert_eq!(p.sim.reftable_offset, 0x10000);
    assert_eq!(p.sim.reftable[0], 0x20000);
    assert_eq!(p.sim.l1_offset, 0x30000);
    assert_eq!(p.file_len, 0x30008);
}

#[test]
pub(super) fn limits_are_qemus() {
    let opts = CreateOptions::new().cluster_size(512);
    assert!(plan(&opts, 128 << 30).is_ok());
    assert_eq!(
        plan(&opts, (128 << 30) + 512).err(),
        Some(CreateError::TooLarge)
    );
}

#[tokio::test]
pub(super) async fn creates_in_memory_and_opens() {
    let opener = blockio::MemoryOpener::new();
    let opts = CreateOptions::new()
        .size(4 << 20)
        .preallocation(Preallocation::Metadata);
    create(&opener, "img", &opts).await.unwrap();
    let img = Image::open(opener.clone(), "img", ImageOptions::new().read_only(true))
        .await
        .unwrap();
    assert_eq!(img.size(), 4 << 20);
    assert_eq!(&img.read(0, 512).await.unwrap()[..], &[0u8; 512][..]);
}
