//! A whole training step on the GPU against the CPU reference (the loss, every gradient, the
//! weights after AdamW), padded and packed; and 200 demo steps on the GPU following the CPU's
//! loss curve.
//!
//! All tests are `#[ignore]`: they need an NVIDIA GPU. Run them there with
//! `scripts/gpu_check.sh` (or `cargo test --release --test gpu_train -- --ignored`).

mod common;
use common::gpu::gpu;

use common::model::{examples, packed_batch, padded_batch, PAD};
use sft::backend::cpu::CpuBackend;
use sft::backend::{AdamW, Backend, RopeStyle};
use sft::data::batch::Batch;
use sft::demo::{setup, DemoArgs};
use sft::model::{Model, ModelConfig};
use sft::train::train_on;

/// Two layers of width 128 in heads of 64 (the head size our attention kernel serves).
fn config(n_kv_heads: usize, rope_style: RopeStyle, tie_embeddings: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 300,
        d_model: 128,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads,
        ffn_hidden: 352,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style,
        rope_scaling: None,
        max_seq_len: 128,
        tie_embeddings,
        dropout: 0.0,
    }
}

/// ‖a − b‖ / ‖b‖.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The first AdamW step moves a weight by lr·g/(|g| + eps): with a tiny eps that is lr·sign(g),
/// and a gradient near zero whose sign bf16 rounding flips moves by 2·lr the other way (seen on
/// an H200: 1.006e-2 on one tensor of the padded tied case). An eps of the gradients' own size
/// keeps the update a smooth function of the gradient, so the comparison measures the step's
/// error, not sign noise; the AdamW kernel itself is checked at eps 1e-8 in gpu_ops.
fn smooth_adamw(grads: &[sft::model::NamedTensor]) -> AdamW {
    let count: usize = grads.iter().map(|t| t.data.len()).sum();
    let sum: f64 = grads.iter().flat_map(|t| &t.data).map(|&x| (0.5 * x as f64).powi(2)).sum();
    let rms = (sum / count as f64).sqrt();
    AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: rms as f32, weight_decay: 0.01, step: 1, grad_scale: 0.5 }
}

