"""The Segmenter and its strategies, each on its own, on transparent models whose right answers are known; the faiss
VocabularyIndex against brute force."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vilseg import create_model
from vilseg.eval import IoUAccumulator
from vilseg.inference import (BackgroundWordsDecision, ClusterGrouping, DenseGrouping, NoDecision, PooledNaming,
                              ReadOut, ReencodeGlobalNaming, Segmenter, SlidingWindow, ThresholdDecision,
                              VocabularyIndex, connected_components)
from vilseg.inference.strategies import MaskedAttentionNaming, bound_segments
from vilseg.inference.vocabulary import DEFAULT_TEMPLATES, text_identity


class ColourModel(nn.Module):
    """A transparent model with the ViLSeg inference interface: patch embedding = mean patch colour (one-hot over
    red/green/blue when saturated, else a fourth 'grey' axis); clusters = the same one-hot; texts embed by colour
    word. The Segmenter's own logic (grouping, naming, decisions, upsampling) is what is under test."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.image_encoder = nn.Module()
        self.image_encoder.patch_size = 8
        self.image_encoder.normalize = lambda x: x
        self.config = type("C", (), {"image": type("I", (), {"img_size": 32})()})()
        # the text reference centring subtracts: the mean of captions naming red, green and blue equally often
        self.text_reference = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0])

    def _onehot(self, images):
        patches = F.avg_pool2d(images, 8)  # [B, 3, h, w]
        saturated = (patches.max(1).values - patches.min(1).values) > 0.3
        idx = torch.where(saturated, patches.argmax(1), torch.full_like(patches.argmax(1), 3))
        return F.one_hot(idx, 4).permute(0, 3, 1, 2).float()

    def dense_embeddings(self, images):
        onehot = self._onehot(images)
        return {"patch_embed": onehot, "cluster_probs": onehot,
                "image_embed": F.normalize(onehot.mean((2, 3)), dim=-1)}

    def encode_texts(self, texts):
        words = {"red": 0, "green": 1, "blue": 2, "grey": 3}
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


def _truth():
    truth = np.zeros((32, 48), np.int64)
    truth[0:16, 0:16] = truth[16:32, 32:48] = 1
    truth[0:16, 32:48] = 3
    return truth


QUERIES = ["red thing", "green thing", "blue thing"]


@pytest.mark.parametrize("grouping", ["clusters", "dense"])
def test_known_scene_labels_background_and_segments(grouping):
    # scored against the captions' reference, whose centred scores are worked out below (pooling's default is the
    # prompt reference: test_each_naming_scores_against_its_own_reference)
    seg = Segmenter(ColourModel(), QUERIES, ReadOut(grouping, "pool", threshold=0.4, input_size=32, reference="captions"))
    res = seg.segment(_scene())
    assert res.labels.shape == (32, 48) and res.segment_map.shape == (32, 48)
    acc = IoUAccumulator(4)
    acc.update(res.labels, _truth())
    assert acc.iou()[[0, 1, 3]].min() > 0.9  # bilinear upsampling rounds the corners only
    if grouping == "clusters":
        # the two red squares share a cluster but are separate connected segments; grey is background (names
        # centred on the reference: a pure red patch scores cos((1,0,0,0), (2,-1,-1,0)/sqrt(6)) = 0.816, grey below 0.4)
        assert sorted(s["label"] for s in res.segments) == ["background", "blue thing", "red thing", "red thing"]
        red = [s for s in res.segments if s["label"] == "red thing"]
        assert {tuple(s["box"]) for s in red} == {(0, 0, 16, 16), (32, 16, 48, 32)}
        assert all(abs(s["score"] - 0.8165) < 1e-3 and s["area"] == 256 for s in red)
        assert red[0]["top"][0] == ["red thing", pytest.approx(0.8165, abs=1e-3)] and len(red[0]["top"]) == 3
    else:
        assert len(res.segments) == 4 * 6  # every patch


