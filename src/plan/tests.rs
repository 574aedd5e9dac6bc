use super::counting::{CountingBackend, Family, KernelKind};
use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, GradMode, Precision, RopeStyle};
use crate::bench::train::synthetic_batch;
use crate::model::forward::{memory_bytes, memory_bytes_lora, micro_batch_that_fits};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::config::TrainConfig;
use crate::train::trainer::optimizer_step;

fn tiny() -> ModelConfig {
    ModelConfig::tiny(300)
}

/// A small config whose head_dim (64) the CUDA attention supports, as `plan` requires.
fn small() -> ModelConfig {
    ModelConfig { d_model: 128, n_heads: 2, n_kv_heads: 1, ffn_hidden: 352, ..ModelConfig::tiny(300) }
}

/// 6 FLOPs per matmul parameter, counted here from the shapes (not from the bench's function).
fn matmul_params(c: &ModelConfig) -> usize {
    let h = c.heads();
    let per_layer = c.d_model * h.qkv_width() + h.q_width() * c.d_model + 3 * c.d_model * c.ffn_hidden;
    c.n_layers * per_layer + c.vocab_size * c.d_model
}

#[test]
fn matmul_flops_are_2nio_forward_and_4nio_backward() {
    let be = CountingBackend::new();
    let (n, i, o) = (7, 13, 5);
    let mut out = be.zeros(n * o, Precision::Compute).unwrap();
    let inp = be.zeros(n * i, Precision::Compute).unwrap();
    let w = be.zeros(o * i, Precision::Compute).unwrap();
    let mut dinp = be.zeros(n * i, Precision::Compute).unwrap();
    let mut dw = be.zeros(o * i, Precision::F32).unwrap();
    be.matmul_forward(&mut out, &inp, &w, n, i, o).unwrap();
    let fwd = be.take_ledger().family(Family::Matmul);
    assert_eq!(fwd.flops, (2 * n * i * o) as f64);
    assert_eq!(fwd.launches, 1);
    // bf16 in and out.
    assert_eq!(fwd.bytes, (2 * (n * i + o * i + n * o)) as f64);

    be.matmul_backward(Some(&mut dinp), &mut dw, &out, &inp, &w, n, i, o, GradMode::Accumulate).unwrap();
    let bwd = be.take_ledger().family(Family::Matmul);
    assert_eq!(bwd.flops, (4 * n * i * o) as f64);
    assert_eq!(bwd.launches, 2);
    be.matmul_backward(None, &mut dw, &out, &inp, &w, n, i, o, GradMode::Accumulate).unwrap();
    let dw_only = be.take_ledger();
    assert_eq!(dw_only.family(Family::Matmul).flops, (2 * n * i * o) as f64);
    assert_eq!(dw_only.calls[&Family::Matmul], 1);
    // Overwriting (beta = 0) does not read the fp32 gradient: 4 bytes per element less.
    be.matmul_backward(None, &mut dw, &out, &inp, &w, n, i, o, GradMode::Overwrite).unwrap();
    let overwrite = be.take_ledger().family(Family::Matmul);
    assert_eq!(dw_only.family(Family::Matmul).bytes - overwrite.bytes, (4 * o * i) as f64);

    // A wrong precision is an error, as on the GPU.
    let mut bad_dw = be.zeros(o * i, Precision::Compute).unwrap();
    let err =
        be.matmul_backward(None, &mut bad_dw, &out, &inp, &w, n, i, o, GradMode::Accumulate).unwrap_err();
    assert!(err.to_string().contains("matmul_backward dw"), "{err}");
}

#[test]
fn a_steps_gemm_flops_are_exactly_six_per_matmul_parameter_and_token() {
    for (mb, t, accum) in [(2, 32, 1), (3, 17, 2)] {
        let c = tiny();
        let count = count_step(&c, mb, t, accum).unwrap();
        let tokens = mb * t * accum;
        let gemm = count.ledger.kind(KernelKind::Gemm).flops;
        assert_eq!(gemm, (6 * matmul_params(&c) * tokens) as f64, "mb {mb} t {t} accum {accum}");
        // The bench's FLOPs per token is the same 6·N plus attention; the counted attention is
        // the executed products over causal pairs (2 forward + 5 backward per pair and head dim).
        let h = c.heads();
        let pairs = (mb * accum) as f64 * (t * (t + 1) / 2) as f64;
        let attn = count.ledger.kind(KernelKind::Attention).flops;
        assert_eq!(attn, 14.0 * (c.n_layers * h.n_heads * h.head_dim) as f64 * pairs);
        let bench_matmul = flops_per_token(&c, t) - 6.0 * (c.n_layers * h.q_width() * t) as f64;
        assert_eq!(bench_matmul * tokens as f64, gemm);
    }
}

#[test]
fn launches_follow_the_cuda_backends_launch_code() {
    let c = tiny();
    let (mb, t) = (2, 32);
    let count = count_step(&c, mb, t, 1).unwrap();
    let l = &count.ledger;
    let layers = c.n_layers as u64;
    // One tile table per micro-batch (prepare_segments); per layer flash_forward, then D and
    // flash_backward.
    assert_eq!(l.family(Family::FlashAttention).launches, 1 + 3 * layers);
    // Per layer 4 GEMMs forward, 8 backward.
    assert_eq!(l.family(Family::Matmul).launches, 12 * layers);
    // One rmsnorm + 2 residual norms per layer forward; 2 launches per backward norm (the fused
    // kernel, then the in-order sum of its weight-gradient partials).
    assert_eq!(l.family(Family::Rmsnorm).launches, 1 + 2 * layers + 2 * (1 + 2 * layers));
    // RoPE: the micro-batch's table once, then one rotation per layer forward; the flash
    // backward rotates dK and dQ back itself, in either pairing.
    assert_eq!(l.family(Family::Rope).launches, 1 + layers);
    assert_eq!(l.calls[&Family::Rope], 1 + layers);
    let half = ModelConfig { rope_style: RopeStyle::HalfSplit, ..c.clone() };
    let adjacent = ModelConfig { rope_style: RopeStyle::AdjacentPairs, ..c.clone() };
    for other in [half, adjacent] {
        let count = count_step(&other, mb, t, 1).unwrap();
        assert_eq!(count.ledger.family(Family::Rope), l.family(Family::Rope), "{:?}", other.rope_style);
    }
    // The loss: one chunk (64 rows < 32 Mi / vocab): gather, GEMM, rows, 2 GEMMs, scatter; a
    // memset of dx. The supervised rows came up with the batch, the losses stay on the device.
    let ce = l.family(Family::CrossEntropy);
    assert_eq!(ce.launches, 6 + 1);
    assert_eq!(ce.syncs, 0);
    // AdamW: one launch for every tensor, its descriptors uploaded first.
    assert_eq!(l.family(Family::Adamw).launches, 2);
    assert_eq!(l.calls[&Family::Adamw], 1);
    // The global norm: one launch per tensor and one to add the partials; one more to add the
    // micro-batch's losses to the step's. Nothing comes down until the step's end.
    let n_tensors = crate::model::params::param_specs(&c).len() as u64;
    assert_eq!(l.family(Family::GlobalNorm).launches, n_tensors + 1 + 1);
    assert_eq!(l.family(Family::GlobalNorm).syncs, 0);
    // The embedding: forward; backward from the tokens grouped on the host, after zeroing the
    // table's gradient (the first micro-batch writes it; the tiny model's lm_head is untied).
    assert_eq!(l.family(Family::Embedding).launches, 1 + 2);
    assert_eq!(l.family(Family::Embedding).syncs, 0);
    // The tiny model has no dropout: no dropout call.
    assert!(!l.calls.contains_key(&Family::Dropout));
    // AdamW moves 30 bytes per parameter.
    let adam = l.tally(Family::Adamw, KernelKind::Elementwise);
    assert_eq!(adam.bytes, (30 * c.n_params()) as f64);
}

