//! [`Collectives`] over TCP, for jobs without MPI (a torchrun-style or `srun` launch of a build
//! without the `mpi` feature): the ranks meet through a file on a filesystem they all see.
//! Rank 0 listens on a free port and writes `host:port` to the file (atomically); the other
//! ranks wait for the file, connect and say their rank; once all are in, rank 0 removes the
//! file, so a file left behind is a job that never started (refused, not joined).
//!
//! A star through rank 0: every collective gathers at rank 0, which sums in rank order and sends
//! the result back. Enough for the small host collectives (counts, losses, the NCCL id: the GPUs'
//! gradients go through NCCL) and for CPU ranks on one machine. A rank that dies closes its
//! sockets: the next collective of every other rank fails instead of waiting.

use super::collectives::Collectives;
use super::launch::Launch;
use anyhow::{bail, ensure, Context, Result};
use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable naming the rendezvous file (or `sft train --rendezvous`).
pub const RENDEZVOUS_ENV: &str = "SFT_RENDEZVOUS";
/// The host rank 0 advertises (default: this machine's hostname).
pub const RENDEZVOUS_HOST_ENV: &str = "SFT_RENDEZVOUS_HOST";
/// How long the ranks wait for each other at the start.
const MEET_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a rank keeps trying an address in the file that does not answer (refused, or a
/// host that does not resolve, or text that is no address) before it gives up: rank 0 writes the
/// file only once it listens, so such an address is a file left by a job that stopped.
const DEAD_ADDRESS_PATIENCE: Duration = Duration::from_secs(15);
/// When a waiting rank first says that it is waiting (then every minute).
const WAIT_NOTICE: Duration = Duration::from_secs(10);

/// One rank's sockets: rank 0 holds one per other rank (in rank order), the others one to rank 0.
pub struct TcpCollectives {
    rank: usize,
    world: usize,
    peers: RefCell<Vec<TcpStream>>,
}

/// The first bytes of every hello, so that a stray connection is not taken for a rank.
const HELLO: &[u8; 8] = b"sft-dp01";

impl TcpCollectives {
    /// Meets the other ranks of `launch` through `file`; rank 0 advertises `SFT_RENDEZVOUS_HOST`,
    /// else this machine's hostname.
    pub fn connect(launch: &Launch, file: &Path) -> Result<TcpCollectives> {
        let host = std::env::var(RENDEZVOUS_HOST_ENV).ok().filter(|h| !h.is_empty()).unwrap_or_else(hostname);
        Self::connect_as(launch, file, &host)
    }

    /// [`TcpCollectives::connect`] with rank 0 advertising `host`.
    pub fn connect_as(launch: &Launch, file: &Path, host: &str) -> Result<TcpCollectives> {
        let (rank, world) = (launch.rank, launch.world_size);
        ensure!(world > 1 && rank < world, "rank {rank} of {world}: a rendezvous is for several ranks");
        let peers = if rank == 0 {
            serve(file, host, world)?
        } else {
            vec![join(file, rank, world, DEAD_ADDRESS_PATIENCE)?]
        };
        Ok(TcpCollectives { rank, world, peers: RefCell::new(peers) })
    }

    /// Rank 0: every other rank's `data`, in rank order (index 0 is rank 1).
    fn gather(&self, data: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        let mut peers = self.peers.borrow_mut();
        if self.rank == 0 {
            let mut all = Vec::with_capacity(self.world - 1);
            for (i, s) in peers.iter_mut().enumerate() {
                all.push(
                    recv(s, data.len()).with_context(|| format!("{what}: receiving from rank {}", i + 1))?,
                );
            }
            Ok(all)
        } else {
            send(&mut peers[0], data).with_context(|| format!("{what}: sending to rank 0"))?;
            Ok(Vec::new())
        }
    }

    /// Rank 0 sends `data` to every other rank; the others receive it into `data`.
    fn scatter_same(&self, data: &mut [u8], what: &str) -> Result<()> {
        let mut peers = self.peers.borrow_mut();
        if self.rank == 0 {
            for (i, s) in peers.iter_mut().enumerate() {
                send(s, data).with_context(|| format!("{what}: sending to rank {}", i + 1))?;
            }
        } else {
            let got =
                recv(&mut peers[0], data.len()).with_context(|| format!("{what}: receiving from rank 0"))?;
            data.copy_from_slice(&got);
        }
        Ok(())
    }

    /// The element-wise sum over the ranks, in rank order, on every rank.
    fn all_reduce<T: Copy + std::ops::Add<Output = T>, const N: usize>(
        &self,
        buf: &mut [T],
        to: fn(T) -> [u8; N],
        from: fn([u8; N]) -> T,
        what: &str,
    ) -> Result<()> {
        let mut bytes: Vec<u8> = buf.iter().flat_map(|&x| to(x)).collect();
        let others = self.gather(&bytes, what)?;
        if self.rank == 0 {
            for other in &others {
                for (x, b) in buf.iter_mut().zip(other.chunks_exact(N)) {
                    *x = *x + from(b.try_into().expect("chunks of N"));
                }
            }
            bytes = buf.iter().flat_map(|&x| to(x)).collect();
        }
        self.scatter_same(&mut bytes, what)?;
        for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(N)) {
            *x = from(b.try_into().expect("chunks of N"));
        }
        Ok(())
    }
}

