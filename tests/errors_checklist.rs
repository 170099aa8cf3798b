//! The error-injection scenarios together fail a request of every class of the checklist
//! (the harness and the scenarios: `errors/`).

mod errors;

use errors::case::run_case;
use errors::checks::CrashChecks;
use errors::image::{prepare, MetaMap};
use errors::scenarios::scenarios;
use errors::torture::runtime;
use errors::Class;
use std::collections::HashSet;

/// The classes of the checklist are all hit (by the scenarios' reference runs).
#[test]
fn checklist_is_covered() {
    use Class::*;
    let rt = runtime();
    let mut seen = HashSet::new();
    for scn in scenarios() {
        let p = prepare(scn.source);
        let (_, reference, closed) = rt
            .block_on(run_case(
                &scn,
                &p,
                &MetaMap::default(),
                None,
                &[],
                &mut CrashChecks::default(),
            ))
            .unwrap_or_else(|e| panic!("{}: {e}", scn.name));
        let mut map = MetaMap::default();
        map.add(p.base());
        map.add(&closed);
        seen.extend(reference.iter().map(|e| map.classify(e)));
    }
    for c in [
        DataRead,
        DataWrite,
        BackingRead,
        L2Load,
        L2WriteBack,
        L1Write,
        RefblockWrite,
        ReftableWrite,
        HeaderWrite,
        BitmapWrite,
        SnapshotTableWrite,
        Flush,
        PunchHole,
        SetLen,
    ] {
        assert!(seen.contains(&c), "no scenario fails a {c:?} request");
    }
}
