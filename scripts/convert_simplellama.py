#!/usr/bin/env python3
"""Converts a SimpleLLaMA `.pth` checkpoint into an sft checkpoint directory.

    pip install torch numpy                      # not needed by the project itself, nor CI
    python3 scripts/convert_simplellama.py sft_3E_1234L_2048MSQ.pth --out ckpt \\
        [--tokenizer bpe_8k.json] [--n-heads 32] [--dropout 0.1]
    python3 scripts/convert_simplellama.py --self-test      # numpy only, see below

The output is what `sft init`/`sft train` write: model.safetensors (f32, Hugging Face Llama
names), config.json (LlamaForCausalLM fields plus an "sft" section with rope_style
"adjacent_pairs"), and tokenizer.json when --tokenizer is given. The directory is written as
OUT.tmp and renamed, so a failed run leaves no half-written checkpoint.

SimpleLLaMA's module names (its pretraining/llama_transformer.py) and where they go:

    embeddings.weight                          -> model.embed_tokens.weight
    decoder_blocks.L.norm1.weight              -> model.layers.L.input_layernorm.weight
    decoder_blocks.L.attention.qkv_linear.weight (3d x d)
                                               -> q_proj, k_proj, v_proj (see below)
    decoder_blocks.L.attention.out.weight      -> model.layers.L.self_attn.o_proj.weight
    decoder_blocks.L.norm2.weight              -> model.layers.L.post_attention_layernorm.weight
    decoder_blocks.L.ffwd.w1.weight            -> model.layers.L.mlp.gate_proj.weight (silu side)
    decoder_blocks.L.ffwd.w3.weight            -> model.layers.L.mlp.up_proj.weight
    decoder_blocks.L.ffwd.w2.weight            -> model.layers.L.mlp.down_proj.weight
    norm.weight                                -> model.norm.weight
    final_linear.weight                        -> lm_head.weight (SimpleLLaMA does not tie)

The fused qkv output is viewed as (B, T, H, 3*hd) and chunked, so its rows are q|k|v
interleaved per head: head h owns rows [3*hd*h, 3*hd*(h+1)), q first, then k, then v.

RoPE: SimpleLLaMA rotates adjacent pairs (2i, 2i+1) (Meta's form, via view_as_complex);
Hugging Face's Llama rotates (i, i + hd/2). Checkpoint files always hold Hugging Face's order,
so the q and k rows of each head are permuted: HF row j < hd/2 is Meta row 2j, HF row hd/2 + j
is Meta row 2j + 1. This mirrors `adjacent_to_half_split` in src/model/params.rs (and the
`permute` of transformers' convert_llama_weights_to_hf.py); sft reads the file back with the
inverse because the "sft" section says adjacent_pairs, and transformers reads it as it is.

Keys this script does not know (LoRA injections, MLA layers, anything else) are an error that
lists them: merge LoRA weights into the base weights first.

The checkpoint's "config" is SimpleLLaMA's pickled TrainingConfig; when the simple_llama package
is not importable a stand-in class receives its fields. Without a config, --n-heads is needed
(the shapes do not tell the head count).

--self-test (numpy only, no torch): builds random SimpleLLaMA weights, converts them with the
same code, and compares `sft logits` on the result with a float64 numpy forward pass written
from SimpleLLaMA's model definition (fused per-head qkv, complex-number adjacent-pair RoPE).
"""

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYER_KEY = re.compile(
    r"^decoder_blocks\.(\d+)\.(norm1|norm2|attention\.qkv_linear|attention\.out|ffwd\.w1|ffwd\.w2|ffwd\.w3)\.weight$"
)
TOP_KEYS = {"embeddings.weight", "norm.weight", "final_linear.weight"}


# ---- the conversion (numpy arrays in, Hugging Face tensors out) ------------------------------

