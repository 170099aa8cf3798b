//! Unit tests of the qemu-io command parser; their expectations were checked against qemu-io
//! 10.0.2 (values, messages and the stream each message goes to).

use super::numbers::{cvtnum, parse_pattern, CvtError};
use super::*;

fn ok(line: &str) -> Cmd {
    parse(line)
        .unwrap_or_else(|e| panic!("{line:?}: {e:?}"))
        .unwrap_or_else(|| panic!("{line:?}: empty"))
}

fn err(line: &str) -> ParseError {
    match parse(line) {
        Err(e) => e,
        Ok(c) => panic!("{line:?} parsed as {c:?}"),
    }
}

fn read(offset: u64, len: u64) -> Read {
    Read {
        offset,
        len,
        vmstate: false,
        verify: None,
        quiet: false,
        dump: false,
        csv: false,
    }
}

fn write(offset: u64, len: u64, data: WriteData) -> Write {
    Write {
        offset,
        len,
        vmstate: false,
        data,
        quiet: false,
        csv: false,
        fua: false,
        compressed: false,
    }
}

#[test]
fn cvtnum_reads_sizes_like_qemu_io() {
    // Each value below was checked against qemu-io 10.0.2 (`read -C 0 N` prints N).
    let good: &[(&str, u64)] = &[
        ("0", 0),
        ("4096", 4096),
        ("4k", 4096),
        ("4K", 4096),
        ("1M", 1 << 20),
        ("1m", 1 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("1e", 1 << 60),
        ("1b", 1),
        ("1B", 1),
        ("0x10", 16),
        ("0X10", 16),
        ("0xA", 10),
        ("+0x10", 16),
        ("+1", 1),
        ("010", 10),
        ("08", 8),
        ("1.", 1),
        ("5.", 5),
        ("1.k", 1024),
        ("1.5k", 1536),
        ("1.5K", 1536),
        (".5k", 512),
        ("0.5M", 512 << 10),
        ("1.1k", 1126),
        ("0.1k", 102),
        ("1.0001k", 1024),
        ("1.9999k", 2048),
        ("0.001k", 1),
        ("0.0004k", 0),
        ("0.0005k", 1),
        ("0.00048828125k", 1),
        ("0.00048828124k", 0),
        ("0.3333333333333333333333333333333k", 341),
        ("0.99999999999999999999k", 1024),
        ("7.5E", 8_646_911_284_551_352_320),
        ("9223372036854775807", i64::MAX as u64),
        ("1.0", 1),
        ("0.0", 0),
        (".0", 0),
        ("1.0k", 1024),
    ];
    for &(s, v) in good {
        assert_eq!(cvtnum(s), Ok(v), "{s}");
    }
    let invalid = [
        "", ".", "x", "-", "1.5", "0.5", "1.00001", "0.5B", "1.5b", "0x", "0x10k", "0x1.", "0x10.",
        "00x10", "0x+10", "1kb", "1k5", "1e3", "1.5e3k", "1..5k", "1.5.k", "1.-5k", "1.+5k",
    ];
    for s in invalid {
        assert_eq!(cvtnum(s), Err(CvtError::Invalid), "{s}");
    }
    let large = [
        "-1",
        "-0",
        "8E",
        "16E",
        "9223372036854775808",
        "18446744073709551616",
        "99999999999999999999",
        "0xffffffffffffffffff",
    ];
    for s in large {
        assert_eq!(cvtnum(s), Err(CvtError::TooLarge), "{s}");
    }
}

#[test]
fn patterns_are_strtol_bytes() {
    assert_eq!(parse_pattern("0xab"), Some(0xab));
    assert_eq!(parse_pattern("0XAB"), Some(0xab));
    assert_eq!(parse_pattern("171"), Some(171));
    assert_eq!(parse_pattern("010"), Some(8));
    assert_eq!(parse_pattern("+7"), Some(7));
    assert_eq!(parse_pattern("-0"), Some(0));
    assert_eq!(parse_pattern("0"), Some(0));
    assert_eq!(parse_pattern("255"), Some(255));
    assert_eq!(parse_pattern(""), Some(0));
    for bad in [
        "256",
        "0x100",
        "-1",
        "ab",
        "0x",
        "08",
        "1k",
        "99999999999999999999999",
    ] {
        assert_eq!(parse_pattern(bad), None, "{bad}");
    }
}

#[test]
fn reads() {
    assert_eq!(ok("read 0 4k"), Cmd::Read(read(0, 4096)));
    assert_eq!(ok("r 512 1"), Cmd::Read(read(512, 1)));
    assert_eq!(ok("  read   0    1  "), Cmd::Read(read(0, 1)));
    let mut r = read(0, 4096);
    r.verify = Some(Verify {
        pattern: 0xab,
        start: 0,
        len: 4096,
    });
    r.quiet = true;
    assert_eq!(ok("read -P 0xab -q 0 4k"), Cmd::Read(r.clone()));
    // getopt permutes: options after the positional arguments count too.
    assert_eq!(ok("read 0 4k -q -P 0xab"), Cmd::Read(r.clone()));
    assert_eq!(ok("read -qP0xab 0 4k"), Cmd::Read(r.clone()));
    assert_eq!(ok("read -q -P 0xab -- 0 4k"), Cmd::Read(r));
    let mut r = read(0, 512);
    r.verify = Some(Verify {
        pattern: 1,
        start: 1,
        len: 10,
    });
    r.dump = true;
    r.csv = true;
    assert_eq!(ok("read -v -C -P 1 -s 1 -l 10 0 512"), Cmd::Read(r));
    let mut r = read(0, 512);
    r.verify = Some(Verify {
        pattern: 1,
        start: 12,
        len: 500,
    });
    assert_eq!(ok("read -P 1 -s 12 -p -r 0 512"), Cmd::Read(r));
}

#[test]
fn writes() {
    let w = |o, l, d| Cmd::Write(write(o, l, d));
    assert_eq!(
        ok("write 0 64k"),
        w(0, 65536, WriteData::Pattern(DEFAULT_WRITE_PATTERN))
    );
    assert_eq!(ok("w -P 0x5a 1 1"), w(1, 1, WriteData::Pattern(0x5a)));
    assert_eq!(
        ok("write -z 1M 64k"),
        w(1 << 20, 65536, WriteData::Zeroes { may_unmap: false })
    );
    assert_eq!(
        ok("write -z -u 0 1"),
        w(0, 1, WriteData::Zeroes { may_unmap: true })
    );
    assert_eq!(
        ok("write -zu 0 1"),
        w(0, 1, WriteData::Zeroes { may_unmap: true })
    );
    let mut x = write(0, 512, WriteData::Pattern(3));
    x.quiet = true;
    x.csv = true;
    x.fua = true;
    assert_eq!(ok("write -q -C -f -P 3 0 512"), Cmd::Write(x));
}

#[test]
fn other_commands() {
    assert_eq!(parse(""), Ok(None));
    assert_eq!(parse("   "), Ok(None));
    assert_eq!(
        ok("discard 64k 64k"),
        Cmd::Discard(Discard {
            offset: 65536,
            len: 65536,
            quiet: false,
            csv: false
        })
    );
    assert_eq!(
        ok("d -q 0 1"),
        Cmd::Discard(Discard {
            offset: 0,
            len: 1,
            quiet: true,
            csv: false
        })
    );
    assert_eq!(ok("flush"), Cmd::Flush);
    assert_eq!(ok("f"), Cmd::Flush);
    assert_eq!(ok("aio_flush"), Cmd::AioFlush);
    assert_eq!(ok("length"), Cmd::Length);
    let mut r = read(4096, 1536);
    r.verify = Some(Verify {
        pattern: 7,
        start: 0,
        len: 1536,
    });
    assert_eq!(ok("aio_read -P 7 4k 1k 512"), Cmd::AioRead(r));
    assert_eq!(
        ok("aio_write -P 7 0 512 512"),
        Cmd::AioWrite(write(0, 1024, WriteData::Pattern(7)))
    );
    assert_eq!(
        ok("aio_write -z -P 7 0 3G"),
        Cmd::AioWrite(write(0, 3 << 30, WriteData::Zeroes { may_unmap: false }))
    );
    assert_eq!(
        ok("aio_read -i 0"),
        Cmd::Inject("injecting invalid read request")
    );
    assert_eq!(
        ok("aio_write -q -i -x 0 1"),
        Cmd::Inject("injecting invalid write request")
    );
}

#[test]
fn rejections_print_what_qemu_io_prints() {
    // Each message and its stream were checked against qemu-io 10.0.2.
    let stderr = |l: &str| err(l).stderr().unwrap_or_default();
    let stdout = |l: &str| err(l).stdout().unwrap_or_default();
    assert_eq!(stderr("bogus 1"), "command \"bogus\" not found");
    assert_eq!(
        stderr("read"),
        "bad argument count 0 to read, expected at least 2 arguments"
    );
    assert_eq!(
        stderr("discard 0"),
        "bad argument count 1 to discard, expected at least 2 arguments"
    );
    assert_eq!(
        stderr("flush 1"),
        "bad argument count 1 to flush, expected 0 arguments"
    );
    assert_eq!(stderr("read -x 0 1"), "read: invalid option -- 'x'");
    assert_eq!(stdout("read -x 0 1"), READ.usage);
    assert_eq!(stderr("r -x 0 1"), "r: invalid option -- 'x'");
    assert_eq!(stderr("read -q -1 1"), "read: invalid option -- '1'");
    assert_eq!(
        stderr("read 0 1 -P"),
        "read: option requires an argument -- 'P'"
    );
    assert_eq!(stderr("discard -x 0 1"), "discard: invalid option -- 'x'");
    assert_eq!(stdout("discard -x 0 1"), DISCARD.usage);
    assert_eq!(stdout("aio_read -x 0 1"), AIO_READ.usage);
    assert_eq!(err("read 0 1 2"), ParseError::Usage(READ.usage));
    assert_eq!(err("read -q 0"), ParseError::Usage(READ.usage));
    assert_eq!(err("read -l 10 0 1"), ParseError::Usage(READ.usage));
    assert_eq!(err("write 0 1 2"), ParseError::Usage(WRITE.usage));
    let invalid = |l: &str, m: &str| assert_eq!(err(l), ParseError::Invalid(m.into()), "{l}");
    invalid(
        "read x 1",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
    );
    invalid(
        "read 0 -",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -",
    );
    invalid("read -q -- -1 1", "Parsing error: argument too large -- -1");
    invalid("read -P 0x100 0 1", "0x100 is not a valid pattern byte");
    invalid("read -P -1 0 1", "-1 is not a valid pattern byte");
    invalid(
        "read -P 0xab -s 0 -l 2 0 1",
        "pattern verification range exceeds end of read data",
    );
    invalid("read 0 3G", "length cannot exceed 2147483136, given 3G");
    invalid("discard 0 3G", "length cannot exceed 2147483136, given 3G");
    invalid(
        "write 0 2G",
        "length cannot exceed 2147483136 without -n, given 2G",
    );
    invalid(
        "write -z 0 3G",
        "length cannot exceed 2147483136 without -n, given 3G",
    );
    invalid("write -u 0 1", "-u requires -z to be specified");
    invalid("write -n 0 1", "-n requires -z to be specified");
    invalid(
        "write -z -P 1 0 1",
        "Only one of -z, -P, and -s can be specified at the same time",
    );
    invalid(
        "write -P 1 -z 0 1",
        "Only one of -z, -P, and -s can be specified at the same time",
    );
    invalid(
        "write -b -z 0 1",
        "-b and -z cannot be specified at the same time",
    );
    invalid(
        "write -f -c 0 1",
        "-f and -b or -c cannot be specified at the same time",
    );
    invalid(
        "write -z -r 0 1",
        "cannot combine zero write with registered I/O buffer",
    );
    invalid(
        "write -c 1 512",
        "1 is not a sector-aligned value for 'offset'",
    );
    invalid(
        "aio_read x 1",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
    );
    invalid(
        "aio_read 0 3G",
        "Argument '3G' exceeds maximum size 2147483136",
    );
    invalid(
        "aio_read 0 1G 1G 1G",
        "The total number of bytes exceed the maximum size 2147483136",
    );
    invalid("aio_write -P 300 0 1", "300 is not a valid pattern byte");
    invalid("aio_write -u 0 1", "-u requires -z to be specified");
    invalid(
        "aio_write -z 0 1 2",
        "-z supports only a single length parameter",
    );
    // What qemu-io has and qimg io does not: said on stderr, the command fails.
    assert!(matches!(err("write -s f 0 1"), ParseError::Unsupported(_)));
}

#[test]
fn write_commands_need_permission_once_counted() {
    for l in [
        "write 0 1",
        "w -u 0 1",
        "discard -x 0 1",
        "aio_write 0 1 2 3",
    ] {
        assert!(needs_write(l), "{l}");
    }
    for l in [
        "",
        "read 0 1",
        "flush",
        "aio_flush",
        "write 0",
        "discard",
        "bogus 0 1",
    ] {
        assert!(!needs_write(l), "{l}");
    }
}

#[test]
fn write_c_is_a_compressed_write() {
    let mut w = write(65536, 65536, WriteData::Pattern(0x22));
    w.compressed = true;
    assert_eq!(ok("write -c -P 0x22 64k 64k"), Cmd::Write(w));
    assert_eq!(
        err("write -c 0 1000"),
        ParseError::Invalid("1000 is not a sector-aligned value for 'count'".into())
    );
}

#[test]
fn session_commands_parse_like_qemu_io() {
    // Behaviour checked against qemu-io 10.0.2.
    let Cmd::Open(o) = ok("o -rnC -t writethrough -o driver=raw,l2-cache-size=1M img") else {
        panic!("not an open");
    };
    assert_eq!(o.path.as_deref(), Some("img"));
    assert!(o.spec.read_only && o.spec.copy_on_read);
    assert_eq!(o.spec.cache, CacheMode::Writethrough);
    assert_eq!(o.spec.driver_options.len(), 2);
    assert_eq!(
        ok("t -m falloc 1M"),
        Cmd::Truncate {
            size: 1 << 20,
            prealloc: Preallocation::Falloc,
        }
    );
    assert_eq!(
        ok("t 1M 7"),
        Cmd::Truncate {
            size: 1 << 20,
            prealloc: Preallocation::Off,
        }
    );
    assert_eq!(ok("sleep 0x10"), Cmd::Sleep(16));
    assert_eq!(ok("q 1 2"), Cmd::Quit);
    let Cmd::Reopen(r) = ok("reopen -w -c none") else {
        panic!("not a reopen");
    };
    assert_eq!((r.read_only, r.cache), (Some(false), Some(CacheMode::None)));
    let Cmd::Help(text) = ok("? o") else {
        panic!("not help");
    };
    assert!(text.starts_with("o [-rsCnkU] [-t cache]"), "{text}");
}

#[test]
fn session_command_rejections_print_what_qemu_io_prints() {
    assert_eq!(
        err("open -t Writeback img").stderr().unwrap(),
        format!(
            "{}: Invalid cache option: Writeback",
            crate::util::program()
        )
    );
    assert_eq!(err("open a b"), ParseError::Usage(OPEN.usage));
    assert_eq!(
        err("reopen -r -w").stderr().unwrap(),
        format!(
            "{}: Only one -r/-w option may be given",
            crate::util::program()
        )
    );
    assert_eq!(
        err("sleep -5"),
        ParseError::Invalid("-5 is not a valid number".into())
    );
    assert_eq!(
        err("truncate -m bogus 1M").stderr().unwrap(),
        format!(
            "{}: Invalid preallocation mode 'bogus'",
            crate::util::program()
        )
    );
    assert_eq!(
        err("help bogus"),
        ParseError::Invalid("command bogus not found".into())
    );
    assert!(needs_image("truncate") && needs_image("info"));
    assert!(!needs_image("open") && !needs_image("sleep 1") && !needs_image("help"));
    assert!(needs_write("truncate 1M") && !needs_write("truncate"));
}
