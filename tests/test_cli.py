"""The `vilseg` command on real photographs (scikit-image's public-domain ones), and every bad input it must name."""
import json
from pathlib import Path
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
    vocab.write_text("# one class per line, its names separated by |\nperson|astronaut\ncoffee cup|mug\n")
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
    stats = json.loads((tmp_path / "out" / "segment_stats.json").read_text())
    assert stats["failed"] == 1 and [f["file"] for f in stats["failed_files"]] == [str(bad)]
    assert stats["failed_files"][0]["error"]  # the reason, as the skipped line gives it


@pytest.mark.parametrize("case", ["missing_model", "corrupt_weights", "foreign_weights", "empty_classes",
                                  "empty_alias", "empty_vocab_file", "unknown_vocab", "no_input", "out_is_a_file",
                                  "no_names", "index_and_classes", "threshold", "top_k", "batch_size"])
def test_bad_input_gets_one_line_and_exit_code_2(case, model_dir, photos, tmp_path, capsys):
    model, classes, images, out = model_dir, ["--classes", "person"], [photos / "a" / "camera.png"], tmp_path / "o"
    expected = {"missing_model": "model folder", "corrupt_weights": "model.safetensors",
                "foreign_weights": "model.safetensors", "empty_classes": "entry 1 is empty",
                "empty_alias": "entry 2 is empty", "empty_vocab_file": "is empty",
                "unknown_vocab": "no vocabulary 'klingon'", "no_input": "matches no file",
                "out_is_a_file": "is a file", "no_names": "give the classes", "index_and_classes": "--classes and --index",
                "threshold": "--threshold 5.0", "top_k": "--top-k", "batch_size": "--batch-size"}[case]
    extra = []
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
    elif case == "empty_alias":
        classes = ["--classes", "rocket,,|"]
    elif case == "no_names":
        classes = []
    elif case == "index_and_classes":
        classes += ["--index", tmp_path]
    else:
        extra = {"threshold": ["--threshold", "5"], "top_k": ["--top-k", "0"], "batch_size": ["--batch-size", "0"]
                 }.get(case, [])
    code, _, err = _run(capsys, "segment", *images, "--model", model, *classes, *extra, "--out", out)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.is_dir() or not any(out.iterdir())  # nothing was written


@pytest.mark.parametrize("argv, expected", [
    (["index", "build", "--model", "MODEL", "--classes", "cat,dog"], "needs --out"),
    (["index", "build", "--model", "MODEL", "--out", "OUT"], "give the names to index"),
    (["index", "build", "--model", "MODEL", "--vocab", "klingon", "--out", "OUT"], "no vocabulary 'klingon'"),
    (["index", "build", "--model", "MODEL", "--classes", "cat", "--naming", "crop", "--out", "OUT"], "--naming 'crop'"),
    (["index", "query", "--model", "MODEL", "--text", "a cat"], "needs --index"),
    (["index", "query", "--model", "MODEL", "--index", "OUT", "--text", "a cat"], "not a vilseg vocabulary index"),
    (["eval", "--dataset", "voc21", "--root", "OUT", "--out", "r.json"], "exactly one of"),
    (["eval", "--model", "MODEL", "--dataset", "voc21", "--root", "OUT"], "--out report.json is required"),
    (["eval", "--model", "MODEL", "--dataset", "voc21", "--root", "OUT", "--out", "r.json"], "not a voc dataset folder"),
    (["probe", "--model", "MODEL", "--root", "OUT", "--out", "OUT"], "OUT"),
    (["web", "--model", "MODEL", "--port", "0"], "--port 0"),
    (["web", "--model", "OUT"], "does not exist"),
    (["train", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["train", "--config", "configs/debug.yaml", "optim.lr=abc"], "config optim.lr='abc'"),
    (["train", "--config", "configs/debug.yaml", "optim.lr=-1"], "config optim.lr=-1"),
    (["train", "--config", "configs/debug.yaml", "train.steps=abc"], "config train.steps='abc'"),
    (["train", "--config", "configs/debug.yaml", "optim.betas=[0.9]"], "config optim.betas"),
    (["train", "--config", "configs/debug.yaml", "train.checkpoint_every=0"], "train.checkpoint_every=0"),
    (["train", "--config", "configs/debug.yaml", "data.batch_size=8.5"], "data.batch_size=8.5"),
    (["train", "--config", "configs/debug.yaml", "train.stesp=3"], "unknown config key 'train.stesp'"),
    (["train", "--config", "configs/debug.yaml", "objectives.foo.weight=1"], "unknown objective 'foo'"),
    (["train", "--config", "configs/debug.yaml", "objectives.xm.weigth=1"], "valid options: ['weight']"),
    (["train", "--config", "configs/debug.yaml", "data.shards=missing-{000..001}.tar"], "missing-000.tar"),
])
def test_every_command_names_a_bad_input_in_one_line_with_exit_2(argv, expected, model_dir, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the configs/ of the repository
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path / "missing") if a == "OUT" else a for a in argv]
    if argv[0] == "web":
        pytest.importorskip("gradio")
    code, out, err = _run(capsys, *argv)
    assert code == 2, (argv, out, err)
    first, *rest = err.strip().splitlines()
    assert expected.replace("OUT", str(tmp_path / "missing")) in first, err
    # one line names the problem; only a dataset's expected layout follows it, indented
    assert all(line.startswith("  ") for line in rest) and "Traceback" not in err + out, err


