"""The read-out's strategies, each small and tested on its own, composed by :class:`~vilseg.inference.Segmenter`.

- **grouping**: which patches form one segment (:class:`ClusterGrouping`: the clustering head's arg-max split into
  connected segments, as ViL-Seg; :class:`DenseGrouping`: every patch alone).
- **bounding**: :func:`bound_segments` merges segments below a minimum area, and beyond ``max_segments`` per image,
  into their most similar neighbour, so that every naming's work per image is bounded.
- **naming**: the embedding a segment is named by (:class:`PooledNaming`: the mean of its patch embeddings, the
  paper's; :class:`MaskedAttentionNaming`: every segment encoded on its own in the encoder's last k blocks, all
  segments in one pass; :class:`ReencodeGlobalNaming`: the global embedding of the image re-encoded with everything
  outside the segment blanked, one forward per segment).
- **decision**: when a segment is background (:class:`ThresholdDecision`, :class:`BackgroundWordsDecision`,
  :class:`NoDecision`).
- **tiling**: how an image too large for one forward is covered (:class:`SlidingWindow`).

Shapes: ``dense`` is :meth:`vilseg.ViLSeg.dense_embeddings`'s output for one image (``patch_embed`` [1, E, h, w],
``cluster_probs`` [1, C, h, w], ``image_embed`` [1, E]); segment ids are an [h, w] int64 map with values 0..S-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models import readouts


def connected_components(labels: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal labels on a batch of grids.

    Iterative min-label propagation in torch: batched, device-agnostic, and patch grids converge in a few
    iterations, so scipy/OpenCV are not needed as dependencies for this.

    Args:
        labels: [B, h, w] integer labels.

    Returns:
        [B, h, w] int64 component ids: the smallest raster index inside each component.
    """
    b, h, w = labels.shape
    big = h * w
    comp = torch.arange(h * w, device=labels.device).view(1, h, w).expand(b, h, w).clone()
    lab = F.pad(labels, (1, 1, 1, 1), value=-1)
    shifts = ((0, 1), (2, 1), (1, 0), (1, 2))  # offsets of up, down, left, right neighbours in the padded grid
    same = [lab[:, dy:dy + h, dx:dx + w] == labels for dy, dx in shifts]
    for _ in range(h * w):
        padded = F.pad(comp, (1, 1, 1, 1), value=big)
        new = comp
        for (dy, dx), s in zip(shifts, same):
            new = torch.minimum(new, torch.where(s, padded[:, dy:dy + h, dx:dx + w], big))
        if torch.equal(new, comp):
            break
        comp = new
    return comp


