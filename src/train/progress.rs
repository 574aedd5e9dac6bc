//! What a run shows while it trains: a progress bar on a terminal, else a plain line every
//! `log_every` steps (a log file, a batch job); nothing on the ranks other than rank 0.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

/// Progress output: a bar on a terminal, else a plain line every `log_every` steps; nothing on
/// the ranks other than rank 0.
pub enum Progress {
    Bar(ProgressBar),
    Lines {
        every: u64,
        /// The first step of this invocation and when it started, for the remaining time.
        first: u64,
        started: Instant,
    },
    Quiet,
}

impl Progress {
    pub fn new(start: u64, end: u64, log_every: u64, main: bool) -> Progress {
        if !main {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(end).with_position(start);
            let style =
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            Progress::Bar(bar)
        } else {
            Progress::Lines { every: log_every, first: start, started: Instant::now() }
        }
    }

    pub fn step(&self, step: u64, end: u64, summary: &str) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(summary.to_string());
            }
            Progress::Lines { every, first, started } => {
                if step.is_multiple_of(*every) || step == end {
                    // The bar's [elapsed<remaining], for logs read without a terminal.
                    let elapsed = started.elapsed().as_secs_f64();
                    let left =
                        elapsed / step.saturating_sub(*first).max(1) as f64 * end.saturating_sub(step) as f64;
                    crate::say!("step {step}/{end} {summary} [{}<{}]", clock(elapsed), clock(left));
                }
            }
            Progress::Quiet => {}
        }
    }

    pub fn println(&self, line: &str) {
        match self {
            Progress::Bar(bar) => bar.println(line),
            Progress::Lines { .. } => crate::say!("{line}"),
            Progress::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Seconds as `h:mm:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_hours_minutes_seconds() {
        assert_eq!(clock(0.0), "0:00:00");
        assert_eq!(clock(59.6), "0:01:00");
        assert_eq!(clock(3725.0), "1:02:05");
        assert_eq!(clock(-3.0), "0:00:00");
        assert_eq!(clock(90_000.0), "25:00:00");
    }
}
