"""Open-vocabulary segmentation with a trained model: grouping + naming + decision + tiling strategies.

    seg = Segmenter.from_pretrained("runs/demo/train/final", vocabulary=["red circle", "blue square"])
    result = seg.segment("image.png")     # labels [H, W] (0 = background), segments with label/score/area/box
    seg.render_overlay("image.png", result, "overlay.png")

The default read-out is the one a model was calibrated with (``readout.json`` beside its weights: written by the
demo, which measures the read-outs on a calibration split and keeps the best with its background threshold), else
ViL-Seg's clusters named by their re-encoded global embedding with a 0.3 cosine threshold.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .strategies import (DENSE_READOUTS, GROUPINGS, NAMINGS, BackgroundWordsDecision, MaskedAttentionNaming,
                         NoDecision, SlidingWindow, ThresholdDecision, bound_segments)
from .vocabulary import DEFAULT_TEMPLATES, REFERENCES, VocabularyIndex

READOUT_FILE = "readout.json"
UNSET = object()  # a per-call setting left to the segmenter's own
ALL_CLASS_MAPS = 256  # up to this many classes, the label map's interpolation uses every class's scores


@dataclass
class ReadOut:
    """A read-out's settings, as saved with a model (``readout.json``)."""

    grouping: str = "clusters"
    naming: str = "reencode_global"
    threshold: float | None = 0.3  # None: no background decision
    blocks: int | str = 1  # masked_attention: the last k encoder blocks in which segments are separated, or "all"
    min_area: int = 1  # segments with fewer patches merge into their most similar neighbour
    max_segments: int | None = 32  # at most this many segments per image (the smallest merge): bounded naming work
    background_words: list[str] = field(default_factory=list)  # used instead of a threshold when given
    input_size: int | None = None  # short side in pixels; None: the model's training size
    reference: str | None = None  # what names are centred on (vocabulary.REFERENCES); None: the naming's default
    calibration: dict = field(default_factory=dict)  # where and how the threshold was chosen

    @property
    def text_reference(self) -> str:
        """The centring reference this read-out scores against: its own, else :func:`default_reference`."""
        return self.reference or default_reference(self.naming)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / READOUT_FILE
        tmp = path.with_name(f".{READOUT_FILE}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)  # an interrupted save leaves the earlier read-out whole
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ReadOut":
        path = Path(directory) / READOUT_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}")
        return cls(**data)


def default_reference(naming: str) -> str:
    """The centring reference a naming strategy scores against by default (its ``reference``: ``"captions"``, the
    training captions' mean, for re-encoding; ``"prompt"``, the templates' own embedding, for pooling, masked
    attention and the dense read-outs; docs/results.md, section 2, measures both for each)."""
    return NAMINGS[naming].reference


CLIP_READOUT = ReadOut(grouping="dense", naming="naclip", threshold=None, max_segments=None,
                       calibration={"rule": "a CLIP's training-free default: every patch named by its NACLIP "
                                            "embedding; no background threshold (nothing calibrated one)"})


def default_readout(directory, model) -> ReadOut:
    """The read-out saved beside a model (``readout.json``); without one, :data:`CLIP_READOUT` for a model started
    from a CLIP whose clustering head no stage trained (its ``training.json`` names no ``clu``), else ``ReadOut()``."""
    if (Path(directory) / READOUT_FILE).is_file():
        return ReadOut.load(directory)
    if getattr(model, "joint", "learned") == "clip":
        try:
            objectives = json.loads((Path(directory) / "training.json").read_text()).get("objectives", [])
        except (OSError, ValueError):
            objectives = []
        if "clu" not in objectives:
            return copy.deepcopy(CLIP_READOUT)
    return ReadOut()


def training_notice(directory) -> str | None:
    """A one-line notice when the model in ``directory`` was trained on vilseg's synthetic world (its
    ``training.json``, written at export), else None: such a model knows coloured shapes only."""
    path = Path(directory) / "training.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not record.get("data", {}).get("synthetic_world"):
        return None
    return (f"note: this model was trained on the synthetic world of coloured shapes "
            f"(data.shards={record['data'].get('shards')!r}); it can name only those, so on photographs its labels "
            f"mean nothing. Train on image-caption data (README, 'Train') for real images.")


