//! The format crate's parsers on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qcow2_fuzz::format_parse(data);
});
