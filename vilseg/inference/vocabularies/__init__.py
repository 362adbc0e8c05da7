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


ALIAS_SEPARATOR = "|"


def parse_classes(items, source: str) -> dict[str, list[str]]:
    """Class entries -> {class: [names]}: each entry is a class's names separated by ``|`` ("tv|television|monitor":
    the first names the class, all are searched). The one alias syntax of ``--classes`` (entries separated by commas),
    vocabulary text files (one entry per line) and the web demo's box. Empty entries are skipped; a name given twice
    is kept once, with a warning that names it and ``source``.
    """
    import warnings

    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for item in items:
        names = [n.strip() for n in str(item).split(ALIAS_SEPARATOR) if n.strip()]
        kept = []
        for name in names:
            if name in owner or name in kept:
                first = owner.get(name, names[0])
                warnings.warn(f"{source}: the name {name!r} is given twice (first for class {first!r}); kept once",
                              stacklevel=2)
                continue
            kept.append(name)
        if not kept:
            continue
        out[kept[0]] = kept
        owner.update({n: kept[0] for n in kept})
    return out


def load_vocabulary(name: str) -> dict[str, list[str]]:
    """A packaged vocabulary by name (see :func:`list_vocabularies`), or a path to a JSON mapping name -> aliases
    (or a JSON list of names), or a text file with one class per line, its names separated by ``|`` as in
    ``--classes`` (``tv|television|monitor``). ``#`` starts a comment, on its own line or after a class
    (``cat  # pet``); blank lines are skipped.

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
        lines = [line.split("#", 1)[0] for line in path.read_text().splitlines()]  # '#' starts a comment anywhere
        return parse_classes([line for line in lines if line.strip()], str(path))
    raise KeyError(f"no vocabulary {name!r}: give a file (JSON or one class per line) or one of "
                   f"{list_vocabularies()}")
