"""data_prep command line.

    python -m data_prep build --kind folder --input photos/ --out shards/
    python -m data_prep build --kind table --input captions.parquet --root images/ --path-column file \\
        --caption-column text --out shards/ --max-side 512 --format webp --workers 8
    python -m data_prep build --kind coco --input annotations/captions_train2017.json --root train2017/ --out shards/
    python -m data_prep build --kind wds --input 'img2dataset_out/{00000..00099}.tar' --out clean/
    python -m data_prep check 'shards/shard-{000000..000009}.tar'
    python -m data_prep text-features --config configs/demo.yaml 'shards/shard-{000000..000009}.tar'
    python -m data_prep synthetic --out data/synthetic          # the synthetic world (see data_prep/synthetic.py)
"""
from __future__ import annotations

import argparse
import json
import sys

from vilseg.errors import ConfigError, OneLineParser


def _build(args) -> dict:
    from .build import build
    from .process import Options
    from .sources import open_source

    opts = Options(max_side=args.max_side, format=args.format, quality=args.quality, max_bytes=args.max_bytes,
                   min_side=args.min_side, max_aspect=args.max_aspect, min_caption_chars=args.min_caption_chars,
                   max_caption_chars=args.max_caption_chars)
    items = open_source(args.kind, args.input, args.root, args.path_column, args.caption_column, args.key_column,
                        args.allow_outside_input)
    manifest = build(items, args.out, opts, shard_count=args.shard_count, shard_bytes=args.shard_bytes,
                     workers=args.workers, prefix=args.prefix, shuffle_seed=args.shuffle_seed,
                     dedup=not args.no_dedup)
    summary = {k: manifest[k] for k in ("samples", "inputs", "skipped")}
    summary["shards"] = len(manifest["shards"])
    summary["pattern"] = manifest.get("pattern")
    if args.text_features:
        from pathlib import Path

        from .text_features import add_text_features

        text = add_text_features([str(Path(args.out) / name) for name in manifest["shards"]], args.text_features,
                                 negatives=args.negatives)
        summary["text_features"] = {k: text[k] for k in ("model", "samples_with_features", "seconds")}
    print(json.dumps(summary, indent=1))
    return manifest


def expand_shards(patterns: list[str]) -> list[str]:
    """Brace patterns, globs and folders (their ``*.tar``, sorted) -> shard paths.

    Raises:
        FileNotFoundError: a pattern that names no existing shard, or a folder without one, naming it.
    """
    import glob
    import os

    import braceexpand

    out = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{pattern!r} is a folder with no .tar shard in it")
            out += found
            continue
        expanded = [p for b in braceexpand.braceexpand(pattern) for p in (sorted(glob.glob(b)) or [b])]
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"{pattern!r}: {len(missing)} of {len(expanded)} shard(s) do not exist: {shown}")
        out += expanded
    return out


def _text_features_doc() -> str:
    from . import text_features

    return text_features.__doc__