def test_cluster_grouping_splits_a_cluster_into_connected_segments():
    probs = torch.zeros(1, 2, 3, 4)
    probs[0, 0] = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.float)
    probs[0, 1] = 1 - probs[0, 0]
    ids = ClusterGrouping()({"cluster_probs": probs})
    # cluster 0 has three components, cluster 1 one: 4 segments, numbered by first appearance
    assert ids.tolist() == [[0, 0, 1, 2], [1, 1, 1, 2], [3, 1, 1, 1]]
    dense = DenseGrouping()({"patch_embed": torch.zeros(1, 5, 3, 4)})
    assert dense.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_pooled_naming_is_the_normalised_mean_of_patch_embeddings():
    emb = F.normalize(torch.randn(1, 6, 2, 3), dim=1)
    ids = torch.tensor([[0, 0, 1], [1, 2, 2]])
    out = PooledNaming()(None, None, {"patch_embed": emb}, ids)
    flat = emb[0].flatten(1).t()
    expected = torch.stack([flat[[0, 1]].mean(0), flat[[2, 3]].mean(0), flat[[4, 5]].mean(0)])
    torch.testing.assert_close(out, F.normalize(expected, dim=-1))


class OutlineModel(ColourModel):
    """Patch embeddings know only colour; the global embedding knows only the outline of what is saturated in the
    image: wider than tall, or taller than wide (a stand-in for shape, which a ViT's average-pooled global embedding
    learns from captions while its patch embeddings do not)."""

    def __init__(self):
        super().__init__()
        self.text_reference = torch.tensor([0, 0, 0, 0, 0.5, 0.5])  # captions saying "wide" and "tall" equally often

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


def _bars():
    img = np.full((32, 48, 3), 128, np.uint8)
    img[0:8, 0:32] = (255, 0, 0)  # a wide red bar (1 x 4 patches)
    img[0:32, 40:48] = (255, 0, 0)  # a tall red bar (4 x 1 patches), not touching the first
    return img


def test_reencode_global_names_each_segment_by_its_own_outline():
    queries = ["wide thing", "tall thing"]
    res = Segmenter(OutlineModel(), queries, ReadOut("clusters", "reencode_global", 0.4, input_size=32)).segment(_bars())
    assert (res.labels[0:6, 0:30] == 1).all() and (res.labels[2:30, 42:48] == 2).all()
    assert (res.labels[12:32, 0:32] == 0).all()  # the grey background re-encodes to nothing: below threshold
    # the same segments named by their pooled patch embeddings see only red: neither outline, all background
    res = Segmenter(OutlineModel(), queries, ReadOut("clusters", "pool", 0.4, input_size=32)).segment(_bars())
    assert (res.labels == 0).all()


def test_reencode_global_windows_large_images():
    model, queries = OutlineModel(), ["wide thing", "tall thing"]
    seg = Segmenter(model, queries, ReadOut("clusters", "reencode_global", 0.4, input_size=32))
    x, _ = seg.preprocess(_bars())
    dense = model.dense_embeddings(x)
    ids = ClusterGrouping()(dense)
    full = ReencodeGlobalNaming()(model, x, dense, ids)
    # a window of 2 patches around each segment instead of the whole 4 x 6 patch image: same outlines here
    windowed = ReencodeGlobalNaming(window=16)(model, x, dense, ids)
    torch.testing.assert_close(windowed.argmax(1), full.argmax(1))


def test_decisions():
    scores, classes = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 2])
    names = ["cat", "sky", "dog"]
    assert ThresholdDecision(0.4).background(scores, classes, names).tolist() == [True, False, False]
    assert BackgroundWordsDecision(("sky",)).background(scores, classes, names).tolist() == [False, True, False]
    assert NoDecision().background(scores, classes, names).tolist() == [False, False, False]


def test_background_words_replace_the_threshold():
    seg = Segmenter(ColourModel(), QUERIES, ReadOut("clusters", "pool", threshold=None,
                                                      background_words=["grey thing"], input_size=32))
    res = seg.segment(_scene())
    assert seg.index.classes[-1] == "grey thing" and seg.classes == QUERIES
    assert (res.labels[20:32, 0:14] == 0).all()  # the grey region names "grey thing": background
    assert (res.labels[0:12, 0:12] == 1).all()


def test_sliding_window_tiles_agree_with_one_pass_for_a_local_model():
    model = ColourModel()
    image = torch.rand(1, 3, 48, 80)
    one = model.dense_embeddings(image)
    tiled = SlidingWindow(window=32, stride=16, max_tokens=4)(model, image)  # 6 x 10 patches > 4: tiled
    torch.testing.assert_close(tiled["patch_embed"], F.normalize(one["patch_embed"], dim=1))
    torch.testing.assert_close(tiled["cluster_probs"], one["cluster_probs"])
    assert SlidingWindow().windows(48, 80, 32, 16) == [(y, y + 32, x, x + 32) for y in (0, 16) for x in (0, 16, 32, 48)]
    assert SlidingWindow().windows(20, 40, 32, 16) == [(0, 20, 0, 32), (0, 20, 8, 40)]  # clamped to the border


