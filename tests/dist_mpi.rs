//! Data parallel over MPI on the CPU backend, 2 ranks under `mpirun` (feature `mpi`).
//!
//! `two_ranks_over_mpirun` starts this same test binary under `mpirun -np 2`, running only
//! `rank_body` (ignored otherwise); each rank checks the collectives and that its share of a
//! step, with the gradients summed over MPI, gives the gradients and loss of one process
//! training on the whole step.
#![cfg(feature = "mpi")]

mod common;

use common::model::*;
use sft::backend::RopeStyle;
use sft::data::batch::Batch;
use sft::dist::{connect, Launch, Launcher, Sharding};
use sft::model::Model;
use std::process::Command;

const CHILD_ENV: &str = "SFT_DIST_RANK_TEST";

#[test]
fn two_ranks_over_mpirun() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        println!("skipped: no mpirun on PATH (install openmpi-bin)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(&exe)
        .args(["--exact", "rank_body", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "mpirun -np 2 failed ({}):\n{text}", out.status);
    for rank in 0..2 {
        assert!(text.contains(&format!("rank {rank} of 2: data-parallel step matches")), "{text}");
    }
}

#[test]
#[ignore = "run under mpirun by two_ranks_over_mpirun"]
fn rank_body() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let launch = Launch::from_env().unwrap();
    assert_eq!((launch.launcher, launch.world_size), (Launcher::OpenMpi, 2));
    let comm = connect(&launch).unwrap();
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
}
