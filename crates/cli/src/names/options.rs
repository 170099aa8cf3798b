//! Block options as QEMU reads them from a `json:` filename or an `--image-opts` list: one
//! flat dictionary of dotted keys (`file.filename`), checked against the options of the
//! format driver and of its `file` protocol, and reduced to the file, the format and the
//! engine's open options.

use crate::qopts::{bool_value, number_value, size_value, split_list};
use blockio::Locking;
use qcow2_engine::{BackingChoice, ImageFormat, ImageOptions};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A value of the dictionary: a scalar (JSON numbers and booleans as their text) or JSON's
/// `null` (which only `backing` takes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    Str(String),
    Null,
}

/// The options, flat, by dotted key.
pub type Map = BTreeMap<String, Val>;

/// Drivers QEMU has that qimg does not: naming one is refused as unsupported, not unknown.
const QEMU_ONLY_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Options every node takes (QEMU's `bdrv_runtime_opts` and friends), with how to check them.
const NODE_OPTIONS: &[(&str, Kind)] = &[
    ("node-name", Kind::Str),
    ("read-only", Kind::Bool),
    ("auto-read-only", Kind::Bool),
    ("force-share", Kind::Bool),
    ("cache.direct", Kind::Bool),
    ("cache.no-flush", Kind::Bool),
    ("discard", Kind::Enum(&["ignore", "off", "unmap", "on"])),
    ("detect-zeroes", Kind::Enum(&["off", "on", "unmap"])),
];

/// The qcow2 driver's own options.
const QCOW2_OPTIONS: &[(&str, Kind)] = &[
    ("lazy-refcounts", Kind::Bool),
    ("pass-discard-request", Kind::Bool),
    ("pass-discard-snapshot", Kind::Bool),
    ("pass-discard-other", Kind::Bool),
    ("discard-no-unref", Kind::Bool),
    (
        "overlap-check",
        Kind::Enum(&["none", "constant", "cached", "all"]),
    ),
    (
        "overlap-check.template",
        Kind::Enum(&["none", "constant", "cached", "all"]),
    ),
    ("overlap-check.main-header", Kind::Bool),
    ("overlap-check.active-l1", Kind::Bool),
    ("overlap-check.active-l2", Kind::Bool),
    ("overlap-check.refcount-table", Kind::Bool),
    ("overlap-check.refcount-block", Kind::Bool),
    ("overlap-check.snapshot-table", Kind::Bool),
    ("overlap-check.inactive-l1", Kind::Bool),
    ("overlap-check.inactive-l2", Kind::Bool),
    ("overlap-check.bitmap-directory", Kind::Bool),
    ("cache-size", Kind::Size),
    ("l2-cache-size", Kind::Size),
    ("l2-cache-entry-size", Kind::Size),
    ("refcount-cache-size", Kind::Size),
    ("cache-clean-interval", Kind::Number),
    ("encrypt.key-secret", Kind::Str),
];

/// The `file` protocol's own options.
const FILE_OPTIONS: &[(&str, Kind)] = &[
    ("filename", Kind::Str),
    ("locking", Kind::Enum(&["auto", "on", "off"])),
    ("aio", Kind::Enum(&["threads", "native", "io_uring"])),
    ("aio-max-batch", Kind::Number),
    ("pr-manager", Kind::Str),
    ("drop-cache", Kind::Bool),
    ("x-check-cache-dropped", Kind::Bool),
];

/// Options of QEMU's raw driver that the engine does not implement: refused by name.
const RAW_UNSUPPORTED: &[&str] = &["offset", "size"];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Str,
    Bool,
    Size,
    Number,
    Enum(&'static [&'static str]),
}

/// What the options change in how the engine opens the image.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    read_only: Option<bool>,
    force_share: Option<bool>,
    locking: Option<Locking>,
    direct: Option<bool>,
    l2_cache_size: Option<u64>,
    lazy_refcounts: Option<bool>,
    data_file: Option<PathBuf>,
    backing: Option<BackingChoice>,
    /// The first option about the backing file, which an open without one refuses.
    pub backing_key: Option<String>,
    /// Why the backing file cannot be opened: `backing` names a node.
    pub backing_ref: Option<String>,
}

