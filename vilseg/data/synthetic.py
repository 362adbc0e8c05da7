"""A synthetic image-caption world with per-pixel ground truth, deterministic by seed.

Scenes hold 1-4 objects; each has a shape, a colour and a texture, on varied low-saturation backgrounds. Objects are
2-3.5 patches (of 8 px) wide at 64 px so that shape is visible at patch level. Captions name what is present in
varied phrasings. The classes of the ground truth are colour-shape combinations; some combinations never appear in
the training split (neither in images nor captions), and a second vocabulary words every class with synonyms that
training never uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS = {"red": (215, 45, 40), "green": (45, 170, 65), "blue": (45, 85, 220), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("plain", "striped", "dotted")
# One held-out combination per colour and per shape (a Latin-square diagonal), so each word is still seen.
HELD_OUT = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "cross"))
# Never used in training captions. Chosen as the thesaurus words all-MiniLM-L6-v2 maps best (see docs/results.md).
SYNONYMS = {"red": "crimson", "green": "emerald", "blue": "navy", "yellow": "golden",
            "circle": "disc", "square": "box", "triangle": "pyramid", "cross": "crucifix"}
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # label i + 1 in masks; 0 is background
WORLD_VERSION = 2  # bump whenever rendering or captions change: cached shard sets are then rebuilt

_SINGLE = ("{o}.", "a photo of {o}.", "there is {o} in the picture.", "an image showing {o}.", "{o} on a background.")
_MULTI = ("{l}.", "a picture with {l}.", "there are {l} here.", "a scene showing {l}.", "{n} shapes: {l}.",
          "an image of {l}.")
_NUMBERS = {2: "two", 3: "three", 4: "four"}


def class_index(colour: str, shape: str) -> int:
    """Mask label of a colour-shape combination (1-based; 0 is background)."""
    return CLASSES.index(f"{colour} {shape}") + 1


def synonym_name(name: str) -> str:
    """'red circle' -> 'crimson disc'."""
    return " ".join(SYNONYMS[w] for w in name.split())


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    mask: np.ndarray  # [H, W] uint8 class labels (0 background)
    caption: str
    objects: list[dict] = field(default_factory=list)


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if shape == "triangle":
        top, base = -r, 0.8 * r
        t = (dy - top) / (base - top)
        return (t >= 0) & (t <= 1) & (abs(dx) <= 1.05 * r * t)
    if shape == "cross":
        arm = 0.34 * r
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int, xx, yy) -> np.ndarray:
    grey = rng.uniform(70, 190)
    tint = rng.uniform(-14, 14, size=3)
    base = np.clip(grey + tint, 0, 255)
    kind = rng.integers(4)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32).copy()
    if kind == 1:  # linear gradient to a second low-saturation colour
        other = np.clip(rng.uniform(70, 190) + rng.uniform(-14, 14, size=3), 0, 255)
        t = ((xx if rng.random() < 0.5 else yy) / size)[..., None]
        img = (1 - t) * img + t * other
    elif kind == 2:  # pixel noise
        img += rng.normal(0, 12, size=(size, size, 1))
    elif kind == 3:  # fine low-contrast checkerboard (4 px cells: finer than a patch)
        img += np.where(((xx // 4 + yy // 4) % 2)[..., None] == 1, 10.0, -10.0)
    return img


def _texture(rng: np.random.Generator, texture: str, xx, yy, strength: float) -> np.ndarray:
    """Brightness modulation in [1 - strength, 1]: stripes or dots, never a hue change (colour stays semantic)."""
    if texture == "striped":
        period = rng.integers(4, 7)
        direction = rng.integers(4)
        coord = [xx, yy, xx + yy, xx - yy][direction]
        return np.where((coord // (period / 2)) % 2 == 0, 1.0, 1.0 - strength)
    if texture == "dotted":
        step = rng.integers(4, 6)
        return np.where(((xx % step) < 1.5) & ((yy % step) < 1.5), 1.0 - strength, 1.0)
    return np.ones_like(xx)


class SyntheticWorld:
    """Deterministic scene generator: ``world.scene(i)`` is a pure function of (seed, split, i).

    Args:
        split: ``"train"`` (held-out combinations never occur) or ``"eval"`` (all combinations; half of the
            scenes contain at least one held-out combination).
        image_size: side of the square images.
        seed: base seed.
        max_objects: 1..max_objects objects per scene.
        radius: object radius range in pixels at 64 px (scaled with ``image_size``).
        texture_strength: brightness drop of stripes and dots.
    """

    def __init__(self, split: str = "train", image_size: int = 64, seed: int = 0, max_objects: int = 4,
                 radius: tuple[float, float] = (9, 14), texture_strength: float = 0.32):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.split, self.size, self.seed, self.max_objects = split, image_size, seed, max_objects
        self.radius, self.texture_strength = tuple(radius), texture_strength
        combos = [(c, s) for c in COLOURS for s in SHAPES]
        self.seen = [cs for cs in combos if cs not in HELD_OUT]
        self.combos = self.seen if split == "train" else combos
        yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
        self._xx, self._yy = xx, yy

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])

    def _pick_combos(self, rng, n: int) -> list[tuple[str, str]]:
        picks = [self.combos[i] for i in rng.integers(len(self.combos), size=n)]
        if self.split == "eval" and rng.random() < 0.5:
            picks[0] = HELD_OUT[rng.integers(len(HELD_OUT))]
        return picks

    def scene(self, index: int) -> Scene:
        rng = self._rng(index)
        size, xx, yy = self.size, self._xx, self._yy
        img = _background(rng, size, xx, yy)
        mask = np.zeros((size, size), np.uint8)
        scale = size / 64.0
        objects, placed = [], []
        for colour, shape in self._pick_combos(rng, int(rng.integers(1, self.max_objects + 1))):
            r = rng.uniform(*self.radius) * scale
            for _ in range(30):  # rejection sampling: objects may touch but not hide each other
                cx, cy = rng.uniform(r, size - r, size=2)
                if all((cx - px) ** 2 + (cy - py) ** 2 >= (0.9 * (r + pr)) ** 2 for px, py, pr in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            m = _shape_mask(shape, xx, yy, cx, cy, r)
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            colour_rgb = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.12) + rng.uniform(-15, 15, 3), 0, 255)
            shade = _texture(rng, texture, xx, yy, self.texture_strength)[..., None] * colour_rgb
            img[m] = shade[m]
            mask[m] = class_index(colour, shape)
            objects.append({"colour": colour, "shape": shape, "texture": texture, "box": [cx - r, cy - r, cx + r, cy + r]})
        caption = self._caption(rng, objects)
        return Scene(np.clip(img, 0, 255).astype(np.uint8), mask, caption, objects)

    def _caption(self, rng, objects: list[dict]) -> str:
        phrases = []
        for obj in rng.permutation(len(objects)):
            o = objects[obj]
            tex = f"{o['texture']} " if o["texture"] != "plain" and rng.random() < 0.4 else ""
            words = f"{tex}{o['colour']} {o['shape']}"
            phrases.append(("an " if words[0] in "aeiou" else "a ") + words)
        if len(phrases) == 1:
            return _SINGLE[rng.integers(len(_SINGLE))].format(o=phrases[0])
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        text = _MULTI[rng.integers(len(_MULTI))].format(l=listed, n=_NUMBERS[len(phrases)])
        return text[0].upper() + text[1:] if rng.random() < 0.3 else text

    def metadata(self) -> dict:
        """Class list, vocabularies and which classes are held out (written next to an evaluation split)."""
        held = [f"{c} {s}" for c, s in HELD_OUT]
        return {
            "classes": ["background", *CLASSES],
            "heldout_classes": held,
            "seen_classes": [c for c in CLASSES if c not in held],
            "synonyms": {c: synonym_name(c) for c in CLASSES},
            "image_size": self.size,
            "seed": self.seed,
            "world": self.describe(),
        }

    def describe(self) -> dict:
        """Everything that determines the scenes (stored in manifests, so stale caches are detected)."""
        return {"version": WORLD_VERSION, "image_size": self.size, "seed": self.seed,
                "max_objects": self.max_objects, "radius": list(self.radius), "texture_strength": self.texture_strength}
