//! The engine on an arbitrary image: open read-only and read-write, read, write, close.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qcow2_fuzz::open_read_write(data);
});
