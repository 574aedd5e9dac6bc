#!/usr/bin/env python3
"""Checks `sft inspect --json` against SimpleLLaMA's `tokenize_and_pad_data`, row for row.

A Python reimplementation of SimpleLLaMA's SFT batching (its prompt format, x/y strings encoded
separately, y left-padded so that it ends where x ends, right padding) is run on a chat file in
file order, and compared with the batches `sft inspect --no-shuffle --json` prints.

    pip install tokenizers          # not needed by the project itself, nor in CI
    cargo build --release
    python3 scripts/check_inspect_simplellama.py [--data chat.json] [--fixed-padding]

Without --data a varied chat file is generated (multi-turn, CUSTOM and custom prompts, empty
replies, unicode, a few examples longer than max_seq_len).

Long examples: SimpleLLaMA's code keeps an example whose x is longer than max_seq_len and
keeps its last max_seq_len tokens (cutting the system prompt off); DESIGN §1 and `sft` skip
such an example instead (counted, warned about at 10%). `--long-x skip` (default) compares with
that rule; `--long-x truncate` runs SimpleLLaMA's code as written, which agrees wherever no x
is longer than max_seq_len.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import warnings

from tokenizers import Tokenizer

from simplellama import DEFAULT_SYSTEM_PROMPT, SPECIALS, default_tokenizer


def escape(text):
    """sft escapes special-token strings in text (U+200B after the first character)."""
    for s in SPECIALS:
        text = text.replace(s, s[0] + "\u200b" + s[1:])
    return text


def format_xy(record):
    """SimpleLLaMA's training strings: x = the whole conversation, y = final reply + <EOA>."""
    system = record["Template"][0]
    if system == "CUSTOM":
        system = DEFAULT_SYSTEM_PROMPT
    turns = [
        f"<SOU>{escape(u)}<EOU>\n<SOA>{escape(a)}<EOA>" for u, a in zip(record["User"], record["Assistant"])
    ]
    x = f"<SOT>{escape(system)}<EOT>\n\n" + "\n\n".join(turns)
    y = f"{escape(record['Assistant'][-1])}<EOA>"
    return x, y


def tokenize_and_pad_data(batch, tokenizer, pad_id, max_seq_len, dynamic, long_x):
    """SimpleLLaMA's function, on lists instead of tensors (see the module doc for `long_x`)."""
    assert len(batch) != 0, "Given batch data should not be empty!"
    x_data, y_data = [], []
    max_len = 0
    exceed_len = 0
    for x, y in batch:
        x = tokenizer.encode(x).ids
        y = tokenizer.encode(y).ids
        if long_x == "skip":
            if len(x) > max_seq_len:
                exceed_len += 1
                continue
        elif len(y) >= max_seq_len:
            exceed_len += 1
            continue
        x = x[-max_seq_len:]
        num_left_pad = len(x) - len(y) - 1
        if num_left_pad < 0:
            warnings.warn("Target response longer than input window. Skipping.")
            continue
        max_len = max(max_len, len(x))
        x_data.append(x)
        y_data.append([pad_id] * num_left_pad + y)
    assert len(x_data) != 0, f"All examples has been skipped ({max_seq_len=})"
    max_len = max_len if dynamic else max_seq_len
    xs = [x + [pad_id] * (max_len - len(x)) for x in x_data]
    ys = [y + [pad_id] * (max_len - len(y)) for y in y_data]
    return xs, ys


WORDS = (
    "the a of gravity force water Paris France capital answer question hello how are you fine 2+2 4 "
    "équation naïve 日本 🙂 x=1; def f(): return {} [1, 2] \n \t -- ... ! ? , ' \""
).split(" ")


def generate(path, n, seed):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, k)))

    records = []
    for i in range(n):
        turns = rng.randint(1, 3)
        records.append(
            {
                "Template": ["CUSTOM" if rng.random() < 0.5 else text(10)],
                "User": [text(30) for _ in range(turns)],
                "Assistant": ["" if rng.random() < 0.05 else text(200 if i % 50 == 7 else 40) for _ in range(turns)],
            }
        )
    with open(path, "w") as f:
        json.dump(records, f)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=os.path.join(root, "target/release/sft"))
    found = default_tokenizer(root)
    ap.add_argument("--tokenizer", default=found, help="SimpleLLaMA's bpe_8k.json")
    ap.add_argument("--data", help="chat file in SimpleLLaMA's schema (default: generated)")
    ap.add_argument("--n", type=int, default=400, help="conversations to generate")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fixed-padding", action="store_true")
    ap.add_argument("--long-x", choices=["skip", "truncate"], default="skip")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    data = args.data or os.path.join(tmp.name, "chat.json")
    if not args.data:
        generate(data, args.n, args.seed)
    with open(data) as f:
        records = json.load(f)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    pad_id = tokenizer.token_to_id("<PAD>")

    cmd = [args.sft, "inspect", "--data", data, "--tokenizer", args.tokenizer, "--max-seq-len",
           str(args.max_seq_len), "--batch-size", str(args.batch_size), "--no-shuffle", "--json"]
    if args.fixed_padding:
        cmd.append("--fixed-padding")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ours = [json.loads(line) for line in out.splitlines() if line.strip()]

    pairs = [format_xy(r) for r in records]
    n_batches = len(pairs) // args.batch_size  # the last partial batch is dropped
    theirs = []
    for b in range(n_batches):
        batch = pairs[b * args.batch_size:(b + 1) * args.batch_size]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs, ys = tokenize_and_pad_data(batch, tokenizer, pad_id, args.max_seq_len, not args.fixed_padding,
                                           args.long_x)
        theirs.append({"inputs": xs, "targets": ys})

    rows = sum(len(t["inputs"]) for t in theirs)
    mismatches = 0
    if len(ours) != len(theirs):
        print(f"MISMATCH: {len(ours)} batches from sft, {len(theirs)} from SimpleLLaMA's function")
        mismatches += 1
    for b, (o, t) in enumerate(zip(ours, theirs)):
        for key in ("inputs", "targets"):
            if o[key] != t[key]:
                mismatches += 1
                bad = [r for r in range(max(len(o[key]), len(t[key])))
                       if r >= len(o[key]) or r >= len(t[key]) or o[key][r] != t[key][r]]
                print(f"MISMATCH: batch {b} {key}: rows {bad[:5]}")
    mode = "fixed" if args.fixed_padding else "dynamic"
    status = "OK" if mismatches == 0 else "FAILED"
    print(f"{status}: {len(records)} conversations, {len(theirs)} batches, {rows} rows compared "
          f"({mode} padding, max_seq_len {args.max_seq_len}, batch size {args.batch_size}, long x: {args.long_x})")
    sys.exit(0 if mismatches == 0 else 1)


if __name__ == "__main__":
    main()