#[test]
fn dropout_is_drawn_inside_the_norm_kernels() {
    // The forward's masks are applied by the residual norms and the backward's by the norm
    // backward that completes the residual gradient: no dropout launch, no extra launch at all.
    // Without dropout the residual add rides in the o and down projections' GEMMs (which read
    // the residual as C) and a plain norm follows; with it, each block's projection is written,
    // then read back with the residual by the residual norm, and the backward writes each
    // block's masked branch gradient (without dropout, the residual gradient itself).
    let count = |dropout: f32| {
        let c = ModelConfig { dropout, ..tiny() };
        count_step(&c, 2, 16, 1).unwrap().ledger
    };
    let (with, without) = (count(0.1), count(0.0));
    assert!(!with.calls.contains_key(&Family::Dropout));
    let n = 2 * 16 * tiny().d_model;
    let branches = 2 * tiny().n_layers;
    let (norm_with, norm_without) = (with.family(Family::Rmsnorm), without.family(Family::Rmsnorm));
    assert_eq!(norm_with.launches, norm_without.launches);
    // Per branch: the forward's delta read and x_out write on top of a plain norm, and the
    // backward's branch gradient.
    assert_eq!(norm_with.bytes - norm_without.bytes, (3 * branches * n * COMPUTE_BYTES) as f64);
    // Per branch without dropout: the GEMM reads the residual; with dropout it writes delta,
    // the same bytes.
    let (mm_with, mm_without) = (with.family(Family::Matmul), without.family(Family::Matmul));
    assert_eq!(mm_without.bytes - mm_with.bytes, (branches * n * COMPUTE_BYTES) as f64);
    assert_eq!((mm_with.launches, mm_with.flops), (mm_without.launches, mm_without.flops));
    let launches = |l: &super::counting::Ledger| l.tallies.values().map(|t| t.launches).sum::<u64>();
    assert_eq!(launches(&with), launches(&without));
}

#[test]
fn the_backward_copies_no_residual_gradient_with_or_without_dropout() {
    let copies = |dropout: f32| {
        let c = ModelConfig { dropout, ..tiny() };
        count_step(&c, 2, 16, 1).unwrap().ledger.tally(Family::Memory, KernelKind::DeviceCopy)
    };
    let (with, without) = (copies(0.1), copies(0.0));
    assert_eq!((with.launches, with.bytes), (without.launches, without.bytes));
}

#[test]
fn the_counting_backend_allocates_what_memory_bytes_says() {
    let c = small();
    let (mb, t) = (4, 64);
    let count = count_step(&c, mb, t, 1).unwrap();
    let (fixed, per_token) = memory_bytes(&c, COMPUTE_BYTES);
    // cu_seqlens and the embedding groups hold one id more than 1 and 3 per token; the step's
    // statistics buffer is a few floats.
    let extra = 4 + 4 + 4 * crate::backend::STATS_LEN;
    assert_eq!(count.allocated, fixed + per_token * mb * t + extra);

    let args = plan_args("tiny", mb, t);
    let p = plan_for(&c, &args).unwrap();
    let m = &p.memory;
    assert_eq!(m.weights + m.grads + m.master_and_moments, fixed);
    assert_eq!(m.activations, per_token * mb * t);
    assert_eq!(m.allocated_by_model, count.allocated);
    assert_eq!(m.largest_micro_batch, micro_batch_that_fits(&c, COMPUTE_BYTES, t, m.available));
    assert!(m.fits);
}

/// ZeRO-1: a model built for rank `r` of `W` allocates the master weights and moments of its
/// share only, as the memory functions (and so the trainer's check and the plan) count them.
#[test]
fn a_zero1_rank_allocates_its_share_as_memory_bytes_says() {
    use crate::backend::StateDtype;
    use crate::dist::OptimizerLayout;
    let c = small();
    let t = 64;
    let lens = crate::model::params::param_lens(&c);
    let whole =
        Model::for_training(CountingBackend::new(), c.clone(), t, None, Recompute::None, StateDtype::F32)
            .unwrap()
            .backend()
            .allocated_bytes();
    let shards = crate::dist::OptimizerShards::new(&lens, 4, 0).unwrap().counts();
    for (rank, &held) in shards.iter().enumerate() {
        for moments in [StateDtype::F32, StateDtype::Bf16] {
            let layout = OptimizerLayout { moments, zero: Some((rank, 4)) };
            let model =
                Model::for_training(CountingBackend::new(), c.clone(), t, None, Recompute::None, layout)
                    .unwrap();
            let per_held = 4 + 2 * moments.bytes();
            let whole = if moments == StateDtype::F32 { whole } else { whole - 4 * c.n_params() };
            let not_held = c.n_params() - held;
            assert_eq!(
                model.backend().allocated_bytes(),
                whole - not_held * per_held,
                "rank {rank} {moments}"
            );
            let (fixed, _) = memory_bytes_with(&c, COMPUTE_BYTES, true, None, Recompute::None, layout);
            let (whole_fixed, _) = memory_bytes_with(&c, COMPUTE_BYTES, true, None, Recompute::None, moments);
            assert_eq!(whole_fixed - fixed, not_held * per_held, "rank {rank} {moments}");
        }
    }
    // The plan counts the largest share, and its memory plan follows.
    let plan = plan_for(&c, &PlanArgs { gpus: 4, zero_stage: 1, ..plan_args("small", 2, t) }).unwrap();
    assert_eq!(plan.memory.master_and_moments, 12 * shards.iter().max().unwrap());
    assert_eq!(
        plan.memory.total,
        plan.memory.weights
            + plan.memory.grads
            + plan.memory.master_and_moments
            + plan.memory.activations
            + plan.memory.workspace
    );
}

