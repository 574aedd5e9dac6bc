#!/usr/bin/env python3
"""Checks that a checkpoint of ours is a Hugging Face LlamaForCausalLM: the logits `sft logits`
prints for a fixed id sequence against those of an independent implementation.

    cargo build --release
    python3 scripts/check_hf_logits.py --make-tiny            # sft init two tiny random models
    python3 scripts/check_hf_logits.py --checkpoint DIR [--ids 1,2,3]

References (--reference):
  transformers  `LlamaForCausalLM.from_pretrained(dir, torch_dtype=torch.float32)`
                (needs `pip install torch transformers`; not needed by the project nor CI)
  numpy         a float64 re-implementation of transformers' Llama forward pass written from
                its definition (half-split `rotate_half` RoPE, `repeat_kv` grouped heads,
                RMSNorm, SwiGLU), reading config.json's Hugging Face fields and the
                safetensors files directly. It never looks at the "sft" section, so it sees the
                checkpoint as transformers would. Needs numpy only.
  auto          transformers when importable, else numpy (default).

Prints the maximum relative error (max |ours - ref| / max |ref|) and exits 1 above --tol
(default 1e-4).

--make-tiny writes four checkpoints with `sft init`: the `tiny` preset (adjacent-pairs RoPE,
untied, 4 heads sharing 2 KV heads: the q/k permutation to Hugging Face's order is exercised),
a tied half-split variant, and two with RoPE scaling (llama3 and linear).
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IDS = [1, 5, 42, 7, 250, 3, 99, 128, 17, 64]


def sft_logits(sft, ckpt, ids):
    out = subprocess.run(
        [sft, "logits", "--checkpoint", ckpt, "--ids", ",".join(map(str, ids)), "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return np.array(json.loads(out)["logits"], dtype=np.float64)


# ---- reading safetensors without the safetensors package -----------------------------------

def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        dtype = info["dtype"]
        if dtype == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dtype == "F16":
            arr = np.frombuffer(raw, dtype="<f2")
        elif dtype == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {dtype}; expected F32, BF16 or F16")
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out


def read_weights(ckpt):
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors(os.path.join(ckpt, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for file in files:
        weights.update(read_safetensors(os.path.join(ckpt, file)))
    return weights


# ---- transformers' Llama, in numpy ----------------------------------------------------------

def rms_norm(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_inv_freq(c, hd):
    """transformers' default, linear and llama3 RoPE frequencies (modeling_rope_utils), from
    either config layout: transformers 4's top-level rope_theta + rope_scaling, or 5's
    rope_parameters holding both."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind != "llama3":
        raise SystemExit(f"rope_type {kind!r} is not implemented by this reference")
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params.get("original_max_position_embeddings", c.get("max_position_embeddings"))
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return np.where(medium, smoothed, scaled)


