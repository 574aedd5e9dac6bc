//! The training log: one CSV row per optimizer step, SimpleLLaMA's columns plus tokens/s.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub const HEADER: &str =
    "step,progress_pct,train_loss,train_perplexity,val_loss,val_perplexity,lr,grad_norm,time_s,tokens_per_s";

/// One optimizer step. Losses are printed with Rust's shortest round-trip form, so that the
/// CSV holds the exact f64 values.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRow {
    /// 1-based: the number of optimizer steps done.
    pub step: u64,
    pub progress_pct: f64,
    /// None when every micro-batch of the step was skipped (no supervised tokens).
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    /// Seconds since the run started (resumed runs continue the count).
    pub time_s: f64,
    pub tokens_per_s: f64,
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

impl LogRow {
    pub fn to_csv(&self) -> String {
        format!(
            "{},{:.2},{},{},{},{},{:e},{},{:.3},{:.1}",
            self.step,
            self.progress_pct,
            opt(self.train_loss),
            opt(self.train_loss.map(f64::exp)),
            opt(self.val_loss),
            opt(self.val_loss.map(f64::exp)),
            self.lr,
            opt(self.grad_norm),
            self.time_s,
            self.tokens_per_s
        )
    }
}

/// An open `log.csv`, flushed after every row so that a killed run keeps its log.
pub struct CsvLog {
    path: PathBuf,
    file: File,
}

