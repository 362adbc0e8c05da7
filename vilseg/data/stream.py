"""The webdataset training stream: shards (or a folder of images) -> decoded, augmented batches. Bad samples are
skipped and counted by reason.

Stages (each commented where it is built):
  source list (resampled, or shuffled + split by node + split by worker) -> tar to samples (tar errors logged and
  skipped), or image files to samples -> shuffle -> decode + validate + augment + mask (bad samples skipped,
  counted by reason) -> batch.
Captions travel as strings: the training step tokenises them, or looks their features up when the text tower is
frozen (:class:`vilseg.training.text_cache.TextFeatureCache`). Shards prepared with ``data_prep text-features`` carry
a frozen tower's features and hard negatives; these travel with the batch instead (:mod:`vilseg.data.text_features`).
Shards are split inside webdataset, never through accelerate's batch dispatch: for an IterableDataset accelerate
would otherwise read every batch on rank 0 and broadcast it.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image
from ..errors import ConfigError, ConfigFileError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset opener for schemes it lacks (s3://, az://, memory://, ...): delegate to fsspec.

    fsspec needs the filesystem's package for remote stores (s3fs for s3://, adlfs for az://, ...).
    """
    import fsspec

    try:
        return fsspec.open(url, mode).open()
    except (ImportError, ValueError) as exn:
        raise ValueError(f"cannot open shard {url!r}: neither webdataset nor fsspec handles it ({exn})") from exn


def _register_fsspec_fallback() -> None:
    """Makes fsspec the default for URL schemes webdataset's gopen does not know (done at import, so that
    spawned DataLoader workers get it too)."""
    import importlib

    try:  # `webdataset.gopen` the attribute is a function; the module holds the scheme table
        gopen_module = importlib.import_module("webdataset.gopen")
    except ImportError:  # webdataset is only needed for training
        return
    gopen_module.gopen_schemes["__default__"] = _gopen_fsspec


_register_fsspec_fallback()
CAPTION_KEYS = ("txt", "caption")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expands brace patterns and '::'-joined lists; checks that local shard files exist.

    Raises:
        FileNotFoundError: naming the local shards that do not exist.
    """
    import webdataset as wds

    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [
        u for url in urls for u in wds.shardlists.expand_urls(url)]
    if not expanded:
        raise ConfigFileError(f"data.shards {urls!r} names no shard")
    missing = []
    for url in expanded:
        local = url[len("file:"):] if url.startswith("file:") else url
        if "://" not in url and not url.startswith("pipe:") and not os.path.exists(local):
            missing.append(local)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigFileError(f"{len(missing)} of {len(expanded)} shards in data.shards={urls!r} do not exist: {shown}")
    return expanded


class SkipLog:
    """Per-worker tally of skipped samples by reason; each yielded sample carries the delta since the last one.

    Worker processes cannot share a counter with the main process, so counts travel inside the batches: summing
    ``batch["skipped"]`` over the batches consumed gives the exact total.
    """

    def __init__(self):
        self.pending: Counter = Counter()
        self.truncated: set[str] = set()  # shards already counted as truncated (by their tail)

    def add(self, reason: str) -> None:
        self.pending[reason] += 1

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler for tar-level errors (unreadable or truncated shards): count and continue.

        One broken shard makes webdataset call this twice: once while reading the member (no URL in the
        exception), then again when the tar reader itself fails (the URL is the exception's last argument). Only
        the second is counted, and not at all if the shard was already counted as ``truncated_shard``.
        """
        url = exn.args[-1] if len(exn.args) >= 2 and isinstance(exn.args[-1], str) else None
        if url is not None and url not in self.truncated:
            self.add(f"tar_error:{type(exn).__name__}")
        return True

    def check_tail(self, source):
        """Stage on the shard list: a local tar must end with the end-of-archive marker (two zero blocks). One that
        does not was cut short, possibly exactly between two members, where the tar reader stops without an
        error and the samples after the cut vanish uncounted; count it once per read as ``truncated_shard``.
        Streams (pipe:, https://, ...) cannot be checked without reading them twice."""
        for item in source:
            path = item["url"][len("file:"):] if item["url"].startswith("file:") else item["url"]
            if "://" not in path and not path.startswith("pipe:") and os.path.isfile(path):
                try:
                    with open(path, "rb") as f:
                        size = f.seek(0, 2)
                        f.seek(max(0, size - 1024))
                        tail = f.read()
                except OSError:
                    tail = b""
                if len(tail) < 1024 or tail.count(0) != len(tail):
                    self.add("truncated_shard")
                    self.truncated.add(item["url"])
            yield item

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


