//! `qimg info`: what an image is, in qemu-img's words and JSON field names.

use crate::names::{ImageName, NameArgs};
use crate::util::{self, open_disk_alone, qemu_json, size_to_str, OutputFormat};
use anyhow::{bail, Result};
use blockio::FileOpener;
use qcow2_engine::{Disk, Image};
use qcow2_format::{BitmapDirectoryEntry, CompressionType};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The arguments of `qimg info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,
    /// Open in shared mode (qemu-img's -U): coexist with a writer of the image.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg info`: exit status 0, or 1 with the error on stderr.
pub async fn run(args: InfoArgs) -> ExitCode {
    util::exit(1, info(&args).await)
}

async fn info(args: &InfoArgs) -> Result<()> {
    let (output, backing_chain) = (args.output, args.backing_chain);
    let mut infos = Vec::new();
    // Each image alone (its backing file may be gone, as qemu-img allows for one image);
    // with --backing-chain, the backing files one by one, as their parents name them,
    // before anything is printed.
    let mut seen = HashSet::new();
    let mut next = Some(args.names.name(&args.image, args.format.as_deref())?);
    while let Some(name) = next.take() {
        let path = name.path().to_path_buf();
        if !seen.insert(path.clone()) {
            bail!(
                "Backing file '{}' creates an infinite loop.",
                path.display()
            );
        }
        let disk = open_disk_alone(&name, args.force_share).await?;
        let described = describe(&disk).await;
        if let (true, Disk::Qcow2(img)) = (backing_chain, &disk) {
            let h = img.header();
            next = h
                .backing_file
                .as_deref()
                .map(|b| {
                    let backing = qcow2_engine::resolve_backing(&path, b);
                    ImageName::parse(&backing, false, h.backing_format())
                })
                .transpose()?;
        }
        disk.close().await?;
        infos.push(described?);
    }
    match output {
        OutputFormat::Json => {
            let v = if backing_chain {
                Value::Array(infos)
            } else {
                infos.pop().expect("one image")
            };
            println!("{}", qemu_json(&v));
        }
        OutputFormat::Human => {
            for (i, v) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(v);
            }
        }
    }
    Ok(())
}

