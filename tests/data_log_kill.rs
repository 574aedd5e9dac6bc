//! Issue 13, case 6: `sft train --resume` rewrites `log.csv`; a SIGKILL at any instant of that
//! rewrite must leave every row that was there. A child process (this test binary, re-run on the
//! ignored `log_rewriter` test) rewrites the log in a loop; the parent kills it at random moments.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sft::train::log::{read_log, CsvLog, LogRow};

const ROWS: u64 = 3000;

fn row(step: u64) -> LogRow {
    LogRow {
        step,
        progress_pct: step as f64 / 30.0,
        train_loss: Some(1.0 / step as f64),
        val_loss: None,
        lr: 1e-5,
        grad_norm: Some(0.5),
        time_s: step as f64,
        tokens_per_s: 100.0,
    }
}

/// The child: resumes the log at its last step, forever, until killed.
#[test]
#[ignore = "run by a_kill_while_the_log_is_rewritten_keeps_every_row"]
fn log_rewriter() {
    let Some(path) = std::env::var_os("SFT_LOG_REWRITE") else { return };
    let path = PathBuf::from(path);
    loop {
        drop(CsvLog::open(&path, Some(ROWS)).unwrap());
    }
}

#[test]
fn a_kill_while_the_log_is_rewritten_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.csv");
    let mut log = CsvLog::open(&path, None).unwrap();
    for s in 1..=ROWS {
        log.write(&row(s)).unwrap();
    }
    drop(log);
    let mut rng = sft::rng::Rng::new(13);
    for attempt in 0..20 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "log_rewriter", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("SFT_LOG_REWRITE", &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + rng.below(120) as u64));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let rows = read_log(&path).unwrap_or_else(|e| panic!("attempt {attempt}: {e:#}"));
        assert_eq!(rows.len() as u64, ROWS, "attempt {attempt}: rows lost by a kill during the rewrite");
        assert_eq!(rows.last().unwrap(), &row(ROWS));
    }
}
