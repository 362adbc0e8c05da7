"""The `vilseg` command: segment, index, eval, calibrate, probe, train, web. `vilseg SUBCOMMAND --help` shows an example.

Bad input gets one line naming the culprit and a non-zero exit (2: nothing was done; 1: some images failed, the
others were processed), never a traceback.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import OneLineParser

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

SEGMENT_EXAMPLE = """example:
  vilseg segment photos/ street.jpg 'more/*.png' --model runs/demo/train/final --classes "cat,dog,tv" --out out/
  vilseg segment photo.jpg --model runs/demo/train/final --vocab imagenet21k --out out/   # name every segment
  vilseg segment photo.jpg --open-clip ViT-B-16 --pretrained ViT-B-16.bin --classes "cat,dog" --out out/  # a CLIP
  cat photo.jpg | vilseg segment - --model runs/demo/train/final --vocab voc21 --background sky,wall --out out/
  accelerate launch --num_processes 2 -m vilseg.cli segment photos/ --model ... --classes ... --out out/  # split
writes out/<stem>.png (label map: 0 background, i+1 class i), out/<stem>.json (segments: label, score, area, box,
top-k names), out/<stem>_overlay.png (with a legend) and out/segment_stats.json (images/s)."""


EVAL_EXAMPLE = """example:
  vilseg eval --model runs/demo/train/final --dataset voc21 --root data/VOCdevkit/VOC2012 --protocol A --out voc.json
  vilseg eval --model runs/demo/train/final --dataset synthetic --root data/demo/eval --protocol B --out syn.json
  vilseg eval --predictions other_method/ --dataset ade20k --root data/ade --out ade.json   # any method's PNGs
  vilseg eval --open-clip ViT-B-16 --pretrained ViT-B-16.bin --dataset context60 --root data/VOC2010 --protocol B \\
      --naming sclip --out clip.json                             # a CLIP, training-free (default naming: naclip)
  accelerate launch --multi_gpu --num_processes 8 -m vilseg.cli eval ...   # several GPUs: the images are split
writes the report (miou, per_class, the resolved protocol) and prints a Markdown table."""
DATASET_KEYS = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k",
                "synthetic")


class UserError(Exception):
    """Bad input: reported as one line, exit code 2."""


PROG = "vilseg"  # "vilseg COMMAND" once the command is known: the prefix of every error, note and warning


def fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(code)


# ------------------------------------------------------------------ inputs
def expand_inputs(inputs: list[str]) -> list[str]:
    """Paths, globs and folders (searched recursively for images) -> image paths, in the order given; '-' stays.

    Raises:
        UserError: an input that matches nothing, naming it.
    """
    out: list[str] = []
    for item in inputs:
        if item == "-":
            out.append("-")
        elif os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {item!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif os.path.exists(item):
            out.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"input {item!r} does not exist and matches no file")
            out += [m for m in matches if os.path.isfile(m)]
    return out


def output_stems(paths: list[str]) -> list[str]:
    """A unique output name per input: its stem, with -2, -3, ... for later inputs of the same stem."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = "stdin" if path == "-" else Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def load_model(directory: str):
    """The model of a save_pretrained folder, or a UserError naming what is wrong with it."""
    from .models import ViLSeg

    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"model folder {directory!r} does not exist")
    try:
        model = ViLSeg.from_pretrained(path)
    except FileNotFoundError as exn:
        raise UserError(str(exn)) from None
    except ValueError as exn:  # a corrupt or foreign weights file (the message names it)
        raise UserError(f"cannot load the model in {directory!r}: {str(exn).splitlines()[0][:400]}") from None
    return model


def load_open_clip(name: str, pretrained: str | None):
    """A vilseg model from an open_clip CLIP (its joint space kept), or a UserError of one line naming the tag,
    file or architecture that is wrong."""
    from .errors import ConfigError
    from .models import from_open_clip

    if not pretrained and not name.startswith("local-dir:"):
        print(f"{PROG}: note: --open-clip {name} without --pretrained: random weights, whose names mean nothing",
              file=sys.stderr)
    try:
        return from_open_clip(name, pretrained)
    except ConfigError as exn:
        raise UserError(f"--open-clip {name}" + (f" --pretrained {pretrained}" if pretrained else "") + f": {exn}") \
            from None


