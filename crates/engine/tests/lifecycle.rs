//! Dropping a writable image without `close()` loses the changes acknowledged since the last
//! flush: the drop says so, loudly (a `tracing` error naming the image), and says nothing
//! when nothing is lost.

use blockio::{MemoryBackend, MemoryOpener};
use qcow2_engine::{create, CreateOptions, Image, ImageOptions};
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Records the error events: their fields, as text.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", field.name(), value));
    }
}

impl Subscriber for Errors {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() == Level::ERROR
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Runs `steps` on a fresh image and returns the errors logged meanwhile.
fn logged(
    steps: impl FnOnce(Image<MemoryOpener>) -> futures::future::BoxFuture<'static, ()>,
) -> Vec<String> {
    let errors = Errors::default();
    let seen = errors.clone();
    tracing::subscriber::with_default(errors, || {
        futures::executor::block_on(async {
            let mem = MemoryOpener::new();
            mem.insert("/img.qcow2", MemoryBackend::new());
            create(&mem, "/img.qcow2", &CreateOptions::new().size(1 << 20))
                .await
                .unwrap();
            let img = Image::open(mem, "/img.qcow2", ImageOptions::new())
                .await
                .unwrap();
            steps(img).await;
        })
    });
    let v = seen.0.lock().unwrap().clone();
    v
}

#[test]
fn dropping_an_image_with_unflushed_writes_is_reported() {
    let errors = logged(|img| {
        Box::pin(async move {
            img.write(0, &[1; 4096]).await.unwrap();
            drop(img);
        })
    });
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("dropped without close"), "{}", errors[0]);
    assert!(
        errors[0].contains("/img.qcow2"),
        "names the image: {}",
        errors[0]
    );
    assert!(errors[0].contains("unflushed_changes=1"), "{}", errors[0]);
}

#[test]
fn dropping_a_flushed_or_closed_image_says_nothing() {
    let errors = logged(|img| {
        Box::pin(async move {
            img.write(0, &[1; 4096]).await.unwrap();
            img.flush().await.unwrap();
            drop(img);
        })
    });
    assert!(errors.is_empty(), "{errors:?}");
    let errors = logged(|img| {
        Box::pin(async move {
            img.write(0, &[1; 4096]).await.unwrap();
            img.close().await.unwrap();
        })
    });
    assert!(errors.is_empty(), "{errors:?}");
}
