"""A run folder belongs to one run: a second run into it is refused before anything is written, ``--overwrite``
clears the earlier run (stale checkpoints included), and ``--resume`` refuses a checkpoint of other settings."""
import hashlib
from pathlib import Path

import pytest

from vilseg import train
from vilseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_prep import synthetic

    out = tmp_path_factory.mktemp("shards")
    synthetic.main(["--out", str(out), "--train", "48", "--eval", "2", "--calib", "0", "--per-shard", "24",
                    "--image-size", "32"])
    return str(out / "train-{000000..000001}.tar")


def _args(run_dir, shards, *extra):
    return ["--config", str(REPO / "configs/debug.yaml"), f"run.dir={run_dir}", f"data.shards={shards}",
            "data.global_size=32", "train.checkpoint_every=1", "train.keep_checkpoints=10", *extra]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_into_a_used_run_dir_is_refused_and_leaves_the_first_untouched(tmp_path, shards):
    run = tmp_path / "run"
    train.main(_args(run, shards, "train.steps=3"))
    before = _tree(run)
    with pytest.raises(ConfigError, match=r"run.dir .*run already holds a run \(config.yaml, checkpoints, final.*"
                                          r"--resume.*run.dir=NEW_FOLDER"):
        train.main(_args(run, shards, "train.steps=2", "optim.lr=0.002"))
    assert _tree(run) == before  # every file of the first run, byte for byte, and nothing new


def test_overwrite_clears_the_earlier_runs_stale_checkpoints(tmp_path, shards, capsys):
    run = tmp_path / "run"
    train.main(_args(run, shards, "train.steps=3"))
    (run / "notes.txt").write_text("mine")  # not a run's file: --overwrite leaves it
    train.main(_args(run, shards, "train.steps=2", "--overwrite"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert (run / "notes.txt").read_text() == "mine"
    assert "--overwrite: removed config.yaml, checkpoints, final" in capsys.readouterr().out


def test_resume_of_a_run_with_other_settings_is_refused_naming_the_keys(tmp_path, shards):
    run = tmp_path / "run"
    train.main(_args(run, shards, "train.steps=2"))
    before = _tree(run)
    with pytest.raises(ConfigError, match=r"--resume: .*config.yaml was trained with other settings in "
                                          r"optim.lr \(e.g. optim.lr: 0.001 there, 0.002 now\)"):
        train.main(_args(run, shards, "train.steps=4", "optim.lr=0.002", "--resume"))
    assert _tree(run) == before
    # the step count is what a resume may change; it continues from the earlier run's last checkpoint
    train.main(_args(run, shards, "train.steps=3", "--resume"))
    assert (run / "checkpoints" / "step_0000003").is_dir()


def test_resume_and_overwrite_together_are_refused(tmp_path, shards):
    with pytest.raises(ConfigError, match="give one of them"):
        train.main(_args(tmp_path / "run", shards, "train.steps=1", "--resume", "--overwrite"))


def test_vilseg_train_refuses_a_used_run_dir_in_one_line_before_launching(tmp_path, shards):
    import subprocess
    import sys

    run = tmp_path / "run"
    train.main(_args(run, shards, "train.steps=1"))
    proc = subprocess.run([sys.executable, "-m", "vilseg.cli", "train", *_args(run, shards, "train.steps=2")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--resume" in lines[0], proc.stderr