def model_and_readout(args):
    """The model and the read-out that ``--model`` or ``--open-clip`` (with ``--pretrained``) name, the read-out
    overridden by ``--grouping``/``--naming``/``--blocks``; returns (model, readout, center). A CLIP's read-out is
    training-free (:data:`~vilseg.inference.segmenter.CLIP_READOUT`) and scores raw cosines (no vocabulary
    centring, as the read-outs' authors score them)."""
    import copy

    from .inference.segmenter import CLIP_READOUT, READOUT_FILE, default_readout
    from .models.vilseg import REFERENCE_NAME
    from .inference.strategies import GROUPINGS, NAMINGS

    given = [flag for flag, value in (("--model", args.model), ("--open-clip", args.open_clip)) if value]
    if len(given) != 1:
        raise UserError("give one of --model DIR (a vilseg model) and --open-clip NAME (a CLIP, training-free), not "
                        + (" and ".join(given) if given else "neither"))
    if args.pretrained and not args.open_clip:
        raise UserError("--pretrained TAG_OR_FILE goes with --open-clip NAME (a --model folder holds its weights)")
    for flag, value, known in (("--grouping", args.grouping, GROUPINGS), ("--naming", args.naming, NAMINGS)):
        if value is not None and value not in known:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(sorted(known))}")
    if args.model:
        model = load_model(args.model)
        print_training_notice(args.model)
        readout, center = default_readout(args.model, model), True
        if not (Path(args.model) / READOUT_FILE).is_file():
            print(f"{PROG}: note: {args.model} has no {READOUT_FILE}: using the default read-out "
                  f"{readout.grouping}+{readout.naming}"
                  + (f"@{readout.blocks}" if readout.naming == "masked_attention" else "")
                  + f", background threshold {readout.threshold} (uncalibrated; `vilseg calibrate --model "
                  f"{args.model} ...` chooses both on a labelled split)", file=sys.stderr)
        if getattr(model, "text_reference", None) is None:
            print(f"{PROG}: note: {args.model} has no {REFERENCE_NAME} (exported before vilseg stored one): class "
                  f"names are scored uncentred", file=sys.stderr)
    else:
        model = load_open_clip(args.open_clip, args.pretrained)
        readout, center = copy.deepcopy(CLIP_READOUT), False
        if args.grouping in ("clusters", "slots"):
            raise UserError(f"--grouping {args.grouping}: a CLIP has no trained {args.grouping} head; use dense or "
                            f"merge")
    if args.grouping:
        readout.grouping = args.grouping
    if args.naming:
        if args.naming != readout.naming:
            readout.reference = None  # another naming scores against its own reference (default_reference)
        readout.naming = args.naming
    if args.blocks is not None:
        readout.blocks = args.blocks
    if readout.grouping == "merge" and not readout.max_segments:
        readout.max_segments = 16
    return model, readout, center


def clip_source(args) -> str:
    """How a report or page names an --open-clip model."""
    weights = args.pretrained or ("the folder's weights" if args.open_clip.startswith("local-dir:") else
                                  "random weights")
    return f"open_clip {args.open_clip} ({weights})"


def add_model_options(parser, what: str) -> None:
    """--model, or --open-clip with --pretrained, and the read-out overrides, for segment, eval and web."""
    parser.add_argument("--model", help=f"a vilseg model folder (save_pretrained; its readout.json is used){what}")
    parser.add_argument("--open-clip", metavar="NAME",
                        help="instead of --model: an open_clip CLIP (ViT-B-16; ViT-B-16-quickgelu for OpenAI's "
                             "weights; local-dir:FOLDER), read out training-free (default: NACLIP per patch)")
    parser.add_argument("--pretrained", metavar="TAG_OR_FILE",
                        help="with --open-clip: a pretrained tag (laion2b_s34b_b88k; fetched by open_clip, or read "
                             "from its cache) or a local weights file (open_clip's state dict); default: random")
    parser.add_argument("--grouping", help="override the read-out's grouping: clusters, dense, merge, slots")
    parser.add_argument("--naming", help="override the read-out's naming: pool, masked_attention, reencode_global, "
                                         "maskclip, sclip, naclip")
    parser.add_argument("--blocks", type=lambda v: v if v == "all" else int(v),
                        help="with --naming masked_attention: the last k blocks (an int or 'all')")


def print_training_notice(directory: str) -> None:
    from .inference.segmenter import training_notice

    notice = training_notice(directory)
    if notice:
        print(f"{PROG}: {notice}", file=sys.stderr)


def _read_stdin_image():
    from PIL import Image

    data = sys.stdin.buffer.read()
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exn:
        raise ValueError(f"standard input is not a readable image: {exn}") from exn


# ------------------------------------------------------------------ vocabulary
def check_vocabulary_args(args, command: str) -> None:
    """Exactly one source of names: --classes, --vocab, or (segment) a prebuilt --index."""
    given = [f"--{k}" for k in ("classes", "vocab", "index") if getattr(args, k, None)]
    if command == "index build":
        given = [g for g in given if g != "--index"]
        if len(given) != 1:
            raise UserError("give the names to index: --classes \"cat,dog\" or --vocab NAME|FILE (one of them)")
        return
    if not given:
        raise UserError("give the classes to look for (--classes \"cat,dog\"), a vocabulary (--vocab NAME|FILE) "
                        "or a prebuilt index (--index FOLDER)")
    if len(given) > 1:
        raise UserError(f"give one of --classes, --vocab and --index, not {' and '.join(given)}: an index already "
                        f"holds its names")