def _text_features(parser, args) -> dict:
    from .text_features import add_text_features

    try:
        shards = expand_shards(args.shards)
        manifest = add_text_features(shards, args.config, args.out, args.negatives, args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as exn:
        parser.exit(2, f"python -m data_prep text-features: {exn}\n")
    print(json.dumps({k: v for k, v in manifest.items() if k != "shard_files"}, indent=1))
    return manifest


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synthetic":
        from .synthetic import main as synthetic_main

        return synthetic_main(argv[1:])
    parser = OneLineParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="turn an image-caption collection into webdataset shards")
    b.add_argument("--kind", required=True, choices=("folder", "table", "coco", "wds"),
                   help="folder: images with sidecar .txt captions; table: CSV/TSV/JSONL/Parquet of paths and "
                        "captions; coco: a COCO captions json; wds: existing webdataset shards")
    b.add_argument("--input", required=True, nargs="+", help="folder(s), table file(s), COCO json(s) or shards")
    b.add_argument("--root", default=None, help="root of relative image paths (table, coco)")
    b.add_argument("--out", required=True, help="folder for the shards, manifest.json and stats.md")
    b.add_argument("--path-column", default="path", help="table: the image path column (default: %(default)s)")
    b.add_argument("--caption-column", default="caption",
                   help="table: the caption column (default: %(default)s)")
    b.add_argument("--key-column", default=None,
                   help="table: a column of sample keys (default: the row number)")
    b.add_argument("--shard-count", type=int, default=1000,
                   help="samples per shard (0: no count limit; default: %(default)s)")
    b.add_argument("--shard-bytes", type=int, default=None, help="bytes per shard at most (default: no limit)")
    b.add_argument("--prefix", default="shard",
                   help="shard name prefix: a plain name (letters, digits, _ - .; default: %(default)s)")
    b.add_argument("--workers", type=int, default=1, help="decoding/encoding processes (default: %(default)s)")
    b.add_argument("--max-side", type=int, default=None,
                   help="resize so that the longer side is at most this many pixels (default: keep the size)")
    b.add_argument("--format", choices=("jpg", "webp", "keep"), default="jpg",
                   help="image encoding in the shards; keep: the original bytes when no resize or conversion was "
                        "needed (default: %(default)s)")
    b.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality (default: %(default)s)")
    b.add_argument("--max-bytes", type=int, default=None,
                   help="per-image size budget: quality is lowered in steps of 10 (to 30) until it fits "
                        "(default: none)")
    b.add_argument("--min-side", type=int, default=32,
                   help="images with a shorter side below this are skipped and counted (default: %(default)s)")
    b.add_argument("--max-aspect", type=float, default=5.0,
                   help="images with a long/short side ratio above this are skipped (default: %(default)s)")
    b.add_argument("--min-caption-chars", type=int, default=1,
                   help="shorter cleaned captions are skipped (default: %(default)s)")
    b.add_argument("--max-caption-chars", type=int, default=1000,
                   help="longer cleaned captions are skipped (default: %(default)s)")
    b.add_argument("--shuffle-seed", type=int, default=None,
                   help="shuffle the input order with this seed (default: the input's order)")
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    b.add_argument("--allow-outside-input", action="store_true",
                   help="follow symlinks that lead outside the input folder or --root (refused by default)")
    b.add_argument("--text-features", metavar="CONFIG", default=None,
                   help="also store the frozen text tower's features (and hard negatives) of this training config in "
                        "every sample (see the text-features command)")
    b.add_argument("--negatives", type=int, default=None, help="with --text-features: hard-negative draws per caption")
    c = sub.add_parser("check", help="open every sample of a shard set and report")
    c.add_argument("shards", nargs="+")
    t = sub.add_parser("text-features", help="store a training config's frozen text-tower features in shards",
                       description=_text_features_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("shards", nargs="+", help="shard files, brace patterns, globs or folders")
    t.add_argument("--config", required=True, help="the training config the features are for")
    t.add_argument("--out", default=None, help="write the shards here (default: replace each shard in place)")
    t.add_argument("--negatives", type=int, default=None,
                   help="hard-negative draws per caption (default 16; 0: none)")
    t.add_argument("--batch-size", type=int, default=256, help="texts per text-tower call")
    args = parser.parse_args(argv)
    if getattr(args, "negatives", None) is None:
        from .text_features import NEGATIVES_PER_CAPTION

        args.negatives = NEGATIVES_PER_CAPTION
    if args.command == "text-features":
        return _text_features(parser, args)
    if args.command == "build":
        args.shard_count = args.shard_count or None
        try:
            return _build(args)
        except (ValueError, FileNotFoundError, KeyError) as exn:  # bad input: one line naming it, exit code 2
            parser.exit(2, f"python -m data_prep build: {exn.args[0] if exn.args else exn}\n")

    from .check import check_shards

    try:
        shards = expand_shards(args.shards)
    except FileNotFoundError as exn:
        parser.exit(2, f"python -m data_prep check: {exn}\n")
    report = check_shards(shards)
    print(json.dumps(report, indent=1))
    if report["problems"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
