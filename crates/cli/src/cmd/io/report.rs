//! qemu-io's output formats: the two-line report after each request, its `-C` form, the
//! `-v` hex dump and the sizes of `length`.

use std::fmt::Write as _;
use std::time::Duration;

/// A byte count or rate as qemu-io's `cvtstr` prints it: `%.3f` of the largest binary unit
/// not above it (`" bytes"` and `%f` below 1 KiB), with a `.000` cut off.
///
/// `4096.0` → `"4 KiB"`, `1536.0` → `"1.500 KiB"`, `100.0` → `"100 bytes"`.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, "EiB"),
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ];
    let (mut s, suffix) = UNITS
        .iter()
        .find(|(shift, _)| value >= (1u64 << shift) as f64)
        .map(|&(shift, unit)| (c_float(value / (1u64 << shift) as f64, 3), unit))
        .unwrap_or_else(|| (c_float(value, 6), "bytes"));
    if let Some(i) = s.find(".000") {
        s.truncate(i);
    }
    format!("{s} {suffix}")
}

/// C's `%.Nf` (Rust spells infinity and NaN differently).
fn c_float(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:.decimals$}")
    }
}

/// An elapsed time as qemu-io prints it: `"00.01 sec"` below a second, `H:MM:SS.ss` from one
/// second on, and always `H:MM:SS.ss` in the `-C` form.
pub fn timestr(t: Duration, csv: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if !csv && secs == 0 {
        format!("{frac:05.2} sec")
    } else {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            secs % 3600 / 60,
            (secs % 60) as f64 + frac
        )
    }
}

/// qemu-io's report of a completed request (`print_report` with one operation): e.g.
///
/// ```text
/// wrote 4096/4096 bytes at offset 0
/// 4 KiB, 1 ops; 00.00 sec (1.585 MiB/sec and 405.8621 ops/sec)
/// ```
///
/// or, with `-C`, `bytes,ops,time,bytes/sec,ops/sec`. Ends with a newline.
pub fn report(op: &str, t: Duration, offset: u64, len: u64, csv: bool) -> String {
    let secs = t.as_secs_f64();
    let ts = timestr(t, csv);
    let bps = len as f64 / secs;
    let ops = 1.0 / secs;
    if csv {
        format!("{len},1,{ts},{},{}\n", c_float(bps, 3), c_float(ops, 3))
    } else {
        format!(
            "{op} {len}/{len} bytes at offset {offset}\n{}, 1 ops; {ts} ({}/sec and {} ops/sec)\n",
            cvtstr(len as f64),
            cvtstr(bps),
            c_float(ops, 4)
        )
    }
}

/// qemu-io's `-v` hex dump of `data` read at `offset`: 16 bytes a line, `%08x` offset, the
/// bytes in hex, then the alphanumeric ones as characters and the rest as dots. The last line
/// is not padded. Ends with a newline (empty for no data).
pub fn dump(data: &[u8], offset: u64) -> String {
    let mut s = String::with_capacity(data.len() / 16 * 76 + 76);
    for (i, line) in data.chunks(16).enumerate() {
        let _ = write!(s, "{:08x}:  ", offset.wrapping_add(16 * i as u64));
        for b in line {
            let _ = write!(s, "{b:02x} ");
        }
        s.push(' ');
        s.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            }
        }));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_print_like_qemu_io() {
        // Figures printed by qemu-io 10.0.2.
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(67108864.0), "64 MiB");
        assert_eq!(cvtstr(100.0), "100 bytes");
        assert_eq!(cvtstr(1.0), "1 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(0.297654), "0.297654 bytes");
        assert_eq!(cvtstr(1.585 * 1048576.0), "1.585 MiB");
        assert_eq!(cvtstr(3.427 * 1024.0), "3.427 KiB");
        assert_eq!(cvtstr(4.940 * 1073741824.0), "4.940 GiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(f64::INFINITY), "inf EiB");
    }

    #[test]
    fn times_print_like_qemu_io() {
        assert_eq!(timestr(Duration::from_micros(1234), false), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(250), false), "00.25 sec");
        assert_eq!(timestr(Duration::from_millis(1234), false), "0:00:01.23");
        assert_eq!(timestr(Duration::from_secs(3723), false), "1:02:03.00");
        assert_eq!(timestr(Duration::from_millis(6), true), "0:00:00.01");
        assert_eq!(timestr(Duration::from_millis(1), true), "0:00:00.00");
    }

    #[test]
    fn reports() {
        let r = report("wrote", Duration::from_millis(10), 0, 1 << 20, false);
        assert_eq!(
            r,
            "wrote 1048576/1048576 bytes at offset 0\n\
             1 MiB, 1 ops; 00.01 sec (100 MiB/sec and 100.0000 ops/sec)\n"
        );
        let r = report("read", Duration::from_millis(500), 7, 512, true);
        assert_eq!(r, "512,1,0:00:00.50,1024.000,2.000\n");
        let r = report("discard", Duration::from_secs(2), 4096, 0, false);
        assert_eq!(
            r,
            "discard 0/0 bytes at offset 4096\n\
             0 bytes, 1 ops; 0:00:02.00 (0 bytes/sec and 0.5000 ops/sec)\n"
        );
    }

    #[test]
    fn dumps_like_qemu_io() {
        // `read -v 0 24` of 03 41 41 41 41 41 03 03... as qemu-io 10.0.2 printed it.
        let mut data = vec![3u8; 24];
        data[1..6].fill(0x41);
        assert_eq!(
            dump(&data, 0),
            "00000000:  03 41 41 41 41 41 03 03 03 03 03 03 03 03 03 03  .AAAAA..........\n\
             00000010:  03 03 03 03 03 03 03 03  ........\n"
        );
        assert_eq!(dump(&data[..5], 0), "00000000:  03 41 41 41 41  .AAAA\n");
        assert_eq!(dump(&[], 0), "");
        assert!(dump(&[0x30], 0x1_0000_0000).starts_with("100000000:  30  0"));
    }
}