/// `--optimizer-state bf16`: the model allocates 4 bytes per parameter fewer, the plan says so,
/// and AdamW moves 8 bytes per parameter fewer.
#[test]
fn bf16_moments_shrink_the_memory_plan_and_adamw_traffic() {
    use crate::backend::StateDtype;
    let c = small();
    let (mb, t) = (4, 64);
    let args = |state| PlanArgs { optimizer_state: state, ..plan_args("small", mb, t) };
    let (p32, p16) =
        (plan_for(&c, &args(StateDtype::F32)).unwrap(), plan_for(&c, &args(StateDtype::Bf16)).unwrap());
    let n = c.n_params();
    assert_eq!(p32.memory.master_and_moments, 12 * n);
    assert_eq!(p16.memory.master_and_moments, 8 * n);
    assert_eq!(p32.memory.allocated_by_model - p16.memory.allocated_by_model, 4 * n);
    assert_eq!(p32.memory.total - p16.memory.total, 4 * n);
    let (f16, _) = crate::model::forward::memory_bytes_with(
        &c,
        COMPUTE_BYTES,
        true,
        None,
        Recompute::None,
        StateDtype::Bf16,
    );
    assert_eq!(p16.memory.weights + p16.memory.grads + p16.memory.master_and_moments, f16);
    assert!(p16.memory.largest_micro_batch >= p32.memory.largest_micro_batch);
    let adamw = |p: &Plan| p.families.iter().find(|f| f.family == Family::Adamw).unwrap().bytes;
    assert_eq!(adamw(&p32) - adamw(&p16), (8 * n) as f64);
    assert!(render(&p16).contains("master + moments (fp32, bf16)"), "{}", render(&p16));
    // LoRA adapters keep f32 moments: bf16 with LoRA is refused.
    let lora = PlanArgs {
        lora: crate::lora::LoraArgs { lora: true, ..Default::default() },
        ..args(StateDtype::Bf16)
    };
    let err = plan_for(&c, &lora).unwrap_err().to_string();
    assert!(err.contains("LoRA"), "{err}");
}

#[test]
fn the_plan_is_labelled_and_consistent() {
    let args = PlanArgs { grad_accum: 2, gpu: "a100".into(), ..plan_args("tiny", 2, 128) };
    let c = ModelConfig { dropout: 0.1, ..small() };
    let p = plan_for(&c, &args).unwrap();
    assert!(p.estimate);
    assert!(!p.calibrated);
    let sum: f64 = p.families.iter().map(|f| f.seconds).sum();
    assert!((sum - p.step_seconds).abs() <= 1e-12 * sum);
    assert_eq!(p.tokens_per_step, 2 * 2 * 128);
    assert!(p.mfu > 0.0 && p.mfu < 1.0, "{}", p.mfu);
    let text = render(&p);
    assert!(text.contains("uncalibrated: no GPU measurement yet"), "{text}");
    assert!(text.lines().last().unwrap().starts_with("estimated MFU: "), "{text}");
    assert!(text.trim_end().ends_with('%'), "{text}");
    let too_big = Plan { memory: MemoryPlan { fits: false, ..p.memory.clone() }, ..p.clone() };
    let text = render(&too_big);
    assert!(text.trim_end().ends_with("the trainer refuses it, see the note above)"), "{text}");
    for f in ["matmul", "flash_attention", "cross_entropy", "adamw", "rope", "rmsnorm"] {
        assert!(text.contains(f), "{f} missing:\n{text}");
    }

    let err = plan_for(&c, &PlanArgs { seq_len: Some(4096), ..args.clone() }).unwrap_err().to_string();
    assert!(err.contains("--seq-len 4096"), "{err}");
    let err = plan_for(&c, &PlanArgs { gpu: "v100".into(), ..args.clone() }).unwrap_err().to_string();
    assert!(err.contains("v100"), "{err}");
    let err = plan_for(&tiny(), &args).unwrap_err().to_string();
    assert!(err.contains("head_dim 16"), "{err}");
}

#[test]
fn a_slower_calibration_factor_slows_only_its_family() {
    let c = tiny();
    let count = count_step(&c, 2, 32, 1).unwrap();
    let dev = devices::device("h100").unwrap();
    let base = devices::calibration("h100").unwrap();
    let mut slow = base.clone();
    slow.source = Some("test".into());
    slow.factors.insert(Family::Matmul, 2.0);
    let a = estimate_families(&count.ledger, dev, &base);
    let b = estimate_families(&count.ledger, dev, &slow);
    for (x, y) in a.iter().zip(&b) {
        let want = if x.family == Family::Matmul { 2.0 * x.seconds } else { x.seconds };
        assert!((y.seconds - want).abs() <= 1e-12 * want, "{:?}", x.family);
    }
}

#[test]
fn a_lora_plan_counts_what_the_lora_model_allocates_and_trains_less() {
    let c = small();
    let (mb, t) = (4, 64);
    let lora = LoraConfig::default();
    let count = count_step_with(&c, mb, t, 1, Some(&lora), crate::model::Recompute::None).unwrap();
    let (fixed, per_token) = memory_bytes_lora(&c, COMPUTE_BYTES, true, Some(&lora));
    // As without LoRA: cu_seqlens, the embedding groups and the step's statistics on top.
    let extra = 4 + 4 + 4 * crate::backend::STATS_LEN;
    assert_eq!(count.allocated, fixed + per_token * mb * t + extra);
    let full = count_step(&c, mb, t, 1).unwrap();
    assert!(count.allocated < full.allocated);

    let args = PlanArgs {
        lora: crate::lora::LoraArgs { lora: true, ..Default::default() },
        ..plan_args("small", mb, t)
    };
    let p = plan_for(&c, &args).unwrap();
    let m = &p.memory;
    assert_eq!(m.weights + m.grads + m.master_and_moments, fixed);
    assert_eq!(m.allocated_by_model, count.allocated);
    assert_eq!(p.trainable_params, lora.n_params(&c));
    assert!(p.trainable_params < p.n_params / 10);
    // Fewer weight-gradient GEMMs and a smaller AdamW: a cheaper step.
    let full_plan = plan_for(&c, &PlanArgs { lora: Default::default(), ..args.clone() }).unwrap();
    assert!(p.total_flops < full_plan.total_flops);
    assert!(m.total < full_plan.memory.total);
    assert!(render(&p).contains("LoRA         rank 16, alpha 8, on q,v"));
}

