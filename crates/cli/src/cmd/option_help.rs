//! `-o help` (or `-o ?`) of create, convert and amend: the options of a format, listed as
//! qemu-img 10 lists them (sorted by name, `  NAME=<TYPE>` padded to 22 columns, ` - `,
//! the description).

use anyhow::{bail, Result};

/// A creation or amendment option: its name, its type as qemu-img shows it, its
/// description.
type Opt = (&'static str, &'static str, &'static str);

const STR: &str = "str";
const SIZE: &str = "size";
const NUM: &str = "num";
const BOOL: &str = "bool (on/off)";

/// The options of qcow2 that both create and amend know.
const QCOW2_COMMON: &[Opt] = &[
    ("backing_file", STR, "File name of a base image"),
    ("backing_fmt", STR, "Image format of the base image"),
    ("compat", STR, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("data_file", STR, "File name of an external data file"),
    (
        "data_file_raw",
        BOOL,
        "The external data file must stay valid as a raw image",
    ),
    (
        "encrypt.iter-time",
        NUM,
        "Time to spend in PBKDF in milliseconds",
    ),
    ("lazy_refcounts", BOOL, "Postpone refcount updates"),
    (
        "refcount_bits",
        NUM,
        "Width of a reference count entry in bits",
    ),
    ("size", SIZE, "Virtual disk size"),
];

/// The options of qcow2 that only create knows.
const QCOW2_CREATE: &[Opt] = &[
    ("cluster_size", SIZE, "qcow2 cluster size"),
    (
        "compression_type",
        STR,
        "Compression method used for image cluster compression",
    ),
    (
        "encrypt.cipher-alg",
        STR,
        "Name of encryption cipher algorithm",
    ),
    ("encrypt.cipher-mode", STR, "Name of encryption cipher mode"),
    (
        "encrypt.format",
        STR,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    ("encrypt.hash-alg", STR, "Name of encryption hash algorithm"),
    ("encrypt.ivgen-alg", STR, "Name of IV generator algorithm"),
    (
        "encrypt.ivgen-hash-alg",
        STR,
        "Name of IV generator hash algorithm",
    ),
    (
        "encrypt.key-secret",
        STR,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    (
        "encryption",
        BOOL,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    ("extended_l2", BOOL, "Extended L2 tables"),
    (
        "preallocation",
        STR,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
];

/// The options of qcow2 that only amend knows.
const QCOW2_AMEND: &[Opt] = &[
    (
        "encrypt.keyslot",
        NUM,
        "Select a single keyslot to modify explicitly",
    ),
    (
        "encrypt.new-secret",
        STR,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    (
        "encrypt.old-secret",
        STR,
        "Select all keyslots that match this password",
    ),
    (
        "encrypt.state",
        STR,
        "Select new state of affected keyslots (active/inactive)",
    ),
];

/// The options of raw images.
const RAW: &[Opt] = &[("size", SIZE, "Virtual disk size")];

/// The options of the file protocol (a named target adds them).
const FILE: &[Opt] = &[
    (
        "extent_size_hint",
        SIZE,
        "Extent size hint for the image file, 0 to disable",
    ),
    (
        "nocow",
        BOOL,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    (
        "preallocation",
        STR,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    ("size", SIZE, "Virtual disk size"),
];

/// Whether `-o` lists (each may hold several options) ask for help: an option `help` or
/// `?`.
pub fn wants_help(options: &[String]) -> bool {
    options.iter().any(|list| {
        list.replace(",,", "\0")
            .split(',')
            .any(|o| o == "help" || o == "?")
    })
}

/// Prints the options `format` images are created with (qemu-img's words for create and
/// convert); with a `target` name the file protocol's too.
pub fn print_create_help(format: &str, target: Option<&str>) -> Result<()> {
    let mut opts: Vec<Opt> = match format {
        "qcow2" => [QCOW2_COMMON, QCOW2_CREATE].concat(),
        "raw" => RAW.to_vec(),
        other => bail!("Unknown file format '{other}'"),
    };
    match target {
        Some(_) => {
            // The format's own description wins for a name both have.
            for o in FILE {
                if !opts.iter().any(|x| x.0 == o.0) {
                    opts.push(*o);
                }
            }
            println!("Supported options:");
            print_sorted(opts);
        }
        None => {
            println!("Supported {format} options:");
            print_sorted(opts);
            println!(
                "\nThe protocol level may support further options.\n\
                 Specify the target filename to include those options."
            );
        }
    }
    Ok(())
}

/// Prints the options qcow2 images can be amended with (`qemu-img amend -o help`).
pub fn print_amend_help() {
    println!("Amend options for 'qcow2':");
    print_sorted([QCOW2_COMMON, QCOW2_AMEND].concat());
}

fn print_sorted(mut opts: Vec<Opt>) {
    opts.sort_by_key(|o| o.0);
    for (name, ty, help) in opts {
        println!("  {:<22} - {help}", format!("{name}=<{ty}>"));
    }
}
