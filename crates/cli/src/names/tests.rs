//! The readings of image names; what QEMU does with the same names is checked by the
//! differential tests (crates/cli/tests/names_cli.rs).

use super::options::{parse_json, parse_keyval, Val};
use super::ImageName;
use qcow2_engine::{BackingChoice, ImageFormat, ImageOptions};
use std::path::Path;

fn name(s: &str, image_opts: bool) -> Result<ImageName, String> {
    ImageName::parse(Path::new(s), image_opts, None).map_err(|e| e.to_string())
}

#[test]
fn plain_names_and_the_file_prefix() {
    let n = name("file:a,b.qcow2", false).unwrap();
    assert_eq!(n.path(), Path::new("a,b.qcow2"));
    assert_eq!(
        n.could_not_open("why").to_string(),
        "Could not open 'file:a,b.qcow2': why"
    );
    assert_eq!(n.format(), None);
    assert_eq!(name("x.img", false).unwrap().path(), Path::new("x.img"));
}

#[test]
fn json_nested_and_dotted_keys_are_the_same() {
    let a = parse_json(r#"{"driver":"qcow2","file":{"driver":"file","filename":"t"}}"#).unwrap();
    let b = parse_json(r#"{"driver":"qcow2","file.driver":"file","file.filename":"t"}"#).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.get("file.filename"), Some(&Val::Str("t".into())));
    let n = name(r#"json:{"driver":"qcow2","file":{"filename":"t"}}"#, false).unwrap();
    assert_eq!(n.path(), Path::new("t"));
    assert_eq!(n.format(), Some(ImageFormat::Qcow2));
}

#[test]
fn json_strings_in_single_quotes() {
    let a = parse_json(r#"{'driver':'qcow2','file':{'filename':'a"b\'c'}}"#).unwrap();
    assert_eq!(a.get("file.filename"), Some(&Val::Str("a\"b'c".into())));
    assert_eq!(a.get("driver"), Some(&Val::Str("qcow2".into())));
    let b = parse_json(r#"{"x":"it's","y":"a\"b"}"#).unwrap();
    assert_eq!(b.get("x"), Some(&Val::Str("it's".into())));
    assert_eq!(b.get("y"), Some(&Val::Str("a\"b".into())));
}

#[test]
fn keyval_escapes_commas_and_implies_file() {
    let m = parse_keyval("driver=qcow2,file.filename=a,,b,read-only");
    assert_eq!(m.get("file.filename"), Some(&Val::Str("a,b".into())));
    assert_eq!(m.get("read-only"), Some(&Val::Str("on".into())));
    assert_eq!(
        parse_keyval("t.qcow2").get("file"),
        Some(&Val::Str("t.qcow2".into()))
    );
}

#[test]
fn settings_reach_the_open_options() {
    let n = name(
        "driver=qcow2,file.filename=t,read-only=on,cache.direct=on,backing.file.filename=b",
        true,
    )
    .unwrap();
    let o = n.options(ImageOptions::new()).unwrap();
    assert!(o.is_read_only());
    assert!(o.is_direct());
    assert_eq!(
        o.backing_choice(),
        &BackingChoice::File {
            path: "b".into(),
            format: None
        }
    );
    // An open without a backing file refuses backing options, as qemu-img info does.
    let alone = ImageOptions::new().backing(BackingChoice::None);
    assert!(n.options(alone).is_err());
    let none = name(
        r#"json:{"driver":"qcow2","file":{"filename":"t"},"backing":null}"#,
        false,
    )
    .unwrap();
    let o = none.options(ImageOptions::new()).unwrap();
    assert_eq!(o.backing_choice(), &BackingChoice::None);
}

#[test]
fn wrong_names_are_refused_with_qemus_words() {
    let cases = [
        (
            r#"json:{"driver":"qcow2""#,
            "Could not parse the JSON options: JSON parse error, premature EOI",
        ),
        ("json:[1]", "Invalid JSON object given"),
        ("json:{}", "Must specify either driver or file"),
        (
            r#"json:{"driver":"nosuch","file":"t"}"#,
            "Unknown driver 'nosuch'",
        ),
        (
            r#"json:{"driver":"qcow2","file":"t"}"#,
            "Cannot find device='t' nor node-name='t'",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"driver":"file"}}"#,
            "The 'file' block driver requires a file name",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"t","bar":1}}"#,
            "Block protocol 'file' doesn't support the option 'bar'",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"t"},"foo":1}"#,
            "Block format 'qcow2' does not support the option 'foo'",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"t"},"read-only":"maybe"}"#,
            "Parameter 'read-only' expects 'on' or 'off'",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"t","locking":"maybe"}}"#,
            "invalid parameter value: maybe",
        ),
        (
            r#"json:{"driver":"qcow2","file":{"filename":"t"},"discard":"x"}"#,
            "Invalid discard option",
        ),
        (
            "driver=qcow2",
            "A block device must be specified for \"file\"",
        ),
    ];
    for (given, why) in cases {
        let image_opts = !given.starts_with("json:");
        let err = name(given, image_opts).unwrap_err();
        assert_eq!(err, format!("Could not open '{given}': {why}"), "{given}");
    }
}
