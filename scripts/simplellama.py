"""SimpleLLaMA's side of the scripts that compare `sft` with it (check_inspect_simplellama.py,
compare_prepare.py): its default system prompt, its special tokens in id order, and where its
tokenizer (bpe_8k.json) is looked for, the places the Rust tests and benches look
(tests/common/data.rs)."""

import os

DEFAULT_SYSTEM_PROMPT = (
    "You are Simple LLaMA, a helpful and factual assistant. Answer clearly, stay on topic, and use "
    "context from the conversation. If something is unclear or risky, point it out briefly. Avoid making "
    "things up or giving unsupported claims. Be concise, useful, and aligned with the user's goal."
)
SPECIALS = ["<SOS>", "<EOS>", "<PAD>", "<UNK>", "<SOU>", "<EOU>", "<SOA>", "<EOA>", "<SOT>", "<EOT>"]


def default_tokenizer(root):
    """$SIMPLELLAMA_TOKENIZER, else ../shared/simplellama/bpe_8k.json, else
    ../../shared/simplellama/bpe_8k.json (relative to the repository `root`): the first that is a
    file, else the first shared path (so that the error names it)."""
    candidates = [os.environ.get("SIMPLELLAMA_TOKENIZER", ""),
                  os.path.join(root, "../shared/simplellama/bpe_8k.json"),
                  os.path.join(root, "../../shared/simplellama/bpe_8k.json")]
    return next((c for c in candidates if c and os.path.isfile(c)), candidates[1])