def test_a_large_vocabulary_labels_like_a_small_one():
    from vilseg.inference import segmenter as module

    small = Segmenter(ColourModel(), QUERIES, ReadOut("clusters", "pool", 0.4, input_size=32))
    large = Segmenter(ColourModel(), QUERIES, ReadOut("clusters", "pool", 0.4, input_size=32))
    module.ALL_CLASS_MAPS, saved = 1, module.ALL_CLASS_MAPS  # force the path for vocabularies of 100k names
    try:
        np.testing.assert_array_equal(large.segment(_scene()).labels, small.segment(_scene()).labels)
    finally:
        module.ALL_CLASS_MAPS = saved


def test_overlay_png_and_clear_errors(tmp_path):
    from PIL import Image

    seg = Segmenter(ColourModel(), {"warm": ["red thing", "green thing"], "cold": ["blue thing"]},
                    ReadOut("clusters", "pool", 0.4, input_size=32, reference="captions"))
    res = seg.segment(_scene())
    assert (res.labels[0:13, 0:13] == 1).all() and (res.labels[0:13, 35:48] == 2).all()  # aliases: max over names
    im = Image.open(seg.render_overlay(_scene(), res, tmp_path / "overlay.png"))
    assert im.size[0] >= 2 * 256 and im.mode == "RGB"
    with pytest.raises(ValueError, match="empty"):
        Segmenter(ColourModel(), [])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        seg.segment(bad)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        seg.segment(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="naming"):
        Segmenter(ColourModel(), QUERIES, ReadOut(naming="crop"))


def test_real_tiny_model_segments_any_size_and_saved_readout_is_used(tmp_path):
    model = create_model("vilseg-tiny")
    model.save_pretrained(tmp_path / "m")
    ReadOut("clusters", "pool", threshold=-1.0).save(tmp_path / "m")
    seg = Segmenter.from_pretrained(tmp_path / "m", vocabulary=["a", "b", "c"])
    assert seg.readout.naming == "pool" and seg.readout.threshold == -1.0
    res = seg.segment(np.zeros((50, 70, 3), np.uint8))
    assert res.labels.shape == (50, 70) and set(np.unique(res.labels)) <= {1, 2, 3}
    assert len(res.segments) >= 1 and seg.index.index.ntotal == 3


# ------------------------------------------------------------------ VocabularyIndex
def _index(n_classes, aliases=2, dim=32, kind="flat", seed=0):
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(n_classes * aliases, dim, generator=g), dim=-1)
    owner = torch.arange(n_classes).repeat_interleave(aliases)
    return VocabularyIndex(vectors, owner, [f"c{i}" for i in range(n_classes)], kind=kind), vectors, owner


def test_vocabulary_search_returns_the_top_k_classes_with_the_best_alias():
    index, vectors, owner = _index(50)
    queries = F.normalize(torch.randn(7, 32), dim=-1)
    scores, classes = index.search(queries, k=4)
    brute = torch.full((7, 50), -2.0).scatter_reduce(1, owner.expand(7, -1), queries @ vectors.t(), "amax")
    top = brute.topk(4, dim=1)
    torch.testing.assert_close(scores, top.values)
    assert torch.equal(classes, top.indices)
    torch.testing.assert_close(index.scores(queries), brute)


