"""Guarded collectives: the same code runs in one process and under torch.distributed."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from every process along dim 0, keeping the autograd graph.

    ``torch.distributed.nn.functional.all_gather`` sums the incoming gradients in backward, so each process's
    local embeddings receive the gradient of every process's loss (``accelerator.gather`` would drop it).
    """
    if not is_dist() or world_size() == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from every process along dim 0 (no gradient; e.g. EMA-teacher keys)."""
    if not is_dist() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over every process (a copy; ``x`` itself is unchanged)."""
    return all_reduce_sum(x) / world_size() if is_dist() else x


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over every process, keeping the autograd graph (its backward sums the incoming gradients).

    For a loss L(sum_r x_r) that every process computes identically, each process's x_r then receives
    W * dL/dx, and DDP's gradient averaging divides the W back out: the parameters get exactly the gradient of L on
    the concatenated batch.
    """
    if not is_dist() or world_size() == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd reduce
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over every process (no gradient; a copy)."""
    if not is_dist() or world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """A local sum turned into this process's share of the mean over every process: the sum divided by the count of
    every process, times the world size for DDP's gradient averaging, so that W processes train exactly as one on
    the concatenated batch (also when their counts differ). Zero, still in the graph, when the total count is 0."""
    total = all_reduce_sum(local_count.detach().float())
    if total == 0:
        return 0.0 * local_sum
    return local_sum * world_size() / total