def relabel(ids: torch.Tensor) -> torch.Tensor:
    """Any integer map -> ids 0..S-1 in order of first appearance in raster order."""
    _, inverse = torch.unique(ids.flatten(), return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.numel(), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
    order = torch.empty_like(first)
    order[first.argsort()] = torch.arange(len(first), device=ids.device)
    return order[inverse].view_as(ids)


# ------------------------------------------------------------------ grouping
class ClusterGrouping:
    """ViL-Seg's groups: each patch's arg-max cluster, split into 4-connected segments (so the number of segments
    per image is not capped, and two objects of one cluster stay two segments)."""

    name = "clusters"

    def __call__(self, dense: dict) -> torch.Tensor:
        clusters = dense["cluster_probs"].argmax(1)  # [1, h, w]
        return relabel(connected_components(clusters)[0])


class DenseGrouping:
    """Every patch is its own segment (the read-out of a model without a clustering head)."""

    name = "dense"

    def __call__(self, dense: dict) -> torch.Tensor:
        _, _, h, w = dense["patch_embed"].shape
        return torch.arange(h * w, device=dense["patch_embed"].device).view(h, w)


class SlotGrouping:
    """SlotCon's groups: each patch's arg-max prototype (the model's slot head), split into 4-connected segments as
    the clusters are. Needs a model trained with the ``slotcon`` objective (``model.slot_head``)."""

    name = "slots"

    def __call__(self, dense: dict) -> torch.Tensor:
        if "slot_dots" not in dense:
            raise ValueError("the 'slots' grouping needs a model with prototypes (trained with the slotcon "
                             "objective); this model has none: use 'clusters' or 'dense'")
        return relabel(connected_components(dense["slot_dots"].argmax(1))[0])


class MergedGrouping:
    """Every patch, then merged by :func:`bound_segments` (the smallest segment into its most similar 4-neighbour, by
    the patch embeddings the naming reads) down to the read-out's ``max_segments``: a training-free grouping for a
    model with no trained clustering head (a CLIP), so that per-segment namings (re-encoding, masked attention) have
    segments to name."""

    name = "merge"

    def __call__(self, dense: dict) -> torch.Tensor:
        return DenseGrouping()(dense)


GROUPINGS = {"clusters": ClusterGrouping, "dense": DenseGrouping, "slots": SlotGrouping, "merge": MergedGrouping}


def bound_segments(ids: torch.Tensor, patch_embed: torch.Tensor, min_area: int = 1,
                   max_segments: int | None = None) -> torch.Tensor:
    """Merges small segments into their best neighbour until every segment has at least ``min_area`` patches and
    there are at most ``max_segments``.

    Repeatedly, the smallest segment that breaks a bound merges into the 4-adjacent segment whose mean patch
    embedding is most similar (cosine) to its own. The segments partition a connected grid, so every segment but a
    lone one has a neighbour. The bookkeeping (adjacency, sums) is on S x S numpy arrays: each merge is O(S), not
    O(h * w), so bounding a random ViT-S's 100 segments costs well under a millisecond per merge.

    Args:
        ids: [h, w] segment ids 0..S-1.
        patch_embed: [E, h, w] normalised patch embeddings (the similarity a merge follows).
        min_area: segments with fewer patches merge (1: none merges for its size).
        max_segments: most segments kept (None: no cap).

    Returns:
        [h, w] segment ids 0..S'-1 (relabelled in raster order); ``ids`` itself when nothing merges.
    """
    if min_area < 1 or (max_segments is not None and max_segments < 1):
        raise ValueError(f"min_area and max_segments must be >= 1, got {min_area} and {max_segments}")
    n = int(ids.max()) + 1
    flat = ids.flatten().cpu().numpy()
    sizes = np.bincount(flat, minlength=n).astype(np.int64)
    cap = max_segments or n
    if n <= cap and sizes.min() >= min_area:
        return ids
    grid = ids.cpu().numpy()
    adjacent = np.zeros((n, n), dtype=bool)
    for a, b in ((grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:])):
        adjacent[a.ravel(), b.ravel()] = True
    adjacent |= adjacent.T
    np.fill_diagonal(adjacent, False)
    emb = patch_embed.detach().flatten(1).t().float().cpu().numpy()  # [N, E]
    sums = np.zeros((n, emb.shape[1]), dtype=np.float64)
    np.add.at(sums, flat, emb)
    alive = np.ones(n, dtype=bool)
    parent = np.arange(n)
    count = n
    while count > 1:
        order = np.where(alive, sizes, np.iinfo(np.int64).max)
        victim = int(order.argmin())
        if count <= cap and sizes[victim] >= min_area:
            break
        neighbours = np.flatnonzero(adjacent[victim] & alive)
        if len(neighbours) == 0:  # cannot happen on a connected grid; stop rather than loop
            break
        unit = sums[neighbours] / np.linalg.norm(sums[neighbours], axis=1, keepdims=True).clip(1e-12)
        target = int(neighbours[(unit @ sums[victim]).argmax()])
        sums[target] += sums[victim]
        sizes[target] += sizes[victim]
        adjacent[target] |= adjacent[victim]
        adjacent[:, target] |= adjacent[:, victim]
        adjacent[target, target] = False
        alive[victim], parent[victim] = False, target
        count -= 1
    while not np.array_equal(parent[parent], parent):  # follow merges to their final segment
        parent = parent[parent]
    return relabel(torch.from_numpy(parent[grid]).to(ids.device))


# ------------------------------------------------------------------ naming
class PooledNaming:
    """A segment's embedding is the mean of its L2-normalised patch embeddings (masked average pooling, the
    ViL-Seg paper), re-normalised."""

    name = "pool"
    # what names are centred on (vocabulary.REFERENCES): a segment embedded inside one forward pass is closer to a
    # single templated name than to a whole caption; against the captions' mean its scores no longer separate
    # objects from background (docs/results.md, section 2). The dense read-outs inherit it, unmeasured.
    reference = "prompt"

    def __call__(self, model, image: torch.Tensor, dense: dict, ids: torch.Tensor) -> torch.Tensor:
        emb = dense["patch_embed"][0].flatten(1).t()  # [N, E]
        pooled = torch.zeros(int(ids.max()) + 1, emb.shape[1], device=emb.device, dtype=emb.dtype)
        pooled.index_add_(0, ids.flatten(), emb)
        return F.normalize(pooled, dim=-1)


