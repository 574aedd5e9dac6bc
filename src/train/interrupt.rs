//! A run stopped by Ctrl-C (SIGINT), by a scheduler's SIGTERM or by its terminal closing
//! (SIGHUP, say a dropped SSH session) ends cleanly: the trainer
//! finishes the optimizer step under way, saves a checkpoint and returns [`Interrupted`], which
//! `sft train` turns into exit status 128 + the signal's number; `--resume` then continues the
//! run exactly. A second signal of the same kind stops the process at once (the handler gives
//! the signal back its default action when it runs), losing only the steps since the last
//! checkpoint, as a kill would.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Result};

use crate::dist::Collectives;

/// The last stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // An atomic store is all a signal handler may safely do here.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// The signals that stop a run after its step, in the order a disagreement between ranks is
/// settled in (the first one any rank received).
pub const STOPS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT];

/// From now on, the [`STOPS`] signals ask the run to stop after its step instead of killing it;
/// one that the process was started ignoring stays ignored (`nohup sft train` keeps running
/// when its terminal closes, a job started in the background by a script ignores Ctrl-C).
pub fn watch() -> Result<()> {
    for signal in STOPS {
        // SAFETY: zeroed `sigaction`s are valid empty ones; the handler is async-signal-safe.
        let failed = unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SA_RESTART: a read or write under way when the signal comes goes on, not EINTR.
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) != 0
        };
        if failed {
            bail!("installing the handler of signal {signal}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The stop signal received on any rank, the same answer on every rank (the first of
/// [`STOPS`] where they differ), so that all of them stop after the same step. Over several
/// ranks this is one small collective a step.
pub fn requested(comm: &dyn Collectives) -> Result<Option<i32>> {
    let mine = RECEIVED.load(Ordering::SeqCst);
    if comm.world_size() == 1 {
        return Ok((mine != 0).then_some(mine));
    }
    let mut seen = STOPS.map(|s| f64::from(u8::from(mine == s)));
    comm.all_reduce_sum_f64(&mut seen)?;
    Ok(STOPS.into_iter().zip(seen).find(|&(_, n)| n > 0.0).map(|(s, _)| s))
}

/// The run stopped on a signal, after `step`, with its last checkpoint (rank 0's, where it
/// saved one).
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: u64,
    pub checkpoint: Option<PathBuf>,
    pub out_dir: PathBuf,
}

impl Interrupted {
    /// The shell's convention for a process ended by a signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.signal {
            libc::SIGINT => "SIGINT (Ctrl-C)".to_string(),
            libc::SIGTERM => "SIGTERM".to_string(),
            libc::SIGHUP => "SIGHUP (its terminal closed)".to_string(),
            other => format!("signal {other}"),
        };
        match &self.checkpoint {
            Some(dir) => write!(f, "stopped by {name} after step {}, saved in {}", self.step, dir.display())?,
            // Stopped before its first step: a fresh run has nothing to continue.
            None if self.step == 0 => {
                return write!(f, "stopped by {name} before the first step: nothing to save")
            }
            None => write!(f, "stopped by {name} after step {}", self.step)?,
        }
        write!(f, "; continue with: sft train --out-dir {} --resume", self.out_dir.display())
    }
}

impl std::error::Error for Interrupted {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_says_where_the_run_stands_and_how_to_go_on() {
        let stop = |signal, step, checkpoint: Option<&str>| Interrupted {
            signal,
            step,
            checkpoint: checkpoint.map(PathBuf::from),
            out_dir: PathBuf::from("runs/sft"),
        };
        let saved = stop(libc::SIGTERM, 12, Some("runs/sft/step-12"));
        assert_eq!(
            saved.to_string(),
            "stopped by SIGTERM after step 12, saved in runs/sft/step-12; continue with: sft train --out-dir \
             runs/sft --resume"
        );
        assert_eq!(saved.exit_code(), 143);
        let fresh = stop(libc::SIGINT, 0, None);
        assert_eq!(fresh.to_string(), "stopped by SIGINT (Ctrl-C) before the first step: nothing to save");
        assert_eq!(fresh.exit_code(), 130);
        // A resumed run stopped before its first step still has its checkpoint to go on from.
        let resumed = stop(libc::SIGHUP, 7, None);
        assert!(resumed
            .to_string()
            .starts_with("stopped by SIGHUP (its terminal closed) after step 7; continue"));
    }
}
