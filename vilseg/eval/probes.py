"""Probes of an image encoder's patch features on a labelled split (images/ + masks/ + meta.json).

- :func:`prompt_patch_segmentation` (MMC): one patch on an object prompts a cosine-similarity map to every patch;
  thresholded at theta it is a zero-shot segmentation of that object.
- :func:`intra_inter_similarity` (MMC): cosine similarities of patch pairs inside one object against pairs across
  objects (or object and background); MMC claims its pretraining separates the two.
- :func:`linear_probe`: how linearly decodable an attribute (shape, colour) is from each object's pooled patch
  features, cross-validated by image.
- :func:`patch_naming_accuracy`: per foreground pixel, whether the best text query names the right attribute
  (needs a text-aligned model).

Objects are the connected components of each class label of the masks (:func:`instance_masks`).
"""
from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

THETAS = tuple(np.round(np.arange(0.1, 0.91, 0.1), 2))


def instance_masks(label: np.ndarray, min_pixels: int = 16, instances: np.ndarray | None = None
                   ) -> list[tuple[int, np.ndarray]]:
    """[H, W] class labels (0 background, 255 ignored) -> [(class, [H, W] bool mask)] of every object with at least
    ``min_pixels`` pixels: the given instance map's objects (VOC's ``SegmentationObject``: 1..N, 0 background, 255
    boundaries; the class is the most frequent label inside), else the 4-connected components of each class."""
    from ..inference.strategies import connected_components

    if instances is not None:
        out = []
        for iid in np.unique(instances):
            if iid in (0, 255):
                continue
            mask = instances == iid
            classes = label[mask]
            classes = classes[(classes > 0) & (classes != 255)]
            if mask.sum() >= min_pixels and len(classes):
                out.append((int(np.bincount(classes).argmax()), mask))
        return out

    lab = torch.from_numpy(label.astype(np.int64))
    comp = connected_components(lab[None])[0]
    out = []
    for cid in torch.unique(comp[(lab > 0) & (lab != 255)]).tolist():
        mask = (comp == cid).numpy()
        if mask.sum() >= min_pixels:
            out.append((int(label[mask][0]), mask))
    return out


class EncoderFeatures:
    """L2-normalised patch features of images, from a vilseg model's image encoder (the backbone, before any
    projection) or, with ``joint=True``, from its joint-space patch embeddings.

    Args:
        model: a :class:`~vilseg.ViLSeg`.
        joint: use the joint image-text space instead of the encoder's tokens.
        device: torch device.
    """

    def __init__(self, model, joint: bool = False, device: str | torch.device = "cpu", size: int | None = None):
        self.model, self.joint, self.device = model.to(device).eval(), joint, torch.device(device)
        self.patch = model.image_encoder.patch_size
        self.size = size or model.config.image.img_size

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> [D, h, w] normalised patch features (short side resized to ``size``, sides rounded to the
        patch size)."""
        x = _tensor(image, self.size, self.patch).to(self.device)
        feats = self.model.image_encoder(self.model.image_encoder.normalize(x))
        tokens = self.model.image_proj(feats.patch_tokens) if self.joint else feats.patch_tokens  # [1, N, D]
        h, w = feats.grid
        return F.normalize(tokens[0], dim=-1).t().reshape(-1, h, w).cpu()


def _tensor(image: Image.Image, size: int, patch: int) -> torch.Tensor:
    """[1, 3, h, w] in [0, 1]: short side ``size``, both sides multiples of ``patch``."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(patch, round(width * scale / patch) * patch), max(patch, round(height * scale / patch) * patch))
    if new != image.size:
        image = image.resize(new, Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class TimmFeatures:
    """L2-normalised patch features of a bare timm ViT (any image size: ``dynamic_img_size``), for probing encoders
    that vilseg did not train.

    Args:
        name: a timm model name ("vit_small_patch16_224").
        checkpoint: a local weights file (safetensors or a state dict), or None for random weights.
        size: short side of the input in pixels.
    """

    def __init__(self, name: str, checkpoint: str | None = None, size: int = 224, device="cpu"):
        import timm

        kwargs = {"checkpoint_path": checkpoint} if checkpoint else {}
        self.model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                       **kwargs).to(device).eval()
        self.device, self.size = torch.device(device), size
        self.patch = self.model.patch_embed.patch_size[0]
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = (_tensor(image, self.size, self.patch) - self.mean) / self.std
        tokens = self.model.forward_features(x.to(self.device))[:, self.model.num_prefix_tokens:]  # [1, N, D]
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        return F.normalize(tokens[0], dim=-1).t().reshape(-1, h, w).cpu()


