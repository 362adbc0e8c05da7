"""The lab's yardstick: the demo's image encoder trained with the training split's *pixel labels*, at the compute of
600 ViL-Seg demo steps, scored by the same evaluator on the same splits (issue #30).

    python benchmarks/oracle.py --head factorised --seed 0            # colour and shape predicted separately
    python benchmarks/oracle.py --head joint --seed 0                 # one 17-way head (background + 16 classes)
    python benchmarks/oracle.py --head factorised --seed 0 --scale 4  # four times the compute

What it trains (``benchmarks/recipes.py`` reports it as the recipes ``oracle`` and ``oracle16``):

- the image encoder of ``scratch`` (``vilseg-demo``: 4-block ViT, 64 px, patch 8, conv stem), randomly initialised
  from the run's seed, and a linear head on its patch tokens: ``factorised`` predicts objectness (1 logit), colour
  (4) and shape (4), so that a colour-shape combination training never shows can still be predicted, as the product
  p(fg) p(colour) p(shape); ``joint`` predicts the 17 labels directly (it cannot predict a held-out combination);
- on the scenes of the demo's training shards (the synthetic world's ``train`` split, the same 30,000 scenes; their
  masks are re-rendered from the scene index, since the shards carry captions, not masks), with the demo's global
  view (RandomResizedCrop to 64 px, scale 0.6-1, on image and mask together) and a horizontal flip, one view per
  image, batch 64;
- with the demo's optimizer (AdamW, lr 1e-3, warm-up 50 steps, cosine to 1%, ``configs/demo.yaml``'s optim section
  through ``vilseg.train.build_optimizer``/``build_scheduler``), for as many steps as spend the FLOPs of 600 ViL-Seg
  demo steps (76.6 GFLOP each, docs/results.md section 4; the oracle's step is counted here with
  ``torch.utils.flop_counter``);
- loss: per-pixel cross-entropy on logits upsampled bilinearly from the patch grid (factorised: binary
  cross-entropy of objectness on every pixel, colour and shape cross-entropy on object pixels).

Evaluation: ``vilseg.eval.evaluate`` on ``data/demo/eval`` with protocol A's synthetic preset, except that the
background is the oracle's own posterior (argmax over background and the 16 classes; no threshold to calibrate, as a
supervised model has a background output). Held-out combinations are the 4 classes training never shows; the oracle
has no text side, so it has no synonym numbers. Writes OUT/report.json; the run resumes from OUT/checkpoint.pt.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEMO_STEP_FLOPS = 76.6e9  # one ViL-Seg demo step (benchmarks/train_step.py, set vilseg; docs/results.md section 4)
BUDGET_STEPS = 600  # the demo's steps: the compute every recipe spends at --scale 1
BATCH = 64


class OracleHead(nn.Module):
    """A linear map of patch tokens to per-patch label logits."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        if kind not in ("factorised", "joint"):
            raise ValueError(f"head must be 'factorised' or 'joint', got {kind!r}")
        self.kind = kind
        self.linear = nn.Linear(width, 9 if kind == "factorised" else 17)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """[B, N, D] patch tokens -> [B, K, H, W] logits upsampled to the pixels."""
        b, n, _ = tokens.shape
        logits = self.linear(tokens).transpose(1, 2).reshape(b, -1, *grid)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def log_posterior(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, K, H, W] logits -> [B, 17, H, W] log-probabilities of background and the 16 classes (label order of
        the synthetic world: colour-major, class i + 1 = COLOURS[i // 4], SHAPES[i % 4])."""
        if self.kind == "joint":
            return logits.log_softmax(1)
        fg, colour, shape = logits[:, :1], logits[:, 1:5].log_softmax(1), logits[:, 5:9].log_softmax(1)
        classes = F.logsigmoid(fg)[:, :, None] + colour[:, :, None] + shape[:, None, :]  # [B, 4, 4, H, W]
        return torch.cat([F.logsigmoid(-fg), classes.flatten(1, 2)], 1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against [B, H, W] labels (0 background, 1..16)."""
        if self.kind == "joint":
            return F.cross_entropy(logits, labels)
        fg = labels > 0
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], fg.float())
        if fg.any():
            idx = (labels - 1).clamp_min(0)
            colour, shape = idx // 4, idx % 4
            pix = lambda t: t.permute(0, 2, 3, 1)[fg]  # noqa: E731  [P, K] at object pixels
            loss = loss + F.cross_entropy(pix(logits[:, 1:5]), colour[fg]) + F.cross_entropy(pix(logits[:, 5:9]),
                                                                                           shape[fg])
        return loss


class Oracle(nn.Module):
    def __init__(self, encoder, kind: str):
        super().__init__()
        self.image_encoder = encoder
        self.head = OracleHead(encoder.width, kind)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        feats = self.image_encoder(self.image_encoder.normalize(images01))
        return self.head(feats.patch_tokens, feats.grid, images01.shape[-2:])


class Scenes(torch.utils.data.Dataset):
    """The demo shards' training scenes (the synthetic world's train split), rendered with their masks, one
    augmented view each."""

    def __init__(self, n: int, image_size: int = 64, world_seed: int = 0, scale=(0.6, 1.0)):
        from torchvision.transforms import v2

        from vilseg.data.synthetic import SyntheticWorld

        self.world, self.n = SyntheticWorld("train", image_size=image_size, seed=world_seed), n
        self.transform = v2.Compose([v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
                                     v2.RandomHorizontalFlip()])

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        from torchvision import tv_tensors

        scene = self.world.scene(index)
        image = tv_tensors.Image(torch.from_numpy(scene.image).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(scene.mask.astype(np.int64)))
        image, mask = self.transform(image, mask)
        return image.float() / 255, mask.long()


class OraclePredictor:
    """The oracle as the evaluator's dense predictor: every class's log-posterior at every pixel, background
    included (its own 'name'), so the protocol's arg-max rule decides background too."""

    def __init__(self, model: Oracle, n_classes: int = 17):
        self.model = model.eval()
        self.size = 64
        self.default_templates = ("{}",)
        self.n_classes = n_classes

    def describe(self) -> dict:
        return {"kind": "oracle", "head": self.model.head.kind}

    def calibrated_threshold(self):
        return None

    def set_names(self, names: list[list[str]], templates):
        # the oracle has no text side: one score per class, background's own included
        return [f"class {c}" for c in range(self.n_classes)], torch.arange(self.n_classes)

    @torch.no_grad()
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return self.model.head.log_posterior(self.model(windows))


def build(kind: str, seed: int) -> Oracle:
    from vilseg.models.config import model_config_from_dict
    from vilseg.models.factory import get_model_config
    from vilseg.models.image_encoder import build_image_encoder

    torch.manual_seed(seed)
    cfg = model_config_from_dict(get_model_config("vilseg-demo"))
    return Oracle(build_image_encoder(cfg.image), kind)


def step_flops(model: Oracle) -> float:
    """FLOPs of one training step (forward and backward) at batch 64."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.rand(BATCH, 3, 64, 64), torch.randint(0, 17, (BATCH, 64, 64))
    with FlopCounterMode(display=False) as counter:
        model.head.loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def evaluate(model: Oracle, data: Path) -> dict:
    from vilseg import eval as ev
    from vilseg.demo import group_miou

    meta = json.loads((data / "eval" / "meta.json").read_text())
    protocol = dataclasses.replace(ev.preset("A", "synthetic"), bg_threshold=None)
    out = {}
    for split in ("eval", "calib"):
        report = ev.evaluate(OraclePredictor(model), ev.load_dataset("synthetic", data / split), protocol,
                             progress=False)
        iou = report["per_class"]
        out[split] = {"miou": report["miou"], "per_class_iou": iou,
                      "seen_miou": group_miou(iou, meta["seen_classes"]),
                      "heldout_combo_miou": group_miou(iou, meta["heldout_classes"])}
    return out


def train(kind: str, seed: int, scale: float, data: Path, out: Path, threads: int | None = None) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from vilseg.train import build_optimizer, build_scheduler
    from vilseg.training.config import load_config

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    model = build(kind, seed)
    flops = step_flops(model)
    steps = max(1, round(BUDGET_STEPS * scale * DEMO_STEP_FLOPS / flops))
    cfg = load_config(str(REPO / "configs/demo.yaml"), [f"train.steps={steps}"])
    optimizer, step = build_optimizer(model, cfg), 0
    scheduler = build_scheduler(optimizer, cfg)
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():  # our own file, read without unpickling code
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    train_n = json.loads((data / "manifest.json").read_text())["train_samples"]
    generator = torch.Generator().manual_seed(seed * 1000 + step)  # a resumed run draws a fresh order from there
    loader = torch.utils.data.DataLoader(Scenes(train_n), batch_size=BATCH, num_workers=1, drop_last=True,
                                         sampler=torch.utils.data.RandomSampler(Scenes(train_n), replacement=True,
                                                                                num_samples=BATCH * (steps - step),
                                                                                generator=generator))
    model.train()
    start, first = time.time(), step
    with tqdm(total=steps, initial=step, desc=f"oracle {kind} seed {seed}") as bar:
        for images, labels in loader:
            loss = model.head.loss(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % 300 == 0 or step == steps:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "step": step}, tmp)
                tmp.replace(ckpt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    report = {"head": kind, "seed": seed, "scale": scale, "steps": steps, "step_gflop": flops / 1e9,
              "budget_gflop": BUDGET_STEPS * scale * DEMO_STEP_FLOPS / 1e9,
              "cpu_minutes_this_session": (time.time() - start) / 60,
              "minutes_per_step": (time.time() - start) / 60 / max(1, step - first),
              "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, 2 cores",
              **evaluate(model, data)}
    report["cpu_minutes"] = report["minutes_per_step"] * steps
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", choices=("factorised", "joint"), default="factorised")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--data", type=Path, default=REPO / "data/demo")
    p.add_argument("--out", type=Path, default=REPO / "runs/oracle")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    out = args.out / args.head / (f"seed{args.seed}" + (f"@x{args.scale:g}" if args.scale != 1 else ""))
    report = train(args.head, args.seed, args.scale, args.data, out, args.threads)
    print(json.dumps({k: v for k, v in report.items() if k not in ("eval", "calib")}))
    print(json.dumps({s: {k: round(v, 2) for k, v in report[s].items() if k != "per_class_iou"}
                      for s in ("eval", "calib")}))
    return report


if __name__ == "__main__":
    main()
