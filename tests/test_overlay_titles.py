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


def test_legend_colours_are_apart_from_each_other_and_from_the_colours_the_names_name():
    from vilseg.data.synthetic import CLASSES, COLOURS

    names = ["background", *CLASSES]  # 16 colour-shape classes: red, green, blue, yellow
    colours = overlay.legend_colours(list(range(1, 17)), names)
    lab = np.array([overlay._lab(c) for c in colours.values()])
    pairs = np.linalg.norm(lab[:, None] - lab[None], axis=-1)[np.triu_indices(16, 1)]
    named = np.array([overlay._lab(np.array(c, np.uint8)) for c in COLOURS.values()])
    assert len({tuple(c) for c in colours.values()}) == 16 and pairs.min() > 20
    assert np.linalg.norm(lab[:, None] - named[None], axis=-1).min() > 40  # "red circle" is drawn in no named colour
    # with no colour in the names, a few labels keep tab20's first colours
    assert [tuple(int(x) for x in c) for c in overlay.legend_colours([3, 7], ["cat"] * 8).values()] == \
        [(31, 119, 180), (255, 127, 14)]
    # a large vocabulary's labels (ImageNet-21k ids far apart) never share a colour within one overlay
    many = overlay.legend_colours(list(range(1, 2000, 40)), [f"class {i}" for i in range(2000)])
    assert len({tuple(c) for c in many.values()}) == 50


def test_an_overlay_draws_each_label_in_its_legend_colour(tmp_path):
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    pred = np.zeros((32, 32), np.int64)
    pred[:, :16], pred[:, 16:] = 1, 21  # labels 1 and 21 shared a colour when colours wrapped a 20-colour palette
    names = [f"c{i}" for i in range(30)]
    path = overlay.render_overlay(image, pred, names, tmp_path / "o.png", min_side=32)
    panel = np.asarray(Image.open(path).convert("RGB"))[16:48, 32:64].astype(float)  # the prediction panel
    colours = overlay.legend_colours([1, 21], names)
    for label, cols in ((1, slice(0, 16)), (21, slice(16, 32))):
        expected = 0.3 * 128 + 0.7 * colours[label].astype(float)
        assert np.abs(panel[:, cols] - expected).max() <= 1
    assert not np.array_equal(colours[1], colours[21])