@dataclass
class SegmentationResult:
    """Output of :meth:`Segmenter.segment` for one image of H x W pixels (as displayed: EXIF orientation applied).

    Attributes:
        labels: [H, W] int64; 0 is background, i + 1 is class i of the vocabulary.
        segment_map: [H, W] int64 segment id of every pixel.
        segments: one dict per segment: ``id``, ``label`` (a class name or "background"), ``score`` (cosine of its
            best class), ``area`` (pixels), ``box`` (x0, y0, x1, y1 in pixels), ``top`` ([[name, score], ...], its
            best classes).
        prototypes: with SlotCon's prototypes (a slot head), {"total", "used", "unused"}: which prototypes are some
            patch's arg-max in this image; None otherwise.
        classes: the vocabulary's class names the labels index (label i + 1 is ``classes[i]``).
    """

    labels: np.ndarray
    segment_map: np.ndarray
    segments: list[dict]
    prototypes: dict | None = None
    classes: list[str] | None = None


def load_image(image) -> Image.Image:
    """PIL image, path or HxWx3 uint8 array -> RGB PIL image with its EXIF orientation applied.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image (naming it), or the array is not HxWx3 uint8.
    """
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"array images must be HxW, HxWx3 or HxWx4 uint8, got shape {image.shape} dtype "
                             f"{image.dtype}")
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as exn:
        raise ValueError(f"image {str(path)!r} cannot be read as an image: {exn}") from exn