/// One step on both backends from the same weights; compares loss, gradients and new weights.
fn step_matches(config: ModelConfig, batch: &Batch, what: &str) {
    let Some(g) = gpu() else { return };
    let n = batch.n_tokens();
    let mut cpu = Model::new(CpuBackend::<f32>::new(), config.clone(), n).unwrap();
    cpu.init_params(7).unwrap();
    let params = cpu.read_params().unwrap();
    let mut gpu = Model::new(g, config, n).unwrap();
    gpu.write_params(&params).unwrap();

    let scale = 1.0 / batch.n_supervised() as f32;
    cpu.zero_grads().unwrap();
    gpu.zero_grads().unwrap();
    let loss_cpu = cpu.forward_backward(batch, scale, None).unwrap();
    let loss_gpu = gpu.forward_backward(batch, scale, None).unwrap();
    let rel = (loss_gpu - loss_cpu).abs() / loss_cpu.abs();
    eprintln!("{what}: loss cpu {loss_cpu:.6} gpu {loss_gpu:.6} (rel {rel:.2e})");
    assert!(rel < 1e-2, "{what}: loss {loss_gpu} vs {loss_cpu}");

    let (gc, gg) = (cpu.read_grads().unwrap(), gpu.read_grads().unwrap());
    let mut worst = (0.0, String::new());
    for (c, g) in gc.iter().zip(&gg) {
        assert_eq!(c.name, g.name);
        let e = rel_l2(&g.data, &c.data);
        if e > worst.0 {
            worst = (e, c.name.clone());
        }
        assert!(e < 3e-2, "{what}: gradient of {} differs by {e:.3e} (relative L2)", c.name);
    }
    eprintln!("{what}: worst gradient {} at {:.2e}", worst.1, worst.0);
    let norm_cpu = cpu.grad_norm().unwrap();
    let norm_gpu = gpu.grad_norm().unwrap();
    assert!((norm_gpu - norm_cpu).abs() / norm_cpu < 1e-2, "{what}: grad norm {norm_gpu} vs {norm_cpu}");

    let hp = smooth_adamw(&gc);
    cpu.adamw_step(&hp).unwrap();
    gpu.adamw_step(&hp).unwrap();
    for (c, g) in cpu.read_params().unwrap().iter().zip(&gpu.read_params().unwrap()) {
        let e = rel_l2(&g.data, &c.data);
        assert!(e < 1e-2, "{what}: {} after AdamW differs by {e:.3e}", c.name);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn training_step_matches_cpu_padded() {
    let exs = examples(11, &[40, 17, 63, 5]);
    let batch = padded_batch(&exs, 3);
    assert_eq!(batch.pad_id, PAD);
    step_matches(config(1, RopeStyle::AdjacentPairs, false), &batch, "padded, GQA 2:1, adjacent pairs");
    step_matches(config(2, RopeStyle::HalfSplit, true), &batch, "padded, MHA, half split, tied");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn training_step_matches_cpu_packed() {
    let exs = examples(12, &[40, 17, 63, 5, 30, 33, 9]);
    let batch = packed_batch(&exs, 100);
    step_matches(config(1, RopeStyle::AdjacentPairs, false), &batch, "packed, GQA 2:1");
}

/// A LoRA step on both backends from the same base and adapters (B not zero): loss, the
/// adapters' gradients, and the adapters after AdamW.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn lora_step_matches_cpu() {
    use sft::model::lora::{init_adapters, LoraConfig};
    let Some(g) = gpu() else { return };
    let exs = examples(13, &[40, 17, 63, 5]);
    let batch = padded_batch(&exs, 3);
    let n = batch.n_tokens();
    let config = config(1, RopeStyle::AdjacentPairs, false);
    let lora = LoraConfig::new(8, 16.0, 0.0, LoraConfig::parse_targets("q,k,v,o,gate,up,down").unwrap());
    let mut cpu = Model::with_lora(CpuBackend::<f32>::new(), config.clone(), n, true, &lora).unwrap();
    cpu.init_params(7).unwrap();
    let mut adapters = init_adapters(&lora, &config, 8);
    let mut rng = sft::rng::Rng::new(9);
    for t in &mut adapters {
        t.data.iter_mut().for_each(|x| *x = 0.05 * rng.normal() as f32);
    }
    cpu.write_adapters(&adapters).unwrap();
    let mut gpu = Model::with_lora(g, config, n, true, &lora).unwrap();
    gpu.write_params(&cpu.read_params().unwrap()).unwrap();
    gpu.write_adapters(&adapters).unwrap();
    let scale = 1.0 / batch.n_supervised() as f32;
    cpu.zero_grads().unwrap();
    gpu.zero_grads().unwrap();
    let loss_cpu = cpu.forward_backward(&batch, scale, None).unwrap();
    let loss_gpu = gpu.forward_backward(&batch, scale, None).unwrap();
    let rel = (loss_gpu - loss_cpu).abs() / loss_cpu.abs();
    eprintln!("lora: loss cpu {loss_cpu:.6} gpu {loss_gpu:.6} (rel {rel:.2e})");
    assert!(rel < 1e-2, "lora: loss {loss_gpu} vs {loss_cpu}");
    for (c, g) in cpu.read_adapter_grads().unwrap().iter().zip(&gpu.read_adapter_grads().unwrap()) {
        let e = rel_l2(&g.data, &c.data);
        assert!(e < 3e-2, "lora: gradient of {} differs by {e:.3e} (relative L2)", c.name);
    }
    let hp =
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 0.5 };
    cpu.adamw_step(&hp).unwrap();
    gpu.adamw_step(&hp).unwrap();
    for (c, g) in cpu.read_adapters().unwrap().iter().zip(&gpu.read_adapters().unwrap()) {
        let e = rel_l2(&g.data, &c.data);
        assert!(e < 1e-2, "lora: {} after AdamW differs by {e:.3e}", c.name);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn demo_loss_curve_on_gpu_follows_cpu() {
    let Some(g) = gpu() else { return };
    let root = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        out: root.path().join("demo"),
        examples: 4000,
        heldout: 10,
        steps: 200,
        micro_batch: 32,
        seed: 89,
        device: "cpu".into(),
        lora: false,
    };
    let s = setup(&args).unwrap();
    let mut cfg = s.train_config.clone();
    cfg.out_dir = root.path().join("cpu");
    let (_, cpu) = train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
    cfg.out_dir = root.path().join("gpu");
    cfg.device = "cuda".into();
    let (_, gpu) = train_on(g, &cfg).unwrap();
    assert_eq!(cpu.step_losses.len(), 200);
    assert_eq!(gpu.step_losses.len(), 200);
    // bf16 rounding makes the runs drift apart step by step; their curves must still agree.
    for (w, (c, g)) in cpu.step_losses.chunks(20).zip(gpu.step_losses.chunks(20)).enumerate() {
        let mc = c.iter().map(|x| x.1).sum::<f64>() / c.len() as f64;
        let mg = g.iter().map(|x| x.1).sum::<f64>() / g.len() as f64;
        eprintln!("steps {}..{}: cpu {mc:.4} gpu {mg:.4}", 20 * w + 1, 20 * w + 20);
        assert!((mg - mc).abs() <= 0.1 * mc + 0.02, "steps {}..: gpu {mg} vs cpu {mc}", 20 * w + 1);
    }
    let last = |r: &sft::train::TrainReport| r.step_losses.last().unwrap().1;
    assert!(
        last(&gpu) < 0.5 * cpu.step_losses[0].1,
        "the GPU run learned: {} -> {}",
        cpu.step_losses[0].1,
        last(&gpu)
    );
}

/// Two optimizer steps of three micro-batches each through the trainer's path
/// (`accumulate_gradients`, then `clip_and_update`) on both backends: the loss sums, the norms and
/// the weights agree; the GPU reads nothing back per micro-batch and once per step; the second
/// step's first micro-batch overwrites the first step's gradients (no zeroing in between); and
/// a second GPU model in the same process (GEMM algorithms tuned once per process) repeats the
/// first one bit for bit.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn accumulated_steps_read_back_once_and_match_cpu() {
    let Some(g) = gpu() else { return };
    let exs = examples(13, &[40, 17, 63, 5, 30, 33, 9, 21, 50]);
    let batches: Vec<Batch> = exs.chunks(3).map(|c| padded_batch(c, 3)).collect();
    let cfg = config(1, RopeStyle::HalfSplit, false);
    let n = batches.iter().map(Batch::n_tokens).max().unwrap();
    let mut cpu = Model::new(CpuBackend::<f32>::new(), cfg.clone(), n).unwrap();
    cpu.init_params(9).unwrap();
    let params = cpu.read_params().unwrap();
    let mut gpu = Model::new(g, cfg.clone(), n).unwrap();
    gpu.write_params(&params).unwrap();
    let supervised: usize = batches.iter().map(Batch::n_supervised).sum();
    let scale = 1.0 / supervised as f32;
    let mut gpu_stats = Vec::new();
    for step in 1..=2u64 {
        let hp =
            AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 1.0 };
        cpu.zero_grads().unwrap();
        gpu.zero_grads().unwrap();
        for b in &batches {
            cpu.accumulate_gradients(b, scale, None).unwrap();
            let before = gpu.backend().host_reads();
            gpu.accumulate_gradients(b, scale, None).unwrap();
            assert_eq!(gpu.backend().host_reads(), before, "a micro-batch read back");
        }
        let before = gpu.backend().host_reads();
        // A clip below the norm, so that the factor read on the device matters.
        let sc = cpu.clip_and_update(&hp, 0.05).unwrap();
        let sg = gpu.clip_and_update(&hp, 0.05).unwrap();
        assert_eq!(gpu.backend().host_reads() - before, 1, "step {step}");
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(rel(sg.loss_sum, sc.loss_sum) < 1e-2, "step {step}: loss {sg:?} vs {sc:?}");
        assert!(rel(sg.grad_norm, sc.grad_norm) < 2e-2, "step {step}: norm {sg:?} vs {sc:?}");
        assert!(sc.grad_norm > 0.05, "the clip must bite: norm {}", sc.grad_norm);
        for (c, p) in cpu.read_params().unwrap().iter().zip(&gpu.read_params().unwrap()) {
            let e = rel_l2(&p.data, &c.data);
            assert!(e < 1e-2, "step {step}: {} differs by {e:.3e}", c.name);
        }
        gpu_stats.push(sg);
    }
    let first_gpu = gpu.read_params().unwrap();
    let g2 = gpu.into_backend();
    let mut again = Model::new(g2, cfg, n).unwrap();
    again.write_params(&params).unwrap();
    for step in 1..=2u64 {
        let hp =
            AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 1.0 };
        again.zero_grads().unwrap();
        for b in &batches {
            again.accumulate_gradients(b, scale, None).unwrap();
        }
        assert_eq!(again.clip_and_update(&hp, 0.05).unwrap(), gpu_stats[step as usize - 1], "step {step}");
    }
    for (a, b) in again.read_params().unwrap().iter().zip(&first_gpu) {
        assert_eq!(a.data, b.data, "{} is not bit-identical in a second run", a.name);
    }
}

