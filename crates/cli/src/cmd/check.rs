//! `qimg check`: `qemu-img check` for qcow2 images, with its output (human and JSON), its
//! diagnostic lines on stderr and its exit codes (0 clean, 1 check failed, 2 corruptions,
//! 3 leaks only, 63 format without checks).

use crate::names::{ImageName, NameArgs};
use crate::util::{open_disk, program, OutputFormat};
use blockio::FileOpener;
use qcow2_engine::{CheckReport, Disk, Image, ImageOptions, RepairMode};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status when the format has no consistency check (raw).
const EXIT_NOT_SUPPORTED: u8 = 63;

/// What `check -r` repairs.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Every error that can be repaired.
    All,
}

/// The arguments of `qimg check`.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair leaks only, or all errors that can be repaired (opens the image read-write).
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<RepairArg>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Print nothing on stdout (diagnostics still go to stderr).
    #[arg(short = 'q')]
    quiet: bool,
    /// Open in shared mode (qemu-img's -U): check an image another process writes (read-only checks only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg check` and returns the exit status.
pub async fn run(args: CheckArgs) -> ExitCode {
    let repair = args.repair.map(|r| match r {
        RepairArg::Leaks => RepairMode::Leaks,
        RepairArg::All => RepairMode::All,
    });
    ExitCode::from(check_and_report(&args, repair).await)
}

/// Checks (or repairs) the image, prints the report and returns the exit status.
async fn check_and_report(args: &CheckArgs, repair: Option<RepairMode>) -> u8 {
    let name = match args.names.name(&args.image, args.format.as_deref()) {
        Ok(name) => name,
        Err(e) => {
            eprintln!("{}: {e:#}", program());
            return CheckReport::EXIT_CHECK_FAILED;
        }
    };
    let report = match check(&name, repair, args.force_share).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!("{}: This image format does not support checks", program());
            return EXIT_NOT_SUPPORTED;
        }
        Err(e) => {
            eprintln!("{}: {e:#}", program());
            return CheckReport::EXIT_CHECK_FAILED;
        }
    };
    for line in &report.messages {
        eprintln!("{line}");
    }
    if report.messages_suppressed > 0 {
        eprintln!(
            "{}: {} more diagnostic lines not shown",
            program(),
            report.messages_suppressed
        );
    }
    if let Some(why) = &report.failure {
        eprintln!("{}: Check failed: {why}", program());
        return CheckReport::EXIT_CHECK_FAILED;
    }
    if !args.quiet {
        let filename = name.path().display().to_string();
        match args.output {
            OutputFormat::Human => print!("{}", human(&report)),
            OutputFormat::Json => println!("{}", json(&report, &filename, "qcow2")),
        }
    }
    if report.check_errors > 0 {
        eprintln!("{}: Check failed", program());
    }
    report.exit_code()
}

/// Opens the image (read-write for a repair) and checks it; `None` when it is not qcow2.
async fn check(
    name: &ImageName,
    repair: Option<RepairMode>,
    force_share: bool,
) -> anyhow::Result<Option<CheckReport>> {
    let disk = open_disk(name, force_share).await?;
    let report = match (&disk, repair) {
        (Disk::Raw(_), _) => return Ok(None),
        (Disk::Qcow2(img), None) => img.check().await?,
        (Disk::Qcow2(_), Some(mode)) => {
            drop(disk);
            let options = name.options(ImageOptions::new().force_share(force_share))?;
            let img = Image::open_for_repair(FileOpener, name.path(), options)
                .await
                .map_err(|e| name.could_not_open(e))?;
            img.repair(mode).await?
        }
    };
    Ok(Some(report))
}

/// The text `qemu-img check` prints on stdout.
pub fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.repaired() {
        out.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked \
             clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let allocated = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            allocated * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / allocated,
            r.compressed_clusters as f64 * 100.0 / allocated,
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// The JSON `qemu-img check --output=json` prints: `check-errors`, `filename` and `format`
/// always, the other numbers only when non-zero; keys in qemu-img's order, four-space indent.
pub fn json(r: &CheckReport, filename: &str, format: &str) -> String {
    let mut m = Map::new();
    let opt = |m: &mut Map<String, Value>, key: &str, v: u64| {
        if v != 0 {
            m.insert(key.into(), v.into());
        }
    };
    opt(&mut m, "image-end-offset", r.image_end_offset);
    opt(&mut m, "compressed-clusters", r.compressed_clusters);
    opt(&mut m, "total-clusters", r.total_clusters);
    opt(&mut m, "corruptions", r.corruptions);
    opt(&mut m, "corruptions-fixed", r.corruptions_fixed);
    m.insert("check-errors".into(), r.check_errors.into());
    opt(&mut m, "leaks", r.leaks);
    opt(&mut m, "leaks-fixed", r.leaks_fixed);
    opt(&mut m, "allocated-clusters", r.allocated_clusters);
    m.insert("filename".into(), filename.into());
    m.insert("format".into(), format.into());
    opt(&mut m, "fragmented-clusters", r.fragmented_clusters);
    crate::util::qemu_json(&Value::Object(m))
}