#[test]
fn flash_tile_tables_are_built_once_per_micro_batch() {
    let c = tiny();
    let layers = c.n_layers as u64;
    for accum in [1usize, 3] {
        let count = count_step(&c, 2, 32, accum).unwrap();
        // Per micro-batch: one tile table, then 3 launches per layer and none of them a table.
        assert_eq!(count.ledger.family(Family::FlashAttention).launches, accum as u64 * (1 + 3 * layers));
    }
}

#[test]
fn a_step_reads_back_once_whatever_its_micro_batches() {
    // Counting backend, through the plan's own step: the loss sum and the norm come down
    // together at the step's end (the statistics buffer); nothing per micro-batch.
    for accum in [1, 3] {
        let count = count_step(&tiny(), 2, 16, accum).unwrap();
        let down = count.ledger.kind(KernelKind::HostTransfer);
        assert_eq!(down.syncs, 1, "grad_accum {accum}");
        assert_eq!(count.ledger.family(Family::Memory).syncs, 1, "grad_accum {accum}");
    }

    // The CPU backend counts its reads through the same trait method: none per micro-batch,
    // one per optimizer step.
    let c = tiny();
    let (rows, t) = (2, 16);
    let mut model = Model::new(CpuBackend::<f32>::new(), c.clone(), rows * t).unwrap();
    model.init_params(5).unwrap();
    let mut rng = Rng::new(3);
    let batches: Vec<_> = (0..3).map(|_| synthetic_batch(&mut rng, rows, t, c.vocab_size)).collect();
    let reads = |m: &Model<CpuBackend<f32>>| m.backend().host_reads();
    model.zero_grads().unwrap();
    let before = reads(&model);
    for b in &batches {
        model.accumulate_gradients(b, 1e-2, None).unwrap();
        assert_eq!(reads(&model), before, "a micro-batch read something back");
    }
    let cfg = TrainConfig::default();
    for step in 0..2 {
        let start = reads(&model);
        let out = optimizer_step(&mut model, &batches, step, 1e-3, &cfg, &Rng::new(1)).unwrap();
        assert_eq!(reads(&model) - start, 1, "step {step}");
        assert!(out.train_loss.unwrap().is_finite() && out.grad_norm.unwrap() > 0.0);
    }
    // forward_backward, which returns the micro-batch's loss, reads once per call.
    let start = reads(&model);
    model.forward_backward(&batches[0], 1e-2, None).unwrap();
    assert_eq!(reads(&model) - start, 1);
}

#[test]
fn the_first_micro_batch_writes_the_gradients_instead_of_zeroing_them() {
    // No zeroing pass over the gradients in a step: the only memsets left are the norms' weight
    // gradients (d floats each, which RMSNorm's backward adds to), the loss's dx and the
    // embedding table's gradient on the first micro-batch.
    let c = tiny();
    let count = count_step(&c, 2, 16, 2).unwrap();
    let memsets = count.ledger.tally(Family::Memory, KernelKind::DeviceCopy);
    let norms = (2 * c.n_layers + 1) as u64;
    // Plus the residual gradient's memset per micro-batch.
    assert_eq!(memsets.launches, norms + 2);
    // The weight-gradient GEMMs of the first micro-batch write (beta 0), the second's add: the
    // second reads the fp32 gradients the first does not.
    let be = CountingBackend::new();
    let mut model = Model::new(be, c.clone(), 32).unwrap();
    let mut rng = Rng::new(89);
    let batch = synthetic_batch(&mut rng, 2, 16, c.vocab_size);
    model.zero_grads().unwrap();
    model.backend().take_ledger();
    model.accumulate_gradients(&batch, 1.0, None).unwrap();
    let first = model.backend().take_ledger().family(Family::Matmul);
    model.accumulate_gradients(&batch, 1.0, None).unwrap();
    let second = model.backend().take_ledger().family(Family::Matmul);
    let h = c.heads();
    let dw_elems =
        c.n_layers * (c.d_model * h.qkv_width() + h.q_width() * c.d_model + 3 * c.d_model * c.ffn_hidden);
    assert_eq!(second.bytes - first.bytes, (4 * dw_elems) as f64);
}

#[test]
fn recompute_allocates_what_memory_bytes_says_and_counts_its_extra_forward_ops() {
    use crate::model::forward::{least_recompute_that_fits, memory_bytes_with};
    use crate::model::Recompute;
    let c = small();
    let (mb, t) = (4, 64);
    let l = c.n_layers as u64;
    let extra = 4 + 4 + 4 * crate::backend::STATS_LEN;
    let counts: Vec<StepCount> = Recompute::ALL
        .into_iter()
        .map(|r| {
            let count = count_step_with(&c, mb, t, 1, None, r).unwrap();
            let (fixed, per_token) = memory_bytes_with(&c, COMPUTE_BYTES, true, None, r, StateDtype::F32);
            assert_eq!(count.allocated, fixed + per_token * mb * t + extra, "recompute {r}");
            count
        })
        .collect();
    let calls = |i: usize, f: Family| counts[i].ledger.calls.get(&f).copied().unwrap_or(0);
    let flops = |i: usize, f: Family| counts[i].ledger.family(f).flops;
    assert!(counts[0].allocated > counts[1].allocated && counts[1].allocated > counts[2].allocated);
    // mlp: one more gate/up GEMM and SwiGLU per layer; layer: the attention block as well
    // (the attention norm, qkv, attention, o, and the residual add with the FFN norm).
    assert_eq!(calls(1, Family::Matmul), calls(0, Family::Matmul) + l);
    assert_eq!(calls(1, Family::Swiglu), calls(0, Family::Swiglu) + l);
    assert_eq!(calls(1, Family::Rmsnorm), calls(0, Family::Rmsnorm));
    assert_eq!(calls(2, Family::Matmul), calls(0, Family::Matmul) + 3 * l);
    assert_eq!(calls(2, Family::Swiglu), calls(0, Family::Swiglu) + l);
    assert_eq!(calls(2, Family::Rmsnorm), calls(0, Family::Rmsnorm) + 2 * l);
    assert_eq!(calls(2, Family::FlashAttention), calls(0, Family::FlashAttention) + l);
    assert!(flops(0, Family::Matmul) < flops(1, Family::Matmul));
    assert!(flops(1, Family::Matmul) < flops(2, Family::Matmul));

    // auto: the least recompute with which the micro-batch fits.
    let need = |r| {
        let (fixed, per_token) = memory_bytes_with(&c, COMPUTE_BYTES, true, None, r, StateDtype::F32);
        (fixed + per_token * mb * t) / 9 * 10 + 1000
    };
    for r in Recompute::ALL {
        let (chosen, fits) =
            least_recompute_that_fits(&c, COMPUTE_BYTES, t, need(r), None, mb, StateDtype::F32).unwrap();
        assert_eq!(chosen, r, "with {} bytes free", need(r));
        assert!(fits >= mb);
    }
    assert_eq!(
        least_recompute_that_fits(
            &c,
            COMPUTE_BYTES,
            t,
            need(Recompute::Layer) / 2,
            None,
            mb,
            StateDtype::F32
        ),
        None
    );
}

