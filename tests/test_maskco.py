"""MaskCo: the query comes from the masked view, the key from the other augmented view (the paper's two views)."""
import numpy as np
import torch
import torch.nn.functional as F

from vilseg.losses import region_in_view


def test_maskco_query_and_key_come_from_different_views(monkeypatch):
    from vilseg.data.masking import BlockMasking
    from vilseg.models import create_model
    from vilseg.objectives import EMATeacher, Learner, build_objectives
    from vilseg.objectives import maskco as maskco_module
    from vilseg.objectives.maskco import pool_region

    torch.manual_seed(0)
    model = create_model("vilseg-tiny")
    objectives, weights = build_objectives({"maskco": {"dim": 8, "hidden": 16, "queue_size": 0}}, model)
    learner = Learner(model, objectives, weights, n_global=2, corruption_fill="noise")
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads())
    size, b = model.config.image.img_size, 4
    grid = size // model.image_encoder.patch_size
    g = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(0)
    masking = BlockMasking((grid, grid), (0.3, 0.5), min_block=1)
    batch = {"views": [torch.randn(b, 3, size, size, generator=g) for _ in range(2)],
             "boxes": torch.tensor([[0.0, 0.0, 0.8, 0.9], [0.15, 0.1, 1.0, 1.0]]).repeat(b, 1, 1),
             "flips": torch.tensor([[False, True], [True, False], [False, False], [True, True]]),
             "masks": torch.from_numpy(np.stack([[masking(rng) for _ in range(2)] for _ in range(b)]))}
    seen = []
    real = maskco_module.region_contrast
    monkeypatch.setattr(maskco_module, "region_contrast", lambda q, k, *a: seen.append((q, k)) or real(q, k, *a))
    learner(batch, teacher)
    assert len(seen) == 2
    project = teacher.heads["maskco"]
    with torch.no_grad():
        tokens = [f.patch_tokens for f in teacher.encode(batch["views"])]
        for v, (_, key) in enumerate(seen):
            other = 1 - v
            mask = batch["masks"][:, v].bool()
            region, visible = region_in_view(mask, batch["boxes"][:, v], batch["flips"][:, v],
                                             batch["boxes"][:, other], batch["flips"][:, other], (grid, grid))
            valid = (visible >= 0.5) & region.flatten(1).any(1)
            expected = F.normalize(project(pool_region(tokens[other], region.flatten(1))), dim=-1)[valid]
            same_view = F.normalize(project(pool_region(tokens[v], mask.flatten(1))), dim=-1)[valid]
            torch.testing.assert_close(key, expected)  # the key: the other view, over the block's place in it
            assert not torch.allclose(key, same_view, atol=1e-3)  # ... not the query's own view


def test_a_region_is_found_in_the_other_view_through_crops_and_flips():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    region, visible = region_in_view(mask, whole, torch.tensor([False]), whole, torch.tensor([True]), (4, 4))
    assert visible.item() == 1 and region[0].nonzero().tolist() == [[0, 3], [1, 2]]  # mirrored
    region, visible = region_in_view(mask, whole, torch.tensor([False]), torch.tensor([[0.0, 0.0, 0.5, 0.5]]),
                                     torch.tensor([False]), (4, 4))
    assert visible.item() == 1 and region[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1],
                                                               [0, 0, 1, 1]]  # zoomed in twice
    region, visible = region_in_view(mask, whole, torch.tensor([False]), torch.tensor([[0.25, 0.25, 1.0, 1.0]]),
                                     torch.tensor([False]), (3, 3))
    assert visible.item() == 0.5 and region[0].nonzero().tolist() == [[0, 0]]  # one of the two patches is cropped off
