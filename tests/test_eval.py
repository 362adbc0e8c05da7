"""The evaluator: mmseg-exact mIoU (against torchmetrics), the protocols' geometry, the 8 benchmark layouts under both
presets through `vilseg eval`, predictions scoring, bad input, and agreement with the Segmenter's read-out."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vilseg import eval as ev
from vilseg.cli import main as _main


def cli(argv: list[str]) -> int:
    """The exit code of `vilseg ARGV` run in this process."""
    try:
        return _main(argv)
    except SystemExit as exn:
        return exn.code


# ------------------------------------------------------------------ metric
def _torchmetrics_iou(preds, labels, n_classes):
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(num_classes=n_classes, ignore_index=255, average="none")
    union = np.zeros(n_classes, np.int64)
    for p, l in zip(preds, labels):
        metric.update(torch.from_numpy(p.astype(np.int64))[None], torch.from_numpy(l.astype(np.int64))[None])
        keep = l != 255
        union += np.bincount(p[keep], minlength=n_classes) + np.bincount(l[keep], minlength=n_classes)
        union -= np.bincount(p[keep][p[keep] == l[keep]], minlength=n_classes)
    return metric.compute().double().numpy(), union


@pytest.mark.parametrize("case", ["absent_classes", "ignore", "reduce_zero_label"])
def test_miou_equals_torchmetrics_accumulated_over_the_dataset(case, tmp_path):
    rng = np.random.default_rng(0)
    n = 7
    preds, labels = [], []
    for i in range(5):
        h, w = rng.integers(5, 40, size=2)
        label = rng.integers(0, n, size=(h, w)).astype(np.uint8)
        label[label == 6] = 5  # class 6 never appears in the ground truth ...
        if i % 2:
            label[label == 3] = 2  # ... and class 3 only in some images
        if case == "ignore":
            label[rng.random((h, w)) < 0.3] = 255
        pred = rng.integers(0, n - 1, size=(h, w)).astype(np.uint8)  # ... nor in any prediction: union 0, NaN
        preds.append(pred)
        labels.append(label)
    if case == "reduce_zero_label":  # through the dataset reader's label handling, checked by hand here
        ds = ev.Dataset("x", tmp_path, [], [str(c) for c in range(n)], reduce_zero_label=True)
        reduced = []
        for i, label in enumerate(labels):
            path = tmp_path / f"{i}.png"
            Image.fromarray(label).save(path)
            got = ds.label(ev.datasets.Item(str(i), path, path))
            expect = np.where(label == 0, 255, label.astype(np.int64) - 1)
            assert np.array_equal(got, expect)
            reduced.append(got)
        labels = reduced
    acc = ev.IoUAccumulator(n)
    for p, l in zip(preds, labels):
        acc.update(p, l)
    ref, union = _torchmetrics_iou(preds, labels, n)
    ours = acc.iou()
    assert np.array_equal(np.isnan(ours), union == 0)  # NaN exactly where nothing is predicted or labelled
    assert np.isnan(ours[6])
    np.testing.assert_allclose(ours[union > 0], ref[union > 0], atol=1e-6)
    assert abs(acc.miou() - ref[union > 0].mean()) < 1e-6


# ------------------------------------------------------------------ geometry
def test_rescale_size_matches_the_formula_on_hand_checked_cases():
    assert ev.rescale_size(375, 500, 448, 2048) == (448, 597)  # VOC landscape: 500 * 448/375 = 597.33
    assert ev.rescale_size(333, 500, 336, 2048) == (336, 505)  # odd size: 500 * 336/333 = 504.50 -> int(505.00)
    assert ev.rescale_size(1024, 2048, 560, 2048) == (560, 1120)  # Cityscapes 2:1
    assert ev.rescale_size(100, 5000, 448, 2048) == (41, 2048)  # the long side binds: scale = 2048/5000
    assert ev.rescale_size(20, 30, 448, 2048) == (448, 672)  # small images are enlarged


def test_sliding_windows_match_the_formula_on_hand_checked_cases():
    # 448 x 597, crop 448, stride 224: 1 row, (597 - 448 + 223) // 224 + 1 = 2 columns, the last clamped to 149
    assert ev.sliding_windows(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    # an image smaller than the crop: one window, the whole image
    assert ev.sliding_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]
    # Cityscapes under B: 560 x 1120, crop 224, stride 112 -> 4 x 9 windows, last ones clamped to the border
    w = ev.sliding_windows(560, 1120, 224, 112)
    assert len(w) == 4 * 9
    assert w[3] == (0, 224, 336, 560) and w[-1] == (336, 560, 896, 1120)
    assert sorted({y1 for y1, _, _, _ in w}) == [0, 112, 224, 336]
    # odd size: 336 x 505 -> columns start at 0, 112, 224, 281 (505 - 224)
    assert sorted({x1 for _, _, x1, _ in ev.sliding_windows(336, 505, 224, 112)}) == [0, 112, 224, 281]
    cover = np.zeros((336, 505), int)
    for y1, y2, x1, x2 in ev.sliding_windows(336, 505, 224, 112):
        assert y2 - y1 == 224 and x2 - x1 == 224
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


# ------------------------------------------------------------------ prediction rules
def test_calibration_scores_the_classes_its_split_holds_not_a_stray_pixel_of_an_absent_one():
    # 3 classes; the split never shows class 2. The object (class 1, 4 pixels) scores 0.5 on two pixels and 0.3 on
    # two; one background pixel scores 0.25 for class 2. Threshold 0.2 finds the whole object and names the stray
    # pixel class 2; threshold 0.4 finds half the object and no stray pixel.
    label = np.zeros((4, 4), np.uint8)
    label[:2, :2] = 1
    scores = torch.full((3, 4, 4), -1.0)
    scores[1, 0, :2], scores[1, 1, :2] = 0.5, 0.3
    scores[2, 3, 3] = 0.25
    scored = [(scores, label)]
    low, high = ev.score_thresholds(scored, 3, 0.2), ev.score_thresholds(scored, 3, 0.4)
    assert low.miou() == pytest.approx((11 / 12 + 1 + 0) / 3)  # the absent class enters at IoU 0 for one pixel
    assert high.miou() == pytest.approx((12 / 14 + 2 / 4) / 2)  # ... and not at all when never predicted
    assert low.miou_present() == pytest.approx((11 / 12 + 1) / 2) and high.miou_present() == pytest.approx(high.miou())
    best, sweep = ev.calibrate_threshold(scored, 3, grid=[0.2, 0.4])
    assert best == 0.2 and sweep == pytest.approx({0.2: (11 / 12 + 1) / 2, 0.4: (12 / 14 + 2 / 4) / 2})
    # on a split that holds every class, the two means agree
    label[3, 3] = 2
    assert ev.score_thresholds(scored, 3, 0.2).miou_present() == pytest.approx(ev.score_thresholds(scored, 3, 0.2).miou())


def test_rule_b_softmax_over_names_aliases_max_prob_and_area_thresholds():
    # 3 classes (0 background with two names), 4 names; a 1 x 4 image
    owner = torch.tensor([0, 0, 1, 2])
    s = torch.tensor([[0.9, 0.1, 0.1, 0.1],   # background name 1
                      [0.1, 0.1, 0.1, 0.1],   # background name 2
                      [0.1, 0.9, 0.5, 0.1],   # class 1
                      [0.1, 0.1, 0.5, 0.2]])[:, None, :]  # class 2
    p = ev.Protocol("B", rule="softmax", logit_scale=10.0, prob_thd=0.0)
    assert ev.runner.decide(s, owner, 3, p, True, None).tolist() == [[0, 1, 1, 2]]  # tie at pixel 2: first wins
    p.prob_thd = 0.48  # pixel 3's best probability is e^2 / (3e + e^2) = 0.475; pixel 2's is 0.491
    assert ev.runner.decide(s, owner, 3, p, True, None).tolist() == [[0, 1, 1, 0]]
    p.prob_thd, p.area_thd = 0.0, 0.4  # class 2 covers 1/3 of the foreground pixels: dropped
    assert ev.runner.decide(s, owner, 3, p, True, None)[0, 3] != 2


def test_rule_a_constant_background_channel():
    owner = torch.tensor([1, 2, 2])
    s = torch.tensor([[0.2, 0.6, 0.3], [0.1, 0.2, 0.7], [0.3, 0.1, 0.1]])[:, None, :]
    p = ev.Protocol("A")
    assert ev.runner.decide(s, owner, 3, p, True, 0.5).tolist() == [[0, 1, 2]]
    assert ev.runner.decide(s, owner, 3, p, True, None).tolist() == [[2, 1, 2]]


def test_pamr_pulls_scores_onto_image_edges():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1.0  # two flat halves
    truth = torch.zeros(32, 32, dtype=torch.long)
    truth[:, 16:] = 1
    torch.manual_seed(0)
    scores = torch.stack([(truth == 0).float(), (truth == 1).float()])[None] + 0.9 * torch.randn(1, 2, 32, 32)
    before = (scores[0].argmax(0) == truth).float().mean()
    after = (ev.pamr(image, scores)[0].argmax(0) == truth).float().mean()
    assert before < 0.85 and after > 0.98


# ------------------------------------------------------------------ the 8 layouts
def _jpg(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def make_layout(name: str, root: Path, n_images: int = 2) -> Path:
    """A miniature dataset in the standard layout of ``name`` (random images and labels)."""
    rng = np.random.default_rng(1)
    h, w = 24, 36
    if name.startswith("voc"):
        base = root / "VOCdevkit" / "VOC2012"
        ids = [f"2007_00{i}" for i in range(n_images)]
        (base / "ImageSets/Segmentation").mkdir(parents=True)
        (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
        for i, key in enumerate(ids):
            _jpg(base / f"JPEGImages/{key}.jpg", h, w, i)
            label = rng.integers(0, 21, (h, w))
            label[0] = 255
            _png(base / f"SegmentationClass/{key}.png", label)
    elif name.startswith("context"):
        base = root / "VOC2010"
        ids = [f"2008_00{i}" for i in range(n_images)]
        (base / "ImageSets/SegmentationContext").mkdir(parents=True)
        (base / "ImageSets/SegmentationContext/val.txt").write_text("\n".join(ids))
        for i, key in enumerate(ids):
            _jpg(base / f"JPEGImages/{key}.jpg", h, w, i)
            _png(base / f"SegmentationClassContext/{key}.png", rng.integers(0, 60, (h, w)))
    elif name in ("coco_stuff", "coco_object"):
        base = root / "coco_stuff164k"
        for i in range(n_images):
            key = f"00000000{i}"
            _jpg(base / f"images/val2017/{key}.jpg", h, w, i)
            label = rng.integers(0, 171, (h, w))
            label[:2] = 255
            _png(base / f"annotations/val2017/{key}_labelTrainIds.png", label)
    elif name == "cityscapes":
        base = root / "cityscapes"
        for i in range(n_images):
            stem = f"frankfurt_000000_00{i}"
            _jpg(base / f"leftImg8bit/val/frankfurt/{stem}_leftImg8bit.png", 16, 32, i)
            _png(base / f"gtFine/val/frankfurt/{stem}_gtFine_labelIds.png", rng.integers(0, 34, (16, 32)))
    elif name == "ade20k":
        base = root / "ADEChallengeData2016"
        for i in range(n_images):
            _jpg(base / f"images/validation/ADE_val_0000000{i}.jpg", h, w, i)
            _png(base / f"annotations/validation/ADE_val_0000000{i}.png", rng.integers(0, 151, (h, w)))
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from vilseg import create_model
    from vilseg.inference import ReadOut

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    create_model("vilseg-tiny").save_pretrained(folder)
    ReadOut("clusters", "pool", threshold=0.1).save(folder)
    return folder


@pytest.mark.parametrize("dataset", ["voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff",
                                     "cityscapes", "ade20k"])
def test_vilseg_eval_reports_on_each_layout_under_both_presets(dataset, tiny_model, tmp_path, capsys):
    root = make_layout(dataset, tmp_path / "data")
    loaded = ev.load_dataset(dataset, root)
    n_classes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
                 "cityscapes": 19, "ade20k": 150}[dataset]
    assert len(loaded.classes) == n_classes and len(loaded) == 2
    for protocol in ("A", "B"):
        out = tmp_path / f"{protocol}.json"
        code = cli(["eval", "--model", str(tiny_model), "--dataset", dataset, "--root", str(root), "--protocol",
                    protocol, "--out", str(out)])
        assert code == 0
        report = json.loads(out.read_text())
        assert report["dataset"] == dataset and report["images"] == 2 and report["skipped"] == 0
        assert len(report["per_class"]) == n_classes and 0 <= report["miou"] <= 100
        settings = report["protocol"]
        assert settings["name"] == protocol
        if protocol == "A":
            assert (settings["short"], settings["crop"], settings["stride"]) == (448, 448, 224)
            assert len(settings["templates"]) == 9 and settings["rule"] == "argmax"
        else:
            short = {"coco_stuff": 448, "cityscapes": 560}.get(dataset, 336)
            assert (settings["short"], settings["crop"], settings["stride"]) == (short, 224, 112)
            assert len(settings["templates"]) == 80 and settings["rule"] == "softmax"
        assert "| **mIoU** |" in capsys.readouterr().out


def test_label_handling_of_coco_object_and_cityscapes(tmp_path):
    root = make_layout("coco_object", tmp_path / "coco")
    ds = ev.load_dataset("coco_object", root)
    raw = np.array(Image.open(ds.items[0].label))
    label = ds.label(ds.items[0])
    assert np.array_equal(label, np.where(raw < 80, raw + 1, 0))  # stuff and unlabeled (255) are background
    assert ev.convert_coco_object(root) == 2  # the converter writes instanceTrainIds, which are then read
    ds2 = ev.load_dataset("coco_object", root)
    assert ds2.label_kind == "coco_object" and np.array_equal(ds2.label(ds2.items[0]), label)
    city = ev.load_dataset("cityscapes", make_layout("cityscapes", tmp_path / "city"))
    raw = np.array(Image.open(city.items[0].label))
    label = city.label(city.items[0])
    assert np.all(label[raw == 7] == 0) and np.all(label[raw == 33] == 18) and np.all(label[raw == 0] == 255)
    voc20 = ev.load_dataset("voc20", make_layout("voc20", tmp_path / "voc"))
    assert voc20.names("A")[0] == ["aeroplane"] and voc20.names("B")[19][0] == "television monitor"
    voc21 = ev.load_dataset("voc21", tmp_path / "voc")
    assert voc21.names("A")[0] == []  # protocol A does not query "background"
    assert "sky" in voc21.names("B")[0] and len(voc21.names("B")[15]) == 7  # person's seven names


def test_predictions_folder_is_scored_and_bad_input_is_named(tiny_model, tmp_path, capsys):
    root = make_layout("ade20k", tmp_path / "data")
    ds = ev.load_dataset("ade20k", root)
    preds = tmp_path / "preds"
    for item in ds.items:  # perfect predictions (ignored pixels predicted as class 0)
        _png(preds / f"{item.id}.png", np.where(ds.label(item) == 255, 0, ds.label(item)))
    out = tmp_path / "pred.json"
    assert cli(["eval", "--predictions", str(preds), "--dataset", "ade20k", "--root", str(root),
                "--out", str(out)]) == 0
    assert json.loads(out.read_text())["miou"] == 100.0
    # a missing dataset folder shows the expected layout
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "voc21", "--root", str(tmp_path / "nothing"),
                "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "SegmentationClass/<id>.png" in err and "Traceback" not in err
    # a corrupt image: skipped and counted (exit 1), or stop with one line naming it (exit 2)
    bad = ds.items[0].image
    bad.write_bytes(b"not a jpeg")
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "ade20k", "--root", str(root), "--protocol", "B",
                "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["skipped"] == 1 and report["images"] == 1 and str(bad) in report["skipped_files"][0]["error"]
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "ade20k", "--root", str(root), "--on-error", "stop",
                "--out", str(tmp_path / "stop.json")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "stop.json").exists() and json.loads(out.read_text())["skipped"] == 1  # nothing lost
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "ade20k", "--root", str(root), "--set", "bogus=1",
                "--out", str(out)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_missing_and_mis_sized_predictions_fail_and_never_score_a_subset(tmp_path, capsys):
    root = make_layout("voc20", tmp_path / "voc", n_images=3)
    ds = ev.load_dataset("voc21", root)
    preds = tmp_path / "preds"
    truths = [ds.label(item) for item in ds.items]
    for item, label in zip(ds.items, truths):
        _png(preds / f"{item.id}.png", np.where(label == 255, 0, label))
    first, second, third = ds.items
    (preds / f"{second.id}.png").unlink()  # missing
    _png(preds / f"{third.id}.png", np.zeros((truths[2].shape[0] // 2, truths[2].shape[1] // 2), np.uint8))  # half
    out = tmp_path / "r.json"
    args = ["eval", "--predictions", str(preds), "--dataset", "voc21", "--root", str(root), "--out", str(out)]
    assert cli(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "2 of 3 predictions are missing or unusable" in lines[0] and "--missing background" in lines[0]
    assert any(f"{second.id}.png: no prediction" in line for line in lines)
    assert any(f"{third.id}.png: prediction is" in line and "its ground truth" in line for line in lines)
    assert "mIoU" not in captured.out and "Traceback" not in captured.err and not out.exists()
    # a missing prediction scored as all background, on request: the whole split, and the report says which
    _png(preds / f"{third.id}.png", np.where(truths[2] == 255, 0, truths[2]))
    assert cli([*args, "--missing", "background"]) == 0
    report = json.loads(out.read_text())
    assert report["missing_predictions"] == [second.id] and report["images"] == 3 and report["miou"] < 100
    assert "1 missing prediction(s) scored as all background" in capsys.readouterr().out
    # without a background class there is nothing to score a missing prediction as
    with pytest.raises(ev.PredictionsError, match="no background class"):
        ev.score_predictions(preds, ev.load_dataset("voc20", root), missing="background")


def test_a_report_over_a_subset_says_so():
    report = {"miou": 50.0, "images": 2, "skipped": 1, "limit": None, "split_images": 3}
    assert "a SUBSET: 2 of 3 images" in ev.coverage(report)
    assert "over all 3 images" in ev.coverage({**report, "images": 3, "skipped": 0})
    assert "SUBSET, the first of the split's 10 images" in ev.coverage(
        {**report, "images": 3, "skipped": 0, "limit": 3, "split_images": 10})


def test_synthetic_split_agrees_with_the_segmenter_read_out(tiny_model, tmp_path, capsys):
    """The demo, `vilseg eval` and the Segmenter use one read-out path: equal numbers on the synthetic split."""
    from data_prep import synthetic
    from vilseg.inference import Segmenter

    split = tmp_path / "eval"
    synthetic.write_eval_split(split, n=6, image_size=32, seed=3)
    out = tmp_path / "syn.json"
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "synthetic", "--root", str(split),
                "--protocol", "A", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    seg = Segmenter.from_pretrained(tiny_model)
    ds = ev.load_dataset("synthetic", split)
    seg.set_vocabulary(ds.classes[1:])
    acc = ev.IoUAccumulator(len(ds.classes))
    for item in ds.items:
        scores, _ = seg.score_maps(item.image)
        best, idx = scores.max(0)
        acc.update(torch.where(best > seg.readout.threshold, idx + 1, 0).numpy(), ds.label(item))
    assert report["protocol"]["bg_threshold"] == seg.readout.threshold
    assert abs(report["miou"] - 100 * acc.miou()) < 1e-9
    # protocol B on the same split runs too (its own rule). The synthetic world's names have no background name, so
    # B's background comes only from prob_thd: at 0 no pixel can be background, and the report says why it scores 0
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "synthetic", "--root", str(split),
                "--protocol", "B", "--set", "prob_thd=0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["per_class"]["background"] == 0
    assert len(report["notes"]) == 1 and "prob_thd 0.0" in report["notes"][0] \
        and "none for synthetic" in report["notes"][0]
    assert "note: background IoU is 0" in capsys.readouterr().out
    # a prob_thd above every probability makes every pixel background: nothing to explain
    assert cli(["eval", "--model", str(tiny_model), "--dataset", "synthetic", "--root", str(split),
                "--protocol", "B", "--set", "prob_thd=1.01", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["notes"] == []


def test_probes_run_on_voc_instances_with_a_bare_timm_encoder_and_on_synthetic_with_a_vilseg_model(
        tiny_model, tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    for i, key in enumerate("ab"):
        _jpg(root / f"JPEGImages/{key}.jpg", 48, 64, i)
        label = np.zeros((48, 64), np.uint8)
        objects = np.zeros((48, 64), np.uint8)
        label[4:20, 4:30], objects[4:20, 4:30] = 15, 1  # two people side by side: one class, two instances
        label[4:20, 30:60], objects[4:20, 30:60] = 15, 2
        label[30:46, 10:40], objects[30:46, 10:40] = 8, 3
        objects[20, :] = 255
        _png(root / f"SegmentationClass/{key}.png", label)
        _png(root / f"SegmentationObject/{key}.png", objects)
    ds = ev.load_dataset("voc21", root)
    masks = ev.instance_masks(ds.label(ds.items[0]), instances=ds.instances(ds.items[0]))
    assert sorted(c for c, _ in masks) == [8, 15, 15]  # connected components alone would merge the two people
    out = tmp_path / "probe"
    assert cli(["probe", "--timm", "vit_tiny_patch16_224", "--dataset", "voc21", "--root", str(root),
                "--size", "32", "--out", str(out)]) == 0
    report = json.loads((out / "probes.json").read_text())
    assert report["prompt_patch"]["objects"] == 6 and (out / "intra_inter.png").is_file()
    assert cli(["probe", "--timm", "vit_tiny_patch16_224", "--dataset", "voc21", "--root", str(root),
                "--size", "32", "--limit", "1", "--out", str(out)]) == 0  # the first image only: its 3 objects
    report = json.loads((out / "probes.json").read_text())
    assert report["prompt_patch"]["objects"] == 3 and report["dataset"]["images"] == 1
    from data_prep import synthetic

    synthetic.write_eval_split(tmp_path / "syn", n=4, image_size=32, seed=2)
    assert cli(["probe", "--model", str(tiny_model), "--root", str(tmp_path / "syn"), "--out", str(out)]) == 0
    assert "linear_probe" in json.loads((out / "probes.json").read_text())


def test_two_processes_give_the_report_of_one(tiny_model, tmp_path):
    """`accelerate launch` splits the images between processes and sums the histograms (gloo on the CPU: `--multi_gpu`
    with CUDA hidden starts two processes that form a gloo group)."""
    import os
    import subprocess
    import sys

    from data_prep import synthetic

    synthetic.write_eval_split(tmp_path / "syn", n=7, image_size=32, seed=3)
    args = ["eval", "--model", str(tiny_model), "--dataset", "synthetic", "--root", str(tmp_path / "syn")]
    assert cli([*args, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vilseg.cli",
                    *args, "--out", str(tmp_path / "two.json")], check=True, capture_output=True, timeout=300,
                   env=env)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["images"] == one["images"] == 7
    assert two["miou"] == one["miou"] and two["per_class"] == one["per_class"]