def test_python_m_vilseg_train_names_a_bad_value_in_one_line(tmp_path):
    """The same errors through `python -m vilseg.train` (what `accelerate launch vilseg/train.py` runs)."""
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "vilseg.train", "--config", "configs/debug.yaml", "optim.lr=abc",
                          f"run.dir={tmp_path / 'run'}"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "vilseg train: config optim.lr='abc': Input should be a valid number, unable to parse string as a number"]
    assert not (tmp_path / "run").exists()  # checked before anything was written


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
                        tmp_path / "i", "--out", tmp_path / "out")  # --index on its own: its names, every segment named
    assert code == 0, err
    labels = {s["label"] for s in json.loads((tmp_path / "out" / "camera.json").read_text())["segments"]}
    assert labels and "background" not in labels and labels <= set(json.loads(
        (tmp_path / "i" / "vocabulary.json").read_text())["classes"])
    other = tmp_path / "other"
    create_model("vilseg-tiny").save_pretrained(other)  # another text tower: the index must refuse it
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", other, "--index", tmp_path / "i",
                        "--out", tmp_path / "out2")
    assert code == 2 and "another text encoder" in err
    # an index is centred for one naming: built for pooling, a re-encoding read-out refuses it and pooling takes it
    code, out, err = _run(capsys, "index", "build", "--model", model_dir, "--classes", "cat,dog", "--naming", "pool",
                          "--out", tmp_path / "p")
    assert code == 0 and "centred on the prompt reference" in out, err
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", model_dir, "--index", tmp_path / "p",
                        "--out", tmp_path / "out3")
    assert code == 2 and "'prompt' reference" in err and "--naming reencode_global" in err
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", model_dir, "--index", tmp_path / "p",
                        "--naming", "pool", "--out", tmp_path / "out4")
    assert code == 0, err
    # --naming pool on a model calibrated with re-encoding (its readout.json names the captions' reference) scores
    # against pooling's own reference, not the saved one
    import shutil

    from vilseg.inference import ReadOut

    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    ReadOut("clusters", "reencode_global", 0.3, reference="captions").save(calibrated)
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", calibrated, "--index", tmp_path / "p",
                        "--naming", "pool", "--out", tmp_path / "out5")
    assert code == 0, err


def test_the_vocabulary_cache_is_shared_by_segment_and_index_build_and_keyed_by_the_text_encoder(
        model_dir, photos, tmp_path, capsys, monkeypatch):
    from vilseg.inference import vocabulary

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(vocabulary, "CACHE_FROM", 10)  # cache a 20-class vocabulary as if it were large
    calls = []
    embed = vocabulary.embed_names
    monkeypatch.setattr(vocabulary, "embed_names", lambda *a, **k: calls.append(len(a[1])) or embed(*a, **k))
    assert _run(capsys, "index", "build", "--model", model_dir, "--vocab", "voc20", "--out", tmp_path / "i")[0] == 0
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "vilseg" / "vocab").iterdir())) == 1
    # segment with the same vocabulary (a vocabulary-free run: no background words added) reads the cache
    code, _, err = _run(capsys, "segment", photos / "a" / "camera.png", "--model", model_dir, "--vocab", "voc20",
                        "--out", tmp_path / "o")
    assert code == 0 and len(calls) == 1, err
    # another text encoder has another key: embedded again, cached beside
    other = tmp_path / "other"
    create_model("vilseg-tiny").save_pretrained(other)
    assert _run(capsys, "index", "build", "--model", other, "--vocab", "voc20", "--out", tmp_path / "j")[0] == 0
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "vilseg" / "vocab").iterdir())) == 2
    assert json.loads((tmp_path / "i" / "vocabulary.json").read_text())["identity"] != json.loads(
        (tmp_path / "j" / "vocabulary.json").read_text())["identity"]


def test_one_alias_syntax_and_duplicates_are_named(tmp_path):
    import warnings

    from vilseg.inference.vocabularies import load_vocabulary, parse_classes

    vocab = tmp_path / "v.txt"
    vocab.write_text("# comment\ntv|television|monitor\ncat\ncat\nmonitor|screen\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = load_vocabulary(str(vocab))
    assert names == {"tv": ["tv", "television", "monitor"], "cat": ["cat"], "screen": ["screen"]}
    assert [str(w.message) for w in caught] == [
        f"{vocab}: the name 'cat' is given twice (first for class 'cat'); kept once",
        f"{vocab}: the name 'monitor' is given twice (first for class 'tv'); kept once"]
    assert parse_classes("tv|television,cat".split(","), "--classes") == {"tv": ["tv", "television"], "cat": ["cat"]}


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


def test_a_model_of_the_synthetic_world_says_so_once_and_overlays_of_large_photos_are_capped(model_dir, tmp_path,
                                                                                                 capsys):
    from vilseg.overlay import MAX_SIDE

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 2400, 3), dtype=np.uint8)).save(big)
    args = ["segment", big, "--model", model, "--classes", "red circle", "--out", tmp_path / "o"]
    code, _, err = _run(capsys, *args)
    assert code == 0 and "synthetic world" not in err  # no record: no notice
    (model / "training.json").write_text(json.dumps({"data": {"shards": "synthetic:100", "synthetic_world": True}}))
    code, _, err = _run(capsys, *args)
    assert code == 0 and err.count("trained on the synthetic world of coloured shapes") == 1, err
    # the label map keeps the photo's size; the overlay (photo | labels, legend below) is capped
    assert Image.open(tmp_path / "o" / "big.png").size == (2400, 900)
    width, height = Image.open(tmp_path / "o" / "big_overlay.png").size
    assert width == 2 * MAX_SIDE and height < 600


def test_a_mistyped_option_prints_the_subcommands_usage():
    proc = subprocess.run([sys.executable, "-m", "vilseg.cli", "segment", "x.png", "--out", "o", "--modle"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: vilseg segment")
    assert "vilseg segment: unrecognized arguments: --modle" in proc.stderr