def meta_to_hf_rows(w, n_heads, head_dim):
    """Per head, Meta's adjacent-pair row order -> Hugging Face's half-split order."""
    rows, cols = w.shape
    assert rows == n_heads * head_dim, (rows, n_heads, head_dim)
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def split_fused_qkv(w, n_heads, head_dim):
    """SimpleLLaMA's qkv_linear weight (3d, d), rows q|k|v per head -> q, k, v (d, d) each."""
    d3, cols = w.shape
    assert d3 == 3 * n_heads * head_dim, (w.shape, n_heads, head_dim)
    per_head = w.reshape(n_heads, 3, head_dim, cols)
    q, k, v = (per_head[:, i].reshape(n_heads * head_dim, cols) for i in range(3))
    return q, k, v


def strip_prefixes(state):
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def convert(state, n_heads):
    """SimpleLLaMA state dict (name -> float numpy array) -> (HF tensors, sizes)."""
    state = strip_prefixes(state)
    unknown = sorted(k for k in state if k not in TOP_KEYS and not LAYER_KEY.match(k))
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise SystemExit(f"unknown SimpleLLaMA keys: {shown}. LoRA weights must be merged first; MLA is not supported.")
    missing = sorted(TOP_KEYS - state.keys())
    if missing:
        raise SystemExit(f"missing SimpleLLaMA keys: {', '.join(missing)}")
    layers = sorted({int(LAYER_KEY.match(k).group(1)) for k in state if LAYER_KEY.match(k)})
    if layers != list(range(len(layers))) or not layers:
        raise SystemExit(f"decoder_blocks indices are not 0..n-1: {layers}")
    vocab, d = state["embeddings.weight"].shape
    if d % n_heads:
        raise SystemExit(f"n_embd {d} is not divisible by n_heads {n_heads}")
    hd = d // n_heads
    hidden = None
    hf = {"model.embed_tokens.weight": state["embeddings.weight"]}
    for layer in layers:
        src = lambda name: state[f"decoder_blocks.{layer}.{name}.weight"]
        dst = lambda name: f"model.layers.{layer}.{name}.weight"
        for name in ("norm1", "norm2", "attention.qkv_linear", "attention.out", "ffwd.w1", "ffwd.w2", "ffwd.w3"):
            if f"decoder_blocks.{layer}.{name}.weight" not in state:
                raise SystemExit(f"missing SimpleLLaMA key decoder_blocks.{layer}.{name}.weight")
        q, k, v = split_fused_qkv(src("attention.qkv_linear"), n_heads, hd)
        hf[dst("input_layernorm")] = src("norm1")
        hf[dst("self_attn.q_proj")] = meta_to_hf_rows(q, n_heads, hd)
        hf[dst("self_attn.k_proj")] = meta_to_hf_rows(k, n_heads, hd)
        hf[dst("self_attn.v_proj")] = v
        hf[dst("self_attn.o_proj")] = src("attention.out")
        hf[dst("post_attention_layernorm")] = src("norm2")
        hf[dst("mlp.gate_proj")] = src("ffwd.w1")
        hf[dst("mlp.up_proj")] = src("ffwd.w3")
        hf[dst("mlp.down_proj")] = src("ffwd.w2")
        hidden = src("ffwd.w1").shape[0]
    hf["model.norm.weight"] = state["norm.weight"]
    hf["lm_head.weight"] = state["final_linear.weight"]
    sizes = {"vocab_size": vocab, "d_model": d, "n_layers": len(layers), "n_heads": n_heads, "ffn_hidden": hidden}
    return hf, sizes


# ---- writing ----------------------------------------------------------------------------------

def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())


def config_json(sizes, eps, theta, max_seq_len, dropout, tokenizer_path):
    sft = {
        **sizes,
        "n_kv_heads": sizes["n_heads"],
        "norm_eps": eps,
        "rope_theta": theta,
        "rope_style": "adjacent_pairs",
        "max_seq_len": max_seq_len,
        "tie_embeddings": False,
        "dropout": dropout,
    }
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": sizes["vocab_size"],
        "hidden_size": sizes["d_model"],
        "intermediate_size": sizes["ffn_hidden"],
        "num_hidden_layers": sizes["n_layers"],
        "num_attention_heads": sizes["n_heads"],
        "num_key_value_heads": sizes["n_heads"],
        "head_dim": sizes["d_model"] // sizes["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "sft": sft,
        "sft_qk_order": "hf",  # q/k rows in Hugging Face's order (see src/train/checkpoint.rs)
    }
    if tokenizer_path:
        with open(tokenizer_path) as f:
            added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
        for field, token in (("bos_token_id", "<SOS>"), ("eos_token_id", "<EOA>"), ("pad_token_id", "<PAD>")):
            if token in added:
                cfg[field] = added[token]
    return cfg