def caption_choices(sample: dict) -> list[str]:
    """The captions the stream may pair with this sample: its json "captions" when there are several (e.g. COCO),
    else its one caption (.txt, .caption, or the json's). Raises KeyError("caption") when it has none."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    captions = meta.get("captions")
    if isinstance(captions, list) and len(captions) > 1:
        return [str(c).strip() for c in captions]
    for key in CAPTION_KEYS:
        if key in sample:
            return [sample[key].decode("utf-8").strip()]
    value = meta.get("caption") or captions
    if isinstance(value, list) and value:
        return [str(value[0]).strip()]
    if isinstance(value, str):
        return [value.strip()]
    raise KeyError("caption")


def _decode_caption(sample: dict, rng: np.random.Generator) -> str:
    """One of :func:`caption_choices`, drawn at random each time the sample is seen, so each epoch may pair the
    image with a different caption."""
    choices = caption_choices(sample)
    return choices[rng.integers(len(choices))] if len(choices) > 1 else choices[0]


def _decode_image(sample: dict) -> Image.Image:
    if isinstance(sample.get("pil"), Image.Image):  # rendered in the stream (synthetic source)
        return sample["pil"]
    for key in IMAGE_KEYS:
        if key in sample:
            with Image.open(io.BytesIO(sample[key])) as im:
                im.load()
                return im.convert("RGB")
    raise KeyError("image")


def swap_word(caption: str, groups: list[list[str]], rng: np.random.Generator, exclude=()) -> str | None:
    """Hard-negative caption (NegCLIP-style): one word of a group replaced by another word of the same group.

    E.g. with groups [["circle", "square"], ["red", "blue"]], "a red circle" -> "a red square" or "a blue circle".
    Swaps whose result contains a phrase of ``exclude`` are not used (e.g. held-out combinations that training must
    never see). Returns None when no acceptable swap exists.
    """
    words = caption.split(" ")
    spots = [(i, g) for i, w in enumerate(words) for g in groups if w.lower().strip(".,;:!?") in g]
    for k in rng.permutation(len(spots)):
        i, group = spots[k]
        core = words[i].lower().strip(".,;:!?")
        tail = words[i][len(words[i].rstrip(".,;:!?")):]
        for j in rng.permutation(len(group)):
            if group[j] == core:
                continue
            candidate = " ".join(words[:i] + [group[j] + tail] + words[i + 1:])
            if not any(phrase in candidate.lower() for phrase in exclude):
                return candidate
    return None


class DecodeAugment:
    """The map stage as a generator: decode, validate, multi-crop, mask; skip and count bad samples.

    Its RNG is seeded from (seed, rank, worker), so the stream is reproducible for exact resumption.

    Args:
        crop: a :class:`~vilseg.data.multicrop.MultiCrop`.
        skip_log: where skipped samples are counted.
        seed: base seed.
        captions: read the caption (False: image-only stage; captions, present or not, are ignored).
        swap_groups: word groups for hard-negative captions (see :func:`swap_word`); every sample then also carries
            ``neg_caption`` and ``has_neg``.
        swap_exclude: phrases a hard-negative caption must never contain.
        masking: a :class:`~vilseg.data.masking.BlockMasking`; every sample then carries ``masks``
            [n_global, h, w] (True = patch to corrupt) for its global views.
        min_image_side: images whose shorter side is below this are skipped (``image_too_small``): a 1x1 image
            would be blown up into a flat crop.
        max_caption_chars: captions longer than this are skipped (``caption_too_long``): a megabyte caption is a
            broken sample, not a description.
        text_tower: the frozen text tower's identity (:func:`~vilseg.models.text_encoder.tower_identity`): samples
            whose stored features are this tower's carry them as ``text_feature`` (and, when made for
            ``swap_groups``, their hard negative is drawn from the stored ones, with ``neg_text_feature``). None:
            stored features are ignored.
    """

    def __init__(self, crop, skip_log: SkipLog, seed: int, captions: bool = True, swap_groups=None,
                 swap_exclude=(), masking=None, min_image_side: int = 16, max_caption_chars: int = 1000,
                 text_tower: str | None = None):
        from .text_features import normalise_groups, swap_key

        self.crop, self.skip_log, self.seed, self.captions, self.masking = crop, skip_log, seed, captions, masking
        self.min_image_side, self.max_caption_chars = min_image_side, max_caption_chars
        self.swap_groups, self.swap_exclude = normalise_groups(swap_groups, swap_exclude)
        self.text_tower = text_tower if captions else None
        self.swap_key = swap_key(self.swap_groups, self.swap_exclude)

    def __call__(self, source):
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng([self.seed, rank, worker])
        for sample in source:
            out = self._one(sample, rng)
            if out is not None:
                out["skipped"] = self.skip_log.take()
                yield out

    def _one(self, sample: dict, rng) -> dict | None:
        caption = self._caption(sample, rng) if self.captions else ""
        if caption is None:
            return None
        try:
            image = _decode_image(sample)
        except KeyError:
            self.skip_log.add("missing_image")
            return None
        except Exception:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
            self.skip_log.add("corrupt_image")
            return None
        if min(image.size) < self.min_image_side:
            self.skip_log.add("image_too_small")
            return None
        views, boxes, flips = self.crop(image, rng)
        out = {"views": views, "boxes": boxes, "flips": flips, "caption": caption, "key": sample.get("__key__")}
        if self.masking is not None:
            out["masks"] = torch.from_numpy(np.stack([self.masking(rng) for _ in range(self.crop.n_global)]))
        stored, index = None, None
        if self.text_tower is not None:
            from .text_features import read_sample

            stored = read_sample(sample, self.text_tower, self.swap_key)
            index = stored.caption_index(caption) if stored is not None else None
            if index is not None:
                out["text_feature"] = stored.row(index)
        if self.captions and self.swap_groups:
            if index is not None and stored.negatives is not None:  # one of the negatives prepared for it
                choices = stored.negatives[index]
                pick = choices[rng.integers(len(choices))] if choices else index
                out["neg_caption"], out["has_neg"] = stored.texts[pick], bool(choices)
                out["neg_text_feature"] = stored.row(pick)
            else:
                negative = swap_word(caption, self.swap_groups, rng, self.swap_exclude)
                out["neg_caption"] = negative or caption  # an invalid negative is masked out of the loss
                out["has_neg"] = negative is not None
        return out

    def _caption(self, sample: dict, rng) -> str | None:
        try:
            caption = _decode_caption(sample, rng)
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exn:
            self.skip_log.add("missing_caption" if isinstance(exn, KeyError) else "bad_caption")
            return None
        if not caption:
            self.skip_log.add("empty_caption")
            return None
        if len(caption) > self.max_caption_chars:
            self.skip_log.add("caption_too_long")
            return None
        return caption


def collate(samples: list[dict]) -> dict:
    """Stacks samples; ``views`` becomes a list (one [B, 3, S, S] tensor per view), captions stay strings."""
    n_views = len(samples[0]["views"])
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    batch = {
        "views": [torch.stack([s["views"][v] for s in samples]) for v in range(n_views)],
        "boxes": torch.stack([s["boxes"] for s in samples]),
        "flips": torch.stack([s["flips"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "skipped": dict(skipped),
    }
    if "masks" in samples[0]:
        batch["masks"] = torch.stack([s["masks"] for s in samples])  # [B, G, h, w]
    if "neg_caption" in samples[0]:
        batch["neg_captions"] = [s["neg_caption"] for s in samples]
        batch["has_neg"] = torch.tensor([s["has_neg"] for s in samples])
    if any("text_feature" in s for s in samples):  # stored text-tower features; ok marks the samples that had them
        batch["text_features"], batch["text_features_ok"] = _stack_rows([s.get("text_feature") for s in samples])
        if "neg_caption" in samples[0]:
            batch["neg_text_features"], batch["neg_text_features_ok"] = _stack_rows(
                [s.get("neg_text_feature") for s in samples])
    return batch


def _stack_rows(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional [W] arrays -> ([N, W] tensor with zeros where missing, [N] bool present)."""
    width = next(r for r in rows if r is not None).shape[-1]
    out = np.zeros((len(rows), width), dtype=np.float16)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    return torch.from_numpy(out), torch.tensor([r is not None for r in rows])


