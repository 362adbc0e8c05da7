"""Overlay panels are titled and the legend says which entries were predicted."""
import numpy as np
from PIL import Image

from vilseg import overlay


def test_panels_are_titled_and_the_legend_marks_predicted_entries(tmp_path, monkeypatch):
    drawn = []
    original = overlay.ImageDraw.ImageDraw.text
    monkeypatch.setattr(overlay.ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: (drawn.append(text), original(self, xy, text, *a, **k))[1])
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    pred, truth = np.zeros((32, 32), np.int64), np.zeros((32, 32), np.int64)
    pred[:16], truth[:16], truth[16:] = 1, 1, 2  # cat predicted and true; dog true only
    path = overlay.render_overlay(image, pred, ["background", "cat", "dog"], tmp_path / "o.png", truth=truth)
    assert drawn[:3] == ["image", "prediction", "ground truth"]
    assert "cat  (predicted, in ground truth)" in drawn and "dog  (ground truth only)" in drawn
    assert Image.open(path).size[0] == 3 * 256
