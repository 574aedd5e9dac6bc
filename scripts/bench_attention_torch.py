#!/usr/bin/env python3
"""Causal attention at B·T = 16k tokens, 32 heads of 64, bf16: PyTorch's flash SDPA next to ours.

PyTorch: scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION),
is_causal=True, layout (B, H, T, 64); forward and forward+backward timed with CUDA events.
Ours: `sft bench-attention` (the release binary copied into .gpu/ by `scripts/gpu_check.sh
build`; no Rust needed on the GPU box), same shapes, printed in the same table.

FLOPs (both): forward 4·B·H·T²·hd / 2 (causal), backward 2.5× the forward.

    python3 scripts/bench_attention_torch.py                 # from the repo, or
    python3 .gpu/bench_attention_torch.py --sft .gpu/sft     # on the GPU box
"""

import argparse
import os
import shutil
import subprocess
import sys


def flops(batch, t, heads, hd):
    fwd = 4.0 * batch * heads * t * t * hd / 2.0
    return fwd, 2.5 * fwd


def header():
    return "%-22s %5s %4s %4s %10s %10s %12s %14s" % (
        "impl", "T", "B", "hd", "fwd ms", "fwd TF/s", "fwd+bwd ms", "fwd+bwd TF/s")


def row(name, t, batch, hd, heads, fwd_s, fwd_bwd_s):
    f, b = flops(batch, t, heads, hd)
    return "%-22s %5d %4d %4d %10.3f %10.1f %12.3f %14.1f" % (
        name, t, batch, hd, fwd_s * 1e3, f / fwd_s / 1e12, fwd_bwd_s * 1e3, (f + b) / fwd_bwd_s / 1e12)


def bench_torch(seq_lens, tokens, heads, hd, iters):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    print("torch %s on %s" % (torch.__version__, torch.cuda.get_device_name(dev)), file=sys.stderr)
    lines = []
    for t in seq_lens:
        batch = max(tokens // t, 1)
        q, k, v = (torch.randn(batch, heads, t, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(batch, heads, t, hd, device=dev, dtype=torch.bfloat16)

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            out = fwd()
            q.grad = k.grad = v.grad = None
            out.backward(dout)

        def timed(fn):
            with torch.no_grad() if fn is fwd else torch.enable_grad():
                for _ in range(3):
                    fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters

        lines.append(row("torch sdpa flash", t, batch, hd, heads, timed(fwd), timed(fwd_bwd)))
    return lines


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_sft = next((p for p in (os.path.join(here, "sft"), os.path.join(here, "..", ".gpu", "sft"),
                                    os.path.join(here, "..", "target", "release", "sft")) if os.path.isfile(p)), None)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sft", default=default_sft, help="the sft binary (default: next to this script, .gpu/, target/release/)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--scalar", action="store_true", help="also time our scalar kernels")
    ap.add_argument("--dq", default="ordered", choices=["ordered", "deferred", "deferred-q64", "atomic", "both", "all"],
                    help="our flash backward's dQ accumulation (deferred, deferred-q64: the ordered bits; atomic: not "
                         "deterministic; both: ordered and atomic; all: a row each)")
    ap.add_argument("--mma", default="mma", choices=["mma", "wgmma", "both"],
                    help="our flash kernels' instructions: mma.sync, wgmma (compute capability 9.0) or both")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args()
    seq_lens = [int(x) for x in args.seq_lens.split(",")]

    print(header())
    status, rows, notes = 0, [], []
    if not args.no_torch:
        try:
            for line in bench_torch(seq_lens, args.tokens, args.heads, args.head_dim, args.iters):
                print(line, flush=True)
                rows.append(line)
        except Exception as e:  # ImportError, no CUDA device, ...: ours still runs
            notes.append("PyTorch failed: %s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""))
            status = 1
    paths = ["auto"] + (["scalar"] if args.scalar else [])
    sft = args.sft or shutil.which("sft")
    if sft is None:
        notes.append("sft binary not found (build it with scripts/gpu_check.sh build, pass --sft)")
        paths, status = [], 1
    for path in paths:
        cmd = [sft, "bench-attention", "--seq-lens", args.seq_lens, "--tokens", str(args.tokens), "--heads",
               str(args.heads), "--head-dim", str(args.head_dim), "--iters", str(args.iters), "--path", path]
        if path == "auto":
            cmd += ["--dq", args.dq, "--mma", args.mma]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        # Same format: skip our header line, keep the rows.
        for line in res.stdout.splitlines()[1:]:
            print(line, flush=True)
            rows.append(line)
        if res.returncode != 0:
            notes.append("%s failed with status %d" % (" ".join(cmd), res.returncode))
            status = 1
    for note in notes:
        print(note, file=sys.stderr)
    if args.markdown:
        write_markdown(args, rows, notes)
    return status


def write_markdown(args, rows, notes):
    """The table as markdown, and a one-line headline (ours over torch at each T, fwd+bwd)."""
    cells = [[line[:22].strip()] + line[22:].split() for line in rows]
    md = ["Causal attention, bf16, %d tokens per call (B = tokens / T), %d heads of %d; FLOPs: forward "
          "4·B·H·T²·hd/2, backward 2.5x; %d timed calls after 3." % (args.tokens, args.heads, args.head_dim, args.iters),
          "", "| impl | T | B | hd | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    md += [""] + ["%s." % n.rstrip(".") for n in notes]
    with open(args.markdown, "w") as f:
        f.write("\n".join(md).rstrip() + "\n")
    fwd_bwd = {}
    for c in cells:
        if len(c) == 8:
            fwd_bwd.setdefault(c[1], {})[c[0]] = float(c[6])
    # One ratio per sft tensor-core row ("sft flash (mma)", and "sft flash (atomic dQ)",
    # "sft flash (deferred)", "sft flash (deferred64)" with --dq both or all; "sft wgmma (...)"
    # with --mma wgmma or both).
    def label(k):
        if k == "sft flash (mma)":
            return ""
        return (k[len("sft flash "):] if k.startswith("sft flash ") else k[len("sft "):]) + " "
    ratios = ["T=%s %s%.2fx" % (t, label(k), v["torch sdpa flash"] / v[k])
              for t, v in fwd_bwd.items() if "torch sdpa flash" in v for k in v
              if k.startswith("sft ") and k != "sft scalar"]
    with open(args.markdown + ".headline", "w") as f:
        f.write(("fwd+bwd speed vs torch: " + ", ".join(ratios) if ratios else "no comparison") + "\n")


if __name__ == "__main__":
    sys.exit(main())
