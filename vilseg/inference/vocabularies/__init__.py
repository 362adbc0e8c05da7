"""Class-name lists shipped with vilseg: the 8 benchmarks' classes with aliases, and ImageNet-21k's lemmas (read
from timm's own package data, so they need no download)."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def list_vocabularies() -> list[str]:
    return sorted([p.stem for p in HERE.glob("*.json")] + ["imagenet21k"])


def imagenet21k() -> dict[str, list[str]]:
    """ImageNet-21k (fall 2011, 21,843 synsets as timm orders them): each synset's first lemma names the class,
    its other lemmas are aliases. Synsets whose first lemma repeats an earlier class are merged into it."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet21k_goog")
    out: dict[str, list[str]] = {}
    for i in range(info.num_classes()):
        lemmas = [x.strip() for x in info.index_to_description(i).split(",") if x.strip()]
        if not lemmas:
            continue
        out.setdefault(lemmas[0], [])
        out[lemmas[0]].extend(x for x in lemmas if x not in out[lemmas[0]])
    return out


def load_vocabulary(name: str) -> dict[str, list[str]]:
    """A packaged vocabulary by name (see :func:`list_vocabularies`), or a path to a JSON mapping name -> aliases
    or a text file with one class per line (aliases after the first name, comma-separated).

    Raises:
        KeyError: an unknown name that is not a file either, naming what exists.
    """
    if name == "imagenet21k":
        return imagenet21k()
    packaged = HERE / f"{name}.json"
    if packaged.is_file():
        return json.loads(packaged.read_text())
    path = Path(name)
    if path.is_file():
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {str(n): [str(n)] for n in data}
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return {parts[0]: parts for parts in ([p.strip() for p in line.split(",") if p.strip()] for line in lines)}
    raise KeyError(f"no vocabulary {name!r}: give a file (JSON or one class per line) or one of "
                   f"{list_vocabularies()}")
