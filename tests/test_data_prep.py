"""data_prep on fixtures made here: every input kind, every bad-sample reason, resume after a kill, readability."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main as cli
from data_prep.check import check_shards
from data_prep.process import Options, RawSample, clean_caption, process

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed, size=(48, 40), mode="RGB", **save):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png():
    # 10000 x 10000 one-bit image: > Pillow's 89.5 Mpx bomb limit, yet a tiny file
    return _png(Image.new("1", (10000, 10000)))


BAD = {  # name -> (bytes or None for missing, caption, expected reason)
    "zero": (b"", "a zero byte file", "zero_byte"),
    "trunc": (_jpeg(1)[:300], "a truncated jpeg", "truncated"),
    "text": (b"hello, I am not an image at all", "not an image", "not_an_image"),
    "bomb": (_bomb_png(), "a decompression bomb", "decompression_bomb"),
    "nocap": (_jpeg(2), "  &nbsp; \x00 ", "empty_caption"),
}


def _folder(root: Path, n_good=6):
    root.mkdir(parents=True)
    for i in range(n_good):
        (root / f"good{i}.jpg").write_bytes(_jpeg(100 + i))
        (root / f"good{i}.txt").write_text(f"A  photo &amp; caption\tnumber {i}\n")
    (root / "zdup.jpg").write_bytes(_jpeg(100))  # same bytes as good0; later in input order, so it is the one dropped
    (root / "zdup.txt").write_text("a duplicate")
    for name, (data, caption, _) in BAD.items():
        (root / f"{name}.{'png' if name == 'bomb' else 'jpg'}").write_bytes(data)
        (root / f"{name}.txt").write_text(caption)
    (root / "nosidecar.jpg").write_bytes(_jpeg(3))  # no caption file at all: its own reason, not an empty caption
    return root


def _build(*args):
    return cli(["build", *map(str, args), "--shard-count", "4"])


def _keys(pattern):
    import webdataset as wds

    return sorted(s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False))


def test_folder_input_counts_every_bad_reason_and_keeps_all_good(tmp_path):
    manifest = _build("--kind", "folder", "--input", _folder(tmp_path / "in"), "--out", tmp_path / "out")
    assert manifest["samples"] == 6
    expected = {reason: 1 for _, _, reason in BAD.values()}
    expected["duplicate"] = expected["missing_caption"] = 1
    assert manifest["skipped"] == expected
    assert _keys(manifest["pattern"]) == [f"good{i}" for i in range(6)]
    for reason in expected:
        assert manifest["skipped_examples"][reason]  # examples name the source
    import webdataset as wds

    sample = next(iter(wds.WebDataset(manifest["pattern"], shardshuffle=False)))
    assert sample["txt"].decode() == "A photo & caption number 0"  # whitespace and HTML entities cleaned
    meta = json.loads(sample["json"])
    assert meta["original_size"] == [48, 40] and meta["source"] == "good0.jpg"
    out = tmp_path / "out"
    assert (out / "caption_lengths.png").is_file() and (out / "stats.md").is_file()
    assert json.loads((out / "stats.json").read_text())["top_words"][0][0] in ("a", "photo", "caption", "number")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_table_inputs_with_configurable_columns_and_missing_files(tmp_path, fmt, capsys):
    import pandas as pd

    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(_jpeg(i))
        rows.append({"file": f"imgs/{i}.jpg", "text": f"caption {i}"})
    rows.append({"file": "imgs/missing.jpg", "text": "no such file"})
    rows.append({"file": "../outside.jpg", "text": "escapes the root"})
    rows.append({"file": "/etc/passwd", "text": "absolute path"})
    df = pd.DataFrame(rows)
    path = tmp_path / f"table.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "tsv": lambda: df.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    manifest = _build("--kind", "table", "--input", path, "--root", tmp_path, "--path-column", "file",
                      "--caption-column", "text", "--out", tmp_path / "out")
    assert manifest["samples"] == 5
    assert manifest["skipped"] == {"missing_file": 1, "unsafe_path": 2}
    assert not (tmp_path / "outside.jpg").exists()
    with pytest.raises(SystemExit) as exit_info:  # one line naming the table and the column, exit code 2
        _build("--kind", "table", "--input", path, "--path-column", "nope", "--out", tmp_path / "o2")
    assert exit_info.value.code == 2 and "no column 'nope'" in capsys.readouterr().err


def test_coco_captions_keep_all_captions_as_a_list(tmp_path):
    (tmp_path / "train").mkdir()
    images, anns = [], []
    for i in range(3):
        (tmp_path / "train" / f"{i:012d}.jpg").write_bytes(_jpeg(i))
        images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": 48, "height": 40})
        anns += [{"id": 10 * i + k, "image_id": i + 1, "caption": f"image {i} caption {k}"} for k in range(5)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    manifest = _build("--kind", "coco", "--input", tmp_path / "captions.json", "--root", tmp_path / "train",
                      "--out", tmp_path / "out")
    import webdataset as wds

    samples = list(wds.WebDataset(manifest["pattern"], shardshuffle=False))
    assert len(samples) == 3
    meta = json.loads(samples[0]["json"])
    assert meta["captions"] == [f"image 0 caption {k}" for k in range(5)] and meta["coco_id"] == 1


def test_coco_captions_vary_across_epochs_in_the_training_stream(tmp_path):
    from vilseg.data.multicrop import MultiCrop
    from vilseg.data.stream import make_train_stream

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.jpg").write_bytes(_jpeg(0))
    anns = [{"id": k, "image_id": 1, "caption": f"caption {k}"} for k in range(5)]
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": anns}))
    manifest = _build("--kind", "coco", "--input", tmp_path / "c.json", "--root", tmp_path / "train",
                      "--out", tmp_path / "out")
    stream = make_train_stream(manifest["pattern"], MultiCrop(16, 8, 1, 0), batch_size=1, shuffle_buffer=1)
    it = iter(stream)
    seen = {next(it)["captions"][0] for _ in range(30)}
    assert len(seen) > 1 and seen <= {f"caption {k}" for k in range(5)}


def _img2dataset_shard(path: Path):
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(4):
            add(f"{i:09d}.jpg", _jpeg(50 + i))
            add(f"{i:09d}.txt", f"web caption {i}".encode())
            add(f"{i:09d}.json", json.dumps({"url": f"http://example.com/{i}.jpg", "status": "success",
                                             "caption": f"web caption {i}"}).encode())
        add("000000009.jpg", b"")  # a failed download that left an empty file
        add("000000009.txt", b"lost")
        add("../escape.jpg", _jpeg(9))
        add("../escape.txt", b"path traversal")


def test_webdataset_and_img2dataset_input_is_resharded_and_reencoded(tmp_path):
    _img2dataset_shard(tmp_path / "00000.tar")
    manifest = cli(["build", "--kind", "wds", "--input", str(tmp_path / "00000.tar"), "--out", str(tmp_path / "out"),
                    "--format", "webp", "--max-side", "32", "--shard-count", "3"])
    assert manifest["samples"] == 4 and manifest["skipped"] == {"zero_byte": 1, "unsafe_path": 1}
    import webdataset as wds

    samples = list(wds.WebDataset(manifest["pattern"], shardshuffle=False).decode("pil"))
    assert len(samples) == 4 and all(s["webp"].size == (32, 27) for s in samples)
    assert json.loads(json.dumps(samples[0]["json"]))["url"] == "http://example.com/0.jpg"
    assert not (tmp_path / "escape.jpg").exists()


def test_image_modes_exif_resize_and_size_budget():
    opts = Options(max_side=40, quality=95, max_bytes=1500)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", exif=exif)
    cases = {
        "cmyk": _jpeg(3, mode="CMYK"), "palette": _png(rgb.convert("P")), "grey": _png(rgb.convert("L")),
        "rgba": _png(rgb.convert("RGBA")), "sixteen": _png(Image.fromarray((np.arange(80 * 60).reshape(60, 80) * 13
                                                                           ).astype(np.uint16))),
        "exif": buf.getvalue(),
    }
    for name, data in cases.items():
        res = process(RawSample(name, name, data, ["a caption"]), opts)
        assert res.reason is None, (name, res.reason, res.detail)
        out = Image.open(io.BytesIO(res.image))
        assert out.mode == "RGB" and max(out.size) == 40 and len(res.image) <= 1500, name
        if name == "sixteen":
            assert np.asarray(out).std() > 20  # the 16-bit range was rescaled, not clipped to white
    res = process(RawSample("exif", "exif", cases["exif"], ["x"]), Options())
    assert res.meta["size"] == [60, 80]  # EXIF orientation applied: 80x60 stored, 60x80 shown
    assert process(RawSample("s", "s", _jpeg(0, size=(20, 20)), ["x"]), Options()).reason == "too_small"
    assert process(RawSample("w", "w", _jpeg(0, size=(400, 40)), ["x"]), Options()).reason == "bad_aspect"


def test_caption_cleaning():
    opts = Options(max_caption_chars=20)
    assert clean_caption(b"caf\xc3\xa9 \xff\xfe bad bytes", Options()) == "café bad bytes"
    assert clean_caption("Tom &amp;amp; Jerry\u200b\r\n  go", Options()) == "Tom & Jerry go"
    assert clean_caption("one two three four five six seven", opts) == "one two three four"
    assert clean_caption("\x00\x01 ", Options()) == ""


def test_resume_after_kill_is_byte_identical(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(240):
        (src / f"img{i:04d}.jpg").write_bytes(_jpeg(i, size=(96, 96)))
        (src / f"img{i:04d}.txt").write_text(f"caption {i}")
    args = ["build", "--kind", "folder", "--input", str(src), "--shard-count", "10", "--format", "webp",
            "--quality", "80"]
    cli(args + ["--out", str(tmp_path / "ref")])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *args, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "shard-000005.tar").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "killed").glob("shard-*.tar")))
    assert 0 < done_before < 24, "the kill must land mid-run"
    cli(args + ["--out", str(tmp_path / "killed")])
    ref = sorted(p.name for p in (tmp_path / "ref").glob("shard-*.tar"))
    assert ref == sorted(p.name for p in (tmp_path / "killed").glob("shard-*.tar")) and len(ref) == 24
    for name in ref:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_shards_read_with_tar_and_check_command(tmp_path):
    manifest = _build("--kind", "folder", "--input", _folder(tmp_path / "in"), "--out", tmp_path / "out")
    first = tmp_path / "out" / manifest["shards"][0]
    listing = subprocess.run(["tar", "-tf", str(first)], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["good0.jpg", "good0.txt", "good0.json"]
    report = check_shards([str(tmp_path / "out" / s) for s in manifest["shards"]])
    assert report["samples"] == report["ok"] == 6 and not report["problems"]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(first.read_bytes()[:700])
    assert check_shards([str(broken)])["problems"]


def test_deterministic_for_input_and_seed(tmp_path):
    folder = _folder(tmp_path / "in")
    a = _build("--kind", "folder", "--input", folder, "--out", tmp_path / "a", "--shuffle-seed", "3")
    b = _build("--kind", "folder", "--input", folder, "--out", tmp_path / "b", "--shuffle-seed", "3")
    c = _build("--kind", "folder", "--input", folder, "--out", tmp_path / "c", "--shuffle-seed", "4")
    for name in a["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [(tmp_path / "a" / n).read_bytes() for n in a["shards"]] != [(tmp_path / "c" / n).read_bytes()
                                                                          for n in c["shards"]]


def test_parallel_workers_and_byte_sized_shards_match_serial(tmp_path):
    folder = _folder(tmp_path / "in")
    serial = cli(["build", "--kind", "folder", "--input", str(folder), "--out", str(tmp_path / "s"),
                  "--shard-count", "0", "--shard-bytes", "12000"])
    parallel = cli(["build", "--kind", "folder", "--input", str(folder), "--out", str(tmp_path / "p"),
                    "--shard-count", "0", "--shard-bytes", "12000", "--workers", "2"])
    assert serial["shards"] == parallel["shards"] and len(serial["shards"]) > 1
    assert serial["skipped"] == parallel["skipped"]
    for name in serial["shards"]:
        data = (tmp_path / "s" / name).read_bytes()
        assert data == (tmp_path / "p" / name).read_bytes()
        # a shard exceeds the byte target only when a single sample does
        assert len(data) <= 12000 + 10240 or serial["counts"][name] == 1


def test_folder_keys_that_collide_are_made_unique_and_all_reach_training(tmp_path):
    from vilseg.data.multicrop import MultiCrop
    from vilseg.data.stream import make_train_stream

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    names = ["a b.jpg", "a.b.jpg", "a_b.jpg", "sub/x.jpg", "sub_x.jpg", "plain.jpg"]
    for i, name in enumerate(names):
        (root / name).write_bytes(_jpeg(200 + i))
        (root / name).with_suffix(".txt").write_text(f"caption {i}")
    manifest = _build("--kind", "folder", "--input", root, "--out", tmp_path / "out")
    assert manifest["samples"] == 6 and not manifest["skipped"]
    keys = _keys(manifest["pattern"])
    assert len(set(keys)) == 6 and "plain" in keys  # a key without a collision is kept as it was
    stream = make_train_stream(manifest["pattern"], MultiCrop(16, 8, 1, 0), 1, resampled=False)
    batches = list(stream)
    assert sorted(k for b in batches for k in b["keys"]) == keys
    assert sorted(b["captions"][0] for b in batches) == [f"caption {i}" for i in range(6)]
    assert not any(b["skipped"] for b in batches)


def test_symlinks_leading_outside_the_input_are_refused_unless_allowed(tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwords.txt").write_text("hunter2")
    (outside / "photo.jpg").write_bytes(_jpeg(300))
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jpg").write_bytes(_jpeg(301))
    (root / "a.txt").symlink_to(outside / "passwords.txt")  # a sidecar caption leading outside
    (root / "b.jpg").symlink_to(outside / "photo.jpg")  # an image leading outside
    (root / "b.txt").write_text("b")
    (root / "c.jpg").write_bytes(_jpeg(302))
    (root / "c.txt").write_text("c")
    (root / "d.jpg").symlink_to(root / "c.jpg")  # a symlink that stays inside is fine
    (root / "d.txt").write_text("d")
    manifest = _build("--kind", "folder", "--input", root, "--out", tmp_path / "out", "--no-dedup")
    assert manifest["samples"] == 2 and manifest["skipped"] == {"outside_input": 2}
    assert "hunter2" not in json.dumps(manifest)
    allowed = _build("--kind", "folder", "--input", root, "--out", tmp_path / "out2", "--allow-outside-input",
                     "--no-dedup")
    assert allowed["samples"] == 4
    # a table row whose path is a symlink pointing outside --root
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(_jpeg(303))
    (images / "link.jpg").symlink_to(outside / "photo.jpg")
    (tmp_path / "t.csv").write_text("path,caption\nok.jpg,fine\nlink.jpg,escapes\n")
    table = _build("--kind", "table", "--input", tmp_path / "t.csv", "--root", images, "--out", tmp_path / "out3")
    assert table["samples"] == 1 and table["skipped"] == {"outside_input": 1}


def test_prefix_must_be_a_plain_name_and_out_must_fit_a_pattern(tmp_path, capsys):
    folder = _folder(tmp_path / "in")
    (tmp_path / "victim-000000.tar").write_bytes(b"precious")
    for prefix in ("../victim", "/abs/prefix", "a/b", ".hidden", ""):
        with pytest.raises(SystemExit) as exit_info:
            _build("--kind", "folder", "--input", folder, "--out", tmp_path / "out", "--prefix", prefix)
        assert exit_info.value.code == 2
        assert f"--prefix {prefix!r} is not a plain name" in capsys.readouterr().err
    assert (tmp_path / "victim-000000.tar").read_bytes() == b"precious"
    for out in ("sh{a,b}", "a::b"):
        with pytest.raises(SystemExit):
            _build("--kind", "folder", "--input", folder, "--out", tmp_path / out)
        assert "brace expansion" in capsys.readouterr().err
    # a stray file next to the shards and a prefix with a dot: written, then resumed, without error
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cc3m.v2-notes.md").write_text("notes")
    first = _build("--kind", "folder", "--input", folder, "--out", tmp_path / "out", "--prefix", "cc3m.v2")
    again = _build("--kind", "folder", "--input", folder, "--out", tmp_path / "out", "--prefix", "cc3m.v2")
    assert first["samples"] == again["samples"] == 6 and (tmp_path / "out" / "cc3m.v2-notes.md").is_file()


def test_check_command_prints_a_json_report(tmp_path, capsys):
    manifest = _build("--kind", "folder", "--input", _folder(tmp_path / "in"), "--out", tmp_path / "out")
    capsys.readouterr()
    report = cli(["check", manifest["pattern"]])
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == report["samples"] == 6 and printed["extensions"] == {"jpg": 6, "txt": 6, "json": 6}
    assert cli(["check", str(tmp_path / "out")])["shards"] == len(manifest["shards"])  # a folder: its shards
    for bad, named in ((tmp_path / "nothing-*.tar", "nothing-*.tar"), (tmp_path / "in", "no .tar shard")):
        with pytest.raises(SystemExit) as exit_:
            cli(["check", str(bad)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and named in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_keys_with_control_characters_are_refused():
    result = process(RawSample("line\nbreak", "src", _jpeg(1), ["a caption"]), Options())
    assert result.reason == "unsafe_path"
    assert process(RawSample("fine_key", "src", _jpeg(1), ["a caption"]), Options()).reason is None
