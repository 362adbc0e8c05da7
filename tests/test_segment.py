"""The Segmenter: shapes, known answers, background, unbounded segments, faiss naming and clear errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vilseg import Segmenter, create_model
from vilseg.evaluate import IoUAccumulator
from vilseg.segment import connected_components


class ColourModel(nn.Module):
    """A transparent model with the ViLSeg inference interface: patch embedding = mean patch colour (one-hot over
    red/green/blue when saturated, else a fourth 'grey' axis); clusters = the same one-hot; texts embed by colour word.
    The Segmenter's own logic (clustering, pooling, naming, thresholds, upsampling) is what is under test."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.image_encoder = nn.Module()
        self.image_encoder.patch_size = 8
        self.image_encoder.normalize = lambda x: x
        self.config = type("C", (), {"image": type("I", (), {"img_size": 32})()})()

    def _onehot(self, images):
        patches = F.avg_pool2d(images, 8)  # [B, 3, h, w]
        saturated = (patches.max(1).values - patches.min(1).values) > 0.3
        idx = torch.where(saturated, patches.argmax(1), torch.full_like(patches.argmax(1), 3))
        return F.one_hot(idx, 4).permute(0, 3, 1, 2).float()

    def dense_embeddings(self, images):
        onehot = self._onehot(images)
        return {"patch_embed": onehot, "cluster_probs": onehot}

    def encode_texts(self, texts):
        words = {"red": 0, "green": 1, "blue": 2}
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            for w, j in words.items():
                if w in t:
                    out[i, j] = 1
        return F.normalize(out + 1e-3, dim=-1)


def _scene():
    img = np.full((32, 48, 3), 128, np.uint8)  # grey background
    img[0:16, 0:16] = (255, 0, 0)  # red square, top-left
    img[16:32, 32:48] = (255, 0, 0)  # second red square, bottom-right (not touching the first)
    img[0:16, 32:48] = (0, 0, 255)  # blue square, top-right
    return img


@pytest.mark.parametrize("readout", ["cluster", "dense"])
def test_known_scene_labels_background_and_shapes(readout):
    seg = Segmenter(ColourModel(), queries=["red thing", "green thing", "blue thing"], readout=readout,
                    bg_threshold=0.4, input_size=32)
    res = seg.segment(_scene())
    assert res.labels.shape == (32, 48) and res.cluster_map.shape == (32, 48) and res.logits.shape == (4, 32, 48)
    # interiors (bilinear upsampling of patch scores rounds the corners of each region)
    m = 2
    assert (res.labels[0:16 - m, 0:16 - m] == 1).all() and (res.labels[16 + m:32, 32 + m:48] == 1).all()
    assert (res.labels[0:16 - m, 32 + m:48] == 3).all()
    assert (res.labels[16 + m:32, 0:16 - m] == 0).all()  # grey: below threshold -> background
    truth = np.zeros((32, 48), np.int64)
    truth[0:16, 0:16] = truth[16:32, 32:48] = 1
    truth[0:16, 32:48] = 3
    acc = IoUAccumulator(4)
    acc.update(res.labels, truth)
    assert acc.iou()[[0, 1, 3]].min() > 0.9
    # centred queries: a pure red patch scores cos((1,0,0,0), (2,-1,-1,0)/sqrt(6)) = 0.816; absent green < 0
    assert res.scores["red thing"] > 0.8 and res.scores["green thing"] < 0.01
    if readout == "cluster":
        # the two red squares share a cluster but are separate connected segments
        assert res.cluster_map[0, 0] != res.cluster_map[31, 47]
        assert sum(s["label"] == "red thing" for s in res.segments) == 2
        assert sorted(s["label"] for s in res.segments) == ["background", "blue thing", "red thing", "red thing"]


class OutlineModel(ColourModel):
    """Patch embeddings know only colour; the global embedding knows only the outline of what is saturated in the
    image: wider than tall, or taller than wide (a stand-in for shape, which a ViT's average-pooled global embedding
    learns from captions while its patch embeddings do not)."""

    def dense_embeddings(self, images):
        onehot = self._onehot(images)
        fg = onehot[:, :3].sum(1) > 0  # [B, h, w] saturated patches
        rows, cols = fg.any(2).sum(1), fg.any(1).sum(1)
        outline = torch.stack([(cols > rows).float(), (rows > cols).float()], 1)  # [B, 2]: wide, tall
        return {"patch_embed": F.pad(onehot, (0, 0, 0, 0, 0, 2)), "cluster_probs": onehot,
                "image_embed": F.pad(outline, (4, 0))}

    def encode_texts(self, texts):
        out = torch.zeros(len(texts), 6)
        for i, t in enumerate(texts):
            out[i, 4 if "wide" in t else 5] = 1
        return F.normalize(out + 1e-3, dim=-1)


