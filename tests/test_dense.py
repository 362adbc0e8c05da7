"""Region distillation (`dense`): the loss against a naive loop (forward and gradient), the crop geometry (flips,
partial overlaps), and the objective in a training step."""
import math

import pytest
import torch
import torch.nn.functional as F

from vilseg.losses import box_in_view, region_distillation


def _bilinear(fmap, y, x):
    """torchvision RoIAlign's bilinear sample of a [E, h, w] map at (y, x) (its border rules)."""
    _, h, w = fmap.shape
    if y < -1 or y > h or x < -1 or x > w:
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def _naive_pool(fmap, box):
    """The mean of RoIAlign's samples over one box ([0, 1] coords), output 1x1, adaptive sampling, aligned."""
    _, h, w = fmap.shape
    x0, y0, x1, y1 = box[0] * w - 0.5, box[1] * h - 0.5, box[2] * w - 0.5, box[3] * h - 0.5
    rh, rw = y1 - y0, x1 - x0
    gh, gw = math.ceil(rh), math.ceil(rw)
    total = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    for iy in range(gh):
        for ix in range(gw):
            total = total + _bilinear(fmap, y0 + (iy + 0.5) * rh / gh, x0 + (ix + 0.5) * rw / gw)
    return total / max(gh * gw, 1)


def _naive_loss(patch_embed, boxes, targets, valid):
    cosines = []
    for b in range(patch_embed.shape[0]):
        for l in range(boxes.shape[1]):
            if valid[b, l]:
                pooled = _naive_pool(patch_embed[b], boxes[b, l].tolist())
                cosines.append(F.cosine_similarity(pooled, targets[b, l], dim=0))
    return 1 - torch.stack(cosines).mean()


