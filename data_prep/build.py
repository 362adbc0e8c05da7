"""Builds clean webdataset shards from any source kind; resumable, deterministic, parallel.

Every shard ``{prefix}-NNNNNN.tar`` is written under ``.tmp`` names and renamed only when complete, together with a
sidecar ``{prefix}-NNNNNN.json`` recording the input range it consumed, its skip counts and content hashes. A rerun
after an interruption keeps every complete shard and restarts exactly after the last one, so the result is
byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from .process import SKIP_REASONS, Options, RawSample, Result, process

EXAMPLES_PER_REASON = 5


def _work(item: tuple[RawSample, object], opts: Options) -> Result:
    raw, ref = item
    if ref is not None:
        raw.data = ref.read()
    return process(raw, opts)


class _Worker:
    """Picklable callable for Pool.imap (a lambda is not): (index, item) -> (index, Result)."""

    def __init__(self, opts: Options):
        self.opts = opts

    def __call__(self, indexed):
        index, item = indexed
        return index, _work(item, self.opts)


def _windows(iterable, size: int):
    """Bounded chunks: Pool.imap would otherwise read the whole input (e.g. every tar member) ahead of the workers."""
    import itertools

    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as member ``name`` with fixed metadata, so that a rerun writes byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[Result]) -> None:
    """Writes a tar deterministically under ``path.tmp`` and renames it into place.

    webdataset's TarWriter stamps the current time into every member, so it cannot give byte-identical reruns.
    """
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for s in samples:
            add_member(tar, f"{s.key}.{s.ext}", s.image)
            add_member(tar, f"{s.key}.txt", s.captions[0].encode("utf-8"))
            meta = {**s.meta, "captions": s.captions}
            add_member(tar, f"{s.key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        os.fsync(tar.fileobj.fileno())
    os.replace(tmp, path)


class ShardSink:
    """Groups accepted samples into shards by count and/or bytes; records what each shard consumed."""

    def __init__(self, out: Path, prefix: str, max_count: int | None, max_bytes: int | None, start_shard: int,
                 start_index: int):
        if not max_count and not max_bytes:
            raise ValueError("give a shard size: --shard-count and/or --shard-bytes")
        self.out, self.prefix, self.max_count, self.max_bytes = out, prefix, max_count, max_bytes
        self.shard, self.first_index = start_shard, start_index
        self.buffer: list[Result] = []
        self.size = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, list] = {}

    def _full_with(self, result: Result) -> bool:
        if self.max_count and len(self.buffer) >= self.max_count:
            return True
        added = len(result.image) + 1024 * 3  # payload + three tar headers
        return bool(self.max_bytes and self.buffer and self.size + added > self.max_bytes)

    def skip(self, result: Result) -> None:
        self.skipped[result.reason] += 1
        examples = self.examples.setdefault(result.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"source": result.source, "detail": result.detail})

    def accept(self, result: Result, index: int) -> None:
        if self._full_with(result):
            self.flush(end_index=index)
        self.buffer.append(result)
        self.size += len(result.image) + 1024 * 3

    def flush(self, end_index: int) -> None:
        """Closes the current shard: everything consumed before input ``end_index`` belongs to it."""
        if not self.buffer and not self.skipped:
            return
        name = f"{self.prefix}-{self.shard:06d}"
        sidecar = {"shard": f"{name}.tar", "first_index": self.first_index, "end_index": end_index,
                   "count": len(self.buffer), "skipped": dict(self.skipped), "examples": self.examples,
                   "digests": [s.digest for s in self.buffer],
                   "caption_chars": [len(s.captions[0]) for s in self.buffer],
                   "sizes": [s.meta["size"] for s in self.buffer],
                   "original_sizes": [s.meta["original_size"] for s in self.buffer],
                   "captions": [s.captions[0] for s in self.buffer]}
        tmp = self.out / f"{name}.json.tmp"
        tmp.write_text(json.dumps(sidecar))
        os.replace(tmp, self.out / f"{name}.json")
        write_shard(self.out / f"{name}.tar", self.buffer)  # the tar last: a shard is complete iff its tar exists
        self.shard += 1
        self.first_index = end_index
        self.buffer, self.size, self.skipped, self.examples = [], 0, Counter(), {}


def completed_shards(out: Path, prefix: str) -> list[dict]:
    """Sidecars of the leading run of complete shards (tar and json both present, indices contiguous)."""
    done, expected_index = [], 0
    for i in range(10**6):
        tar, side = out / f"{prefix}-{i:06d}.tar", out / f"{prefix}-{i:06d}.json"
        if not (tar.is_file() and side.is_file()):
            break
        meta = json.loads(side.read_text())
        if meta["first_index"] != expected_index:
            break
        done.append(meta)
        expected_index = meta["end_index"]
    return done


def _clean_partial(out: Path, prefix: str, n_done: int) -> None:
    """Removes this prefix's shards and sidecars past the complete ones, and their temporary files; anything else in
    ``out`` (other prefixes, notes, reports) is left alone."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.(tar|json)(\.tmp)?")
    for path in out.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (match.group(3) or int(match.group(1)) >= n_done):
            path.unlink()


PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_output(out: str | Path, prefix: str) -> None:
    """Refuses, before anything is written, a prefix that is not a plain file name (one path component: letters,
    digits, '_', '-', '.', not starting with '.') and an output folder whose path a shard pattern cannot carry
    (braces and '::' mean brace expansion and URL lists to webdataset)."""
    if not PREFIX.fullmatch(prefix):
        raise ValueError(f"--prefix {prefix!r} is not a plain name: use letters, digits, '_', '-' and '.', one path "
                         f"component (shards are written as OUT/{{prefix}}-NNNNNN.tar)")
    text = str(out)
    if any(c in text for c in "{}") or "::" in text:
        raise ValueError(f"--out {text!r} contains '{{', '}}' or '::', which a shard pattern would read as brace "
                         f"expansion or a list of URLs; choose a folder name without them")


def build(items: Iterable, out: str | Path, opts: Options, shard_count: int | None = 1000,
          shard_bytes: int | None = None, workers: int = 1, prefix: str = "shard", shuffle_seed: int | None = None,
          dedup: bool = True, progress: bool = True) -> dict:
    """Processes ``items`` ((RawSample, FileRef|None) pairs) into shards under ``out``; returns the manifest.

    Args:
        shuffle_seed: if given, the input order is shuffled with this seed first (materialises the item list).
    """
    check_output(out, prefix)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = completed_shards(out, prefix)
    _clean_partial(out, prefix, len(done))
    start_index = done[-1]["end_index"] if done else 0
    seen = {d for meta in done for d in meta["digests"]}
    if shuffle_seed is not None:
        items = list(items)
        random.Random(shuffle_seed).shuffle(items)
    sink = ShardSink(out, prefix, shard_count, shard_bytes, len(done), start_index)
    pending = ((i, item) for i, item in enumerate(items) if i >= start_index)
    bar = tqdm(desc="data_prep", unit="img", initial=start_index, mininterval=1,
               disable=None if progress else True)  # None: a bar only on a terminal
    end = start_index
    worker = _Worker(opts)
    with _pool(workers) as pool:
        for window in _windows(pending, 64 * max(1, workers)):
            results = pool.imap(worker, window, chunksize=8) if pool else map(worker, window)
            for index, result in results:
                if result.reason is None and dedup and result.digest in seen:
                    result.reason = "duplicate"
                if result.reason:
                    sink.skip(result)
                else:
                    seen.add(result.digest)
                    sink.accept(result, index)
                end = index + 1
                bar.update(1)
    sink.flush(end_index=end)
    bar.close()
    return write_reports(out, prefix, opts)


class _pool:
    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = get_context("spawn").Pool(self.workers)
        return self.pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()


def write_reports(out: Path, prefix: str, opts: Options) -> dict:
    """manifest.json (shards, counts, skipped by reason with examples) and stats.json/.md + caption histogram."""
    shards = completed_shards(out, prefix)
    skipped, examples = Counter(), {}
    for meta in shards:
        skipped.update(meta["skipped"])
        for reason, ex in meta["examples"].items():
            examples.setdefault(reason, []).extend(ex[: EXAMPLES_PER_REASON - len(examples.get(reason, []))])
    manifest = {
        "shards": [m["shard"] for m in shards if m["count"]],
        "counts": {m["shard"]: m["count"] for m in shards if m["count"]},
        "samples": sum(m["count"] for m in shards),
        "inputs": shards[-1]["end_index"] if shards else 0,
        "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS if skipped.get(r)},
        "skipped_examples": examples,
        "options": asdict(opts),
    }
    if manifest["shards"]:
        manifest["pattern"] = f"{out}/{prefix}-{{000000..{len(shards) - 1:06d}}}.tar"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    write_stats(out, shards)
    return manifest


def write_stats(out: Path, shards: list[dict]) -> None:
    import re

    chars = [c for m in shards for c in m["caption_chars"]]
    sizes = [s for m in shards for s in m["sizes"]]
    originals = [s for m in shards for s in m["original_sizes"]]
    words = Counter(w for m in shards for c in m["captions"] for w in re.findall(r"[a-z']+", c.lower()))
    stats = {"samples": len(chars),
             "caption_chars": _summary(chars),
             "width": _summary([s[0] for s in sizes]), "height": _summary([s[1] for s in sizes]),
             "original_width": _summary([s[0] for s in originals]),
             "original_height": _summary([s[1] for s in originals]),
             "top_words": words.most_common(50)}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    lines = ["# Shard statistics", "", f"samples: {stats['samples']}", "",
             "| quantity | min | median | mean | max |", "|---|---|---|---|---|"]
    for key in ("caption_chars", "width", "height", "original_width", "original_height"):
        s = stats[key]
        lines.append(f"| {key} | {s.get('min', '-')} | {s.get('median', '-')} | {s.get('mean', '-')} | "
                     f"{s.get('max', '-')} |")
    lines += ["", "Most common words: " + ", ".join(f"{w} ({n})" for w, n in stats["top_words"][:30])]
    (out / "stats.md").write_text("\n".join(lines) + "\n")
    if chars:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(chars, bins=min(50, max(5, len(set(chars)))), color="#1f77b4")
        ax.set_xlabel("caption length (characters)")
        ax.set_ylabel("samples")
        ax.set_title(f"{len(chars)} captions")
        fig.tight_layout()
        fig.savefig(out / "caption_lengths.png", dpi=100)
        plt.close(fig)


def _summary(values: list) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "mean": round(sum(values) / len(values), 1),
            "max": ordered[-1]}
