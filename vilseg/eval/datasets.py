"""Readers for the 8 standard benchmarks in their standard on-disk layouts, and for the synthetic world's splits.

Each reader lists (id, image, label) items and loads labels with the lineages' label handling:

- ``ignore``: pixels labelled 255 count nowhere;
- ``reduce_zero_label`` (V20, PC59, ADE20K): 0 becomes 255 and every other label drops by one;
- COCO-Object: the 80 thing classes are 1..80 and everything else, unlabeled pixels included, is background 0;
- Cityscapes: ``*_labelTrainIds.png``, converted from ``*_labelIds.png`` when only those are present.

Class names with aliases ship for both lineages (``names/A``: the class names of mmseg's datasets, which GroupViT and
TCL query; ``names/B``: SCLIP's name files, one class per line, aliases after commas, V21's and COCO-Object's
background line a list of stuff words).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = Path(__file__).parent / "names"

# Cityscapes labelIds -> trainIds (the 19 evaluated classes; everything else is ignored)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


class DatasetError(FileNotFoundError):
    """A dataset folder that does not have the expected layout; the message shows the layout."""


@dataclass(frozen=True)
class Item:
    id: str
    image: Path
    label: Path


@dataclass
class Dataset:
    """One evaluation split.

    Attributes:
        name: dataset key (``DATASETS``).
        root: the folder the layout was found in.
        items: the images with their label files, in a fixed order.
        classes: class names, index = label value (after the label handling).
        background: label 0 is a background class that protocol A does not query (V21, PC60, COCO-Object, synthetic).
        reduce_zero_label: whether labels are shifted down by one (0 ignored).
    """

    name: str
    root: Path
    items: list[Item]
    classes: list[str]
    background: bool = False
    reduce_zero_label: bool = False
    label_kind: str = "plain"  # "plain", "cityscapes_label_ids", "coco_object_from_stuff", "coco_object"
    lineage_names: dict = field(default_factory=dict)  # lineage -> [[aliases] per class]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, item: Item) -> np.ndarray:
        """[H, W, 3] uint8 RGB. Raises ``OSError`` naming the file when it cannot be decoded."""
        try:
            with Image.open(item.image) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as exn:  # PIL raises several types for broken files
            raise OSError(f"{item.image}: cannot read the image ({exn})") from None

    def label(self, item: Item) -> np.ndarray:
        """[H, W] uint8 labels in this dataset's label space (255 ignored)."""
        try:
            with Image.open(item.label) as im:
                raw = np.array(im)
        except Exception as exn:
            raise OSError(f"{item.label}: cannot read the label map ({exn})") from None
        if raw.ndim != 2:
            raise ValueError(f"{item.label}: a label map must have one channel, got shape {raw.shape}")
        if self.label_kind == "cityscapes_label_ids":
            lut = np.full(256, 255, np.uint8)
            for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
                lut[label_id] = train_id
            raw = lut[raw]
        elif self.label_kind == "coco_object_from_stuff":
            raw = coco_object_from_stuff(raw)
        elif self.label_kind == "coco_object":
            raw = np.where(raw == 255, 0, raw).astype(np.uint8)  # unlabeled pixels are background
        if self.reduce_zero_label:
            raw = raw.astype(np.int64)
            raw = np.where(raw == 0, 255, raw - 1)
            raw = np.where(raw == 254, 255, raw).astype(np.uint8)
        return raw.astype(np.uint8)

    def instances(self, item: Item) -> np.ndarray | None:
        """[H, W] instance ids where the layout has them (VOC's ``SegmentationObject/<id>.png``), else None (the
        probes then take each class's connected components as its objects)."""
        if self.name not in ("voc21", "voc20"):
            return None
        path = self.root / "SegmentationObject" / f"{item.id}.png"
        if not path.is_file():
            return None
        with Image.open(path) as im:
            return np.array(im)

    def names(self, lineage: str) -> list[list[str]]:
        """Per class (index = label value), the names the lineage queries; [] for a class it does not query (protocol
        A's background)."""
        if lineage in self.lineage_names:
            return self.lineage_names[lineage]
        if lineage not in ("A", "B"):
            return read_names(Path(lineage), len(self.classes))
        path = NAMES / lineage / f"{self.name}.txt"
        names = read_names(path, len(self.classes))
        if lineage == "A" and self.background:
            names[0] = []  # the word "background" is not queried: a constant channel decides it
        return names