class MaskedAttentionNaming:
    """A segment's embedding is its global embedding when it is encoded on its own in the encoder's last ``blocks``
    blocks, all segments of the image in one pass (:meth:`vilseg.ViLSeg.segment_embeddings`).

    The image is encoded once (its patch tokens, clusters and global embedding are the usual ones); the tokens
    entering block ``depth - k`` are kept. From there each segment has its own copy of the prefix tokens and of its
    patch tokens, and a block-diagonal attention mask keeps every copy to its own segment. The segment's token is
    read, normed and projected as the image embedding is. The anchors are MaskCLIP's mask class tokens (Ding et al.,
    ICML 2023) and SAN's attention bias (Xu et al., CVPR 2023). One deviation, because vilseg's encoders are
    average-pooled (their class token is never trained to name anything): a segment's *patch* tokens are copied too,
    not read from the image's own, so that the segment's embedding is the mean of its own patch tokens as the image
    embedding is the mean of the image's. The cost is the bare forward plus k blocks over ``S * P + N`` tokens.

    Args:
        blocks: k, the number of final blocks in which segments are separated: an int >= 1 or ``"all"``.
    """

    name = "masked_attention"
    reference = "prompt"  # as pooling's (docs/results.md, section 2)

    def __init__(self, blocks: int | str = 1):
        if not (blocks == "all" or (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1)):
            raise ValueError(f"masked_attention blocks must be an int >= 1 or 'all', got {blocks!r}")
        self.blocks = blocks

    def start_block(self, model) -> int:
        depth = model.image_encoder.depth
        return 0 if self.blocks == "all" else max(0, depth - self.blocks)

    def dense_kwargs(self, model) -> dict:
        """What the image's forward must also return: the tokens entering the first separated block."""
        return {"keep_block": self.start_block(model)}

    def __call__(self, model, image: torch.Tensor, dense: dict, ids: torch.Tensor) -> torch.Tensor:
        start = self.start_block(model)
        hidden = dense.get("hidden") if dense.get("hidden_block") == start else None
        if hidden is None:  # a tiled image: its tokens entering the start block, from one whole-image forward
            hidden = model.image_encoder(image, keep_block=start).hidden
        return model.segment_embeddings(hidden, ids.flatten()[None], start)[0]