impl Settings {
    /// `o` with these settings.
    pub fn apply(&self, mut o: ImageOptions) -> ImageOptions {
        if self.read_only == Some(true) {
            o = o.read_only(true);
        }
        if let Some(yes) = self.force_share {
            o = o.force_share(yes);
        }
        if let Some(l) = self.locking {
            o = o.locking(l);
        }
        if let Some(yes) = self.direct {
            o = o.direct(yes);
        }
        if let Some(n) = self.l2_cache_size {
            o = o.l2_cache_size(n);
        }
        if let Some(yes) = self.lazy_refcounts {
            o = o.lazy_refcounts(yes);
        }
        if let Some(p) = &self.data_file {
            o = o.data_file(p);
        }
        if let Some(b) = &self.backing {
            o = o.backing(b.clone());
        }
        o
    }
}

/// `key=value,...` as `--image-opts` reads it: `,,` is a comma in a value, a first item
/// without `=` is the `file`, a later one is a flag set `on`.
pub fn parse_keyval(text: &str) -> Map {
    let items = split_list(text);
    let mut map = Map::new();
    for (i, item) in items.into_iter().enumerate() {
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((k, v)) => map.insert(k.to_owned(), Val::Str(v.to_owned())),
            None if i == 0 => map.insert("file".to_owned(), Val::Str(item)),
            None => map.insert(item, Val::Str("on".to_owned())),
        };
    }
    map
}

/// The object after `json:`, flattened to dotted keys.
pub fn parse_json(text: &str) -> Result<Map, String> {
    let text = double_quoted(text);
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        let why = if e.is_eof() {
            "premature EOI".to_owned()
        } else {
            e.to_string()
        };
        format!("Could not parse the JSON options: JSON parse error, {why}")
    })?;
    let serde_json::Value::Object(obj) = value else {
        return Err("Invalid JSON object given".into());
    };
    let mut map = Map::new();
    flatten("", &obj, &mut map)?;
    Ok(map)
}

/// QEMU's JSON takes strings in single quotes too (`{'driver': 'qcow2'}`): those become
/// double-quoted strings (a `"` inside escaped, a `\'` unescaped); the rest is unchanged.
fn double_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    let mut quote = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                out.push('"');
            }
            (Some(_), '\\') => match chars.next() {
                Some('\'') => out.push('\''),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            },
            (Some(q), c) if c == q => {
                quote = None;
                out.push('"');
            }
            (Some('\''), '"') => out.push_str("\\\""),
            _ => out.push(c),
        }
    }
    out
}

fn flatten(
    prefix: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
    out: &mut Map,
) -> Result<(), String> {
    use serde_json::Value as J;
    for (k, v) in obj {
        let key = format!("{prefix}{k}");
        let val = match v {
            J::Object(inner) => {
                flatten(&format!("{key}."), inner, out)?;
                continue;
            }
            J::Null => Val::Null,
            J::String(s) => Val::Str(s.clone()),
            J::Bool(b) => Val::Str(if *b { "on" } else { "off" }.to_owned()),
            J::Number(n) => Val::Str(n.to_string()),
            J::Array(_) => {
                return Err(format!(
                    "Invalid parameter type for '{key}', expected: string"
                ))
            }
        };
        out.insert(key, val);
    }
    Ok(())
}

/// The options after the reading: checked, and reduced to what the engine opens.
pub struct Dict;

impl Dict {
    /// Checks `map` and reduces it to the file, the format (the `driver`, else `cli_format`,
    /// else probed later) and the settings.
    pub fn resolve(
        mut map: Map,
        cli_format: Option<ImageFormat>,
    ) -> Result<(PathBuf, Option<ImageFormat>, Settings), String> {
        let mut s = Settings::default();
        let driver = take_str(&mut map, "driver")?;
        let (format, protocol_only) = match driver.as_deref() {
            None => (cli_format, false),
            Some("file") => (Some(ImageFormat::Raw), true),
            Some(name) => (Some(driver_format(name)?), false),
        };
        // The `file` child: its options, without their prefix.
        let mut file = if protocol_only {
            std::mem::take(&mut map)
        } else {
            if let Some(v) = map.remove("file") {
                return Err(node_reference(&v));
            }
            let mut file = take_prefixed(&mut map, "file.");
            if let Some(v) = map.remove("filename") {
                file.insert("filename".into(), v);
            }
            if file.is_empty() {
                return Err(match driver {
                    None => "Must specify either driver or file".into(),
                    Some(_) => "A block device must be specified for \"file\"".into(),
                });
            }
            file
        };
        let path = protocol(&mut file, &mut s)?;
        if !protocol_only {
            take_backing(&mut map, &mut s)?;
            take_data_file(&mut map, &mut s)?;
            let name = format.unwrap_or_else(|| probe(&path)).name();
            node_options(&mut map, &mut s, name, "Block format", "does not support")?;
        }
        Ok((path, format, s))
    }
}

