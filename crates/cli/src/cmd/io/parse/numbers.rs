//! The numbers in qemu-io's command arguments: sizes, offsets and lengths (`cvtnum`, over
//! [`crate::size`]'s grammar) and pattern bytes (`strtol`), with qemu-io's messages when they
//! do not parse.

use super::ParseError;
use crate::size::{parse_size_in, SizeError};

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

/// A size, offset or length as qemu-io reads it (`cvtnum`): [`crate::size`]'s grammar
/// (qemu's `qemu_strtosz`, the one of every size in qemu-img and qemu-io), then
/// `0..=i64::MAX`. Negative numbers and values above `i64::MAX` are [`CvtError::TooLarge`]
/// (qemu-io says "argument too large" for both).
///
/// ```text
/// 4096, 4k, 4K, 1.5M, .5k, 1., 0x1000, +7   accepted
/// 1.5, 0x10k, 1kb, 1e3, -1k                 Invalid
/// -1, -.5, 8E                               TooLarge
/// ```
pub fn cvtnum(s: &str) -> Result<u64, CvtError> {
    parse_size_in(s, 0..=i64::MAX as u64).map_err(|e| match e {
        SizeError::Invalid => CvtError::Invalid,
        SizeError::Negative | SizeError::OutOfRange => CvtError::TooLarge,
    })
}

/// A pattern byte as qemu-io reads it ([`strtol`]); `None` unless the whole argument is a
/// number in 0..=255.
pub fn parse_pattern(s: &str) -> Option<u8> {
    strtol(s).and_then(|v| u8::try_from(v).ok())
}

/// A number as C's `strtol` with base 0 reads it (decimal, `0x` hex or `0` octal, optional
/// sign, leading blanks); `None` unless it takes the whole argument (an empty one is 0).
/// Values are saturated far beyond `i64`'s range, which callers reject.
pub fn strtol(s: &str) -> Option<i128> {
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
    Some(if negative { -v } else { v })
}

pub(super) fn pattern_arg(arg: &str) -> Result<u8, ParseError> {
    parse_pattern(arg)
        .ok_or_else(|| ParseError::Invalid(format!("{arg} is not a valid pattern byte")))
}