def test_region_distillation_equals_a_naive_loop_forward_and_gradient():
    g = torch.Generator().manual_seed(0)
    b, n, e, h, w = 3, 4, 6, 5, 7
    embed = F.normalize(torch.randn(b, e, h, w, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    xy0 = torch.rand(b, n, 2, generator=g, dtype=torch.float64) * 0.6
    boxes = torch.cat([xy0, xy0 + 0.1 + torch.rand(b, n, 2, generator=g, dtype=torch.float64) * 0.3], -1)
    targets = F.normalize(torch.randn(b, n, e, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.rand(b, n, generator=g) > 0.3
    valid[0, 0] = True
    fast = region_distillation(embed, boxes, targets, valid)
    (grad_fast,) = torch.autograd.grad(fast, embed)
    slow = _naive_loss(embed, boxes, targets, valid)
    (grad_slow,) = torch.autograd.grad(slow, embed)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-9, atol=1e-10)
    # invalid pairs change nothing; with none valid the loss is a connected zero
    moved = targets.clone()
    moved[~valid] = -moved[~valid]
    torch.testing.assert_close(region_distillation(embed, boxes, moved, valid), fast)
    none = region_distillation(embed, boxes, targets, torch.zeros_like(valid))
    assert none.item() == 0 and none.requires_grad


def test_a_crop_is_found_in_a_flipped_view_where_the_flip_put_it():
    # a map whose content is mirrored: the flipped view of the same source must give the same pooled embedding
    g = torch.Generator().manual_seed(1)
    source = F.normalize(torch.randn(1, 4, 6, 6, generator=g), dim=1)
    view_box = torch.tensor([[0.1, 0.0, 0.9, 0.8]])
    crop = torch.tensor([[[0.15, 0.1, 0.45, 0.5]]])
    target = F.normalize(torch.randn(1, 1, 4, generator=g), dim=-1)
    valid = torch.ones(1, 1, dtype=torch.bool)
    plain, inside = box_in_view(crop, view_box[:, None], torch.tensor([[False]]))
    mirrored, inside_f = box_in_view(crop, view_box[:, None], torch.tensor([[True]]))
    assert inside.item() == pytest.approx(1.0) and inside_f.item() == pytest.approx(1.0)
    torch.testing.assert_close(plain, torch.tensor([[[0.0625, 0.125, 0.4375, 0.625]]]))
    torch.testing.assert_close(mirrored, torch.tensor([[[0.5625, 0.125, 0.9375, 0.625]]]))
    a = region_distillation(source, plain, target, valid)
    b = region_distillation(source.flip(-1), mirrored, target, valid)
    torch.testing.assert_close(a, b)
    # without undoing the flip the crop lands elsewhere and the loss differs
    assert not torch.allclose(region_distillation(source.flip(-1), plain, target, valid), a)


def test_box_in_view_reports_the_part_of_a_crop_inside_the_view():
    local, inside = box_in_view(torch.tensor([[0.0, 0.0, 0.2, 0.4]]), torch.tensor([[0.1, 0.2, 0.6, 0.7]]),
                                torch.tensor([False]))
    assert inside.item() == pytest.approx(0.25)  # x from 0.1 to 0.2 of 0-0.2, y from 0.2 to 0.4 of 0-0.4
    torch.testing.assert_close(local, torch.tensor([[0.0, 0.0, 0.2, 0.4]]))


def test_dense_objective_trains_the_patches_and_the_projection_toward_the_teacher(tmp_path):
    from vilseg.models import create_model
    from vilseg.objectives import EMATeacher, Learner, build_objectives

    torch.manual_seed(0)
    model = create_model("vilseg-tiny")
    objectives, weights = build_objectives({"dense": {"weight": 1.0, "min_inside": 0.5}}, model)
    learner = Learner(model, objectives, weights, n_global=2)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads())
    size = model.config.image.img_size
    batch = {"views": [torch.randn(4, 3, size, size), torch.randn(4, 3, size, size),
                       torch.randn(4, 3, size // 2, size // 2)],
             "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.9, 0.9], [0.2, 0.2, 0.5, 0.5]]).expand(4, 3, 4),
             "flips": torch.tensor([False, True, False]).expand(4, 3)}
    terms = learner(batch, teacher)
    terms["loss"].backward()
    assert set(terms) == {"dense", "loss"} and 0 < terms["dense"].item() < 2
    assert model.image_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_encoder.parameters())
    assert "dense" in teacher.heads  # the target comes from the teacher's copy of the projection
    with pytest.raises(ValueError, match="min_inside"):
        build_objectives({"dense": {"min_inside": 0.0}}, model)


def test_patch_aligned_infonce_equals_a_naive_loop_forward_and_gradient():
    from vilseg.losses import patch_aligned_infonce

    g = torch.Generator().manual_seed(4)
    b, n, e = 3, 5, 4
    patches = F.normalize(torch.randn(b, n, e, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    neg = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.tensor([True, False, True])
    scale = torch.tensor(7.0, dtype=torch.float64)

    def phi(i, t):  # PACL's compatibility of image i with text vector t, one patch at a time
        weights = torch.stack([patches[i, k] @ t for k in range(n)]).softmax(0)
        pooled = sum(weights[k] * patches[i, k] for k in range(n))
        return pooled @ t / pooled.norm()

    loss = 0.0
    for i in range(b):
        row = [scale * phi(i, text[j]) for j in range(b)] + [scale * phi(i, neg[j]) for j in range(b) if valid[j]]
        loss = loss + 0.5 * -torch.log_softmax(torch.stack(row), 0)[i] / b
        col = torch.stack([scale * phi(k, text[i]) for k in range(b)])
        loss = loss + 0.5 * -torch.log_softmax(col, 0)[i] / b
    fast = patch_aligned_infonce(patches, text, scale, neg, valid)
    torch.testing.assert_close(fast, loss)
    for wrt in (patches, text):
        torch.testing.assert_close(torch.autograd.grad(fast, wrt, retain_graph=True)[0],
                                   torch.autograd.grad(loss, wrt, retain_graph=True)[0])