#[test]
fn the_plan_reports_the_recompute_and_auto_chooses_the_least_that_fits() {
    use crate::model::{Recompute, RecomputeChoice};
    let c = small();
    let args = PlanArgs { recompute: RecomputeChoice::Auto, ..plan_args("tiny", 2, 64) };
    let auto = plan_for(&c, &args).unwrap();
    assert_eq!(auto.recompute, Recompute::None, "a tiny model fits without recompute");
    assert!(render(&auto).contains("recompute    none (chosen by auto)"), "{}", render(&auto));
    let layer =
        plan_for(&c, &PlanArgs { recompute: RecomputeChoice::Fixed(Recompute::Layer), ..args }).unwrap();
    assert_eq!(layer.recompute, Recompute::Layer);
    assert!(layer.memory.activations < auto.memory.activations);
    assert!(layer.total_flops > auto.total_flops);
    assert!(layer.memory.largest_micro_batch > auto.memory.largest_micro_batch);
    let options: Vec<Recompute> = layer.memory.recompute_options.iter().map(|o| o.recompute).collect();
    assert_eq!(options, Recompute::ALL);
    assert_eq!(layer.memory.recompute_options[2].largest_micro_batch, layer.memory.largest_micro_batch);
}

/// `sft plan`'s defaults for `model` at `micro_batch` rows of `seq_len` on an H100.
fn plan_args(model: &str, micro_batch: usize, seq_len: usize) -> PlanArgs {
    PlanArgs {
        model: model.into(),
        gpu: "h100".into(),
        micro_batch: micro_batch.into(),
        seq_len: Some(seq_len),
        grad_accum: 1,
        dropout: None,
        json: false,
        calibrate_from: None,
        profiled_steps: 1,
        write_calibration: None,
        lora: Default::default(),
        optimizer_state: Default::default(),
        recompute: Default::default(),
        gpus: 1,
        link: None,
        zero_stage: 0,
        grad_overlap: true,
    }
}

/// `--gpus N --grad-overlap false`: one rank's step plus a ring all-reduce of the fp32 gradients
/// over the link, after the backward.
#[test]
fn data_parallel_adds_the_ring_all_reduce_of_the_gradients() {
    let c = small();
    let one = plan_for(&c, &plan_args("small", 2, 64)).unwrap();
    assert!(one.data_parallel.is_none());
    assert!(!render(&one).contains("data parallelism"));
    let no_overlap = PlanArgs { grad_overlap: false, ..plan_args("small", 2, 64) };
    let eight = plan_for(&c, &PlanArgs { gpus: 8, ..no_overlap.clone() }).unwrap();
    let dp = eight.data_parallel.as_ref().expect("8 GPUs");
    assert_eq!(dp.link.bus_bandwidth, 360e9, "an H100's default link is NVLink");
    let bytes = 4.0 * c.n_params() as f64;
    assert_eq!(dp.gradient_bytes, bytes);
    let ring = 2.0 * 7.0 / 8.0 * bytes / 360e9 + 14.0 * devices::ALL_REDUCE_HOP_S;
    assert!(
        (dp.collective_seconds - ring).abs() < 1e-12 * ring.max(1.0),
        "{} vs {ring}",
        dp.collective_seconds
    );
    // The rank's own step is the single-GPU step; the whole all-reduce is exposed, exactly as
    // before the overlap was modelled.
    assert_eq!(eight.step_seconds, one.step_seconds);
    assert!((dp.step_seconds - (one.step_seconds + ring)).abs() < 1e-12);
    assert_eq!(dp.step_seconds, one.step_seconds + dp.collective_seconds);
    assert_eq!(dp.collective_seconds, devices::all_reduce_seconds(bytes, 8, &dp.link));
    assert!(!dp.overlapped && dp.buckets == 0 && dp.backward_seconds == 0.0);
    assert_eq!((dp.exposed_collective_seconds, dp.all_gather_seconds), (dp.collective_seconds, 0.0));
    assert_eq!(dp.tokens_per_step, 8 * one.tokens_per_step);
    assert!((dp.tokens_per_s - dp.tokens_per_step as f64 / dp.step_seconds).abs() < 1e-6 * dp.tokens_per_s);
    assert!(dp.scaling > 0.0 && dp.scaling < 1.0);
    let text = render(&eight);
    assert!(text.contains("Estimated data parallelism (8 GPUs"), "{text}");
    assert!(text.contains("after the backward (not overlapped)") && !text.contains("exposed"), "{text}");
    // A slower link costs more; a bandwidth can be given in GB/s.
    let ib =
        plan_for(&c, &PlanArgs { gpus: 8, link: Some("infiniband".into()), ..no_overlap.clone() }).unwrap();
    assert!(ib.data_parallel.unwrap().collective_seconds > dp.collective_seconds);
    let given =
        plan_for(&c, &PlanArgs { gpus: 2, link: Some("100".into()), ..plan_args("small", 2, 64) }).unwrap();
    assert_eq!(given.data_parallel.unwrap().link.bus_bandwidth, 100e9);
    // Numbers as written: no sign dropped, exponents kept.
    let h100 = devices::device("h100").unwrap();
    assert_eq!(devices::link(h100, "2.5e2").unwrap().bus_bandwidth, 250e9);
    for bad in ["-5", "1e-300", "0", "inf", "NaN", "5 GB"] {
        let err = devices::link(h100, bad).unwrap_err().to_string();
        assert!(err.contains("--link") && err.contains("GB/s"), "{bad}: {err}");
    }
}

