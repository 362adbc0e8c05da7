"""SlotCon as a grouping head: the slots grouping, prompting, prototype usage, and `vilseg segment` with a model
trained by the slotcon objective (configs/slotcon/pretrain-debug.yaml)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_slot_grouping_splits_each_prototype_into_connected_segments():
    from vilseg.inference.strategies import SlotGrouping

    dots = torch.zeros(1, 3, 4, 4)
    dots[0, 0] = 1.0  # prototype 0 everywhere ...
    dots[0, 1, :, 0] = 2.0  # ... but prototype 1 on the left column
    dots[0, 1, :, 3] = 2.0  # ... and on the right column: two segments of one prototype
    ids = SlotGrouping()({"slot_dots": dots})
    assert ids.max().item() + 1 == 3
    assert len(set(ids[:, 0].tolist())) == 1 and ids[0, 0] != ids[0, 3] and ids[0, 1] != ids[0, 0]
    with pytest.raises(ValueError, match="prototypes"):
        SlotGrouping()({"cluster_probs": dots})


@pytest.fixture(scope="module")
def slotcon_model(tmp_path_factory):
    from vilseg import train
    from vilseg.inference import ReadOut

    run = tmp_path_factory.mktemp("slotcon")
    final = train.main(["--config", str(REPO / "configs/slotcon/pretrain-debug.yaml"), f"run.dir={run}",
                        "train.steps=4"])
    ReadOut("slots", "pool", threshold=None).save(final)
    return final


def test_segment_command_with_a_slotcon_trained_model(slotcon_model, tmp_path):
    from vilseg.cli import main
    from vilseg.data.synthetic import SyntheticWorld

    image = tmp_path / "scene.png"
    Image.fromarray(SyntheticWorld("eval", image_size=48, seed=0).scene(0).image).save(image)
    assert main(["segment", str(image), "--model", str(slotcon_model), "--classes", "red circle,blue square",
                 "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "scene.json").read_text())
    labels = np.asarray(Image.open(tmp_path / "out" / "scene.png"))
    assert labels.shape == (48, 48) and record["segments"]
    usage = record["prototypes"]
    assert usage["total"] == 8 and usage["used"] + len(usage["unused"]) == 8 and usage["used"] >= 1


def test_prompting_patch_and_prototype_usage(slotcon_model):
    from vilseg.inference import Segmenter
    from vilseg.data.synthetic import SyntheticWorld

    seg = Segmenter.from_pretrained(slotcon_model, vocabulary=["red circle"])
    scene = SyntheticWorld("eval", image_size=32, seed=0).scene(1).image
    mask = seg.prompt(scene, (10, 10))
    assert mask.shape == (32, 32) and mask[10, 10]
    ids = seg.grouping(seg.tiling(seg.model, seg.preprocess(scene)[0]))
    patch = seg.patch
    assert mask.sum() == (ids == ids[10 // patch, 10 // patch]).sum().item() * patch * patch  # the prompted segment
    usage = seg.prototype_usage([scene])
    hits = np.bincount(seg.tiling(seg.model, seg.preprocess(scene)[0])["slot_dots"].argmax(1).flatten().numpy(),
                       minlength=8)
    assert usage["patches"] == hits.tolist() and usage["unused"] == [i for i in range(8) if hits[i] == 0]
