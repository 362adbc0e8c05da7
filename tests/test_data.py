"""The synthetic world, multi-crop boxes, and the webdataset stream on tiny tars built here."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vilseg.data.multicrop import MultiCrop
from vilseg.data.stream import make_train_stream
from vilseg.data.synthetic import CLASSES, HELD_OUT, SyntheticWorld, class_index


def test_world_is_deterministic_and_masks_match_captions():
    a, b = SyntheticWorld("train", seed=3), SyntheticWorld("train", seed=3)
    for i in range(20):
        sa, sb = a.scene(i), b.scene(i)
        assert np.array_equal(sa.image, sb.image) and sa.caption == sb.caption
        labels = set(np.unique(sa.mask)) - {0}
        expected = {class_index(o["colour"], o["shape"]) for o in sa.objects}
        assert labels <= expected and 1 <= len(sa.objects) <= 4
        for o in sa.objects:
            assert f"{o['colour']} {o['shape']}" in sa.caption
    assert not np.array_equal(SyntheticWorld("train", seed=4).scene(0).image, a.scene(0).image)


def test_held_out_combinations_never_appear_in_training_but_do_in_eval():
    train, held = SyntheticWorld("train"), {f"{c} {s}" for c, s in HELD_OUT}
    for i in range(300):
        scene = train.scene(i)
        assert not any(h in scene.caption for h in held)
        assert not ({class_index(*cs) for cs in HELD_OUT} & set(np.unique(scene.mask)))
    found = {CLASSES[v - 1] for i in range(100) for v in np.unique(SyntheticWorld("eval").scene(i).mask) if v}
    assert held <= found


def test_multicrop_records_boxes_and_flips_that_reproduce_the_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    crop = MultiCrop(32, 16, n_global=2, n_local=3, mean=(0, 0, 0), std=(1, 1, 1))
    views, boxes, flips = crop(image, np.random.default_rng(1))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert boxes.shape == (5, 4) and flips.shape == (5,)
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 1).all()
    for view, box, flip in zip(views, boxes, flips):
        x0, y0, x1, y1 = (box * 64).tolist()
        ref = np.asarray(image.resize((view.shape[-1],) * 2, Image.BILINEAR, box=(x0, y0, x1, y1)), np.float32) / 255
        ref = torch.from_numpy(ref).permute(2, 0, 1)
        torch.testing.assert_close(view, ref.flip(-1) if flip else ref)


def _png_bytes(rng, size=32):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def tiny_shards(tmp_path):
    rng = np.random.default_rng(0)
    good = lambda i: (f"s{i:04d}", {"png": _png_bytes(rng), "txt": f"a red circle number {i}".encode()})  # noqa: E731
    _write_tar(tmp_path / "shard-0.tar", [good(i) for i in range(6)] + [
        ("bad_image", {"png": b"\x89PNG\r\n\x1a\n this is not an image", "txt": b"a blue square"})])
    _write_tar(tmp_path / "shard-1.tar", [good(i) for i in range(6, 12)] + [
        ("empty_caption", {"png": _png_bytes(rng), "txt": b"   \n"})])
    return tmp_path


def test_stream_skips_and_counts_corrupt_image_and_empty_caption(tiny_shards):
    crop = MultiCrop(16, 8, n_global=2, n_local=1)
    stream = make_train_stream(str(tiny_shards / "shard-{0..1}.tar"), crop, batch_size=4, seed=0,
                               resampled=False, shuffle_buffer=4)
    batches = list(stream)
    keys = sorted(k for b in batches for k in b["keys"])
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert keys == [f"s{i:04d}" for i in range(12)]  # every good sample arrives once
    assert skipped == {"corrupt_image": 1, "empty_caption": 1}
    b = batches[0]
    assert [tuple(v.shape) for v in b["views"]] == [(4, 3, 16, 16), (4, 3, 16, 16), (4, 3, 8, 8)]
    assert b["boxes"].shape == (4, 3, 4) and b["flips"].shape == (4, 3) and len(b["captions"]) == 4
    assert all(c.startswith("a red circle number") for c in b["captions"])


def test_resampled_stream_is_deterministic(tiny_shards):
    crop = MultiCrop(16, 8, n_global=1, n_local=0)

    def first_batches():
        stream = make_train_stream(str(tiny_shards / "shard-{0..1}.tar"), crop, 4, seed=5)
        it = iter(stream)
        return [next(it) for _ in range(3)]

    for a, b in zip(first_batches(), first_batches()):
        assert a["keys"] == b["keys"]
        torch.testing.assert_close(a["views"][0], b["views"][0])


def test_missing_shard_path_names_the_file(tiny_shards):
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards.*shard-2\.tar"):
        make_train_stream(str(tiny_shards / "shard-{0..2}.tar"), MultiCrop(16, 8), 2)


def test_pipe_urls_are_accepted(tiny_shards):
    crop = MultiCrop(16, 8, n_global=1, n_local=0)
    stream = make_train_stream(f"pipe:cat {tiny_shards / 'shard-1.tar'}", crop, 2, resampled=False)
    assert sum(len(b["keys"]) for b in stream) == 6


def test_synthetic_shards_are_readable_with_plain_webdataset(tmp_path):
    import webdataset as wds

    from data_prep import synthetic

    synthetic.main(["--out", str(tmp_path), "--train", "12", "--eval", "3", "--calib", "2", "--per-shard", "5"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    samples = list(wds.WebDataset(manifest["pattern"], shardshuffle=False).decode("pil"))
    assert len(samples) == 12 and samples[0]["txt"] and samples[0]["png"].size == (64, 64)
    assert json.loads((tmp_path / "eval" / "meta.json").read_text())["classes"][0] == "background"
    assert len(list((tmp_path / "eval" / "masks").glob("*.png"))) == 3


def test_swap_word_stays_in_group_and_avoids_excluded_phrases():
    from vilseg.data.stream import swap_word

    groups = [["circle", "square"], ["red", "blue"]]
    rng = np.random.default_rng(0)
    outs = {swap_word("a red circle.", groups, rng) for _ in range(40)}
    assert outs == {"a blue circle.", "a red square."}
    outs = {swap_word("a red square.", groups, rng, exclude=["red circle"]) for _ in range(40)}
    assert outs == {"a blue square."}
    assert swap_word("a green cross", groups, rng) is None


def test_stream_carries_hard_negative_captions(tiny_shards):
    crop = MultiCrop(16, 8, n_global=1, n_local=0)
    stream = make_train_stream(str(tiny_shards / "shard-0.tar"), crop, batch_size=3, resampled=False,
                               swap_groups=[["red", "blue"]])
    batch = next(iter(stream))
    assert batch["has_neg"].all()
    assert batch["neg_captions"] == [c.replace("red", "blue") for c in batch["captions"]]


def test_fsspec_urls_are_accepted(tiny_shards):
    # webdataset's gopen has no handler for s3://, memory://, ...: vilseg falls back to fsspec for them.
    import fsspec

    with fsspec.open("memory://vilseg-test/shard-1.tar", "wb") as f:
        f.write((tiny_shards / "shard-1.tar").read_bytes())
    crop = MultiCrop(16, 8, n_global=1, n_local=0)
    stream = make_train_stream("memory://vilseg-test/shard-1.tar", crop, 2, resampled=False)
    assert sum(len(b["keys"]) for b in stream) == 6


def test_read_captions_reads_in_shard_order_and_skips_unreadable_samples(tiny_shards):
    from vilseg.data.stream import read_captions

    captions = read_captions(str(tiny_shards / "shard-{0..1}.tar"), 100)
    # shard 0's six good captions, its bad image's caption (only the text is read), then shard 1's; no empty one
    assert captions == [f"a red circle number {i}" for i in range(6)] + ["a blue square"] + [
        f"a red circle number {i}" for i in range(6, 12)]
    assert read_captions(str(tiny_shards / "shard-{0..1}.tar"), 3) == [f"a red circle number {i}" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="shard-9.tar"):
        read_captions(str(tiny_shards / "shard-9.tar"), 3)


def test_image_only_stream_ignores_captions_and_carries_block_masks(tiny_shards):
    from vilseg.data.masking import BlockMasking

    crop = MultiCrop(16, 8, n_global=2, n_local=0)
    stream = make_train_stream(str(tiny_shards / "shard-{0..1}.tar"), crop, 4, resampled=False, captions=False,
                               masking=BlockMasking((2, 2), (0.5, 0.5), min_block=1))
    batches = list(stream)
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    # the empty caption no longer matters: 13 readable images (the corrupt one is still skipped), 3 full batches
    assert skipped == {"corrupt_image": 1} and sum(len(b["keys"]) for b in batches) == 12
    assert batches[0]["masks"].shape == (4, 2, 2, 2) and (batches[0]["masks"].sum((2, 3)) == 2).all()
    assert "neg_captions" not in batches[0]


def test_folder_of_images_feeds_an_image_only_stage_and_counts_unreadable_files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "imgs" / ("sub" if i % 2 else "") / f"im{i}.PNG").write_bytes(_png_bytes(rng))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, not listed")
    crop = MultiCrop(16, 8, n_global=1, n_local=0)
    batches = list(make_train_stream(str(tmp_path / "imgs"), crop, 5, resampled=False, captions=False))
    assert len(batches) == 1 and sorted(batches[0]["keys"]) == sorted(
        ["im0.PNG", "sub/im1.PNG", "im2.PNG", "sub/im3.PNG", "im4.PNG"])
    assert batches[0]["skipped"] == {"corrupt_image": 1}
    with pytest.raises(ValueError, match="no captions"):
        make_train_stream(str(tmp_path / "imgs"), crop, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image file"):
        make_train_stream(str(tmp_path / "empty"), crop, 2, captions=False)


def test_synthetic_source_renders_the_training_world_on_the_fly():
    from vilseg.data.stream import read_captions

    crop = MultiCrop(32, 16, n_global=1, n_local=0)
    batch = next(iter(make_train_stream("synthetic:50", crop, 4, resampled=False)))
    world = SyntheticWorld("train")
    for key, caption in zip(batch["keys"], batch["captions"]):
        assert world.scene(int(key)).caption == caption
    assert read_captions("synthetic:50", 3) == [world.scene(i).caption for i in range(3)]
    with pytest.raises(ValueError, match="synthetic:N"):
        make_train_stream("synthetic:lots", crop, 4)


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar]


@pytest.mark.parametrize("where", ["inside_a_member", "between_members"])
def test_a_shard_cut_short_is_counted_once(tiny_shards, tmp_path, where):
    full = (tiny_shards / "shard-0.tar").read_bytes()
    members = _members(tiny_shards / "shard-0.tar")
    header, data, _ = members[6]  # the 4th sample's image
    cut = data + 100 if where == "inside_a_member" else header  # a header boundary: the reader stops silently
    (tmp_path / "cut.tar").write_bytes(full[:cut])
    batches = list(make_train_stream(str(tmp_path / "cut.tar"), MultiCrop(16, 8, 1, 0), 1, resampled=False))
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert sum(len(b["keys"]) for b in batches) == 3 and skipped == {"truncated_shard": 1}


def test_tiny_images_and_huge_captions_are_skipped_under_their_own_reasons(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"ok{i}", {"png": _png_bytes(rng), "txt": b"a red circle"}) for i in range(3)]
    samples += [("tiny", {"png": _png_bytes(rng, size=1), "txt": b"a 1x1 image"}),
                ("long", {"png": _png_bytes(rng), "txt": b"word " * 200_000})]
    _write_tar(tmp_path / "s.tar", samples)
    stream = make_train_stream(str(tmp_path / "s.tar"), MultiCrop(16, 8, 1, 0), 1, resampled=False,
                               min_image_side=8, max_caption_chars=5000)
    batches = list(stream)
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert sorted(k for b in batches for k in b["keys"]) == ["ok0", "ok1", "ok2"]
    assert skipped == {"image_too_small": 1, "caption_too_long": 1}


def _scene(seed=0, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_photometric_augmentation_leaves_the_caption_view_intact_unless_configured():
    from vilseg.data.augment import Photometric

    plain = MultiCrop(32, 16, n_global=2, n_local=2, mean=(0, 0, 0), std=(1, 1, 1))
    strong = Photometric(jitter_p=1.0, grayscale_p=0.0, blur_p=(1.0, 1.0, 1.0), solarize_p=(0.0, 1.0, 0.0))
    for seed in range(5):
        ref, ref_boxes, _ = plain(_scene(seed), np.random.default_rng(seed))
        kept, boxes, _ = MultiCrop(32, 16, 2, 2, mean=(0, 0, 0), std=(1, 1, 1), photometric=strong,
                                   intact_first=True)(_scene(seed), np.random.default_rng(seed))
        torch.testing.assert_close(kept[0], ref[0], rtol=0, atol=0)  # the caption's view: untouched
        torch.testing.assert_close(boxes[:2], ref_boxes[:2])  # the same crop for view 1 ...
        assert (kept[1] - ref[1]).abs().mean() > 0.05  # ... but jittered, blurred and solarised
        every, _, _ = MultiCrop(32, 16, 2, 2, mean=(0, 0, 0), std=(1, 1, 1), photometric=strong,
                                intact_first=False)(_scene(seed), np.random.default_rng(seed))
        assert (every[0] - ref[0]).abs().max() > 0.05  # caption_view: true jitters view 0 too


def test_photometric_ops_follow_dino_per_view():
    from vilseg.data.augment import Photometric

    aug = Photometric()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    grey = Photometric(jitter_p=0.0, grayscale_p=1.0, blur_p=(0, 0, 0))(image, rng, 0)
    torch.testing.assert_close(grey[0], grey[1])  # grayscale keeps 3 equal channels
    solar = Photometric(jitter_p=0.0, grayscale_p=0.0, blur_p=(0, 0, 0), solarize_p=(0, 1, 0))
    torch.testing.assert_close(solar(image, rng, 1), torch.where(image >= 0.5, 1 - image, image))
    torch.testing.assert_close(solar(image, rng, 0), image)  # solarisation only on the second global view
    assert [aug.kind(i, 2) for i in range(5)] == [0, 1, 2, 2, 2]


def test_augmented_stream_is_a_function_of_the_seed_alone(tiny_shards):
    """What makes --resume exact: every draw comes from the per-sample generator, none from torch's or numpy's
    global one, so two streams built under different global seeds give the same augmented views."""
    from vilseg.data.augment import Photometric

    crop = MultiCrop(16, 8, n_global=2, n_local=2, photometric=Photometric(), intact_first=True)

    def first_batches(global_seed):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        it = iter(make_train_stream(str(tiny_shards / "shard-{0..1}.tar"), crop, 4, seed=5))
        return [next(it) for _ in range(3)]

    plain = iter(make_train_stream(str(tiny_shards / "shard-{0..1}.tar"), MultiCrop(16, 8, 2, 2), 4, seed=5))
    for a, b in zip(first_batches(0), first_batches(123)):
        assert a["keys"] == b["keys"]
        for va, vb in zip(a["views"], b["views"]):
            torch.testing.assert_close(va, vb, rtol=0, atol=0)
        assert not torch.allclose(a["views"][1], next(plain)["views"][1])  # augmentation is on