/// Steps too large to count are refused with the flags named, before anything is allocated for
/// them (a huge --micro-batch once aborted on a failed allocation, or panicked on overflow).
#[test]
fn a_step_too_large_to_count_is_refused() {
    let c = small();
    for (mb, accum) in [(usize::MAX, 1), (10_000_000, 1), (2, usize::MAX), (2, 1_000_000_000)] {
        let args = PlanArgs { grad_accum: accum, ..plan_args("small", mb, 64) };
        let err = plan_for(&c, &args).unwrap_err().to_string();
        assert!(err.contains("--micro-batch") && err.contains("--grad-accum"), "{mb} × {accum}: {err}");
    }
    let auto =
        PlanArgs { micro_batch: MicroBatch::Auto, grad_accum: usize::MAX / 2, ..plan_args("small", 1, 64) };
    assert!(plan_for(&c, &auto).is_err());
}

/// The communication queue: bucket k starts when it is ready and bucket k − 1 is done.
#[test]
fn the_bucket_queue_starts_each_bucket_when_ready_and_after_the_previous() {
    // 1..1.5, 2..2.5, 3..5: the last bucket's 2 s are all exposed past the backward's end at 3.
    let finish = bucket_queue_finish(&[1.0, 2.0, 3.0], &[0.5, 0.5, 2.0]);
    assert_eq!(finish, 5.0);
    assert_eq!(finish - 3.0, 2.0);
    // Slow buckets queue behind each other: 1..3, 3..5, 5..7.
    assert_eq!(bucket_queue_finish(&[1.0, 2.0, 3.0], &[2.0, 2.0, 2.0]), 7.0);
    // Fast ones hide all but the last's own time.
    assert_eq!(bucket_queue_finish(&[1.0, 2.0, 3.0], &[0.25, 0.25, 0.25]), 3.25);
    // Ready at once: the sum.
    assert_eq!(bucket_queue_finish(&[0.0, 0.0], &[1.0, 2.0]), 3.0);
}

/// The buckets are the trainer's: the final norm (and an untied lm_head), the layers from the
/// top, the embeddings; every parameter in exactly one.
#[test]
fn gradient_buckets_follow_the_backward_and_cover_every_parameter() {
    for tied in [false, true] {
        let c = ModelConfig { tie_embeddings: tied, ..small() };
        let b = gradient_buckets(&c, 1.0, 4.0, 0.5);
        assert_eq!(b.len(), c.n_layers + 2);
        assert_eq!(b.iter().map(|b| b.0).sum::<usize>(), c.n_params(), "tied {tied}");
        let head = c.d_model + if tied { 0 } else { c.vocab_size * c.d_model };
        assert_eq!(b[0], (head, 1.0));
        assert_eq!(*b.last().unwrap(), (c.vocab_size * c.d_model, 0.5));
        let lens = crate::model::params::param_lens(&c);
        for (k, l) in (0..c.n_layers).rev().enumerate() {
            assert_eq!(b[1 + k], (lens[1 + 6 * l..7 + 6 * l].iter().sum(), 4.0 / c.n_layers as f64));
        }
    }
}

/// The counting backend keeps the last micro-batch's backward apart, in the stretches after
/// which the buckets are ready.
#[test]
fn the_last_micro_batchs_backward_is_counted_in_its_bucket_stretches() {
    let c = small();
    for recompute in [Recompute::None, Recompute::Layer] {
        let accum = 3;
        let count = count_step_with(&c, 2, 32, accum, None, recompute).unwrap();
        let b = count.backward.expect("a backward");
        let calls = |l: &Ledger, f: Family| l.calls.get(&f).copied().unwrap_or(0);
        // The head: the fused lm-head + loss and the final norm's backward, no layer's op.
        assert_eq!(calls(&b.head, Family::CrossEntropy), 1);
        assert_eq!(calls(&b.head, Family::Rmsnorm), 1);
        assert_eq!(calls(&b.head, Family::FlashAttention), 0);
        // The layers: two norm backwards each (and the recomputed forward's two norms).
        let norms_per_layer = if recompute == Recompute::Layer { 4 } else { 2 };
        assert_eq!(calls(&b.layers, Family::Rmsnorm), (norms_per_layer * c.n_layers) as u64);
        assert_eq!(calls(&b.layers, Family::Embedding) + calls(&b.layers, Family::CrossEntropy), 0);
        assert_eq!(calls(&b.embedding, Family::Embedding), 1);
        assert_eq!(b.embedding.calls.len(), 1, "{:?}", b.embedding.calls);
        // Nothing of the optimizer, and one micro-batch's GEMMs: the backward's 4 FLOPs per
        // parameter and token plus the loss's forward logits (and a recomputed forward's).
        for l in [&b.head, &b.layers, &b.embedding] {
            assert_eq!(calls(l, Family::Adamw), 0);
            assert!(l.family(Family::Memory).syncs == 0);
        }
        let gemm = |l: &Ledger| l.kind(KernelKind::Gemm).flops;
        let step_gemm = gemm(&count.ledger);
        let tokens = (2 * 32) as f64;
        let head_params = (c.vocab_size * c.d_model) as f64;
        let layer_params = (matmul_params(&c) - c.vocab_size * c.d_model) as f64;
        assert_eq!(gemm(&b.head), 6.0 * head_params * tokens);
        if recompute == Recompute::None {
            assert_eq!(gemm(&b.layers), 4.0 * layer_params * tokens);
        } else {
            // Plus the recomputed forward (all but `down`, whose output the backward needs not).
            assert!(gemm(&b.layers) > 4.0 * layer_params * tokens);
        }
        // Every micro-batch: the layers' forward, then what the backward stretches counted.
        let per_micro_batch = 2.0 * layer_params * tokens + gemm(&b.head) + gemm(&b.layers);
        assert_eq!(step_gemm, accum as f64 * per_micro_batch);
    }
    // LoRA's backward has no embedding stretch.
    let lora = crate::model::lora::LoraConfig::default();
    let count = count_step_with(&c, 2, 32, 1, Some(&lora), Recompute::None).unwrap();
    let b = count.backward.unwrap();
    assert!(b.embedding.calls.is_empty() && !b.layers.calls.is_empty());
}

