"""A synthetic preference task for `gptlab finetune --task dpo`, and an untrained tiny base model.

    python examples/posttrain/make_preferences.py --out runs/prefs

writes OUT/train.jsonl and OUT/val.jsonl ({"prompt", "chosen", "rejected"}: a review ending in a
positive word is preferred to one ending in a negative word; validation uses nouns training never
shows) and OUT/base (a 2-layer, 32-wide GPT on a byte-level tokenizer). tests/test_dpo.py checks the
same rule end to end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

POSITIVE = "good great fine nice superb lovely".split()
NEGATIVE = "bad awful poor nasty dull grim".split()
NOUNS = "movie film book meal show song game trip play tale cake view".split()


def pair(noun: str, rng: random.Random) -> dict[str, str]:
    return {"prompt": f"the {noun} was", "chosen": f" {rng.choice(POSITIVE)}.", "rejected": f" {rng.choice(NEGATIVE)}."}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/prefs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, nouns, each in (("train", NOUNS[:8], 20), ("val", NOUNS[8:], 25)):
        lines = [json.dumps(pair(n, rng)) for n in nouns for _ in range(each)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    import torch

    from gptlab.checkpoint import save_model
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["qzqzqz "] * 20, vocab_size=258, show_progress=False)  # one token per character
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=48, vocab_size=tokenizer.vocab_size))
    print(f"wrote {out / 'train.jsonl'}, {out / 'val.jsonl'} and {save_model(model, out / 'base', tokenizer)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
