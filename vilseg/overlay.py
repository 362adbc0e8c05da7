"""Overlay PNGs with a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# 20 well-separated colours (tab20-like); background is drawn transparent.
PALETTE = np.array([[0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
                    [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
                    [196, 156, 148], [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229]],
                   dtype=np.uint8)


def colourise(labels: np.ndarray) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 colours (labels wrap around the palette)."""
    return PALETTE[1:][(labels - 1) % (len(PALETTE) - 1)] * (labels > 0)[..., None]


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

    def blend(lab):
        lab = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.NEAREST))
        out = np.where((lab > 0)[..., None], 0.3 * grey + 0.7 * colourise(lab), 0.6 * grey + 102)
        return out.astype(np.uint8), lab

    panels, seen = [base.astype(np.uint8)], []
    for lab in [labels] + ([truth] if truth is not None else []):
        panel, big = blend(lab)
        panels.append(panel)
        seen.append({int(v) for v in np.unique(big) if v > 0})
    present = set().union(*seen)
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
        draw.rectangle([4, y, 16, y + 12], fill=tuple(int(c) for c in colourise(np.array([label]))[0]))
        text = names[label] if label < len(names) else str(label)
        if truth is not None:  # which panels the entry is in
            text += {(True, True): "  (predicted, in ground truth)", (True, False): "  (predicted only)",
                     (False, True): "  (ground truth only)"}[(label in seen[0], label in seen[1])]
        draw.text((22, y), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, compress_level=1)  # zlib level 1: 0.67x the time of the default 6, files 1.5x (synthetic scenes)
    return path
