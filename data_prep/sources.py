"""Input readers. Each yields :class:`RawSample` in a deterministic order; files are read lazily, in the workers.

Kinds:
  folder  images with sidecar caption files (``a/b.jpg`` + ``a/b.txt``)
  table   CSV, TSV, JSONL or Parquet with a path column and a caption column (paths relative to --root)
  coco    COCO captions JSON (one sample per image, all captions kept as a list)
  wds     existing webdataset shards, including img2dataset output ({key}.jpg, .txt, .json)
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from .process import RawSample

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class FileRef:
    """A path read lazily in a worker; ``None`` data means the file is missing."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return None


def _key_from_relpath(rel: str) -> str:
    """'sub/dir/img 01.jpg' -> 'sub_dir_img_01' (webdataset splits keys at the first dot and at '/')."""
    stem = os.path.splitext(rel)[0]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem.replace(os.sep, "_").replace("/", "_"))


def unique_keys(names: list[str]) -> list[str]:
    """Sanitised keys for ``names`` (relative paths), made unique: when several names sanitise to one key ('a b.jpg',
    'a.b.jpg', 'a_b.jpg' -> 'a_b'; 'sub/x', 'sub_x' -> 'sub_x'), each of them gets a suffix from a hash of its own
    name, so the result does not depend on which other files exist in which order."""
    keys = [_key_from_relpath(n) for n in names]
    count: dict[str, int] = {}
    for k in keys:
        count[k] = count.get(k, 0) + 1
    return [k if count[k] == 1 else f"{k}_{hashlib.sha1(n.encode()).hexdigest()[:8]}" for k, n in zip(keys, names)]


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies below ``root`` (also resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _unsafe(rel: str) -> bool:
    return os.path.isabs(rel) or ".." in Path(rel).parts or rel.startswith(("/", "\\"))


def read_folder(root: str, caption_ext: str = ".txt", allow_outside: bool = False
                ) -> Iterator[tuple[RawSample, FileRef | None]]:
    """Images below ``root`` with sidecar captions. An image or a caption that is a symlink to a place outside
    ``root`` is refused (reason ``outside_input``) unless ``allow_outside``."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"input folder {root!r} does not exist")
    paths = sorted(p for p in root_path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    rels = [p.relative_to(root_path).as_posix() for p in paths]
    for path, rel, key in zip(paths, rels, unique_keys(rels)):
        sidecar = path.with_suffix(caption_ext)
        outside = [p for p in (path, sidecar) if p.exists() and not allow_outside and not _inside(p, root_path)]
        if outside:
            yield RawSample(key, rel, None, [], reason="outside_input", detail=f"{outside[0]} -> "
                            f"{outside[0].resolve()}"), None
            continue
        captions = [sidecar.read_bytes()] if sidecar.is_file() else []
        yield RawSample(key, rel, None, captions), FileRef(str(path))


def _read_table(path: str):
    import pandas as pd

    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True, dtype=False)
    if suffix in (".tsv", ".tab"):
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    raise ValueError(f"table {path!r}: unknown extension {suffix!r} (csv, tsv, jsonl, parquet)")


def read_table(path: str, root: str, path_column: str = "path", caption_column: str = "caption",
               key_column: str | None = None, allow_outside: bool = False
               ) -> Iterator[tuple[RawSample, FileRef | None]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"input table {path!r} does not exist")
    table = _read_table(path)
    for column in (path_column, caption_column) + ((key_column,) if key_column else ()):
        if column not in table.columns:
            raise KeyError(f"table {path!r} has no column {column!r}; columns: {list(table.columns)}")
    for row, (rel, caption) in enumerate(zip(table[path_column], table[caption_column])):
        rel = "" if rel is None else str(rel)
        key = str(table[key_column].iloc[row]) if key_column else f"{row:09d}"
        captions = caption if isinstance(caption, list) else ([] if caption is None else [caption])
        source = f"{path}:{row}:{rel}"
        if _unsafe(rel):  # the offending path becomes the key, which process() refuses as unsafe_path
            yield RawSample(rel, source, None, captions), None
            continue
        yield _contained(RawSample(key, source, None, captions), root, rel, allow_outside)


def _contained(sample: RawSample, root: str, rel: str, allow_outside: bool) -> tuple[RawSample, FileRef | None]:
    """The sample with a reference to ``root/rel``, or refused as ``outside_input`` if a symlink leads outside."""
    full = Path(root) / rel
    if not allow_outside and full.exists() and not _inside(full, Path(root)):
        sample.reason, sample.detail = "outside_input", f"{full} -> {full.resolve()}"
        return sample, None
    return sample, FileRef(str(full))


def read_coco(path: str, root: str, allow_outside: bool = False) -> Iterator[tuple[RawSample, FileRef | None]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"COCO captions file {path!r} does not exist")
    data = json.loads(Path(path).read_text())
    for key in ("images", "annotations"):
        if key not in data:
            raise KeyError(f"{path!r} is not a COCO captions file: no {key!r}")
    captions = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann.get("caption", ""))
    for image in sorted(data["images"], key=lambda im: im["id"]):
        rel = image["file_name"]
        sample = RawSample(f"coco{image['id']:012d}", rel, None, captions.get(image["id"], []),
                           {"coco_id": image["id"]})
        if _unsafe(rel):
            sample.key = rel
            yield sample, None
            continue
        yield _contained(sample, root, rel, allow_outside)


def read_wds(shards: list[str]) -> Iterator[tuple[RawSample, None]]:
    """Reads tar shards directly (keeping undecodable members for the workers to judge)."""
    for shard in shards:
        if not Path(shard).is_file():
            raise FileNotFoundError(f"input shard {shard!r} does not exist")
        groups: dict[str, dict] = {}  # by the member's own path without extension
        with tarfile.open(shard, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                name = f"{prefix}/{stem}" if prefix else stem
                groups.setdefault(name, {})[ext.lower()] = tar.extractfile(member).read()
        order = list(groups)
        # '..'/absolute names stay as they are (process() refuses them); the rest are flattened and made unique
        flat = [n for n in order if not _unsafe(n)]
        renamed = dict(zip(flat, unique_keys(flat)))
        groups = {renamed.get(n, n): files for n, files in groups.items()}
        order = [renamed.get(n, n) for n in order]
        for key in order:
            files = groups[key]
            image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            extra = {}
            if "json" in files:
                try:
                    meta = json.loads(files["json"])
                    extra = {k: meta[k] for k in ("url", "status", "caption") if k in meta}
                except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
                    extra = {}
            caption = files.get("txt")
            if caption is None and isinstance(extra.get("caption"), str):
                caption = extra["caption"]
            extra.pop("caption", None)
            yield RawSample(key, f"{shard}:{key}", image, [caption] if caption is not None else [], extra), None


def open_source(kind: str, inputs: list[str], root: str | None, path_column: str, caption_column: str,
                key_column: str | None, allow_outside: bool = False):
    if kind == "folder":
        return (s for folder in inputs for s in read_folder(folder, allow_outside=allow_outside))
    if kind == "table":
        return (s for table in inputs for s in read_table(table, root or str(Path(table).parent), path_column,
                                                          caption_column, key_column, allow_outside))
    if kind == "coco":
        return (s for ann in inputs for s in read_coco(ann, root or str(Path(ann).parent), allow_outside))
    if kind == "wds":
        import braceexpand

        return read_wds([s for pattern in inputs for s in braceexpand.braceexpand(pattern)])
    raise ValueError(f"unknown input kind {kind!r}: folder, table, coco or wds")