def test_approximate_index_recall_against_exact():
    exact, vectors, _ = _index(3000, aliases=1, kind="flat")
    approx = VocabularyIndex(vectors, torch.arange(3000), exact.classes, kind="hnsw")
    queries = F.normalize(vectors[:200] + 0.3 * torch.randn(200, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    _, e = exact.search(queries, 1)
    _, a = approx.search(queries, 1)
    assert (e == a).float().mean() >= 0.99


def test_a_class_scores_the_same_under_two_class_lists_that_share_it(tmp_path):
    model = create_model("vilseg-tiny")
    model.fit_text_reference(["a red circle on grey.", "two blue squares.", "a green triangle and a red square."])
    model.save_pretrained(tmp_path / "m")
    model = type(model).from_pretrained(tmp_path / "m")  # the reference travels with the export
    assert model.text_reference is not None and (tmp_path / "m" / "text_reference.safetensors").is_file()
    q = F.normalize(torch.randn(5, model.config.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    pair = VocabularyIndex.build(model, ["cat", "dog"])
    six = VocabularyIndex.build(model, ["dog", "car", "cat", "tree", "sky", "boat"])
    torch.testing.assert_close(pair.scores(q)[:, 0], six.scores(q)[:, 2])  # cat
    torch.testing.assert_close(pair.scores(q)[:, 1], six.scores(q)[:, 0])  # dog
    # the score is the cosine with the name centred on the reference, not on the list it came with
    raw = torch.cat([model.encode_texts([t.format("cat") for t in DEFAULT_TEMPLATES])]).mean(0)
    cat = F.normalize(F.normalize(raw, dim=-1) - model.text_reference, dim=-1)
    torch.testing.assert_close(pair.scores(q)[:, 0], q @ cat, atol=1e-5, rtol=0)
    # a model without a reference is not centred: the cosine with the plain name
    bare = create_model("vilseg-tiny")
    plain = VocabularyIndex.build(bare, ["cat", "dog"])
    raw = F.normalize(bare.encode_texts([t.format("cat") for t in DEFAULT_TEMPLATES]).mean(0), dim=-1)
    torch.testing.assert_close(plain.scores(q)[:, 0], q @ raw, atol=1e-5, rtol=0)
    assert plain.center is None and pair.center is not None


def test_each_naming_scores_against_its_own_reference(tmp_path):
    from vilseg.inference.vocabulary import PROMPT_WORD, embed_names

    model = create_model("vilseg-tiny")
    model.fit_text_reference(["a red circle on grey.", "two blue squares.", "a green triangle and a red square."])
    prompt = embed_names(model, [PROMPT_WORD])[0]
    assert not torch.allclose(prompt, model.text_reference, atol=1e-3)
    q = F.normalize(torch.randn(5, model.config.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    raw = F.normalize(model.encode_texts([t.format("cat") for t in DEFAULT_TEMPLATES]).mean(0), dim=-1)
    for naming, reference, vector in (("pool", "prompt", prompt), ("masked_attention", "prompt", prompt),
                                      ("reencode_global", "captions", model.text_reference)):
        seg = Segmenter(model, ["cat", "dog"], ReadOut("clusters", naming, 0.3), device="cpu")
        assert seg.reference == reference and seg.index.reference == reference
        torch.testing.assert_close(seg.index.center, vector)
        cat = F.normalize(raw - vector, dim=-1)
        torch.testing.assert_close(seg.index.scores(q)[:, 0], q @ cat, atol=1e-5, rtol=0)
        # fixed, so a class still scores the same in any list that holds it
        six = Segmenter(model, ["dog", "car", "cat", "tree"], ReadOut("clusters", naming, 0.3), device="cpu")
        torch.testing.assert_close(seg.index.scores(q)[:, 0], six.index.scores(q)[:, 2])
    # a read-out may name its reference; it is saved and read back with the read-out
    ReadOut("clusters", "pool", 0.3, reference="captions").save(tmp_path)
    assert ReadOut.load(tmp_path).text_reference == "captions"
    assert ReadOut("clusters", "pool").text_reference == "prompt"
    with pytest.raises(ValueError, match="'mean'"):
        Segmenter(model, ["cat"], ReadOut("clusters", "pool", reference="mean"))


def test_a_prebuilt_index_for_another_reference_is_refused(tmp_path):
    model = create_model("vilseg-tiny")
    model.fit_text_reference(["a red circle on grey.", "two blue squares."])
    captions = VocabularyIndex.build(model, ["cat", "dog"], reference="captions")
    captions.save(tmp_path / "v")
    loaded = VocabularyIndex.load(tmp_path / "v", model)
    assert loaded.reference == "captions"
    torch.testing.assert_close(loaded.center, model.text_reference)
    Segmenter(model, loaded, ReadOut("clusters", "reencode_global"), device="cpu")  # the index's own reference
    with pytest.raises(ValueError, match="'captions' reference.*pool read-out.*'prompt'.*--naming pool"):
        Segmenter(model, loaded, ReadOut("clusters", "pool"), device="cpu")
    seg = Segmenter(model, VocabularyIndex.build(model, ["cat"], reference="prompt"), ReadOut("clusters", "pool"))
    assert seg.index.reference == "prompt"


def test_a_refitted_text_reference_changes_the_text_identity():
    model = create_model("vilseg-tiny")
    before = text_identity(model)
    model.fit_text_reference(["a red circle.", "a blue square."])
    first = text_identity(model)
    model.fit_text_reference(["a green triangle.", "a grey star."])
    assert len({before, first, text_identity(model)}) == 3


def test_vocabulary_index_save_load_and_text_identity(tmp_path):
    model = create_model("vilseg-tiny")
    index = VocabularyIndex.build(model, {"tv": ["television", "monitor"], "cat": ["cat"]})
    index.save(tmp_path / "v")
    loaded = VocabularyIndex.load(tmp_path / "v", model)
    assert loaded.classes == ["tv", "cat"] and loaded.aliases["tv"] == ["television", "monitor"]
    q = F.normalize(torch.randn(3, model.config.embed_dim), dim=-1)
    torch.testing.assert_close(loaded.scores(q), index.scores(q))
    other = create_model("vilseg-tiny")  # another random text tower
    with pytest.raises(ValueError, match="another text encoder"):
        VocabularyIndex.load(tmp_path / "v", other)
    with pytest.raises(ValueError, match="empty"):
        VocabularyIndex.build(model, [])


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


# ------------------------------------------------------------------ masked-attention naming
def _vit(pool: str, conv_stem: bool = False):
    """A tiny real ViL-Seg (2 blocks, 4 x 4 patches at 32 px); a plain linear patch projection is patch-local."""
    torch.manual_seed(0)
    return create_model("vilseg-tiny", image={"pool": pool, "conv_stem": conv_stem}).eval()


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_masked_attention_with_all_blocks_and_one_whole_segment_is_the_global_embedding(pool):
    model = _vit(pool)
    x = torch.randn(1, 3, 32, 32)
    naming = MaskedAttentionNaming("all")
    with torch.no_grad():
        dense = model.dense_embeddings(x, **naming.dense_kwargs(model))
        emb = naming(model, x, dense, torch.zeros(4, 4, dtype=torch.long))
    assert emb.shape == (1, model.config.embed_dim)
    torch.testing.assert_close(emb[0], dense["image_embed"][0], atol=1e-5, rtol=0)
    # keeping the hidden tokens changes nothing of the image's own outputs
    plain = model.dense_embeddings(x)
    for key in plain:
        torch.testing.assert_close(dense[key], plain[key], atol=0, rtol=0)


def _two_images_differing_outside(ids):
    """Two images equal on the pixels of segment 0 of ``ids`` (4 x 4 patches of 8 px) and different elsewhere."""
    torch.manual_seed(1)
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    inside = (ids == 0).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return a, torch.where(inside, a, b)


def test_masked_attention_sees_outside_pixels_only_through_the_tokens_it_starts_from():
    ids = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 1], [2, 2, 2, 1]])
    # k = all on a patch-local encoder (linear patch projection): the segment's embedding does not change at all,
    # while the whole image's does
    model = _vit("avg")
    a, b = _two_images_differing_outside(ids)
    naming = MaskedAttentionNaming("all")
    with torch.no_grad():
        da, db = (model.dense_embeddings(v, **naming.dense_kwargs(model)) for v in (a, b))
        ea, eb = naming(model, a, da, ids), naming(model, b, db, ids)
    torch.testing.assert_close(ea[0], eb[0], atol=1e-6, rtol=0)
    assert (ea[1:] - eb[1:]).abs().max() > 1e-3 and (da["image_embed"] - db["image_embed"]).abs().max() > 1e-3
    # k = 1: outside pixels reach the segment only through the tokens entering the last block, its own tokens:
    # give image b the prefix and segment-0 tokens of image a, and segment 0's embedding is a's again
    model = _vit("token", conv_stem=True)
    naming = MaskedAttentionNaming(1)
    with torch.no_grad():
        da, db = (model.dense_embeddings(v, **naming.dense_kwargs(model)) for v in (a, b))
        ea, eb = naming(model, a, da, ids), naming(model, b, db, ids)
        assert (ea[0] - eb[0]).abs().max() > 1e-4  # through its tokens, the context does reach it
        prefix = model.image_encoder.vit.num_prefix_tokens
        own = torch.cat([torch.ones(prefix, dtype=torch.bool), ids.flatten() == 0])
        swapped = torch.where(own[None, :, None], da["hidden"], db["hidden"])
        es = model.segment_embeddings(swapped, ids.flatten()[None], naming.start_block(model))[0]
    torch.testing.assert_close(es[0], ea[0], atol=1e-6, rtol=0)


def test_masked_attention_batches_images_with_different_segment_counts():
    model = _vit("avg")
    x = torch.randn(2, 3, 32, 32)
    ids = torch.stack([torch.tensor([[0, 0, 1, 1]] * 4), torch.tensor([[0, 1, 2, 3]] * 4)]).flatten(1)
    with torch.no_grad():
        hidden = model.dense_embeddings(x, keep_block=1)["hidden"]
        both = model.segment_embeddings(hidden, ids, 1)
        alone = [model.segment_embeddings(hidden[i:i + 1], ids[i:i + 1], 1)[0] for i in range(2)]
    assert both.shape == (2, 4, model.config.embed_dim)
    torch.testing.assert_close(both[0, :2], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(both[1], alone[1], atol=1e-6, rtol=0)


def test_segmenter_with_masked_attention_saves_its_blocks(tmp_path):
    model = _vit("avg")
    readout = ReadOut("clusters", "masked_attention", None, blocks=2, input_size=32)
    seg = Segmenter(model, ["red circle", "blue square"], readout, device="cpu")
    res = seg.segment(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    assert res.labels.shape == (40, 48) and len(res.segments) >= 1
    readout.save(tmp_path)
    assert ReadOut.load(tmp_path).blocks == 2
    with pytest.raises(ValueError, match="blocks"):
        MaskedAttentionNaming(0)
    with pytest.raises(ValueError, match="single patches"):
        Segmenter(model, ["a"], ReadOut("dense", "masked_attention"), device="cpu")


# ------------------------------------------------------------------ bounded segments
def test_bound_segments_merges_small_and_surplus_segments_into_the_most_similar_neighbour():
    ids = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 3, 3, 3], [2, 3, 3, 3]])
    emb = torch.zeros(2, 4, 4)
    emb[0] = 1.0  # segments 0, 1, 3 point one way
    emb[:, ids == 2] = torch.tensor([[0.0], [1.0]])  # segment 2 (2 patches) points another way
    emb[:, 3, 3] = torch.tensor([0.0, 1.0])  # ... and so does one patch of segment 3
    emb = F.normalize(emb, dim=0)
    assert bound_segments(ids, emb) is ids  # nothing to bound
    # min area 3: segment 2 (2 patches) merges; its neighbours are 0 (cos 0) and 3 (cos 1/6 of one patch's worth)
    merged = bound_segments(ids, emb, min_area=3)
    assert merged.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]
    # at most 2 segments: 2 merges into 3 as above; then of the smallest left (0 and 1, 4 patches each) the first, 0,
    # merges into 1 (cosine 1) rather than into 3 + 2 (5 patches one way, 3 the other)
    two = bound_segments(ids, emb, max_segments=2)
    assert two.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="min_area"):
        bound_segments(ids, emb, min_area=0)


@pytest.mark.parametrize("naming", ["pool", "masked_attention", "reencode_global"])
def test_segment_batch_equals_segmenting_each_image_alone(naming):
    model = _vit("avg")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((40, 48, 3), (32, 32, 3), (40, 48, 3))]
    seg = Segmenter(model, ["red circle", "blue square", "green cross"],
                    ReadOut("clusters", naming, 0.0, blocks=1, input_size=32), device="cpu", batch_size=2)
    batched = seg.segment_batch(images)  # 40x48 -> 32x40 twice (one pass), 32x32 once
    for image, got in zip(images, batched):
        alone = seg.segment(image)
        assert (got.labels == alone.labels).all() and (got.segment_map == alone.segment_map).all()
        assert [s["label"] for s in got.segments] == [s["label"] for s in alone.segments]
        np.testing.assert_allclose([s["score"] for s in got.segments], [s["score"] for s in alone.segments],
                                   atol=1e-5)
