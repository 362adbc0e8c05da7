"""Every loss against a naive reference (forward and gradient), plus view alignment and the 2-process gloo check."""
import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vilseg.losses import (align_to_box, cross_modal_infonce, distillation_loss, global_contrast, iic_loss, masked_l1,
                           overlap_boxes, vision_contrast)


def _naive_xm(img, txt, scale):
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        row_i = torch.stack([scale * img[i] @ txt[j] for j in range(b)])
        row_t = torch.stack([scale * txt[i] @ img[j] for j in range(b)])
        total = total - torch.log_softmax(row_i, 0)[i] - torch.log_softmax(row_t, 0)[i]
    return total / (2 * b)


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward()
    return out.detach(), [t.grad for t in tensors]


def test_cross_modal_matches_naive_forward_and_grad():
    img = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.0, dtype=torch.float64)
    fast, g_fast = _grads(cross_modal_infonce, img, txt, scale)
    slow, g_slow = _grads(_naive_xm, img, txt, scale)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


def _naive_vis(student, teacher, tau):
    terms = []
    for g, w in enumerate(teacher):
        for v, u in enumerate(student):
            if v == g:
                continue
            b = u.shape[0]
            per = [-(torch.exp(u[i] @ w[i] / tau) / sum(torch.exp(u[i] @ w[j] / tau) for j in range(b))).log()
                   for i in range(b)]
            terms.append(torch.stack(per).mean())
    return torch.stack(terms).mean()


def test_vision_contrast_matches_naive_forward_and_grad():
    student = [F.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1) for _ in range(4)]
    teacher = [F.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1) for _ in range(2)]
    fast, g_fast = _grads(lambda *s: vision_contrast(list(s), teacher, 0.2), *student)
    slow, g_slow = _grads(lambda *s: _naive_vis(list(s), teacher, 0.2), *student)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


def _naive_iic(p1, p2, lam, eps):
    n, c = p1.shape
    joint = torch.zeros(c, c, dtype=p1.dtype)
    for i in range(n):
        joint = joint + torch.outer(p1[i], p2[i])
    joint = joint / n
    joint = (joint + joint.t()) / 2
    joint = (joint / joint.sum()).clamp_min(eps)
    loss = 0.0
    for a in range(c):
        for b in range(c):
            pa, pb = joint[a].sum(), joint[:, b].sum()
            loss = loss - joint[a, b] * (joint[a, b].log() - lam * pa.log() - lam * pb.log())
    return loss


@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_iic_matches_naive_forward_and_grad(lam):
    logits1, logits2 = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    fast, g_fast = _grads(lambda a, b: iic_loss(a.softmax(-1), b.softmax(-1), lam), logits1, logits2)
    slow, g_slow = _grads(lambda a, b: _naive_iic(a.softmax(-1), b.softmax(-1), lam, 1e-8), logits1, logits2)
    torch.testing.assert_close(fast, slow.to(fast.dtype), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


def test_iic_is_negative_mutual_information_for_perfect_agreement():
    # Identical one-hot assignments spread evenly over C clusters: MI = log C, so the loss is -log C.
    c = 4
    p = F.one_hot(torch.arange(40) % c, c).float()
    assert math.isclose(iic_loss(p, p).item(), -math.log(c), rel_tol=1e-5)


def test_iic_runs_in_fp32_under_autocast():
    p = torch.rand(16, 6).softmax(-1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = iic_loss(p, p)
    assert out.dtype == torch.float32


def test_align_to_box_recovers_the_shared_region_across_flip():
    # Source map S; view A = left 12 columns, view B = right 12 columns, horizontally flipped.
    src = torch.randn(1, 3, 16, 16)
    view_a = src[..., :, 0:12]
    view_b = src[..., :, 4:16].flip(-1)
    box_a = torch.tensor([[0.0, 0.0, 0.75, 1.0]])
    box_b = torch.tensor([[0.25, 0.0, 1.0, 1.0]])
    local_a, local_b, valid = overlap_boxes(box_a, box_b)
    assert valid.all()
    torch.testing.assert_close(local_a, torch.tensor([[1 / 3, 0.0, 1.0, 1.0]]))
    a = align_to_box(view_a, local_a, torch.tensor([False]), 8)
    b = align_to_box(view_b, local_b, torch.tensor([True]), 8)
    # RoIAlign clamps samples that fall past a map's last pixel centre, and every side of an overlap box is the
    # edge of one view, so only the outermost output columns may differ; the interior must match exactly.
    inner = (..., slice(1, -1))
    torch.testing.assert_close(a[inner], b[inner], rtol=1e-5, atol=1e-5)
    # and both equal the source's own overlap region (columns 4..12) resampled to 8 x 8
    direct = align_to_box(src, torch.tensor([[0.25, 0.0, 0.75, 1.0]]), torch.tensor([False]), 8)
    torch.testing.assert_close(a[inner], direct[inner], rtol=1e-5, atol=1e-5)
    # without the flip correction, the flipped view would not line up
    wrong = align_to_box(view_b, local_b, torch.tensor([False]), 8)
    assert not torch.allclose(wrong[inner], a[inner], atol=1e-2)


def test_overlap_boxes_marks_disjoint_crops_invalid():
    _, _, valid = overlap_boxes(torch.tensor([[0.0, 0.0, 0.4, 1.0]]), torch.tensor([[0.5, 0.0, 1.0, 1.0]]))
    assert not valid.any()


def _gloo_worker(rank, world, init_file, img, txt, scale, result_file):
    import torch.distributed as dist

    import gloo_worker

    gloo_worker.start(rank, world, init_file)
    b = img.shape[0] // world
    local_img = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    local_txt = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss = cross_modal_infonce(local_img, local_txt, scale)
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    grads_i = [torch.zeros_like(local_img) for _ in range(world)]
    grads_t = [torch.zeros_like(local_txt) for _ in range(world)]
    dist.all_gather(grads_i, local_img.grad)
    dist.all_gather(grads_t, local_txt.grad)
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grad_img": torch.cat(grads_i) / world,
                    "grad_txt": torch.cat(grads_t) / world}, result_file)
    gloo_worker.leave()


