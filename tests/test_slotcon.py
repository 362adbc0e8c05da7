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


def _reference_slotcon(model, predictor, views, local_boxes, flips, size, o):
    """SlotCon's loss as its authors compute it (one process): slots pool the *raw* projector output, RoIAlign uses
    torchvision's adaptive sampling, the teacher's centre starts at zero; written from the paper and the authors'
    description, independently of vilseg's objective."""
    import torch.nn.functional as F
    from torchvision.ops import roi_align

    head = model.slot_head
    protos = F.normalize(head.prototypes, dim=-1)
    raw, dots = [], []
    for v in views:
        feats = model.image_encoder(v)
        h, w = feats.grid
        x = head.projector(feats.patch_tokens).transpose(1, 2).reshape(len(v), -1, h, w)
        raw.append(x)
        dots.append(torch.einsum("kd,bdhw->bkhw", protos, F.normalize(x, dim=1)))

    def invaug(d, box, flip):
        h, w = d.shape[-2:]
        b = box.clone()
        b[flip, 0], b[flip, 2] = 1 - box[flip, 2], 1 - box[flip, 0]
        rois = torch.cat([torch.arange(len(d))[:, None].float(), b * torch.tensor([w, h, w, h])], 1)
        out = roi_align(d, rois, (size, size), aligned=True)  # default sampling_ratio: adaptive
        return torch.stack([o_.flip(-1) if f else o_ for o_, f in zip(out, flip)])

    def distill(q, k):
        return -(F.softmax(k / o.teacher_temp, 1) * F.log_softmax(q / o.student_temp, 1)).sum(1).mean()

    aligned = [invaug(d, local_boxes[i], flips[:, i]) for i, d in enumerate(dots)]
    group = distill(aligned[0], aligned[1].detach()) + distill(aligned[1], aligned[0].detach())

    def slots(x, d):
        attn = (d / o.teacher_temp).softmax(1) + 1e-6
        return torch.einsum("bdhw,bkhw->bkd", x, attn / attn.sum((2, 3), keepdim=True))

    def contrast(qs, qd, ks, kd):
        mq = F.one_hot(qd.argmax(1).flatten(1), qd.shape[1]).sum(1) > 0
        mk = F.one_hot(kd.argmax(1).flatten(1), kd.shape[1]).sum(1) > 0
        idx_q = (mq & mk).flatten().nonzero().squeeze(-1)
        idx_k = mk.flatten().nonzero().squeeze(-1)
        q = F.normalize(predictor(qs.flatten(0, 1)[idx_q]), dim=1)
        k = F.normalize(ks.flatten(0, 1), dim=1)[idx_k].detach()
        labels = mk.flatten().long().cumsum(0)[idx_q] - 1
        return F.cross_entropy(q @ k.t() / o.contrast_temp, labels) * 2 * o.contrast_temp

    s = [slots(x, d) for x, d in zip(raw, dots)]
    slot = contrast(s[0], dots[0], s[1], dots[1]) + contrast(s[1], dots[1], s[0], dots[0])
    return o.group_weight * group + o.slot_weight * slot


def test_slotcon_objective_equals_the_authors_computation_raw_slots_and_adaptive_roialign():
    from vilseg.losses import overlap_boxes
    from vilseg.models import create_model
    from vilseg.objectives import EMATeacher, Learner, build_objectives

    torch.manual_seed(0)
    model = create_model("vilseg-tiny", n_prototypes=8, prototype_dim=16, prototype_hidden=32)
    objectives, weights = build_objectives({"slotcon": {"hidden": 32, "align_size": 4}}, model)
    learner = Learner(model, objectives, weights, n_global=2)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads())  # at step 0: the student's copy
    size = model.config.image.img_size
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
    boxes = torch.tensor([[[0.0, 0.0, 0.83, 0.77], [0.11, 0.21, 1.0, 0.97]]]).repeat(4, 1, 1)
    flips = torch.tensor([[False, True], [True, False], [False, False], [True, True]])
    terms = learner({"views": views, "boxes": boxes, "flips": flips}, teacher)
    ours = terms["slotcon_group"] + terms["slotcon_slot"]
    local = overlap_boxes(boxes[:, 0], boxes[:, 1])
    with torch.no_grad():
        ref = _reference_slotcon(model, objectives["slotcon"].slot_predictor, views, local[:2], flips, 4,
                                 objectives["slotcon"].options)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)
    # the model's slot head returns the raw projection (what the slots pool), not a normalised copy
    feats = model.image_encoder(views[0])
    x, _ = model.slot_head(feats.patch_tokens, feats.grid)
    assert not torch.allclose(x.norm(dim=1), torch.ones(()))
