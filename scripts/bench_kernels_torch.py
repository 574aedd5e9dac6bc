#!/usr/bin/env python3
"""The cross-entropy and AdamW kernels next to PyTorch on the same shapes, and both sides' copy
bandwidth (the ceiling AdamW is judged against): one table.

Ours: `sft bench-kernels --json` (run first; its JSON names the shapes, so both sides use the
same ones): the fused lm_head + masked cross-entropy forward and backward, multi-tensor AdamW
over the 1.3B's 147 parameter tensors, a device-to-device copy.
PyTorch, on those shapes:
- `torch F.cross_entropy`: logits = x @ w.T for every row (bf16 on CUDA), then
  F.cross_entropy(logits.float(), targets, ignore_index=-100) and its backward (dx, dw): what a
  transformers model does, unsupervised rows included. `torch sup rows only` first selects the
  supervised rows (x[mask]), as our kernel does.
- `torch AdamW fused`: torch.optim.AdamW(fused=True) (foreach on the CPU) over fp32 parameters of
  the same tensor sizes (lr 1e-5, betas 0.9/0.95, weight decay 0.1).
- `torch copy_`: dst.copy_(src), fp32.

Conventions (src/bench_kernels.rs): cross-entropy FLOPs are 6·supervised·d·vocab (useful work)
for every row, whatever an implementation computes; AdamW bytes are each element's reads and
writes (ours 30 B: fp32 grad, master, m, v read, master, m, v written, bf16 parameter written;
torch's 28 B: fp32 parameter, grad, m, v read, parameter, m, v written); copy bytes are read +
write. Times: the median of --repeats calls, each between two device synchronizations, after
--warmup calls. "vs copy" is a bandwidth over the fastest copy in the table (the device's
measured ceiling; DESIGN §4 asks AdamW for 85% of it).

    python3 scripts/bench_kernels_torch.py --sft target/release/sft --device cpu   # tiny sizes
    python3 .gpu/bench_kernels_torch.py --sft .gpu/sft                             # on the GPU box
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

# The 1.3B (src/model/config.rs, simplellama-1.3b) and tiny presets' parameter tensors, in the
# order of src/model/params.rs's param_specs; used only when sft did not run.
PRESETS = {
    "simplellama-1.3b": dict(vocab=8192, d=2048, layers=24, heads=32, kv_heads=32, hidden=5632, tied=False),
    "tiny": dict(vocab=8192, d=64, layers=2, heads=4, kv_heads=2, hidden=176, tied=False),
}
FULL = dict(tokens=16384, d_model=2048, vocabs=[8192, 128256], adamw_config="simplellama-1.3b", copy_mib=1024,
            gemm=8192)
TINY = dict(tokens=128, d_model=64, vocabs=[512], adamw_config="tiny", copy_mib=4, gemm=64)


def tensor_lens(preset):
    c = PRESETS[preset]
    hd = c["d"] // c["heads"]
    qkv = (c["heads"] + 2 * c["kv_heads"]) * hd
    lens = [c["vocab"] * c["d"]]
    for _ in range(c["layers"]):
        lens += [c["d"], qkv * c["d"], c["d"] * c["heads"] * hd, c["d"], 2 * c["hidden"] * c["d"], c["d"] * c["hidden"]]
    lens.append(c["d"])
    if not c["tied"]:
        lens.append(c["vocab"] * c["d"])
    return lens


def is_supervised(i, f):
    return math.floor((i + 1) * f) > math.floor(i * f)


def fallback_shapes(sizes, supervised):
    s = dict(FULL if sizes == "full" else TINY)
    return dict(tokens=s["tokens"], d_model=s["d_model"], vocabs=s["vocabs"], supervised_fraction=supervised,
                supervised_rows=sum(is_supervised(i, supervised) for i in range(s["tokens"])),
                adamw_config=s["adamw_config"], adamw_tensor_lens=tensor_lens(s["adamw_config"]),
                copy_elems=s["copy_mib"] << 18, gemm=s["gemm"])


def header():
    return "%-22s %-20s %-34s %10s %14s %8s" % ("impl", "kernel", "shape", "ms", "rate", "vs copy")


def rate(t):
    if t.get("flops"):
        tf = t["flops"] / t["seconds"] / 1e12
        return "%.1f TF/s" % tf if tf >= 1 else "%.1f GF/s" % (tf * 1e3)
    return "%.0f GB/s" % (t["bytes"] / t["seconds"] / 1e9)


def share(t, copy_gbps):
    if t.get("flops") or not copy_gbps:
        return "-"
    return "%.0f%%" % (100.0 * t["bytes"] / t["seconds"] / 1e9 / copy_gbps)


def row(t, copy_gbps):
    return "%-22s %-20s %-34s %10.3f %14s %8s" % (t["implementation"], t["kernel"], t["shape"], t["seconds"] * 1e3,
                                                   rate(t), share(t, copy_gbps))


def run_sft(args):
    cmd = [args.sft, "bench-kernels", "--json", "--device", args.device, "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--supervised", str(args.supervised)]
    if args.sizes:
        cmd += ["--sizes", args.sizes]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.sft_timeout)
    except subprocess.TimeoutExpired:
        return None, "sft bench-kernels timed out after %d s" % args.sft_timeout
    if res.returncode != 0:
        return None, "sft bench-kernels failed with status %d (its error is above)" % res.returncode
    try:
        return json.loads(res.stdout), None
    except ValueError as e:
        return None, "sft bench-kernels printed no JSON (%s)" % e


def bench_torch(shapes, args):
    import torch
    import torch.nn.functional as F

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    print("torch %s on %s" % (torch.__version__, torch.cuda.get_device_name(dev) if cuda else "cpu"),
          file=sys.stderr, flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = "torch (%s)" % dev.type

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        sync()
        times = []
        for _ in range(max(args.repeats, 1)):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        n = len(times)
        return times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2]), times[0]

    out = []
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    n, d, s = shapes["tokens"], shapes["d_model"], shapes["supervised_rows"]
    dtype = torch.bfloat16 if cuda else torch.float32
    mask = torch.tensor([is_supervised(i, shapes["supervised_fraction"]) for i in range(n)], device=dev)
    for vocab in shapes["vocabs"]:
        x = (torch.rand(n, d, generator=gen) * 2 - 1).to(dev, dtype).requires_grad_()
        w = ((torch.rand(vocab, d, generator=gen) * 2 - 1) * 0.02).to(dev, dtype).requires_grad_()
        targets = torch.randint(1, vocab, (n,), generator=gen).to(dev)
        targets = torch.where(mask, targets, torch.full_like(targets, -100))

        def all_rows():
            x.grad = w.grad = None
            logits = x @ w.t()
            F.cross_entropy(logits.float(), targets, ignore_index=-100).backward()

        def sup_rows():
            x.grad = w.grad = None
            logits = x[mask] @ w.t()
            F.cross_entropy(logits.float(), targets[mask]).backward()

        for label, fn in (("F.cross_entropy", all_rows), ("CE sup rows only", sup_rows)):
            try:
                med, best = timed(fn)
            except RuntimeError as e:  # out of memory at the large vocabulary, say
                print("%s at vocab %d: %s" % (label, vocab, str(e).splitlines()[0]), file=sys.stderr)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            out.append(dict(implementation=name, kernel=label, shape="%dx%d V%d sup %d" % (n, d, vocab, s),
                            seconds=med, min_seconds=best, flops=6.0 * s * d * vocab, bytes=0.0))
        del x, w, targets
        if cuda:
            torch.cuda.empty_cache()

    lens = shapes["adamw_tensor_lens"]
    params = [torch.nn.Parameter((torch.rand(k, device=dev) * 2 - 1) * 0.02) for k in lens]
    for p in params:
        p.grad = (torch.rand(p.numel(), device=dev) * 2 - 1) * 0.02
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if cuda else {"foreach": True}))
    med, best = timed(opt.step)
    out.append(dict(implementation=name, kernel="AdamW fused" if cuda else "AdamW foreach",
                    shape="%d params, %d tensors" % (sum(lens), len(lens)), seconds=med, min_seconds=best,
                    flops=0.0, bytes=28.0 * sum(lens)))
    del opt, params
    if cuda:
        torch.cuda.empty_cache()

    src = torch.rand(shapes["copy_elems"], device=dev)
    dst = torch.empty_like(src)
    med, best = timed(lambda: dst.copy_(src))
    out.append(dict(implementation=name, kernel="copy_", shape="%d MiB f32" % (shapes["copy_elems"] >> 18),
                    seconds=med, min_seconds=best, flops=0.0, bytes=8.0 * shapes["copy_elems"]))
    del src, dst

    # The square GEMM (out = a @ b.T, as ours): the compute ceiling next to ours.
    g = shapes.get("gemm")
    if g:
        a = (torch.rand(g, g, generator=gen) * 2 - 1).to(dev, dtype)
        b = (torch.rand(g, g, generator=gen) * 2 - 1).to(dev, dtype)
        med, best = timed(lambda: a @ b.t())
        out.append(dict(implementation=name, kernel="torch matmul", shape="%dx%dx%d" % (g, g, g),
                        seconds=med, min_seconds=best, flops=2.0 * g ** 3, bytes=0.0))
    return out


def headline(rows, copy_gbps):
    parts = []
    sft_ce = [r for r in rows if r["implementation"].startswith("sft") and r["kernel"] == "lm_head+CE fwd+bwd"]
    for r in sft_ce:
        vocab = r["shape"].split()[1]
        torch_ce = [t for t in rows if t["kernel"] == "F.cross_entropy" and t["shape"] == r["shape"]]
        if torch_ce:
            parts.append("CE %s %.2fx torch" % (vocab, torch_ce[0]["seconds"] / r["seconds"]))
    for r in rows:
        if r["implementation"].startswith("sft") and r["kernel"].startswith("adamw") and copy_gbps:
            parts.append("%s %s of copy" % (r["kernel"], share(r, copy_gbps)))
    for r in rows:
        if r["implementation"].startswith("sft") and r["kernel"] == "matmul":
            torch_mm = [t for t in rows if t["kernel"] == "torch matmul" and t["shape"] == r["shape"]]
            parts.append("matmul %s %.1f TF/s%s" % (r["shape"], r["flops"] / r["seconds"] / 1e12,
                                                     " (torch %.1f)" % (torch_mm[0]["flops"] / torch_mm[0]["seconds"] / 1e12)
                                                     if torch_mm else ""))
    return ", ".join(parts) or "no sft rows"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_sft = next((p for p in (os.path.join(here, "sft"), os.path.join(here, "..", ".gpu", "sft"),
                                    os.path.join(here, "..", "target", "release", "sft")) if os.path.isfile(p)), None)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu (both sides)")
    ap.add_argument("--sizes", choices=["full", "tiny"], default=None,
                    help="default: full on cuda, tiny on the cpu")
    ap.add_argument("--supervised", type=float, default=0.5, help="share of supervised cross-entropy rows")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=89)
    ap.add_argument("--sft", default=default_sft, help="the sft binary (default: next to this script, .gpu/, target/release/)")
    ap.add_argument("--sft-timeout", type=int, default=120, help="seconds sft bench-kernels may take")
    ap.add_argument("--no-torch", action="store_true", help="ours only (where PyTorch is missing)")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args()
    sizes = args.sizes or ("full" if args.device == "cuda" else "tiny")

    status, notes, rows = 0, [], []
    report = None
    sft = args.sft or shutil.which("sft")
    if sft is None:
        notes.append("sft binary not found (build it with scripts/gpu_check.sh build, pass --sft)")
        status = 1
    else:
        args.sft = sft
        report, err = run_sft(args)
        if err:
            notes.append(err)
            status = 1
    shapes = report["shapes"] if report else fallback_shapes(sizes, args.supervised)
    if report:
        rows += report["timings"]
    if args.no_torch:
        notes.append("PyTorch not run (--no-torch)")
    else:
        try:
            rows += bench_torch(shapes, args)
        except ImportError as e:
            notes.append("PyTorch not run: %s" % e)
            status = 1

    # Ours, then torch, kernel by kernel.
    order = {"lm_head+CE fwd+bwd": 0, "F.cross_entropy": 0, "CE sup rows only": 0, "adamw": 1,
             "adamw bf16 moments": 1, "AdamW fused": 1, "AdamW foreach": 1, "copy": 2, "copy_": 2,
             "matmul": 3, "torch matmul": 3}
    rows.sort(key=lambda r: (order.get(r["kernel"], 3), r["shape"] if order.get(r["kernel"]) == 0 else "",
                             not r["implementation"].startswith("sft")))
    copies = [r["bytes"] / r["seconds"] / 1e9 for r in rows if r["kernel"] in ("copy", "copy_")]
    copy_gbps = max(copies) if copies else None
    device = report["device"] if report else args.device
    print()
    print("device %s; cross-entropy %d x %d, %d supervised rows (%.0f%%); AdamW over %s (%d tensors); "
          "median of %d calls after %d" % (device, shapes["tokens"], shapes["d_model"], shapes["supervised_rows"],
                                          100 * shapes["supervised_fraction"], shapes["adamw_config"],
                                          len(shapes["adamw_tensor_lens"]), args.repeats, args.warmup))
    print(header())
    for r in rows:
        print(row(r, copy_gbps))
    for note in notes:
        print(note)
    if args.markdown:
        lines = ["Device %s. Cross-entropy: %d rows of %d, %d supervised (%.0f%%), forward and backward; "
                 "FLOPs 6·supervised·d·vocab. AdamW: one step over the %s parameter tensors (%d tensors, %d "
                 "elements). Median of %d calls after %d warm-up. vs copy: bandwidth over the fastest copy "
                 "measured (%s)." % (device, shapes["tokens"], shapes["d_model"], shapes["supervised_rows"],
                                     100 * shapes["supervised_fraction"], shapes["adamw_config"],
                                     len(shapes["adamw_tensor_lens"]), sum(shapes["adamw_tensor_lens"]),
                                     args.repeats, args.warmup,
                                     "%.0f GB/s" % copy_gbps if copy_gbps else "none"),
                 "",
                 "| impl | kernel | shape | ms | rate | vs copy |",
                 "|---|---|---|---:|---:|---:|"]
        for r in rows:
            lines.append("| %s | %s | %s | %.3f | %s | %s |" % (r["implementation"], r["kernel"], r["shape"],
                                                              r["seconds"] * 1e3, rate(r), share(r, copy_gbps)))
        lines += [""] + ["%s." % n.rstrip(".") for n in notes]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines).rstrip() + "\n")
        with open(args.markdown + ".headline", "w") as f:
            f.write(headline(rows, copy_gbps) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
