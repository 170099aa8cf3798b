//! Sizes as QEMU reads them: the one grammar (`qemu_strtosz`) behind every size qemu-img and
//! qemu-io take, and the range checks and messages of the commands that read them.
//!
//! qemu-img create's size and its `-o size=`/`cluster_size=`, qemu-img bench's `-s`, `-S` and
//! `-o`, qemu-io's offsets and lengths: all go through `qemu_strtosz`, and the tools gave the
//! same verdict on every input tried (see the tests). What differs is what each caller does
//! with the result, which is the `range` parameter of [`parse_size_in`]:
//!
//! - qemu-io's `cvtnum`: `0..=i64::MAX`, else "argument too large";
//! - qemu-img's `cvtnum_full` ([`cvtnum_full`]): bounds of its own per option (`0..=i64::MAX`
//!   for sizes and offsets, `1..=i32::MAX` for bench's buffer size...);
//! - option lists (QemuOpts' size options, [`parse_size`] itself): the whole of `u64`.
//!
//! The grammar, as qemu 10.0 implements it (`do_strtosz` in `util/cutils.c`):
//!
//! - leading C whitespace (space, `\t`, `\n`, `\v`, `\f`, `\r`) and one `+` are skipped;
//! - decimal digits (`010` is ten: no octal), then optionally a fraction `.DIGITS` (`1.`, `.5`
//!   and `1.k` are fine), then optionally one suffix `B`, `K`, `M`, `G`, `T`, `P` or `E` in
//!   either case (powers of 1024; no `KB`, `KiB` or exponents: `1e3` is `1E` followed by junk);
//! - or `0x`/`0X` hexadecimal, without fraction or suffix (`0x10B` is hex for 267);
//! - a fraction needs a scaling suffix (`1.5` and `1.5B` are invalid, `1.5k` is 1536) and is
//!   rounded to the nearest byte, half up, exactly (a 64-bit fixed-point fraction), except
//!   that a fraction that rounds to 1.0 as a double carries into the integer
//!   (`0.99999999999999999999` is 1, with or without a suffix);
//! - nothing may follow (trailing blanks are junk);
//! - a minus sign before digits is out of range (`-1`, `-0`, `-.5`) when nothing else is
//!   wrong, and invalid otherwise (`-1k`, `-0x10`, `-.5k`); so is overflow (`16E`,
//!   `99999999999999999999`) versus overflow followed by junk (`99999999999999999999k`).

#[cfg(test)]
mod tests;

use std::ops::RangeInclusive;

/// Why a size did not parse: `qemu_strtosz`'s `EINVAL` and `ERANGE`, the latter split by
/// cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// `EINVAL`: not a size (no digits, an unknown suffix, trailing characters, a fraction
    /// without a scaling suffix, hex with a fraction or a suffix).
    Invalid,
    /// `ERANGE` from a minus sign: `-1`, `-0`, `-.5`.
    Negative,
    /// `ERANGE`: the value does not fit in 64 bits, or is outside the caller's range.
    OutOfRange,
}

/// C's `isspace` in the C locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The multiplier of a size suffix (`suffix_mul`).
fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1 << shift)
}