def prepare_image(image, input_size: int, patch: int, mean=None, std=None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image (path, PIL, array) -> ([3, h, w] CPU tensor normalised by ``mean``/``std`` (None: left in [0, 1]), short
    side resized to ``input_size`` and both sides rounded to the patch size; the displayed (H, W)). Pure CPU work:
    it runs in DataLoader workers."""
    image = load_image(image)
    width, height = image.size
    scale = input_size / min(width, height)
    new_w = max(patch, round(width * scale / patch) * patch)
    new_h = max(patch, round(height * scale / patch) * patch)
    x = torch.from_numpy(np.asarray(image.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1)
    if mean is not None:
        x = (x - torch.as_tensor(mean, dtype=x.dtype).view(3, 1, 1)) / torch.as_tensor(std, dtype=x.dtype).view(3, 1, 1)
    return x, (height, width)


class Segmenter:
    """Stateful open-vocabulary segmenter: set a vocabulary once, then ``segment`` any number of images.

    Args:
        model: a trained :class:`~vilseg.ViLSeg` (moved to ``device``, put in eval mode).
        vocabulary: class names, a mapping name -> aliases, a packaged vocabulary's name ("imagenet21k", "voc21",
            ...), or a built :class:`VocabularyIndex`.
        readout: a :class:`ReadOut` (default: the saved one of ``from_pretrained``, else ``ReadOut()``).
        templates: prompt templates; a name's embedding is the normalised mean over them.
        center: subtract a fixed reference from every name's embedding, so that a class's score is the same in
            every vocabulary: the read-out's (``readout.reference``, by default the naming's: :func:`default_reference`;
            see :meth:`VocabularyIndex.build`).
        top_k: classes listed per segment.
        tiling: a :class:`SlidingWindow` for images larger than one forward pass should take.
        device: torch device; default CUDA if available.
        batch_size: images of one input size encoded per forward pass by :meth:`segment_batch`.
    """

    def __init__(self, model, vocabulary=None, readout: ReadOut | None = None, templates=DEFAULT_TEMPLATES,
                 center: bool = True, top_k: int = 5, tiling: SlidingWindow | None = None, device=None,
                 batch_size: int = 16):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.readout = readout or ReadOut()
        if self.readout.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {sorted(GROUPINGS)}, got {self.readout.grouping!r}")
        if self.readout.naming not in NAMINGS:
            raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {self.readout.naming!r}")
        if self.readout.grouping == "dense" and self.readout.naming not in ("pool", *DENSE_READOUTS):
            raise ValueError(f"the dense grouping's segments are single patches: name them with 'pool' or a dense "
                             f"read-out ({', '.join(DENSE_READOUTS)}), not {self.readout.naming!r}")
        if self.readout.text_reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {self.readout.reference!r}")
        if self.readout.grouping == "merge" and not self.readout.max_segments:
            raise ValueError("the merge grouping merges patches down to max_segments: set it (e.g. 16)")
        self.grouping = GROUPINGS[self.readout.grouping]()
        naming = NAMINGS[self.readout.naming]
        self.naming = naming(self.readout.blocks) if naming is MaskedAttentionNaming else naming()
        self.templates, self.center, self.top_k = tuple(templates), center, top_k
        self.tiling = tiling or SlidingWindow()
        self.input_size = self.readout.input_size or model.config.image.img_size
        self.patch = model.image_encoder.patch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.index: VocabularyIndex | None = None
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "Segmenter":
        """A model written by ``save_pretrained`` with the read-out saved beside it (``readout.json``), if any; a
        model fine-tuned from a CLIP without a clustering head and without a saved read-out gets the CLIP default."""
        from ..models import ViLSeg

        model = ViLSeg.from_pretrained(directory)
        kwargs.setdefault("readout", default_readout(directory, model))
        return cls(model, **kwargs)

    @classmethod
    def from_open_clip(cls, name: str, pretrained: str | None = None, vocabulary=None,
                       readout: ReadOut | None = None, **kwargs) -> "Segmenter":
        """A training-free segmenter on an open_clip CLIP, its joint space kept (:func:`vilseg.models.from_open_clip`).

        Args:
            name: an open_clip model name ("ViT-B-16", "ViT-B-16-quickgelu" for OpenAI's weights) or
                "local-dir:FOLDER" (open_clip's folder format).
            pretrained: a pretrained tag (open_clip fetches it, or reads its cache) or a local weights file (open_clip's
                state dict, .bin/.pt read with ``weights_only``, or .safetensors); None: random weights.
            vocabulary, **kwargs: as for the constructor; ``center`` defaults to False (the read-outs' authors score
                raw cosines).
            readout: default :data:`CLIP_READOUT` (every patch named by its NACLIP embedding, no background
                threshold: nothing calibrates one). A CLIP has no trained clustering head: group by ``dense`` or
                ``merge``.
        """
        from ..models import from_open_clip

        readout = readout or CLIP_READOUT
        if readout.grouping in ("clusters", "slots"):
            raise ValueError(f"a CLIP has no trained {readout.grouping} head: group by 'dense' (every patch) or "
                             f"'merge' (patches merged by similarity), not {readout.grouping!r}")
        kwargs.setdefault("center", False)
        return cls(from_open_clip(name, pretrained), vocabulary=vocabulary, readout=readout, **kwargs)

    # ------------------------------------------------------------------ vocabulary
    @property
    def decision(self):
        return self._decision(self.readout.threshold)

    def _decision(self, threshold):
        if self.readout.background_words:
            return BackgroundWordsDecision(tuple(self.readout.background_words))
        return NoDecision() if threshold is None else ThresholdDecision(threshold)

    @property
    def classes(self) -> list[str]:
        """The vocabulary's class names (background words excluded)."""
        words = set(self.readout.background_words)
        return [c for c in self.index.classes if c not in words] if self.index else []

    def set_vocabulary(self, vocabulary) -> None:
        """Embeds (or takes) the vocabulary; background words of the read-out are added as extra classes."""
        if isinstance(vocabulary, VocabularyIndex):
            wanted = self.reference if self.center else None
            if vocabulary.center is not None and vocabulary.reference != wanted:
                raise ValueError(f"this vocabulary index is centred on the {vocabulary.reference!r} reference, and "
                                 f"the {self.readout.naming} read-out scores against "
                                 + (f"the {wanted!r} one" if wanted else "uncentred names")
                                 + ": rebuild the index for this read-out (VocabularyIndex.build(..., "
                                 + (f"reference={wanted!r}" if wanted else "center=False")
                                 + f"), or `vilseg index build --naming {self.readout.naming} ...`)")
            self.index = vocabulary
            return
        from .vocabulary import normalise_vocabulary

        names = normalise_vocabulary(vocabulary)
        for word in self.readout.background_words:
            names.setdefault(word, [word])
        self.index = VocabularyIndex.build(self.model, names, self.templates, center=self.center,
                                           reference=self.reference)

    @property
    def reference(self) -> str:
        """What this segmenter's names are centred on (when ``center``): the read-out's reference."""
        return self.readout.text_reference

    # ------------------------------------------------------------------ the read-out
    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> ([1, 3, h, w] normalised tensor, short side resized to ``input_size`` and both sides rounded to
        the patch size; the displayed (H, W))."""
        x, size = self.prepare(image)
        return x[None].to(self.device), size

    def prepare(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """:func:`prepare_image` with this segmenter's input size and the model's normalisation (CPU tensor)."""
        encoder = self.model.image_encoder
        if not hasattr(encoder, "mean"):  # an encoder with its own normalisation (test doubles)
            x, size = prepare_image(image, self.input_size, self.patch)
            return encoder.normalize(x[None])[0], size
        return prepare_image(image, self.input_size, self.patch, encoder.mean.flatten().tolist(),
                             encoder.std.flatten().tolist())

    @torch.no_grad()
    def group_and_name(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, 3, h*p, w*p] -> ([h, w] segment ids 0..S-1, [S, E] normalised segment embeddings)."""
        _, ids, emb = self._read(x)
        return ids, emb

    def _read(self, x: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The forward pass, the grouping (bounded by ``min_area``/``max_segments``) and the naming of one image."""
        return self.read_batch(x)[0]

    def read_batch(self, xs: torch.Tensor) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """[B, 3, h*p, w*p] images of one size -> per image (its dense maps, [h, w] segment ids, [S, E] embeddings).

        Images that fit one forward pass share it; larger ones are tiled one by one. Masked-attention naming names
        the segments of all images in one pass; the other namings go image by image."""
        kwargs = self.naming.dense_kwargs(self.model) if hasattr(self.naming, "dense_kwargs") else {}
        if self.tiling.fits(self.model, xs):
            batch = self.model.dense_embeddings(xs, **kwargs)
            dense = [{k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(len(xs))]
        else:
            dense = [self.tiling(self.model, x[None], **kwargs) for x in xs]
        ids = []
        for d in dense:
            found = self.grouping(d)
            if self.readout.grouping != "dense":  # single patches are pooled, which costs the same for any number
                found = bound_segments(found, d["patch_embed"][0], self.readout.min_area, self.readout.max_segments)
            ids.append(found)
        if isinstance(self.naming, MaskedAttentionNaming) and all("hidden" in d for d in dense):
            start = self.naming.start_block(self.model)
            flat = torch.stack([i.flatten() for i in ids])
            named = self.model.segment_embeddings(torch.cat([d["hidden"] for d in dense]), flat, start)
            embs = [named[b, : int(i.max()) + 1] for b, i in enumerate(ids)]
        else:
            embs = [self.naming(self.model, x[None], d, i) for x, d, i in zip(xs, dense, ids)]
        return list(zip(dense, ids, embs))

    @torch.no_grad()
    def score_maps(self, image) -> tuple[torch.Tensor, np.ndarray | None]:
        """[C, H, W] class scores of every pixel (each segment's scores, bilinearly upsampled), for evaluation and
        threshold calibration with small vocabularies. Returns (scores on the CPU, None)."""
        if self.index is None:
            raise RuntimeError("set a vocabulary first (vocabulary=... or set_vocabulary)")
        x, size = self.preprocess(image)
        _, ids, emb = self._read(x)
        scores = self.index.scores(emb)[ids].permute(2, 0, 1)[None]  # [1, C, h, w]
        return F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)[0].cpu(), None

    @torch.no_grad()
    def segment(self, image, *, index: VocabularyIndex | None = None, threshold=UNSET) -> SegmentationResult:
        """Segments one image (path, PIL image or uint8 array).

        Args:
            index: a vocabulary for this call only (default: the one set on the segmenter).
            threshold: a background threshold for this call only (None: no background; default: the read-out's).

        The per-call settings never touch the segmenter's state, so one segmenter serves concurrent callers with
        their own vocabularies and thresholds (the web demo does)."""
        return self.segment_batch([image], index=index, threshold=threshold)[0]

    @torch.no_grad()
    def segment_batch(self, images: list | None = None, prepared: list | None = None, *,
                      index: VocabularyIndex | None = None, threshold=UNSET) -> list[SegmentationResult]:
        """Segments several images: those of one input size share forward passes (``batch_size`` at a time), and
        masked-attention naming names all their segments in one pass. The results equal :meth:`segment`'s.

        Args:
            images: paths, PIL images or uint8 arrays.
            prepared: instead of ``images``, their :meth:`prepare` outputs (e.g. from DataLoader workers).
            index, threshold: per-call settings, as in :meth:`segment`.
        """
        index = index or self.index
        if index is None:
            raise RuntimeError("set a vocabulary first (vocabulary=... or set_vocabulary), or pass index=")
        decision = self._decision(self.readout.threshold if threshold is UNSET else threshold)
        if prepared is None:
            prepared = [self.prepare(image) for image in images]
        by_shape: dict[tuple, list[int]] = {}
        for i, (x, _) in enumerate(prepared):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        results: list = [None] * len(prepared)
        for members in by_shape.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                xs = torch.stack([prepared[i][0] for i in chunk]).to(self.device)
                for i, read in zip(chunk, self.read_batch(xs)):
                    results[i] = self._result(*read, prepared[i][1], index, decision)
        return results

    def _result(self, dense: dict, ids: torch.Tensor, emb: torch.Tensor, size: tuple[int, int], index,
                decision) -> SegmentationResult:
        height, width = size
        top_s, top_c = index.search(emb, self.top_k)  # [S, k]
        background = decision.background(top_s[:, 0], top_c[:, 0], index.classes)
        labels = self._label_map(ids, emb, top_c, background, (height, width), index, decision)
        seg_map = F.interpolate(ids[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        prototypes = None
        if "slot_dots" in dense:  # from the same forward pass: no second one to count prototype use
            k = dense["slot_dots"].shape[1]
            unused = sorted(set(range(k)) - set(dense["slot_dots"].argmax(1).unique().tolist()))
            prototypes = {"total": k, "used": k - len(unused), "unused": unused}
        return SegmentationResult(labels.cpu().numpy(), seg_map.cpu().numpy(),
                                  self._describe(seg_map, top_s, top_c, background, index.classes), prototypes,
                                  list(index.classes))

    @torch.no_grad()
    def prompt(self, image, point: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
        """Prompting-patch segmentation: the [H, W] bool mask of the object under ``point`` (y, x in displayed
        pixels). With the slots grouping, the connected region of patches whose arg-max prototype is the prompted
        patch's; otherwise the patches whose joint-space embedding has cosine >= ``threshold`` with the prompted
        patch's (MMC's prompting-patch probe)."""
        x, (height, width) = self.preprocess(image)
        dense = self.tiling(self.model, x)
        h, w = dense["patch_embed"].shape[-2:]
        y0, x0 = min(h - 1, point[0] * h // height), min(w - 1, point[1] * w // width)
        if self.readout.grouping == "slots":
            ids = self.grouping(dense)
            mask = (ids == ids[y0, x0]).float()
        else:
            emb = dense["patch_embed"][0]  # [E, h, w]
            mask = (torch.einsum("e,ehw->hw", emb[:, y0, x0], emb) >= threshold).float()
        full = F.interpolate(mask[None, None], size=(height, width), mode="nearest")[0, 0]
        return full.bool().cpu().numpy()

    @torch.no_grad()
    def prototype_usage(self, images) -> dict:
        """How often each SlotCon prototype is some patch's arg-max over ``images``; the unused ones are listed
        (prototypes no pixel uses are dead weight, or a sign of collapse)."""
        if getattr(self.model, "slot_head", None) is None:
            raise ValueError("this model has no prototypes (train it with the slotcon objective)")
        k = self.model.slot_head.prototypes.shape[0]
        counts = torch.zeros(k, dtype=torch.long)
        for image in images:
            x, _ = self.preprocess(image)
            dots = self.tiling(self.model, x)["slot_dots"]
            counts += torch.bincount(dots.argmax(1).flatten().cpu(), minlength=k)
        unused = torch.nonzero(counts == 0).flatten().tolist()
        return {"prototypes": k, "used": k - len(unused), "unused": unused, "patches": counts.tolist()}

    def _label_map(self, ids, emb, top_c, background, size, index, decision) -> torch.Tensor:
        """[H, W] labels: the classes' scores at patch resolution, bilinearly upsampled, then the arg-max over them
        and a constant background channel (the threshold, as TCL; none without a threshold); background words are
        background. Only the classes some segment ranks first are upsampled when the vocabulary is large (all of
        them up to ``ALL_CLASS_MAPS``), so memory stays O(segments x H x W) for any vocabulary size."""
        n_classes = len(index.classes)
        if n_classes <= ALL_CLASS_MAPS:
            keep, scores = torch.arange(n_classes), index.scores(emb)
        else:
            keep = torch.unique(top_c[:, 0].cpu())
            scores = self._scores_of(emb, keep, index)
        # no threshold: a floor below every cosine (finite: bilinear weights of 0 times -inf would be NaN)
        floor = decision.threshold if isinstance(decision, ThresholdDecision) else -10.0
        maps = torch.cat([torch.full_like(scores[:, :1], floor), scores], 1)  # [S, 1 + K]
        pixels = maps[ids].permute(2, 0, 1)[None].float()  # [1, 1 + K, h, w]
        # max(0).indices, not argmax(0): the same first-maximum index, 5-8x faster over a channels-first map on the CPU
        best = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)[0].max(0).indices  # [H, W]
        lookup = torch.cat([torch.zeros(1, dtype=torch.long), keep.long() + 1]).to(best.device)
        words = set(self.readout.background_words)
        for i, c in enumerate(index.classes):
            if c in words:
                lookup[lookup == i + 1] = 0
        return lookup[best]

    def _scores_of(self, emb: torch.Tensor, keep: torch.Tensor, index) -> torch.Tensor:
        """[S, E] -> [S, K] scores of the classes ``keep`` only (the best of each class's names)."""
        vectors = torch.from_numpy(index.vectors).to(emb.device)
        owner = index.owner.to(emb.device)
        sims = emb.float() @ vectors.t()  # [S, T] — vectors of every name, but only S rows
        out = torch.full((emb.shape[0], len(keep)), -2.0, device=emb.device)
        for i, c in enumerate(keep.tolist()):
            out[:, i] = sims[:, owner == c].max(1).values
        return out

    def _describe(self, seg_map, top_s, top_c, background, classes) -> list[dict]:
        """One dict per segment present in ``seg_map``: label, score, area (pixels), box (x0, y0, x1, y1), top-k."""
        n = top_s.shape[0]
        flat = seg_map.flatten()
        area = torch.bincount(flat, minlength=n)
        ys = torch.arange(seg_map.shape[0], device=seg_map.device)[:, None].expand_as(seg_map).flatten()
        xs = torch.arange(seg_map.shape[1], device=seg_map.device)[None].expand_as(seg_map).flatten()
        lo = [torch.full((n,), big, device=flat.device).scatter_reduce(0, flat, v, "amin")
              for v, big in ((xs, seg_map.shape[1]), (ys, seg_map.shape[0]))]
        hi = [torch.full((n,), -1, device=flat.device).scatter_reduce(0, flat, v, "amax") for v in (xs, ys)]
        top_s, top_c, background = top_s.tolist(), top_c.tolist(), background.tolist()
        segments = []
        for sid in torch.nonzero(area).flatten().tolist():
            segments.append({
                "id": sid, "label": "background" if background[sid] else classes[top_c[sid][0]],
                "score": float(top_s[sid][0]), "area": int(area[sid]),
                "box": [int(lo[0][sid]), int(lo[1][sid]), int(hi[0][sid]) + 1, int(hi[1][sid]) + 1],
                "top": [[classes[c], round(s, 4)] for s, c in zip(top_s[sid], top_c[sid])]})
        return segments

    def render_overlay(self, image, result: SegmentationResult, path, min_side: int = 256) -> Path:
        """Writes a PNG: image | coloured label overlay, with a legend of the labels present."""
        from ..overlay import render_overlay

        names = ["background", *(result.classes if result.classes is not None else self.index.classes)]
        return render_overlay(load_image(image), result.labels, names, path, min_side)
