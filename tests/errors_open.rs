//! Error injection on `open`: every request it makes fails once, then it works (the harness:
//! `errors/`).

mod errors;

use blockio::FaultRule;
use errors::image::{prepare, read_all};
use errors::torture::runtime;
use errors::{typed, Source, EIO, ENOSPC, MIB};
use qcow2_engine::{Image, ImageOptions};

/// Opening fails with a typed error when any request it makes fails, and works afterwards.
#[test]
fn open_errors() {
    let rt = runtime();
    let mut faults = 0;
    for (source, read_only) in [
        (Source::Create("", 4 * MIB), false),
        (
            Source::Create("cluster_size=512,refcount_bits=64", 4 * MIB),
            false,
        ),
        (Source::Fixture("snapshot"), false),
        (Source::Fixture("chain"), true),
        (Source::Fixture("chain"), false),
    ] {
        let p = prepare(source);
        let o = ImageOptions::new().read_only(read_only);
        let (opener, _) = p.opener();
        let ctl = opener.controller();
        let img = rt
            .block_on(Image::open(opener, &p.image, o.clone()))
            .unwrap();
        drop(img);
        let n = ctl.completed();
        assert!(n > 0, "{source:?}: open made no request");
        for k in 0..n {
            for errno in [EIO, ENOSPC] {
                faults += 1;
                let (opener, _) = p.opener();
                let ctl = opener.controller();
                ctl.add_rule(FaultRule::new(errno).nth(k).times(1));
                match rt.block_on(Image::open(opener.clone(), &p.image, o.clone())) {
                    Ok(_) => panic!("{source:?}: open succeeded although request {k} failed"),
                    Err(e) => {
                        typed(&e, errno).unwrap_or_else(|m| panic!("{source:?}: request {k}: {m}"))
                    }
                }
                let img = rt
                    .block_on(Image::open(opener, &p.image, o.clone()))
                    .unwrap_or_else(|e| panic!("{source:?}: open after the fault: {e}"));
                let got = rt.block_on(read_all(&img, p.initial.len() as u64)).unwrap();
                assert!(
                    got == p.initial,
                    "{source:?}: reads wrong after a failed open"
                );
            }
        }
    }
    eprintln!("errors open: {faults} faults injected");
}
