//! Data parallel over MPI on the CPU backend, 2 ranks under `mpirun` (feature `mpi`).
//!
//! `two_ranks_over_mpirun` prepares a tiny data set, trains on it in one process (the
//! reference), then starts this same test binary under `mpirun -np 2`, running only `rank_body`
//! (ignored otherwise). Each rank checks the collectives, that its share of a step with the
//! gradients summed over MPI gives one process's gradients and loss, then trains the reference's
//! run with the trainer over both ranks: the same losses, weights bit-identical on both ranks.
//! Back in one process, the test compares the 2-rank run's final weights with the reference's
//! and resumes a 2-rank checkpoint in one process; the ranks resume a 1-process checkpoint. A
//! LoRA run (adapters with dropout over a frozen base) trains over both ranks like one process.
//! ZeRO-1 (the optimizer state split over the ranks) trains 20 steps exactly as the plain
//! all-reduce does, and its checkpoints are the same files.
#![cfg(feature = "mpi")]

mod common;

use common::model::*;
use common::train::{prepared_data, sft_train_args, tiny_config as train_config};
use sft::backend::cpu::CpuBackend;
use sft::backend::RopeStyle;
use sft::checkpoint::Checkpoint;
use sft::data::batch::Batch;
use sft::data::BatchMode;
use sft::dist::{broadcast_u64, connect, Collectives, Launch, Launcher, Sharding};
use sft::model::lora::{LoraConfig, LoraTarget};
use sft::model::Model;
use sft::train::{train_on, train_ranks, TrainConfig};
use std::path::Path;
use std::process::Command;

const CHILD_ENV: &str = "SFT_DIST_RANK_TEST";
/// The directory holding the prepared data and the reference run's losses.
const ROOT_ENV: &str = "SFT_DIST_ROOT";

/// The run both sides train: 4 micro-batches of 2 per step (2 per rank over 2 ranks), dropout
/// on (its masks follow the micro-batch's place in the step, not the rank), a fixed schedule
/// length so that stopping after 2 steps and resuming repeats the 4-step run.
fn run_config(root: &Path, out: &str, max_steps: u64) -> TrainConfig {
    TrainConfig {
        micro_batch: 2.into(),
        grad_accum: 4,
        max_steps: Some(max_steps),
        schedule_steps: Some(4),
        save_every: 2,
        ..train_config(
            &root.join("prepared"),
            &root.join("tokenizer.json"),
            &root.join(out),
            BatchMode::Dynamic,
        )
    }
}

/// [`run_config`] training LoRA adapters (rank 4, dropout 0.1) on q, v and down over the
/// frozen weights of the reference run's last checkpoint.
fn lora_run_config(root: &Path, out: &str, max_steps: u64) -> TrainConfig {
    TrainConfig {
        max_lr: 1e-2,
        init_from: Some(root.join("one").join("step-4")),
        from_scratch: false,
        lora: Some(LoraConfig::new(4, 8.0, 0.1, vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down])),
        ..run_config(root, out, max_steps)
    }
}

fn flat_adapters<B: sft::backend::Backend>(model: &Model<B>) -> Vec<f32> {
    model.read_adapters().unwrap().into_iter().flat_map(|t| t.data).collect()
}

/// An FNV-1a hash of the weights' bits, to compare ranks without moving the weights.
fn weights_hash<B: sft::backend::Backend>(model: &Model<B>) -> u64 {
    let values: Vec<f32> = model.read_params().unwrap().into_iter().flat_map(|t| t.data).collect();
    bits_hash(&values)
}