def _samples(data, desc: str = "probe"):
    """(PIL image, [H, W] labels, [H, W] instance ids or None) of every image of a :class:`~vilseg.eval.Dataset` (its
    label handling applied) or of a list of (key, image path, mask path); a progress bar on a terminal."""
    from tqdm.auto import tqdm

    from .datasets import Dataset

    if isinstance(data, Dataset):
        for item in tqdm(data.items, desc=desc, unit="image", mininterval=2, leave=False, disable=None):
            yield Image.fromarray(data.image(item)), data.label(item), data.instances(item)
        return
    for _, image_path, mask_path in data:
        yield Image.open(image_path).convert("RGB"), np.asarray(Image.open(mask_path)), None


def _prompt_point(mask: np.ndarray, rng: np.random.Generator | None) -> tuple[int, int]:
    """(y, x) of the mask centroid snapped to the nearest mask pixel, or a random interior pixel with ``rng``."""
    ys, xs = np.nonzero(mask)
    if rng is not None:
        i = rng.integers(len(ys))
    else:
        i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[i]), int(xs[i])


def prompt_patch_segmentation(features: EncoderFeatures, items, thetas=THETAS, seed: int = 0) -> dict:
    """MMC's prompting-patch zero-shot segmentation, averaged over every object of the split.

    For each object: the patch under the prompt point gives a feature f; its cosine similarity to every patch,
    upsampled bilinearly to the image, thresholded at theta, is the predicted mask, scored by IoU with the object.

    Returns:
        for each prompt ("centroid": the mask centroid snapped inside the mask; "random": a random interior pixel):
        ``sweep`` (theta -> mean IoU, %), ``best_theta``, ``best_miou`` (best fixed theta) and ``oracle_miou``
        (each object's best theta), plus ``objects``.
    """
    rng = np.random.default_rng(seed)
    ious = {"centroid": [], "random": []}
    for image, label, instances in _samples(items):
        feats = features(image)  # [D, h, w]
        d, h, w = feats.shape
        height, width = label.shape
        for _, mask in instance_masks(label, instances=instances):
            for prompt in ious:
                y, x = _prompt_point(mask, rng if prompt == "random" else None)
                f = feats[:, y * h // height, x * w // width]
                sim = torch.einsum("d,dhw->hw", f, feats)[None, None]
                sim = F.interpolate(sim, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
                row = []
                for theta in thetas:
                    pred = sim >= theta
                    union = (pred | mask).sum()
                    row.append((pred & mask).sum() / union if union else 0.0)
                ious[prompt].append(row)
    out = {}
    for prompt, rows in ious.items():
        rows = 100 * np.array(rows)  # [objects, thetas]
        sweep = rows.mean(0)
        best = int(sweep.argmax())
        out[prompt] = {"sweep": {float(t): float(v) for t, v in zip(thetas, sweep)}, "best_theta": float(thetas[best]),
                       "best_miou": float(sweep[best]), "oracle_miou": float(rows.max(1).mean())}
    out["objects"] = len(ious["centroid"])
    return out


def intra_inter_similarity(features: EncoderFeatures, items, bins: int = 100, plot: str | None = None) -> dict:
    """MMC's intra- vs inter-object similarity of patch features.

    Every patch takes the object covering most of its pixels (background if none). Intra: pairs of distinct
    patches of one object. Inter: pairs of patches of two different objects, or of an object and the background
    (background-background pairs are neither).

    Returns:
        ``intra_mean``, ``inter_mean``, ``overlap`` (histogram intersection of the two normalised histograms over
        [-1, 1], in %: 0 = fully separated, 100 = identical), ``auc`` (probability that an intra pair is more
        similar than an inter pair), pair counts; writes a histogram PNG to ``plot`` if given.
    """
    intra, inter = [], []
    for image, label, instances in _samples(items):
        feats = features(image)
        d, h, w = feats.shape
        owner = np.zeros(label.shape, np.int64)
        for k, (_, mask) in enumerate(instance_masks(label, instances=instances), start=1):
            owner[mask] = k
        patch_owner = _majority(owner, h, w).reshape(-1)  # [N]
        flat = feats.reshape(d, -1).t()  # [N, D]
        sim = (flat @ flat.t()).numpy()
        same = patch_owner[:, None] == patch_owner[None, :]
        fg_i, fg_j = patch_owner[:, None] > 0, patch_owner[None, :] > 0
        upper = np.triu(np.ones_like(same), 1)
        intra.append(sim[upper & same & fg_i])
        inter.append(sim[upper & ~same & (fg_i | fg_j)])
    intra, inter = np.concatenate(intra), np.concatenate(inter)
    edges = np.linspace(-1, 1, bins + 1)
    h_intra = np.histogram(intra, edges)[0] / max(len(intra), 1)
    h_inter = np.histogram(inter, edges)[0] / max(len(inter), 1)
    out = {"intra_mean": float(intra.mean()), "inter_mean": float(inter.mean()),
           "overlap": float(100 * np.minimum(h_intra, h_inter).sum()), "auc": _auc(intra, inter),
           "intra_pairs": int(len(intra)), "inter_pairs": int(len(inter))}
    if plot:
        _plot_histograms(edges, h_intra, h_inter, out, plot)
    return out


def _majority(owner: np.ndarray, h: int, w: int) -> np.ndarray:
    """[H, W] object ids -> [h, w] the id covering most of each patch's pixels."""
    height, width = owner.shape
    ph, pw = height // h, width // w
    blocks = owner[:h * ph, :w * pw].reshape(h, ph, w, pw).transpose(0, 2, 1, 3).reshape(h, w, -1)
    return np.apply_along_axis(lambda v: np.bincount(v).argmax(), 2, blocks)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2, from ranks (Mann-Whitney U); NaN when either side has no pair."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    values = np.concatenate([pos, neg])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    cumulative = np.cumsum(counts)
    ranks = (cumulative - (counts - 1) / 2)[inverse]  # average ranks for ties
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _plot_histograms(edges, h_intra, h_inter, stats: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = (edges[1:] + edges[:-1]) / 2
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.fill_between(centres, h_intra, step="mid", alpha=0.5, label=f"intra-object (mean {stats['intra_mean']:.2f})")
    ax.fill_between(centres, h_inter, step="mid", alpha=0.5, label=f"inter-object (mean {stats['inter_mean']:.2f})")
    ax.set_xlabel("cosine similarity of two patches")
    ax.set_ylabel("fraction of pairs")
    ax.set_title(f"overlap {stats['overlap']:.1f}%   AUC {stats['auc']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def object_features(features: EncoderFeatures, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every object's patch features, averaged with weights = the fraction of each patch it covers, then
    L2-normalised. Returns ([n, D] features, [n] class labels, [n] image index)."""
    feats_out, labels, groups = [], [], []
    for index, (image, label, instances) in enumerate(_samples(items)):
        feats = features(image)
        d, h, w = feats.shape
        for cls, mask in instance_masks(label, instances=instances):
            cover = F.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None], (h, w))[0]  # [h, w]
            pooled = (feats * cover).sum((1, 2)) / cover.sum()
            feats_out.append(F.normalize(pooled, dim=0).numpy())
            labels.append(cls)
            groups.append(index)
    return np.stack(feats_out), np.array(labels), np.array(groups)


def linear_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5, l2: float = 1e-3,
                 seed: int = 0) -> float:
    """Balanced accuracy (mean per-class recall, %) of a multinomial logistic regression, cross-validated with
    ``folds`` folds of whole images (no image is both trained and tested on). Features are standardised on each
    training fold; the regression is fitted with L-BFGS and an L2 penalty ``l2`` (torch, float64).
    """
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    images = rng.permutation(np.unique(groups))
    fold_of = {g: i % folds for i, g in enumerate(images)}
    fold = np.array([fold_of[g] for g in groups])
    classes = np.unique(y)
    target = np.searchsorted(classes, y)
    correct = np.zeros(len(classes))
    total = np.zeros(len(classes))
    for k in range(folds):
        train, test = fold != k, fold == k
        if not test.any() or len(np.unique(target[train])) < 2:
            continue
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        xt = torch.from_numpy((x[train] - mean) / std)
        yt = torch.from_numpy(target[train])
        weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(xt @ weight + bias, yt) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            pred = (torch.from_numpy((x[test] - mean) / std) @ weight + bias).argmax(1).numpy()
        for c in range(len(classes)):
            sel = target[test] == c
            correct[c] += (pred[sel] == c).sum()
            total[c] += sel.sum()
    seen = total > 0
    return float(100 * (correct[seen] / total[seen]).mean())


@torch.no_grad()
def patch_naming_accuracy(segmenter, items, names: list[str]) -> dict:
    """Per ground-truth foreground pixel, the dense read-out's best query (no background threshold): the fraction
    (%) whose class, colour and shape are right (names are "<colour> <shape>"; chance 1/Q, and 1/4 for the
    synthetic world's colours and shapes). ``segmenter`` must use the dense grouping with ``names`` as its
    vocabulary."""
    colour = [n.split()[0] for n in names]
    shape = [n.split()[-1] for n in names]
    same_colour = torch.tensor([[a == b for b in colour] for a in colour])
    same_shape = torch.tensor([[a == b for b in shape] for a in shape])
    total = right = right_colour = right_shape = 0
    for image, label, instances in _samples(items):
        scores, _ = segmenter.score_maps(image)
        label = torch.from_numpy(np.array(label, dtype=np.int64))
        fg = (label > 0) & (label != 255)
        truth, pred = label[fg] - 1, scores.argmax(0)[fg]
        total += truth.numel()
        right += (truth == pred).sum().item()
        right_colour += same_colour[truth, pred].sum().item()
        right_shape += same_shape[truth, pred].sum().item()
    return {"class": 100 * right / total, "colour": 100 * right_colour / total, "shape": 100 * right_shape / total,
            "pixels": total}


def probe_synthetic(model, split, plot=None, limit: int | None = None) -> dict:
    """Every encoder probe of ``model``'s patch tokens on one labelled split of the synthetic world: MMC's
    prompting-patch segmentation and intra/inter-object similarity (its histogram PNG at ``plot``), and linear probes
    of each object's colour and shape (the synthetic world's classes are "<colour> <shape>")."""
    from .datasets import load_dataset

    items = load_dataset("synthetic", split)
    if limit is not None:
        items = dataclasses.replace(items, items=items.items[:limit])
    names = items.classes[1:]
    encoder = EncoderFeatures(model)
    report = {"prompt_patch": prompt_patch_segmentation(encoder, items),
              "intra_inter": intra_inter_similarity(encoder, items, plot=str(plot) if plot else None)}
    x, y, groups = object_features(encoder, items)
    report["linear_probe"] = {
        attr: linear_probe(x, np.array([names[c - 1].split()[i] for c in y]), groups)
        for i, attr in enumerate(("colour", "shape"))}
    return report
