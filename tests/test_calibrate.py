"""vilseg calibrate: the demo's read-out and threshold search on any labelled split, saved beside the model as
readout.json, which `vilseg segment` then uses; a model without one says so, once."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vilseg.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug ViL-Seg model trained 3 steps on synthetic shards, and a synthetic calibration split."""
    from data_prep import synthetic
    from vilseg import train

    root = tmp_path_factory.mktemp("cal")
    synthetic.main(["--out", str(root / "data"), "--train", "32", "--eval", "2", "--calib", "6", "--per-shard", "16",
                    "--image-size", "32"])
    final = train.main(["--config", str(REPO / "configs/debug.yaml"), f"run.dir={root / 'run'}",
                        f"data.shards={root / 'data' / 'train-{000000..000001}.tar'}", "data.global_size=32",
                        "train.steps=3"])
    return final, root / "data" / "calib"


def test_calibrate_writes_readout_json_that_segment_then_uses(trained, tmp_path, capsys):
    final, calib = trained
    assert not (final / "readout.json").exists()
    photo = tmp_path / "photo.png"
    Image.open(next(calib.glob("images/*.png"))).save(photo)
    # without readout.json: segment says so once, naming the read-out and threshold it uses
    assert cli(["segment", str(photo), "--model", str(final), "--classes", "red circle,blue square",
                "--out", str(tmp_path / "before")]) == 0
    err = capsys.readouterr().err
    assert err.count("has no readout.json") == 1 and "clusters+reencode_global, background threshold 0.3" in err
    assert cli(["calibrate", "--model", str(final), "--dataset", "synthetic", "--root", str(calib), "--limit", "4",
                "--out", str(tmp_path / "cal.json")]) == 0
    saved = json.loads((final / "readout.json").read_text())
    report = json.loads((tmp_path / "cal.json").read_text())
    assert saved["calibration"]["images"] == 4 and saved["calibration"]["dataset"] == "synthetic"
    # the chosen read-out records the centring reference its naming was scored against
    assert saved["reference"] == ("captions" if saved["naming"] == "reencode_global" else "prompt")
    assert set(report["sweeps"]) == set(saved["calibration"]["candidates"])
    # the saved threshold is the best of the chosen read-out's sweep, in percent
    sweep = report["sweeps"][report["readout"]]
    assert saved["threshold"] == float(max(sweep, key=sweep.get)) and max(sweep.values()) == saved["calibration"]["miou"]
    capsys.readouterr()
    assert cli(["segment", str(photo), "--model", str(final), "--classes", "red circle,blue square",
                "--out", str(tmp_path / "after")]) == 0
    assert "has no readout.json" not in capsys.readouterr().err
    stats = json.loads((tmp_path / "after" / "segment_stats.json").read_text())
    assert stats["threshold"] == saved["threshold"] and stats["readout"] == report["readout"]
    # --threshold and --naming override the saved read-out
    assert cli(["segment", str(photo), "--model", str(final), "--classes", "red circle", "--threshold", "0.11",
                "--naming", "pool", "--out", str(tmp_path / "override")]) == 0
    stats = json.loads((tmp_path / "override" / "segment_stats.json").read_text())
    assert stats["threshold"] == 0.11 and stats["readout"] == "clusters+pool"
    assert stats["reference"] == "prompt"  # pooling's own reference, whichever the saved read-out named


def test_calibrate_offers_only_datasets_with_a_background_class(trained, tmp_path):
    final, _ = trained
    proc = subprocess.run([sys.executable, "-m", "vilseg.cli", "calibrate", "--model", str(final), "--dataset",
                           "ade20k", "--root", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'ade20k'" in proc.stderr


def test_a_reference_given_to_calibrate_is_the_one_it_scores_and_records(trained):
    from vilseg.eval import load_dataset
    from vilseg.eval.calibrate import calibrate
    from vilseg.models import ViLSeg

    final, calib = trained
    model, split = ViLSeg.from_pretrained(final), load_dataset("synthetic", calib)
    own, own_sweeps = calibrate(model, split, naming="pool", limit=3)
    given, given_sweeps = calibrate(model, split, naming="pool", limit=3, reference="captions")
    assert own.reference == "prompt" and given.reference == "captions"
    assert own_sweeps != given_sweeps  # the candidates were scored against the given reference
