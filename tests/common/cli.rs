//! Running the `sft` binary that Cargo built for the integration tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The `sft` binary as a command, for a run that needs more than arguments (paths as
/// `OsStr`, environment). `SFT_BIN` names another build to run instead: that is how a test is
/// seen to fail on the code before a fix.
pub fn command() -> Command {
    match std::env::var_os("SFT_BIN") {
        Some(bin) => Command::new(bin),
        None => Command::new(env!("CARGO_BIN_EXE_sft")),
    }
}

/// Runs `sft args` with an empty stdin.
pub fn output(args: &[&str]) -> Output {
    command().args(args).output().unwrap()
}

/// Runs `sft args` with an empty stdin and `envs` added to its environment.
pub fn output_with_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    command().args(args).envs(envs.iter().copied()).output().unwrap()
}

/// Runs `sft args` with an empty stdin: (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    outcome(output(args))
}

/// Runs `sft args` with `stdin` as its input: (success, stdout, stderr).
pub fn run_with_stdin(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    outcome(child.wait_with_output().unwrap())
}

/// Runs `sft args`, which must succeed (else the test fails with its stderr), and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = output(args);
    assert!(out.status.success(), "sft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `sft args`, which must fail cleanly (an error, not a panic), and returns its stderr.
pub fn run_fails(args: &[&str]) -> String {
    let out = output(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "sft {args:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "sft {args:?} panicked: {err}");
    err
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn outcome(out: Output) -> (bool, String, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
