#!/usr/bin/env python3
"""Writes a chat data set (JSON Lines, `messages` schema) with the length spread of real SFT
data: many short replies and a long tail, for `sft bench --data` (padding waste shows on it).

Deterministic (Python's Mersenne Twister from --seed), standard library only. Reply lengths in
words are log-normal (median about 25 words, sigma 1.1, capped at --max-words), prompts 4-40
words, a quarter of the conversations multi-turn; with SimpleLLaMA-style prompt overhead this
gives a median example of about 60 tokens and a tail past 500.

    python3 scripts/length_spread_data.py --out data/spread.jsonl --n 3000
"""

import argparse
import json
import math
import random

WORDS = (
    "the of and to in is that it for was on are as with be at by this have from or one had not but "
    "what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should home big give "
    "air line set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house don't world "
    "going want school important until form food keep children feet land side without boy once animals "
    "life enough took four head above kind began almost live page got earth need far hand high year "
    "mother light country father let night picture being study second soon story since white ever paper "
    "hard near sentence better best across during today however sure knew it's try told young sun thing "
    "whole hear example heard several change answer room sea against top turned learn point city play "
    "toward five himself usually money seen didn't car morning I'm body upon family later turn move face"
).split()


def text(rng, n_words):
    words = [rng.choice(WORDS) for _ in range(n_words)]
    # Sentences of 6-18 words, so that the tokenizer sees punctuation too.
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 18)
        sentence = " ".join(words[i : i + k])
        out.append(sentence[:1].upper() + sentence[1:] + ".")
        i += k
    return " ".join(out)


def reply_words(rng, max_words):
    return max(1, min(max_words, int(round(math.exp(rng.gauss(math.log(25), 1.1))))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=89)
    ap.add_argument("--max-words", type=int, default=600)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for _ in range(args.n):
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": text(rng, rng.randint(5, 20))})
            turns = 1 if rng.random() < 0.75 else rng.randint(2, 3)
            for _ in range(turns):
                messages.append({"role": "user", "content": text(rng, rng.randint(4, 40))})
                messages.append({"role": "assistant", "content": text(rng, reply_words(rng, args.max_words))})
            f.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
