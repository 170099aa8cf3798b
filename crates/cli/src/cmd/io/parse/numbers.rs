//! The numbers in qemu-io's command arguments: sizes, offsets and lengths (`cvtnum`) and
//! pattern bytes (`strtol`), with qemu-io's messages when they do not parse.

use super::ParseError;

/// Why [`cvtnum`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CvtError {
    /// Not a number, or an unknown suffix.
    Invalid,
    /// Negative, or above `i64::MAX`.
    TooLarge,
}

/// qemu-io's message for a number that did not parse.
fn cvt_message(e: CvtError, arg: &str) -> String {
    match e {
        CvtError::Invalid => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
        ),
        CvtError::TooLarge => format!("Parsing error: argument too large -- {arg}"),
    }
}

pub(super) fn cvt(arg: &str) -> Result<u64, ParseError> {
    cvtnum(arg).map_err(|e| ParseError::Invalid(cvt_message(e, arg)))
}

/// A size as qemu-io reads it (`cvtnum`, i.e. `qemu_strtosz` with bytes as the default unit):
/// decimal digits with an optional fraction, then an optional suffix `B`, `K`, `M`, `G`, `T`,
/// `P` or `E` (either case, binary multiples); or `0x` hex without fraction or suffix. A
/// fraction needs a suffix other than `B` and is rounded to the nearest byte. Negative
/// numbers and values above `i64::MAX` are [`CvtError::TooLarge`].
///
/// ```text
/// 4096, 4k, 4K, 1.5M, .5k, 1., 0x1000, +7   accepted
/// 1.5, 0x10k, 1kb, 1e3                      Invalid
/// -1, 8E                                    TooLarge
/// ```
pub fn cvtnum(s: &str) -> Result<u64, CvtError> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let int_len = t.bytes().take_while(u8::is_ascii_digit).count();
    let (int_digits, rest) = t.split_at(int_len);
    if negative && int_len > 0 {
        return Err(CvtError::TooLarge);
    }
    // Hex: "0x..." (the decimal parse stopped at the x after a zero).
    if int_digits == "0" && (rest.starts_with('x') || rest.starts_with('X')) {
        let hex = &rest[1..];
        let n = hex.bytes().take_while(u8::is_ascii_hexdigit).count();
        if n == 0 || n < hex.len() {
            return Err(CvtError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| CvtError::TooLarge)?;
        return check_i64(v);
    }
    let int: u64 = if int_len == 0 {
        0
    } else {
        int_digits.parse().map_err(|_| CvtError::TooLarge)?
    };
    let mut rest = rest;
    // The fraction as 0.64 fixed point, as qemu computes it (through a double).
    let mut frac: u64 = 0;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if int_len == 0 && n == 0 {
            return Err(CvtError::Invalid);
        }
        if negative {
            return Err(CvtError::Invalid);
        }
        if n > 0 {
            let x: f64 = format!("0.{}", &f[..n]).parse().expect("digits parse");
            // Saturates at u64::MAX when the digits round to 1.0, like qemu.
            frac = (x * 18_446_744_073_709_551_616.0) as u64;
        }
        rest = &f[n..];
    } else if int_len == 0 {
        return Err(CvtError::Invalid);
    }
    let mut chars = rest.chars();
    let mul: u64 = match chars.next().map(|c| c.to_ascii_uppercase()) {
        None => 1,
        Some(c) => {
            let m = match c {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => return Err(CvtError::Invalid),
            };
            if chars.next().is_some() {
                return Err(CvtError::Invalid);
            }
            m
        }
    };
    if mul == 1 {
        if frac != 0 {
            return Err(CvtError::Invalid);
        }
        return check_i64(int);
    }
    // int * mul + frac * mul, rounding the fraction's product half up; overflow is too large.
    let whole = u128::from(int) * u128::from(mul);
    let f = u128::from(frac) * u128::from(mul);
    let v = whole + (f >> 64) + ((f >> 63) & 1);
    u64::try_from(v)
        .map_err(|_| CvtError::TooLarge)
        .and_then(check_i64)
}

fn check_i64(v: u64) -> Result<u64, CvtError> {
    if v > i64::MAX as u64 {
        Err(CvtError::TooLarge)
    } else {
        Ok(v)
    }
}

/// A pattern byte as qemu-io reads it (`strtol` with base 0: decimal, `0x` hex or `0`
/// octal, optional sign); `None` unless the whole argument is a number in 0..=255.
pub fn parse_pattern(s: &str) -> Option<u8> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex_digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .filter(|h| h.bytes().next().is_some_and(|b| b.is_ascii_hexdigit()));
    let (radix, digits) = match hex_digits {
        Some(h) => (16, h),
        None if t.starts_with('0') => (8, t),
        None => (10, t),
    };
    let n = digits
        .bytes()
        .take_while(|b| (*b as char).is_digit(radix))
        .count();
    if n == 0 {
        // strtol parsed nothing: valid only for an empty argument (value 0).
        return s.is_empty().then_some(0);
    }
    if n < digits.len() {
        return None;
    }
    let mut v: i128 = 0;
    for b in digits.bytes() {
        v = (v * i128::from(radix) + i128::from((b as char).to_digit(radix)?)).min(1 << 70);
    }
    let v = if negative { -v } else { v };
    u8::try_from(v).ok()
}

pub(super) fn pattern_arg(arg: &str) -> Result<u8, ParseError> {
    parse_pattern(arg)
        .ok_or_else(|| ParseError::Invalid(format!("{arg} is not a valid pattern byte")))
}