/// A size as `qemu_strtosz` reads it, over the whole of `u64` (QemuOpts' size options take
/// it as is). The grammar is in the [module documentation](self).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    // The end of what was parsed: anything after it makes the whole string invalid, whatever
    // else went wrong (qemu_strtosz without an end pointer).
    let finish = |end: usize, r: Result<u64, SizeError>| {
        if end < b.len() {
            Err(SizeError::Invalid)
        } else {
            r
        }
    };

    // The integral part, as parse_uint (strtoull, base 10) reads it.
    let mut i = b.iter().take_while(|&&c| is_c_space(c)).count();
    let sign = b.get(i).copied().filter(|&c| c == b'+' || c == b'-');
    i += usize::from(sign.is_some());
    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let (mut val, mut end) = if digits == 0 {
        // Nothing parsed: only a fraction (".5k", "-.5") can still make a number.
        (None, 0)
    } else if sign == Some(b'-') {
        return finish(i + digits, Err(SizeError::Negative));
    } else {
        match s[i..i + digits].parse::<u64>() {
            Ok(v) => (Some(v), i + digits),
            Err(_) => return finish(i + digits, Err(SizeError::OutOfRange)),
        }
    };

    if val == Some(0) && matches!(b.get(end), Some(b'x' | b'X')) {
        if digits > 1 {
            // "00x10": strtoull in base 16 reads the zeros and stops at the x, which is junk.
            return Err(SizeError::Invalid);
        }
        return parse_hex(s, i).map_or(Err(SizeError::Invalid), |(end, r)| finish(end, r));
    }

    // The fraction, as a 64-bit fixed-point number.
    let mut frac = 0u64;
    let fraction_start = match val {
        Some(_) if b.get(end) == Some(&b'.') => Some(end),
        None if s.contains('.') => Some(i),
        _ => None,
    };
    if let Some(dot) = fraction_start {
        // strtod would read a sign and blanks only where parse_uint found no digits, which is
        // where they are already skipped; what follows must be '.' and, unless digits came
        // before it, a digit.
        if b.get(dot) != Some(&b'.') {
            return Err(SizeError::Invalid);
        }
        let n = b[dot + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if val.is_none() && n == 0 {
            return Err(SizeError::Invalid);
        }
        end = dot + 1 + n;
        if sign == Some(b'-') {
            // strtod read a negative fraction ("-.5"): out of range.
            return finish(end, Err(SizeError::Negative));
        }
        let (carry, f) = fraction(&s[dot + 1..end]);
        let int = val.unwrap_or(0);
        val = Some(if carry {
            match int.checked_add(1) {
                Some(v) => v,
                None => return finish(end, Err(SizeError::OutOfRange)),
            }
        } else {
            int
        });
        frac = f;
    }
    let Some(val) = val else {
        return Err(SizeError::Invalid);
    };

    let mul = match suffix_mul(b.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if mul == 1 {
        // A fraction needs a scale.
        return if frac != 0 {
            Err(SizeError::Invalid)
        } else {
            finish(end, Ok(val))
        };
    }
    // val * mul + frac * mul, the fraction's product rounded half up; overflow is ERANGE.
    let whole = u128::from(val) * u128::from(mul);
    let f = u128::from(frac) * u128::from(mul);
    let v = whole + (f >> 64) + ((f >> 63) & 1);
    finish(end, u64::try_from(v).map_err(|_| SizeError::OutOfRange))
}

/// The hexadecimal case: `strtoull` in base 16 from after the blanks and sign at `start`
/// (where `0x` or `0X` follows a zero). The end of what it parsed and the value; `None` when
/// a fraction or a suffix follows, which qemu refuses even though they would parse.
fn parse_hex(s: &str, start: usize) -> Option<(usize, Result<u64, SizeError>)> {
    let b = s.as_bytes();
    let hex_start = start + 2;
    let n = b[hex_start..]
        .iter()
        .take_while(|c| c.is_ascii_hexdigit())
        .count();
    if n == 0 {
        // "0x" without digits: strtoull reads the 0 alone; the x is junk.
        return Some((start + 1, Ok(0)));
    }
    let end = hex_start + n;
    let next = b.get(end).copied();
    if next == Some(b'.') || suffix_mul(next).is_some() {
        return None;
    }
    let r = u64::from_str_radix(&s[hex_start..end], 16).map_err(|_| SizeError::OutOfRange);
    Some((end, r))
}

/// `.DIGITS` as qemu turns it into a 64-bit fixed-point fraction (through a `double`):
/// whether it rounded up to 1.0 (a carry into the integer), else the fraction times 2^64,
/// never 0 unless the digits are all zeros.
fn fraction(digits: &str) -> (bool, u64) {
    if digits.is_empty() {
        return (false, 0);
    }
    let x: f64 = format!("0.{digits}").parse().expect("decimal digits");
    if x == 1.0 {
        return (true, 0);
    }
    // Below 1.0, x * 2^64 fits (the largest double below 1 times 2^64 is 2^64 - 2^11).
    let f = (x * 18_446_744_073_709_551_616.0) as u64;
    let nonzero = digits.bytes().any(|d| d != b'0');
    (false, if f == 0 && nonzero { 1 } else { f })
}

/// [`parse_size`], then the caller's `range`: a value outside it is
/// [`SizeError::OutOfRange`], as qemu-io's `cvtnum` (`0..=i64::MAX`) and qemu-img's
/// `cvtnum_full` (bounds per option) report it.
pub fn parse_size_in(s: &str, range: RangeInclusive<u64>) -> Result<u64, SizeError> {
    let v = parse_size(s)?;
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(SizeError::OutOfRange)
    }
}

/// qemu-img's `cvtnum_full`: a size for the option described by `name` (e.g. "image size"),
/// within `min..=max`, or qemu-img's message (without the program name).
pub fn cvtnum_full(name: &str, s: &str, min: u64, max: u64) -> Result<u64, String> {
    parse_size_in(s, min..=max).map_err(|e| match e {
        SizeError::Invalid => format!("Invalid {name} specified: '{s}'."),
        SizeError::Negative | SizeError::OutOfRange => {
            format!("Invalid {name} specified. Must be between {min} and {max}.")
        }
    })
}