impl Collectives for TcpCollectives {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn transport(&self) -> &'static str {
        "TCP"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf, f32::to_le_bytes, f32::from_le_bytes, "all_reduce_sum")
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(buf, f64::to_le_bytes, f64::from_le_bytes, "all_reduce_sum_f64")
    }
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.world, "reduce to rank {root} in a job of {} ranks", self.world);
        let mut sum = buf.to_vec();
        self.all_reduce_sum(&mut sum)?;
        if self.rank == root {
            buf.copy_from_slice(&sum);
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.broadcast_bytes(&mut bytes, root)?;
        for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes(b.try_into().expect("chunks of 4"));
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast from rank {root} in a job of {} ranks", self.world);
        if root != 0 {
            // Through rank 0: the root sends, rank 0 takes it as its own.
            let mut peers = self.peers.borrow_mut();
            if self.rank == root {
                send(&mut peers[0], buf).context("broadcast: sending to rank 0")?;
            } else if self.rank == 0 {
                let got = recv(&mut peers[root - 1], buf.len())
                    .with_context(|| format!("broadcast: receiving from rank {root}"))?;
                buf.copy_from_slice(&got);
            }
        }
        self.scatter_same(buf, "broadcast")
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum_f64(&mut [0.0]).context("barrier")
    }
    fn abort(&self, code: i32) -> ! {
        // The sockets close with the process: every other rank's next collective fails.
        std::process::exit(code)
    }
}

/// Rank 0: listens, publishes its address (`host`) in `file`, takes one connection per other
/// rank.
fn serve(file: &Path, host: &str, world: usize) -> Result<Vec<TcpStream>> {
    ensure!(
        !file.exists(),
        "rendezvous file {} exists: another job's, or one that never started; remove it or name a new file",
        file.display()
    );
    let listener = TcpListener::bind(("0.0.0.0", 0)).context("listening for the other ranks")?;
    let port = listener.local_addr()?.port();
    let tmp = PathBuf::from(format!("{}.tmp{}", file.display(), std::process::id()));
    std::fs::write(&tmp, format!("{host}:{port}\n"))
        .and_then(|_| std::fs::rename(&tmp, file))
        .with_context(|| format!("writing the rendezvous file {}", file.display()))?;
    let result = accept_ranks(&listener, world, &format!("{host}:{port}"));
    // Every rank read the file before connecting (or the job fails): it is not needed any more.
    let _ = std::fs::remove_file(file);
    result
}

fn accept_ranks(listener: &TcpListener, world: usize, addr: &str) -> Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    let start = Instant::now();
    let mut notice = WaitNotice::new();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, addr)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                let (rank, theirs) = read_hello(&mut s).with_context(|| format!("the hello of {addr}"))?;
                ensure!(theirs == world, "{addr} says rank {rank} of {theirs}, this job has {world} ranks");
                ensure!((1..world).contains(&rank), "{addr} says rank {rank} of {world}");
                ensure!(peers[rank - 1].is_none(), "two processes say they are rank {rank}");
                peers[rank - 1] = Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let missing: Vec<usize> = (1..world).filter(|&r| peers[r - 1].is_none()).collect();
                ensure!(
                    start.elapsed() < MEET_TIMEOUT,
                    "ranks {missing:?} did not connect within {} s",
                    MEET_TIMEOUT.as_secs()
                );
                notice.say(|| format!("rank 0: waiting for ranks {missing:?} to connect to {addr}"));
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting a rank"),
        }
    }
    Ok(peers.into_iter().map(|p| p.expect("every rank connected")).collect())
}

