"""Frozen text-tower features stored in the shards (data_prep text-features): what is written, that training reads
them instead of running the tower, and that shards prepared for another tower or other word groups are refused."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vilseg import train

REPO = Path(__file__).resolve().parents[1]
GROUPS = "{hard_negative_groups: [[circle, square, triangle, cross], [red, green, blue, yellow]], " \
         "hard_negative_exclude: [red circle]}"


def _config(folder: Path, name: str, extra: str = "") -> str:
    path = folder / f"{name}.yaml"
    path.write_text("model: {name: vilseg-tiny-minilm%s}\n"
                    "objectives: {xm: {weight: 1.0}}\n"
                    "data: {global_size: 32, batch_size: 8, num_workers: 0, shuffle_buffer: 16, n_local: 0,\n"
                    "       hard_negative_groups: [[circle, square, triangle, cross], [red, green, blue, yellow]],\n"
                    "       hard_negative_exclude: [red circle]}\n"
                    "optim: {warmup_steps: 1}\n"
                    "train: {steps: 2, log_every: 1, checkpoint_every: 10, text_subspace: null}\n" % extra)
    return str(path)


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Synthetic shards (2 x 12 samples), and a copy with the tiny model's text features under ``text/``."""
    from data_prep import synthetic
    from data_prep.text_features import add_text_features

    root = tmp_path_factory.mktemp("text_features")
    synthetic.main(["--out", str(root / "plain"), "--train", "24", "--eval", "1", "--calib", "0", "--per-shard", "12",
                    "--image-size", "32"])
    config = _config(root, "tiny")
    shards = [str(root / "plain" / f"train-00000{i}.tar") for i in range(2)]
    manifest = add_text_features(shards, config, out=root / "text", progress=False)
    return root, config, manifest


def test_every_sample_gets_its_captions_tower_features_and_valid_negatives(prepared):
    from vilseg.models import create_model

    root, _, manifest = prepared
    assert manifest["samples"] == manifest["samples_with_features"] == 24 and manifest["negatives_per_caption"] == 16
    model = create_model("vilseg-tiny-minilm").eval()
    original, written = _members(root / "plain/train-000000.tar"), _members(root / "text/train-000000.tar")
    # every original member is copied byte for byte; each sample gains exactly text.json and text.npy
    assert {k: v for k, v in written.items() if ".text." not in k} == original
    keys = {name.split(".")[0] for name in original}
    assert {name for name in written if ".text." in name} == {f"{k}.text.{s}" for k in keys for s in ("json", "npy")}
    for key in sorted(keys):
        meta = json.loads(written[f"{key}.text.json"])
        rows = np.load(io.BytesIO(written[f"{key}.text.npy"]), allow_pickle=False)
        caption = original[f"{key}.txt"].decode()
        assert meta["tower"] == manifest["tower"] and meta["captions"] == 1 and meta["texts"][0] == caption
        assert rows.dtype == np.float16 and rows.shape[0] == len(meta["texts"])
        with torch.no_grad():
            tokens = model.tokenizer(meta["texts"])
            expected = model.text_encoder(tokens["input_ids"], tokens["attention_mask"]).numpy()
        assert np.abs(rows.astype(np.float32) - expected).max() <= 2e-3 * np.abs(expected).max()
        # 16 swaps per caption, repeats kept: each differs from the caption in exactly one word of a group and
        # never contains the excluded phrase
        negatives = [meta["texts"][i] for i in meta["negatives"][0]]
        assert len(negatives) == 16
        for negative in negatives:
            changed = [(a, b) for a, b in zip(caption.split(" "), negative.split(" ")) if a != b]
            assert len(changed) == 1 and "red circle" not in negative.lower()


def test_training_reads_the_stored_features_and_never_runs_the_tower(prepared, tmp_path):
    root, config, _ = prepared
    train.main(["--config", config, f"run.dir={tmp_path / 'run'}",
                f"data.shards={root / 'text'}/train-{{000000..000001}}.tar"])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    # 2 steps x 8 samples x (caption + hard negative): every feature from the shards, none encoded
    assert summary["text_features"] == {"shards": 32, "cache": 0, "tower": 0}
    train.main(["--config", config, f"run.dir={tmp_path / 'plain'}",
                f"data.shards={root / 'plain'}/train-{{000000..000001}}.tar"])
    plain = json.loads((tmp_path / "plain" / "train_summary.json").read_text())
    assert plain["text_features"]["shards"] == 0 and plain["text_features"]["tower"] > 0


def test_bf16_training_reads_the_stored_float16_features_after_an_fp32_run_in_the_same_process(prepared, tmp_path):
    root, config, _ = prepared
    for precision in ("no", "bf16"):  # one process, two precisions: accelerate's state is renewed per run
        train.main(["--config", config, f"run.dir={tmp_path / precision}", f"train.mixed_precision={precision}",
                    f"data.shards={root / 'text'}/train-{{000000..000001}}.tar"])
        summary = json.loads((tmp_path / precision / "train_summary.json").read_text())
        assert summary["text_features"] == {"shards": 32, "cache": 0, "tower": 0}
        saved = yaml.safe_load((tmp_path / precision / "config.yaml").read_text())
        assert saved["train"]["mixed_precision"] == precision


