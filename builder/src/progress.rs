//! Progress on stderr (stdout carries only results): on a terminal each stage is an
//! indicatif spinner that turns into a byte bar for long copies (compression, qcow2, bmap,
//! checksums, flashing); elsewhere (CI logs, pipes) plain lines, one when a stage starts
//! and one when it ends.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// indicatif bars and spinners.
    Bars,
    /// One line per event.
    Plain,
    /// Nothing (tests).
    Quiet,
}

impl Mode {
    /// Bars when stderr is a terminal (and TERM is not `dumb`), plain lines otherwise;
    /// `CLUTCH_PROGRESS=plain|bars|quiet` overrides.
    pub fn detect() -> Mode {
        match std::env::var("CLUTCH_PROGRESS").as_deref() {
            Ok("plain") => return Mode::Plain,
            Ok("bars") => return Mode::Bars,
            Ok("quiet") => return Mode::Quiet,
            _ => {}
        }
        let dumb = std::env::var("TERM").map(|t| t == "dumb").unwrap_or(false);
        if std::io::stderr().is_terminal() && !dumb {
            Mode::Bars
        } else {
            Mode::Plain
        }
    }
}

pub struct Progress {
    mode: Mode,
    total: usize,
    n: usize,
    start: Instant,
    stage_start: Instant,
    what: String,
    bar: Option<ProgressBar>,
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {msg} {elapsed:.dim}")
        .expect("valid template")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.cyan} {prefix:.bold} {msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self::with_mode(total, Mode::detect())
    }

    pub fn with_mode(total: usize, mode: Mode) -> Self {
        let now = Instant::now();
        Progress {
            mode,
            total,
            n: 0,
            start: now,
            stage_start: now,
            what: String::new(),
            bar: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn prefix(&self) -> String {
        format!("[{}/{}]", self.n, self.total)
    }

    /// Starts the next stage (a spinner, or a plain line).
    pub fn stage(&mut self, what: &str) {
        self.finish_bar();
        self.n += 1;
        self.total = self.total.max(self.n);
        self.stage_start = Instant::now();
        self.what = what.to_string();
        match self.mode {
            Mode::Bars => {
                let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                b.set_style(spinner_style());
                b.set_prefix(self.prefix());
                b.set_message(what.to_string());
                b.enable_steady_tick(Duration::from_millis(120));
                self.bar = Some(b);
            }
            Mode::Plain => eprintln!("clutch: {} {what}", self.prefix()),
            Mode::Quiet => {}
        }
    }

    /// Turns the current stage into a byte bar of `len` bytes; returns a handle to advance it.
    pub fn bytes(&mut self, len: u64) -> Bar {
        match (&self.bar, self.mode) {
            (Some(b), Mode::Bars) => {
                b.set_style(bar_style());
                b.set_length(len);
                b.set_position(0);
                b.reset_eta();
                Bar(Some(b.clone()))
            }
            _ => Bar(None),
        }
    }

    /// Ends the current stage with a detail line.
    pub fn done(&mut self, detail: &str) {
        let secs = self.stage_start.elapsed().as_secs_f64();
        match self.mode {
            Mode::Bars => {
                if let Some(b) = self.bar.take() {
                    b.set_style(
                        ProgressStyle::with_template("{prefix:.bold.green} {msg}")
                            .expect("valid template"),
                    );
                    b.finish_with_message(format!("{}: {detail} ({secs:.1}s)", self.what));
                }
            }
            Mode::Plain => eprintln!("clutch:       {detail} ({secs:.1}s)"),
            Mode::Quiet => {}
        }
    }

    /// A message that does not tear a bar apart.
    pub fn println(&self, msg: &str) {
        match (&self.bar, self.mode) {
            (Some(b), Mode::Bars) => b.println(msg),
            (_, Mode::Quiet) => {}
            _ => eprintln!("{msg}"),
        }
    }

    fn finish_bar(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // A stage left open by an error: clear its spinner so the error reads cleanly.
        self.finish_bar();
    }
}

/// A byte bar (no-op when not drawing bars).
#[derive(Clone)]
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn hidden() -> Bar {
        Bar(None)
    }
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
    pub fn restart(&self, what: &str, len: u64) {
        if let Some(b) = &self.0 {
            b.set_message(what.to_string());
            b.set_length(len);
            b.set_position(0);
            b.reset_eta();
        }
    }
}

impl crate::flash::Ticker for Bar {
    fn phase(&mut self, what: &str, total: u64) {
        self.restart(what, total);
    }
    fn tick(&mut self, n: u64) {
        self.inc(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_and_plain_modes_do_not_draw_bars() {
        let mut p = Progress::with_mode(3, Mode::Quiet);
        p.stage("a");
        let b = p.bytes(100);
        b.inc(50);
        assert!(b.0.is_none());
        p.done("ok");
        p.stage("b");
        p.stage("c");
        p.stage("d");
        assert_eq!(p.prefix(), "[4/4]", "the count grows past the estimate");
        let mut p = Progress::with_mode(1, Mode::Plain);
        p.stage("x");
        assert!(p.bytes(1).0.is_none());
    }

    #[test]
    fn bar_mode_tracks_bytes() {
        let mut p = Progress::with_mode(1, Mode::Bars);
        p.stage("compressing");
        let b = p.bytes(1000);
        b.inc(400);
        assert_eq!(b.0.as_ref().unwrap().position(), 400);
        p.done("done");
        assert!(p.bar.is_none());
    }
}