/// The format a `driver` names, or why it cannot be opened.
fn driver_format(name: &str) -> Result<ImageFormat, String> {
    match ImageFormat::from_name(name) {
        Some(f) => Ok(f),
        None if QEMU_ONLY_DRIVERS.contains(&name) => {
            Err(format!("Driver '{name}' is not supported by qimg"))
        }
        None => Err(format!("Unknown driver '{name}'")),
    }
}

/// QEMU's answer to a child given as a string: a reference to a node, which qemu-img and
/// qemu-io never have.
fn node_reference(v: &Val) -> String {
    match v {
        Val::Str(name) => format!("Cannot find device='{name}' nor node-name='{name}'"),
        Val::Null => "Invalid parameter type for 'file', expected: string".into(),
    }
}

/// The `file` protocol's options: the file name, and what they set.
fn protocol(file: &mut Map, s: &mut Settings) -> Result<PathBuf, String> {
    if let Some(d) = take_str(file, "driver")? {
        if d != "file" {
            driver_format(&d)?;
            return Err(format!(
                "Driver '{d}' is not supported by qimg as a protocol"
            ));
        }
    }
    let Some(filename) = take_str(file, "filename")? else {
        return Err("The 'file' block driver requires a file name".into());
    };
    if let Some(l) = take_checked(file, "locking", FILE_OPTIONS)? {
        s.locking = Some(match l.as_str() {
            "on" => Locking::On,
            "off" => Locking::Off,
            _ => Locking::Auto,
        });
    }
    node_options(file, s, "file", "Block protocol", "doesn't support")?;
    let filename = filename
        .strip_prefix("file:")
        .unwrap_or(&filename)
        .to_owned();
    Ok(PathBuf::from(filename))
}

/// `backing`: `null` for none, or the backing file's own options (`backing.driver`,
/// `backing.file.filename`).
fn take_backing(map: &mut Map, s: &mut Settings) -> Result<(), String> {
    match map.remove("backing") {
        Some(Val::Null) => {
            s.backing = Some(BackingChoice::None);
            s.backing_key = Some("backing".into());
        }
        Some(v) => {
            s.backing_key = Some("backing".into());
            s.backing_ref = Some(node_reference(&v));
        }
        None => {}
    }
    let mut sub = take_prefixed(map, "backing.");
    let Some(first) = sub.keys().next() else {
        return Ok(());
    };
    s.backing_key = Some(format!("backing.{first}"));
    let format = take_str(&mut sub, "driver")?
        .map(|d| driver_format(&d))
        .transpose()?;
    let path = plain_file(&mut sub, "file.", "backing file", "backing.")?;
    s.backing = Some(BackingChoice::File {
        path: PathBuf::from(path),
        format,
    });
    Ok(())
}

/// Removes the keys under `prefix` from `map`: the options of that child, without it.
fn take_prefixed(map: &mut Map, prefix: &str) -> Map {
    let keys: Vec<String> = map
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    keys.into_iter()
        .map(|k| {
            let v = map.remove(&k).expect("listed key");
            (k[prefix.len()..].to_owned(), v)
        })
        .collect()
}

/// The file name of a child that is a plain file (`{at}driver` absent or `file`,
/// `{at}filename` given, nothing else; `what` and `shown` name it in messages).
fn plain_file(sub: &mut Map, at: &str, what: &str, shown: &str) -> Result<String, String> {
    if let Some(d) = take_str(sub, &format!("{at}driver"))? {
        if d != "file" {
            driver_format(&d)?;
            return Err(format!(
                "Driver '{d}' is not supported by qimg for a {what}"
            ));
        }
    }
    let Some(path) = take_str(sub, &format!("{at}filename"))? else {
        return Err("The 'file' block driver requires a file name".into());
    };
    match sub.keys().next() {
        Some(k) => Err(format!(
            "qimg does not support the {what} option '{shown}{k}'"
        )),
        None => Ok(path),
    }
}

