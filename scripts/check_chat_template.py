#!/usr/bin/env python3
"""Compares sft's chat-template rendering with transformers' apply_chat_template.

For every template in tests/fixtures/templates (the real strings of Llama 3.1/3.2, TinyLlama,
SmolLM2 and Mistral) a synthetic byte-level tokenizer with the template's special tokens is
written (Llama 3's split regex, as tests/chat_template.rs builds it); `--model DIR` adds real
Hugging Face model directories (tokenizer.json + tokenizer_config.json) to the list. Each
conversation is rendered and tokenized by transformers (`apply_chat_template(tokenize=False)`,
then the tokenizer without added special tokens, as apply_chat_template(tokenize=True) does) and
by `sft inspect --json` (the rows the trainer sees): the token ids must be equal (which, with
the same tokenizer, means the rendered text is equal; differences print both decoded).
`--model` also takes a directory written by `sft export`, whose SimpleLLaMA-format template
must give the ids sft's own formatter gives.

Needs only `transformers` and `tokenizers` (no torch):
    pip install transformers
    cargo build --release
    python3 scripts/check_chat_template.py [--sft target/release/sft] [--model DIR ...]

Exits 1 on any difference. strftime_now: sft is given SOURCE_DATE_EPOCH=now, transformers uses
the clock, so both date Llama 3.2's system header today.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "templates"

SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|finetune_right_pad_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>",
]

TOKENS = {
    "llama3.2.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3.1.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "tinyllama.jinja": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "smollm2.jinja": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                      "pad_token": "<|im_end|>"},
    "mistral.jinja": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "  padded question \n"}, {"role": "assistant", "content": "\n  padded answer  "}],
    [{"role": "user", "content": "Ünïcödé — 日本語 😀?"}, {"role": "assistant", "content": "Oui, ça marche.\n\n- a\n- b"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
     {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}, {"role": "assistant", "content": ""}],
]


def byte_chars():
    out, n = [], 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            out.append(chr(b))
        else:
            n += 1
            out.append(chr(255 + n))
    return out


def synthetic_tokenizer():
    vocab = {c: i for i, c in enumerate(byte_chars())}
    added = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(SPECIALS)]
    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def model_dirs(tmp, extra):
    dirs = []
    for name, tokens in TOKENS.items():
        d = Path(tmp) / name.replace(".jinja", "")
        d.mkdir()
        (d / "tokenizer.json").write_text(json.dumps(synthetic_tokenizer()))
        config = dict(tokens, chat_template=(FIXTURES / name).read_text(),
                      tokenizer_class="PreTrainedTokenizerFast")
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        dirs.append((name, d))
    dirs.extend((str(Path(m)), Path(m)) for m in extra)
    return dirs


def sft_rows(sft, tokenizer, data, extra=()):
    """The token rows `sft inspect` shows: one conversation per batch of one, unpadded (a row
    of a dynamic batch of one is the whole example)."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(int(time.time())))
    out = subprocess.run([sft, "inspect", "--data", str(data), "--tokenizer", str(tokenizer), "--json",
                          "--no-shuffle", "--batch-size", "1", "--train-on", "all-assistant", *extra],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return [json.loads(line)["inputs"][0] for line in out.stdout.splitlines()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=str(ROOT / "target" / "release" / "sft"))
    ap.add_argument("--model", action="append", default=[], help="a Hugging Face model directory")
    args = ap.parse_args()
    try:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer
    except ImportError:
        print("transformers is not installed: pip install transformers", file=sys.stderr)
        return 2
    failures, compared, skipped = 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in model_dirs(tmp, args.model):
            hf = AutoTokenizer.from_pretrained(str(d))
            expected, convs = [], []
            for conv in CONVERSATIONS:
                try:
                    text = hf.apply_chat_template(conv, tokenize=False)
                except Exception as e:  # the template refuses it (Mistral and system messages)
                    print(f"{name}: transformers refuses a conversation ({e}); skipped")
                    skipped += 1
                    continue
                expected.append((text, hf(text, add_special_tokens=False)["input_ids"]))
                convs.append(conv)
            data = Path(tmp) / f"{d.name}-chat.jsonl"
            data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
            # A SimpleLLaMA-format export is also checked against sft's own formatter.
            formats = [("template", ())]
            if Tokenizer.from_file(str(d / "tokenizer.json")).token_to_id("<SOA>") is not None:
                formats.append(("simplellama formatter", ("--chat-format", "simplellama")))
            for label, extra in formats:
                try:
                    rows = sft_rows(args.sft, d / "tokenizer.json", data, extra)
                except RuntimeError as e:
                    print(f"{name} ({label}): sft failed: {e}")
                    failures += 1
                    continue
                for i, ((text, ids), row) in enumerate(zip(expected, rows)):
                    compared += 1
                    if row != ids:
                        failures += 1
                        theirs = hf.decode(ids, skip_special_tokens=False)
                        ours = hf.decode(row, skip_special_tokens=False)
                        print(f"{name} ({label}): conversation {i} differs\n  transformers: {theirs!r}\n  sft:          {ours!r}")
                print(f"{name} ({label}): {len(rows)} conversations compared")
    print(f"{compared} renderings compared, {failures} differences, {skipped} refused by transformers (the template raises) and skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