/// An FNV-1a hash of the values' bits.
fn bits_hash(values: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in values.iter().flat_map(|x| x.to_bits().to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn flat_params(dir: &Path) -> Vec<f32> {
    Checkpoint::open(dir).unwrap().read_params().unwrap().into_iter().flat_map(|t| t.data).collect()
}

fn assert_losses_match(what: &str, got: &[(u64, f64)], want: &[(u64, f64)]) -> f64 {
    assert_eq!(
        got.iter().map(|l| l.0).collect::<Vec<_>>(),
        want.iter().map(|l| l.0).collect::<Vec<_>>(),
        "{what}"
    );
    let mut worst = 0f64;
    for (&(step, a), &(_, b)) in got.iter().zip(want) {
        let rel = (a - b).abs() / b.abs();
        assert!(rel < 1e-5, "{what}: step {step}: loss {a} vs one process's {b}");
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn two_ranks_over_mpirun() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        println!("skipped: no mpirun on PATH (install openmpi-bin)");
        return;
    }
    // The reference: one process, the whole step of 4 micro-batches.
    let root = tempfile::tempdir().unwrap();
    prepared_data(root.path(), 48, 96);
    let (reference, report) = train_on(CpuBackend::<f32>::new(), &run_config(root.path(), "one", 4)).unwrap();
    assert_eq!(report.step_losses.len(), 4);
    let losses: Vec<String> = report.step_losses.iter().map(|(s, l)| format!("{s} {l:e}")).collect();
    std::fs::write(root.path().join("losses.txt"), losses.join("\n")).unwrap();
    std::fs::write(root.path().join("val_loss.txt"), format!("{:e}", report.final_val_loss.unwrap()))
        .unwrap();
    // Its first half alone, for the ranks to resume.
    train_on(CpuBackend::<f32>::new(), &run_config(root.path(), "one_half", 2)).unwrap();
    // The LoRA reference: losses and the final adapters (f32, little-endian).
    let (lora_model, lora_report) =
        train_on(CpuBackend::<f32>::new(), &lora_run_config(root.path(), "lora_one", 4)).unwrap();
    let losses: Vec<String> = lora_report.step_losses.iter().map(|(s, l)| format!("{s} {l:e}")).collect();
    std::fs::write(root.path().join("lora_losses.txt"), losses.join("\n")).unwrap();
    let bytes: Vec<u8> = flat_adapters(&lora_model).iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(root.path().join("lora_adapters.bin"), bytes).unwrap();

    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(&exe)
        .args(["--exact", "rank_body", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env(ROOT_ENV, root.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "mpirun -np 2 failed ({}):\n{text}", out.status);
    for rank in 0..2 {
        assert!(text.contains(&format!("rank {rank} of 2: data-parallel step matches")), "{text}");
        assert!(text.contains(&format!("rank {rank} of 2: sft train over 2 ranks matches")), "{text}");
        assert!(text.contains(&format!("rank {rank} of 2: LoRA over 2 ranks matches")), "{text}");
        assert!(text.contains(&format!("rank {rank} of 2: ZeRO-1 matches the all-reduce")), "{text}");
    }

    // The 2-rank run's last checkpoint (rank 0's) against one process's weights. The gradient
    // sums run in another order ((g0+g1)+(g2+g3) against one accumulation), so not bit for bit.
    let one: Vec<f32> = reference.read_params().unwrap().into_iter().flat_map(|t| t.data).collect();
    let two = flat_params(&root.path().join("two").join("step-4"));
    let rel = max_rel_diff(&two, &one);
    println!("final weights, 2 ranks against 1 process: largest difference {rel:e} of the largest weight");
    assert!(rel < 1e-5, "2-rank weights differ from one process's by {rel:e}");

    // A checkpoint of 2 ranks resumes in one process: steps 3 and 4 as the reference's.
    let resumed = TrainConfig { resume: true, ..run_config(root.path(), "half", 4) };
    let (model, report_resumed) = train_on(CpuBackend::<f32>::new(), &resumed).unwrap();
    assert_losses_match("resumed in one process", &report_resumed.step_losses, &report.step_losses[2..]);
    let after: Vec<f32> = model.read_params().unwrap().into_iter().flat_map(|t| t.data).collect();
    let rel = max_rel_diff(&after, &one);
    println!("2 ranks for 2 steps, then 1 process for 2: largest weight difference {rel:e}");
    assert!(rel < 1e-5, "resumed weights differ from one process's by {rel:e}");
    let rel = max_rel_diff(&flat_params(&root.path().join("one_half").join("step-4")), &one);
    println!("1 process for 2 steps, then 2 ranks for 2: largest weight difference {rel:e}");
    assert!(rel < 1e-5, "weights resumed over 2 ranks differ from one process's by {rel:e}");

    // `sft train` itself under mpirun: the ranks find each other, rank 0 alone reports and logs.
    let sft_train_with = |out: &str, grad_accum: &str, extra: &[&str]| {
        let out = Command::new("timeout")
            .args(["300"])
            .args(mpirun_sft_train(root.path(), out, grad_accum, 2))
            .args(extra)
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    };
    let sft_train = |out: &str, grad_accum: &str| sft_train_with(out, grad_accum, &[]);
    let (status, text) = sft_train("cli", "4");
    assert!(status.success(), "{text}");
    assert_eq!(text.matches("done: 2 steps").count(), 1, "{text}");
    assert!(text.contains("(2 on each of 2 ranks, over MPI)"), "{text}");
    let log = std::fs::read_to_string(root.path().join("cli").join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    // --zero-stage 1: the same losses.
    let (status, text) = sft_train_with("cli_zero", "4", &["--zero-stage", "1"]);
    assert!(status.success(), "{text}");
    let losses =
        |run: &str| sft::train::log::read_train_losses(&root.path().join(run).join("log.csv")).unwrap();
    assert_eq!(losses("cli_zero"), losses("cli"), "sft train --zero-stage 1 over 2 ranks");
    // An error on the ranks ends the job instead of leaving it waiting.
    let (status, text) = sft_train("cli_odd", "3");
    println!("sft train with grad_accum 3 over 2 ranks:\n{text}");
    assert!(!status.success() && status.code() != Some(124), "{status}: {text}");
    assert!(text.contains("grad_accum = 3 is not a multiple of the 2 ranks"), "{text}");

    killed_over_two_ranks_and_resumed(root.path());
    a_rank_that_fails_stops_the_job(root.path());
}

/// One rank alone meets a corrupt shard (mpirun's two-program form gives rank 1 a copy of the
/// data with one flipped byte): the job ends within seconds, with that rank's message naming the
/// file, instead of rank 0 waiting forever in a collective.
fn a_rank_that_fails_stops_the_job(root: &Path) {
    let bad = root.join("prepared_bad");
    std::fs::create_dir_all(&bad).unwrap();
    for entry in std::fs::read_dir(root.join("prepared")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bad.join(entry.file_name())).unwrap();
    }
    let shard = bad.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();

    let start = std::time::Instant::now();
    let out = Command::new("timeout")
        .args(["120", "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "1"])
        .args(sft_train_args(root, &root.join("prepared"), "one_bad_rank", "4", 4))
        .args([":", "-np", "1"])
        .args(sft_train_args(root, &bad, "one_bad_rank", "4", 4))
        .output()
        .unwrap();
    let took = start.elapsed();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("one rank with a corrupt shard, after {:.1} s:\n{text}", took.as_secs_f64());
    assert!(!out.status.success() && out.status.code() != Some(124), "{}: {text}", out.status);
    assert!(text.contains("train-00000.bin") && text.contains("checksum"), "{text}");
    assert!(took < std::time::Duration::from_secs(60), "the job took {took:?} to stop");
}

/// `mpirun -np 2 sft train` on the tiny model from scratch, `max_steps` steps saved after each.
fn mpirun_sft_train(root: &Path, out: &str, grad_accum: &str, max_steps: u64) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"].iter().map(Into::into).collect();
    args.extend(sft_train_args(root, &root.join("prepared"), out, grad_accum, max_steps));
    args
}

/// A 2-rank `sft train` killed with SIGKILL (every process of the job at once) after its second
/// checkpoint, then resumed over 2 ranks: `latest` loads after the kill, and the resumed run
/// logs the uninterrupted 2-rank run's losses, bit for bit, with no step lost or repeated.
fn killed_over_two_ranks_and_resumed(root: &Path) {
    const STEPS: u64 = 12;
    let run = |out: &str, resume: bool| {
        let mut args = mpirun_sft_train(root, out, "4", STEPS);
        if resume {
            args.extend(["--resume", "--zero-stage", "1"].map(Into::into));
        }
        let out = Command::new("timeout").arg("300").args(&args).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
    };
    run("kill_whole", false);
    let whole = sft::train::log::read_train_losses(&root.join("kill_whole").join("log.csv")).unwrap();
    assert_eq!(whole.len(), STEPS as usize);

    // A session of its own (setsid): mpirun starts the ranks in their own process groups, so
    // the kill goes to the session.
    let killed = root.join("killed");
    // The killed run splits its optimizer state (ZeRO-1, the same run bit for bit): its
    // checkpoints are gathered from both ranks, and the resumed run splits what it loads.
    let mut child = Command::new("setsid")
        .args(mpirun_sft_train(root, "killed", "4", STEPS))
        .args(["--zero-stage", "1"])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let saved = || {
        sft::checkpoint::latest(&killed)
            .ok()
            .flatten()
            .and_then(|dir| sft::train::TrainerState::load(&dir).ok())
            .is_some_and(|s| s.step >= 2)
    };
    while !saved() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its second checkpoint");
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "no second checkpoint in 120 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = Command::new("pkill").args(["-KILL", "-s", &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "pkill found nothing to kill");
    child.wait().unwrap();
    let dir = sft::checkpoint::latest(&killed).unwrap().expect("a checkpoint survives the kill");
    let at = sft::train::TrainerState::load(&dir).unwrap().step;
    Checkpoint::open(&dir).unwrap().read_params().unwrap();
    println!("2-rank run killed with SIGKILL at step {at} of {STEPS} (latest loads)");

    run("killed", true);
    let resumed = sft::train::log::read_train_losses(&killed.join("log.csv")).unwrap();
    let steps: Vec<u64> = resumed.iter().map(|l| l.0).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "every step logged once");
    for (&(step, got), &(_, want)) in resumed.iter().zip(&whole) {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "step {step}: {got} after the kill and resume, {want} uninterrupted"
        );
    }
    println!(
        "ZeRO-1 run killed at step {at} and resumed over 2 ranks: the uninterrupted (plain) run's {STEPS} \
         losses, bit for bit"
    );
}

#[test]
#[ignore = "run under mpirun by two_ranks_over_mpirun"]
fn rank_body() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let launch = Launch::from_env().unwrap();
    assert_eq!((launch.launcher, launch.world_size), (Launcher::OpenMpi, 2));
    let comm = connect(&launch, None).unwrap();
    let (rank, world) = (comm.rank(), comm.world_size());
    assert_eq!((rank, world), (launch.rank, 2));

    // The collectives, on values that differ by rank and are not round.
    let mut g: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37 + rank as f32).sin()).collect();
    let want: Vec<f32> =
        (0..1000).map(|i| (0..world).map(|r| (i as f32 * 0.37 + r as f32).sin()).sum()).collect();
    comm.all_reduce_sum(&mut g).unwrap();
    assert!(max_rel_diff(&g, &want) < 1e-6);
    let mut counts = [rank as f64 + 1.0, 10.0];
    comm.all_reduce_sum_f64(&mut counts).unwrap();
    assert_eq!(counts, [3.0, 20.0]);
    let mut from_one = vec![rank as f32; 5];
    comm.broadcast(&mut from_one, 1).unwrap();
    assert_eq!(from_one, [1.0; 5]);
    let mut bytes = if rank == 0 { b"step-7".to_vec() } else { vec![0; 6] };
    comm.broadcast_bytes(&mut bytes, 0).unwrap();
    assert_eq!(&bytes, b"step-7");
    comm.barrier().unwrap();
    // ZeRO-1's reduce-scatter and all-gather, segments of unequal length (one empty).
    let counts = [700, 300];
    let mut rs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37 + rank as f32).sin()).collect();
    comm.reduce_scatter_sum(&mut rs, &counts).unwrap();
    let mine = if rank == 0 { 0..700 } else { 700..1000 };
    assert_eq!(&rs[mine.clone()], &g[mine.clone()], "rank {rank}: reduce-scatter is the all-reduce's sum");
    let mut ag = vec![f32::NAN; 1000];
    ag[mine.clone()].copy_from_slice(&g[mine]);
    comm.all_gather(&mut ag, &counts).unwrap();
    assert_eq!(ag, g);
    let mut ag = vec![rank as f32; 4];
    comm.all_gather(&mut ag, &[0, 4]).unwrap();
    assert_eq!(ag, [1.0; 4]);

    // One optimizer step of 4 micro-batches: 2 ranks × accumulation 2 against 1 × 4.
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let exs = examples(31, &[7, 3, 5, 6, 9, 4, 8, 5]);
    for packed in [false, true] {
        let micro: Vec<Batch> =
            exs.chunks(2).map(|c| if packed { packed_batch(c, 16) } else { padded_batch(c, 1) }).collect();
        let max_tokens = micro.iter().map(Batch::n_tokens).max().unwrap();
        let mut model = Model::new(f32_backend(), config.clone(), max_tokens).unwrap();
        model.init_params(5).unwrap();

        // One process, accumulation 4.
        let total: usize = micro.iter().map(Batch::n_supervised).sum();
        model.zero_grads().unwrap();
        let mut loss_one = 0.0;
        for b in &micro {
            loss_one += model.forward_backward(b, 1.0 / total as f32, None).unwrap();
        }
        let loss_one = loss_one / total as f64;
        let grads_one: Vec<f32> = model.read_grads().unwrap().into_iter().flat_map(|t| t.data).collect();

        // This rank's share; the step's targets counted over both ranks before the backward.
        let shard = Sharding::new(rank, world, 2).unwrap();
        let mine: Vec<&Batch> = shard.positions(0).map(|p| &micro[p as usize]).collect();
        let mut sums = [mine.iter().map(|b| b.n_supervised()).sum::<usize>() as f64, 0.0];
        comm.all_reduce_sum_f64(&mut sums[..1]).unwrap();
        assert_eq!(sums[0] as usize, total);
        model.zero_grads().unwrap();
        for b in &mine {
            sums[1] += model.forward_backward(b, 1.0 / total as f32, None).unwrap();
        }
        let mut loss = [sums[1]];
        comm.all_reduce_sum_f64(&mut loss).unwrap();
        let loss_ranks = sft::dist::shard::step_mean_loss(loss[0], sums[0]).unwrap();
        let mut grads: Vec<f32> = model.read_grads().unwrap().into_iter().flat_map(|t| t.data).collect();
        comm.all_reduce_sum(&mut grads).unwrap();

        let rel_loss = (loss_ranks - loss_one).abs() / loss_one.abs();
        let rel_grads = max_rel_diff(&grads, &grads_one);
        assert!(rel_loss < 1e-5, "packed {packed}: loss {loss_ranks} vs {loss_one}");
        assert!(rel_grads < 1e-5, "packed {packed}: gradients differ by {rel_grads:e}");
        println!("rank {rank}: packed {packed}: loss rel {rel_loss:e}, gradient rel {rel_grads:e}");
    }
    println!("rank {rank} of {world}: data-parallel step matches one process");

    trains_like_one_process(comm.as_ref());
    zero1_trains_like_the_all_reduce(comm.as_ref());
}