def write_checkpoint(out, hf, cfg, tokenizer_path):
    if os.path.exists(out):
        raise SystemExit(f"{out} already exists: choose a new directory")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_safetensors(os.path.join(tmp, "model.safetensors"), hf)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
    os.rename(tmp, out)


# ---- reading the .pth -------------------------------------------------------------------------

class _ConfigStandIn:
    """Receives the fields of SimpleLLaMA's TrainingConfig when simple_llama is not importable."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.startswith("simple_llama"):
                return type(name, (_ConfigStandIn,), {})
            raise


def load_pth(path):
    import torch

    stand_in = types.ModuleType("simplellama_pickle")
    stand_in.Unpickler = _Unpickler
    stand_in.load = lambda f, **kw: _Unpickler(f, **kw).load()
    ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=stand_in)
    if isinstance(ckpt, dict) and "model_state_dict" in ckpt:
        state, config = ckpt["model_state_dict"], ckpt.get("config")
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        state, config = ckpt["model"], ckpt.get("config")
    elif isinstance(ckpt, dict) and all(hasattr(v, "shape") for v in ckpt.values()):
        state, config = ckpt, None
    else:
        keys = list(ckpt.keys())[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{path}: no model_state_dict found (top level: {keys})")
    state = {k: v.detach().float().cpu().numpy() for k, v in state.items()}
    return state, config


# ---- self-test: SimpleLLaMA's forward pass in numpy -------------------------------------------

def simplellama_logits(state, n_heads, eps, theta, ids):
    def rms(x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    d = state["embeddings.weight"].shape[1]
    hd = d // n_heads
    t = len(ids)
    angles = np.outer(np.arange(t), 1.0 / theta ** (np.arange(0, hd, 2) / hd))  # (t, hd/2)
    rot = np.exp(1j * angles)[:, None, :]

    def rope(x):  # (t, heads, hd): pairs (2i, 2i+1) as complex numbers
        c = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = c.real, c.imag
        return out

    mask = np.triu(np.full((t, t), -np.inf), k=1)
    h = state["embeddings.weight"][ids]
    n_layers = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    for layer in range(n_layers):
        p = lambda name: state[f"decoder_blocks.{layer}.{name}.weight"]
        x = rms(h, p("norm1"))
        qkv = (x @ p("attention.qkv_linear").T).reshape(t, n_heads, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
        q, k = rope(q).transpose(1, 0, 2), rope(k).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        y = (s @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(t, d)
        h = h + y @ p("attention.out").T
        x = rms(h, p("norm2"))
        g = x @ p("ffwd.w1").T
        h = h + ((g / (1 + np.exp(-g))) * (x @ p("ffwd.w3").T)) @ p("ffwd.w2").T
    return rms(h, state["norm.weight"]) @ state["final_linear.weight"].T


def self_test(sft):
    rng = np.random.default_rng(89)
    vocab, d, n_heads, n_layers, hidden, eps, theta = 97, 48, 4, 2, 128, 1e-5, 10000.0
    w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32).astype(np.float64)
    state = {"_orig_mod.embeddings.weight": w(vocab, d), "_orig_mod.norm.weight": 1 + w(d), "_orig_mod.final_linear.weight": w(vocab, d)}
    for layer in range(n_layers):
        p = f"_orig_mod.decoder_blocks.{layer}."
        state.update({
            p + "norm1.weight": 1 + w(d), p + "norm2.weight": 1 + w(d),
            p + "attention.qkv_linear.weight": w(3 * d, d), p + "attention.out.weight": w(d, d),
            p + "ffwd.w1.weight": w(hidden, d), p + "ffwd.w2.weight": w(d, hidden), p + "ffwd.w3.weight": w(hidden, d),
        })
    hf, sizes = convert(state, n_heads)
    ids = [1, 5, 42, 7, 96, 3, 60, 0, 17]
    ref = simplellama_logits(strip_prefixes(state), n_heads, eps, theta, ids)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ckpt")
        write_checkpoint(out, hf, config_json(sizes, eps, theta, 64, 0.0, None), None)
        run = subprocess.run([sft, "logits", "--checkpoint", out, "--ids", ",".join(map(str, ids)), "--device", "cpu"],
                             check=True, capture_output=True, text=True)
        ours = np.array(json.loads(run.stdout)["logits"])
        # Without the q/k permutation the same weights give other logits: the check can fail.
        hf_unpermuted = dict(hf)
        for layer in range(n_layers):
            q, k, _ = split_fused_qkv(strip_prefixes(state)[f"decoder_blocks.{layer}.attention.qkv_linear.weight"], n_heads, d // n_heads)
            hf_unpermuted[f"model.layers.{layer}.self_attn.q_proj.weight"] = q
            hf_unpermuted[f"model.layers.{layer}.self_attn.k_proj.weight"] = k
        bad = os.path.join(tmp, "unpermuted")
        write_checkpoint(bad, hf_unpermuted, config_json(sizes, eps, theta, 64, 0.0, None), None)
        run = subprocess.run([sft, "logits", "--checkpoint", bad, "--ids", ",".join(map(str, ids)), "--device", "cpu"],
                             check=True, capture_output=True, text=True)
        wrong = np.array(json.loads(run.stdout)["logits"])
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    err_wrong = np.abs(wrong - ref).max() / np.abs(ref).max()
    print(f"self-test: max relative error {err:.3e} (without the q/k permutation: {err_wrong:.3e})")
    return err < 1e-4 and err_wrong > 1e-3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pth", nargs="?", help="SimpleLLaMA checkpoint (.pth)")
    ap.add_argument("--out", help="the checkpoint directory to create")
    ap.add_argument("--tokenizer", help="tokenizer.json to copy into the checkpoint")
    ap.add_argument("--n-heads", type=int, help="default: the checkpoint's config")
    ap.add_argument("--eps", type=float, help="RMSNorm eps (default: config, else 1e-5)")
    ap.add_argument("--theta", type=float, help="RoPE theta (default: config, else 10000)")
    ap.add_argument("--max-seq-len", type=int, help="default: config, else 2048")
    ap.add_argument("--dropout", type=float, default=0.0, help="the 'sft' section's dropout (training only)")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--sft", default=os.path.join(REPO, "target", "release", "sft"))
    args = ap.parse_args()
    if args.self_test:
        sys.exit(0 if self_test(args.sft) else 1)
    if not args.pth or not args.out:
        ap.error("give a .pth file and --out DIR (or --self-test)")
    state, config = load_pth(args.pth)
    pick = lambda flag, attr, default: flag if flag is not None else getattr(config, attr, default)
    n_heads = pick(args.n_heads, "n_heads", None)
    if n_heads is None:
        raise SystemExit(f"{args.pth}: no config with n_heads in the checkpoint: pass --n-heads")
    if getattr(config, "use_mla", False):
        raise SystemExit(f"{args.pth}: config.use_mla is set: MLA checkpoints are not supported")
    hf, sizes = convert(state, int(n_heads))
    cfg = config_json(
        sizes,
        float(pick(args.eps, "eps", 1e-5)),
        float(pick(args.theta, "theta", 10000.0)),
        int(pick(args.max_seq_len, "max_seq_len", 2048)),
        args.dropout,
        args.tokenizer,
    )
    write_checkpoint(args.out, hf, cfg, args.tokenizer)
    print(f"wrote {args.out}: {sizes}")


if __name__ == "__main__":
    main()
