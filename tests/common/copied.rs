//! Judging `qemu-img check`'s COPIED-flag errors in the crash windows of snapshot operations.

use std::collections::HashMap;

/// A snapshot operation changes refcounts and COPIED flags in different clusters, so a crash
/// between the two leaves flags `qemu-img check` reports as errors (QEMU's own
/// qcow2-snapshot.c has the same windows). They are harmless when a flag set on a cluster
/// with a refcount above 1 sits on a cluster that really has one reference (the rest of its
/// count leaked: written in place, it changes nothing else), and a flag missing only costs a
/// copy-on-write. Anything else is corruption. `report` is `qemu-img check`'s output (both
/// streams) on an image of `cluster_size`-byte clusters.
pub fn only_safe_copied_errors(report: &str, cluster_size: u64) -> Result<(), String> {
    let leaked: HashMap<u64, u64> = report
        .lines()
        .filter_map(|l| l.strip_prefix("Leaked cluster "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let refs = f[2].strip_prefix("reference=").unwrap().parse().unwrap();
            (f[0].parse().unwrap(), refs)
        })
        .collect();
    for line in report.lines().filter(|l| l.starts_with("ERROR")) {
        let Some(rest) = line.strip_prefix("ERROR OFLAG_COPIED ") else {
            return Err(format!("not a COPIED flag: {line}"));
        };
        let entry = rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("l2_entry=").or(w.strip_prefix("l1_entry=")))
            .unwrap();
        let entry = u64::from_str_radix(entry, 16).unwrap();
        let refcount: u64 = rest
            .rsplit("refcount=")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let copied = entry >> 63 == 1;
        let cluster = (entry & 0x00ff_ffff_ffff_fe00) / cluster_size;
        if copied && refcount > 1 && leaked.get(&cluster) != Some(&1) {
            return Err(format!(
                "COPIED set on cluster {cluster} that is really shared: {line}"
            ));
        }
    }
    Ok(())
}
