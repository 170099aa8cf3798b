//! The size grammar against the real tools. Every expectation below is a line qemu-img or
//! qemu-io 10.0.2 (Debian qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1) printed for the input,
//! copied verbatim from its output: the tests derive the expected value or error from it.

use super::*;

/// `qemu-img create -f raw i.raw -- SIZE`: the first line qemu-img printed (the size goes
/// through `cvtnum("image size", SIZE)`: `0..=i64::MAX`).
const QEMU_IMG_CREATE: &[(&str, &str)] = &[
    ("0", "Formatting 'i.raw', fmt=raw size=0"),
    ("4096", "Formatting 'i.raw', fmt=raw size=4096"),
    ("1000", "Formatting 'i.raw', fmt=raw size=1000"),
    ("0x1000", "Formatting 'i.raw', fmt=raw size=4096"),
    ("0X1000", "Formatting 'i.raw', fmt=raw size=4096"),
    ("0xA", "Formatting 'i.raw', fmt=raw size=10"),
    ("0x10b", "Formatting 'i.raw', fmt=raw size=267"),
    ("0x1E", "Formatting 'i.raw', fmt=raw size=30"),
    ("0x", "qemu-img: Invalid image size specified: '0x'."),
    ("0x10k", "qemu-img: Invalid image size specified: '0x10k'."),
    (
        "0x1.8k",
        "qemu-img: Invalid image size specified: '0x1.8k'.",
    ),
    ("0x1.", "qemu-img: Invalid image size specified: '0x1.'."),
    ("00x10", "qemu-img: Invalid image size specified: '00x10'."),
    ("0x+10", "qemu-img: Invalid image size specified: '0x+10'."),
    ("0x0", "Formatting 'i.raw', fmt=raw size=0"),
    (
        "0x00000000000000000010",
        "Formatting 'i.raw', fmt=raw size=16",
    ),
    ("010", "Formatting 'i.raw', fmt=raw size=10"),
    ("08", "Formatting 'i.raw', fmt=raw size=8"),
    ("0008", "Formatting 'i.raw', fmt=raw size=8"),
    ("1b", "Formatting 'i.raw', fmt=raw size=1"),
    ("1B", "Formatting 'i.raw', fmt=raw size=1"),
    ("1k", "Formatting 'i.raw', fmt=raw size=1024"),
    ("1K", "Formatting 'i.raw', fmt=raw size=1024"),
    ("1m", "Formatting 'i.raw', fmt=raw size=1048576"),
    ("1M", "Formatting 'i.raw', fmt=raw size=1048576"),
    ("1g", "Formatting 'i.raw', fmt=raw size=1073741824"),
    ("1G", "Formatting 'i.raw', fmt=raw size=1073741824"),
    ("1t", "Formatting 'i.raw', fmt=raw size=1099511627776"),
    ("1T", "Formatting 'i.raw', fmt=raw size=1099511627776"),
    ("1p", "Formatting 'i.raw', fmt=raw size=1125899906842624"),
    ("1P", "Formatting 'i.raw', fmt=raw size=1125899906842624"),
    ("1e", "Formatting 'i.raw', fmt=raw size=1152921504606846976"),
    ("1E", "Formatting 'i.raw', fmt=raw size=1152921504606846976"),
    ("1.5M", "Formatting 'i.raw', fmt=raw size=1572864"),
    ("1.5k", "Formatting 'i.raw', fmt=raw size=1536"),
    (".5k", "Formatting 'i.raw', fmt=raw size=512"),
    ("1.", "Formatting 'i.raw', fmt=raw size=1"),
    ("1.k", "Formatting 'i.raw', fmt=raw size=1024"),
    (
        "1.e",
        "Formatting 'i.raw', fmt=raw size=1152921504606846976",
    ),
    (".0", "Formatting 'i.raw', fmt=raw size=0"),
    ("1.0", "Formatting 'i.raw', fmt=raw size=1"),
    ("0.5M", "Formatting 'i.raw', fmt=raw size=524288"),
    ("1.1k", "Formatting 'i.raw', fmt=raw size=1126"),
    ("0.1k", "Formatting 'i.raw', fmt=raw size=102"),
    ("1.0001k", "Formatting 'i.raw', fmt=raw size=1024"),
    ("1.9999k", "Formatting 'i.raw', fmt=raw size=2048"),
    ("0.0005k", "Formatting 'i.raw', fmt=raw size=1"),
    ("0.0004k", "Formatting 'i.raw', fmt=raw size=0"),
    ("0.00048828125k", "Formatting 'i.raw', fmt=raw size=1"),
    ("0.00048828124k", "Formatting 'i.raw', fmt=raw size=0"),
    (
        "0.99999999999999999999k",
        "Formatting 'i.raw', fmt=raw size=1024",
    ),
    (
        "0.99999999999999999999",
        "Formatting 'i.raw', fmt=raw size=1",
    ),
    (
        "1.99999999999999999999",
        "Formatting 'i.raw', fmt=raw size=2",
    ),
    (".5e", "Formatting 'i.raw', fmt=raw size=576460752303423488"),
    (
        "7.5E",
        "Formatting 'i.raw', fmt=raw size=8646911284551352320",
    ),
    (
        "15.9E",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "15.999999999999999E",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "16E",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "8E",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "7.99999999999999999E",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "9223372036854775807",
        "Formatting 'i.raw', fmt=raw size=9223372036854775807",
    ),
    (
        "9223372036854775808",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "18446744073709551615",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "18446744073709551616",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "99999999999999999999",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "99999999999999999999k",
        "qemu-img: Invalid image size specified: '99999999999999999999k'.",
    ),
    (
        "18446744073709551615k",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "0x7fffffffffffffff",
        "Formatting 'i.raw', fmt=raw size=9223372036854775807",
    ),
    (
        "0x8000000000000000",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "0xffffffffffffffff",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "0x10000000000000000",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "0xffffffffffffffffffk",
        "qemu-img: Invalid image size specified: '0xffffffffffffffffffk'.",
    ),
    (" 1M", "Formatting 'i.raw', fmt=raw size=1048576"),
    ("\u{b}1k", "Formatting 'i.raw', fmt=raw size=1024"),
    ("1M ", "qemu-img: Invalid image size specified: '1M '."),
    ("+1", "Formatting 'i.raw', fmt=raw size=1"),
    ("+0x10", "Formatting 'i.raw', fmt=raw size=16"),
    ("+.5k", "Formatting 'i.raw', fmt=raw size=512"),
    ("++1", "qemu-img: Invalid image size specified: '++1'."),
    ("+-1", "qemu-img: Invalid image size specified: '+-1'."),
    (
        "-1",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "-0",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        " -1",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    ("-1k", "qemu-img: Invalid image size specified: '-1k'."),
    ("-0x10", "qemu-img: Invalid image size specified: '-0x10'."),
    (
        "-.5",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    (
        "-.0",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    ("-.5k", "qemu-img: Invalid image size specified: '-.5k'."),
    ("-0.5", "qemu-img: Invalid image size specified: '-0.5'."),
    ("-", "qemu-img: Invalid image size specified: '-'."),
    ("", "qemu-img: Invalid image size specified: ''."),
    (".", "qemu-img: Invalid image size specified: '.'."),
    (".k", "qemu-img: Invalid image size specified: '.k'."),
    ("1.5", "qemu-img: Invalid image size specified: '1.5'."),
    ("0.5", "qemu-img: Invalid image size specified: '0.5'."),
    ("1.5b", "qemu-img: Invalid image size specified: '1.5b'."),
    ("0.5B", "qemu-img: Invalid image size specified: '0.5B'."),
    (
        "1.00001",
        "qemu-img: Invalid image size specified: '1.00001'.",
    ),
    ("1kb", "qemu-img: Invalid image size specified: '1kb'."),
    ("1MB", "qemu-img: Invalid image size specified: '1MB'."),
    ("1e3", "qemu-img: Invalid image size specified: '1e3'."),
    ("1X", "qemu-img: Invalid image size specified: '1X'."),
    ("4x", "qemu-img: Invalid image size specified: '4x'."),
    ("abc", "qemu-img: Invalid image size specified: 'abc'."),
    ("1k5", "qemu-img: Invalid image size specified: '1k5'."),
    (
        "1.5e3k",
        "qemu-img: Invalid image size specified: '1.5e3k'.",
    ),
    ("1..5k", "qemu-img: Invalid image size specified: '1..5k'."),
    ("1.5.k", "qemu-img: Invalid image size specified: '1.5.k'."),
    ("1.-5k", "qemu-img: Invalid image size specified: '1.-5k'."),
    ("1.+5k", "qemu-img: Invalid image size specified: '1.+5k'."),
    ("1,5k", "qemu-img: Invalid image size specified: '1,5k'."),
    ("1_000", "qemu-img: Invalid image size specified: '1_000'."),
    ("0b101", "qemu-img: Invalid image size specified: '0b101'."),
    ("inf.", "qemu-img: Invalid image size specified: 'inf.'."),
    ("nan.", "qemu-img: Invalid image size specified: 'nan.'."),
    ("1.5x", "qemu-img: Invalid image size specified: '1.5x'."),
    ("\t1M", "Formatting 'i.raw', fmt=raw size=1048576"),
    (
        "\t-1",
        "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.",
    ),
    ("\r1k", "Formatting 'i.raw', fmt=raw size=1024"),
    ("\n1k", "Formatting 'i.raw', fmt=raw size=1024"),
    ("\u{c}1k", "Formatting 'i.raw', fmt=raw size=1024"),
    ("\u{b}0x10", "Formatting 'i.raw', fmt=raw size=16"),
    ("\u{b}.5k", "Formatting 'i.raw', fmt=raw size=512"),
];

/// `qemu-img create -f raw -o size=SIZE i.raw`: the first line qemu-img printed (QemuOpts'
/// size option: the whole of `u64`, printed as a signed number), for the inputs the first
/// table does not settle.
const QEMU_IMG_CREATE_O_SIZE: &[(&str, &str)] = &[
    (
        "0x",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0x10k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0x1.8k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0x1.",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "00x10",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0x+10",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "15.9E",
        "Formatting 'i.raw', fmt=raw size=-115292150460684672",
    ),
    (
        "15.999999999999999E",
        "Formatting 'i.raw', fmt=raw size=-1152",
    ),
    (
        "16E",
        "qemu-img: i.raw: Value '16E' is out of range for parameter 'size'",
    ),
    (
        "8E",
        "Formatting 'i.raw', fmt=raw size=-9223372036854775808",
    ),
    (
        "7.99999999999999999E",
        "Formatting 'i.raw', fmt=raw size=-9223372036854775808",
    ),
    (
        "9223372036854775808",
        "Formatting 'i.raw', fmt=raw size=-9223372036854775808",
    ),
    (
        "18446744073709551615",
        "qemu-img: i.raw: Image creation needs a size parameter",
    ),
    (
        "18446744073709551616",
        "qemu-img: i.raw: Value '18446744073709551616' is out of range for parameter 'size'",
    ),
    (
        "99999999999999999999",
        "qemu-img: i.raw: Value '99999999999999999999' is out of range for parameter 'size'",
    ),
    (
        "99999999999999999999k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "18446744073709551615k",
        "qemu-img: i.raw: Value '18446744073709551615k' is out of range for parameter 'size'",
    ),
    (
        "0x8000000000000000",
        "Formatting 'i.raw', fmt=raw size=-9223372036854775808",
    ),
    (
        "0xffffffffffffffff",
        "qemu-img: i.raw: Image creation needs a size parameter",
    ),
    (
        "0x10000000000000000",
        "qemu-img: i.raw: Value '0x10000000000000000' is out of range for parameter 'size'",
    ),
    (
        "0xffffffffffffffffffk",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1M ",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "++1",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "+-1",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "-1",
        "qemu-img: i.raw: Value '-1' is out of range for parameter 'size'",
    ),
    (
        "-0",
        "qemu-img: i.raw: Value '-0' is out of range for parameter 'size'",
    ),
    (
        " -1",
        "qemu-img: i.raw: Value ' -1' is out of range for parameter 'size'",
    ),
    (
        "-1k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "-0x10",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "-.5",
        "qemu-img: i.raw: Value '-.5' is out of range for parameter 'size'",
    ),
    (
        "-.0",
        "qemu-img: i.raw: Value '-.0' is out of range for parameter 'size'",
    ),
    (
        "-.5k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "-0.5",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "-",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        ".",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        ".k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.5",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0.5",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.5b",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0.5B",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.00001",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1kb",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1MB",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1e3",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1X",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "4x",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "abc",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1k5",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.5e3k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1..5k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.5.k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.-5k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.+5k",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1_000",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "0b101",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "inf.",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "nan.",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "1.5x",
        "qemu-img: i.raw: Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "\t-1",
        "qemu-img: i.raw: Value '\t-1' is out of range for parameter 'size'",
    ),
];

/// `qemu-io --image-opts driver=null-co,size=9223372035781033984 -c 'read -- OFFSET 0'`: the
/// first line qemu-io printed (its `cvtnum`: `0..=i64::MAX`), for the inputs that
/// `cmd::io::parse`'s tests do not have already.
const QEMU_IO_OFFSET: &[(&str, &str)] = &[
    ("1000", "read 0/0 bytes at offset 1000"),
    ("0x1000", "read 0/0 bytes at offset 4096"),
    ("0X1000", "read 0/0 bytes at offset 4096"),
    ("0x10b", "read 0/0 bytes at offset 267"),
    ("0x1E", "read 0/0 bytes at offset 30"),
    ("0x1.8k", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 0x1.8k"),
    ("0x0", "read 0/0 bytes at offset 0"),
    ("0x00000000000000000010", "read 0/0 bytes at offset 16"),
    ("0008", "read 0/0 bytes at offset 8"),
    ("1k", "read 0/0 bytes at offset 1024"),
    ("1K", "read 0/0 bytes at offset 1024"),
    ("1g", "read 0/0 bytes at offset 1073741824"),
    ("1G", "read 0/0 bytes at offset 1073741824"),
    ("1t", "read 0/0 bytes at offset 1099511627776"),
    ("1p", "read 0/0 bytes at offset 1125899906842624"),
    ("1E", "read 0/0 bytes at offset 1152921504606846976"),
    ("1.5M", "read 0/0 bytes at offset 1572864"),
    ("1.e", "read 0/0 bytes at offset 1152921504606846976"),
    ("0.99999999999999999999", "read 0/0 bytes at offset 1"),
    ("1.99999999999999999999", "read 0/0 bytes at offset 2"),
    (".5e", "read 0/0 bytes at offset 576460752303423488"),
    ("15.9E", "Parsing error: argument too large -- 15.9E"),
    ("15.999999999999999E", "Parsing error: argument too large -- 15.999999999999999E"),
    ("7.99999999999999999E", "Parsing error: argument too large -- 7.99999999999999999E"),
    ("18446744073709551615", "Parsing error: argument too large -- 18446744073709551615"),
    ("99999999999999999999k", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 99999999999999999999k"),
    ("18446744073709551615k", "Parsing error: argument too large -- 18446744073709551615k"),
    ("0x7fffffffffffffff", "read failed: Input/output error"),
    ("0x8000000000000000", "Parsing error: argument too large -- 0x8000000000000000"),
    ("0xffffffffffffffff", "Parsing error: argument too large -- 0xffffffffffffffff"),
    ("0x10000000000000000", "Parsing error: argument too large -- 0x10000000000000000"),
    ("0xffffffffffffffffffk", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 0xffffffffffffffffffk"),
    ("\u{b}1k", "read 0/0 bytes at offset 1024"),
    ("+.5k", "read 0/0 bytes at offset 512"),
    ("++1", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ++1"),
    ("+-1", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- +-1"),
    ("-1k", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -1k"),
    ("-0x10", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -0x10"),
    ("-.5", "Parsing error: argument too large -- -.5"),
    ("-.0", "Parsing error: argument too large -- -.0"),
    ("-.5k", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -.5k"),
    ("-0.5", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -0.5"),
    (".k", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- .k"),
    ("1MB", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1MB"),
    ("1X", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1X"),
    ("4x", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 4x"),
    ("abc", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc"),
    ("1,5k", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1,5k"),
    ("1_000", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1_000"),
    ("0b101", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 0b101"),
    ("inf.", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- inf."),
    ("nan.", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- nan."),
    ("1.5x", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5x"),
    ("\t1M", "read 0/0 bytes at offset 1048576"),
    ("\t-1", "Parsing error: argument too large -- \t-1"),
    ("\r1k", "read 0/0 bytes at offset 1024"),
    ("\n1k", "read 0/0 bytes at offset 1024"),
    ("\u{c}1k", "read 0/0 bytes at offset 1024"),
    ("\u{b}0x10", "read 0/0 bytes at offset 16"),
    ("\u{b}.5k", "read 0/0 bytes at offset 512"),
];

const FORMATTING: &str = "Formatting 'i.raw', fmt=raw size=";

#[test]
fn image_sizes_parse_as_qemu_img_create_parses_them() {
    for &(s, printed) in QEMU_IMG_CREATE {
        let got = cvtnum_full("image size", s, 0, i64::MAX as u64);
        match printed.strip_prefix(FORMATTING) {
            Some(n) => assert_eq!(got, Ok(n.parse().unwrap()), "{s:?}"),
            None => {
                let msg = printed.strip_prefix("qemu-img: ").unwrap();
                assert_eq!(got, Err(msg.to_string()), "{s:?}");
            }
        }
    }
}

#[test]
fn option_sizes_cover_u64_as_qemu_opts_does() {
    for &(s, printed) in QEMU_IMG_CREATE_O_SIZE {
        let got = parse_size(s);
        if let Some(n) = printed.strip_prefix(FORMATTING) {
            // qemu-img prints the size as a signed number.
            assert_eq!(got, Ok(n.parse::<i64>().unwrap() as u64), "{s:?}");
        } else if printed.ends_with("Image creation needs a size parameter") {
            // u64::MAX is QEMU's "no size given": it parsed, as the largest size.
            assert_eq!(got, Ok(u64::MAX), "{s:?}");
        } else if printed.ends_with("is out of range for parameter 'size'") {
            // ERANGE; a minus sign makes it Negative.
            let negative = s.trim_start().starts_with('-');
            let want = if negative {
                SizeError::Negative
            } else {
                SizeError::OutOfRange
            };
            assert_eq!(got, Err(want), "{s:?}");
        } else {
            assert!(
                printed.contains("expects a non-negative number below 2^64"),
                "{s:?}: {printed}"
            );
            assert_eq!(got, Err(SizeError::Invalid), "{s:?}");
        }
    }
}

#[test]
fn offsets_parse_as_qemu_io_parses_them() {
    for &(s, printed) in QEMU_IO_OFFSET {
        let got = parse_size_in(s, 0..=i64::MAX as u64);
        if let Some(n) = printed.strip_prefix("read 0/0 bytes at offset ") {
            assert_eq!(got, Ok(n.parse().unwrap()), "{s:?}");
        } else if printed == "read failed: Input/output error" {
            // Parsed, and past the end of the image.
            assert!(got.is_ok_and(|v| v > 9_223_372_035_781_033_984), "{s:?}");
        } else if printed.starts_with("Parsing error: argument too large -- ") {
            assert!(
                matches!(got, Err(SizeError::Negative | SizeError::OutOfRange)),
                "{s:?}: {got:?}"
            );
        } else {
            assert!(printed.starts_with("Parsing error: non-numeric argument"));
            assert_eq!(got, Err(SizeError::Invalid), "{s:?}");
        }
    }
}

#[test]
fn sizes_take_suffixes() {
    assert_eq!(parse_size("4k"), Ok(4096));
    assert_eq!(parse_size("1M"), Ok(1 << 20));
    assert_eq!(parse_size("512"), Ok(512));
    assert!(parse_size("4x").is_err());
}
