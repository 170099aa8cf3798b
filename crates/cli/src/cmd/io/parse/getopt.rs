//! GNU `getopt` as qemu-io's commands use it: options in any position (the positional
//! arguments are permuted to the end), `--`, option arguments in the same or the next word,
//! and getopt's own error messages.

/// One result of [`getopt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Opt<'a> {
    /// An option and its argument (for options declared with `:`).
    Flag(char, Option<&'a str>),
    /// getopt's error message (it stops there: qemu-io then prints the usage).
    Error(String),
}

/// GNU `getopt` over a command's arguments: options are processed in order of appearance,
/// wherever they are (the positional arguments are permuted to the end); `--` ends the
/// options; an option's argument is the rest of its word or the next word. Returns the
/// options (up to and including the first error) and the positional arguments.
pub(super) fn getopt<'a>(cmd: &str, args: &[&'a str], spec: &str) -> (Vec<Opt<'a>>, Vec<&'a str>) {
    let mut opts = Vec::new();
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            positional.extend_from_slice(&args[i..]);
            break;
        }
        if !a.starts_with('-') || a.len() == 1 {
            positional.push(a);
            continue;
        }
        let mut rest = &a[1..];
        while let Some(c) = rest.chars().next() {
            rest = &rest[c.len_utf8()..];
            let declared = spec.find(c).filter(|_| c != ':');
            let Some(at) = declared else {
                opts.push(Opt::Error(format!("{cmd}: invalid option -- '{c}'")));
                return (opts, positional);
            };
            if spec[at + c.len_utf8()..].starts_with(':') {
                let arg = if !rest.is_empty() {
                    rest
                } else if i < args.len() {
                    i += 1;
                    args[i - 1]
                } else {
                    opts.push(Opt::Error(format!(
                        "{cmd}: option requires an argument -- '{c}'"
                    )));
                    return (opts, positional);
                };
                opts.push(Opt::Flag(c, Some(arg)));
                break;
            }
            opts.push(Opt::Flag(c, None));
        }
    }
    (opts, positional)
}
