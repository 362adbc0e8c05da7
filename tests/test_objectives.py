"""Objectives as plug-ins: the migrated ViL-Seg terms equal the pre-migration ones, MMC's schedules and state, option
validation, and gradients reaching every trained parameter."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vilseg.data.masking import BlockMasking
from vilseg.models import create_model
from vilseg.objectives import EMATeacher, Learner, build_objectives, ema_momentum
from vilseg.training.text_cache import TextFeatureCache

GOLDEN = Path(__file__).parent / "data" / "vilseg_golden.safetensors"


def _golden():
    with safe_open(str(GOLDEN), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _rename(key: str) -> str:
    """Pre-migration names -> today's: the vision head moved from the model into the `vis` objective."""
    return key.replace("vision_head.", "objectives.vis.head.", 1) if key.startswith("vision_head.") else "model." + key


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("cached_text", [False, True])
def test_migrated_vilseg_losses_equal_the_pre_migration_objective(detach, cached_text):
    # tests/data/vilseg_golden.safetensors holds the loss terms and gradients that the pre-migration code
    # (commit fe04f0d: ViLSegObjective + ViLSeg.forward) computed for these weights and this batch; see the
    # generator in that commit's history (tests/data/make_vilseg_golden.py).
    data, meta = _golden()
    model = create_model("vilseg-tiny-minilm")
    objectives, weights = build_objectives({
        "xm": {"weight": 1.0}, "vis": {"weight": 0.5, "temperature": 0.1, "dim": 16, "hidden": 32},
        "clu": {"weight": 1.0, "align_size": 4, "detach": detach}}, model)
    cache = TextFeatureCache(model.text_encoder, model.tokenizer) if cached_text else None
    learner = Learner(model, objectives, weights, n_global=2, text_cache=cache)
    state = {_rename(k[len("init."):]): v for k, v in data.items() if k.startswith("init.")}
    missing, unexpected = learner.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.text_encoder.") for k in missing)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads())
    teacher.load_state_dict({k[len("teacher."):].replace("vision_head.", "heads.vis.", 1): v
                             for k, v in data.items() if k.startswith("teacher.")})
    batch = {"views": [data[f"views.{i}"] for i in range(4)], "boxes": data["boxes"], "flips": data["flips"],
             "captions": json.loads(meta["captions"]), "neg_captions": json.loads(meta["negatives"]),
             "has_neg": data["has_neg"]}
    terms = learner(batch, teacher)
    terms["loss"].backward()
    tag = "detach" if detach else "e2e"
    for k in ("xm", "vis", "clu", "loss"):
        torch.testing.assert_close(terms[k].detach(), data[f"{tag}.term.{k}"], rtol=1e-5, atol=1e-6, msg=k)
    grads = {_rename(k[len(tag) + 6:]): v for k, v in data.items() if k.startswith(f"{tag}.grad.")}
    got = {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}
    assert got.keys() == grads.keys()
    for name, expected in grads.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_logit_scale_is_clamped_after_the_step_and_keeps_its_gradient_at_the_bound():
    model = create_model("vilseg-tiny-minilm")
    objectives, weights = build_objectives({"xm": {}}, model)
    learner = Learner(model, objectives, weights, n_global=1)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0) + 0.5)  # past the bound, as an optimizer step can leave it
    batch = {"views": [torch.randn(3, 3, 32, 32)], "boxes": torch.zeros(3, 1, 4), "flips": torch.zeros(3, 1).bool(),
             "captions": ["a red circle", "a blue square", "a green cross"]}
    learner(batch)["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    learner.after_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


@pytest.mark.parametrize("ratio", [(0.5, 0.75), (0.3, 0.3), (0.0, 0.2), (0.9, 1.0)])
def test_masked_fraction_follows_its_configured_range(ratio):
    masking = BlockMasking((8, 8), ratio, min_block=4)
    rng = np.random.default_rng(0)
    fractions = np.array([masking(rng).mean() for _ in range(300)])
    half_patch = 0.5 / 64  # round(r * N) patches
    assert fractions.min() >= ratio[0] - half_patch and fractions.max() <= ratio[1] + half_patch
    if ratio[1] - ratio[0] > 0.1:  # the draw covers the range, not one value
        assert fractions.max() - fractions.min() > 0.5 * (ratio[1] - ratio[0])


def test_masks_are_made_of_blocks():
    mask = BlockMasking((14, 14), (0.4, 0.4), min_block=16)(np.random.default_rng(1))
    # a block-wise mask of 40% has far fewer masked/unmasked borders than the same number of scattered patches
    borders = (mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
    scattered = np.zeros(196, bool)
    scattered[np.random.default_rng(1).choice(196, mask.sum(), replace=False)] = True
    scattered = scattered.reshape(14, 14)
    assert borders < 0.6 * ((scattered[1:] != scattered[:-1]).sum() + (scattered[:, 1:] != scattered[:, :-1]).sum())


def test_ema_schedule_hits_its_endpoints_and_rises_monotonically():
    assert ema_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert ema_momentum(250, 100, 0.996) == pytest.approx(1.0)  # past the end: stays at the final value
    assert ema_momentum(100, 100, 0.99, final=0.999) == pytest.approx(0.999)
    values = [ema_momentum(s, 100, 0.99) for s in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert ema_momentum(50, 100, 0.99) == pytest.approx(0.995)  # cosine: half-way is the mid-point


def _msd(**options):
    model = create_model("vilseg-tiny")
    objectives, _ = build_objectives({"msd": {"out_dim": 8, "hidden": 16, "bottleneck": 4, **options}}, model)
    return objectives["msd"]


def test_teacher_temperature_warms_up_linearly_then_stays():
    msd = _msd(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup=0.3)
    assert msd.teacher_temp(0, 100) == pytest.approx(0.04)
    assert msd.teacher_temp(15, 100) == pytest.approx(0.055)
    assert msd.teacher_temp(30, 100) == pytest.approx(0.07)
    assert msd.teacher_temp(99, 100) == pytest.approx(0.07)
    assert _msd(teacher_temp_warmup=0.0).teacher_temp(0, 100) == pytest.approx(0.07)


def test_centre_is_an_ema_of_the_teacher_logits():
    msd = _msd(center_momentum=0.9)
    assert torch.equal(msd.center, torch.zeros(8))
    a, b = [torch.randn(4, 8), torch.randn(4, 8)], [torch.randn(4, 8), torch.randn(4, 8)]
    msd.update_center(a)
    first = 0.1 * torch.cat(a).mean(0)
    torch.testing.assert_close(msd.center, first)
    msd.update_center(b)
    torch.testing.assert_close(msd.center, 0.9 * first + 0.1 * torch.cat(b).mean(0))
    assert "center" in msd.state_dict()  # a buffer: checkpoints carry it


def test_unknown_objectives_and_options_and_bad_values_are_named():
    model = create_model("vilseg-tiny")
    with pytest.raises(KeyError, match=r"unknown objective 'mmc'.*known objectives"):
        build_objectives({"mmc": {}}, model)
    with pytest.raises(KeyError, match=r"'out_dm'.*objectives\.msd"):
        build_objectives({"msd": {"out_dm": 3}}, model)
    with pytest.raises(TypeError, match=r"objectives\.vis\.temperature must be a number, got 'hot'"):
        build_objectives({"vis": {"temperature": "hot"}}, model)
    with pytest.raises(TypeError, match=r"objectives\.msd\.out_dim must be an integer"):
        build_objectives({"msd": {"out_dim": 8.5}}, model)
    with pytest.raises(ValueError, match=r"objectives\.xm\.weight must be >= 0"):
        build_objectives({"xm": {"weight": -1}}, model)
    with pytest.raises(ValueError, match="every weight is zero"):
        build_objectives({"xm": {"weight": 0}}, model)
    objectives, weights = build_objectives({"xm": {"weight": 1}, "clu": {"weight": 0}}, model)
    assert list(objectives) == ["xm"] and weights == {"xm": 1.0}  # weight 0 switches an objective off


def _batch(model, b=4, n_local=2, masks=True):
    size = model.config.image.img_size
    grid = size // model.config.image.patch_size
    views = [torch.randn(b, 3, size, size) for _ in range(2)] + [torch.randn(b, 3, size // 2, size // 2)] * n_local
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]] + [[0.1, 0.1, 0.4, 0.4]] * n_local)
    batch = {"views": views, "boxes": boxes.expand(b, -1, 4), "flips": torch.tensor([False, True] + [False] * n_local
                                                                                    ).expand(b, -1),
             "captions": ["a red circle", "two blue squares", "a green cross and a red circle", "a square"][:b]}
    if masks:
        batch["masks"] = torch.rand(b, 2, grid, grid) > 0.5
    return batch


@pytest.mark.parametrize("spec", [
    {"xm": {}, "vis": {"dim": 16, "hidden": 32}, "clu": {}},
    {"mim": {}, "msd": {"out_dim": 32, "hidden": 16, "bottleneck": 8}, "gc": {"dim": 8, "hidden": 16}},
])
@pytest.mark.parametrize("fill", ["image", "noise"])
def test_every_trained_parameter_gets_a_gradient_and_terms_are_finite(spec, fill):
    from vilseg.training.stage import freeze_unused

    model = create_model("vilseg-tiny")
    objectives, weights = build_objectives(spec, model)
    freeze_unused(model, set().union(*(o.model_parts() for o in objectives.values())))
    learner = Learner(model, objectives, weights, n_global=2, corruption_fill=fill)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads()) if "teacher" in learner.needs else None
    terms = learner(_batch(model), teacher)
    assert set(terms) == set(spec) | {"loss"} and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    trained = [n for n, p in learner.named_parameters() if p.requires_grad]
    missing = [n for n, p in learner.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert trained and not missing, f"parameters without gradient: {missing}"
    if "xm" not in spec:  # an image-only stage trains neither the text side nor the clustering head
        assert not any(n.startswith(("model.text", "model.cluster_head", "model.logit_scale")) for n in trained)


def test_corruption_replaces_exactly_the_masked_patches():
    from vilseg.objectives.context import StepContext

    model = create_model("vilseg-tiny")
    objectives, weights = build_objectives({"mim": {}}, model)
    batch = _batch(model, masks=True)
    for fill in ("image", "noise"):
        ctx = StepContext(Learner(model, objectives, weights, corruption_fill=fill), batch)
        views, masks = ctx.corrupted
        for g in range(2):
            clean, pixels = batch["views"][g], masks[g].bool().expand_as(batch["views"][g])
            assert torch.equal(views[g][~pixels], clean[~pixels])  # untouched outside the mask
            assert (views[g][pixels] != clean[pixels]).float().mean() > 0.99  # replaced inside
            if fill == "image":  # by the same place of the next image of the batch
                assert torch.equal(views[g][pixels], clean.roll(1, 0)[pixels])
            patch = masks[g][:, 0, ::8, ::8].bool()
            assert torch.equal(patch, batch["masks"][:, g])