def check_ranges(args) -> None:
    """Numeric options out of range, named before any work starts."""
    if args.threshold is not None and not -1 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold} is not a cosine: give a value in [-1, 1]")
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1 or args.workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")


def vocabulary_from_args(args) -> dict[str, list[str]] | str:
    """--classes "a,b" (aliases with '|': "tv|television") or --vocab NAME|FILE."""
    from .inference.vocabularies import load_vocabulary, parse_classes

    if args.classes:
        entries = args.classes.split(",")
        empty = [i + 1 for i, e in enumerate(entries) if not e.replace("|", "").strip()]
        if empty:
            raise UserError(f"--classes {args.classes!r}: entry {empty[0]} is empty (classes are separated by ',', "
                            f"a class's names by '|': \"tv|television,cat\")")
        bad = [e for e in entries if any(not n.strip() for n in e.split("|"))]
        if bad:
            raise UserError(f"--classes {args.classes!r}: {bad[0].strip()!r} has an empty name around '|'")
        return parse_classes(entries, "--classes")

    try:
        vocab = load_vocabulary(args.vocab)
    except KeyError as exn:
        raise UserError(exn.args[0]) from None
    except (ValueError, OSError) as exn:
        raise UserError(f"--vocab {args.vocab!r} cannot be read: {exn}") from None
    if not vocab:
        raise UserError(f"--vocab {args.vocab!r} is empty")
    return vocab


# ------------------------------------------------------------------ segment
def write_outputs(segmenter, image, result, out: Path, stem: str, source: str) -> None:
    import numpy as np
    from PIL import Image

    labels = result.labels
    mode = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    Image.fromarray(labels.astype(mode)).save(out / f"{stem}.png", compress_level=1)
    classes = result.classes
    record = {"source": source, "size": [int(labels.shape[1]), int(labels.shape[0])],
              "classes": ["background", *classes] if len(classes) <= 1000 else None, "segments": result.segments}
    if segmenter.readout.grouping == "slots":  # SlotCon's groups: which prototypes this image uses, which none
        record["prototypes"] = result.prototypes
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    segmenter.render_overlay(image, result, out / f"{stem}_overlay.png")


