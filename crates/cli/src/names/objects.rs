//! `--object` definitions, checked as qemu-img and qemu-io check them. No image format qimg
//! opens uses an object (secrets are for encrypted images), so a valid definition is kept
//! by nobody; a wrong one stops the command with QEMU's message, and `help` lists the types.

use anyhow::{bail, Result};
use std::collections::BTreeSet;

/// The object types qemu-img and qemu-io can create (`--object help`).
const TYPES: &[&str] = &[
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// The options of a `secret` (`--object secret,help`).
const SECRET_OPTIONS: &[(&str, &str)] = &[
    ("data", "<string>"),
    ("file", "<string>"),
    ("format", "<QCryptoSecretFormat>"),
    ("iv", "<string>"),
    ("keyid", "<string>"),
];

/// Checks each definition in order; `Ok(true)` when one asked for help (printed on stdout).
pub fn check_objects(defs: &[String]) -> Result<bool> {
    let mut ids = BTreeSet::new();
    for def in defs {
        if check_one(def, &mut ids)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn check_one(def: &str, ids: &mut BTreeSet<String>) -> Result<bool> {
    let mut items = def.split(',');
    let first = items.next().unwrap_or("");
    let mut params: Vec<(String, String)> = Vec::new();
    let mut qom_type = None;
    if first.contains('=') || first.is_empty() {
        params.push(split(first));
    } else {
        qom_type = Some(first.to_owned());
    }
    params.extend(items.map(split));
    if let Some(pos) = params.iter().position(|(k, _)| k == "qom-type") {
        qom_type = Some(params.remove(pos).1);
    }
    let Some(qom_type) = qom_type else {
        bail!("Parameter 'qom-type' is missing");
    };
    if qom_type == "help" {
        println!("List of user creatable objects:");
        for t in TYPES {
            println!("  {t}");
        }
        return Ok(true);
    }
    if !TYPES.contains(&qom_type.as_str()) {
        if qom_type == "iothread" || qom_type.starts_with("memory-backend") {
            bail!("invalid object type: {qom_type}");
        }
        bail!("Parameter 'qom-type' does not accept value '{qom_type}'");
    }
    if params.iter().any(|(k, _)| k == "help") {
        if qom_type == "secret" {
            println!("secret options:");
            for (name, kind) in SECRET_OPTIONS {
                println!("  {name}={kind}");
            }
            return Ok(true);
        }
        bail!("qimg does not list the options of '{qom_type}'");
    }
    let Some(id) = params
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.clone())
    else {
        bail!("Parameter 'id' is missing");
    };
    if qom_type == "secret" {
        check_secret(&params)?;
    }
    if !ids.insert(id.clone()) {
        bail!("attempt to add duplicate property '{id}' to object (type 'container')");
    }
    Ok(false)
}

/// A secret: its parameters known, its data given inline or in a readable file.
fn check_secret(params: &[(String, String)]) -> Result<()> {
    for (k, _) in params {
        if k != "id" && !SECRET_OPTIONS.iter().any(|(name, _)| name == k) {
            bail!("Parameter '{k}' is unexpected");
        }
    }
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(f) = get("format").filter(|f| !matches!(*f, "raw" | "base64")) {
        bail!("Parameter 'format' does not accept value '{f}'");
    }
    match (get("data"), get("file")) {
        (None, None) => bail!("Either 'file' or 'data' must be provided"),
        (Some(_), Some(_)) => bail!("'file' and 'data' are mutually exclusive"),
        (None, Some(path)) => {
            if let Err(e) = std::fs::read(path) {
                bail!(
                    "Unable to read {path}: Failed to open file \u{201c}{path}\u{201d}: {}",
                    qcow2_engine::strerror(&e)
                );
            }
        }
        (Some(_), None) => {}
    }
    Ok(())
}

fn split(item: &str) -> (String, String) {
    match item.split_once('=') {
        Some((k, v)) => (k.to_owned(), v.to_owned()),
        None => (item.to_owned(), "on".to_owned()),
    }
}