/// `sft bench --kernel-times`: with timing on, a step's launches come back by entry name with
/// positive times (cuBLASLt per shape as `cublasLt_gemm MxNxK ..`, with its FLOPs); with it off,
/// nothing is recorded.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn kernel_times_name_the_launches() {
    let Some(g) = gpu() else { return };
    // The names below are the default dQ sum's, whatever SFT_FLASH_DQ says.
    g.set_flash_dq(sft::backend::cuda::FlashDq::Ordered);
    let exs = examples(14, &[40, 17, 63, 5]);
    let batch = padded_batch(&exs, 3);
    let mut gpu = Model::new(g, config(1, RopeStyle::AdjacentPairs, false), batch.n_tokens()).unwrap();
    gpu.init_params(7).unwrap();
    let scale = 1.0 / batch.n_supervised() as f32;
    gpu.zero_grads().unwrap();
    gpu.forward_backward(&batch, scale, None).unwrap();
    assert!(gpu.backend().take_kernel_times().unwrap().is_empty(), "timing is off by default");
    assert!(gpu.backend().set_kernel_timing(true));
    gpu.forward_backward(&batch, scale, None).unwrap();
    gpu.backend().synchronize().unwrap();
    gpu.backend().set_kernel_timing(false);
    let times = gpu.backend().take_kernel_times().unwrap();
    let names: Vec<&str> = times.iter().map(|k| k.name.as_str()).collect();
    eprintln!("kernel times: {names:?}");
    for want in ["flash_forward_64", "flash_backward_64", "rmsnorm_backward", "cross_entropy_rows"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(times.iter().all(|k| k.ns > 0.0 && k.launches > 0), "{times:?}");
    // The GEMMs, one row per shape, carry their FLOPs (2·m·n·k a launch); nothing else does.
    let gemms: Vec<_> = times.iter().filter(|k| k.name.starts_with("cublasLt_gemm ")).collect();
    assert!(gemms.len() >= 3, "{names:?}");
    for k in &times {
        let gemm = k.name.starts_with("cublasLt_gemm ");
        assert_eq!(k.flops > 0.0, gemm, "{k:?}");
        if gemm {
            let dims: Vec<f64> =
                k.name.split_whitespace().nth(1).unwrap().split('x').map(|d| d.parse().unwrap()).collect();
            assert_eq!(k.flops, 2.0 * dims.iter().product::<f64>() * k.launches as f64, "{k:?}");
        }
    }
}

