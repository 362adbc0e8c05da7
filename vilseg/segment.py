"""Open-vocabulary segmentation with a trained ViL-Seg model.

Cluster read-out (ViL-Seg): patches -> cluster arg-max -> connected segments -> mean joint-space embedding per
segment -> faiss search against the (template-averaged) query embeddings -> every patch of a segment takes its
segment's scores -> bilinear upsampling -> background where no query beats the threshold. Dense read-out: the same
per patch, without clustering (the cross-modal-only baseline).

    vilseg-segment --model runs/demo/train/final --image cat.png --queries "red circle" "blue square" --out out.png
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture with a {}.")
REGIONS = ("pool", "reencode_global")


@dataclass
class SegmentationResult:
    """Output of :meth:`Segmenter.segment` for one image of size H x W.

    Attributes:
        labels: [H, W] int64; 0 is background, i + 1 is query i.
        scores: query name -> best cosine similarity of any segment (or patch) of the image.
        cluster_map: [H, W] int64 segment id of every pixel (nearest-upsampled from the patch grid).
        segments: one dict per segment: id, cluster, label (query name or "background"), score, patches.
        logits: [Q + 1, H, W] float scores (channel 0 is the background threshold).
    """

    labels: np.ndarray
    scores: dict[str, float]
    cluster_map: np.ndarray
    segments: list[dict] = field(default_factory=list)
    logits: torch.Tensor | None = None


def connected_components(labels: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal labels on a batch of grids.

    Iterative min-label propagation in torch: batched, device-agnostic, and tiny grids (patch grids) converge in
    a few iterations, so scipy/OpenCV are not needed as dependencies for this.

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


class TextIndex:
    """faiss inner-product index over L2-normalised query embeddings; on GPU when faiss-gpu and CUDA are present."""

    def __init__(self, embeddings: torch.Tensor, owner: torch.Tensor, n_classes: int):
        import faiss

        self.owner = owner  # [T] class index of every stored text vector (aliases share an owner)
        self.n_classes = n_classes
        vectors = np.ascontiguousarray(embeddings.detach().float().cpu().numpy())
        index = faiss.IndexFlatIP(vectors.shape[1])
        self.on_gpu = False
        if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, torch.cuda.current_device(), index)
            self.on_gpu = True
        index.add(vectors)
        self.index = index

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """[n, E] normalised embeddings -> [n, n_classes] cosine scores (max over each class's aliases)."""
        x = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        total = self.index.ntotal
        sims, ids = self.index.search(x, total)  # exhaustive: every stored vector, sorted by similarity
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        per_vector = torch.empty_like(sims).scatter_(1, ids, sims)  # back to storage order, [n, T]
        out = torch.full((x.shape[0], self.n_classes), -2.0)
        out.scatter_reduce_(1, self.owner.expand(x.shape[0], -1), per_vector, reduce="amax")
        return out.to(queries.device)


class Segmenter:
    """Stateful open-vocabulary segmenter: ``set_queries`` once, then ``segment`` any number of images.

    Args:
        model: a trained :class:`~vilseg.ViLSeg` (moved to ``device``, put in eval mode).
        queries: class names, or a mapping name -> list of aliases (a class scores the max over its names).
        templates: prompt templates; each name's embedding is the normalised mean over templates.
        readout: ``"cluster"`` (ViL-Seg) or ``"dense"`` (patch by patch).
        bg_threshold: cosine similarity a segment must reach to be labelled; below it, background.
        split_components: split every cluster into 4-connected segments (segments per image are not capped).
        region: how a segment is named (cluster read-out only). ``"pool"``: masked average pooling of its patch
            embeddings (the ViL-Seg paper). ``"reencode_global"``: the image is encoded again with every pixel
            outside the segment set to the normalisation mean, and the segment is named by that re-encoding's
            *global* embedding, the one the captions trained; the blanked patches around the segment attend to it
            and carry its outline, so this embedding names shape where the segment's own patch embeddings do not
            (docs/results.md). Costs one extra forward pass per segment (batched per image).
        center_queries: subtract the mean of the vocabulary's name embeddings before normalising (needs >= 2 names).
            Captions share a large common component (template, wording), and regions no caption describes
            (background) drift towards it; centring removes it so that they score near 0 for every name.
        input_size: short side the image is resized to (rounded to the patch size); default the model's size.
        device: torch device; default CUDA if available.
    """

    def __init__(self, model, queries=None, templates=DEFAULT_TEMPLATES, readout: str = "cluster",
                 bg_threshold: float = 0.3, split_components: bool = True, input_size: int | None = None,
                 device: str | torch.device | None = None, center_queries: bool = True, region: str = "pool",
                 reencode_batch: int = 64):
        if readout not in ("cluster", "dense"):
            raise ValueError(f"readout must be 'cluster' or 'dense', got {readout!r}")
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
        if region != "pool" and readout != "cluster":
            raise ValueError(f"region={region!r} needs readout='cluster' (the dense read-out has no segments)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.templates = tuple(templates)
        self.readout, self.bg_threshold, self.split_components = readout, bg_threshold, split_components
        self.center_queries = center_queries
        self.region, self.reencode_batch = region, reencode_batch
        self.input_size = input_size or model.config.image.img_size
        self.patch = model.image_encoder.patch_size
        self.names: list[str] = []
        self.index: TextIndex | None = None
        if queries is not None:
            self.set_queries(queries)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "Segmenter":
        from .models import ViLSeg

        return cls(ViLSeg.from_pretrained(directory), **kwargs)

    @torch.no_grad()
    def set_queries(self, queries) -> None:
        """Encodes the vocabulary. ``queries``: list of names or dict name -> aliases. Raises on an empty list."""
        if isinstance(queries, str):
            queries = [queries]
        aliases = {q: [q] for q in queries} if not isinstance(queries, dict) else {k: list(v) for k, v in queries.items()}
        if not aliases or any(not names or not all(isinstance(n, str) and n.strip() for n in names)
                              for names in aliases.values()):
            raise ValueError(f"queries must be a non-empty list of non-empty names, got {queries!r}")
        self.names = list(aliases)
        vectors, owner = [], []
        for i, names in enumerate(aliases.values()):
            for name in names:
                emb = self.model.encode_texts([t.format(name) for t in self.templates])  # [T, E]
                vectors.append(F.normalize(emb.mean(0), dim=-1))
                owner.append(i)
        vectors = torch.stack(vectors)
        if self.center_queries and len(self.names) > 1:
            vectors = F.normalize(vectors - vectors.mean(0, keepdim=True), dim=-1)
        self.index = TextIndex(vectors, torch.tensor(owner), len(self.names))

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """PIL image / path / HxWx3 uint8 array -> ([1, 3, h, w] normalised tensor, original (H, W))."""
        image = load_image(image)
        width, height = image.size
        scale = self.input_size / min(width, height)
        new_w = max(self.patch, round(width * scale / self.patch) * self.patch)
        new_h = max(self.patch, round(height * scale / self.patch) * self.patch)
        resized = image.resize((new_w, new_h), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        return self.model.image_encoder.normalize(x.to(self.device)), (height, width)

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, h*p, w*p] normalised images -> ([B, Q, h, w] scores, [B, h, w] segment ids)."""
        if self.index is None:
            raise RuntimeError("call set_queries(...) before segmenting")
        dense = self.model.dense_embeddings(images)
        emb = dense["patch_embed"]  # [B, E, h, w]
        b, e, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(-1, e)  # [B*N, E]
        if self.readout == "dense":
            seg = torch.arange(h * w, device=emb.device).view(1, h, w).expand(b, h, w)
            return self.index.scores(flat).view(b, h, w, -1).permute(0, 3, 1, 2), seg
        clusters = dense["cluster_probs"].argmax(1)  # [B, h, w]
        seg = connected_components(clusters) if self.split_components else clusters
        uid = (seg + torch.arange(b, device=seg.device).view(b, 1, 1) * (h * w + dense["cluster_probs"].shape[1]))
        uniq, inverse = torch.unique(uid.flatten(), return_inverse=True)
        if self.region == "reencode_global":
            pooled = self._reencode_global(images, inverse.view(b, h, w), torch.zeros(len(uniq), e, device=emb.device))
        else:
            pooled = torch.zeros(len(uniq), e, device=emb.device).index_add_(0, inverse, flat)  # masked avg pooling
        seg_scores = self.index.scores(F.normalize(pooled, dim=-1))  # [S, Q]
        return seg_scores[inverse].view(b, h, w, -1).permute(0, 3, 1, 2), inverse.view(b, h, w)

    def _reencode_global(self, images: torch.Tensor, ids: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images, [B, h, w] segment ids (0..n-1, unique across the batch), [n, E] zeros ->
        [n, E]: the global embedding of each segment's own re-encoding (everything outside it blanked)."""
        p = self.patch
        for i in range(ids.shape[0]):
            segs = torch.unique(ids[i])
            for chunk in segs.split(self.reencode_batch):
                masks = (ids[i][None] == chunk[:, None, None]).float()  # [S, h, w]
                pixels = masks.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]  # [S, 1, H, W]
                pooled[chunk] = self.model.dense_embeddings(images[i:i + 1] * pixels)["image_embed"]  # [S, E]
        return pooled

    @torch.no_grad()
    def segment(self, image) -> SegmentationResult:
        """Segments one image (PIL, path or HxWx3 uint8) with the current queries."""
        x, size = self.preprocess(image)
        scores, seg = self.patch_scores(x)
        bg = torch.full_like(scores[:, :1], self.bg_threshold)
        logits = F.interpolate(torch.cat([bg, scores], 1), size=size, mode="bilinear", align_corners=False)[0]
        labels = logits.argmax(0)
        seg_map = F.interpolate(seg[:, None].float(), size=size, mode="nearest")[0, 0].long()
        segments = []
        for sid in torch.unique(seg[0]).tolist():
            where = seg[0] == sid
            s = scores[0][:, where].mean(1)
            best = int(s.argmax())
            name = self.names[best] if float(s[best]) >= self.bg_threshold else "background"
            segments.append({"id": sid, "label": name, "score": float(s[best]), "patches": int(where.sum())})
        per_class = scores[0].flatten(1).max(1).values
        return SegmentationResult(labels.cpu().numpy(), dict(zip(self.names, per_class.tolist())),
                                  seg_map.cpu().numpy(), segments, logits.cpu())

    def render_overlay(self, image, result: SegmentationResult, path, min_side: int = 256) -> Path:
        """Writes a PNG: image | coloured label overlay, with a legend of the labels present."""
        from .overlay import render_overlay

        return render_overlay(load_image(image), result.labels, ["background", *self.names], path, min_side)


def load_image(image) -> Image.Image:
    """PIL image, path or HxWx3 uint8 array -> RGB PIL image; unreadable files raise naming the path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"array images must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exn:
        raise ValueError(f"image {str(path)!r} cannot be read as an image: {exn}") from exn


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="save_pretrained directory")
    parser.add_argument("--image", required=True, nargs="+")
    parser.add_argument("--queries", required=True, nargs="+")
    parser.add_argument("--out", required=True, help="output directory for overlays and JSON")
    parser.add_argument("--bg-threshold", type=float, default=0.3)
    parser.add_argument("--readout", choices=("cluster", "dense"), default="cluster")
    parser.add_argument("--region", choices=REGIONS, default="pool",
                        help="cluster read-out: name each segment by its pooled patch embeddings, or by the global "
                             "embedding of the segment re-encoded alone")
    args = parser.parse_args(argv)
    import json

    seg = Segmenter.from_pretrained(args.model, queries=args.queries, bg_threshold=args.bg_threshold,
                                    readout=args.readout, region=args.region)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image in args.image:
        result = seg.segment(image)
        stem = Path(image).stem
        seg.render_overlay(image, result, out / f"{stem}_overlay.png")
        (out / f"{stem}.json").write_text(json.dumps({"scores": result.scores, "segments": result.segments}, indent=1))
        print(f"{image}: " + ", ".join(f"{s['label']} ({s['score']:.2f})" for s in result.segments))


if __name__ == "__main__":
    cli()