class ImageFiles:
    """A map-style dataset of image files for a DataLoader: item i is (i, the RGB uint8 array, the prepared input
    tensor, the displayed (H, W), None), or (i, None, None, None, the error) for a file that cannot be read, so that
    decoding and resizing run in the worker processes and a bad file is reported, not fatal."""

    def __init__(self, paths: list[str], input_size: int, patch: int, mean, std):
        self.paths, self.args = paths, (input_size, patch, mean, std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import numpy as np

        from .inference.segmenter import load_image, prepare_image

        try:
            image = load_image(self.paths[i])
            x, size = prepare_image(image, *self.args)
            return i, np.asarray(image), x, size, None
        except (ValueError, FileNotFoundError, OSError) as exn:
            return i, None, None, None, str(exn)


def _as_is(sample):
    """The DataLoader's collate for :class:`ImageFiles`: the sample unchanged (its arrays stay numpy)."""
    return sample


def segment_files(segmenter, paths: list[str], stems: list[str], out: Path, workers: int, progress: bool = True
                  ) -> tuple[int, list[dict], float]:
    """Segments ``paths`` into ``out``: decoding in ``workers`` DataLoader processes, the images of one input size
    batched through the encoder (``segmenter.batch_size``), the outputs written by two threads while the next batch
    is encoded. Returns (images written, the failed images as {"file", "error"}, seconds from the first decoded
    image to the last file written)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    encoder = segmenter.model.image_encoder
    files = ImageFiles(paths, segmenter.input_size, segmenter.patch, encoder.mean.flatten().tolist(),
                       encoder.std.flatten().tolist())
    loader = DataLoader(files, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                        prefetch_factor=2 * segmenter.batch_size if workers else None)
    failed, written, pending = [], 0, []
    buckets: dict[tuple, list] = {}
    start = None  # the clock starts at the first decoded image: worker start-up is a fixed cost, not throughput
    bar = tqdm(total=len(paths), desc="segment", unit="image",  # disable=None: a bar only on a terminal
               disable=True if not progress or len(paths) < 2 else None)

    def flush(items: list, pool) -> None:
        nonlocal written
        results = segmenter.segment_batch(prepared=[(x, size) for _, _, x, size in items])
        for (i, array, _, _), result in zip(items, results):
            pending.append(pool.submit(write_outputs, segmenter, Image.fromarray(array), result, out, stems[i],
                                       paths[i]))
            named = sorted({s["label"] for s in result.segments if s["label"] != "background"})
            bar.set_postfix_str(f"{Path(paths[i]).name}: {len(result.segments)} segments"
                                + (f" ({', '.join(named[:4])})" if named else ""), refresh=False)
        written += len(items)
        bar.update(len(items))

    with ThreadPoolExecutor(2) as pool:
        for i, array, x, size, error in loader:
            start = start or time.perf_counter()
            if error is not None:
                failed.append({"file": paths[i], "error": str(error)})
                bar.update(1)
                tqdm.write(f"{PROG}: skipped {paths[i]}: {error}", file=sys.stderr)
                continue
            bucket = buckets.setdefault(tuple(x.shape), [])
            bucket.append((i, array, x, size))
            if len(bucket) == segmenter.batch_size:
                flush(buckets.pop(tuple(x.shape)), pool)
        for bucket in buckets.values():
            flush(bucket, pool)
        for future in pending:
            future.result()  # a failed write raises here, naming its file
    bar.close()
    return written, failed, time.perf_counter() - start if start else 0.0


def cmd_segment(args) -> int:
    from .eval.runner import process_state
    from .inference import Segmenter
    from .inference.segmenter import load_image

    check_vocabulary_args(args, "segment")
    check_ranges(args)
    paths = expand_inputs(args.images)  # checked before the model loads
    vocabulary = vocabulary_from_args(args) if not args.index else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} is a file: give a folder")
    model, readout, center = model_and_readout(args)
    if args.threshold is not None:
        readout.threshold = args.threshold
    if args.background:
        readout.background_words = [w.strip() for w in args.background.split(",") if w.strip()]
    if (args.vocab or args.index) and args.threshold is None and not args.background:
        readout.threshold = None  # vocabulary-free mode: every segment gets its best name
    state = process_state()  # under `accelerate launch -m vilseg.cli segment ...` the files are split
    segmenter = Segmenter(model, readout=readout, top_k=args.top_k, batch_size=args.batch_size, center=center,
                          device=state.device if state.num_processes > 1 else None)
    if args.index:
        from .inference import VocabularyIndex

        try:
            segmenter.set_vocabulary(VocabularyIndex.load(args.index, model))
        except (ValueError, FileNotFoundError) as exn:
            raise UserError(str(exn)) from None
    else:
        from .inference.vocabulary import cached_index

        names = vocabulary if isinstance(vocabulary, dict) else {n: [n] for n in vocabulary}
        for word in readout.background_words:
            names.setdefault(word, [word])
        segmenter.set_vocabulary(cached_index(model, names, segmenter.templates, center=segmenter.center,
                                              progress=None, reference=segmenter.reference))
    out.mkdir(parents=True, exist_ok=True)
    stems = output_stems(paths)
    from_stdin = 0
    if "-" in paths and state.is_main_process:  # one image on standard input, read here (not in a worker)
        i = paths.index("-")
        image = load_image(_read_stdin_image())
        write_outputs(segmenter, image, segmenter.segment(image), out, stems[i], "stdin")
        from_stdin = 1
    mine = [i for i in range(state.process_index, len(paths), state.num_processes) if paths[i] != "-"]
    written, failed, seconds = segment_files(segmenter, [paths[i] for i in mine], [stems[i] for i in mine], out,
                                             args.workers, progress=state.is_main_process)
    written += from_stdin
    if state.num_processes > 1:  # totals over the processes; the slowest process sets the time
        import torch

        totals = torch.tensor([written, seconds], dtype=torch.float64)
        counts, slowest = totals[:1].clone(), totals[1:].clone()
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        gathered = [None] * state.num_processes
        torch.distributed.all_gather_object(gathered, failed)
        written, failed, seconds = int(counts[0]), [f for part in gathered for f in part], float(slowest[0])
    if state.is_main_process:
        stats = {"images": written, "failed": len(failed), "failed_files": failed, "seconds": round(seconds, 3),
                 "images_per_s": round(written / seconds, 3) if seconds else None, "batch_size": args.batch_size,
                 "workers": args.workers, "processes": state.num_processes,
                 "readout": f"{readout.grouping}+{readout.naming}"
                 + (f"@{readout.blocks}" if readout.naming == "masked_attention" else ""),
                 "threshold": readout.threshold, "reference": segmenter.index.reference}
        (out / "segment_stats.json").write_text(json.dumps(stats, indent=1))
        print(f"wrote {written} of {written + len(failed)} images to {out} ({stats['images_per_s']} images/s)")
    return 1 if failed else 0


# ------------------------------------------------------------------ index, eval, probe, train, web
def cmd_index(args) -> int:
    from .inference import VocabularyIndex

    if args.action == "build":
        if not args.out:
            raise UserError("index build needs --out FOLDER (where the index is written)")
        if args.index or args.text:
            raise UserError("--index and --text are for `index query`, not `index build`")
        check_vocabulary_args(args, "index build")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise UserError(f"--out {args.out!r} is a file: give a folder")
        from .inference.segmenter import default_readout, default_reference
        from .inference.strategies import NAMINGS

        if args.naming is not None and args.naming not in NAMINGS:
            raise UserError(f"--naming {args.naming!r}: choose one of {', '.join(sorted(NAMINGS))}")
        vocabulary = vocabulary_from_args(args)
        model = load_model(args.model)
        # centred as the read-out that will use it scores: the model's saved one, or the --naming given
        reference = default_reference(args.naming) if args.naming else default_readout(args.model, model).text_reference
        from .inference.vocabulary import cached_index

        index = cached_index(model, vocabulary, kind=args.kind, progress=None, reference=reference)
        index.save(args.out)
        print(f"indexed {len(index)} classes ({len(index.vectors)} names, {index.kind}, centred on the "
              f"{index.reference or 'no'} reference) in {args.out}")
        return 0
    if not args.index or not args.text:
        raise UserError("index query needs --index FOLDER and --text 'some words' ...")
    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    model = load_model(args.model)
    try:
        index = VocabularyIndex.load(args.index, model)
    except (ValueError, FileNotFoundError) as exn:
        raise UserError(str(exn)) from None
    import torch.nn.functional as F

    for text in args.text:
        query = model.encode_texts([text]).detach().float()
        if index.center is not None:
            query = F.normalize(query - index.center, dim=-1)
        scores, classes = index.search(query, args.k)
        print(f"{text}: " + ", ".join(f"{index.classes[c]} ({s:.3f})" for s, c in zip(scores[0].tolist(),
                                                                                     classes[0].tolist())))
    return 0


def cmd_eval(args) -> int:
    from . import eval as ev
    from .inference import Segmenter

    if args.convert_coco_object:
        n = ev.convert_coco_object(args.root)
        print(f"wrote {n} *_instanceTrainIds.png under {args.root}")
        return 0
    sources = [x for x in (args.model, args.predictions, args.open_clip) if x]
    if len(sources) != 1:
        raise UserError("give exactly one of --model DIR, --predictions DIR, --open-clip NAME")
    if args.predictions and (args.pretrained or args.naming or args.grouping):
        raise UserError("--predictions scores label maps: --pretrained, --naming and --grouping do not apply")
    if not args.out:
        raise UserError("--out report.json is required")
    dataset = load_dataset(args.dataset, args.root)
    if args.predictions:
        try:
            report = ev.score_predictions(args.predictions, dataset, on_error=args.on_error, missing=args.missing)
        except ev.PredictionsError as exn:  # one line per file, after the one that says how many
            for line in str(exn).splitlines():
                print(f"{PROG}: {line}", file=sys.stderr)
            raise SystemExit(2) from None
    else:
        protocol = ev.preset(args.protocol, args.dataset)
        protocol = ev.apply_overrides(protocol, (["pamr=true"] if args.pamr else []) + list(args.set or []))
        model, readout, center = model_and_readout(args)  # the same model and read-out as `vilseg segment`
        predictor = ev.SegmenterScores(Segmenter(model, readout=readout, center=center))
        report = ev.evaluate(predictor, dataset, protocol, names=args.names, batch=args.batch,
                             on_error=args.on_error, limit=args.limit)
        report["source"]["folder"] = args.model or clip_source(args)
    if ev.runner.process_state().is_main_process:
        ev.write_report(report, args.out)
        print(ev.coverage(report))
    return 1 if report["skipped"] else 0


def load_dataset(name: str, root: str):
    """An evaluation split, or exit 2 with the error that shows the layout expected under ``root``."""
    from . import eval as ev

    try:
        return ev.load_dataset(name, root)
    except ev.DatasetError as exn:
        fail(str(exn))


def cmd_calibrate(args) -> int:
    """Chooses the model's read-out and background threshold on a labelled split and saves them as readout.json."""
    from .eval.calibrate import calibrate, readout_key
    from .inference.segmenter import READOUT_FILE, ReadOut
    from .inference.strategies import GROUPINGS, NAMINGS

    for flag, value, known in (("--grouping", args.grouping, GROUPINGS), ("--naming", args.naming, NAMINGS)):
        if value is not None and value not in known:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(sorted(known))}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of images")
    model = load_model(args.model)
    dataset = load_dataset(args.dataset, args.root)  # --dataset offers only splits with a background class
    previous = Path(args.model) / READOUT_FILE
    before = ReadOut.load(args.model) if previous.is_file() else None
    readout, sweeps = calibrate(model, dataset, args.grouping, args.naming, args.blocks, limit=args.limit,
                                progress=True)
    path = readout.save(args.model)
    cal = readout.calibration
    for key, miou in cal["candidates"].items():
        print(f"  {key:32s} best calibration mIoU {miou:5.1f}")
    chosen = readout_key(readout.grouping, readout.naming, readout.blocks)
    print(f"wrote {path}: {chosen}, background threshold {readout.threshold:g} ({cal['miou']:.1f} mIoU on "
          f"{cal['images']} images of {args.dataset}; {cal['rule']})"
          + (f"; it replaces {readout_key(before.grouping, before.naming, before.blocks)} at threshold "
             f"{before.threshold}" if before else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"readout": chosen, "calibration": cal, "sweeps": sweeps}, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_probe(args) -> int:
    from . import eval as ev

    if bool(args.model) == bool(args.timm):
        raise UserError("give exactly one of --model DIR (a vilseg model) or --timm NAME (a bare timm encoder)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of images")
    dataset = load_dataset(args.dataset, args.root)
    if args.limit is not None:
        import dataclasses

        dataset = dataclasses.replace(dataset, items=dataset.items[:args.limit])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model and args.dataset == "synthetic":  # + the linear probes of colour and shape
        from .eval.probes import probe_synthetic

        report = probe_synthetic(load_model(args.model), dataset.root, out / "intra_inter.png", limit=args.limit)
    else:
        if args.model:
            features = ev.EncoderFeatures(load_model(args.model), size=args.size)
        else:
            if args.checkpoint and not Path(args.checkpoint).is_file():
                raise UserError(f"--checkpoint {args.checkpoint}: no such file")
            features = ev.TimmFeatures(args.timm, args.checkpoint, size=args.size or 224)
        report = {"prompt_patch": ev.prompt_patch_segmentation(features, dataset),
                  "intra_inter": ev.intra_inter_similarity(features, dataset, plot=str(out / "intra_inter.png"))}
    report["encoder"] = args.model or f"timm:{args.timm}" + (f" ({args.checkpoint})" if args.checkpoint else "")
    report["dataset"] = {"name": args.dataset, "root": str(dataset.root), "images": len(dataset)}
    (out / "probes.json").write_text(json.dumps(report, indent=1))
    summary = {"prompt_patch_miou": report["prompt_patch"]["centroid"]["best_miou"],
               "intra_inter_overlap": report["intra_inter"]["overlap"]}
    if "linear_probe" in report:
        summary["linear_probe"] = report["linear_probe"]
    print(json.dumps(summary, indent=1))
    return 0


def cmd_train(args, rest: list[str]) -> int:
    """Checks the config here (one line per problem, exit 2), then starts ``accelerate launch vilseg/train.py``.
    Without an accelerate config file (``accelerate config``) and without ``--launch-args``, the launch gets explicit
    single-process defaults, so accelerate does not warn about guessing them."""
    from .errors import ConfigError
    from .train import check_config, check_text_features
    from .training.rundir import check_run_dir

    overrides = [a for a in rest if not a.startswith("-")]
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for vilseg train (see vilseg train --help)")
    try:
        cfg = check_config(args.config, overrides)
        check_run_dir(cfg, cfg.run.dir, args.resume, args.overwrite)  # another run's folder: refused here, in one line
        check_text_features(cfg)  # stored text features: this model's tower's?
    except ConfigError as exn:
        raise UserError(str(exn).replace("\n", "; ")) from None
    from accelerate.commands.config import default_config_file

    launch_args = list(args.launch_args)
    if not launch_args and not Path(default_config_file).is_file():
        for option, value in (("--num_processes", "1"), ("--num_machines", "1"), ("--mixed_precision", "no"),
                              ("--dynamo_backend", "no")):
            if not any(a == option or a.startswith(option + "=") for a in launch_args):
                launch_args += [option, value]
    script = Path(__file__).resolve().parent / "train.py"
    train_args = (["--config", args.config] if args.config else []) + (
        ["--resume", *([args.resume] if args.resume != "latest" else [])] if args.resume else []) + (
        ["--overwrite"] if args.overwrite else [])
    # --quiet: a failed run's own traceback is enough; accelerate would add a CalledProcessError after it
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *launch_args, str(script), *overrides,
              *train_args]
    return subprocess.call(launch)


