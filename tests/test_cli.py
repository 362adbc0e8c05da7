"""The `vilseg` command on real photographs (scikit-image's public-domain ones), and every bad input it must name."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vilseg import cli, create_model

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    create_model("vilseg-tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """astronaut (RGB PNG), coffee (JPEG, 600 wide, 400 high), coffee again stored sideways (400 wide, 600 high)
    with EXIF orientation 6, which a viewer rotates back to 600 x 400, camera (greyscale), and a second astronaut
    with the same stem in another folder."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.fromarray(skimage_data.astronaut()).save(root / "a" / "astronaut.png")
    coffee = Image.fromarray(skimage_data.coffee())  # 600 x 400 (width x height)
    coffee.save(root / "a" / "coffee.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be rotated 90 degrees clockwise to be displayed
    coffee.transpose(Image.ROTATE_90).save(root / "a" / "sideways.jpg", quality=90, exif=exif.tobytes())
    Image.fromarray(skimage_data.camera()).save(root / "a" / "camera.png")  # mode L
    Image.fromarray(skimage_data.astronaut()[::2, ::2]).save(root / "b" / "astronaut.png")
    return root


def _run(capsys, *argv):
    """Runs `vilseg ...`; returns (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exn:
        code = exn.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_real_photographs_exif_greyscale_and_clashing_stems(model_dir, photos, tmp_path, capsys):
    code, out, err = _run(capsys, "segment", photos / "a", photos / "b" / "astronaut.png", "--model", model_dir,
                          "--classes", "person|astronaut,cup|mug,flag", "--out", tmp_path / "out")
    assert code == 0, err
    assert Image.open(photos / "a" / "sideways.jpg").size == (400, 600)  # as stored
    displayed = {"astronaut": (512, 512), "coffee": (400, 600), "sideways": (400, 600), "camera": (512, 512),
                 "astronaut-2": (256, 256)}  # (height, width) as displayed
    for stem, (h, w) in displayed.items():
        labels = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert labels.shape == (h, w), stem
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        report = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert report["size"] == [w, h] and report["classes"] == ["background", "person", "cup", "flag"]
        for segment in report["segments"]:
            assert set(segment) == {"id", "label", "score", "area", "box", "top"} and len(segment["top"]) == 3
        assert sum(s["area"] for s in report["segments"]) == h * w
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size[1] >= h
    assert json.loads((tmp_path / "out" / "astronaut-2.json").read_text())["source"].endswith("b/astronaut.png")
    assert "wrote 5 of 5 images" in out


def test_standard_input_globs_and_vocabulary_files(model_dir, photos, tmp_path, capsys, monkeypatch):
    import io

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("person, astronaut\ncoffee cup, mug\n")
    # a stand-in for sys.stdin (with close(), which DataLoader worker processes call on theirs)
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": io.BytesIO((photos / "a" / "coffee.jpg").read_bytes()),
                                                     "close": lambda self: None})())
    code, _, err = _run(capsys, "segment", "-", str(photos / "a" / "c*.png"), "--model", model_dir,
                        "--vocab", vocab, "--threshold", "0.1", "--out", tmp_path / "out")
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "out" / "stdin.png")).shape == (400, 600)
    assert json.loads((tmp_path / "out" / "camera.json").read_text())["classes"] == [
        "background", "person", "coffee cup"]


def test_a_corrupt_image_is_named_and_the_others_are_still_segmented(model_dir, photos, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code, out, err = _run(capsys, "segment", bad, photos / "a" / "astronaut.png", "--model", model_dir,
                          "--classes", "person", "--out", tmp_path / "out")
    assert code == 1
    assert "skipped" in err and "broken.jpg" in err and "Traceback" not in err
    assert (tmp_path / "out" / "astronaut.png").is_file() and "wrote 1 of 2 images" in out


@pytest.mark.parametrize("case", ["missing_model", "corrupt_weights", "foreign_weights", "empty_classes",
                                  "empty_vocab_file", "unknown_vocab", "no_input", "out_is_a_file"])
def test_bad_input_gets_one_line_and_exit_code_2(case, model_dir, photos, tmp_path, capsys):
    model, classes, images, out = model_dir, ["--classes", "person"], [photos / "a" / "camera.png"], tmp_path / "o"
    expected = {"missing_model": "model folder", "corrupt_weights": "model.safetensors",
                "foreign_weights": "model.safetensors", "empty_classes": "names no class",
                "empty_vocab_file": "is empty", "unknown_vocab": "no vocabulary 'klingon'",
                "no_input": "matches no file", "out_is_a_file": "is a file"}[case]
    if case == "missing_model":
        model = tmp_path / "nowhere"
    elif case == "corrupt_weights":
        model = tmp_path / "corrupt"
        shutil.copytree(model_dir, model)
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "foreign_weights":
        model = tmp_path / "foreign"
        shutil.copytree(model_dir, model)
        create_model("vilseg-tiny-minilm").save_pretrained(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
        capsys.readouterr()  # transformers' own loading bar, from building the other model here
    elif case == "empty_classes":
        classes = ["--classes", " , ,"]
    elif case == "empty_vocab_file":
        (tmp_path / "empty.txt").write_text("\n\n")
        classes = ["--vocab", tmp_path / "empty.txt"]
    elif case == "unknown_vocab":
        classes = ["--vocab", "klingon"]
    elif case == "no_input":
        images = [tmp_path / "nothing-*.jpg"]
    elif case == "out_is_a_file":
        out.write_text("I am a file")
    code, _, err = _run(capsys, "segment", *images, "--model", model, *classes, "--out", out)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_vocabulary_free_mode_names_segments_from_a_packaged_vocabulary(model_dir, photos, tmp_path, capsys):
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", model_dir, "--vocab", "voc21",
                        "--top-k", "5", "--out", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "camera.json").read_text())
    labels = {s["label"] for s in report["segments"]}
    assert "background" not in labels and labels <= set(report["classes"])  # no threshold: every segment named
    assert all(len(s["top"]) == 5 for s in report["segments"])


def test_index_build_query_and_segment_with_a_prebuilt_index(model_dir, photos, tmp_path, capsys):
    code, out, err = _run(capsys, "index", "build", "--model", model_dir, "--vocab", "ade20k", "--out", tmp_path / "i")
    assert code == 0 and "indexed 150 classes" in out, err
    code, out, _ = _run(capsys, "index", "query", "--model", model_dir, "--index", tmp_path / "i", "--text", "a wall",
                        "-k", "3")
    assert code == 0 and out.startswith("a wall: ") and out.count("(") == 3
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", model_dir, "--index",
                        tmp_path / "i", "--vocab", "ade20k", "--out", tmp_path / "out")
    assert code == 0, err
    other = tmp_path / "other"
    create_model("vilseg-tiny").save_pretrained(other)  # another text tower: the index must refuse it
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", other, "--index", tmp_path / "i",
                        "--vocab", "ade20k", "--out", tmp_path / "out2")
    assert code == 2 and "another text encoder" in err


def test_every_subcommand_help_shows_an_example():
    for command in ("segment", "index", "eval", "probe", "train", "web"):
        proc = subprocess.run([sys.executable, "-m", "vilseg.cli", command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "example:" in proc.stdout and "vilseg " + command in proc.stdout, command


def test_a_folder_batched_in_workers_and_split_over_two_processes_gives_the_files_of_one_by_one(model_dir, tmp_path,
                                                                                                capsys):
    import os

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):  # two sizes, so that batches group images by their input size
        shape = (48, 64, 3) if i % 3 else (40, 40, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    common = ["--model", model_dir, "--classes", "red circle,blue square", "--threshold", "0.2"]
    code, _, err = _run(capsys, "segment", folder, *common, "--batch-size", "1", "--workers", "0",
                        "--out", tmp_path / "one")
    assert code == 1 and "broken.png" in err  # the bad file is named and counted, the others are written
    code, _, err = _run(capsys, "segment", folder, *common, "--batch-size", "4", "--workers", "2",
                        "--out", tmp_path / "batched")
    assert code == 1 and "broken.png" in err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vilseg.cli",
                    "segment", str(folder), *map(str, common), "--batch-size", "4", "--out", str(tmp_path / "two")],
                   capture_output=True, timeout=300, env=env)
    for run, processes in (("batched", 1), ("two", 2)):
        stats = json.loads((tmp_path / run / "segment_stats.json").read_text())
        assert (stats["images"], stats["failed"], stats["processes"]) == (7, 1, processes)
        for i in range(7):
            for suffix in (".png", "_overlay.png"):
                assert (np.asarray(Image.open(tmp_path / run / f"im{i}{suffix}"))
                        == np.asarray(Image.open(tmp_path / "one" / f"im{i}{suffix}"))).all(), (run, i, suffix)
            got, want = (json.loads((tmp_path / r / f"im{i}.json").read_text())["segments"] for r in (run, "one"))
            assert [s["label"] for s in got] == [s["label"] for s in want]