/// With full fine-tuning the gradients' collective overlaps the last micro-batch's backward,
/// bucket by bucket: never worse than after it, the all-gather of ZeRO-1 never hidden.
#[test]
fn the_overlapped_collective_hides_behind_the_backward() {
    let c = small();
    let base = PlanArgs { gpus: 8, grad_accum: 2, ..plan_args("small", 2, 64) };
    let on = plan_for(&c, &base).unwrap();
    let off = plan_for(&c, &PlanArgs { grad_overlap: false, ..base.clone() }).unwrap();
    let (dp, old) = (on.data_parallel.as_ref().unwrap(), off.data_parallel.as_ref().unwrap());
    assert!(dp.overlapped && dp.buckets == c.n_layers + 2);
    assert!(dp.exposed_collective_seconds > 0.0);
    assert!(dp.exposed_collective_seconds <= dp.collective_seconds);
    // The same bytes, with a ring's hop latency per bucket: at worst (a backward too short to
    // hide anything) the step pays the buckets' extra latency.
    let extra_hops = (dp.buckets - 1) as f64 * 14.0 * devices::ALL_REDUCE_HOP_S;
    assert!((dp.collective_seconds - (old.collective_seconds + extra_hops)).abs() < 1e-12);
    assert_eq!(dp.step_seconds, on.step_seconds + dp.exposed_collective_seconds);
    assert!(dp.step_seconds <= old.step_seconds + extra_hops + 1e-12);
    // The overlapped backward is one micro-batch's, a part of the step's time.
    let optimizer: f64 = on
        .families
        .iter()
        .filter(|f| matches!(f.family, Family::Adamw | Family::GlobalNorm))
        .map(|f| f.seconds)
        .sum();
    assert!(dp.backward_seconds > 0.0);
    assert!(dp.backward_seconds < (on.step_seconds - optimizer) / on.grad_accum as f64 + 1e-12);
    // The exposed tail is at least the last bucket's (the embeddings', ready at the end).
    let last = devices::all_reduce_seconds(4.0 * (c.vocab_size * c.d_model) as f64, 8, &dp.link);
    assert!(dp.exposed_collective_seconds >= last - 1e-15);
    let text = render(&on);
    assert!(
        text.contains("of which")
            && text.contains("exposed (bucketed by layer, overlapped with the last micro-batch's backward)")
            && text.contains(&format!("in {} buckets", c.n_layers + 2)),
        "{text}"
    );
    assert!(on.notes.iter().any(|n| n.contains("NCCL") && n.contains("slower")), "{:?}", on.notes);
    assert!(!off.notes.iter().any(|n| n.starts_with("gradient overlap")), "{:?}", off.notes);

    // A backward far shorter than the communication: most of it is exposed.
    let slow = plan_for(&c, &PlanArgs { gpus: 16, link: Some("1".into()), ..base.clone() }).unwrap();
    let dp = slow.data_parallel.as_ref().unwrap();
    assert!(
        dp.collective_seconds > 10.0 * dp.backward_seconds,
        "{} vs {}",
        dp.collective_seconds,
        dp.backward_seconds
    );
    assert!(dp.exposed_collective_seconds >= dp.collective_seconds - dp.backward_seconds - 1e-12);
    assert!(dp.exposed_collective_seconds > 0.95 * dp.collective_seconds);

    // ZeRO-1: the buckets' reduce into the owners overlaps; the weights' all-gather never does.
    for overlap in [true, false] {
        let zero = plan_for(&c, &PlanArgs { zero_stage: 1, grad_overlap: overlap, ..base.clone() }).unwrap();
        let dp = zero.data_parallel.as_ref().unwrap();
        assert_eq!(dp.overlapped, overlap);
        let gather = devices::ring_pass_seconds(2.0 * c.n_params() as f64, 8, &dp.link);
        assert_eq!(dp.all_gather_seconds, gather);
        assert!(dp.step_seconds >= zero.step_seconds + gather);
        assert!(dp.exposed_collective_seconds <= dp.collective_seconds - gather + 1e-15);
        if overlap {
            assert_eq!(dp.step_seconds, zero.step_seconds + dp.exposed_collective_seconds + gather);
            let text = render(&zero);
            assert!(text.contains("weight all-gather") && text.contains("after the optimizer"), "{text}");
        } else {
            assert_eq!(dp.step_seconds, zero.step_seconds + dp.collective_seconds);
        }
    }

    // LoRA is never overlapped.
    let lora = crate::lora::LoraArgs { lora: true, ..Default::default() };
    let p = plan_for(&c, &PlanArgs { lora, ..base.clone() }).unwrap();
    let dp = p.data_parallel.as_ref().unwrap();
    assert!(!dp.overlapped && dp.buckets == 0);
    assert_eq!(dp.exposed_collective_seconds, dp.collective_seconds);
    assert_eq!(dp.step_seconds, p.step_seconds + dp.collective_seconds);
    assert!(render(&p).contains("after the backward (not overlapped)"));
    assert!(p.notes.iter().any(|n| n.starts_with("LoRA: the adapters' gradients")), "{:?}", p.notes);

    // One GPU: nothing to overlap, whatever the flag.
    assert!(plan_for(&c, &PlanArgs { gpus: 1, ..base }).unwrap().data_parallel.is_none());
}

/// A model whose backward outlasts its buckets' latency scales better with the overlap, with or
/// without ZeRO-1, and hides most of the all-reduce over NVLink.
#[test]
fn the_overlap_scales_the_1_3b_better() {
    let big = ModelConfig::preset("simplellama-1.3b").unwrap();
    let base =
        PlanArgs { gpus: 8, grad_accum: 4, dropout: Some(0.0), ..plan_args("simplellama-1.3b", 8, 2048) };
    for zero_stage in [0, 1] {
        let on = plan_for(&big, &PlanArgs { zero_stage, ..base.clone() }).unwrap();
        let off = plan_for(&big, &PlanArgs { zero_stage, grad_overlap: false, ..base.clone() }).unwrap();
        let (dp, old) = (on.data_parallel.unwrap(), off.data_parallel.unwrap());
        assert!(dp.scaling > old.scaling, "ZeRO-{zero_stage}: {} vs {}", dp.scaling, old.scaling);
        assert!(dp.exposed_collective_seconds < 0.25 * old.exposed_collective_seconds);
        // What stays exposed is mostly the embeddings' bucket, ready at the backward's end.
        assert!(dp.exposed_collective_seconds < 0.1 * dp.backward_seconds);
    }
}