/// ZeRO-1 against the plain all-reduce, 20 steps over 2 ranks with clipping on: the same losses
/// and weights bit for bit (the same sums, norm and AdamW, split), the same checkpoint files;
/// and a ZeRO-1 run resumed halfway over 2 ranks continues it exactly.
fn zero1_trains_like_the_all_reduce(comm: &dyn Collectives) {
    let rank = comm.rank();
    let root = std::path::PathBuf::from(std::env::var_os(ROOT_ENV).unwrap());
    let config = |out: &str, steps: u64, zero_stage: u8| TrainConfig {
        epochs: 4,
        schedule_steps: Some(20),
        save_every: 10,
        zero_stage,
        ..run_config(&root, out, steps)
    };
    let (plain, plain_report) =
        train_ranks(CpuBackend::<f32>::new(), &config("plain20", 20, 0), None, comm).unwrap();
    let (zero, zero_report) =
        train_ranks(CpuBackend::<f32>::new(), &config("zero20", 20, 1), None, comm).unwrap();
    assert_eq!(zero_report.step_losses.len(), 20);
    for (&(step, z), &(_, p)) in zero_report.step_losses.iter().zip(&plain_report.step_losses) {
        assert_eq!(z.to_bits(), p.to_bits(), "rank {rank}, step {step}: ZeRO-1 loss {z}, all-reduce {p}");
    }
    let shards = zero.optimizer_shards().expect("the optimizer state is split");
    let held = shards.counts()[rank];
    let whole: usize = shards.counts().iter().sum();
    let weights = |m: &Model<CpuBackend<f32>>| -> Vec<f32> {
        m.read_weights().unwrap().into_iter().flat_map(|t| t.data).collect()
    };
    assert_eq!(bits_hash(&weights(&zero)), bits_hash(&weights(&plain)), "rank {rank}: ZeRO-1 weights");
    let mine = bits_hash(&weights(&zero));
    let mut rank0 = [mine];
    broadcast_u64(comm, &mut rank0, 0).unwrap();
    assert_eq!(mine, rank0[0], "rank {rank}: ZeRO-1 weights differ from rank 0's");
    comm.barrier().unwrap();
    if rank == 0 {
        // The clip acts on some steps (norms above 1), so the norm's sum is exercised too.
        let log = sft::train::log::read_log(&root.join("zero20").join("log.csv")).unwrap();
        let clipped = log.iter().filter(|r| r.grad_norm.is_some_and(|n| n > 1.0)).count();
        assert!(clipped > 0, "no step clipped: {:?}", log.iter().map(|r| r.grad_norm).collect::<Vec<_>>());
        println!("ZeRO-1 run: {clipped} of 20 steps clipped");
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let read = |run: &str| std::fs::read(root.join(run).join("step-20").join(file)).unwrap();
            assert!(read("zero20") == read("plain20"), "{file}: ZeRO-1's differs from the all-reduce's");
        }
    }
    println!("rank {rank}: ZeRO-1 holds the optimizer state of {held} of {whole} parameters");

    // bf16 moments split the same way (6 steps).
    let bf16 = |out: &str, zero_stage: u8| TrainConfig {
        optimizer_state: sft::backend::StateDtype::Bf16,
        ..config(out, 6, zero_stage)
    };
    let (p16, _) = train_ranks(CpuBackend::<f32>::new(), &bf16("plain_bf16", 0), None, comm).unwrap();
    let (z16, _) = train_ranks(CpuBackend::<f32>::new(), &bf16("zero_bf16", 1), None, comm).unwrap();
    assert_eq!(bits_hash(&weights(&z16)), bits_hash(&weights(&p16)), "rank {rank}: ZeRO-1 with bf16 moments");

    // Halfway, then resumed over both ranks: steps 11..20 of the whole ZeRO-1 run.
    train_ranks(CpuBackend::<f32>::new(), &config("zero_half", 10, 1), None, comm).unwrap();
    let resume = TrainConfig { resume: true, ..config("zero_half", 20, 1) };
    let (resumed, report) = train_ranks(CpuBackend::<f32>::new(), &resume, None, comm).unwrap();
    for (&(step, r), &(_, z)) in report.step_losses.iter().zip(&zero_report.step_losses[10..]) {
        assert_eq!(r.to_bits(), z.to_bits(), "rank {rank}, step {step}: resumed ZeRO-1 loss {r}, whole {z}");
    }
    assert_eq!(
        bits_hash(&weights(&resumed)),
        bits_hash(&weights(&zero)),
        "rank {rank}: resumed ZeRO-1 weights"
    );
    println!("rank {rank} of 2: ZeRO-1 matches the all-reduce bit for bit (20 steps, and resumed at 10)");

    // The runs above summed each layer's gradients during the last micro-batch's backward
    // (grad_overlap, the default); summed all at once after it, the first 10 steps are the same
    // bit for bit, with and without ZeRO-1, and so are the step-10 checkpoints.
    for (zero_stage, whole) in [(0, &plain_report), (1, &zero_report)] {
        let out = format!("after{zero_stage}");
        let after = TrainConfig { grad_overlap: false, ..config(&out, 10, zero_stage) };
        let (_, report) = train_ranks(CpuBackend::<f32>::new(), &after, None, comm).unwrap();
        assert_eq!(report.step_losses.len(), 10);
        for (&(step, a), &(_, o)) in report.step_losses.iter().zip(&whole.step_losses) {
            assert_eq!(
                a.to_bits(),
                o.to_bits(),
                "rank {rank}, zero {zero_stage}, step {step}: after {a}, overlapped {o}"
            );
        }
        comm.barrier().unwrap();
        if rank == 0 {
            let overlapped = if zero_stage == 0 { "plain20" } else { "zero20" };
            for file in ["model.safetensors", "optimizer.safetensors"] {
                let read = |run: &str| std::fs::read(root.join(run).join("step-10").join(file)).unwrap();
                assert!(
                    read(&out) == read(overlapped),
                    "zero {zero_stage}, {file}: summed after differs from overlapped"
                );
            }
        }
    }
    println!(
        "rank {rank} of 2: gradients summed layer by layer during the backward or after it: the same run"
    );
}

