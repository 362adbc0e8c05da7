"""Fit the training-caption text subspace of a trained model (see ``ViLSeg.fit_text_subspace``).

Training does this at export when ``train.text_subspace`` is set; this command does it for a model trained
without it, reading the same captions (the first N of the shard set, in shard order):

    python -m vilseg.text_subspace runs/demo/train/final --shards "data/demo/train-{000000..000014}.tar" \\
        --variance 0.95 --out runs/demo_ts/train/final
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a save_pretrained directory")
    parser.add_argument("--shards", required=True, help="the training shards (brace pattern or list)")
    parser.add_argument("--variance", type=float, default=0.95, help="fraction of caption-feature variance kept")
    parser.add_argument("--captions", type=int, default=4096, help="captions read to fit the subspace")
    parser.add_argument("--out", type=Path, required=True, help="directory for the model with its subspace")
    args = parser.parse_args(argv)
    if args.out.resolve() == args.model.resolve():
        raise ValueError(f"--out {args.out} is the input model: write the fitted model elsewhere")
    from .data.stream import read_captions
    from .models import ViLSeg

    model = ViLSeg.from_pretrained(args.model)
    k = model.fit_text_subspace(read_captions(args.shards, args.captions), variance=args.variance)
    model.save_pretrained(args.out)
    print(f"text subspace: {k} of {model.text_encoder.width} dimensions keep {args.variance:.0%} of the caption "
          f"variance; wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
