//! Data parallel without MPI: `sft train` started as 2 processes with torchrun-style variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), meeting through `--rendezvous FILE` and talking over TCP
//! (src/dist/tcp.rs). Against one process with the same `grad_accum`: the same losses (within
//! 1e-5; the gradient sums run in another order); ZeRO-1, and the gradients summed after the
//! backward instead of layer by layer during it: the plain run's losses and weights bit for bit;
//! a rank killed mid-run: the other stops with an error within seconds; SIGTERM to one rank:
//! both stop after the same step, saved.

mod common;

use common::train::{prepared_data, sft_train_args, wait_for_log_lines};
use sft::train::log::read_train_losses;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 4;

/// Rank `rank` of 2 of `sft train` on the tiny model, meeting through `rendezvous`.
fn start_rank(root: &Path, out: &str, rank: usize, rendezvous: &Path, extra: &[&str], steps: u64) -> Child {
    let args = sft_train_args(root, &root.join("prepared"), out, "4", steps);
    Command::new(&args[0])
        .args(&args[1..])
        .args(extra)
        .arg("--rendezvous")
        .arg(rendezvous)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("SFT_RENDEZVOUS_HOST", "127.0.0.1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`, killing it past that; its status (None: killed) and output.
fn finish(mut child: Child, limit: Duration) -> (Option<std::process::ExitStatus>, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    (status, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Both ranks of one run; panics with their output unless both succeed.
fn two_ranks(root: &Path, out: &str, extra: &[&str]) -> String {
    let rendezvous = root.join(format!("{out}.rendezvous"));
    let ranks: Vec<Child> = (0..2).map(|r| start_rank(root, out, r, &rendezvous, extra, STEPS)).collect();
    let mut text = String::new();
    for (rank, child) in ranks.into_iter().enumerate() {
        let (status, output) = finish(child, Duration::from_secs(300));
        assert!(status.is_some_and(|s| s.success()), "rank {rank} of {out}: {status:?}\n{output}");
        text.push_str(&output);
    }
    assert!(!rendezvous.exists(), "the rendezvous file is removed once both ranks are in");
    text
}

#[test]
fn two_ranks_over_tcp_train_like_one_process() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    prepared_data(root, 48, 96);
    let one = sft_train_args(root, &root.join("prepared"), "one", "4", STEPS);
    let out = Command::new(&one[0]).args(&one[1..]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let losses = |run: &str| read_train_losses(&root.join(run).join("log.csv")).unwrap();

    // Plain: rank 0 alone reports and logs; the losses are one process's.
    let text = two_ranks(root, "two", &[]);
    assert_eq!(text.matches("done: 4 steps").count(), 1, "{text}");
    assert!(text.contains("(2 on each of 2 ranks, over TCP)"), "{text}");
    let (two, reference) = (losses("two"), losses("one"));
    assert_eq!(two.len(), STEPS as usize);
    for (&(step, got), &(_, want)) in two.iter().zip(&reference) {
        let rel = (got - want).abs() / want.abs();
        assert!(rel < 1e-5, "step {step}: 2 ranks over TCP {got}, one process {want}");
    }
    // ZeRO-1 over the same ranks: the plain run's losses and checkpoint, bit for bit.
    two_ranks(root, "zero", &["--zero-stage", "1"]);
    assert_eq!(losses("zero"), two, "ZeRO-1 over TCP");
    let weights = |run: &str| std::fs::read(root.join(run).join("step-4").join("model.safetensors")).unwrap();
    assert!(weights("zero") == weights("two"), "ZeRO-1's final weights differ from the all-reduce's");
    // Those summed each layer's gradients during the last micro-batch's backward (the default);
    // summed all at once after it: the same sums, bit for bit.
    for (run, extra) in [
        ("after", &["--grad-overlap", "false"][..]),
        ("zero_after", &["--zero-stage", "1", "--grad-overlap", "false"]),
    ] {
        two_ranks(root, run, extra);
        assert_eq!(losses(run), two, "{run} over TCP");
        assert!(weights(run) == weights("two"), "{run}: the final weights differ from the overlapped run's");
    }

    // A rank that dies: the other's next collective fails, and it stops instead of waiting.
    let rendezvous = root.join("killed.rendezvous");
    let mut ranks: Vec<Child> =
        (0..2).map(|r| start_rank(root, "killed", r, &rendezvous, &[], STEPS)).collect();
    let start = Instant::now();
    while !root.join("killed").join("log.csv").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the run never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    ranks[1].kill().unwrap();
    let killed_at = Instant::now();
    let (status, text) = finish(ranks.remove(0), Duration::from_secs(60));
    let waited = killed_at.elapsed();
    assert!(status.is_some(), "rank 0 still waits a minute after rank 1 died:\n{text}");
    let said: Vec<&str> = text.lines().filter(|l| l.contains("error")).collect();
    println!("rank 1 killed: rank 0 stopped {waited:.2?} later ({status:?}): {}", said.join(" | "));
    // Either rank 0 met the closed connection (an error naming rank 1), or it had finished.
    if !status.unwrap().success() {
        assert!(text.contains("rank 1"), "{text}");
    }
    ranks.remove(0).wait().unwrap();
}

/// SIGTERM to one rank (a scheduler preempting one node) stops both ranks after the same step,
/// with that step's checkpoint, each exiting with 143.
#[test]
fn a_signal_to_one_rank_stops_every_rank_after_the_same_step() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    prepared_data(root, 48, 96);
    let rendezvous = root.join("stopped.rendezvous");
    // Far longer than the test: only the signal ends it.
    let ranks: Vec<Child> =
        (0..2).map(|r| start_rank(root, "stopped", r, &rendezvous, &[], 100_000)).collect();
    let log = root.join("stopped").join("log.csv");
    wait_for_log_lines(&log, 3);
    // SAFETY: a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(ranks[1].id() as libc::pid_t, libc::SIGTERM) }, 0);
    let mut stopped_after = Vec::new();
    for (rank, child) in ranks.into_iter().enumerate() {
        let (status, text) = finish(child, Duration::from_secs(120));
        assert_eq!(status.and_then(|s| s.code()), Some(143), "rank {rank}: {status:?}\n{text}");
        let said =
            text.lines().find(|l| l.starts_with("stopped by SIGTERM after step")).unwrap_or_else(|| {
                panic!("rank {rank} does not say where it stopped:\n{text}");
            });
        let step: u64 =
            said["stopped by SIGTERM after step ".len()..].split([',', ';']).next().unwrap().parse().unwrap();
        stopped_after.push(step);
    }
    assert_eq!(stopped_after[0], stopped_after[1], "the ranks stopped after different steps");
    let latest = sft::checkpoint::latest(&root.join("stopped")).unwrap().unwrap();
    assert!(latest.ends_with(format!("step-{}", stopped_after[0])), "{latest:?}");
    println!("SIGTERM to rank 1: both ranks stopped after step {}", stopped_after[0]);
}