#[test]
fn data_parallel_refusals_name_the_flag_and_lora_reduces_its_adapters() {
    let c = small();
    let base = plan_args("small", 2, 64);
    let err = |args: PlanArgs| format!("{:#}", plan_for(&c, &args).unwrap_err());
    let e = err(PlanArgs { link: Some("pcie".into()), ..base.clone() });
    assert!(e.contains("--link") && e.contains("--gpus"), "{e}");
    let e = err(PlanArgs { gpus: 0, ..base.clone() });
    assert!(e.contains("--gpus"), "{e}");
    let e = err(PlanArgs { gpus: 2, link: Some("carrier pigeon".into()), ..base.clone() });
    assert!(e.contains("carrier pigeon") && e.contains("nvlink"), "{e}");
    let e = err(PlanArgs { gpus: 2, link: Some("nvlink".into()), gpu: "rtx4090".into(), ..base.clone() });
    assert!(e.contains("NVLink") && e.contains("pcie"), "{e}");
    // LoRA reduces the adapters' gradients only.
    let lora = PlanArgs { gpus: 2, lora: crate::lora::LoraArgs { lora: true, ..Default::default() }, ..base };
    let p = plan_for(&c, &lora).unwrap();
    assert_eq!(p.data_parallel.unwrap().gradient_bytes, 4.0 * p.trainable_params as f64);
    assert!(p.trainable_params < c.n_params() / 10);
    // Without NVLink the default link is PCIe.
    let p = plan_for(&c, &PlanArgs { gpus: 2, gpu: "rtx4090".into(), ..plan_args("small", 2, 64) }).unwrap();
    assert!(p.data_parallel.unwrap().link.name.starts_with("PCIe"));
}

/// `--zero-stage 1`: the largest rank's share of the master weights and moments, and a
/// reduce-scatter of the fp32 gradients plus an all-gather of the bf16 weights.
#[test]
fn zero1_splits_the_state_and_gathers_bf16_weights() {
    let c = small();
    // After the backward, as one reduce-scatter and all-gather (the overlap has its own test).
    let args = PlanArgs { grad_overlap: false, ..plan_args("small", 2, 64) };
    let plain = plan_for(&c, &PlanArgs { gpus: 4, ..args.clone() }).unwrap();
    let zero = plan_for(&c, &PlanArgs { gpus: 4, zero_stage: 1, ..args }).unwrap();
    let (pm, zm) = (&plain.memory, &zero.memory);
    assert_eq!((pm.optimizer_shards, zm.optimizer_shards), (1, 4));
    // The largest share: a quarter of the state, give or take a tensor.
    let lens = crate::model::params::param_lens(&c);
    let largest_tensor = *lens.iter().max().unwrap();
    assert!(
        zm.master_and_moments >= pm.master_and_moments / 4,
        "{} of {}",
        zm.master_and_moments,
        pm.master_and_moments
    );
    assert!(zm.master_and_moments <= pm.master_and_moments / 4 + 12 * largest_tensor);
    assert_eq!(pm.total - zm.total, pm.master_and_moments - zm.master_and_moments);
    let dp = zero.data_parallel.as_ref().unwrap();
    let n = c.n_params() as f64;
    assert_eq!((dp.zero_stage, dp.weight_bytes), (1, 2.0 * n));
    let ring = 3.0 / 4.0 * (4.0 * n + 2.0 * n) / 360e9 + 6.0 * devices::ALL_REDUCE_HOP_S;
    assert!(
        (dp.collective_seconds - ring).abs() < 1e-12 * ring.max(1.0),
        "{} vs {ring}",
        dp.collective_seconds
    );
    // One rank's AdamW moves its share's bytes only.
    let adamw = |p: &Plan| p.families.iter().find(|f| f.family == Family::Adamw).unwrap().bytes;
    let share = *crate::dist::OptimizerShards::new(&lens, 4, 0).unwrap().counts().iter().max().unwrap()
        as f64
        / lens.iter().sum::<usize>() as f64;
    assert!((adamw(&zero) - share * adamw(&plain)).abs() < 1e-6 * adamw(&plain));
    assert!(zero.step_seconds < plain.step_seconds);
    // 6 bytes per parameter moved instead of the all-reduce's 8.
    assert!(dp.collective_seconds < plain.data_parallel.as_ref().unwrap().collective_seconds);
    let text = render(&zero);
    assert!(
        text.contains("ZeRO-1 collectives") && text.contains("ZeRO-1: the largest of 4 ranks' shares"),
        "{text}"
    );
    let err = |args: PlanArgs| format!("{:#}", plan_for(&c, &args).unwrap_err());
    assert!(err(PlanArgs { zero_stage: 1, ..plan_args("small", 2, 64) }).contains("--gpus above 1"));
    assert!(err(PlanArgs { gpus: 2, zero_stage: 2, ..plan_args("small", 2, 64) }).contains("not built"));
}

/// `--micro-batch auto`: the trainer's choice (`plan_batches` on the plan's own memory check),
/// with recompute resolved first, as the trainer does.
#[test]
fn micro_batch_auto_is_the_trainers_choice() {
    use crate::train::config::{plan_batches, MicroBatch};
    let c = small();
    let p =
        plan_for(&c, &PlanArgs { micro_batch: MicroBatch::Auto, grad_accum: 2, ..plan_args("small", 1, 64) })
            .unwrap();
    assert_eq!((p.micro_batch, p.grad_accum), (32, 2), "a small model fits SimpleLLaMA's 32 rows");
    assert_eq!(p.tokens_per_step, 64 * 64);
    assert!(p.notes.iter().any(|n| n.starts_with("micro_batch auto: 32 × grad_accum 2")), "{:?}", p.notes);

    // The 1.3B on 24 GB with bf16 moments and layer recompute: some rows fit, not 32.
    let big = ModelConfig::preset("simplellama-1.3b").unwrap();
    let args = PlanArgs {
        model: "simplellama-1.3b".into(),
        gpu: "rtx4090".into(),
        micro_batch: MicroBatch::Auto,
        optimizer_state: crate::backend::StateDtype::Bf16,
        recompute: RecomputeChoice::Fixed(Recompute::Layer),
        ..plan_args("simplellama-1.3b", 1, 2048)
    };
    let p = plan_for(&big, &args).unwrap();
    let largest = p.memory.largest_micro_batch;
    assert!((1..32).contains(&largest), "{largest}");
    let want = plan_batches(MicroBatch::Auto, 1, Some(largest));
    assert_eq!((p.micro_batch, p.grad_accum), (want.micro_batch, want.grad_accum));
    assert_eq!(p.micro_batch * p.grad_accum, 32, "the step keeps its 32 examples");
    assert!(p.memory.fits);
    // Calibration needs the profiled shape.
    let e = format!("{:#}", calibrate_from(&args, std::path::Path::new("none.csv")).unwrap_err());
    assert!(e.contains("--micro-batch") && e.contains("auto"), "{e}");
}
