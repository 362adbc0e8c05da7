"""The webdataset training stream: shards -> decoded, augmented, tokenised batches. Bad samples are counted.

Stages (each commented where it is built):
  shard list (resampled, or shuffled + split by node + split by worker) -> tar to samples (tar errors logged and
  skipped) -> shuffle -> decode + validate + augment + tokenise (bad samples skipped, counted by reason) -> batch.
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
        raise FileNotFoundError(f"data.shards {urls!r} names no shard")
    missing = []
    for url in expanded:
        local = url[len("file:"):] if url.startswith("file:") else url
        if "://" not in url and not url.startswith("pipe:") and not os.path.exists(local):
            missing.append(local)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shards in data.shards={urls!r} do not exist: {shown}")
    return expanded


class SkipLog:
    """Per-worker tally of skipped samples by reason; each yielded sample carries the delta since the last one.

    Worker processes cannot share a counter with the main process, so counts travel inside the batches: summing
    ``batch["skipped"]`` over the batches consumed gives the exact total.
    """

    def __init__(self):
        self.pending: Counter = Counter()

    def add(self, reason: str) -> None:
        self.pending[reason] += 1

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler for tar-level errors (unreadable or truncated shards): count and continue."""
        self.add(f"tar_error:{type(exn).__name__}")
        return True

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


def _decode_caption(sample: dict, rng: np.random.Generator) -> str:
    """The .txt caption; a sample whose json holds several "captions" (e.g. COCO) gets one drawn at random each
    time it is seen, so each epoch may pair the image with a different caption."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    captions = meta.get("captions")
    if isinstance(captions, list) and len(captions) > 1:
        return str(captions[rng.integers(len(captions))]).strip()
    for key in CAPTION_KEYS:
        if key in sample:
            return sample[key].decode("utf-8").strip()
    value = meta.get("caption") or captions
    if isinstance(value, list) and value:
        return str(value[0]).strip()
    if isinstance(value, str):
        return value.strip()
    raise KeyError("caption")


def _decode_image(sample: dict) -> Image.Image:
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


class DecodeAugmentTokenize:
    """The map stage as a generator: decode, validate, multi-crop, tokenise; skip and count bad samples.

    Its RNG is seeded from (seed, rank, worker), so the stream is reproducible for exact resumption.
    With ``swap_groups``, every sample also carries a tokenised hard-negative caption (``neg_*``, ``has_neg``).
    """

    def __init__(self, crop, tokenizer, skip_log: SkipLog, seed: int, swap_groups=None, swap_exclude=()):
        self.crop, self.tokenizer, self.skip_log, self.seed = crop, tokenizer, skip_log, seed
        self.swap_groups = [list(map(str.lower, g)) for g in swap_groups or [] if len(g) > 1]
        self.swap_exclude = [p.lower() for p in swap_exclude or ()]

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
        try:
            caption = _decode_caption(sample, rng)
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exn:
            self.skip_log.add("missing_caption" if isinstance(exn, KeyError) else "bad_caption")
            return None
        if not caption:
            self.skip_log.add("empty_caption")
            return None
        try:
            image = _decode_image(sample)
        except KeyError:
            self.skip_log.add("missing_image")
            return None
        except Exception:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
            self.skip_log.add("corrupt_image")
            return None
        views, boxes, flips = self.crop(image, rng)
        out = {"views": views, "boxes": boxes, "flips": flips, "caption": caption, "key": sample.get("__key__")}
        if not self.swap_groups:
            out.update({k: v[0] for k, v in self.tokenizer([caption]).items()})
            return out
        negative = swap_word(caption, self.swap_groups, rng, self.swap_exclude)
        tokens = self.tokenizer([caption, negative or caption])  # one tokenizer call for both
        out.update({k: v[0] for k, v in tokens.items()})
        out.update({f"neg_{k}": v[1] for k, v in tokens.items()})
        out["has_neg"] = torch.tensor(negative is not None)
        return out


def collate(samples: list[dict]) -> dict:
    """Stacks samples; ``views`` becomes a list (one [B, 3, S, S] tensor per view)."""
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
    for key in ("input_ids", "attention_mask", "neg_input_ids", "neg_attention_mask", "has_neg"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


def read_captions(shards, n: int) -> list[str]:
    """The first ``n`` readable captions of a shard set, in shard order (one deterministic pass, no shuffling).

    Used to fit the text subspace of a trained model (``ViLSeg.fit_text_subspace``); every process reads the same
    captions, so every process fits the same subspace. Unreadable samples and shards are skipped.
    """
    import webdataset as wds

    rng = np.random.default_rng(0)  # for samples that hold several captions
    captions: list[str] = []
    skip_log = SkipLog()
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
        raise ValueError(f"no readable caption in data.shards={shards!r}")
    return captions


def make_train_stream(shards, tokenizer, crop, batch_size: int, seed: int = 0, resampled: bool = True,
                      shuffle_buffer: int = 1000, swap_groups=None, swap_exclude=()):
    """Builds the training ``wds.DataPipeline`` (an IterableDataset yielding collated batches).

    Args:
        shards: brace pattern, '::'-joined string or list of shard URLs (local paths, ``pipe:``, ``https://``,
            ``s3://``... anything webdataset's gopen opens).
        tokenizer: callable list[str] -> dict of [B, L] tensors.
        crop: a :class:`~vilseg.data.multicrop.MultiCrop`.
        batch_size: per-process batch size.
        seed: seeds the shard sampler, the shuffle buffer and the augmentation RNG.
        resampled: infinite stream of shards drawn with replacement (seeded per rank and worker) instead of
            one pass over the shard list split by node and worker.
        shuffle_buffer: samples held by the shuffle buffer.
        swap_groups: word groups for hard-negative captions (see :func:`swap_word`); None for none.
        swap_exclude: phrases a hard-negative caption must never contain.
    """
    import webdataset as wds

    urls = expand_urls(shards)
    skip_log = SkipLog()
    if resampled:
        # Every (rank, worker) draws its own shard sequence: deterministic=True seeds it with rank*1000+worker.
        shard_stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        shard_stages = [
            wds.SimpleShardList(urls),
            wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed),  # shard order
            wds.split_by_node,  # this rank's shards
            wds.split_by_worker,  # this DataLoader worker's shards
        ]
    return wds.DataPipeline(
        *shard_stages,
        wds.tarfile_to_samples(handler=skip_log.tar_handler),  # unreadable/truncated tars: counted, skipped
        wds.detshuffle(bufsize=shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed),  # sample order
        DecodeAugmentTokenize(crop, tokenizer, skip_log, seed, swap_groups, swap_exclude),  # decode, validate, augment, tokenise
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