/// Activation recompute on the CUDA backend: `mlp` and `layer` recompute with the same kernels,
/// shapes and dropout seeds, so the loss and every gradient are expected to equal `none`'s
/// bit for bit (as on the CPU, tests/recompute.rs); with model and LoRA dropout, packed rows and
/// two accumulated micro-batches.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn recompute_gives_the_same_gradients_on_the_gpu() {
    use sft::model::lora::{init_adapters, LoraConfig};
    use sft::model::Recompute;
    let Some(mut g) = gpu() else { return };
    let batches =
        [packed_batch(&examples(21, &[40, 17, 63, 5]), 128), padded_batch(&examples(22, &[30, 9]), 2)];
    let n = batches.iter().map(Batch::n_tokens).max().unwrap();
    let config = ModelConfig { dropout: 0.1, ..config(1, RopeStyle::HalfSplit, false) };
    let lora = LoraConfig::new(8, 16.0, 0.1, LoraConfig::parse_targets("q,v,gate,down").unwrap());
    let params = sft::model::params::init_params(&config, 7);
    let mut adapters = init_adapters(&lora, &config, 8);
    let mut rng = sft::rng::Rng::new(9);
    for t in &mut adapters {
        t.data.iter_mut().for_each(|x| *x = 0.05 * rng.normal() as f32);
    }
    for with_lora in [false, true] {
        let mut reference = None;
        for recompute in Recompute::ALL {
            let l = with_lora.then_some(&lora);
            let mut model = Model::with_recompute(g, config.clone(), n, l, recompute).unwrap();
            model.write_params(&params).unwrap();
            if with_lora {
                model.write_adapters(&adapters).unwrap();
            }
            model.zero_grads().unwrap();
            let losses: Vec<f64> = batches
                .iter()
                .enumerate()
                .map(|(i, b)| model.forward_backward(b, 0.01, Some(5 + i as u64)).unwrap())
                .collect();
            let grads = if with_lora { model.read_adapter_grads() } else { model.read_grads() }.unwrap();
            g = model.into_backend();
            match &reference {
                None => reference = Some((losses, grads)),
                Some((l0, g0)) => {
                    assert_eq!(&losses, l0, "lora {with_lora}, recompute {recompute}: losses");
                    for (a, b) in grads.iter().zip(g0) {
                        let e = rel_l2(&a.data, &b.data);
                        assert!(
                            a == b,
                            "lora {with_lora}, recompute {recompute}: gradient of {} differs ({e:.2e})",
                            a.name
                        );
                    }
                }
            }
        }
    }
}

