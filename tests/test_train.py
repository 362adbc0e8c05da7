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
    # train.text_subspace: the export folds the training captions' k-dimensional text subspace into text_proj,
    # whose weight then has rank k; the checkpoint (the live model) keeps the unfolded projection
    k = summary["text_subspace_dim"]
    exported = load_file(str(final / "model.safetensors"))["text_proj.weight"]
    live = load_file(str(tmp_path / "run/checkpoints/step_0000003/model.safetensors"))["model.text_proj.weight"]
    assert 0 < k < 32 and torch.linalg.matrix_rank(exported.double(), rtol=1e-6) == k
    assert torch.linalg.matrix_rank(live.double(), rtol=1e-6) > k
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))  # TensorBoard via accelerate
    assert (tmp_path / "run" / "checkpoints" / "step_0000003").is_dir()
    # what the export was trained on, beside its weights: the synthetic world's shards (their manifest says so)
    record = json.loads((final / "training.json").read_text())
    assert record["data"] == {"shards": shards, "synthetic_world": True} and record["steps"] == 3
    # the score reference: the same captions' mean embedding under the exported (folded) text side
    from vilseg import ViLSeg
    from vilseg.data.stream import read_captions

    model = ViLSeg.from_pretrained(final)
    expected = model.encode_texts(read_captions(shards, 4096)).double().mean(0).float()
    assert summary["text_reference_captions"] == 96
    torch.testing.assert_close(model.text_reference, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", ["configs/debug.yaml", "configs/debug.yaml+augment", "configs/mmc/pretrain-debug.yaml",
                                    "configs/maskco/pretrain-debug.yaml", "configs/slotcon/pretrain-debug.yaml"])
