"""Verifies a shard set: opens every sample, decodes its image and caption, and reports what it finds."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

from PIL import Image


def check_shards(shards: list[str]) -> dict:
    """Returns {"shards", "samples", "ok", "problems": {reason: n}, "examples": [...], "extensions": {...},
    "text_features": {"model (tower identity)": samples}} (the last for samples that hold stored text features,
    ``data_prep text-features``; a feature member that does not parse is a problem)."""
    report = {"shards": len(shards), "samples": 0, "ok": 0, "problems": Counter(), "examples": [],
              "extensions": Counter(), "text_features": Counter()}
    for shard in shards:
        try:
            groups: dict[str, dict] = {}
            with tarfile.open(shard, "r") as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as exn:
            report["problems"]["unreadable_shard"] += 1
            report["examples"].append({"shard": shard, "problem": f"unreadable_shard: {exn}"})
            continue
        for key, files in groups.items():
            report["samples"] += 1
            report["extensions"].update(files.keys())  # count extensions, not their bytes
            problem = _check_sample(files) or _check_text_features(files, report["text_features"])
            if problem:
                report["problems"][problem] += 1
                if len(report["examples"]) < 20:
                    report["examples"].append({"shard": shard, "key": key, "problem": problem})
            else:
                report["ok"] += 1
    report["problems"] = dict(report["problems"])
    report["extensions"] = dict(report["extensions"])
    report["text_features"] = dict(report["text_features"])
    return report


def _check_text_features(files: dict, found: Counter) -> str | None:
    """Stored text features, if any (:func:`vilseg.data.text_features.parse`): counted by model, or a problem."""
    from vilseg.data.text_features import parse

    try:
        parsed = parse(files)
    except ValueError:
        return "bad_text_features"
    if parsed is not None:
        found[f"{parsed[0].get('model')} ({str(parsed[0].get('tower'))[:12]})"] += 1
    return None


def _check_sample(files: dict) -> str | None:
    image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    if image is None:
        return "missing_image"
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
    except Exception:
        return "bad_image"
    caption = files.get("txt")
    if caption is None:
        return "missing_caption"
    try:
        if not caption.decode("utf-8").strip():
            return "empty_caption"
    except UnicodeDecodeError:
        return "bad_caption_utf8"
    if "json" in files:
        try:
            json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "bad_json"
    return None