/// The disk space a file takes (its allocated blocks), as qemu-img's "actual-size".
fn actual_size(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn file_child(path: &Path, file_len: u64) -> Value {
    json!([{
        "name": "file",
        "info": {
            "children": [],
            // The file layer reports whole sectors, as QEMU's does.
            "virtual-size": file_len.div_ceil(512) * 512,
            "filename": path.display().to_string(),
            "format": "file",
            "actual-size": actual_size(path),
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false,
        }
    }])
}

async fn describe(disk: &Disk<FileOpener>) -> Result<Value> {
    let path = disk.path();
    let mut m = Map::new();
    match disk {
        Disk::Raw(raw) => {
            m.insert("children".into(), file_child(path, raw.size()));
            m.insert("virtual-size".into(), json!(raw.size()));
            m.insert("filename".into(), json!(path.display().to_string()));
            m.insert("format".into(), json!("raw"));
            m.insert("actual-size".into(), json!(actual_size(path)));
            m.insert("dirty-flag".into(), json!(false));
        }
        Disk::Qcow2(img) => describe_qcow2(img, &mut m).await?,
    }
    Ok(Value::Object(m))
}

async fn describe_qcow2(img: &Image<FileOpener>, m: &mut Map<String, Value>) -> Result<()> {
    let path = img.path();
    let h = img.header();
    m.insert("children".into(), file_child(path, img.file_len()));
    let snapshots = img.snapshots().await?;
    if !snapshots.is_empty() {
        let list: Vec<Value> = snapshots
            .iter()
            .map(|s| {
                // QEMU leaves icount out when it is unknown (-1).
                let mut v = json!({
                    "icount": s.icount.unwrap_or(u64::MAX),
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "name": s.name,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                    "id": s.id,
                    "vm-state-size": s.vm_state_size,
                });
                if s.icount.is_none_or(|i| i == u64::MAX) {
                    v.as_object_mut().map(|o| o.remove("icount"));
                }
                v
            })
            .collect();
        m.insert("snapshots".into(), Value::Array(list));
    }
    if let Some(fmt) = h.backing_format() {
        m.insert("backing-filename-format".into(), json!(fmt));
    }
    m.insert("virtual-size".into(), json!(img.size()));
    m.insert("filename".into(), json!(path.display().to_string()));
    m.insert("cluster-size".into(), json!(img.cluster_size()));
    m.insert("format".into(), json!("qcow2"));
    m.insert("actual-size".into(), json!(actual_size(path)));

    let mut data = Map::new();
    data.insert(
        "compat".into(),
        json!(if h.version >= 3 { "1.1" } else { "0.10" }),
    );
    data.insert(
        "compression-type".into(),
        json!(match h.compression_type {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }),
    );
    if h.version >= 3 {
        data.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        let bitmaps = img.bitmaps().await?;
        if !bitmaps.is_empty() {
            data.insert(
                "bitmaps".into(),
                Value::Array(bitmaps.iter().map(bitmap_json).collect()),
            );
        }
    }
    data.insert("refcount-bits".into(), json!(h.refcount_width().bits()));
    if h.has_data_file() {
        if let Some(name) = h.data_file_name() {
            data.insert("data-file".into(), json!(name));
        }
        data.insert("data-file-raw".into(), json!(h.data_file_raw()));
    }
    if h.version >= 3 {
        data.insert("corrupt".into(), json!(h.is_corrupt()));
        data.insert("extended-l2".into(), json!(h.extended_l2()));
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": Value::Object(data)}),
    );
    if let Some(name) = &h.backing_file {
        let full = qcow2_engine::resolve_backing(img.path(), name)
            .display()
            .to_string();
        m.insert("full-backing-filename".into(), json!(full));
        m.insert("backing-filename".into(), json!(name));
    }
    m.insert("dirty-flag".into(), json!(h.is_dirty()));
    Ok(())
}

fn bitmap_json(b: &BitmapDirectoryEntry) -> Value {
    let mut flags = Vec::new();
    if b.flags & BitmapDirectoryEntry::IN_USE != 0 {
        flags.push("in-use");
    }
    if b.flags & BitmapDirectoryEntry::AUTO != 0 {
        flags.push("auto");
    }
    json!({
        "flags": flags,
        "name": b.name,
        "granularity": 1u64 << b.granularity_bits.min(63),
    })
}

fn print_human(v: &Value) {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or_default();
    println!("image: {}", s("filename"));
    println!("file format: {}", s("format"));
    println!(
        "virtual size: {} ({} bytes)",
        size_to_str(n("virtual-size")),
        n("virtual-size")
    );
    println!("disk size: {}", size_to_str(n("actual-size")));
    if v.get("cluster-size").is_some() {
        println!("cluster_size: {}", n("cluster-size"));
    }
    if v.get("backing-filename").is_some() {
        let (b, full) = (s("backing-filename"), s("full-backing-filename"));
        if b == full {
            println!("backing file: {b}");
        } else {
            println!("backing file: {b} (actual path: {full})");
        }
    }
    if v.get("backing-filename-format").is_some() {
        println!("backing file format: {}", s("backing-filename-format"));
    }
    if let Some(Value::Array(snaps)) = v.get("snapshots") {
        println!("Snapshot list:");
        println!("{}", super::snapshot::table_header());
        for sn in snaps {
            let g = |k: &str| sn.get(k).and_then(Value::as_u64).unwrap_or_default();
            let icount = sn.get("icount").and_then(Value::as_u64);
            println!(
                "{}",
                super::snapshot::table_row(
                    sn.get("id").and_then(Value::as_str).unwrap_or_default(),
                    sn.get("name").and_then(Value::as_str).unwrap_or_default(),
                    g("vm-state-size"),
                    u32::try_from(g("date-sec")).unwrap_or(u32::MAX),
                    g("vm-clock-sec") * 1_000_000_000 + g("vm-clock-nsec"),
                    icount,
                )
            );
        }
    }
    if let Some(data) = v
        .pointer("/format-specific/data")
        .and_then(Value::as_object)
    {
        println!("Format specific information:");
        for (k, val) in data {
            let key = k.replace('-', " ");
            match val {
                Value::Array(items) => {
                    println!("    {key}:");
                    for (i, item) in items.iter().enumerate() {
                        println!("        [{i}]:");
                        if let Some(o) = item.as_object() {
                            for (ik, iv) in o {
                                print_human_field(ik, iv);
                            }
                        }
                    }
                }
                Value::String(sv) => println!("    {key}: {sv}"),
                other => println!("    {key}: {other}"),
            }
        }
    }
    if let Some(file) = v.pointer("/children/0/info") {
        let n = |k: &str| file.get(k).and_then(Value::as_u64).unwrap_or_default();
        println!("Child node '/file':");
        println!(
            "    filename: {}",
            file.get("filename")
                .and_then(Value::as_str)
                .unwrap_or_default()
        );
        println!("    protocol type: file");
        println!(
            "    file length: {} ({} bytes)",
            size_to_str(n("virtual-size")),
            n("virtual-size")
        );
        println!("    disk size: {}", size_to_str(n("actual-size")));
    }
}

/// One field of a listed item (a bitmap), at qemu-img's indentation: strings bare, lists
/// one `[i]: value` a line.
fn print_human_field(key: &str, v: &Value) {
    let bare = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match v {
        Value::Array(items) => {
            println!("            {key}:");
            for (i, item) in items.iter().enumerate() {
                println!("                [{i}]: {}", bare(item));
            }
        }
        other => println!("            {key}: {}", bare(other)),
    }
}
