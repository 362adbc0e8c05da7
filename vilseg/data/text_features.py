"""A frozen text tower's features stored in the shards, so that training never runs the tower.

``python -m data_prep text-features --config CONFIG SHARDS`` adds two members to every sample with a caption:

    {key}.text.json   {"tower": identity, "model": name, "negatives_for": swap key or null, "texts": [...],
                       "captions": n, "negatives": [[row, ...] for each caption]}
    {key}.text.npy    float16 [len(texts), W]: row i holds the tower's features of texts[i]

``texts`` holds the sample's captions first (every caption the stream may draw), then its hard negatives. The
negatives are drawn at preparation time with :func:`~vilseg.data.stream.swap_word` and the training config's word
groups, ``negatives_per_caption`` draws per caption (repeats kept, so that a uniform pick among them follows
``swap_word``'s own distribution); the stream picks one per sighting. NegCLIP prepares its negatives offline in the
same way. float16 halves the bytes; its rounding (relative 5e-4) is far below anything the losses resolve.

The stream (:class:`~vilseg.data.stream.DecodeAugment`) uses a sample's features when their tower identity
(:func:`~vilseg.models.text_encoder.tower_identity`) is the model's and the caption it drew is among ``texts``;
otherwise that caption goes through the text-feature cache as before. Training refuses, before it starts, shards
whose first sample holds features of another tower or negatives of other word groups (:func:`check_shard_features`;
``vilseg train`` checks this before it launches).
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from ..errors import ConfigError

JSON_MEMBER, NPY_MEMBER = "text.json", "text.npy"
PREPARE = "python -m data_prep text-features --config CONFIG SHARDS"


def normalise_groups(groups, exclude) -> tuple[list[list[str]], list[str]]:
    """The word groups and excluded phrases as :func:`~vilseg.data.stream.swap_word` uses them: lower case, groups
    of one word dropped."""
    return ([list(map(str.lower, g)) for g in groups or [] if len(g) > 1], [p.lower() for p in exclude or ()])


def swap_key(groups, exclude) -> str | None:
    """A fingerprint of the hard-negative settings (None without groups): negatives prepared for one set of groups
    are refused under another."""
    groups, exclude = normalise_groups(groups, exclude)
    if not groups:
        return None
    return hashlib.sha256(json.dumps([groups, exclude]).encode()).hexdigest()[:16]


def pack(identity: str, model: str, key: str | None, texts: list[str], n_captions: int,
         negatives: list[list[int]], features: np.ndarray) -> dict[str, bytes]:
    """The two members of one sample (see the module docstring)."""
    meta = {"tower": identity, "model": model, "negatives_for": key, "texts": texts, "captions": n_captions,
            "negatives": negatives}
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(features, dtype=np.float16), allow_pickle=False)
    return {JSON_MEMBER: json.dumps(meta, ensure_ascii=False).encode("utf-8"), NPY_MEMBER: buf.getvalue()}


class SampleFeatures:
    """One sample's stored features, parsed; only built when their tower is the expected one.

    Args:
        meta: the parsed ``text.json``.
        rows: the ``text.npy`` array.
        negatives_usable: the negatives were made for the training config's word groups.
    """

    def __init__(self, meta: dict, rows: np.ndarray, negatives_usable: bool):
        self.texts, self.rows = meta["texts"], rows
        self.n_captions = int(meta["captions"])
        self.negatives = meta["negatives"] if negatives_usable else None

    def caption_index(self, caption: str) -> int | None:
        try:
            return self.texts.index(caption, 0, self.n_captions)
        except ValueError:
            return None

    def row(self, index: int) -> np.ndarray:
        return self.rows[index]


def parse(sample: dict) -> tuple[dict, np.ndarray] | None:
    """A sample's stored ``text.json`` and ``text.npy`` as (meta, rows); None when it has neither.

    Raises:
        ValueError: members missing, unreadable, or with a row count other than the number of texts.
    """
    if JSON_MEMBER not in sample and NPY_MEMBER not in sample:
        return None
    try:
        meta = json.loads(sample[JSON_MEMBER])
        rows = np.load(io.BytesIO(sample[NPY_MEMBER]), allow_pickle=False)
        if rows.ndim != 2 or rows.shape[0] != len(meta["texts"]):
            raise ValueError(f"text.npy has shape {rows.shape} for {len(meta['texts'])} texts")
    except (KeyError, TypeError) as exn:
        raise ValueError(f"unreadable text features: {exn!r}") from exn
    return meta, rows


def read_sample(sample: dict, identity: str, key: str | None) -> SampleFeatures | None:
    """A sample's stored features if present, readable and of the tower ``identity``; otherwise None (the caption
    then goes through the cache)."""
    try:
        parsed = parse(sample)
    except ValueError:  # unreadable features: the caption goes through the cache
        return None
    if parsed is None or parsed[0].get("tower") != identity:
        return None
    meta, rows = parsed
    return SampleFeatures(meta, rows, key is not None and meta.get("negatives_for") == key)


def first_sample(url: str) -> dict | None:
    """The first sample of one shard (local path or any URL webdataset opens), or None if it has none."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.ignore_and_stop))
    return next(iter(pipeline), None)


def first_meta(urls: list[str]) -> dict | None:
    """The ``text.json`` of the first sample of the first shard; None when it holds no (readable) features."""
    sample = first_sample(urls[0]) if urls else None
    if sample is None or JSON_MEMBER not in sample:
        return None
    try:
        return json.loads(sample[JSON_MEMBER])
    except ValueError:
        return None


def check_shard_features(meta: dict, url: str, identity: str, model: str, groups, exclude) -> None:
    """Refuses stored features (``meta``: :func:`first_meta`) that another text tower made, or hard negatives made
    for other word groups (the config has groups, and the shards' negatives were made without them or for others).

    Raises:
        ConfigError: naming the shard, the models and what to do.
    """
    if meta.get("tower") != identity:
        raise ConfigError(f"data.shards: {url} holds text features of another text tower (model "
                          f"{meta.get('model')!r}, tower {str(meta.get('tower'))[:12]}), not of model.name={model!r} "
                          f"(tower {identity[:12]}): prepare them for this config ({PREPARE}) or train on shards "
                          f"without text features")
    wanted = swap_key(groups, exclude)
    if wanted is not None and meta.get("negatives_for") != wanted:
        made = "without hard negatives" if meta.get("negatives_for") is None else "for other word groups"
        raise ConfigError(f"data.shards: the hard negatives in {url} were made {made}, not for this config's "
                          f"data.hard_negative_groups / data.hard_negative_exclude: prepare them for this config "
                          f"({PREPARE})")