def cmd_web(args) -> int:
    try:
        from .web import launch
    except ImportError as exn:
        raise UserError(f"the web demo needs the `web` extra: pip install 'vilseg[web]' ({exn})") from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number (1-65535)")
    from .inference import Segmenter

    model, readout, center = model_and_readout(args)
    segmenter = Segmenter(model, readout=readout, center=center)
    source = args.model or clip_source(args)
    launch(segmenter, source, host=args.host, port=args.port)
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    from . import __version__

    parser = OneLineParser(prog="vilseg", description=__doc__, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"vilseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("segment", help="segment images with a free vocabulary", epilog=SEGMENT_EXAMPLE,
                       formatter_class=formatter)
    s.add_argument("images", nargs="+", help="image paths, globs, folders, or - (one image on standard input)")
    add_model_options(s, "")
    s.add_argument("--classes", help='comma-separated classes; aliases with "|": "tv|television,cat"')
    s.add_argument("--vocab", help="a packaged vocabulary (imagenet21k, voc21, ade20k, ...) or a file")
    s.add_argument("--index", help="a prebuilt `vilseg index build` folder instead of embedding the vocabulary")
    s.add_argument("--background", help="comma-separated background words (instead of a threshold)")
    s.add_argument("--threshold", type=float, help="background threshold (default: the model's calibrated one)")
    s.add_argument("--top-k", type=int, default=5, help="names listed per segment in the JSON")
    s.add_argument("--batch-size", type=int, default=16, help="images of one size encoded per forward pass")
    s.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (0: in this one)")
    s.add_argument("--out", required=True, help="output folder")

    i = sub.add_parser("index", help="build or query a faiss vocabulary index", formatter_class=formatter,
                       epilog="example:\n  vilseg index build --model runs/demo/train/final --vocab imagenet21k "
                              "--out vocab21k/\n  vilseg index query --model runs/demo/train/final --index vocab21k/ "
                              "--text 'a red circle' -k 5")
    i.add_argument("action", choices=("build", "query"), help="build an index, or look texts up in one")
    i.add_argument("--model", required=True, help="the model folder whose text side embeds the names")
    i.add_argument("--vocab", help="build: a packaged vocabulary or a file (one class per line, names '|'-separated)")
    i.add_argument("--classes", help='build: comma-separated classes; aliases with "|": "tv|television,cat"')
    i.add_argument("--kind", choices=("auto", "flat", "hnsw"), default="auto",
                   help="exact (flat) or approximate (hnsw) search; auto: hnsw from 5,000 names")
    i.add_argument("--naming", help="build: the naming the index is for (its names are centred on that read-out's "
                                    "reference); default: the model's saved read-out")
    i.add_argument("--out", help="build: output folder")
    i.add_argument("--index", help="query: an index folder")
    i.add_argument("--text", nargs="+", default=[], help="query: texts to look up")
    i.add_argument("-k", type=int, default=5, help="query: classes listed per text")

    e = sub.add_parser("eval", help="mIoU on a standard benchmark or the synthetic world, protocol A or B",
                       formatter_class=formatter, epilog=EVAL_EXAMPLE)
    add_model_options(e, "")
    e.add_argument("--predictions", help="score label-map PNGs instead: PRED_DIR/<image id>.png")
    e.add_argument("--dataset", required=True, choices=sorted(DATASET_KEYS))
    e.add_argument("--root", required=True, help="the dataset folder (its standard layout; see the error if not)")
    e.add_argument("--protocol", choices=("A", "B"), default="A", help="A: GroupViT/TCL lineage; B: SCLIP lineage")
    e.add_argument("--pamr", action="store_true", help="PAMR post-processing (A's threshold becomes 0.4)")
    e.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override protocol fields (crop=336 ...)")
    e.add_argument("--names", help="name files: A, B, a file (one class per line), or synonym (synthetic)")
    e.add_argument("--batch", type=int, default=16, help="windows per forward pass")
    e.add_argument("--limit", type=int, help="the first N images only")
    e.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                   help="an unreadable image: skip it and count it (exit 1), or stop (exit 2)")
    e.add_argument("--missing", choices=("fail", "background"), default="fail",
                   help="with --predictions: an image without a prediction fails the run (default), or is scored "
                        "as all background (the report lists them)")
    e.add_argument("--out", help="the report (JSON)")
    e.add_argument("--convert-coco-object", action="store_true",
                   help="write COCO-Object *_instanceTrainIds.png beside COCO-Stuff's labelTrainIds under --root")

    c = sub.add_parser("calibrate", help="choose a model's read-out and background threshold on a labelled split",
                       formatter_class=formatter,
                       epilog="example:\n  vilseg calibrate --model runs/mine/final --dataset synthetic --root "
                              "data/demo/calib\n  vilseg calibrate --model runs/mine/final --dataset voc21 --root "
                              "data/VOCdevkit/VOC2012 --limit 200\nwrites MODEL/readout.json, which segment, web and "
                              "eval then use; the fastest read-out within 1 mIoU of the best wins.")
    c.add_argument("--model", required=True, help="a vilseg model folder (save_pretrained); readout.json goes here")
    c.add_argument("--dataset", required=True, choices=[k for k in DATASET_KEYS if k in
                                                        ("voc21", "context60", "coco_object", "synthetic")],
                   help="a labelled split with a background class (the threshold decides background)")
    c.add_argument("--root", required=True, help="the dataset folder")
    c.add_argument("--limit", type=int, help="calibrate on the first N images only (default: all)")
    c.add_argument("--grouping", help="fix the grouping (default: clusters)")
    c.add_argument("--naming", help="fix the naming (default: the split chooses among pool, masked_attention@k, "
                                    "reencode_global)")
    c.add_argument("--blocks", type=lambda v: v if v == "all" else int(v),
                   help="with --naming masked_attention: fix k (an int or 'all')")
    c.add_argument("--out", help="also write every candidate's threshold sweep to this JSON file")

    p = sub.add_parser("probe", help="MMC's probes of an encoder's patch features", formatter_class=formatter,
                       epilog="example:\n  vilseg probe --model runs/demo/train/final --dataset synthetic --root "
                              "data/demo/eval --out runs/probe\n  vilseg probe --timm vit_small_patch16_224 "
                              "--checkpoint dino_vits16.safetensors --dataset voc21 --root data/VOCdevkit/VOC2012 "
                              "--out runs/probe_dino\nwrites probes.json (prompting-patch segmentation, intra/inter-"
                              "object similarity) and intra_inter.png;\nVOC's objects come from SegmentationObject/"
                              " where present, elsewhere from each class's connected components.")
    p.add_argument("--model", help="a vilseg model folder")
    p.add_argument("--timm", help="a bare timm encoder by name")
    p.add_argument("--limit", type=int, help="probe the first N images only (default: all)")
    p.add_argument("--checkpoint", help="with --timm: a local weights file (default: random weights)")
    p.add_argument("--dataset", default="synthetic", choices=sorted(DATASET_KEYS))
    p.add_argument("--root", required=True, help="the dataset folder")
    p.add_argument("--size", type=int, help="input short side (default: the model's training size; timm: 224)")
    p.add_argument("--out", required=True, help="output folder (probes.json and the similarity histogram PNG)")

    t = sub.add_parser("train", help="accelerate launch vilseg/train.py ...", formatter_class=formatter,
                       epilog="example:\n  vilseg train --config configs/demo.yaml "
                              "data.shards='data/demo/train-{000000..000014}.tar'\n"
                              "  vilseg train --launch-args='--multi_gpu --num_processes 8' --config ...\n"
                              "everything after the options goes to vilseg/train.py (see its --help)")
    t.add_argument("--launch-args", default="", help="options for accelerate launch, quoted")
    t.add_argument("--config", help="experiment YAML, layered on configs/default.yaml")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from run.dir's latest checkpoint, or from the given checkpoint folder")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in run.dir (config, checkpoints, export); without it, or --resume, "
                        "a used run.dir is refused")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")

    w = sub.add_parser("web", help="the web demo (Gradio; the `web` extra)", formatter_class=formatter,
                       epilog="example:\n  vilseg web --model runs/demo/train/final --port 7860")
    add_model_options(w, "")
    w.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    w.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.subcommands = sub.choices  # name -> subparser: a subcommand's own usage on its errors
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    default_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):  # vilseg's own warnings (duplicate names, ...)
        if str(Path(__file__).resolve().parent) in str(Path(filename).resolve()):
            return f"{PROG}: warning: {message}\n"
        return default_format(message, category, filename, lineno, line)

    if not getattr(warnings.formatwarning, "vilseg", False):
        one_line.vilseg = True
        warnings.formatwarning = one_line
    global PROG
    parser = build_parser()
    PROG = "vilseg"
    if argv and argv[0] == "train":  # everything after our own options is train.py's
        args, rest = parser.parse_known_args(argv)
        PROG = "vilseg train"
        args.launch_args = args.launch_args.split()
        try:
            return cmd_train(args, [*args.overrides, *rest])
        except UserError as exn:
            fail(str(exn))
    args, extra = parser.parse_known_args(argv)
    PROG = f"vilseg {args.command}"
    if extra:  # a mistyped option: the subcommand's usage, not the top level's
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    handlers = {"segment": cmd_segment, "index": cmd_index, "eval": cmd_eval, "probe": cmd_probe, "web": cmd_web,
                "calibrate": cmd_calibrate}
    try:
        code = handlers[args.command](args)
    except UserError as exn:
        fail(str(exn))
    except ValueError as exn:  # e.g. an empty vocabulary or class name
        fail(str(exn))
    except OSError as exn:  # an unreadable file, named in the message (eval --on-error stop)
        fail(str(exn))
    if code:
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    main()
