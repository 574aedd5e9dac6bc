#!/usr/bin/env python3
"""Times `sft prepare` against a Python `tokenizers` pipeline on the same chat file and cores.

The Python pipeline does what SimpleLLaMA's data preparation does, as fast as the library
allows: `json.load`, the same prompt format, and `Tokenizer.encode_batch` over all training
texts (x only; SimpleLLaMA also encodes y, which would double its work). `sft prepare` does
more: streaming parse, formatting, tokenization with supervision, and writing the shards.
Each runs in its own process; the wall time and the peak RSS of that process are reported.

    pip install tokenizers
    cargo build --release
    python3 scripts/compare_prepare.py [--data chat.json | --mb 40] [--threads N]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from simplellama import DEFAULT_SYSTEM_PROMPT, SPECIALS, default_tokenizer

PYTHON_PIPELINE = r'''
import json, sys, time, resource
from tokenizers import Tokenizer
data, tok_path = sys.argv[1], sys.argv[2]
DEFAULT = sys.argv[3]
SPECIALS = json.loads(sys.argv[4])
def escape(t):
    if "<" in t:
        for s in SPECIALS:
            t = t.replace(s, s[0] + "\u200b" + s[1:])
    return t
t0 = time.perf_counter()
tok = Tokenizer.from_file(tok_path)
with open(data) as f:
    records = json.load(f)
xs = []
for r in records:
    system = r["Template"][0]
    system = DEFAULT if system == "CUSTOM" else system
    turns = [f"<SOU>{escape(u)}<EOU>\n<SOA>{escape(a)}<EOA>" for u, a in zip(r["User"], r["Assistant"])]
    xs.append(f"<SOT>{escape(system)}<EOT>\n\n" + "\n\n".join(turns))
encs = tok.encode_batch(xs, add_special_tokens=False)
n_tokens = sum(len(e.ids) for e in encs)
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "tokens": n_tokens, "peak_rss_kb": rss}))
'''

# Runs a command as a child and prints its peak RSS (ru_maxrss of the children of this wrapper).
RSS_WRAPPER = r'''
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t0
if p.returncode != 0:
    sys.stderr.write(p.stdout + p.stderr); sys.exit(p.returncode)
print(json.dumps({"seconds": dt, "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stdout": p.stdout}))
'''

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their has been if more when will would who so no can what out up about "
    "into than them some could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against "
    "go came right used take three gravity photosynthesis algorithm Paris équation 2+2=4 def f(x): return x*2 "
    "{'a': [1, 2]} 1999 3.14159 naïve 日本語 🙂 -- ... ! ? , ;"
).split(" ")


def generate(path, megabytes, seed):
    rng = random.Random(seed)
    vocab = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 12)))
                     for _ in range(20000)]

    def text(lo, hi):
        words = rng.choices(vocab, k=rng.randint(lo, hi))
        out = []
        for w in words:
            out.append(w)
            r = rng.random()
            if r < 0.06:
                out[-1] += "."
            elif r < 0.08:
                out[-1] += ",\n"
        return " ".join(out)

    target = megabytes * 1_000_000
    size = 0
    with open(path, "w") as f:
        f.write("[")
        first = True
        while size < target:
            turns = rng.randint(1, 3)
            rec = {
                "Template": ["CUSTOM" if rng.random() < 0.7 else text(5, 30)],
                "User": [text(5, 80) for _ in range(turns)],
                "Assistant": [text(20, 250) for _ in range(turns)],
            }
            s = ("" if first else ",\n") + json.dumps(rec, ensure_ascii=False)
            first = False
            f.write(s)
            size += len(s.encode())
        f.write("]")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=os.path.join(root, "target/release/sft"))
    found = default_tokenizer(root)
    ap.add_argument("--tokenizer", default=found)
    ap.add_argument("--data", help="chat file in SimpleLLaMA's schema (default: generated)")
    ap.add_argument("--mb", type=int, default=40, help="size of the generated file")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    data = args.data
    if not data:
        data = os.path.join(tmp.name, "chat.json")
        generate(data, args.mb, 1)
    size_mb = os.path.getsize(data) / 1e6
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), RAYON_RS_NUM_CPUS=str(args.threads),
               TOKENIZERS_PARALLELISM="true")

    def run(cmd):
        p = subprocess.run([sys.executable, "-c", RSS_WRAPPER] + cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
        return json.loads(p.stdout)

    best_sft, best_py = None, None
    for _ in range(args.repeat):
        out = os.path.join(tmp.name, "prepared")
        r = run([args.sft, "prepare", "--data", data, "--tokenizer", args.tokenizer, "--out", out,
                 "--max-seq-len", "1000000000", "--threads", str(args.threads)])
        with open(os.path.join(out, "prepare.json")) as f:
            report = json.load(f)["report"]
        r["tokens"] = report["n_tokens"]
        if best_sft is None or r["seconds"] < best_sft["seconds"]:
            best_sft = r
        w = run([sys.executable, "-c", PYTHON_PIPELINE, data, args.tokenizer, DEFAULT_SYSTEM_PROMPT,
                 json.dumps(SPECIALS)])
        inner = json.loads(w["stdout"])
        w["tokens"] = inner["tokens"]
        if best_py is None or w["seconds"] < best_py["seconds"]:
            best_py = w

    if best_sft["tokens"] != best_py["tokens"]:
        print(f"WARNING: token counts differ: sft {best_sft['tokens']}, python {best_py['tokens']}")
    print(f"file: {size_mb:.1f} MB, {best_sft['tokens']} tokens, {args.threads} threads")
    print(f"{'pipeline':<44} {'seconds':>8} {'tokens/s':>12} {'peak RSS MB':>12}")
    for name, r in [("sft prepare (parse+format+tokenize+shards)", best_sft),
                    ("python tokenizers encode_batch (x only)", best_py)]:
        print(f"{name:<44} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>12,.0f} "
              f"{r['peak_rss_kb'] / 1024:>12.0f}")
    print(f"speedup: {best_py['seconds'] / best_sft['seconds']:.2f}x, "
          f"memory: {best_py['peak_rss_kb'] / best_sft['peak_rss_kb']:.2f}x less")


if __name__ == "__main__":
    main()