/// Data parallelism over NCCL in a world of one: the gradients go through ncclAllReduce on the
/// device (the identity for one rank, never the host path), after the backward or bucket by
/// bucket on the NCCL stream during it, and the steps are the ones without NCCL, bit for bit.
#[test]
#[ignore = "needs an NVIDIA GPU and NCCL"]
fn nccl_world_of_one_steps_like_no_nccl() {
    let Some(plain_backend) = gpu() else { return };
    let mut joined = sft::backend::cuda::CudaBackend::new(0).unwrap();
    let id = sft::backend::cuda::nccl::nccl_unique_id().unwrap();
    joined.join_ranks(&id, 0, 1).unwrap();
    assert_eq!(joined.nccl_rank(), Some((0, 1)));
    let exs = examples(17, &[40, 17, 63, 5, 30, 33]);
    let batches: Vec<Batch> = exs.chunks(3).map(|c| padded_batch(c, 3)).collect();
    let cfg = config(1, RopeStyle::HalfSplit, false);
    let n = batches.iter().map(Batch::n_tokens).max().unwrap();
    let mut plain = Model::new(plain_backend, cfg.clone(), n).unwrap();
    plain.init_params(9).unwrap();
    let mut nccl = Model::new(joined, cfg.clone(), n).unwrap();
    nccl.init_params(9).unwrap();
    // The third sums each layer's gradients on the NCCL stream during the last micro-batch's
    // backward (grad_overlap), the compute stream waiting once at its end.
    let mut bucketed_backend = sft::backend::cuda::CudaBackend::new(0).unwrap();
    bucketed_backend.join_ranks(&sft::backend::cuda::nccl::nccl_unique_id().unwrap(), 0, 1).unwrap();
    let mut bucketed = Model::new(bucketed_backend, cfg, n).unwrap();
    bucketed.init_params(9).unwrap();
    let scale = 1.0 / batches.iter().map(Batch::n_supervised).sum::<usize>() as f32;
    for step in 1..=2u64 {
        let hp =
            AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 1.0 };
        let mut stats = Vec::new();
        for (i, model) in [&mut plain, &mut nccl, &mut bucketed].into_iter().enumerate() {
            model.zero_grads().unwrap();
            for (k, b) in batches.iter().enumerate() {
                if i == 2 && k + 1 == batches.len() {
                    model.accumulate_and_sum_gradients(b, scale, None, &NormOnly).unwrap();
                } else {
                    model.accumulate_gradients(b, scale, None).unwrap();
                }
            }
            if i == 1 {
                model.all_reduce_grads(|_| panic!("the joined GPU sums on the device")).unwrap();
            }
            stats.push(model.clip_and_update(&hp, 0.05).unwrap());
        }
        assert_eq!(stats[0], stats[1], "step {step}");
        assert_eq!(stats[0], stats[2], "step {step}: bucketed during the backward");
    }
    for model in [&nccl, &bucketed] {
        for (a, b) in model.read_params().unwrap().iter().zip(&plain.read_params().unwrap()) {
            assert_eq!(a.data, b.data, "{} differs with NCCL", a.name);
        }
    }

    // ZeRO-1 over NCCL, a world of one: the reduce-scatter (ncclReduce to each tensor's owner)
    // and the all-gather (ncclBroadcast from it) on the device; the host collectives carry only
    // the norm's per-tensor sums. The same steps again.
    let mut zero_backend = sft::backend::cuda::CudaBackend::new(0).unwrap();
    zero_backend.join_ranks(&sft::backend::cuda::nccl::nccl_unique_id().unwrap(), 0, 1).unwrap();
    let layout = sft::dist::OptimizerLayout { moments: sft::backend::StateDtype::F32, zero: Some((0, 1)) };
    let cfg = config(1, RopeStyle::HalfSplit, false);
    let mut zero =
        Model::for_training(zero_backend, cfg, n, None, sft::model::Recompute::None, layout).unwrap();
    zero.init_params(9).unwrap();
    assert!(zero.optimizer_shards().is_some());
    let mut again = Model::new(gpu().unwrap(), config(1, RopeStyle::HalfSplit, false), n).unwrap();
    again.init_params(9).unwrap();
    for step in 1..=2u64 {
        let hp =
            AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 1.0 };
        // Step 2 reduces each layer's gradients to their owners during the last backward.
        let bucketed = step == 2;
        for (i, model) in [&mut again, &mut zero].into_iter().enumerate() {
            model.zero_grads().unwrap();
            for (k, b) in batches.iter().enumerate() {
                if i == 1 && bucketed && k + 1 == batches.len() {
                    model.accumulate_and_sum_gradients(b, scale, None, &NormOnly).unwrap();
                } else {
                    model.accumulate_gradients(b, scale, None).unwrap();
                }
            }
        }
        let want = again.clip_and_update(&hp, 0.05).unwrap();
        if !bucketed {
            zero.reduce_scatter_grads(&NormOnly).unwrap();
        }
        let got = zero.clip_and_update_sharded(&hp, 0.05, &NormOnly).unwrap();
        // The GPU's sum of squares of one tensor need not add up in the all-tensor kernel's
        // order: the norm (and through the clip, the weights) may differ in the last bits.
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(rel(got.loss_sum, want.loss_sum) < 1e-6, "step {step}: loss {got:?} vs {want:?}");
        assert!(rel(got.grad_norm, want.grad_norm) < 1e-6, "step {step}: norm {got:?} vs {want:?}");
    }
    let weights = |m: &Model<sft::backend::cuda::CudaBackend>| -> Vec<f32> {
        m.read_weights().unwrap().into_iter().flat_map(|t| t.data).collect()
    };
    let rel = rel_l2(&weights(&zero), &weights(&again));
    eprintln!(
        "ZeRO-1 over NCCL (world of one) against the plain steps: weights differ by {rel:e} (relative L2)"
    );
    assert!(rel < 1e-4, "ZeRO-1 over NCCL: weights differ by {rel:e}");
}

/// Host collectives for a world of one that allow only the ZeRO-1 norm's f64 sum: the rest of
/// ZeRO-1's step must run on the device.
struct NormOnly;

impl sft::dist::Collectives for NormOnly {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> anyhow::Result<()> {
        panic!("all_reduce_sum through the host")
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn reduce_sum(&self, _: &mut [f32], _: usize) -> anyhow::Result<()> {
        panic!("reduce_sum through the host")
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> anyhow::Result<()> {
        panic!("broadcast through the host")
    }
    fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> anyhow::Result<()> {
        panic!("broadcast_bytes through the host")
    }
    fn barrier(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        panic!("abort({code})")
    }
}