/// A rank above 0: waits for `file`, connects to the address in it and says its rank. An
/// address that does not answer for `patience` is an error naming the file: rank 0 writes the
/// file once it listens, so that address belongs to a job that stopped (or a file that is not a
/// rendezvous).
fn join(file: &Path, rank: usize, world: usize, patience: Duration) -> Result<TcpStream> {
    let start = Instant::now();
    let mut notice = WaitNotice::new();
    // The address tried and since when it has failed.
    let mut failing: Option<(String, Instant)> = None;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(addr) = text.strip_suffix('\n') {
            match TcpStream::connect(addr) {
                Ok(mut s) => {
                    s.set_nodelay(true)?;
                    let mut hello = HELLO.to_vec();
                    hello.extend((rank as u64).to_le_bytes());
                    hello.extend((world as u64).to_le_bytes());
                    s.write_all(&hello).with_context(|| format!("saying hello to rank 0 at {addr}"))?;
                    return Ok(s);
                }
                Err(e) => {
                    let since = match &failing {
                        Some((a, t)) if a == addr => *t,
                        _ => failing.insert((addr.to_string(), Instant::now())).1,
                    };
                    if since.elapsed() > patience || start.elapsed() > MEET_TIMEOUT {
                        return Err(e).with_context(|| {
                            format!(
                                "rank {rank}: rank 0 at {addr:?} (from {}) does not answer: a rendezvous file left \
                                 by a job that stopped? remove it and start every rank again",
                                file.display()
                            )
                        });
                    }
                }
            }
        } else if !text.is_empty() && start.elapsed() > patience {
            bail!(
                "rank {rank}: {} holds no address (\"host:port\" and a newline): not a rendezvous file",
                file.display()
            );
        }
        if start.elapsed() > MEET_TIMEOUT {
            bail!(
                "rank {rank}: no rendezvous in {} within {} s (is rank 0 running?)",
                file.display(),
                MEET_TIMEOUT.as_secs()
            );
        }
        notice.say(|| format!("rank {rank}: waiting for rank 0's address in {}", file.display()));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A line on stderr once a rank has waited [`WAIT_NOTICE`], then every minute: a job whose ranks
/// never meet says what it is waiting for instead of sitting silent.
struct WaitNotice {
    start: Instant,
    next: Duration,
}

impl WaitNotice {
    fn new() -> Self {
        WaitNotice { start: Instant::now(), next: WAIT_NOTICE }
    }

    fn say(&mut self, line: impl FnOnce() -> String) {
        let waited = self.start.elapsed();
        if waited >= self.next {
            crate::say!("{} ({} s)", line(), waited.as_secs());
            self.next = waited + Duration::from_secs(60);
        }
    }
}

fn read_hello(s: &mut TcpStream) -> Result<(usize, usize)> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = [0u8; 24];
    s.read_exact(&mut hello)?;
    s.set_read_timeout(None)?;
    ensure!(&hello[..8] == HELLO, "not an sft rank");
    let word = |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().expect("8 bytes")) as usize;
    Ok((word(8), word(16)))
}

fn send(s: &mut TcpStream, data: &[u8]) -> Result<()> {
    s.write_all(&(data.len() as u64).to_le_bytes())?;
    s.write_all(data)?;
    Ok(())
}

/// One message of `expected` bytes: a length that differs means the ranks called different
/// operations (or the stream is not ours), refused before anything is allocated.
fn recv(s: &mut TcpStream, expected: usize) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len).context("the connection closed (did that rank stop?)")?;
    let len = u64::from_le_bytes(len);
    ensure!(
        len == expected as u64,
        "a message of {len} bytes where {expected} were expected: the ranks disagree on the operation"
    );
    let mut data = vec![0u8; expected];
    s.read_exact(&mut data).context("the connection closed mid-message")?;
    Ok(data)
}