/// `sft train`'s loop over the ranks: the reference's losses and validation loss, and the same
/// weights, bit for bit, on every rank.
fn trains_like_one_process(comm: &dyn Collectives) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let root = std::path::PathBuf::from(std::env::var_os(ROOT_ENV).unwrap());
    let want = read_losses(&root.join("losses.txt"));
    let want_val: f64 = std::fs::read_to_string(root.join("val_loss.txt")).unwrap().parse().unwrap();

    let (model, report) =
        train_ranks(CpuBackend::<f32>::new(), &run_config(&root, "two", 4), None, comm).unwrap();
    let worst = assert_losses_match(&format!("rank {rank}"), &report.step_losses, &want);
    let val = report.final_val_loss.unwrap();
    assert!((val - want_val).abs() < 1e-5 * want_val, "rank {rank}: validation loss {val} vs {want_val}");
    // Identical updates of identical weights: the ranks never drift apart.
    let mine = weights_hash(&model);
    let mut rank0 = [mine];
    broadcast_u64(comm, &mut rank0, 0).unwrap();
    assert_eq!(mine, rank0[0], "rank {rank}: weights differ from rank 0's");
    // Only rank 0 writes.
    assert_eq!(report.checkpoint.is_some(), rank == 0, "rank {rank}: {:?}", report.checkpoint);
    let log = std::fs::read_to_string(root.join("two").join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 5, "one header and one row per step, written once:\n{log}");
    println!("rank {rank}: losses within {worst:e} of one process's, weights hash {mine:016x} on both ranks");

    // Half the run over both ranks, for the resume in one process.
    train_ranks(CpuBackend::<f32>::new(), &run_config(&root, "half", 2), None, comm).unwrap();

    // A checkpoint of one process resumes over both ranks: steps 3 and 4 as the reference's.
    let resume = TrainConfig { resume: true, ..run_config(&root, "one_half", 4) };
    let (model, report) = train_ranks(CpuBackend::<f32>::new(), &resume, None, comm).unwrap();
    assert_losses_match(&format!("rank {rank}, resumed over 2 ranks"), &report.step_losses, &want[2..]);
    let mine = weights_hash(&model);
    let mut rank0 = [mine];
    broadcast_u64(comm, &mut rank0, 0).unwrap();
    assert_eq!(mine, rank0[0], "rank {rank}: resumed weights differ from rank 0's");
    println!("rank {rank} of {world}: sft train over 2 ranks matches one process");

    // LoRA: the adapters' gradients are reduced; the base stays frozen on both ranks.
    let (model, report) =
        train_ranks(CpuBackend::<f32>::new(), &lora_run_config(&root, "lora_two", 4), None, comm).unwrap();
    let worst = assert_losses_match(
        &format!("rank {rank}, LoRA"),
        &report.step_losses,
        &read_losses(&root.join("lora_losses.txt")),
    );
    let want_adapters: Vec<f32> = std::fs::read(root.join("lora_adapters.bin"))
        .unwrap()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let adapters = flat_adapters(&model);
    let rel = max_rel_diff(&adapters, &want_adapters);
    assert!(rel < 1e-5, "rank {rank}: LoRA adapters differ from one process's by {rel:e}");
    let h = bits_hash(&adapters);
    let mut rank0 = [h];
    broadcast_u64(comm, &mut rank0, 0).unwrap();
    assert_eq!(h, rank0[0], "rank {rank}: adapters differ from rank 0's");
    println!(
        "rank {rank} of {world}: LoRA over 2 ranks matches one process (losses within {worst:e}, adapters {rel:e})"
    );
}

fn read_losses(path: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (s, v) = l.split_once(' ').unwrap();
            (s.parse().unwrap(), v.parse().unwrap())
        })
        .collect()
}
