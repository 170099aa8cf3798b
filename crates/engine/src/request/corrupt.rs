//! Corruption found while running: the corrupt bit goes to disk (as QEMU does) and writes
//! stop.

use crate::image::Image;
use crate::Error;
use blockio::Opener;
use qcow2_format::features;

impl<O: Opener> Image<O> {
    /// Corruption found while running marks the image corrupt on disk (like QEMU) and stops
    /// further writes; other errors pass through.
    pub(crate) async fn on_error(&self, e: Error) -> Error {
        if !matches!(e, Error::Corrupt { .. }) || self.read_only {
            return e;
        }
        if !self
            .marked_corrupt
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let mut meta = self.meta.lock().await;
            meta.header.incompatible_features |= features::INCOMPAT_CORRUPT;
            let header = meta.header.clone();
            // Best effort: the error the caller sees is the corruption itself.
            if self.store().write_header(&header).await.is_ok() {
                let _ = self.files.sync().await;
            }
            drop(meta);
            tracing::error!(path = %self.path().display(), error = %e, "image marked corrupt");
        }
        e
    }
}
