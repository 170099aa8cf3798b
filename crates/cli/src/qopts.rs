//! Values of QEMU's option dictionaries (`-o`, `--image-opts`, `json:` filenames): a boolean,
//! a size, a number, read as QemuOpts reads them and refused with its words.

use crate::size::{parse_size, SizeError};

/// Splits an option list at commas (`,,` is a literal comma), as QemuOpts does.
pub fn split_list(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// qemu-img's check of each `-o` argument, as it reads its options: not empty, not starting
/// with a comma, not ending in a lone comma ("Invalid option list: ...").
pub fn check_lists(lists: &[String]) -> Result<(), String> {
    for list in lists {
        let trailing = list.len() - list.trim_end_matches(',').len();
        if list.is_empty() || list.starts_with(',') || trailing % 2 != 0 {
            return Err(format!("Invalid option list: {list}"));
        }
    }
    Ok(())
}

/// A boolean option: `on`/`off` and their synonyms, as QemuOpts' `parse_option_bool`.
pub fn bool_value(name: &str, text: &str) -> Result<bool, String> {
    match text {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// A size option: `qemu_strtosz` over the whole of `u64`, as QemuOpts' `parse_option_size`.
pub fn size_value(name: &str, text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| match e {
        SizeError::Negative | SizeError::OutOfRange => {
            format!("Value '{text}' is out of range for parameter '{name}'")
        }
        SizeError::Invalid => format!(
            "Parameter '{name}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        ),
    })
}

/// A number option, as QemuOpts' `parse_option_number` reads it with `strtoull`: decimal,
/// `0x` hexadecimal or `0` octal, after an optional sign (a negative number wraps).
pub fn number_value(name: &str, text: &str) -> Result<u64, String> {
    parse_number(text).ok_or_else(|| format!("Parameter '{name}' expects a number"))
}

fn parse_number(s: &str) -> Option<u64> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<u64>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_are_checked_as_qemu_img_checks_them() {
        let l = |v: &[&str]| check_lists(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(l(&["a=1"]).is_ok());
        assert!(l(&["a=x,,"]).is_ok());
        assert_eq!(l(&["a=1", "a,"]), Err("Invalid option list: a,".into()));
        assert!(l(&[""]).is_err());
        assert!(l(&[",help"]).is_err());
    }

    #[test]
    fn values_read_as_qemu_opts_reads_them() {
        assert_eq!(bool_value("x", "on"), Ok(true));
        assert_eq!(bool_value("x", "n"), Ok(false));
        assert_eq!(
            bool_value("read-only", "maybe"),
            Err("Parameter 'read-only' expects 'on' or 'off'".into())
        );
        assert_eq!(size_value("s", "1M"), Ok(1 << 20));
        assert!(size_value("s", "abc").unwrap_err().starts_with(
            "Parameter 's' expects a non-negative number below 2^64\nOptional suffix"
        ));
        assert_eq!(
            size_value("s", "-1"),
            Err("Value '-1' is out of range for parameter 's'".into())
        );
        assert_eq!(number_value("n", "0x10"), Ok(16));
        assert_eq!(number_value("n", "010"), Ok(8));
        assert_eq!(number_value("n", "12"), Ok(12));
        assert!(number_value("n", "1k").is_err());
        assert_eq!(number_value("n", "-1"), Ok(u64::MAX));
        assert!(number_value("n", "1.5").is_err());
    }
}
