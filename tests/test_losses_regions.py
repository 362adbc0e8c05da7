"""MaskCo's and SlotCon's losses against naive loop references, forward and gradient."""
import math

import torch
import torch.nn.functional as F

from vilseg.losses import attentive_pool, grouping_loss, region_contrast, slot_contrast


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward()
    return out.detach(), [t.grad for t in tensors]


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_region_contrast_matches_naive_forward_and_grad():
    torch.manual_seed(0)
    q, k, queue, same = _unit(5, 8), _unit(5, 8), _unit(7, 8), _unit(5, 3, 8)
    valid = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, False, False],
                          [True, True, True]])
    tau = 0.2

    def naive(q, k, queue, same):
        total = 0.0
        for r in range(len(q)):
            pos = torch.exp(q[r] @ k[r] / tau)
            neg = sum(torch.exp(q[r] @ n / tau) for n in queue)
            neg = neg + sum(torch.exp(q[r] @ same[r, j] / tau) for j in range(3) if valid[r, j])
            total = total - torch.log(pos / (pos + neg))
        return total / len(q)

    fast, g_fast = _grads(lambda *t: region_contrast(*t, temperature=tau, same_valid=valid), q, k, queue, same)
    slow, g_slow = _grads(naive, q, k, queue, same)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)
    # an empty queue and no same-image regions: only the positive, loss 0
    assert region_contrast(q, k, queue[:0], None, tau).item() == 0.0


def test_grouping_loss_matches_naive_forward_and_grad():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 3, 3, dtype=torch.float64), torch.randn(2, 5, 3, 3, dtype=torch.float64)
    c = torch.randn(5, dtype=torch.float64)

    def naive(s, t, c):
        total, n = 0.0, 0
        for b in range(2):
            for y in range(3):
                for x in range(3):
                    target = [math.exp((t[b, k, y, x] - c[k]) / 0.07) for k in range(5)]
                    z = sum(target)
                    logz = torch.logsumexp(s[b, :, y, x] / 0.1, 0)
                    total = total - sum(target[k] / z * (s[b, k, y, x] / 0.1 - logz) for k in range(5))
                    n += 1
        return total / n

    fast, g_fast = _grads(lambda s, t, c: grouping_loss(s, t, c, 0.1, 0.07), s, t, c)
    slow, g_slow = _grads(lambda s, t, c: naive(s, t.detach(), c.detach()), s, t, c)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(g_fast[0], g_slow[0])


def test_slot_contrast_matches_naive_forward_and_grad():
    torch.manual_seed(2)
    q, keys = _unit(4, 6), _unit(9, 6)
    labels = torch.tensor([0, 3, 3, 8])
    tau = 0.2

    def naive(q, keys):
        total = 0.0
        for n in range(len(q)):
            logits = torch.stack([q[n] @ keys[m] / tau for m in range(len(keys))])
            total = total - (logits[labels[n]] - torch.logsumexp(logits, 0))
        return 2 * tau * total / len(q)

    fast, g_fast = _grads(lambda q, k: slot_contrast(q, k, labels, tau), q, keys)
    slow, g_slow = _grads(naive, q, keys)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)
    empty = torch.zeros(0, 6, requires_grad=True)
    out = slot_contrast(empty, keys.float(), labels[:0], tau)
    out.backward()
    assert out.item() == 0.0 and empty.grad is not None


def test_attentive_pool_matches_naive():
    torch.manual_seed(3)
    x, dots = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 5, 3, 3, dtype=torch.float64)
    got = attentive_pool(x, dots, 0.07)
    for b in range(2):
        attn = (dots[b] / 0.07).softmax(0) + 1e-6  # [K, H, W]
        for k in range(5):
            expect = sum(attn[k, i, j] * x[b, :, i, j] for i in range(3) for j in range(3)) / attn[k].sum()
            torch.testing.assert_close(got[b, k], expect)