class ReencodeGlobalNaming:
    """A segment's embedding is the *global* embedding of the image encoded again with every pixel outside the
    segment set to the normalisation mean. With an average-pooled encoder this is the embedding the captions
    trained, and the blanked patches around the segment attend to it and carry its outline, so it names shape where
    the segment's own patch embeddings do not (docs/results.md). One extra forward pass per segment, in batches of
    ``batch`` segments; the work per image is bounded by the segment cap (:func:`bound_segments`).

    Args:
        batch: segments re-encoded per forward pass.
        window: side in pixels of the window re-encoded around a segment of a large image (None: the training size).
    """

    name = "reencode_global"
    reference = "captions"  # a re-encoded segment is a whole image, which training matched with whole captions

    def __init__(self, batch: int = 64, window: int | None = None):
        self.batch, self.window = batch, window

    def __call__(self, model, image: torch.Tensor, dense: dict, ids: torch.Tensor) -> torch.Tensor:
        out = PooledNaming()(model, image, dense, ids)
        chosen = torch.arange(out.shape[0], device=ids.device)
        patch = image.shape[-1] // ids.shape[-1]
        window = (self.window or model.config.image.img_size) // patch  # in patches
        h, w = ids.shape
        for chunk in chosen.split(self.batch):
            masks = (ids[None] == chunk[:, None, None]).to(image.dtype)  # [S, h, w]
            if h <= 2 * window and w <= 2 * window:  # the whole image, blanked outside the segment
                pixels = masks.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]  # [S, 1, H, W]
                views = image * pixels
            else:  # a large image: a window around each segment's centre (segments larger than it are cut)
                views = torch.stack([self._window(image, m, window, patch) for m in masks])
            out[chunk] = model.dense_embeddings(views)["image_embed"].to(out.dtype)
        return out

    @staticmethod
    def _window(image: torch.Tensor, mask: torch.Tensor, window: int, patch: int) -> torch.Tensor:
        """[1, 3, H, W], [h, w] -> [3, window*p, window*p]: the window centred on the mask, blanked outside it."""
        h, w = mask.shape
        ys, xs = torch.nonzero(mask, as_tuple=True)
        size_y, size_x = min(window, h), min(window, w)
        y0 = int(min(max(ys.float().mean().round().item() - size_y // 2, 0), h - size_y))
        x0 = int(min(max(xs.float().mean().round().item() - size_x // 2, 0), w - size_x))
        crop = mask[y0:y0 + size_y, x0:x0 + size_x]
        pixels = crop.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        return image[0, :, y0 * patch:(y0 + size_y) * patch, x0 * patch:(x0 + size_x) * patch] * pixels


class DenseReadoutNaming(PooledNaming):
    """A training-free dense read-out (:mod:`vilseg.models.readouts`): the encoder's last block is computed another
    way for the patch tokens, which go through the final norm and the joint projection as the class token does
    (``ln_post`` and ``proj`` on a CLIP); a segment is named by the mean of its read-out patch embeddings (with the
    ``dense`` grouping, every patch by its own). One forward: the read-out's block runs beside the usual last block
    (whose class token gives the image embedding and whose patch tokens the clustering head reads)."""

    name = ""

    def readout(self, block, x, grid, prefix):
        raise NotImplementedError

    def dense_kwargs(self, model) -> dict:
        """What the image's forward must also compute: this read-out's patch tokens."""
        return {"readout": self.readout}


class MaskCLIPNaming(DenseReadoutNaming):
    """MaskCLIP (Zhou et al., ECCV 2022): in the last block every token attends to itself alone,

        y = x + O(W_v LN1(x) + b_v),   out = y + MLP(LN2(y)),   e_i = proj(ln_post(out_i))

    as chongzhou96/MaskCLIP's code computes it (:func:`vilseg.models.readouts.maskclip`)."""

    name = "maskclip"

    def readout(self, block, x, grid, prefix):
        return readouts.maskclip(block, x, grid, prefix)


class SCLIPNaming(DenseReadoutNaming):
    """SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block,

        A = softmax(s q q^T) + softmax(s k k^T),   y = x + O(A v),   out = y + MLP(LN2(y)),   e_i = proj(ln_post(out_i))

    as wangf3014/SCLIP's code (:func:`vilseg.models.readouts.sclip`)."""

    name = "sclip"

    def readout(self, block, x, grid, prefix):
        return readouts.sclip(block, x, grid, prefix)


class NACLIPNaming(DenseReadoutNaming):
    """NACLIP (Hajimiri et al., WACV 2025): key-key attention with a Gaussian neighbourhood prior, in a last block
    without residual and feed-forward,

        A = softmax(s k k^T + Omega),   Omega_ij = exp(-|p_i - p_j|^2 / (2 std^2)),   out = O(A v),
        e_i = proj(ln_post(out_i))

    as sinahmr/NACLIP's code with its defaults (``arch='reduced'``, std 5 patches;
    :func:`vilseg.models.readouts.naclip`). Chosen over ClearCLIP (q-q attention, no residual, no feed-forward),
    which differs from SCLIP only in the attention's similarity and in dropping the residual: NACLIP adds what both
    lack, a spatial prior, and its published 8-dataset average (39.4 against SCLIP's 38.2,
    shared/reference/protocols.md) comes with public code to match it against on identical inputs.

    Args:
        std: the Gaussian's standard deviation, in patches.
    """

    name = "naclip"

    def __init__(self, std: float = 5.0):
        if not std > 0:
            raise ValueError(f"naclip std must be > 0, got {std!r}")
        self.std = std

    def readout(self, block, x, grid, prefix):
        return readouts.naclip(block, x, grid, prefix, std=self.std)


DENSE_READOUTS = {c.name: c for c in (MaskCLIPNaming, SCLIPNaming, NACLIPNaming)}
NAMINGS = {"pool": PooledNaming, "masked_attention": MaskedAttentionNaming, "reencode_global": ReencodeGlobalNaming,
           **DENSE_READOUTS}


# ------------------------------------------------------------------ decision
@dataclass
class ThresholdDecision:
    """Background where the best class scores below ``threshold`` (cosine); calibrated on held-out data."""

    threshold: float = 0.3
    name = "threshold"

    def background(self, best_scores: torch.Tensor, best_classes: torch.Tensor, classes: list[str]) -> torch.Tensor:
        return best_scores < self.threshold


@dataclass
class BackgroundWordsDecision:
    """Background where the best class is one of ``words`` (added to the vocabulary by the Segmenter), e.g. "sky",
    "wall", "floor": the open-vocabulary way of saying what is not an object."""

    words: tuple[str, ...] = ("background",)
    name = "background_words"

    def background(self, best_scores: torch.Tensor, best_classes: torch.Tensor, classes: list[str]) -> torch.Tensor:
        words = set(self.words)
        return torch.tensor([classes[c] in words for c in best_classes.tolist()], dtype=torch.bool,
                            device=best_scores.device)


@dataclass
class NoDecision:
    """Every segment takes its best class: no background."""

    name = "none"

    def background(self, best_scores: torch.Tensor, best_classes: torch.Tensor, classes: list[str]) -> torch.Tensor:
        return torch.zeros_like(best_scores, dtype=torch.bool)


# ------------------------------------------------------------------ tiling
@dataclass
class SlidingWindow:
    """Covers an image whose patch grid exceeds ``max_tokens`` with windows of ``window`` pixels (a multiple of the
    patch size) at ``stride``; the windows' patch embeddings and cluster probabilities are averaged where they
    overlap, so grouping and naming see one grid for the whole image.

    Args:
        window: window side in pixels (None: the model's training size).
        stride: step between windows (None: half a window).
        max_tokens: images with more patches than this are tiled; smaller ones take one forward pass.
    """

    window: int | None = None
    stride: int | None = None
    max_tokens: int = 4096

    def windows(self, height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of every window; the last row and column are clamped to the border."""
        def starts(size: int) -> list[int]:
            if size <= window:
                return [0]
            n = math.ceil((size - window) / stride) + 1
            return sorted({min(i * stride, size - window) for i in range(n)})

        return [(y, min(y + window, height), x, min(x + window, width)) for y in starts(height) for x in starts(width)]

    def fits(self, model, images: torch.Tensor) -> bool:
        """Whether ``images`` take one forward pass (their patch grid is at most ``max_tokens``)."""
        patch = model.image_encoder.patch_size
        return (images.shape[-2] // patch) * (images.shape[-1] // patch) <= self.max_tokens

    @torch.no_grad()
    def __call__(self, model, image: torch.Tensor, **kwargs) -> dict:
        """[1, 3, H, W] normalised image -> the dense embeddings of the whole image (see the module docstring);
        ``kwargs`` go to ``dense_embeddings`` when the image takes one forward pass."""
        patch = model.image_encoder.patch_size
        _, _, height, width = image.shape
        if self.fits(model, image):
            return model.dense_embeddings(image, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "keep_block"}  # a dense read-out runs in every window
        window = self.window or model.config.image.img_size
        window = max(patch, window // patch * patch)
        stride = max(patch, (self.stride or window // 2) // patch * patch)
        h, w = height // patch, width // patch
        sums: dict[str, torch.Tensor] = {}  # every dense map the model returns, averaged where windows overlap
        count = torch.zeros(1, 1, h, w, device=image.device)
        for y0, y1, x0, x1 in self.windows(height, width, window, stride):
            dense = model.dense_embeddings(image[..., y0:y1, x0:x1], **kwargs)
            region = (..., slice(y0 // patch, y1 // patch), slice(x0 // patch, x1 // patch))
            for key, value in dense.items():
                if value.dim() == 4:
                    if key not in sums:
                        sums[key] = image.new_zeros(1, value.shape[1], h, w)
                    sums[key][region] += value
            count[region] += 1
        whole = model.dense_embeddings(F.interpolate(image, size=(window, window), mode="bilinear",
                                                     align_corners=False))  # a global view for the image embedding
        out = {key: value / count for key, value in sums.items()}
        out["patch_embed"] = F.normalize(out["patch_embed"], dim=1)
        out["image_embed"] = whole["image_embed"]
        return out