/// `data-file`: the external data file's options (`data-file.filename`).
fn take_data_file(map: &mut Map, s: &mut Settings) -> Result<(), String> {
    if let Some(v) = map.remove("data-file") {
        return Err(node_reference(&v));
    }
    let mut sub = take_prefixed(map, "data-file.");
    if sub.is_empty() {
        return Ok(());
    }
    let path = plain_file(&mut sub, "", "data file", "data-file.")?;
    s.data_file = Some(PathBuf::from(path));
    Ok(())
}

/// The options every node has and the driver's own (`driver` names it in messages): each
/// checked, those the engine has taken into `s`, anything left refused.
fn node_options(
    map: &mut Map,
    s: &mut Settings,
    driver: &str,
    what: &str,
    verb: &str,
) -> Result<(), String> {
    let own: &[(&str, Kind)] = match driver {
        "qcow2" => QCOW2_OPTIONS,
        "file" => FILE_OPTIONS,
        _ => &[],
    };
    let table: Vec<(&str, Kind)> = NODE_OPTIONS.iter().chain(own).copied().collect();
    let flag = |map: &mut Map, key| -> Result<Option<bool>, String> {
        take_checked(map, key, &table)?
            .map(|v| bool_value(key, &v))
            .transpose()
    };
    merge(&mut s.read_only, flag(map, "read-only")?);
    merge(&mut s.force_share, flag(map, "force-share")?);
    merge(&mut s.direct, flag(map, "cache.direct")?);
    if driver == "qcow2" {
        merge(&mut s.lazy_refcounts, flag(map, "lazy-refcounts")?);
        if let Some(v) = take_checked(map, "l2-cache-size", &table)? {
            s.l2_cache_size = Some(size_value("l2-cache-size", &v)?);
        }
    }
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if driver == "raw" && RAW_UNSUPPORTED.contains(&key.as_str()) {
            return Err(format!(
                "qimg does not support the option '{key}' of '{driver}'"
            ));
        }
        if driver == "qcow2" && key == "encrypt.format" {
            let v = take_str(map, &key)?.unwrap_or_default();
            return Err(format!(
                "No encryption in image header, but options specified format '{v}'"
            ));
        }
        if !table.iter().any(|(k, _)| *k == key) {
            return Err(format!("{what} '{driver}' {verb} the option '{key}'"));
        }
        take_checked(map, &key, &table)?;
    }
    Ok(())
}

fn merge(slot: &mut Option<bool>, v: Option<bool>) {
    if v.is_some() {
        *slot = v;
    }
}

/// Removes `key` and checks its value against its kind in `table`.
fn take_checked(
    map: &mut Map,
    key: &str,
    table: &[(&str, Kind)],
) -> Result<Option<String>, String> {
    let Some(v) = take_str(map, key)? else {
        return Ok(None);
    };
    let kind = table
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(Kind::Str, |(_, k)| *k);
    match kind {
        Kind::Str => {}
        Kind::Bool => {
            bool_value(key, &v)?;
        }
        Kind::Size => {
            size_value(key, &v)?;
        }
        Kind::Number => {
            number_value(key, &v)?;
        }
        Kind::Enum(values) => {
            if !values.contains(&v.as_str()) {
                return Err(match key {
                    "discard" => "Invalid discard option".to_owned(),
                    "overlap-check" | "overlap-check.template" => format!(
                        "Unsupported value '{v}' for qcow2 option '{key}'. Allowed are any of \
                         the following: {}",
                        values.join(", ")
                    ),
                    _ => format!("invalid parameter value: {v}"),
                });
            }
        }
    }
    Ok(Some(v))
}

/// Removes `key`, which must be a string when present.
fn take_str(map: &mut Map, key: &str) -> Result<Option<String>, String> {
    match map.remove(key) {
        None => Ok(None),
        Some(Val::Str(s)) => Ok(Some(s)),
        Some(Val::Null) => Err(format!(
            "Invalid parameter type for '{key}', expected: string"
        )),
    }
}

/// The format the engine will probe for `path` (its messages name it before the open).
fn probe(path: &Path) -> ImageFormat {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"QFI\xfb");
    if is_qcow2 {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    }
}