def read_captions(shards, n: int) -> list[str]:
    """The first ``n`` readable captions of a shard set, in shard order (one deterministic pass, no shuffling).

    Used to fit the text subspace of a trained model (``ViLSeg.fold_text_subspace``); every process reads the same
    captions, so every process fits the same subspace. Unreadable samples and shards are skipped.
    """
    import webdataset as wds

    rng = np.random.default_rng(0)  # for samples that hold several captions
    captions: list[str] = []
    skip_log = SkipLog()
    if isinstance(shards, str) and shards.startswith(SYNTHETIC):
        pipeline = wds.DataPipeline(wds.SimpleShardList(synthetic_urls(shards)[:n]), _render_synthetic())
    else:
        pipeline = wds.DataPipeline(wds.SimpleShardList(expand_urls(shards)),
                                    wds.tarfile_to_samples(handler=skip_log.tar_handler))
    for sample in pipeline:
        try:
            caption = _decode_caption(sample, rng)
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if caption:
            captions.append(caption)
        if len(captions) >= n:
            break
    if not captions:
        raise ConfigError(f"no readable caption in data.shards={shards!r}")
    return captions


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file (``IMAGE_KEYS`` extensions, any case) below ``folder``, sorted; raises if there is none."""
    from pathlib import Path

    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_KEYS)
    if not files:
        raise ConfigFileError(f"data.shards={str(folder)!r} is a folder with no image file "
                                f"(looked for {', '.join('.' + k for k in IMAGE_KEYS)} below it)")
    return files


def _read_image_files(root: str, skip_log: SkipLog):
    """Stage: {"url": path} -> {"__key__": path relative to root, "<ext>": bytes}; unreadable files are counted."""

    def stage(source):
        for item in source:
            path = item["url"]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                skip_log.add("unreadable_file")
                continue
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            yield {"__key__": os.path.relpath(path, root), "__url__": path, ext: data}

    return stage


SYNTHETIC = "synthetic:"


def synthetic_urls(spec: str) -> list[str]:
    """``"synthetic:N"`` -> N scene ids of the synthetic training world (rendered in the stream, nothing on disk)."""
    count = spec[len(SYNTHETIC):] or "10000"
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"data.shards={spec!r}: write synthetic:N with N >= 1 scenes, e.g. synthetic:2000")
    return [f"{SYNTHETIC}{i}" for i in range(int(count))]


def _render_synthetic():
    """Stage: {"url": "synthetic:i"} -> scene i of the synthetic training world (64 px, seed 0) as a sample."""
    from .synthetic import SyntheticWorld

    world = SyntheticWorld("train")

    def stage(source):
        for item in source:
            index = int(item["url"][len(SYNTHETIC):])
            scene = world.scene(index)
            yield {"__key__": f"{index:08d}", "pil": Image.fromarray(scene.image), "txt": scene.caption.encode()}

    return stage


def resolve_shards(shards, captions: bool = True) -> tuple[bool, bool, list[str]]:
    """What ``data.shards`` names: (a folder of images?, synthetic scenes?, the shard URLs or image files), checked
    as far as it can be without reading: local shards exist, a folder holds images and is not asked for captions.

    Raises:
        ConfigError: naming the setting and what is wrong with it.
    """
    if shards is None:
        raise ConfigError("data.shards is not set: give a shard pattern, e.g. data.shards='data/train-{000..009}.tar', "
                          "or (image-only stages) a folder of images")
    folder = isinstance(shards, (str, os.PathLike)) and os.path.isdir(shards)
    if folder and captions:
        raise ConfigError(f"data.shards={str(shards)!r} is a folder of images: it has no captions, so it can only "
                          f"feed objectives that need none (an image-only stage)")
    synthetic = isinstance(shards, str) and shards.startswith(SYNTHETIC)
    urls = list_image_files(shards) if folder else synthetic_urls(shards) if synthetic else expand_urls(shards)
    return folder, synthetic, urls


def make_train_stream(shards, crop, batch_size: int, seed: int = 0, resampled: bool = True,
                      shuffle_buffer: int = 1000, captions: bool = True, swap_groups=None, swap_exclude=(),
                      masking=None, min_image_side: int = 16, max_caption_chars: int = 1000,
                      text_tower: str | None = None):
    """Builds the training ``wds.DataPipeline`` (an IterableDataset yielding collated batches).

    Args:
        shards: brace pattern, '::'-joined string or list of shard URLs (local paths, ``pipe:``, ``https://``,
            ``s3://``... anything webdataset's gopen opens), a local folder of images (image-only stages), or
            ``synthetic:N`` (N scenes of the synthetic world rendered on the fly: debug presets, fresh clones).
        crop: a :class:`~vilseg.data.multicrop.MultiCrop`.
        batch_size: per-process batch size.
        seed: seeds the shard sampler, the shuffle buffer and the augmentation RNG.
        resampled: infinite stream of shards (or images) drawn with replacement (seeded per rank and worker)
            instead of one pass over the list split by node and worker.
        shuffle_buffer: samples held by the shuffle buffer.
        captions: read captions (False: image-only; captions are ignored and samples need none).
        swap_groups: word groups for hard-negative captions (see :func:`swap_word`); None for none.
        swap_exclude: phrases a hard-negative caption must never contain.
        masking: a :class:`~vilseg.data.masking.BlockMasking` for the global views, or None.
        min_image_side, max_caption_chars: limits below/above which samples are skipped and counted
            (see :class:`DecodeAugment`).
        text_tower: the frozen text tower's identity: stored features of this tower are used (see
            :class:`DecodeAugment`); None ignores them.
    """
    import webdataset as wds

    folder, synthetic, urls = resolve_shards(shards, captions)
    skip_log = SkipLog()
    if resampled:
        # Every (rank, worker) draws its own sequence: deterministic=True seeds it with rank*1000+worker.
        source_stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        source_stages = [
            wds.SimpleShardList(urls),
            wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed),  # shard (or file) order
            wds.split_by_node,  # this rank's shards
            wds.split_by_worker,  # this DataLoader worker's shards
        ]
    if folder:
        to_samples = _read_image_files(str(shards), skip_log)  # image files: read, unreadable counted
    elif synthetic:
        to_samples = _render_synthetic()  # scenes rendered here
    else:
        source_stages.append(skip_log.check_tail)  # local shards cut short: counted once
        to_samples = wds.tarfile_to_samples(handler=skip_log.tar_handler)  # bad tars: counted, skipped
    return wds.DataPipeline(
        *source_stages,
        to_samples,
        wds.detshuffle(bufsize=shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed),  # sample order
        DecodeAugment(crop, skip_log, seed, captions, swap_groups, swap_exclude, masking, min_image_side,
                      max_caption_chars, text_tower),  # decode, validate, augment, mask
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
