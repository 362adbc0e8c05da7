"""Segmenter latency per read-out against the bare image-encoder forward, and VocabularyIndex query latency and
recall, in one run.

1. Read-outs. For each read-out the demo calibrates (clusters named by pooled patches, by masked attention in the
   last 1, 2 or all blocks, by re-encoding) and the dense grouping, the median latency of ``Segmenter.segment`` on one real photograph
   (scikit-image's astronaut) at the model's input size, end to end (forward, grouping, naming, top-k search, label
   map), and of the read-out alone (``group_and_name``), each against the bare image-encoder forward at the same
   resolution: the demo model at 64 px and ViT-S/16 at 224 px. Rows "@512px" give the same photograph at its own
   512 x 512: the resize and the full-size label map (bilinear class scores, arg-max) are a cost of the output size,
   not of the model. Rows "clip ..." (part ``clip``): a CLIP ViT-B-16's read-outs at 224 and 448 px. The demo model
   is the trained
   one given by ``--demo-model`` (its clusters make the segments a trained model makes), else random-init; ViT-S/16
   is random-init. The number of segments per image (after the Segmenter's cap, ``ReadOut.max_segments``) is
   recorded, since re-encoding costs one view per segment.
2. Vocabulary. ``VocabularyIndex.search`` (top-5 classes of 8 segment queries: one image) over 1k, 21k and 100k names,
   exact (flat) and approximate (HNSW), and the approximate index's recall@1 against the exact one. Names are real
   text embedded by the demo model's text side (MiniLM): ImageNet-21k's classes, and for 100k the classes plus
   "<colour> <class>" names; one template ("{}") keeps building 100k embeddings to a few minutes. Queries are of two
   kinds: text ("a photo of a <name>", a held-out template) and image segments of the demo model on synthetic scenes.

Everything runs with one torch and one faiss thread (latency of one request; more threads divide it on a server).

    python benchmarks/segment.py --demo-model runs/demo/train/final --out benchmarks/results/segment_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

EF_SEARCH = (16, 32, 64, 128)  # HNSW query-time breadth: speed against recall
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "brown", "grey", "orange", "pink", "purple",
           "small", "large", "old", "wooden", "metal", "striped", "spotted", "broken", "wet"]


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def photograph():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def readout_rows(model, name: str, repeats: int) -> list[dict]:
    from vilseg.demo import CANDIDATES, readout_key
    from vilseg.inference import ReadOut, Segmenter
    from vilseg.inference.vocabularies import load_vocabulary

    size = model.config.image.img_size
    photo = photograph()
    image = photo.resize((size, size))
    vocabulary = load_vocabulary("voc21")
    base = Segmenter(model, vocabulary=vocabulary, device="cpu")
    x, _ = base.preprocess(image)
    with torch.no_grad():
        forward = median_ms(lambda: model.image_encoder(x), repeats)
    rows = [{"model": name, "input": list(x.shape[-2:]), "readout": "bare encoder forward", "segment_ms": forward,
             "segment_ratio": 1.0}]
    # every read-out the demo's calibration chooses from, and the dense grouping (single patches, pooled); segments
    # are bounded as the Segmenter bounds them (ReadOut.max_segments)
    for grouping, naming, blocks in [*CANDIDATES, ("dense", "pool", None)]:
        key = readout_key(grouping, naming, blocks)
        seg = Segmenter(model, vocabulary=base.index, device="cpu",
                        readout=ReadOut(grouping, naming, **({"blocks": blocks} if blocks else {})))
        ids, _ = seg.group_and_name(x)
        total = median_ms(lambda: seg.segment(image), repeats)
        readout = median_ms(lambda: seg.group_and_name(x), repeats)
        rows.append({"model": name, "input": list(x.shape[-2:]), "readout": key, "segments": int(ids.max()) + 1,
                     "segment_ms": total, "segment_ratio": total / forward, "group_and_name_ms": readout,
                     "group_and_name_ratio": readout / forward})
        print(f"{name:>12} {key:<30} {rows[-1]['segments']:4d} segments  {total:8.1f} ms ({total / forward:5.2f}x)  "
              f"read-out only {readout / forward:5.2f}x", flush=True)
        if grouping == "clusters":
            total = median_ms(lambda: seg.segment(photo), max(3, repeats // 4))
            rows.append({"model": name, "input": list(x.shape[-2:]), "readout": f"{key} @512px",
                         "segment_ms": total, "segment_ratio": total / forward})
    return rows


CLIP_READOUTS = [("dense", "naclip", None), ("dense", "sclip", None), ("dense", "maskclip", None),
                 ("dense", "pool", None), ("merge", "masked_attention", 1), ("merge", "reencode_global", None)]


def clip_rows(sizes=(224, 448), repeats: int = 5) -> list[dict]:
    """A CLIP's read-outs (random ViT-B-16 weights: the cost does not depend on them) on the photograph resized to
    each size, against the bare encoder forward at that size; rows named ``clip <grouping>+<naming>``. The default
    read-out of ``Segmenter.from_open_clip`` is ``dense+naclip``."""
    from vilseg.demo import readout_key
    from vilseg.inference import ReadOut, Segmenter
    from vilseg.inference.vocabularies import load_vocabulary
    from vilseg.models import from_open_clip

    torch.manual_seed(0)
    model = from_open_clip("ViT-B-16").eval()
    vocabulary = load_vocabulary("voc21")
    rows = []
    for size in sizes:
        image = photograph().resize((size, size))
        base = Segmenter(model, vocabulary=vocabulary, device="cpu", center=False,
                         readout=ReadOut("dense", "naclip", threshold=None, max_segments=None, input_size=size))
        x, _ = base.preprocess(image)
        with torch.no_grad():
            forward = median_ms(lambda: model.image_encoder(x), repeats)
        rows.append({"model": "clip ViT-B-16 (random)", "input": list(x.shape[-2:]), "readout": "bare encoder forward",
                     "segment_ms": forward, "segment_ratio": 1.0})
        for grouping, naming, blocks in CLIP_READOUTS:
            seg = Segmenter(model, vocabulary=base.index, device="cpu", center=False, readout=ReadOut(
                grouping, naming, threshold=None, max_segments=16 if grouping == "merge" else None, input_size=size,
                **({"blocks": blocks} if blocks else {})))
            ids, _ = seg.group_and_name(x)
            n = repeats if naming != "reencode_global" else 2
            # paired: each repeat times the bare forward, the whole segment call and the read-out alone back to back,
            # and the medians of the per-repeat ratios are reported (robust to the machine's drift between rows)
            with torch.no_grad():
                timings = [(median_ms(lambda: model.image_encoder(x), 1, warmup=0),
                            median_ms(lambda: seg.segment(image), 1, warmup=0),
                            median_ms(lambda: seg.group_and_name(x), 1, warmup=0)) for _ in range(n)]
            f, total, readout = (np.array(t) for t in zip(*timings))
            key = "clip " + readout_key(grouping, naming, blocks)
            rows.append({"model": "clip ViT-B-16 (random)", "input": list(x.shape[-2:]), "readout": key,
                         "segments": int(ids.max()) + 1, "forward_ms": float(np.median(f)),
                         "segment_ms": float(np.median(total)), "segment_ratio": float(np.median(total / f)),
                         "group_and_name_ms": float(np.median(readout)),
                         "group_and_name_ratio": float(np.median(readout / f)), "repeats": n})
            print(f"ViT-B-16 {size}px {key:<36} {rows[-1]['segment_ms']:8.1f} ms ({rows[-1]['segment_ratio']:5.2f}x)"
                  f"  read-out only {rows[-1]['group_and_name_ratio']:5.2f}x", flush=True)
    return rows


def segment_queries(model, n_images: int = 20) -> torch.Tensor:
    """Segment embeddings of the demo model (clusters, re-encoded) on synthetic evaluation scenes."""
    from vilseg.data.synthetic import SyntheticWorld
    from vilseg.inference import ReadOut, Segmenter

    seg = Segmenter(model, vocabulary=["red circle", "blue square"], readout=ReadOut("clusters", "reencode_global"),
                    device="cpu")
    world = SyntheticWorld("eval", image_size=model.config.image.img_size, seed=3)
    out = []
    for i in range(n_images):
        x, _ = seg.preprocess(world.scene(i).image)
        out.append(seg.group_and_name(x)[1])
    return torch.cat(out)


def vocabulary_rows(model, sizes: list[int], repeats: int, cache_dir: str | None = None
                    ) -> tuple[list[dict], dict]:
    from vilseg.inference import VocabularyIndex
    from vilseg.inference.vocabularies import load_vocabulary
    from vilseg.inference.vocabulary import embed_names, text_identity

    classes = list(load_vocabulary("imagenet21k"))
    rng = np.random.default_rng(0)
    names = list(classes)
    extra = [f"{c} {n}" for c in COLOURS for n in classes]
    rng.shuffle(extra)
    names += extra[: max(0, max(sizes) - len(names))]
    cache = Path(cache_dir) / f"names-{text_identity(model)[:16]}-{len(names)}.npy" if cache_dir else None
    t0 = time.perf_counter()
    if cache is not None and cache.is_file():  # the embeddings of an earlier run (same text side, same names)
        vectors, embed_s = torch.from_numpy(np.load(cache)), None
    else:
        vectors = embed_names(model, names, ("{}",), batch_size=512)
        embed_s = time.perf_counter() - t0
        print(f"embedded {len(names)} names in {embed_s:.0f} s ({len(names) / embed_s:.0f} names/s)", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, vectors.numpy())
    picks = rng.choice(len(classes), 400, replace=False)
    queries = {"text": embed_names(model, [classes[i] for i in picks], ("a photo of a {}.",)),
               "segments": segment_queries(model)}
    rows = []
    for size in sizes:
        vocab_vectors = vectors[:size]
        mean = vocab_vectors.mean(0)
        centred = torch.nn.functional.normalize(vocab_vectors - mean, dim=-1)
        owner = torch.arange(size)
        built = {}
        for kind in ("flat", *(f"hnsw-ef{ef}" for ef in EF_SEARCH)):
            t0 = time.perf_counter()
            if kind.startswith("hnsw") and "hnsw" in built:
                index = built["hnsw"]  # one graph; efSearch is a query-time setting
                build_s = built["hnsw_build_s"]
            else:
                index = VocabularyIndex(centred, owner, names[:size], text_identity(model),
                                        kind="hnsw" if kind.startswith("hnsw") else "flat", center=mean)
                build_s = time.perf_counter() - t0
                if kind.startswith("hnsw"):
                    built["hnsw"], built["hnsw_build_s"] = index, build_s
            if kind.startswith("hnsw"):
                index.index.hnsw.efSearch = int(kind.split("ef")[1])
            else:
                built["flat"] = index
            for qname, q in queries.items():
                q = torch.nn.functional.normalize(q - mean, dim=-1)
                image = q[:8]  # one image: 8 segments
                ms = median_ms(lambda: index.search(image, 5), repeats)
                row = {"names": size, "index": kind, "queries": qname, "search_ms_per_image": ms,
                       "build_s": build_s}
                if kind.startswith("hnsw"):
                    exact = built["flat"].search(q, 1)[1][:, 0]
                    approx = index.search(q, 1)[1][:, 0]
                    row["recall_at_1"] = float((exact == approx).float().mean())
                rows.append(row)
                print(f"{size:>7} names {kind:>11} {qname:>8}: {ms:.3f} ms/image"
                      + (f", recall@1 {row['recall_at_1']:.3f}" if "recall_at_1" in row else ""), flush=True)
        matmul = median_ms(lambda: built["flat"].scores(queries["text"][:8]), repeats)
        rows.append({"names": size, "index": "all-class scores (matmul)", "queries": "text",
                     "search_ms_per_image": matmul})
    info = {"embedding_names_per_s": len(names) / embed_s if embed_s else "cached", "template": "{}",
            "text_queries": len(queries["text"]), "segment_queries": len(queries["segments"])}
    return rows, info


def folder_rows(models: dict[str, str], n_images: int, readouts: list[str], batch_sizes=(1, 16),
                processes=(1, 2), workers: int = 2) -> list[dict]:
    """``vilseg segment FOLDER`` end to end (decode in DataLoader workers, encode in batches, group, name, write the
    three files per image), as a subprocess, one torch thread per process (``accelerate launch --num_processes 2``
    for two), against the bare image encoder at the same batch and the same total threads."""
    import os
    import subprocess
    import sys
    import tempfile

    from vilseg.data.synthetic import SyntheticWorld
    from vilseg.demo import parse_readout
    from vilseg.inference import ReadOut
    from vilseg.models import ViLSeg

    rows = []
    work = Path(tempfile.mkdtemp(prefix="vilseg-bench-folder-"))
    images = work / "images"
    images.mkdir()
    world = SyntheticWorld("eval", image_size=256, seed=5)
    from PIL import Image

    for i in range(n_images):
        Image.fromarray(world.scene(i).image).save(images / f"scene{i:05d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, folder in models.items():
        model = ViLSeg.from_pretrained(folder).eval()
        size = model.config.image.img_size
        for key in readouts:
            grouping, naming, blocks = parse_readout(key)
            copy = work / f"{name.split()[0]}-{key.replace('+', '_').replace('@', '_')}"
            if not copy.is_dir():
                model.save_pretrained(copy)
                ReadOut(grouping, naming, threshold=0.3, **({"blocks": blocks} if blocks else {})).save(copy)
            for batch in batch_sizes:
                for n_proc in processes:
                    out = work / f"out-{copy.name}-{batch}-{n_proc}"
                    command = ["-m", "vilseg.cli", "segment", str(images), "--model", str(copy), "--classes",
                               "red circle,green square,blue triangle,yellow cross", "--batch-size", str(batch),
                               "--workers", str(workers), "--out", str(out)]
                    launch = [sys.executable, *command] if n_proc == 1 else [
                        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                        str(n_proc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        *command]
                    subprocess.run(launch, env=env, check=True, capture_output=True, timeout=3600)
                    stats = json.loads((out / "segment_stats.json").read_text())
                    torch.set_num_threads(n_proc)
                    x = torch.randn(batch, 3, size, size)
                    with torch.no_grad():
                        encoder_ms = median_ms(lambda: model.image_encoder(x), 5)
                    torch.set_num_threads(1)
                    rows.append({"model": name, "readout": key, "batch_size": batch, "processes": n_proc,
                                 "workers_per_process": workers, "images": stats["images"],
                                 "images_per_s": stats["images_per_s"],
                                 "encoder_images_per_s": round(1000 * batch / encoder_ms, 2),
                                 "pipeline_over_encoder": round(stats["images_per_s"] * encoder_ms / (1000 * batch), 3)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-model", default=None, help="a trained demo model folder (default: random init)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", default="1000,5000,10000,21000,100000", help="vocabulary sizes")
    parser.add_argument("--cache", default="runs/bench_cache", help="folder for the names' embeddings (reruns)")
    parser.add_argument("--parts", default="readouts,clip,vocabulary,folder",
                        help="which parts to run; the others are kept from an existing --out file")
    parser.add_argument("--folder-images", type=int, default=256, help="images of the folder benchmark")
    parser.add_argument("--out", default="benchmarks/results/segment_cpu.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    import faiss

    from vilseg.models import ViLSeg, create_model

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    torch.manual_seed(0)
    demo = ViLSeg.from_pretrained(args.demo_model) if args.demo_model else create_model("vilseg-demo")
    vit_s = create_model("vilseg-vit-s16-minilm")
    demo_name = "vilseg-demo" + (" (trained)" if args.demo_model else " (random)")
    report = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    report.update({"machine": f"{platform.node()} {platform.processor() or platform.machine()}, 1 torch thread, "
                              f"1 faiss thread, torch {torch.__version__}, faiss {faiss.__version__}",
                   "demo_model": args.demo_model})
    command = "python benchmarks/segment.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    if "readouts" in parts:
        rows = readout_rows(demo.eval(), demo_name, args.repeats)
        rows += readout_rows(vit_s.eval(), "vit-s16 (random)", max(5, args.repeats // 4))
        report.update({"readouts": rows, "readouts_command": command})
    if "clip" in parts:
        report.update({"clip_readouts": clip_rows(repeats=max(5, args.repeats // 2)), "clip_command": command})
    if "vocabulary" in parts:
        vocab, info = vocabulary_rows(demo.eval(), [int(s) for s in args.sizes.split(",")], args.repeats * 5,
                                      args.cache)
        report.update({"vocabulary": vocab, "vocabulary_setup": info, "vocabulary_command": command})
    if "folder" in parts:
        import tempfile

        vit_dir = Path(tempfile.mkdtemp(prefix="vilseg-vit-s16-"))
        vit_s.save_pretrained(vit_dir)
        models = {demo_name: args.demo_model or str(Path(tempfile.mkdtemp()) / "demo"), "vit-s16 (random)": vit_dir}
        if not args.demo_model:
            demo.save_pretrained(models[demo_name])
        report["folder"] = folder_rows(models, args.folder_images, ["clusters+pool", "clusters+masked_attention@1"])
        report["folder_command"] = command
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
