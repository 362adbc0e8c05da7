"""MMC's probes and the linear probe on hand-made splits whose answers are known, and the recipes' CSV rows."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vilseg.eval import instance_masks, intra_inter_similarity, linear_probe, object_features, prompt_patch_segmentation
from vilseg.eval.probes import _auc


def _harness():
    """benchmarks/recipes.py (the harness lives outside the library; benchmarks/ is not a package), loaded as a
    module by its path."""
    import importlib.util

    if "vilseg_recipes" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "vilseg_recipes", Path(__file__).resolve().parents[1] / "benchmarks" / "recipes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["vilseg_recipes"] = module
        spec.loader.exec_module(module)
    return sys.modules["vilseg_recipes"]


def _split(tmp_path, n=4):
    """n 32x32 images, each with two objects of class 1 (left, a 16x8 bar) and 2 (right, an 8x8 square) on a
    background; the second image repeats class 1 twice."""
    items = []
    for i in range(n):
        label = np.zeros((32, 32), np.uint8)
        label[8:24, 0:8] = 1
        label[0:8, 16:24] = 2 if i != 1 else 1
        image = np.stack([label * 100] * 3, -1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        Image.fromarray(label).save(tmp_path / f"{i}_m.png")
        items.append((str(i), tmp_path / f"{i}.png", tmp_path / f"{i}_m.png"))
    return items


def _oracle(image):
    """Features that know the objects: one axis per object position, background on its own axis (8 px patches)."""
    label = np.asarray(image)[..., 0] // 100
    grid = torch.zeros(3, 4, 4)
    grid[0] = 1
    for y in range(4):
        for x in range(4):
            block = label[8 * y:8 * y + 8, 8 * x:8 * x + 8]
            if block.max() and x < 2:
                grid[:, y, x] = torch.tensor([0.0, 1.0, 0.0])
            elif block.max():
                grid[:, y, x] = torch.tensor([0.0, 0.0, 1.0])
    return grid


def test_instance_masks_split_objects_of_one_class():
    label = np.zeros((10, 10), np.uint8)
    label[0:3, 0:3] = 4
    label[6:10, 6:10] = 4
    label[0:5, 6:10] = 2
    label[9, 0] = 4  # too small: dropped
    label[5, 0] = 255  # ignored
    objects = instance_masks(label, min_pixels=2)
    assert sorted((c, int(m.sum())) for c, m in objects) == [(2, 20), (4, 9), (4, 16)]


def test_prompt_patch_segmentation_is_perfect_with_oracle_features_and_poor_with_noise(tmp_path):
    items = _split(tmp_path)
    good = prompt_patch_segmentation(_oracle, items)
    assert good["objects"] == 8
    # bilinear upsampling of a one-patch-wide map rounds the objects' corners: about 86, not 100
    assert good["centroid"]["best_miou"] > 80 and good["random"]["best_miou"] > 80
    assert good["centroid"]["oracle_miou"] >= good["centroid"]["best_miou"]
    noise = prompt_patch_segmentation(lambda im: F.normalize(torch.randn(16, 4, 4), dim=0), items)
    assert noise["centroid"]["best_miou"] < 60


def test_intra_inter_similarity_separates_oracle_features_and_writes_a_plot(tmp_path):
    items = _split(tmp_path)
    out = intra_inter_similarity(_oracle, items, plot=str(tmp_path / "hist.png"))
    # image 1's two class-1 objects are separate objects, but the oracle gives them different axes anyway
    assert out["overlap"] == pytest.approx(0.0) and out["auc"] == pytest.approx(1.0)
    assert out["intra_mean"] == pytest.approx(1.0) and out["inter_mean"] == pytest.approx(0.0)
    assert Image.open(tmp_path / "hist.png").size[0] > 200
    same = intra_inter_similarity(lambda im: torch.ones(3, 4, 4) / 3 ** 0.5, items)
    assert same["overlap"] == pytest.approx(100.0) and same["auc"] == pytest.approx(0.5)


def test_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 50).round(1)  # rounding makes ties
    naive = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert _auc(pos, neg) == pytest.approx(naive)


def test_linear_probe_reads_a_linear_attribute_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    groups = np.arange(400) // 2
    x = rng.normal(0, 1, (400, 16))
    x[:, :4] += 5 * np.eye(4)[y]  # the class is linearly readable from 4 dimensions
    assert linear_probe(x, y, groups) > 95
    assert linear_probe(rng.normal(0, 1, (400, 16)), y, groups) < 40  # chance is 25


def test_object_features_pool_each_object(tmp_path):
    items = _split(tmp_path)
    x, y, groups = object_features(_oracle, items)
    assert x.shape == (8, 3) and sorted(y.tolist()) == [1, 1, 1, 1, 1, 2, 2, 2] and groups.tolist() == [
        0, 0, 1, 1, 2, 2, 3, 3]
    # each object pools to its own axis exactly: four on the left axis, four on the right one
    assert sorted(map(tuple, x.round(6).tolist())) == [(0.0, 0.0, 1.0)] * 4 + [(0.0, 1.0, 0.0)] * 4


def test_recipe_rows_replace_their_seed_and_summarize(tmp_path):
    harness = _harness()
    BACKBONE_COLUMNS, append_row, summarize = harness.BACKBONE_COLUMNS, harness.append_row, harness.summarize

    path = tmp_path / "b.csv"
    row = {c: 1.0 for c in BACKBONE_COLUMNS} | {"recipe": "scratch", "seed": 0, "measured_with": harness.LEGACY}
    append_row(path, BACKBONE_COLUMNS, row)
    append_row(path, BACKBONE_COLUMNS, row | {"seed": 1, "miou_seen": 3.0, "measured_with": harness.MEASURED})
    append_row(path, BACKBONE_COLUMNS, row | {"seed": 0, "miou_seen": 5.0, "measured_with": harness.MEASURED})  # re-run
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert [(r["seed"], r["miou_seen"]) for r in table] == [("0", "5.00"), ("1", "3.00")]  # sorted by seed
    assert f"| scratch | {harness.MEASURED} | 2 | **4.0** (3.0-5.0) |" in summarize(path)
    # rows measured another way are never averaged with today's
    append_row(path, BACKBONE_COLUMNS, row | {"seed": 2, "miou_seen": 9.0})
    assert f"| scratch | {harness.LEGACY} | 1 | 9.0 |" in summarize(path)


def test_the_yardstick_reads_each_seed_as_its_calibration_keeps_it(tmp_path):
    harness = _harness()
    columns, append_row = harness.BACKBONE_COLUMNS, harness.append_row
    path = tmp_path / "b.csv"
    append_row(path, columns, {"recipe": "oracle", "seed": 0, "miou_seen": 50.0, "miou_heldout_combo": 20.0,
                               "measured_with": harness.SUPERVISED})
    base = {"recipe": "xm", "miou_seen": 10.0, "miou_heldout_combo": 4.0, "miou_synonym": 1.0, "miou_seen_pool": 30.0,
            "miou_heldout_combo_pool": 12.0, "miou_synonym_pool": 3.0, "synonym_ceiling": 40.0,
            "measured_with": harness.MEASURED}
    append_row(path, columns, base | {"seed": 0, "calibrated_readout": "reencode_global"})
    append_row(path, columns, base | {"seed": 1, "calibrated_readout": "pool"})
    line = next(x for x in harness.yardstick(path).splitlines() if x.startswith("| xm |"))
    # seed 0 re-encoded (10, 4, 1), seed 1 pooled (30, 12, 3): means 20, 8, 2, against the oracle's 50 and 20
    assert line == "| xm | 2 | 1/1 | 20.0 (10.0-30.0) | 8.0 (4.0-12.0) | 2.0 (1.0-3.0) (40) | 40% | 40% | 40% |"
    assert "calibrated_readout" in harness.summarize(path) and "reencode_global 1, pool 1" in harness.summarize(path)


def test_the_yardstick_at_a_budget_reads_that_budget_against_its_own_oracle(tmp_path):
    harness = _harness()
    columns, append_row = harness.SCALING_COLUMNS, harness.append_row
    path, key = tmp_path / "scaling.csv", ("recipe", "seed", "budget")
    for budget, oracle_seen, seen in ((600, 50.0, 10.0), (2400, 80.0, 40.0)):
        append_row(path, columns, {"recipe": "oracle", "seed": 0, "budget": budget, "miou_seen": oracle_seen,
                                   "miou_heldout_combo": 40.0, "measured_with": harness.SUPERVISED}, key=key)
        append_row(path, columns, {"recipe": "xm", "seed": 0, "budget": budget, "miou_seen": 1.0,
                                   "miou_heldout_combo": 1.0, "miou_seen_pool": seen, "miou_heldout_combo_pool": 20.0,
                                   "miou_synonym": 0.0, "miou_synonym_pool": 2.0, "synonym_ceiling": 50.0,
                                   "measured_with": harness.MEASURED, "calibrated_readout": "pool"}, key=key)
    line = next(x for x in harness.yardstick(path, budget=2400).splitlines() if x.startswith("| xm |"))
    assert line == "| xm | 1 | 1/0 | 40.0 | 20.0 | 2.0 (50) | 50% | 50% | 50% |"  # 40 of the 4x oracle's 80
    line = next(x for x in harness.yardstick(path, budget=600).splitlines() if x.startswith("| xm |"))
    assert line.split(" | ")[3:7] == ["10.0", "20.0", "2.0 (50)", "20%"]


def test_a_row_written_by_an_older_harness_keeps_the_newer_columns(tmp_path):
    harness = _harness()
    path, new_columns = tmp_path / "s.csv", ["recipe", "seed", "miou_seen", "calibrated_readout"]
    harness.append_row(path, new_columns, {"recipe": "xm", "seed": 0, "miou_seen": 1.0, "calibrated_readout": "pool"})
    harness.append_row(path, new_columns[:3], {"recipe": "xm", "seed": 1, "miou_seen": 2.0})  # the older writer
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["calibrated_readout"] for r in rows] == ["pool", ""] and [r["miou_seen"] for r in rows] == ["1.00", "2.00"]


def test_stage_names_keep_two_methods_configs_of_one_file_name_apart():
    RECIPES, stage_name = _harness().RECIPES, _harness().stage_name

    assert stage_name("configs/demo.yaml") == "demo"
    assert stage_name("configs/mmc/pretrain-demo.yaml") != stage_name("configs/maskco/pretrain-demo.yaml")
    chains = {"+".join(stage_name(c) for c in stages) for stages in RECIPES.values()}
    assert len(chains) == len(RECIPES)  # no two recipes train (and reuse) the same stages


def test_a_stage_folder_trained_with_another_config_is_refused(tmp_path):
    from vilseg.training.config import load_config, save_config, validate_training_config
    harness = _harness()
    check_stage_config, stage_steps = harness.check_stage_config, harness.stage_steps

    args = [f"run.dir={tmp_path}", "data.shards=x.tar", "run.seed=0", "train.steps=1200"]
    check_stage_config(tmp_path, "configs/demo.yaml", args)  # nothing trained there yet
    save_config(validate_training_config(load_config("configs/demo.yaml", args)), tmp_path / "config.yaml")
    check_stage_config(tmp_path, "configs/demo.yaml", args)  # the same settings: reused or resumed
    with pytest.raises(ValueError, match=r"train.steps: 1200 then, 600 now"):
        check_stage_config(tmp_path, "configs/demo.yaml", args[:3] + ["train.steps=600"])
    # how often it checkpointed, and its workers' priority, do not change what was trained: the stage is reused
    check_stage_config(tmp_path, "configs/demo.yaml", args + ["train.checkpoint_every=7", "data.worker_nice=3"])
    assert stage_steps("configs/demo.yaml train.steps=600", 2) == 1200
    assert stage_steps("configs/mmc/pretrain-demo.yaml", 4) == 800


def test_a_stage_with_its_own_overrides_is_named_and_sized_by_them():
    harness = _harness()
    spec = "configs/demo.yaml train.mixed_precision=bf16 train.steps=50"
    assert harness.split_stage(spec) == ("configs/demo.yaml", ["train.mixed_precision=bf16", "train.steps=50"])
    assert harness.stage_name(spec) == "demo{train.mixed_precision=bf16,train.steps=50}"
    assert harness.stage_steps(spec, 2) == 100
    assert harness.stage_name(harness.RECIPES["scratch_bf16"][0]) != harness.stage_name(harness.RECIPES["scratch"][0])


def test_stage_minutes_count_every_session_and_say_unknown_rather_than_guess():
    stage_minutes = _harness().stage_minutes
    one = {"steps": 600, "steps_this_session": 600, "seconds": 1200.0, "seconds_per_step_after_warmup": 1.9}
    assert stage_minutes({**one, "train_seconds_total": 1200.0}) == 20.0
    # resumed: the checkpoints' count holds the earlier sessions' time, which this session's seconds lack
    resumed = {"steps": 600, "steps_this_session": 100, "seconds": 200.0, "seconds_per_step_after_warmup": 2.0}
    assert stage_minutes({**resumed, "train_seconds_total": 1500.0}) == 25.0
    # resumed from a checkpoint older than the count: the whole stage at this session's pace...
    assert stage_minutes({**resumed, "train_seconds_total": None}) == 20.0
    # ...and unknown, not the export's minute, where the run resumed at its last step
    assert stage_minutes({"steps": 600, "steps_this_session": 0, "seconds": 0.0,
                          "seconds_per_step_after_warmup": None, "train_seconds_total": None}) is None
    assert stage_minutes({**one}) == 20.0  # a summary written before the count, one session
