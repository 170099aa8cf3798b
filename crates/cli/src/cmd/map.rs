//! `qimg map`: where each guest range's data lives, as qemu-img map prints it.

use crate::util::open_disk;
use crate::OutputFormat;
use anyhow::{bail, Result};
use std::path::Path;

/// Runs `qimg map`.
pub async fn run(
    path: &Path,
    format: Option<&str>,
    output: OutputFormat,
    force_share: bool,
) -> Result<()> {
    let disk = open_disk(path, format, force_share).await?;
    let entries = disk.map(0, disk.size()).await?;
    match output {
        OutputFormat::Json => {
            let lines: Vec<String> = entries
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                    );
                    if let Some(o) = e.offset {
                        s.push_str(&format!(", \"offset\": {o}"));
                    }
                    s.push('}');
                    s
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in &entries {
                if e.data && e.offset.is_none() {
                    bail!("File contains external, encrypted or compressed clusters.");
                }
                if e.data && !e.zero {
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(e.offset.unwrap_or(0)),
                        e.filename
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
