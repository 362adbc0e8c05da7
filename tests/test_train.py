"""train.main end to end on tiny shards: a few steps, exact resumption, clear errors, and 2-process DDP on gloo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vilseg import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_prep import synthetic

    out = tmp_path_factory.mktemp("shards")
    synthetic.main(["--out", str(out), "--train", "96", "--eval", "2", "--calib", "0", "--per-shard", "24",
                    "--image-size", "32"])
    return str(out / "train-{000000..000003}.tar")


def _args(run_dir, shards, *extra):
    return ["--config", str(REPO / "configs/debug.yaml"), f"run.dir={run_dir}", f"data.shards={shards}",
            "data.global_size=32", *extra]


def test_train_main_runs_a_few_steps_and_exports(tmp_path, shards):
    final = train.main(_args(tmp_path / "run", shards, "train.steps=3", "train.text_subspace=0.9"))
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and (final / "model.safetensors").is_file()
    # train.text_subspace: the export fits the training captions' text subspace and saves it with the model
    k = summary["text_subspace_dim"]
    assert 0 < k < 96 and json.loads((final / "config.json").read_text())["text_subspace"] == k
    assert load_file(str(final / "model.safetensors"))["text_basis"].shape[1] == k
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))  # TensorBoard via accelerate
    assert (tmp_path / "run" / "checkpoints" / "step_0000003").is_dir()


def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path, shards):
    common = ("train.steps=6", "train.checkpoint_every=100", "data.num_workers=1")
    full = train.main(_args(tmp_path / "a", shards, *common))
    train.main(_args(tmp_path / "b", shards, *common, "train.stop_at=3"))
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["steps"] == 3
    resumed = train.main(_args(tmp_path / "b", shards, *common, "--resume"))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # the teacher is restored too (it is in the accelerate state)
    ta = load_file(str(tmp_path / "a/checkpoints/step_0000006/teacher.safetensors"))
    tb = load_file(str(tmp_path / "b/checkpoints/step_0000006/teacher.safetensors"))
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=0, atol=1e-6, msg=key)


def test_misspelt_config_key_and_missing_shards_are_named(tmp_path, shards):
    with pytest.raises(KeyError, match="train.stesp"):
        train.main(_args(tmp_path / "r", shards, "train.stesp=3"))
    with pytest.raises(FileNotFoundError, match="missing-000.tar"):
        train.main(_args(tmp_path / "r", str(tmp_path / "missing-000.tar")))
    with pytest.raises(KeyError, match="loss.weights.foo"):
        train.main(_args(tmp_path / "r", shards, "loss.weights={xm: 1, foo: 1}"))


@pytest.mark.slow
def test_two_process_ddp_with_accelerate_launch(tmp_path, shards):
    # accelerate 1.15's `--cpu --num_processes 2` starts ONE process unless an mpirun hostfile is configured;
    # `--multi_gpu` with CUDA hidden starts two processes that form a gloo group (DistributedType.MULTI_CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "vilseg/train.py"),
           *_args(tmp_path / "ddp", shards, "train.steps=3")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and "MULTI_CPU" in summary["distributed_type"]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