def test_cross_modal_two_process_gloo_equals_single_process_concatenated_batch():
    world = 2
    img = F.normalize(torch.randn(8, 6), dim=-1)
    txt = F.normalize(torch.randn(8, 6), dim=-1)
    scale = torch.tensor(10.0)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_gloo_worker, args=(world, os.path.join(tmp, "init"), img, txt, scale, result), nprocs=world)
        dist_out = torch.load(result)
    single, (g_img, g_txt) = _grads(lambda a, b: cross_modal_infonce(a, b, scale), img, txt)
    # DDP averages gradients over processes: the mean over ranks of the local losses and gradients must equal
    # the single-process loss and gradient on the concatenated batch.
    torch.testing.assert_close(dist_out["loss"], single)
    torch.testing.assert_close(dist_out["grad_img"], g_img)
    torch.testing.assert_close(dist_out["grad_txt"], g_txt)


def test_cross_modal_hard_negatives_match_naive_forward_and_grad():
    img = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    valid = torch.tensor([True, False, True, True, False])
    scale = torch.tensor(12.0, dtype=torch.float64)

    def naive(a, t, n):
        total = 0.0
        for i in range(5):
            cols = [scale * a[i] @ t[j] for j in range(5)] + [scale * a[i] @ n[j] for j in range(5) if valid[j]]
            rows = [scale * t[i] @ a[j] for j in range(5)]
            total = total - torch.log_softmax(torch.stack(cols), 0)[i] - torch.log_softmax(torch.stack(rows), 0)[i]
        return total / 10

    fast, g_fast = _grads(lambda a, t, n: cross_modal_infonce(a, t, scale, n, valid), img, txt, neg)
    slow, g_slow = _grads(naive, img, txt, neg)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ MMC's losses


def test_masked_l1_matches_naive_forward_and_grad():
    pred, target = torch.randn(2, 3, 4, 6, dtype=torch.float64), torch.randn(2, 3, 4, 6, dtype=torch.float64)
    mask = torch.rand(2, 4, 6) > 0.5

    def naive(p):
        total, count = 0.0, 0
        for b in range(2):
            for i in range(4):
                for j in range(6):
                    if mask[b, i, j]:
                        total = total + sum((p[b, c, i, j] - target[b, c, i, j]).abs() for c in range(3))
                        count += 3
        return total / count

    fast, (g_fast,) = _grads(lambda p: masked_l1(p, target, mask), pred)
    slow, (g_slow,) = _grads(naive, pred)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(g_fast, g_slow)
    # unmasked pixels get no gradient; an empty mask gives 0, not NaN
    assert (g_fast.abs().sum(1)[~mask] == 0).all()
    assert masked_l1(pred, target, torch.zeros(2, 4, 6, dtype=torch.bool)).item() == 0.0


def _naive_distillation(student, teacher, center, tau_s, tau_t):
    terms = []
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            per = []
            for b in range(s.shape[0]):
                q = torch.exp((t[b] - center) / tau_t) / torch.exp((t[b] - center) / tau_t).sum()
                logp = s[b] / tau_s - torch.log(torch.exp(s[b] / tau_s).sum())
                per.append(-(q * logp).sum())
            terms.append(torch.stack(per).mean())
    return torch.stack(terms).mean()


def test_distillation_matches_naive_forward_and_grad():
    student = [torch.randn(3, 7, dtype=torch.float64) for _ in range(4)]  # 2 globals + 2 locals
    teacher = [torch.randn(3, 7, dtype=torch.float64) for _ in range(2)]
    center = 0.1 * torch.randn(7, dtype=torch.float64)
    fast, g_fast = _grads(lambda *s: distillation_loss(list(s), teacher, center, 0.1, 0.05), *student)
    slow, g_slow = _grads(lambda *s: _naive_distillation(list(s), teacher, center, 0.1, 0.05), *student)
    torch.testing.assert_close(fast.double(), slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the teacher is a target: no gradient reaches it
    t = [x.clone().requires_grad_(True) for x in teacher]
    distillation_loss([x.clone().requires_grad_(True) for x in student], t, center, 0.1, 0.05).backward()
    assert all(x.grad is None for x in t)


def test_global_contrast_matches_naive_forward_and_grad():
    q = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    tau = 0.2

    def naive(q):
        total = 0.0
        for i in range(5):
            logits = torch.stack([q[i] @ k[j] / tau for j in range(5)])
            total = total - torch.log_softmax(logits, 0)[i]
        return 2 * tau * total / 5

    fast, (g_fast,) = _grads(lambda x: global_contrast(x, k, tau), q)
    slow, (g_slow,) = _grads(naive, q)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(g_fast, g_slow)
