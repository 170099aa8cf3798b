//! Progress reports (`-p` of convert, commit and rebase), printed as qemu-img prints them:
//! `    (NN.NN/100%)` and a carriage return on stdout, terminal or not, each time the figure
//! moved by more than the command's step since the last report (and always at 0 and 100),
//! then a newline at the end.
//!
//! The figure is a single-precision float, as qemu-img keeps it, so that the same work
//! prints the same figures.

use std::io::Write;

/// A command's progress report (see the module's documentation).
pub struct Progress {
    /// `-p` given (and not `-q`): otherwise nothing is printed.
    enabled: bool,
    /// The percentage reached.
    current: f32,
    /// The percentage last printed.
    last_print: f32,
    /// How far the figure moves between two reports (convert and commit 1, rebase 2).
    min_skip: f32,
}

impl Progress {
    /// A report that prints when `enabled`, every `min_skip` percent; it prints its start
    /// (0.00) at once, as qemu-img does before the command opens anything.
    pub fn start(enabled: bool, min_skip: f32) -> Progress {
        let mut p = Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        };
        p.advance(0.0, 100.0);
        p
    }

    /// Moves the figure to `percent` (of the whole command).
    pub fn set(&mut self, percent: f32) {
        self.update(percent);
    }

    /// Moves the figure by `delta` percent of a part that is `part` percent of the command.
    pub fn advance(&mut self, delta: f32, part: f32) {
        self.update(self.current + delta / 100.0 * part);
    }

    fn update(&mut self, percent: f32) {
        let current = percent.min(100.0);
        self.current = current;
        if current > self.last_print + self.min_skip || current == 100.0 || current == 0.0 {
            self.last_print = current;
            if self.enabled {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "    ({current:.2}/100%)\r");
                let _ = out.flush();
            }
        }
    }

    /// Ends the report: 100% (on success: `done`), then the newline that ends the line of
    /// reports.
    pub fn finish(mut self, done: bool) {
        if done {
            self.set(100.0);
        }
        if self.enabled {
            println!();
        }
    }
}

/// The percentage `done` is of `total`, as a report figure (0 for an empty total).
pub fn percent(done: u64, total: u64) -> f32 {
    if total == 0 {
        return 0.0;
    }
    (100.0 * done as f64 / total as f64) as f32
}
