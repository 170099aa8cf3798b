//! Usage errors as qemu-img and qemu-io print them (their getopt's words, the command's name,
//! exit status 1), from clap's errors.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use std::ffi::OsString;
use std::process::ExitCode;

/// Prints clap's error `e` for the command line `args` (`args[0]` the program) as the tool
/// qimg stands in for would, and returns the exit status: 0 for `--help` and `--version`, 1
/// otherwise.
pub fn report(e: clap::Error, args: &[OsString]) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let prog = crate::util::program();
    // The command qemu-img was given (none for qemu-io, whose options come first).
    let cmd = match prog {
        "qemu-io" => None,
        _ => args
            .iter()
            .skip(1)
            .filter_map(|a| a.to_str())
            .find(|a| !a.starts_with('-')),
    };
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // Where the message is from: the command for an option it does not know (getopt's
    // words), the program otherwise; which help to try.
    let (from_cmd, help_cmd, msg) = match e.kind() {
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            (false, None, "Not enough arguments".to_owned())
        }
        ErrorKind::InvalidSubcommand => (
            false,
            None,
            format!(
                "Command not found: {}",
                context(ContextKind::InvalidSubcommand).unwrap_or_default()
            ),
        ),
        ErrorKind::UnknownArgument => {
            let arg = context(ContextKind::InvalidArg).unwrap_or_default();
            let msg = match arg.strip_prefix("--") {
                Some(_) => format!("unrecognized option '{arg}'"),
                None => format!("invalid option -- '{}'", arg.trim_start_matches('-')),
            };
            (true, cmd, msg)
        }
        ErrorKind::MissingRequiredArgument => {
            let msg = match cmd {
                Some("compare") => "Expecting two image file names",
                _ => "Expecting one image file name",
            };
            (false, cmd, msg.into())
        }
        _ => {
            let _ = e.print();
            return ExitCode::from(1);
        }
    };
    // getopt's messages and the help to try name the program as invoked (argv[0]); the
    // others start with its name.
    let argv0 = crate::util::invoked_as();
    if prog == "qemu-io" {
        // qemu-io follows it with its usage text; the message is what scripts look at.
        eprintln!("{}: {msg}", if from_cmd { argv0 } else { prog });
        return ExitCode::from(1);
    }
    let whose = match (from_cmd, help_cmd) {
        (true, Some(cmd)) => format!("{argv0} {cmd}"),
        _ => prog.to_owned(),
    };
    match help_cmd {
        Some(cmd) => eprintln!("{whose}: {msg}\nTry '{argv0} {cmd} --help' for more info"),
        None => eprintln!("{whose}: {msg}\nTry '{argv0} --help' for more info"),
    }
    ExitCode::from(1)
}
