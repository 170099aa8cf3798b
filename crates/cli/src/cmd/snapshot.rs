//! `qimg snapshot`: list, create, apply and delete internal snapshots (qemu-img snapshot),
//! with qemu-img's options, output, messages and exit status; and the snapshot table as
//! qemu-img prints it (`snapshot -l`, `info`).

use crate::names::NameArgs;
use crate::util::size_to_str;
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{Error, Image, ImageOptions, SnapshotLookup};
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of `qimg snapshot`.
#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot with this name.
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Apply the snapshot with this ID or name (the active layer becomes the snapshot).
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete the snapshot with this name.
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Image format (only qcow2 has internal snapshots).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Open in shared mode (qemu-img's -U; with -l only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg snapshot`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: SnapshotArgs) -> ExitCode {
    crate::util::exit(1, snapshot(&args).await)
}

async fn snapshot(args: &SnapshotArgs) -> Result<()> {
    let actions = usize::from(args.list)
        + usize::from(args.create.is_some())
        + usize::from(args.apply.is_some())
        + usize::from(args.delete.is_some());
    if actions > 1 {
        bail!(
            "Cannot mix '-l', '-a', '-c', '-d'\nTry '{} snapshot --help' for more info",
            crate::util::invoked_as()
        );
    }
    if args.format.as_deref().is_some_and(|f| f != "qcow2") {
        bail!("qimg has internal snapshots in qcow2 images only");
    }
    let list = actions == 0 || args.list;
    if args.force_share && !list {
        bail!("--force-share/-U can only be used with -l (listing)");
    }
    let opts = ImageOptions::new()
        .read_only(list)
        .force_share(args.force_share);
    let name = args.names.name(&args.image, args.format.as_deref())?;
    let img = crate::util::open_image(&name, opts).await?;
    let r = act(args, &img).await;
    let closed = img.close().await;
    r?;
    closed?;
    Ok(())
}

async fn act(args: &SnapshotArgs, img: &Image<FileOpener>) -> Result<()> {
    if let Some(name) = &args.create {
        img.snapshot_create(name).await.map_err(|e| match e {
            // QEMU's refcount update fails with EINVAL.
            Error::RefcountOverflow { .. } => {
                anyhow!("Could not create snapshot '{name}': Invalid argument")
            }
            e => anyhow!("Could not create snapshot '{name}': {e}"),
        })?;
    } else if let Some(name) = &args.apply {
        img.snapshot_apply(SnapshotLookup::IdOrName(name))
            .await
            .map_err(|e| match e {
                Error::SnapshotNotFound { .. } => anyhow!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: No such file \
                     or directory"
                ),
                e => anyhow!("Could not apply snapshot '{name}': {e}"),
            })?;
    } else if let Some(name) = &args.delete {
        img.snapshot_delete(SnapshotLookup::Name(name))
            .await
            .map_err(|e| match e {
                Error::SnapshotNotFound { .. } => {
                    anyhow!("Could not delete snapshot '{name}': snapshot not found")
                }
                e => anyhow!("Could not delete snapshot '{name}': {e}"),
            })?;
    } else {
        let snapshots = img.snapshots().await?;
        if !snapshots.is_empty() {
            println!("Snapshot list:");
            println!("{}", table_header());
            for s in &snapshots {
                println!(
                    "{}",
                    table_row(
                        &s.id,
                        &s.name,
                        s.vm_state_size,
                        s.date_sec,
                        s.vm_clock_nsec,
                        s.icount
                    )
                );
            }
        }
    }
    Ok(())
}

/// The header line of qemu-img's snapshot table (`bdrv_snapshot_dump`).
pub fn table_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One snapshot as a line of qemu-img's snapshot table. The date is printed in UTC (QEMU
/// prints local time: the same on a machine in UTC); an icount of -1 (or none) is blank.
pub fn table_row(
    id: &str,
    name: &str,
    vm_state_size: u64,
    date_sec: u32,
    vm_clock_nsec: u64,
    icount: Option<u64>,
) -> String {
    let secs = vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        vm_clock_nsec / 1_000_000 % 1000
    );
    let icount = icount
        .filter(|&i| i != u64::MAX)
        .map(|i| i.to_string())
        .unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        id,
        name,
        size_to_str(vm_state_size),
        utc_date(date_sec),
        clock,
        icount
    )
}

/// `%Y-%m-%d %H:%M:%S` of a Unix time, in UTC.
fn utc_date(secs: u32) -> String {
    let days = i64::from(secs / 86_400);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_print_as_qemu_img_does() {
        assert_eq!(
            table_header(),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        assert_eq!(
            table_row("1", "s1", 0, 1_796_621_580, 0, Some(0)),
            "1       s1                    0 B 2026-12-07 05:33:00  0000:00:00.000          0"
        );
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
    }
}
