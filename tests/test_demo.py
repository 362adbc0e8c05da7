"""The README's main job end to end, shrunk by the debug preset: shards -> training -> open-vocabulary evaluation."""
import json
from pathlib import Path

import pytest
from PIL import Image

from vilseg import demo

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_metrics_for_seen_and_held_out_queries_and_overlays(tmp_path, capsys):
    report = demo.main(["--config", str(REPO / "configs/debug.yaml"), "--data", str(tmp_path / "data"),
                        "--train-samples", "64", "--eval-samples", "6", "--overlays", "2",
                        "--out", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["seen_miou"] == report["seen_miou"] == metrics["canonical"]["seen_miou"]
    # held-out in its two parts (the results page's), and pooled as the README quotes it; all in percent
    held = [q["iou"] for q in metrics["per_query_iou"].values() if q["held_out"] and q["iou"] == q["iou"]]  # no NaN
    assert metrics["heldout_pooled_miou"] == pytest.approx(sum(held) / len(held))
    assert metrics["heldout_combo_miou"] == metrics["canonical"]["heldout_combo_miou"]
    synonyms = [v for k, v in metrics["synonym"]["per_class_iou"].items() if k != "background" and v == v]
    assert metrics["synonym_miou"] == pytest.approx(sum(synonyms) / len(synonyms))
    assert metrics["synonym_ceiling"] in [100 * k / 16 for k in range(17)]  # a share of 16 names, in percent
    assert all(0 <= v <= 100 for v in metrics["calibration_sweep"].values()) and \
        max(metrics["calibration_sweep"].values()) == pytest.approx(metrics["calibration"]["miou"])
    assert set(demo.ABOUT) - {"units"} <= set(metrics)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == demo.summary_line(metrics) and last.startswith(f"demo: seen {metrics['seen_miou']:.1f} mIoU, "
                                                                 f"held-out {metrics['heldout_pooled_miou']:.1f}")
    # the read-out is chosen on the calibration split among the candidates and saved with the model
    saved = json.loads((tmp_path / "out" / "train" / "final" / "readout.json").read_text())
    # the debug model has 2 blocks: masked attention in the last 2 is masked attention in "all"; it is tried once
    grid = {"clusters+pool", "clusters+masked_attention@1", "clusters+masked_attention@2", "clusters+reencode_global"}
    assert saved["threshold"] == metrics["bg_threshold"] and set(saved["calibration"]["candidates"]) == grid
    assert metrics["readout"] == demo.readout_key(saved["grouping"], saved["naming"], saved["blocks"]) in grid
    for vocab in ("canonical", "synonym"):
        assert len(metrics[vocab]["per_class_iou"]) == 17  # background + 16 colour-shape classes
    held = [q for q in metrics["per_query_iou"].values() if q["held_out"]]
    assert len(held) == 4 + 16  # held-out combinations by name + every class by synonym
    assert len(metrics["overlays"]) == 2 and Image.open(metrics["overlays"][0]).size[0] >= 256
    assert (tmp_path / "out" / "train" / "final" / "model.safetensors").is_file()
    table = demo.summarize([tmp_path / "out"])
    assert "| out |" in table
    # run again into the same --out: refused before anything is touched, the trained model byte for byte the same
    weights = (tmp_path / "out" / "train" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--config", str(REPO / "configs/debug.yaml"), "--data", str(tmp_path / "data"),
                   "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "already holds a trained run" in capsys.readouterr().err
    assert (tmp_path / "out" / "train" / "final" / "model.safetensors").read_bytes() == weights


def test_calibration_prefers_the_fastest_read_out_within_one_point_of_the_best():
    from vilseg.demo import CANDIDATES, parse_readout, prefer_fastest, readout_key

    assert CANDIDATES[0] == ("clusters", "pool", None)  # fastest first
    pool, masked1, masked2, masked_all, reencode = CANDIDATES
    assert prefer_fastest({pool: 25.4, reencode: 26.2}) == pool  # within 1 point: the fast one
    assert prefer_fastest({pool: 7.9, reencode: 26.2}) == reencode
    assert prefer_fastest({pool: 30.0, reencode: 26.2}) == pool
    # masked attention within a point of re-encoding wins over it, the shallowest such k first
    scores = {pool: 7.9, masked1: 20.0, masked2: 25.5, masked_all: 26.0, reencode: 26.2}
    assert prefer_fastest(scores) == masked2
    for candidate in CANDIDATES:
        assert parse_readout(readout_key(*candidate)) == candidate
