//! The reporter: a dedicated thread that writes JSON lines, keeps the tail, publishes
//! progress and builds the summary.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::EdgeError;
use crate::record::Record;
use crate::summary::{Summary, SummaryBuilder};

/// Where lines go.
pub(crate) enum Output {
    None,
    Stdout,
    File(PathBuf, std::io::BufWriter<std::fs::File>),
}

impl Output {
    /// `-` is stdout, unless only the tail is to be printed there.
    pub fn open(output: Option<&str>, tail: bool) -> Result<Self, EdgeError> {
        match output {
            None => Ok(Output::None),
            Some("-") if tail => Ok(Output::None),
            Some("-") => Ok(Output::Stdout),
            Some(path) => {
                let path = PathBuf::from(path);
                let file = std::fs::File::create(&path).map_err(|source| EdgeError::Output {
                    path: path.clone(),
                    source,
                })?;
                Ok(Output::File(path, std::io::BufWriter::new(file)))
            }
        }
    }

    fn write(&mut self, line: &str) -> Result<(), EdgeError> {
        let err = |path: PathBuf| move |source| EdgeError::Output { path, source };
        match self {
            Output::None => Ok(()),
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").map_err(err("-".into()))
            }
            Output::File(path, w) => writeln!(w, "{line}").map_err(err(path.clone())),
        }
    }

    fn flush(&mut self) -> Result<(), EdgeError> {
        match self {
            Output::File(path, w) => w.flush().map_err(|source| EdgeError::Output {
                path: path.clone(),
                source,
            }),
            _ => Ok(()),
        }
    }
}

/// Keeps the last `n` lines.
#[derive(Debug)]
pub(crate) struct Tail {
    n: usize,
    lines: VecDeque<String>,
}

impl Tail {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            lines: VecDeque::with_capacity(n.min(1024)),
        }
    }

    pub fn push(&mut self, line: String) {
        if self.n == 0 {
            return;
        }
        if self.lines.len() == self.n {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub fn lines(&self) -> impl Iterator<Item = &String> {
        self.lines.iter()
    }
}

pub(crate) struct Reporter {
    pub output: Output,
    pub tail: Option<Tail>,
    pub summary: SummaryBuilder,
    pub progress: Option<watch::Sender<u64>>,
    pub start: Instant,
}

impl Reporter {
    /// Runs until every sink is dropped.
    pub fn run(
        mut self,
        mut records: mpsc::UnboundedReceiver<Record>,
    ) -> Result<Summary, EdgeError> {
        let mut answered = 0u64;
        let mut last = self.start;
        let mut write_error = None;
        while let Some(record) = records.blocking_recv() {
            answered += 1;
            last = Instant::now();
            self.summary.record(&record);
            let line = record.to_json().to_string();
            if write_error.is_none()
                && let Err(e) = self.output.write(&line)
            {
                tracing::error!(error = %e, "output failed; later records are not written");
                write_error = Some(e);
            }
            if let Some(t) = &mut self.tail {
                t.push(line);
            }
            if let Some(p) = &self.progress {
                p.send_replace(answered);
            }
        }
        if write_error.is_none() {
            write_error = self.output.flush().err();
        }
        if let Some(t) = &self.tail {
            let mut out = std::io::stdout().lock();
            for line in t.lines() {
                // Best effort: stdout closed is not a reason to lose the summary.
                let _ = writeln!(out, "{line}");
            }
        }
        match write_error {
            Some(e) => Err(e),
            None => Ok(self.summary.finish(last.duration_since(self.start))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail::new(2);
        for l in ["a", "b", "c"] {
            t.push(l.into());
        }
        assert_eq!(t.lines().cloned().collect::<Vec<_>>(), vec!["b", "c"]);
        let mut none = Tail::new(0);
        none.push("x".into());
        assert_eq!(none.lines().count(), 0);
    }
}
