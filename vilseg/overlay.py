"""Overlay PNGs with a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Candidate legend colours, in order of preference: tab20's without its greys (labels are drawn over a greyscale
# copy of the image, background pale grey), then more hues (golden-angle HSV) for overlays with more
# labels than that. Each overlay gives its labels the first candidates that stand apart (CIE Lab distance) from the
# colours already given and from every colour the class names name (legend_colours).
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207],
                    [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
                    [196, 156, 148], [247, 182, 210], [219, 219, 141], [158, 218, 229]],
                   dtype=np.uint8)
APART = 25.0  # CIE76 Delta E between two legend colours: clearly two colours
NAMED_APART = 50.0  # ... and between a legend colour and a colour a class name names: clearly not that colour

# Colour words a class name may hold, with a typical sRGB value (CSS's where it has one).
NAMED_COLOURS = {
    "red": (215, 45, 40), "crimson": (220, 20, 60), "scarlet": (255, 36, 0), "maroon": (128, 0, 0),
    "green": (45, 170, 65), "emerald": (80, 200, 120), "lime": (50, 205, 50), "olive": (128, 128, 0),
    "blue": (45, 85, 220), "navy": (0, 0, 128), "azure": (0, 127, 255), "teal": (0, 128, 128),
    "yellow": (235, 205, 40), "golden": (255, 200, 0), "gold": (255, 215, 0), "orange": (255, 140, 0),
    "purple": (128, 0, 128), "violet": (143, 0, 255), "indigo": (75, 0, 130), "pink": (255, 150, 190),
    "magenta": (255, 0, 255), "cyan": (0, 200, 220), "turquoise": (64, 224, 208), "brown": (140, 80, 40),
    "beige": (225, 210, 170), "grey": (128, 128, 128), "gray": (128, 128, 128), "silver": (192, 192, 192),
    "black": (0, 0, 0), "white": (255, 255, 255),
}


def _lab(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] sRGB uint8 -> CIE Lab (D65). Written out (a dozen lines) rather than adding scikit-image."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _candidates(n: int) -> np.ndarray:
    """At least ``n`` candidate colours: the palette, then golden-angle hues at alternating lightness."""
    import colorsys

    extra = []
    for i in range(max(0, n - len(PALETTE)) + 64):
        h, v = (i * 0.618034) % 1, (0.95, 0.7, 0.5)[i % 3]
        extra.append([round(255 * x) for x in colorsys.hsv_to_rgb(h, 0.75, v)])
    return np.concatenate([PALETTE, np.array(extra, dtype=np.uint8)])


def named_colours(names: list[str]) -> list[tuple[int, int, int]]:
    """The colours that the class names name ("red circle" -> red), each once."""
    out = []
    for name in names:
        for word in str(name).lower().replace("-", " ").split():
            rgb = NAMED_COLOURS.get(word)
            if rgb is not None and rgb not in out:
                out.append(rgb)
    return out


def legend_colours(labels: list[int], names: list[str]) -> dict[int, np.ndarray]:
    """A colour for each label of one overlay: distinct from each other and from the colours the vocabulary's names
    name (so that a "red circle" is not drawn in the blue of "blue circle"), where the candidates allow; otherwise
    the candidate farthest from both."""
    cand = _candidates(len(labels))
    lab = _lab(cand)
    named = [_lab(np.array(c, dtype=np.uint8)) for c in named_colours(names)]
    # how far each candidate is from what it must not look like, in units of the required distance (>= 1: apart)
    margin = np.full(len(cand), np.inf) if not named else \
        np.linalg.norm(lab[:, None] - np.array(named)[None], axis=-1).min(1) / NAMED_APART
    out = {}
    for label in sorted(labels):
        apart = np.flatnonzero(margin >= 1)
        pick = int(apart[0]) if len(apart) else int(margin.argmax())
        out[label] = cand[pick]
        margin = np.minimum(margin, np.linalg.norm(lab - lab[pick], axis=-1) / APART)
        margin[pick] = -1  # never twice
    return out


def colourise(labels: np.ndarray, colours: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 colours (``colours``: label -> RGB, default :func:`legend_colours` of the
    labels present, with no names)."""
    present = [int(v) for v in np.unique(labels) if v > 0]
    colours = colours if colours is not None else legend_colours(present, [])
    table = np.zeros((int(labels.max(initial=0)) + 1, 3), np.uint8)
    for label in present:
        table[label] = colours[label]
    return table[np.clip(labels, 0, None)] * (labels > 0)[..., None]


MAX_SIDE = 1024  # an overlay panel's longest side, in pixels (the label map PNG keeps the image's full size)


PANEL_TITLES = ("image", "prediction", "ground truth")


def render_overlay(image: Image.Image, labels: np.ndarray, names: list[str], path, min_side: int = 256,
                   truth: np.ndarray | None = None, max_side: int = MAX_SIDE) -> Path:
    """Writes image | prediction (| ground truth), each panel titled, plus a legend of the labels present (with a
    ground truth: whether each was predicted, is in the ground truth, or both).

    Label panels show each label's colour over a greyscale copy of the image; background is left pale grey. Small
    images are enlarged (integer factor) to ``min_side``; large ones are shrunk so that a panel's longest side is at
    most ``max_side`` (a 6000 x 4000 photo's overlay is then 2 x 1024 wide, not 12,000).
    """
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        size = (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor)))
    else:
        scale = max(1, int(np.ceil(min_side / min(image.size))))
        scale = max(1, min(scale, max_side // max(image.size)))
        size = (image.size[0] * scale, image.size[1] * scale)
    base = np.asarray(image.resize(size, Image.BILINEAR if size[0] < image.size[0] else Image.NEAREST),
                      dtype=np.float32)
    # label colours go over a greyscale copy: blended with a colourful image they would be unreadable
    grey = np.asarray(image.convert("L").convert("RGB").resize(size, Image.NEAREST), dtype=np.float32)

    maps = [np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.NEAREST))
            for lab in [labels] + ([truth] if truth is not None else [])]
    seen = [{int(v) for v in np.unique(big) if v > 0} for big in maps]
    present = set().union(*seen)
    colours = legend_colours(sorted(present), names)
    panels = [base.astype(np.uint8)]
    for big in maps:
        panels.append(np.where((big > 0)[..., None], 0.3 * grey + 0.7 * colourise(big, colours),
                               0.6 * grey + 102).astype(np.uint8))
    canvas = Image.fromarray(np.concatenate(panels, 1))
    title_h = 16  # each panel's title above it
    legend_h = 16 * max(1, len(present)) + 8
    out = Image.new("RGB", (canvas.width, title_h + canvas.height + legend_h), (255, 255, 255))
    out.paste(canvas, (0, title_h))
    draw = ImageDraw.Draw(out)
    for i, title in enumerate(PANEL_TITLES[:len(panels)]):
        draw.text((i * size[0] + 4, 2), title, fill=(0, 0, 0))
    for row, label in enumerate(sorted(present)):
        y = title_h + canvas.height + 4 + 16 * row
        draw.rectangle([4, y, 16, y + 12], fill=tuple(int(c) for c in colours[label]))
        text = names[label] if label < len(names) else str(label)
        if truth is not None:  # which panels the entry is in
            text += {(True, True): "  (predicted, in ground truth)", (True, False): "  (predicted only)",
                     (False, True): "  (ground truth only)"}[(label in seen[0], label in seen[1])]
        draw.text((22, y), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, compress_level=1)  # zlib level 1: 0.67x the time of the default 6, files 1.5x (synthetic scenes)
    return path
