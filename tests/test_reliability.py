"""Nothing lost: crash-safe checkpoints and exports under SIGKILL, one save per step, one-pass streams."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vilseg import train

REPO = Path(__file__).resolve().parents[1]
# Every safetensors write first leaves a marker naming its file, then sleeps: the test kills the process while a
# checkpoint (or the export) is being written, at a moment it chooses.
RUNNER = """
import os, sys, time
from pathlib import Path
import safetensors.torch as st
real, markers = st.save_file, Path(os.environ["MARKERS"])
def slow_save_file(tensors, filename, metadata=None):
    n = len(list(markers.iterdir()))
    (markers / f"{n:04d}").write_text(str(filename))
    time.sleep(float(os.environ["SAVE_DELAY"]))
    return real(tensors, filename, metadata=metadata)
st.save_file = slow_save_file
from vilseg.train import main
main(sys.argv[1:])
"""


def _args(run_dir, *extra):
    return ["--config", str(REPO / "configs/debug.yaml"), f"run.dir={run_dir}", "data.shards=synthetic:200",
            "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2", *extra]


class Killer:
    def __init__(self, tmp_path):
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        (tmp_path / "runner.py").write_text(RUNNER)
        self.cmd = [sys.executable, str(tmp_path / "runner.py")]
        self.env = {**os.environ, "MARKERS": str(self.markers), "SAVE_DELAY": "0.4", "OMP_NUM_THREADS": "1"}

    def writes(self) -> list[str]:
        return [p.read_text() for p in sorted(self.markers.iterdir())]

    def run(self, args, kill_when=None, timeout=300):
        """Runs training; SIGKILLs it as soon as ``kill_when(writes)`` is true. Returns True if it was killed."""
        proc = subprocess.Popen([*self.cmd, *args], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        start = time.time()
        while proc.poll() is None and time.time() - start < timeout:
            if kill_when is not None and kill_when(self.writes()):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        out = proc.communicate()[0]
        assert proc.returncode == 0, out[-3000:]
        return False


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_ends_with_the_uninterrupted_parameters(tmp_path):
    killer, run = Killer(tmp_path), tmp_path / "run"
    killer.run(_args(tmp_path / "ref"))  # the uninterrupted run, in the same kind of process
    reference = tmp_path / "ref" / "final"
    for marker in killer.markers.iterdir():
        marker.unlink()
    during = lambda step: lambda w: any(f"step_{step:07d}" in f for f in w)  # noqa: E731
    # 1. during the very first checkpoint's write: nothing complete yet, so --resume starts over
    assert killer.run(_args(run), during(2))
    assert not (run / "checkpoints" / "step_0000002").exists()
    # 2. during step 4's checkpoint: resume must skip the half-written one and continue from step 2
    assert killer.run(_args(run, "--resume"), during(4))
    assert (run / "checkpoints" / "step_0000002" / "trainer_state.json").is_file()
    assert not (run / "checkpoints" / "step_0000004").exists()
    # 3. between two checkpoints: after step 4's checkpoint is complete, while steps 5-6 train
    assert killer.run(_args(run, "--resume"),
                      lambda w: (run / "checkpoints" / "step_0000004" / "trainer_state.json").is_file())
    # 4. during the export of the final model
    assert killer.run(_args(run, "--resume"), lambda w: any(".tmp-final" in f for f in w))
    assert not (run / "final").exists()
    # 5. to the end
    assert not killer.run(_args(run, "--resume"))
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]


def test_a_stop_on_a_checkpoint_step_saves_that_step_once(tmp_path, monkeypatch):
    saved = []
    real = train.save_checkpoint

    def counting(accelerator, run_dir, state, *args):
        saved.append(state.step)
        return real(accelerator, run_dir, state, *args)

    monkeypatch.setattr(train, "save_checkpoint", counting)
    train.main(_args(tmp_path / "r", "train.stop_at=4"))
    assert saved == [2, 4]
    train.main(_args(tmp_path / "r", "--resume"))
    assert saved == [2, 4, 6, 8]


def test_resume_skips_an_incomplete_checkpoint_and_says_so(tmp_path, capsys):
    train.main(_args(tmp_path / "r", "train.stop_at=4"))
    broken = tmp_path / "r" / "checkpoints" / "step_0000004"
    (broken / "trainer_state.json").unlink()  # as a version without the atomic rename could leave it
    train.main(_args(tmp_path / "r", "--resume"))
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "step_0000004" in out and "resumed from" in out
    assert "step_0000002" in out.split("resumed from")[1].splitlines()[0]


def test_one_pass_stream_runs_more_passes_and_an_empty_one_is_a_clear_error(tmp_path):
    from data_prep import synthetic

    synthetic.main(["--out", str(tmp_path / "d"), "--train", "20", "--eval", "1", "--calib", "0", "--per-shard", "10",
                    "--image-size", "32"])
    shards = str(tmp_path / "d" / "train-{000000..000001}.tar")
    final = train.main(_args(tmp_path / "r", f"data.shards={shards}", "data.resampled=false"))  # 2 batches a pass
    assert json.loads((tmp_path / "r" / "train_summary.json").read_text())["steps"] == 8
    assert (final / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="no complete batch.*data.batch_size"):
        train.main(_args(tmp_path / "e", f"data.shards={shards}", "data.resampled=false", "data.batch_size=32"))
