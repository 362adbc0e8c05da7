"""Seconds per batch of the Hugging Face text tower with and without cutting shared padding, in one run.

The tokenizer pads every caption to ``context_length``. ``HFTextEncoder`` cuts the columns that are padding in every
row before running the transformer. "padded" calls the transformers model on the full-length batch, as before the
cut; "cut" is the tower's own forward. Captions are training captions of the synthetic world. The script also prints
the largest difference between the two pooled outputs, which must be 0 or close to it.

    python benchmarks/text_tower.py --model vilseg-demo --batch 128 --rounds 5
    python benchmarks/text_tower.py --model vilseg-demo --batch 128 --rounds 5 --context-length 64
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from vilseg.data.synthetic import SyntheticWorld
from vilseg.models import create_model


def padded_forward(enc, ids, mask):
    hidden = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vilseg-demo")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context-length", type=int, default=None, help="override the model's text context length")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; the best of each is kept")
    parser.add_argument("--out", default=None, help="optional JSON result file")
    args = parser.parse_args(argv)

    overrides = {"text": {"context_length": args.context_length}} if args.context_length else {}
    enc = create_model(args.model, **overrides).eval().text_encoder
    if not hasattr(enc, "model"):
        raise SystemExit(f"{args.model!r} does not use the Hugging Face text backend")
    world = SyntheticWorld("train", seed=0)
    tok = enc.tokenizer([world.scene(i).caption for i in range(args.batch)])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    runs = {"padded": lambda: padded_forward(enc, ids, mask), "cut": lambda: enc(ids, mask)}
    best = {k: float("inf") for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        diff = (runs["padded"]() - runs["cut"]()).abs().max().item()
    result = {"model": args.model, "context_length": ids.shape[1], "batch": args.batch,
              "longest_caption_tokens": int(mask.sum(1).max()), "mean_caption_tokens": float(mask.sum(1).float().mean()),
              "seconds_padded": best["padded"], "seconds_cut": best["cut"], "speedup": best["padded"] / best["cut"],
              "max_abs_difference": diff, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
