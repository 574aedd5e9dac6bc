#!/usr/bin/env python3
"""The training step of `sft bench`, done by PyTorch + Hugging Face transformers, in one table
with ours: the baseline DESIGN §4 compares against (at least 1.5x its tokens/s on the same GPU).

PyTorch side: `LlamaForCausalLM` built from the same model config (fp32 parameters, forward and
backward under `torch.autocast(bfloat16)` on CUDA, plain f32 on the CPU,
`attn_implementation="sdpa"`), `torch.optim.AdamW`
with `fused=True` on CUDA (lr 1e-5, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0,
the same tokens per step split into the same micro-batches (gradient accumulation), random
tokens with every target supervised. `--compile` adds `torch.compile(model)`.
Ours: `sft bench` with the same arguments and `--dropout 0` (transformers' Llama has no
residual dropout, so neither side drops anything).

Both report tokens/s over the timed steps after the warm-up ones, MFU as `sft bench` counts it
(6 FLOPs per matmul parameter + causal attention 6·L·d·T per token, against the H100 SXM dense
bf16 peak of 989.4 TFLOP/s) and peak device memory.

    python3 scripts/bench_torch_train.py --sft target/release/sft             # from the repo
    python3 .gpu/bench_torch_train.py --sft .gpu/sft --compile                # on the GPU box
    python3 scripts/bench_torch_train.py --config tiny --device cpu \\
        --tokens-per-step 2048 --seq-len 256 --micro-batch 4 --steps 2        # a CPU smoke run

`--markdown FILE` also writes the table as markdown (`gpu_check.sh all` gathers it into
results.md); `--no-torch` prints sft's row alone; `--sft-timeout S` bounds `sft bench`.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

H100_BF16_PEAK = 989.4e12

# The presets of src/model/config.rs (`sft bench --config` accepts the same names).
PRESETS = {
    "simplellama-1.3b": dict(vocab_size=8192, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                             ffn_hidden=5632, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048,
                             tie_embeddings=False),
    "tiny": dict(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176,
                 norm_eps=1e-5, rope_theta=10000.0, max_seq_len=512, tie_embeddings=False),
}


def model_config(name):
    if name in PRESETS:
        return dict(PRESETS[name])
    with open(name) as f:
        c = json.load(f)
    c = c.get("sft", c)  # a checkpoint's config.json or a model-config file
    return dict(PRESETS["simplellama-1.3b"], **{k: v for k, v in c.items() if k in PRESETS["tiny"]})


def flops_per_token(c, t):
    hd = c["d_model"] // c["n_heads"]
    qkv = (c["n_heads"] + 2 * c["n_kv_heads"]) * hd
    per_layer = c["d_model"] * qkv + c["n_heads"] * hd * c["d_model"] + 3 * c["d_model"] * c["ffn_hidden"]
    matmul = c["n_layers"] * per_layer + c["vocab_size"] * c["d_model"]
    return 6.0 * matmul + 6.0 * c["n_layers"] * c["n_heads"] * hd * t


def bench_torch(c, args, t, micro, accum):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    hf = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=c["ffn_hidden"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_kv_heads"], rms_norm_eps=c["norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_seq_len"], tie_word_embeddings=c["tie_embeddings"],
        attention_dropout=0.0, use_cache=False,
    )
    model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa").to(dev)
    model.train()
    step_model = torch.compile(model) if args.compile else model
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=cuda)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    batches = [torch.randint(1, c["vocab_size"], (micro, t + 1), generator=gen).to(dev) for _ in range(accum)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed, loss_value = 0.0, float("nan")
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for seq in batches:
            inputs, targets = seq[:, :-1], seq[:, 1:]
            # bf16 autocast on the GPU; f32 on the CPU, as `sft bench --device cpu` computes.
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = step_model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1))
            (loss / accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(total) / accum  # synchronizes
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed += time.perf_counter() - start
    peak = torch.cuda.max_memory_reserved() if cuda else None
    name = "torch+transformers" + (" compile" if args.compile else "")
    return dict(impl=name, seconds_per_step=timed / args.steps, memory=peak, loss=loss_value,
                n_params=sum(p.numel() for p in model.parameters()))


def bench_sft(args):
    cmd = [args.sft, "bench", "--config", args.config, "--tokens-per-step", str(args.tokens_per_step),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--dropout", "0"]
    if args.seq_len:
        cmd += ["--seq-len", str(args.seq_len)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    # stderr passes through (the backend's messages); a timeout leaves the rest of the budget to torch.
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, timeout=args.sft_timeout).stdout
    sys.stdout.write(out)
    field = lambda pattern: re.search(pattern, out, re.M)
    secs = float(field(r"^time per step\s+([0-9.]+) s").group(1))
    mem = field(r"^device memory\s+([0-9.]+) GiB in use")
    dev = field(r"^device\s+(.+)$").group(1).strip()
    return dict(impl="sft (%s)" % dev, seconds_per_step=secs,
                memory=float(mem.group(1)) * (1 << 30) if mem else None,
                loss=float(field(r"^loss\s+([0-9.]+)").group(1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="simplellama-1.3b", help="a preset or a model-config JSON file")
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cuda or cpu (both sides)")
    ap.add_argument("--seed", type=int, default=89)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformers model")
    ap.add_argument("--sft", default=None, help="the sft binary; omitted: PyTorch only")
    ap.add_argument("--sft-timeout", type=int, default=None, help="seconds `sft bench` may take")
    ap.add_argument("--no-torch", action="store_true", help="sft only (where PyTorch is missing)")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args()

    c = model_config(args.config)
    t = args.seq_len or c["max_seq_len"]
    rows = args.tokens_per_step // t
    if t > c["max_seq_len"] or rows < args.micro_batch or rows % args.micro_batch:
        ap.error("--tokens-per-step must be a multiple of --micro-batch rows of --seq-len (<= max_seq_len)")
    accum = rows // args.micro_batch
    tokens = rows * t
    # Each side is tried on its own, so that one failing still leaves the other's row.
    results, notes = [], []
    if args.sft:
        try:
            results.append(bench_sft(args))
        except subprocess.TimeoutExpired:
            notes.append("sft bench timed out after %s s" % args.sft_timeout)
        except (subprocess.CalledProcessError, AttributeError, ValueError) as e:
            notes.append("sft bench failed: %s" % e)
    if args.no_torch:
        notes.append("PyTorch not run (--no-torch)")
    else:
        try:
            results.append(bench_torch(c, args, t, args.micro_batch, accum))
        except Exception as e:  # ImportError, CUDA out of memory, ...: still print sft's row
            notes.append("PyTorch + transformers failed: %s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""))

    fpt = flops_per_token(c, t)
    setup = ("model %s, %d tokens per step = %d x %d rows x %d tokens, %d timed steps after %d warm-up, %s"
             % (args.config, tokens, accum, args.micro_batch, t, args.steps, args.warmup, args.device))
    print()
    print(setup)
    print("%-26s %12s %12s %8s %14s %10s %8s" % ("impl", "s/step", "tokens/s", "MFU", "peak mem GiB",
                                                "loss", "vs torch"))
    torch_rows = [r for r in results if r["impl"].startswith("torch")]
    base = torch_rows[0]["seconds_per_step"] if torch_rows else None
    md = ["%s; MFU against the H100 SXM dense bf16 peak (989.4 TFLOP/s), %.2f GFLOP per token." % (setup, fpt / 1e9),
          "", "| impl | s/step | tokens/s | MFU | peak mem GiB | loss | vs torch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tps = tokens / r["seconds_per_step"]
        mem = "%.2f" % (r["memory"] / (1 << 30)) if r["memory"] else "-"
        vs = "%.2fx" % (base / r["seconds_per_step"]) if base else "-"
        cells = (r["impl"], "%.4f" % r["seconds_per_step"], "%.0f" % tps, "%.1f%%" % (100.0 * tps * fpt / H100_BF16_PEAK),
                 mem, "%.4f" % r["loss"], vs)
        print("%-26s %12s %12s %8s %14s %10s %8s" % cells)
        md.append("| " + " | ".join(cells) + " |")
    for note in notes:
        print(note)
    if args.markdown:
        md += [""] + ["%s." % n.rstrip(".") for n in notes]
        with open(args.markdown, "w") as f:
            f.write("\n".join(md).rstrip() + "\n")
        sft_rows = [r for r in results if r["impl"].startswith("sft")]
        with open(args.markdown + ".headline", "w") as f:
            if sft_rows:
                r = sft_rows[0]
                tps = tokens / r["seconds_per_step"]
                f.write("sft %.0f tokens/s, MFU %.1f%%%s\n" % (tps, 100.0 * tps * fpt / H100_BF16_PEAK,
                                                          ", %.2fx torch" % (base / r["seconds_per_step"]) if base else ""))
            else:
                f.write("no sft row\n")
    return 1 if notes and not (args.no_torch and len(notes) == 1) else 0


if __name__ == "__main__":
    sys.exit(main())
