"""How fast a vocabulary's names are embedded (names/s), side by side in one run: the batches in the names' own order
(what vilseg did before) against batches of prompts sorted by length (``vilseg.inference.vocabulary.embed_names``),
at several batch sizes. Names: a fixed random sample of ImageNet-21k's (all their aliases, the 4 default templates
each), embedded by the demo model's text side (all-MiniLM-L6-v2, installed offline). One torch thread by default.

    python benchmarks/vocabulary_embedding.py --names 4000 --out benchmarks/results/vocabulary_embedding_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.inference_mode()
def embed_in_order(model, names, templates, batch_size):
    """The earlier embed_names: prompts batched in the names' order (a batch pads to its longest prompt)."""
    prompts = [t.format(n) for n in names for t in templates]
    out = [model.encode_texts(prompts[i:i + batch_size]).float() for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(out).view(len(names), len(templates), -1).mean(1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=4000, help="names sampled from ImageNet-21k's (aliases)")
    parser.add_argument("--batch-sizes", default="128,512,2048")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/vocabulary_embedding_cpu.json")
    args = parser.parse_args()
    from vilseg.inference.vocabularies import load_vocabulary
    from vilseg.inference.vocabulary import DEFAULT_TEMPLATES, embed_names
    from vilseg.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("vilseg-demo").eval()
    every = [a for aliases in load_vocabulary("imagenet21k").values() for a in aliases]
    names = random.Random(0).sample(every, min(args.names, len(every)))
    rows, reference = [], None
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for kind, fn in (("in order", lambda b=batch: embed_in_order(model, names, DEFAULT_TEMPLATES, b)),
                         ("sorted by length", lambda b=batch: embed_names(model, names, DEFAULT_TEMPLATES, b))):
            start = time.perf_counter()
            emb = fn()
            seconds = time.perf_counter() - start
            reference = emb if reference is None else reference
            rows.append({"batching": kind, "batch_size": batch, "names": len(names), "seconds": round(seconds, 2),
                         "names_per_s": round(len(names) / seconds, 1),
                         "max_abs_diff_vs_first": float((emb - reference).abs().max())})
            print(json.dumps(rows[-1]), flush=True)
    report = {"machine": f"{platform.node()} {platform.machine()}, {args.threads} torch thread(s), torch "
                         f"{torch.__version__}", "text_tower": "sentence-transformers/all-MiniLM-L6-v2",
              "templates": list(DEFAULT_TEMPLATES), "imagenet21k_names": len(every),
              "command": f"python benchmarks/vocabulary_embedding.py --names {args.names} --batch-sizes "
                         f"{args.batch_sizes} --threads {args.threads} --out {args.out}", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
