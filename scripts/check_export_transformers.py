#!/usr/bin/env python3
"""Checks that what `sft export` writes is a model transformers serves as it is: load it with
`AutoTokenizer` / `AutoModelForCausalLM`, render prompts with its `chat_template`
(`apply_chat_template(..., add_generation_prompt=True)`), generate greedily, and compare with
sft on the checkpoint that was exported:

  - logits: `sft logits` on the checkpoint against transformers on the export, for the rendered
    prompt's ids (max |ours - theirs| / max |theirs|; bound --tol, 1e-4 for an f32 export,
    use about 2e-2 for bf16);
  - generation: transformers' greedy continuation of its own rendering (stopping at the
    generation config's eos_token_id) decodes to the same reply text as `sft generate
    --temperature 0` from sft's rendering of the same conversation, which checks the template
    and the stop token along with the weights.

    cargo build --release
    sft demo --steps 150 --out /tmp/demo                      # any trained checkpoint will do
    sft export --checkpoint /tmp/demo/run/step-150 --out /tmp/exp --dtype f32
    python3 scripts/check_export_transformers.py --checkpoint /tmp/demo/run/step-150 --export /tmp/exp

Needs torch and transformers (`pip install torch transformers`); neither the project nor CI
needs them. Exits 1 when a check fails.
"""

import argparse
import os
import subprocess
import sys

from check_hf_logits import sft_logits  # the same `sft logits` call, as float64 rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's tasks; its conversations carry the system prompt "Answer exactly." (--system).
PROMPTS = ["Reverse: a b c d", "Shout: x y z", "What is 5 + 6?", "Reverse: g f g h b"]


def sft_reply(sft, ckpt, system, prompt, max_new):
    out = subprocess.run(
        [sft, "generate", "--checkpoint", ckpt, "--system", system, "--prompt", prompt, "--temperature", "0",
         "--max-new-tokens", str(max_new), "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the checkpoint that was exported")
    ap.add_argument("--export", required=True, help="what `sft export` wrote from it")
    ap.add_argument("--system", default="Answer exactly.", help="the conversations' system prompt")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--sft", default=os.path.join(REPO, "target", "release", "sft"))
    args = ap.parse_args()

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(args.export)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.export, torch_dtype=torch.float32)
    model.eval()
    gen_cfg = transformers.GenerationConfig.from_pretrained(args.export)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: loaded {args.export} "
          f"({sum(p.numel() for p in model.parameters())} parameters, eos {gen_cfg.eos_token_id})")
    failed = 0
    for prompt in PROMPTS:
        messages = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = list(ids)
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].numpy()
        ours = sft_logits(args.sft, args.checkpoint, ids)
        worst = float(abs(ours - theirs).max() / abs(theirs).max())
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=gen_cfg.eos_token_id, pad_token_id=gen_cfg.eos_token_id)
        their_reply = tok.decode(out[0][len(ids):], skip_special_tokens=True).strip()
        our_reply = sft_reply(args.sft, args.checkpoint, args.system, prompt, args.max_new_tokens)
        ok_logits = worst <= args.tol
        ok_reply = their_reply == our_reply
        failed += (not ok_logits) + (not ok_reply)
        print(f"{prompt!r}: {len(ids)} prompt ids, logits max rel err {worst:.2e} "
              f"({'ok' if ok_logits else 'FAIL'}); reply transformers {their_reply!r} "
              f"sft {our_reply!r} ({'same' if ok_reply else 'DIFFERENT'})")
    print("all checks passed" if failed == 0 else f"{failed} checks failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