def test_reencode_global_names_each_segment_by_its_own_outline():
    img = np.full((32, 48, 3), 128, np.uint8)
    img[0:8, 0:32] = (255, 0, 0)  # a wide red bar (1 x 4 patches)
    img[0:32, 40:48] = (255, 0, 0)  # a tall red bar (4 x 1 patches), not touching the first
    queries = ["wide thing", "tall thing"]
    res = Segmenter(OutlineModel(), queries=queries, bg_threshold=0.4, input_size=32,
                    region="reencode_global").segment(img)
    assert (res.labels[0:6, 0:30] == 1).all() and (res.labels[2:30, 42:48] == 2).all()
    assert (res.labels[12:32, 0:32] == 0).all()  # the grey background re-encodes to nothing: below threshold
    assert abs(res.scores["wide thing"] - 0.7071) < 1e-3 and abs(res.scores["tall thing"] - 0.7071) < 1e-3
    # the same segments named by their pooled patch embeddings see only red: neither outline, all background
    res = Segmenter(OutlineModel(), queries=queries, bg_threshold=0.4, input_size=32, region="pool").segment(img)
    assert (res.labels == 0).all()
    with pytest.raises(ValueError, match="region"):
        Segmenter(OutlineModel(), queries=queries, region="crop")
    with pytest.raises(ValueError, match="reencode_global"):
        Segmenter(OutlineModel(), queries=queries, readout="dense", region="reencode_global")


def test_aliases_take_the_max_and_overlay_png(tmp_path):
    seg = Segmenter(ColourModel(), queries={"warm": ["red thing", "green thing"], "cold": ["blue thing"]},
                    bg_threshold=0.4, input_size=32)
    res = seg.segment(_scene())
    assert (res.labels[0:13, 0:13] == 1).all() and (res.labels[0:13, 35:48] == 2).all()
    path = seg.render_overlay(_scene(), res, tmp_path / "overlay.png")
    im = Image.open(path)
    assert im.size[0] >= 2 * 256 and im.mode == "RGB"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        Segmenter(ColourModel(), queries=[])
    seg = Segmenter(ColourModel(), queries=["red thing"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        seg.segment(bad)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        seg.segment(tmp_path / "nope.png")


def test_real_tiny_model_segments_any_size(tmp_path):
    model = create_model("vilseg-tiny")
    model.save_pretrained(tmp_path / "m")
    seg = Segmenter.from_pretrained(tmp_path / "m", queries=["a", "b", "c"], bg_threshold=-1.0)
    res = seg.segment(np.zeros((50, 70, 3), np.uint8))
    assert res.labels.shape == (50, 70) and set(np.unique(res.labels)) <= {1, 2, 3}
    assert len(res.segments) >= 1 and seg.index.index.ntotal == 3


def _naive_components(grid):
    h, w = grid.shape
    out = -np.ones((h, w), int)
    for y in range(h):
        for x in range(w):
            if out[y, x] >= 0:
                continue
            stack, members = [(y, x)], []
            out[y, x] = 0
            while stack:
                cy, cx = stack.pop()
                members.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and out[ny, nx] < 0 and grid[ny, nx] == grid[cy, cx]:
                        out[ny, nx] = 0
                        stack.append((ny, nx))
            smallest = min(my * w + mx for my, mx in members)
            for my, mx in members:
                out[my, mx] = smallest
    return out


def test_connected_components_matches_flood_fill():
    rng = np.random.default_rng(0)
    grids = rng.integers(0, 3, size=(4, 9, 11))
    got = connected_components(torch.from_numpy(grids)).numpy()
    for g, c in zip(grids, got):
        assert np.array_equal(c, _naive_components(g))


def test_iou_accumulator_matches_hand_computation():
    acc = IoUAccumulator(3)
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    acc.update(pred, label)
    # class 0: I=1, pred=2, label=2 -> 1/3; class 1: I=2, pred=3, label=2 -> 2/3; class 2: I=1, pred=1, label=2 -> 1/2
    np.testing.assert_allclose(acc.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert abs(acc.miou() - np.mean([1 / 3, 2 / 3, 1 / 2])) < 1e-12