def read_names(path: Path, n_classes: int) -> list[list[str]]:
    """A name file: one line per class, its names separated by commas (SCLIP's format)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such name file (one line per class, aliases separated by commas)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) != n_classes:
        raise ValueError(f"{path}: {len(lines)} lines, but the dataset has {n_classes} classes")
    return [[n.strip() for n in line.split(",") if n.strip()] for line in lines]


def coco_object_from_stuff(train_ids: np.ndarray) -> np.ndarray:
    """COCO-Stuff-164k ``labelTrainIds`` (things 0..79, stuff 80..170, 255 unlabeled) -> COCO-Object labels (things
    1..80, stuff and unlabeled 0)."""
    train_ids = train_ids.astype(np.int64)
    return np.where(train_ids < 80, train_ids + 1, 0).astype(np.uint8)


def convert_coco_object(root: str | Path) -> int:
    """Writes ``*_instanceTrainIds.png`` beside every ``annotations/val2017/*_labelTrainIds.png`` of a COCO-Stuff
    folder (atomically: a temporary file renamed into place). Returns the number written."""
    folder = _find(Path(root), "coco_object") / "annotations" / "val2017"
    n = 0
    for path in sorted(folder.glob("*_labelTrainIds.png")):
        out = path.with_name(path.name.replace("_labelTrainIds.png", "_instanceTrainIds.png"))
        tmp = out.with_suffix(".tmp.png")
        Image.fromarray(coco_object_from_stuff(np.array(Image.open(path)))).save(tmp)
        tmp.replace(out)
        n += 1
    return n


# ------------------------------------------------------------------ layouts
LAYOUTS = {
    "voc": ("VOCdevkit/VOC2012", "VOC2012", """VOC2012/
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png          (palette PNG: 0 background, 1..20, 255 ignored)
  ImageSets/Segmentation/val.txt"""),
    "context": ("VOCdevkit/VOC2010", "VOC2010", """VOC2010/
  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png   (converted Pascal Context labels: 0 background, 1..59)
  ImageSets/SegmentationContext/val.txt"""),
    "coco_stuff": ("coco_stuff164k", "coco_stuff", """coco_stuff164k/
  images/val2017/<id>.jpg
  annotations/val2017/<id>_labelTrainIds.png   (0..170, 255 unlabeled)"""),
    "coco_object": ("coco_stuff164k", "coco_stuff", """coco_stuff164k/
  images/val2017/<id>.jpg
  annotations/val2017/<id>_instanceTrainIds.png   (0 background, 1..80; `vilseg eval --convert-coco-object`)
    or <id>_labelTrainIds.png                      (COCO-Stuff's, converted on the fly)"""),
    "cityscapes": ("cityscapes", "Cityscapes", """cityscapes/
  leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (or _gtFine_labelIds.png, converted)"""),
    "ade20k": ("ADEChallengeData2016", "ade/ADEChallengeData2016", """ADEChallengeData2016/
  images/validation/<id>.jpg
  annotations/validation/<id>.png   (0 other, 1..150)"""),
    "synthetic": ("eval", "", """<split>/
  images/<id>.png
  masks/<id>.png     (0 background, 1..C, 255 ignored)
  meta.json          ({"classes": ["background", ...]})"""),
}
MARKERS = {"voc": "JPEGImages", "context": "SegmentationClassContext", "coco_stuff": "images/val2017",
           "coco_object": "images/val2017", "cityscapes": "leftImg8bit", "ade20k": "images/validation",
           "synthetic": "meta.json"}
DATASETS = {  # key -> (layout, number of classes, background, reduce_zero_label)
    "voc21": ("voc", 21, True, False), "voc20": ("voc", 20, False, True),
    "context60": ("context", 60, True, False), "context59": ("context", 59, False, True),
    "coco_object": ("coco_object", 81, True, False), "coco_stuff": ("coco_stuff", 171, False, False),
    "cityscapes": ("cityscapes", 19, False, False), "ade20k": ("ade20k", 150, False, True),
    "synthetic": ("synthetic", None, True, False),
}


def _find(root: Path, layout: str) -> Path:
    """The folder under ``root`` (itself, or a standard subfolder) that holds the layout's marker."""
    sub, alt, tree = LAYOUTS[layout]
    for candidate in (root, root / sub, root / alt) if alt else (root, root / sub):
        if (candidate / MARKERS[layout]).exists():
            return candidate
    raise DatasetError(f"{root}: not a {layout} dataset folder (no {MARKERS[layout]}); expected this layout under "
                       f"--root (or --root pointing inside it):\n" + "\n".join("  " + line for line in tree.splitlines()))


def _split_ids(path: Path, tree: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found; expected:\n{tree}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _paired(root: Path, ids, image_fmt: str, label_fmt: str, tree: str) -> list[Item]:
    items = [Item(i, root / image_fmt.format(i), root / label_fmt.format(i)) for i in ids]
    for item in items:
        if not item.label.is_file():
            raise DatasetError(f"{item.label}: label map for {item.image.name} not found; expected:\n{tree}")
    if not items:
        raise DatasetError(f"{root}: no images found; expected:\n{tree}")
    return items


def load_dataset(name: str, root: str | Path) -> Dataset:
    """The evaluation split of dataset ``name`` (``DATASETS``) under ``root``."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    layout, n_classes, background, reduce_zero = DATASETS[name]
    root = _find(Path(root), layout)
    tree = LAYOUTS[layout][2]
    kind, lineage_names = "plain", {}
    if layout == "voc":
        ids = _split_ids(root / "ImageSets/Segmentation/val.txt", tree)
        items = _paired(root, ids, "JPEGImages/{}.jpg", "SegmentationClass/{}.png", tree)
    elif layout == "context":
        ids = _split_ids(root / "ImageSets/SegmentationContext/val.txt", tree)
        items = _paired(root, ids, "JPEGImages/{}.jpg", "SegmentationClassContext/{}.png", tree)
    elif layout in ("coco_stuff", "coco_object"):
        ids = sorted(p.stem for p in (root / "images/val2017").glob("*.jpg"))
        label_fmt = "annotations/val2017/{}_labelTrainIds.png"
        if layout == "coco_object":
            converted = [(root / f"annotations/val2017/{i}_instanceTrainIds.png").is_file() for i in ids]
            if ids and all(converted):
                label_fmt, kind = "annotations/val2017/{}_instanceTrainIds.png", "coco_object"
            else:
                kind = "coco_object_from_stuff"
        items = _paired(root, ids, "images/val2017/{}.jpg", label_fmt, tree)
    elif layout == "cityscapes":
        images = sorted((root / "leftImg8bit/val").glob("*/*_leftImg8bit.png"))
        ids = [f"{p.parent.name}/{p.name[: -len('_leftImg8bit.png')]}" for p in images]
        have_train = all((root / f"gtFine/val/{i}_gtFine_labelTrainIds.png").is_file() for i in ids)
        label_fmt = "gtFine/val/{}_gtFine_labelTrainIds.png" if have_train else "gtFine/val/{}_gtFine_labelIds.png"
        kind = "plain" if have_train else "cityscapes_label_ids"
        items = _paired(root, ids, "leftImg8bit/val/{}_leftImg8bit.png", label_fmt, tree)
    elif layout == "ade20k":
        ids = sorted(p.stem for p in (root / "images/validation").glob("*.jpg"))
        items = _paired(root, ids, "images/validation/{}.jpg", "annotations/validation/{}.png", tree)
    else:  # the synthetic world
        meta = json.loads((root / "meta.json").read_text())
        if "classes" not in meta:
            raise DatasetError(f"{root / 'meta.json'}: no 'classes' key; expected:\n{tree}")
        ids = sorted(p.stem for p in (root / "images").glob("*.png"))
        items = _paired(root, ids, "images/{}.png", "masks/{}.png", tree)
        classes = list(meta["classes"])
        names = [[c] for c in classes]
        lineage_names = {"A": [[]] + names[1:], "B": [[]] + names[1:]}
        if "synonyms" in meta:
            lineage_names["synonym"] = [[]] + [[meta["synonyms"][c]] for c in classes[1:]]
        return Dataset(name, root, items, classes, background, reduce_zero, kind, lineage_names)
    classes = [names[0] for names in read_names(NAMES / "A" / f"{name}.txt", n_classes)]
    return Dataset(name, root, items, classes, background, reduce_zero, kind, lineage_names)


def load_split(root: str | Path) -> tuple[list[tuple[str, Path, Path]], dict]:
    """The synthetic world's layout as ([(id, image path, mask path)], meta.json), for code that walks files."""
    dataset = load_dataset("synthetic", root)
    meta = json.loads((dataset.root / "meta.json").read_text())
    return [(item.id, item.image, item.label) for item in dataset.items], meta