impl CsvLog {
    /// Starts a new log, or (when resuming after `resume_step` steps) keeps the rows up to that
    /// step and drops those a killed run wrote after its last checkpoint.
    ///
    /// The kept rows go to `log.csv.tmp`, which is synced and renamed over the log: a kill at
    /// any instant leaves either the old log or the new one whole, never a truncated file.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<CsvLog> {
        let mut kept = vec![HEADER.to_string()];
        if let Some(last) = resume_step {
            if path.exists() {
                let f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
                for line in BufReader::new(f).lines().skip(1) {
                    let line = line.with_context(|| format!("reading {}", path.display()))?;
                    let step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
                    if step.is_some_and(|s| s <= last) {
                        kept.push(line);
                    }
                }
            }
        }
        let mut text = kept.join("\n");
        text.push('\n');
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, path));
        written.with_context(|| format!("writing {}", path.display()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(CsvLog { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, row: &LogRow) -> Result<()> {
        // One write of the whole line: a reader or a kill never sees it without its newline
        // unless the write itself was cut.
        self.file
            .write_all(format!("{}\n", row.to_csv()).as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Reads `(step, train_loss)` pairs back from a log (steps without a loss are left out).
pub fn read_train_losses(path: &Path) -> Result<Vec<(u64, f64)>> {
    Ok(read_log(path)?.into_iter().filter_map(|r| r.train_loss.map(|l| (r.step, l))).collect())
}

/// Reads every row of a log back. Errors name the file, the line and the column.
pub fn read_log(path: &Path) -> Result<Vec<LogRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate().peekable();
    match lines.next() {
        Some((_, header)) if header.trim() == HEADER => {}
        Some((_, header)) => {
            anyhow::bail!("{}: line 1 is {header:?}, not the training log header {HEADER:?}", path.display())
        }
        None => anyhow::bail!("{}: empty file, not a training log", path.display()),
    }
    let names: Vec<&str> = HEADER.split(',').collect();
    let mut rows = Vec::new();
    while let Some((i, line)) = lines.next() {
        if line.trim().is_empty() {
            continue;
        }
        match read_row(path, &names, i, line) {
            Ok(row) => rows.push(row),
            // Rows are written whole, newline last: a last line without one is a row being
            // written by a live run (or cut by a kill), left out rather than refused.
            Err(_) if lines.peek().is_none() && !text.ends_with('\n') => break,
            Err(e) => return Err(e),
        }
    }
    Ok(rows)
}

/// Line `i` (0-based) of the log at `path`, whose columns are `names`.
fn read_row(path: &Path, names: &[&str], i: usize, line: &str) -> Result<LogRow> {
    let cols: Vec<&str> = line.split(',').collect();
    anyhow::ensure!(
        cols.len() == names.len(),
        "{} line {}: {} columns, the header has {}",
        path.display(),
        i + 1,
        cols.len(),
        names.len()
    );
    let num = |k: usize| -> Result<Option<f64>> {
        let v = cols[k].trim();
        if v.is_empty() {
            return Ok(None);
        }
        // sft writes only finite values (a step whose loss or norm is not finite stops the run).
        let x = v.parse::<f64>().ok().filter(|x| x.is_finite());
        x.map(Some).with_context(|| {
            format!("{} line {}: column {:?} = {v:?} is not a finite number", path.display(), i + 1, names[k])
        })
    };
    let need = |k: usize| -> Result<f64> {
        num(k)?.with_context(|| format!("{} line {}: column {:?} is empty", path.display(), i + 1, names[k]))
    };
    let step = cols[0].trim().parse::<u64>().with_context(|| {
        format!("{} line {}: column \"step\" = {:?} is not a step number", path.display(), i + 1, cols[0])
    })?;
    Ok(LogRow {
        step,
        progress_pct: need(1)?,
        train_loss: num(2)?,
        val_loss: num(4)?,
        lr: need(6)?,
        grad_norm: num(7)?,
        time_s: need(8)?,
        tokens_per_s: need(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, loss: f64) -> LogRow {
        LogRow {
            step,
            progress_pct: 10.0,
            train_loss: Some(loss),
            val_loss: None,
            lr: 1e-5,
            grad_norm: Some(0.5),
            time_s: 1.0,
            tokens_per_s: 100.0,
        }
    }

    #[test]
    fn losses_round_trip_exactly_and_resume_drops_later_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.csv");
        let losses = [2.0f64 / 3.0, 1.0 / 7.0, std::f64::consts::PI];
        let mut log = CsvLog::open(&path, None).unwrap();
        for (i, &l) in losses.iter().enumerate() {
            log.write(&row(i as u64 + 1, l)).unwrap();
        }
        drop(log);
        assert_eq!(read_train_losses(&path).unwrap(), vec![(1, losses[0]), (2, losses[1]), (3, losses[2])]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(HEADER));
        assert_eq!(text.lines().nth(1).unwrap().split(',').count(), HEADER.split(',').count());

        let mut log = CsvLog::open(&path, Some(2)).unwrap();
        log.write(&row(3, 0.25)).unwrap();
        log.write(&LogRow { val_loss: Some(0.5), train_loss: None, grad_norm: None, ..row(4, 0.0) }).unwrap();
        assert_eq!(read_train_losses(&path).unwrap(), vec![(1, losses[0]), (2, losses[1]), (3, 0.25)]);

        let rows = read_log(&path).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[2], row(3, 0.25));
        assert_eq!((rows[3].train_loss, rows[3].val_loss, rows[3].grad_norm), (None, Some(0.5), None));
    }

    #[test]
    fn bad_logs_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.csv");
        let err_of = |text: &str| {
            std::fs::write(&path, text).unwrap();
            format!("{:#}", read_log(&path).unwrap_err())
        };
        let good = row(1, 2.0).to_csv();
        assert!(err_of("").contains("empty"));
        assert!(err_of("a,b\n").contains("header"));
        let err = err_of(&format!("{HEADER}\n{good}\n1,2,3\n"));
        assert!(err.contains("log.csv line 3") && err.contains("3 columns"), "{err}");
        let err = err_of(&format!("{HEADER}\n{}\n", good.replacen("1e-5", "fast", 1)));
        assert!(err.contains("line 2") && err.contains("\"lr\""), "{err}");
        // A last row cut before its newline (a live run writing it, or a kill) is left out; the
        // same row with its newline is damage.
        let cut = &good[..good.len() / 2];
        std::fs::write(&path, format!("{HEADER}\n{good}\n{cut}")).unwrap();
        assert_eq!(read_log(&path).unwrap(), vec![row(1, 2.0)]);
        let err = err_of(&format!("{HEADER}\n{good}\n{cut}\n"));
        assert!(err.contains("log.csv line 3"), "{err}");
        let err = err_of(&format!("{HEADER}\n{cut}\n{good}"));
        assert!(err.contains("log.csv line 2"), "{err}");
        // sft never logs a value that is not finite: one in the log is damage, not a step.
        let err = err_of(&format!("{HEADER}\n{}\n", good.replacen("1e-5", "NaN", 1)));
        assert!(err.contains("line 2") && err.contains("\"lr\" = \"NaN\" is not a finite number"), "{err}");
    }
}