def test_stream_takes_the_stored_feature_and_negative_of_the_drawn_caption(prepared):
    """DecodeAugment on one prepared sample: the caption's own row, and a negative drawn from the stored ones."""
    import webdataset as wds

    from data_prep.text_features import Featurizer
    from vilseg.data.multicrop import MultiCrop
    from vilseg.data.stream import DecodeAugment, SkipLog

    root, config, manifest = prepared
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList([str(root / "text/train-000000.tar")]),
                                        wds.tarfile_to_samples())))
    meta = json.loads(sample["text.json"])
    rows = np.load(io.BytesIO(sample["text.npy"]))
    groups = Featurizer(config).groups
    crop = MultiCrop(32, 16, 1, 0, (0.6, 1.0), (0.2, 0.4))
    stage = DecodeAugment(crop, SkipLog(), 0, swap_groups=groups, swap_exclude=["red circle"],
                          text_tower=manifest["tower"])
    out = next(stage([sample]))
    assert np.array_equal(out["text_feature"], rows[0])
    stored_negatives = {meta["texts"][i] for i in meta["negatives"][0]}
    assert out["neg_caption"] in stored_negatives and out["has_neg"]
    assert np.array_equal(out["neg_text_feature"], rows[meta["texts"].index(out["neg_caption"])])
    # another tower's features are not used: the stream swaps a word itself and leaves the features to the cache
    other = next(DecodeAugment(crop, SkipLog(), 0, swap_groups=groups, text_tower="another tower")([sample]))
    assert "text_feature" not in other and "neg_text_feature" not in other


@pytest.mark.parametrize("case", ["other_tower", "other_groups"])
def test_shards_prepared_for_another_tower_or_other_groups_are_refused_in_one_line(prepared, tmp_path, case):
    root, _, _ = prepared
    if case == "other_tower":  # the same weights under another context length: other features
        config = _config(tmp_path, "other", ", overrides: {text: {context_length: 24}}")
        expected = "holds text features of another text tower"
    else:
        config = _config(tmp_path, "other")
        Path(config).write_text(Path(config).read_text().replace("[red circle]", "[blue square]"))
        expected = "hard negatives in"
    run = subprocess.run([sys.executable, "-m", "vilseg.train", "--config", config, f"run.dir={tmp_path / 'run'}",
                          f"data.shards={root / 'text'}/train-{{000000..000001}}.tar"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.startswith("vilseg train:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout
    assert len(lines) == 1 and expected in lines[0] and "train-000000.tar" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_rerun_skips_finished_shards_and_in_place_rewrite_keeps_every_member(prepared, tmp_path):
    import shutil

    from data_prep.text_features import add_text_features

    root, config, _ = prepared
    shard = tmp_path / "train-000000.tar"
    shutil.copy(root / "plain/train-000000.tar", shard)
    first = add_text_features([str(shard)], config, progress=False)  # in place
    written = shard.read_bytes()
    assert first["samples_with_features"] == 12 and not list(tmp_path.glob("*.tmp"))
    assert _members(shard) == _members(root / "text/train-000000.tar")  # the same as writing to --out
    again = add_text_features([str(shard)], config, progress=False)
    assert again["shards_skipped_as_done"] == 1 and again["texts_encoded"] == 0 and shard.read_bytes() == written


def test_data_prep_text_features_command_errors_in_one_line(prepared, tmp_path):
    root, config, _ = prepared
    trains_its_tower = tmp_path / "trainable.yaml"
    trains_its_tower.write_text("model: {name: vilseg-tiny}\n")
    for argv, expected in [(["--config", config, str(tmp_path / "none-{0..1}.tar")], "do not exist"),
                           (["--config", str(trains_its_tower), str(root / "plain/train-000000.tar")],
                            "trains its text tower")]:
        run = subprocess.run([sys.executable, "-m", "data_prep", "text-features", *argv, "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert run.returncode == 2 and "Traceback" not in run.stderr and expected in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_build_with_text_features_writes_them_into_the_shards_it_builds(prepared, tmp_path):
    from PIL import Image

    from data_prep.__main__ import main as data_prep_main

    _, config, _ = prepared
    photos = tmp_path / "photos"
    photos.mkdir()
    captions = {"a": "a red square", "b": "a blue circle and a green cross", "c": "no swappable word here"}
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(photos / f"{name}.png")
        (photos / f"{name}.txt").write_text(caption)
    data_prep_main(["build", "--kind", "folder", "--input", str(photos), "--out", str(tmp_path / "shards"),
                    "--text-features", config])
    written = _members(tmp_path / "shards" / "shard-000000.tar")
    metas = {name.split(".")[0]: json.loads(data) for name, data in written.items() if name.endswith(".text.json")}
    assert sorted(m["texts"][0] for m in metas.values()) == sorted(captions.values())
    by_caption = {m["texts"][0]: m for m in metas.values()}
    assert len(by_caption["a red square"]["negatives"][0]) == 16
    assert by_caption["no swappable word here"]["negatives"] == [[]]  # no swap exists: no negative, never a copy


def test_vilseg_train_refuses_another_towers_features_before_it_launches(prepared, tmp_path):
    root, _, _ = prepared
    config = _config(tmp_path, "other", ", overrides: {text: {context_length: 24}}")
    run = subprocess.run([sys.executable, "-m", "vilseg.cli", "train", "--config", config,
                          f"run.dir={tmp_path / 'run'}", f"data.shards={root / 'text'}/train-{{000000..000001}}.tar"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.startswith("vilseg train: ")]
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout
    assert len(lines) == 1 and "another text tower" in lines[0] and not (tmp_path / "run").exists()


def test_data_prep_check_counts_stored_features_by_model_and_flags_broken_ones(prepared, tmp_path):
    from data_prep.check import check_shards

    root, _, manifest = prepared
    report = check_shards([str(root / "text/train-000000.tar")])
    assert report["ok"] == 12 and report["text_features"] == {f"vilseg-tiny-minilm ({manifest['tower'][:12]})": 12}
    members = _members(root / "text/train-000000.tar")
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        for name, data in members.items():
            data = data[:20] if name.endswith(".text.npy") and name.startswith("00000000.") else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert check_shards([str(broken)])["problems"] == {"bad_text_features": 1}