def numpy_llama_logits(ckpt, ids):
    with open(os.path.join(ckpt, "config.json")) as f:
        c = json.load(f)
    w = read_weights(ckpt)
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    n_kv = c.get("num_key_value_heads", n_heads)
    hd = c.get("head_dim", d // n_heads)
    eps = c.get("rms_norm_eps", 1e-6)
    t = len(ids)
    inv_freq = rope_inv_freq(c, hd)
    freqs = np.outer(np.arange(t, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[None], np.sin(emb)[None]  # (1, t, hd)
    mask = np.triu(np.full((t, t), -np.inf), k=1)

    h = w["model.embed_tokens.weight"][ids]
    for layer in range(c["num_hidden_layers"]):
        p = lambda name: w[f"model.layers.{layer}.{name}.weight"]
        x = rms_norm(h, p("input_layernorm"), eps)
        q = (x @ p("self_attn.q_proj").T).reshape(t, n_heads, hd).transpose(1, 0, 2)
        k = (x @ p("self_attn.k_proj").T).reshape(t, n_kv, hd).transpose(1, 0, 2)
        v = (x @ p("self_attn.v_proj").T).reshape(t, n_kv, hd).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # repeat_kv: query head i reads KV head i // (n_heads / n_kv).
        k = np.repeat(k, n_heads // n_kv, axis=0)
        v = np.repeat(v, n_heads // n_kv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(t, n_heads * hd)
        h = h + a @ p("self_attn.o_proj").T
        x = rms_norm(h, p("post_attention_layernorm"), eps)
        g = x @ p("mlp.gate_proj").T
        h = h + ((g / (1.0 + np.exp(-g))) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return h @ head.T


def transformers_logits(ckpt, ids):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    return out.double().numpy()


def have_transformers():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return True
    except Exception:  # a broken torch install raises more than ImportError
        return False


def check(sft, ckpt, ids, reference, tol):
    ours = sft_logits(sft, ckpt, ids)
    if reference == "auto":
        reference = "transformers" if have_transformers() else "numpy"
    ref = transformers_logits(ckpt, ids) if reference == "transformers" else numpy_llama_logits(ckpt, ids)
    if ours.shape != ref.shape:
        print(f"{ckpt}: shape {ours.shape} from sft, {ref.shape} from {reference}")
        return False
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)
    ok = err <= tol
    print(f"{ckpt}: {reference}: max relative error {err:.3e} over {ours.shape} logits ({'ok' if ok else 'FAIL'})")
    return ok


def make_tiny(sft, root):
    dirs = []
    preset = os.path.join(root, "tiny-adjacent")
    subprocess.run([sft, "init", "--model", "tiny", "--vocab-size", "300", "--out", preset, "--seed", "3"],
                   check=True, capture_output=True)
    dirs.append(preset)
    cfg = {
        "vocab_size": 300, "d_model": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2,
        "ffn_hidden": 96, "rope_style": "half_split", "rope_theta": 500000.0, "norm_eps": 1e-6,
        "max_seq_len": 128, "tie_embeddings": True,
    }
    cfg_path = os.path.join(root, "tied.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    tied = os.path.join(root, "tiny-tied-half-split")
    subprocess.run([sft, "init", "--model", cfg_path, "--out", tied, "--seed", "4"], check=True, capture_output=True)
    dirs.append(tied)
    # Llama 3.1/3.2's frequency scaling: with head_dim 16 and an original context of 256, pairs
    # 0-2 keep their frequency, pair 3 is blended and pairs 4-7 are divided by the factor.
    scaled_cfg = dict(cfg, n_heads=4, rope_theta=10000.0, tie_embeddings=True, max_seq_len=1024,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    for name, scaling in [("llama3", None), ("linear", {"rope_type": "linear", "factor": 4.0})]:
        c = dict(scaled_cfg, rope_scaling=scaling or scaled_cfg["rope_scaling"])
        path = os.path.join(root, f"{name}.json")
        with open(path, "w") as f:
            json.dump(c, f)
        out = os.path.join(root, f"tiny-rope-{name}")
        subprocess.run([sft, "init", "--model", path, "--out", out, "--seed", "5"], check=True, capture_output=True)
        dirs.append(out)
    return dirs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory (repeatable)")
    ap.add_argument("--make-tiny", action="store_true", help="also check two tiny random checkpoints")
    ap.add_argument("--ids", default=",".join(map(str, DEFAULT_IDS)))
    ap.add_argument("--reference", choices=["auto", "transformers", "numpy"], default="auto")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--sft", default=os.path.join(REPO, "target", "release", "sft"))
    args = ap.parse_args()
    ids = [int(i) for i in args.ids.split(",")]
    dirs = list(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if args.make_tiny:
            dirs += make_tiny(args.sft, tmp)
        if not dirs:
            ap.error("give --checkpoint DIR or --make-tiny")
        ok = all([check(args.sft, d, ids, args.reference, args.tol) for d in dirs])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