/// This machine's name, for the other ranks to reach rank 0 by.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Launcher;

    /// Three ranks as threads of this process: every collective against its plain meaning.
    #[test]
    fn three_ranks_meet_and_reduce_in_rank_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendezvous");
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let file = file.clone();
                std::thread::spawn(move || {
                    let launch =
                        Launch { launcher: Launcher::Torchrun, rank, world_size: world, local_rank: rank };
                    let c = TcpCollectives::connect_as(&launch, &file, "127.0.0.1").unwrap();
                    let mut g = vec![rank as f32 + 0.5, 1e-8 * rank as f32, -1.0];
                    c.all_reduce_sum(&mut g).unwrap();
                    assert_eq!(g, [(0.5f32 + 1.5) + 2.5, (0.0f32 + 1e-8) + 2e-8, -3.0]);
                    let mut d = [rank as f64];
                    c.all_reduce_sum_f64(&mut d).unwrap();
                    assert_eq!(d, [3.0]);
                    let mut r = vec![1.0f32; 4];
                    c.reduce_sum(&mut r, 2).unwrap();
                    assert_eq!(r, if rank == 2 { [3.0; 4] } else { [1.0; 4] });
                    for root in 0..world {
                        let mut b = vec![rank as f32; 3];
                        c.broadcast(&mut b, root).unwrap();
                        assert_eq!(b, [root as f32; 3]);
                    }
                    let mut counts = (0..10).map(|i| (i * (rank + 1)) as f32).collect::<Vec<_>>();
                    c.reduce_scatter_sum(&mut counts, &[3, 0, 7]).unwrap();
                    c.barrier().unwrap();
                    counts
                })
            })
            .collect();
        let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(&results[0][..3], &[0.0, 6.0, 12.0]);
        assert_eq!(&results[2][3..], &[18.0, 24.0, 30.0, 36.0, 42.0, 48.0, 54.0]);
        assert!(!file.exists(), "rank 0 removes the rendezvous file once every rank is in");
    }

    #[test]
    fn a_file_left_behind_is_refused_and_a_dead_rank_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stale");
        std::fs::write(&file, "host:1\n").unwrap();
        let launch = Launch { launcher: Launcher::Torchrun, rank: 0, world_size: 2, local_rank: 0 };
        let e = TcpCollectives::connect_as(&launch, &file, "127.0.0.1").err().unwrap().to_string();
        assert!(e.contains("exists") && e.contains("remove it"), "{e}");

        // Rank 1 leaves after meeting: rank 0's next collective fails instead of waiting.
        let file = dir.path().join("rendezvous");
        let joiner = {
            let file = file.clone();
            std::thread::spawn(move || {
                let launch = Launch { launcher: Launcher::Torchrun, rank: 1, world_size: 2, local_rank: 1 };
                drop(TcpCollectives::connect_as(&launch, &file, "127.0.0.1").unwrap());
            })
        };
        let c = TcpCollectives::connect_as(&launch, &file, "127.0.0.1").unwrap();
        joiner.join().unwrap();
        let e = format!("{:#}", c.all_reduce_sum(&mut [1.0]).unwrap_err());
        assert!(e.contains("receiving from rank 1") && e.contains("closed"), "{e}");
    }

    /// A rank above 0 before a file left by a stopped job (an address nobody listens on), or a
    /// file that holds no address, waited the whole meeting timeout without a word.
    #[test]
    fn a_dead_address_or_a_foreign_file_is_an_error_for_the_joining_rank() {
        let dir = tempfile::tempdir().unwrap();
        let patience = Duration::from_millis(300);
        // A port that was just free: nothing listens there.
        let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        for (name, text, needle) in [
            ("stale", format!("{dead}\n"), "does not answer"),
            ("garbage", "not an address\n".to_string(), "does not answer"),
            ("no-newline", "127.0.0.1".to_string(), "holds no address"),
        ] {
            let file = dir.path().join(name);
            std::fs::write(&file, text).unwrap();
            let start = Instant::now();
            let e = format!("{:#}", join(&file, 1, 2, patience).unwrap_err());
            assert!(e.contains(needle) && e.contains(name), "{name}: {e}");
            assert!(start.elapsed() < Duration::from_secs(10), "{name}: {:?}", start.elapsed());
        }
    }

    /// Ranks that call different operations: an error on both, not a hang or a huge allocation.
    #[test]
    fn ranks_that_disagree_on_the_length_both_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendezvous");
        let other = {
            let file = file.clone();
            std::thread::spawn(move || {
                let launch = Launch { launcher: Launcher::Torchrun, rank: 1, world_size: 2, local_rank: 1 };
                let c = TcpCollectives::connect_as(&launch, &file, "127.0.0.1").unwrap();
                format!("{:#}", c.all_reduce_sum(&mut [1.0, 2.0]).unwrap_err())
            })
        };
        let launch = Launch { launcher: Launcher::Torchrun, rank: 0, world_size: 2, local_rank: 0 };
        let c = TcpCollectives::connect_as(&launch, &file, "127.0.0.1").unwrap();
        let e = format!("{:#}", c.all_reduce_sum(&mut [1.0]).unwrap_err());
        assert!(e.contains("8 bytes where 4 were expected") && e.contains("disagree"), "{e}");
        drop(c);
        let e = other.join().unwrap();
        assert!(e.contains("receiving from rank 0"), "{e}");
    }
}
