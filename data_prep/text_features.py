"""Adds a frozen text tower's features (and hard negatives) to webdataset shards, for one training config.

    python -m data_prep text-features --config configs/demo.yaml 'data/demo/train-{000000..000014}.tar'
    python -m data_prep text-features --config configs/demo.yaml 'shards/*.tar' --out shards-text/

The config names the model (hence the text tower, which must be frozen: ``text.freeze: true``) and the hard-negative
word groups (``data.hard_negative_groups`` / ``data.hard_negative_exclude``). Every sample with a caption gets
``{key}.text.json`` and ``{key}.text.npy`` (format: :mod:`vilseg.data.text_features`); every other member is copied
unchanged. Training with that config then reads the features instead of running the tower; with another tower it
refuses the shards.

Each shard is written under a ``.tmp`` name and renamed into place when complete (in place when ``--out`` is not
given), so an interrupted run leaves every shard either as it was or complete; a rerun skips shards that already
hold features for this config. ``OUT/text_features.json`` (or the first shard's folder's) records the tower identity,
the settings and the cost: seconds, texts encoded, texts per second.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from .build import add_member

MANIFEST = "text_features.json"
NEGATIVES_PER_CAPTION = 16  # draws per caption (repeats kept); the demo's captions have 4-16 distinct swaps


class Featurizer:
    """The frozen text tower of a training config, and the negatives its word groups make.

    Args:
        config: a training config path (a delta over configs/default.yaml).
        negatives: hard-negative draws per caption (0: none, even if the config has word groups).
        batch_size: texts per tower call.
    """

    def __init__(self, config: str, negatives: int = NEGATIVES_PER_CAPTION, batch_size: int = 256):
        from accelerate.utils import set_seed

        from vilseg.data.text_features import normalise_groups, swap_key
        from vilseg.errors import ConfigError
        from vilseg.models import create_model
        from vilseg.models.text_encoder import tower_identity
        from vilseg.training.config import load_config, validate_training_config

        cfg = validate_training_config(load_config(config))
        if negatives < 0:
            raise ConfigError(f"--negatives {negatives}: give 0 or more draws per caption")
        set_seed(cfg.run.seed)  # as training does before it builds the model (a randomly initialised tower)
        model = create_model(cfg.model.name, **dict(cfg.model.overrides or {}))
        if not model.config.text.freeze:
            raise ConfigError(f"model.name={cfg.model.name!r} trains its text tower (text.freeze: false): its features "
                              f"change as it trains, so they cannot be stored in the shards")
        self.encoder, self.tokenizer = model.text_encoder.eval(), model.tokenizer
        self.identity, self.model_name, self.config = tower_identity(model), cfg.model.name, config
        self.groups, self.exclude = normalise_groups(cfg.data.hard_negative_groups, cfg.data.hard_negative_exclude)
        self.negatives = negatives if self.groups else 0
        self.key = swap_key(self.groups, self.exclude) if self.negatives else None
        self.batch_size, self.seed = batch_size, cfg.run.seed
        self.encode_seconds, self.texts_encoded = 0.0, 0

    def settings(self) -> dict:
        return {"tower": self.identity, "model": self.model_name, "config": self.config,
                "negatives_for": self.key, "negatives_per_caption": self.negatives,
                "hard_negative_groups": self.groups, "hard_negative_exclude": self.exclude, "dtype": "float16"}

    def draw_negatives(self, key: str, caption: str) -> list[str]:
        """``negatives`` swaps of the caption, seeded by the sample key and caption (reruns give the same ones)."""
        from vilseg.data.stream import swap_word

        if not self.negatives:
            return []
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}\0{key}\0{caption}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        drawn = [swap_word(caption, self.groups, rng, self.exclude) for _ in range(self.negatives)]
        return [d for d in drawn if d is not None]

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, W] float32 features, in batches of similar length (the tokenizer pads to a batch's longest)."""
        import torch

        start = time.perf_counter()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = None
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                chunk = order[i:i + self.batch_size]
                tokens = self.tokenizer([texts[j] for j in chunk])
                feats = self.encoder(tokens["input_ids"], tokens.get("attention_mask")).float().numpy()
                out = np.empty((len(texts), feats.shape[1]), np.float32) if out is None else out
                out[chunk] = feats
        self.encode_seconds += time.perf_counter() - start
        self.texts_encoded += len(texts)
        return out if out is not None else np.empty((0, 0), np.float32)

    def members(self, samples: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """key -> {suffix: bytes} of samples -> key -> the two feature members, for samples with a caption; the
        texts of all samples are encoded together, each distinct text once."""
        from vilseg.data.text_features import pack

        plans = {}
        for key, sample in samples.items():
            captions = sample_captions(sample)
            if not captions:
                continue
            unique = list(dict.fromkeys(captions))
            texts = list(unique)
            negatives = []
            for caption in unique:
                rows = []
                for negative in self.draw_negatives(key, caption):
                    if negative not in texts:
                        texts.append(negative)
                    rows.append(texts.index(negative))
                negatives.append(rows)
            plans[key] = (texts, len(unique), negatives)
        distinct = list(dict.fromkeys(t for texts, _, _ in plans.values() for t in texts))
        feats = self.encode(distinct) if distinct else None
        row = {t: i for i, t in enumerate(distinct)}
        return {key: pack(self.identity, self.model_name, self.key, texts, n, negatives,
                          feats[[row[t] for t in texts]])
                for key, (texts, n, negatives) in plans.items()}


def sample_captions(sample: dict[str, bytes]) -> list[str]:
    """Every caption the training stream may draw for this sample (:func:`vilseg.data.stream.caption_choices`);
    [] when it has none."""
    from vilseg.data.stream import caption_choices

    try:
        return [c for c in caption_choices(sample) if c]
    except (KeyError, UnicodeDecodeError, ValueError):
        return []


def _read_samples(path: str) -> list[tuple[str | None, list[tuple[tarfile.TarInfo, bytes]]]]:
    """A shard's members grouped into samples (consecutive members sharing a key), in order; members that are not
    regular files or have no key are kept as their own group (key None)."""
    groups: list[tuple[str | None, list]] = []
    with tarfile.open(path, "r") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else b""
            split = base_plus_ext(info.name) if info.isfile() else None  # webdataset's key / suffix split
            key = split[0] if split and split[0] else None
            if key is not None and groups and groups[-1][0] == key:
                groups[-1][1].append((info, data))
            else:
                groups.append((key, [(info, data)]))
    return groups


def _suffix(info: tarfile.TarInfo) -> str:
    return base_plus_ext(info.name)[1]


def prepared(path: str | Path, featurizer: Featurizer) -> bool:
    """The shard exists and its first sample holds features for these settings (a complete earlier run)."""
    from vilseg.data.text_features import JSON_MEMBER, first_sample

    if not Path(path).is_file():
        return False
    try:
        sample = first_sample(str(path))
        meta = json.loads(sample[JSON_MEMBER]) if sample and JSON_MEMBER in sample else None
    except Exception:  # an unreadable earlier output is rewritten
        return False
    return bool(meta) and meta.get("tower") == featurizer.identity and meta.get("negatives_for") == featurizer.key


def featurize_shard(source: str, dest: Path, featurizer: Featurizer) -> dict:
    """Writes ``dest`` (which may be ``source``): ``source``'s members, each captioned sample followed by its two
    feature members (earlier feature members replaced). Returns counts."""
    from vilseg.data.text_features import JSON_MEMBER, NPY_MEMBER

    groups = _read_samples(source)
    samples = {key: {_suffix(i): d for i, d in members if _suffix(i) not in (JSON_MEMBER, NPY_MEMBER)}
               for key, members in groups if key is not None}
    added = featurizer.members(samples)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in groups:
            for info, data in members:
                if key is not None and _suffix(info) in (JSON_MEMBER, NPY_MEMBER):
                    continue
                tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
            for suffix, data in added.get(key, {}).items():
                add_member(tar, f"{key}.{suffix}", data)
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
    os.replace(tmp, dest)
    return {"samples": len(samples), "with_features": len(added)}


def add_text_features(shards: list[str], config: str, out: str | Path | None = None,
                      negatives: int = NEGATIVES_PER_CAPTION, batch_size: int = 256, progress: bool | None = None
                      ) -> dict:
    """Adds the features to every shard (into ``out``, or in place); returns the manifest it writes.

    Raises:
        ConfigError: a bad config, or a model whose text tower trains.
        ValueError: two shards with the same file name written into one ``out`` folder.
    """
    from tqdm.auto import tqdm

    start = time.time()
    featurizer = Featurizer(config, negatives, batch_size)
    folder = Path(out) if out is not None else Path(shards[0]).parent
    dests = [folder / Path(s).name if out is not None else Path(s) for s in shards]
    if len(set(dests)) != len(dests):
        raise ValueError(f"--out {str(out)!r}: two shards share a file name; write them to separate folders")
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"shards": len(shards), "shards_skipped_as_done": 0, "samples": 0, "samples_with_features": 0}
    for source, dest in tqdm(list(zip(shards, dests)), desc="text features", unit="shard",
                             disable=None if progress is None else not progress):  # None: a bar on a terminal only
        if prepared(dest, featurizer):
            counts["shards_skipped_as_done"] += 1
            continue
        done = featurize_shard(source, dest, featurizer)
        counts["samples"] += done["samples"]
        counts["samples_with_features"] += done["with_features"]
    seconds = time.time() - start
    manifest = {**featurizer.settings(), **counts, "texts_encoded": featurizer.texts_encoded,
                "seconds": round(seconds, 1), "seconds_encoding": round(featurizer.encode_seconds, 1),
                "texts_per_second": round(featurizer.texts_encoded / max(featurizer.encode_seconds, 1e-9), 1),
                "seconds_per_sample": round(seconds / max(counts["samples"], 1), 5),
                "shard_files": [str(d) for d in dests]}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return manifest
