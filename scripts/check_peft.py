#!/usr/bin/env python3
"""Checks that a LoRA adapter of ours is a Hugging Face PEFT adapter: the logits `sft logits
--adapter` prints for a fixed id sequence against those of base + adapter in another
implementation.

    cargo build --release
    python3 scripts/check_peft.py --make-tiny
    python3 scripts/check_peft.py --base DIR --adapter DIR [--ids 1,2,3]

References (--reference):
  peft     `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)`
           (needs `pip install torch transformers peft`; not needed by the project nor CI)
  numpy    scripts/check_hf_logits.py's float64 Llama, on the base's Hugging Face weights with
           each adapter folded in as PEFT defines it: W + lora_alpha / r · lora_B @ lora_A,
           reading adapter_config.json and adapter_model.safetensors by PEFT's names. It never
           looks at sft's internal layout. Needs numpy only.
  auto     peft when importable, else numpy (default).

Prints the maximum relative error (max |ours - ref| / max |ref|) and exits 1 above --tol
(default 1e-4).

--make-tiny checks two adapters on `sft init` bases of the tiny preset (adjacent-pairs RoPE, so
the q/k row permutation to Hugging Face's order is exercised): one written here, by PEFT's
names, with random A and B on every projection (sft's reader), and one trained by `sft demo
--lora` for a few steps over the base it trains first (sft's writer).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_hf_logits as hf  # noqa: E402

REPO = hf.REPO
PREFIX = "base_model.model."


def sft_logits(sft, base, adapter, ids):
    out = subprocess.run(
        [sft, "logits", "--checkpoint", base, "--adapter", adapter, "--ids", ",".join(map(str, ids)),
         "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return np.array(json.loads(out)["logits"], dtype=np.float64)


def merged_hf_weights(base, adapter):
    """The base's Hugging Face tensors with the adapter folded in, as PEFT's LoRA computes it."""
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        raise SystemExit("this reference implements plain LoRA only")
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = hf.read_weights(base)
    lora = hf.read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))
    folded = 0
    for name, a in lora.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[len(PREFIX):-len(".lora_A.weight")]
        b = lora[f"{PREFIX}{module}.lora_B.weight"]
        w = f"{module}.weight"
        if w not in weights:
            raise SystemExit(f"{adapter}: {name} targets {w}, which the base does not have")
        weights[w] = weights[w] + scale * (b @ a)
        folded += 1
    if folded == 0:
        raise SystemExit(f"{adapter}: no lora_A tensors")
    return weights


def numpy_logits(base, adapter, ids):
    weights = merged_hf_weights(base, adapter)
    original = hf.read_weights
    hf.read_weights = lambda _ckpt: weights
    try:
        return hf.numpy_llama_logits(base, ids)
    finally:
        hf.read_weights = original


def peft_logits(base, adapter, ids):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    return out.double().numpy()


def have_peft():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return True
    except Exception:
        return False


def check(sft, base, adapter, ids, reference, tol):
    ours = sft_logits(sft, base, adapter, ids)
    if reference == "auto":
        reference = "peft" if have_peft() else "numpy"
    ref = peft_logits(base, adapter, ids) if reference == "peft" else numpy_logits(base, adapter, ids)
    plain = hf.sft_logits(sft, base, ids)
    moved = np.abs(ours - plain).max() / max(np.abs(plain).max(), 1e-30)
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)
    ok = err <= tol and moved > 10 * tol
    print(
        f"{adapter} on {base}: {reference}: max relative error {err:.3e} over {ours.shape} logits; "
        f"the adapter moves the logits by {moved:.3e} ({'ok' if ok else 'FAIL'})"
    )
    return ok


def write_safetensors(path, tensors):
    header, body, offset = {}, b"", 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        body += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + body)


def random_adapter(base, out, rank=4, alpha=8.0, seed=0):
    """A PEFT adapter on every projection of `base`, with random A and B, by PEFT's names."""
    with open(os.path.join(base, "config.json")) as f:
        c = json.load(f)
    weights = hf.read_weights(base)
    rng = np.random.default_rng(seed)
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for m in modules:
            out_dim, in_dim = weights[f"model.layers.{layer}.{m}.weight"].shape
            key = f"{PREFIX}model.layers.{layer}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.3, (rank, in_dim))
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.3, (out_dim, rank))
    os.makedirs(out)
    write_safetensors(os.path.join(out, "adapter_model.safetensors"), tensors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": [m.split(".")[1] for m in modules],
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def make_tiny(sft, root):
    pairs = []
    base = os.path.join(root, "tiny")
    subprocess.run([sft, "init", "--model", "tiny", "--vocab-size", "300", "--out", base, "--seed", "3"],
                   check=True, capture_output=True)
    adapter = os.path.join(root, "random-adapter")
    random_adapter(base, adapter)
    pairs.append((base, adapter))
    demo = os.path.join(root, "demo")
    subprocess.run([sft, "demo", "--lora", "--out", demo, "--examples", "200", "--heldout", "4", "--steps", "20",
                    "--device", "cpu"], check=True, capture_output=True)
    latest = lambda run: os.path.join(demo, run, open(os.path.join(demo, run, "latest")).read().strip())
    pairs.append((latest("base-run"), latest("run")))
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the base checkpoint directory")
    ap.add_argument("--adapter", help="a PEFT adapter directory trained on --base")
    ap.add_argument("--make-tiny", action="store_true", help="check two tiny adapters")
    ap.add_argument("--ids", default="1,5,42,7,250,3,99,128,17,64")
    ap.add_argument("--reference", choices=["auto", "peft", "numpy"], default="auto")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--sft", default=os.path.join(REPO, "target", "release", "sft"))
    args = ap.parse_args()
    ids = [int(i) for i in args.ids.split(",")]
    pairs = [(args.base, args.adapter)] if args.base and args.adapter else []
    with tempfile.TemporaryDirectory() as tmp:
        if args.make_tiny:
            pairs += make_tiny(args.sft, tmp)
        if not pairs:
            ap.error("give --base DIR --adapter DIR, or --make-tiny")
        ok = all([check(args.sft, b, a, ids, args.reference, args.tol) for b, a in pairs])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