def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path, shards, config, capsys):
    """Also: a resumed run draws the same augmented views as an uninterrupted one (``+augment``: DINO's photometric
    augmentation on every view, the caption's too), or its parameters would differ."""
    common = ("train.steps=6", "train.checkpoint_every=100", "data.num_workers=1")
    if config.endswith("+augment"):
        config = config.removesuffix("+augment")
        common += ("data.augment.photometric=true", "data.augment.caption_view=true")
    args = lambda run, *extra: ["--config", str(REPO / config), f"run.dir={run}", f"data.shards={shards}",  # noqa: E731
                                "data.global_size=32", *common, *extra]
    train.main(args(tmp_path / "a"))
    train.main(args(tmp_path / "b", "train.stop_at=3"))
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["steps"] == 3
    assert "initialised from scratch" in capsys.readouterr().out
    train.main(args(tmp_path / "b", "--resume"))
    assert "initialised from scratch" not in capsys.readouterr().out  # its weights come from the checkpoint
    # every tensor of the model, the objectives' heads and their state (MMC's centre), and the teacher
    for name in ("model.safetensors", "teacher.safetensors"):
        a = load_file(str(tmp_path / "a/checkpoints/step_0000006" / name))
        b = load_file(str(tmp_path / "b/checkpoints/step_0000006" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
        state = {"mmc": "objectives.msd.center", "maskco": "objectives.maskco.queue",
                 "slotcon": "objectives.slotcon.center"}  # the objectives' state is in the checkpoint, and resumed
        for method, key in state.items():
            if name == "model.safetensors" and method in config:
                assert key in a and a[key].abs().sum() > 0
        if name == "model.safetensors" and "maskco" in config:
            assert int(a["objectives.maskco.queue_len"]) == 64 and "objectives.maskco.queue_ptr" in a


def test_resumed_run_reports_the_training_seconds_of_every_session(tmp_path, shards):
    """The checkpoint carries the training seconds so far: the summary of a resumed run counts the earlier session's
    time as well as its own, and says None (unknown) where it resumed a checkpoint written without that count."""
    run = tmp_path / "r"
    train.main(_args(run, shards, "train.steps=4", "train.stop_at=2", "train.checkpoint_every=100"))
    first = json.loads((run / "train_summary.json").read_text())
    saved = json.loads((run / "checkpoints/step_0000002/trainer_state.json").read_text())
    assert first["train_seconds_total"] == pytest.approx(first["seconds"], abs=0.1)
    assert saved["train_seconds"] == pytest.approx(first["seconds"], abs=0.1)
    train.main(_args(run, shards, "train.steps=4", "train.checkpoint_every=100", "--resume"))
    second = json.loads((run / "train_summary.json").read_text())
    assert second["steps_this_session"] == 2
    assert second["train_seconds_total"] == pytest.approx(saved["train_seconds"] + second["seconds"], abs=0.1)
    # a checkpoint from before the count: the run's total is unknown, not this session's time alone
    old = run / "checkpoints/step_0000004/trainer_state.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "train_seconds"}))
    train.main(_args(run, shards, "train.steps=5", "train.checkpoint_every=100", "--resume"))
    assert json.loads((run / "train_summary.json").read_text())["train_seconds_total"] is None


def test_misspelt_config_key_and_missing_shards_are_named(tmp_path, shards):
    with pytest.raises(KeyError, match="train.stesp"):
        train.main(_args(tmp_path / "r", shards, "train.stesp=3"))
    with pytest.raises(FileNotFoundError, match="missing-000.tar"):
        train.main(_args(tmp_path / "r", str(tmp_path / "missing-000.tar")))
    with pytest.raises(KeyError, match="unknown objective 'foo'"):
        train.main(_args(tmp_path / "r", shards, "objectives.foo={weight: 1}"))
    with pytest.raises(KeyError, match=r"'temprature'.*objectives\.vis"):
        train.main(_args(tmp_path / "r", shards, "objectives.vis.temprature=0.2"))


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


def test_stage_one_export_loads_into_stage_two_bit_for_bit(tmp_path, shards):
    from vilseg.models import create_model
    from vilseg.training.stage import init_image_encoder

    stage1 = train.main(["--config", str(REPO / "configs/mmc/pretrain-debug.yaml"), f"run.dir={tmp_path / 's1'}",
                         f"data.shards={shards}", "train.steps=3"])
    exported = load_file(str(stage1 / "model.safetensors"))
    torch.manual_seed(1)
    fresh = create_model("vilseg-tiny").state_dict()
    torch.manual_seed(1)
    model = create_model("vilseg-tiny")
    report = init_image_encoder(model, stage1)
    state = model.state_dict()
    encoder = [k for k in state if k.startswith("image_encoder.")]
    assert sorted(report["loaded"]) == sorted(encoder) and set(report["new"]) == set(state) - set(encoder)
    for key in encoder:  # carried over bit for bit, and really changed by stage 1's training
        assert torch.equal(state[key], exported[key]), key
    assert any(not torch.equal(exported[k], fresh[k]) for k in encoder)
    for key in report["new"]:  # everything else keeps this stage's own initialisation
        assert torch.equal(state[key], fresh[key]), key
    # the training stage says so, and trains on from there
    final = train.main(_args(tmp_path / "s2", shards, "train.steps=2", f"model.init_from={stage1}"))
    init = json.loads((tmp_path / "s2" / "init_report.json").read_text())["init"]
    assert init["source"] == str(stage1) and len(init["loaded"]) == len(encoder)
    assert (final / "model.safetensors").is_file()


def test_init_from_errors_name_the_problem(tmp_path, shards):
    from vilseg.models import create_model
    from vilseg.training.stage import init_image_encoder

    with pytest.raises(FileNotFoundError, match="neither a vilseg export"):
        init_image_encoder(create_model("vilseg-tiny"), tmp_path / "nothing")
    other = create_model("vilseg-tiny", image={"timm_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2}})
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"image_encoder\..*has shape"):
        init_image_encoder(create_model("vilseg-tiny"), tmp_path / "wide")


def test_timm_checkpoint_initialises_the_image_encoder(tmp_path):
    from safetensors.torch import save_file

    from vilseg.models import create_model
    from vilseg.training.stage import init_image_encoder

    source = create_model("vilseg-tiny", image={"conv_stem": False})
    save_file({k: v.contiguous() for k, v in source.image_encoder.vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = create_model("vilseg-tiny", image={"conv_stem": False})
    report = init_image_encoder(model, tmp_path / "vit.safetensors")
    for key, value in source.image_encoder.vit.state_dict().items():
        assert torch.equal(model.image_encoder.vit.state_dict()[key], value), key
    assert report["kind"] == "timm checkpoint" and "image_proj.weight" in report["new"]


@pytest.mark.slow
def test_accelerate_launch_runs_mmc_pretrain_debug_then_vilseg_on_its_export(tmp_path):
    # The acceptance commands, as a user types them on a fresh clone (the debug presets render the synthetic world
    # on the fly, so no shards are needed); only run.dir is redirected.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "vilseg/train.py")]
    for config, extra in (("configs/mmc/pretrain-debug.yaml", []),
                          ("configs/mmc/vilseg-debug.yaml", [f"model.init_from={tmp_path / 'pre' / 'final'}",
                                                             "train.text_subspace=0.9"])):  # export runs as __main__
        run = tmp_path / ("pre" if "pretrain" in config else "vilseg")
        proc = subprocess.run([*launch, "--config", str(REPO / config), f"run.dir={run}", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (run / "final" / "model.safetensors").is_file()
    assert "loaded 38 tensors" in proc.stdout + proc.stderr
