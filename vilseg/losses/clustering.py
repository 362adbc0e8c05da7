"""IIC mutual-information clustering loss (Ji et al. 2019) and the geometry that aligns two views' patch grids."""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from ..training.distributed import all_reduce_sum, all_reduce_sum_with_grad


def iic_loss(p1: torch.Tensor, p2: torch.Tensor, lam: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Negative mutual information between the cluster assignments of aligned patch pairs (IIC, Ji et al. 2019).

    With Phi(z_i), Phi(z'_i) in the C-simplex for the n aligned pairs of *every* process (the joint matrix is summed
    over processes with its gradient, so the loss is that of the concatenated batch, not a mean of per-process
    mutual informations, which would differ):

        P = 1/n sum_i Phi(z_i) Phi(z'_i)^T ;  P <- (P + P^T)/2 ;  P <- P / sum(P) ;  P clamped at eps
        L_clu = - sum_{c,c'} P_cc' ( log P_cc' - lambda log P_c - lambda log P_c' )

    lambda > 1 pushes harder towards using every cluster (IIC's entropy weight). Always computed in fp32: the logs
    of small joint probabilities underflow in half precision.

    Every process must call it (with n = 0 pairs if it has none); if no process has a pair, the loss is a zero that
    keeps the graph connected.

    Args:
        p1, p2: [n, C] probabilities of aligned pairs.
        lam: lambda (1 is exact mutual information).
        eps: clamp for P (IIC uses sys.float_info.epsilon; 1e-8 is safe in fp32).
    """
    with torch.autocast(device_type=p1.device.type, enabled=False):
        p1, p2 = p1.float(), p2.float()
        n = all_reduce_sum(torch.tensor(float(p1.shape[0]), device=p1.device))
        if n == 0:
            return 0.0 * (p1.sum() + p2.sum())
        joint = all_reduce_sum_with_grad(p1.t() @ p2) / n  # [C, C]
        joint = (joint + joint.t()) / 2
        joint = (joint / joint.sum()).clamp_min(eps)
        pi = joint.sum(1, keepdim=True)  # [C, 1]
        pj = joint.sum(0, keepdim=True)  # [1, C]
        return -(joint * (joint.log() - lam * pi.log() - lam * pj.log())).sum()


def overlap_boxes(box_a: torch.Tensor, box_b: torch.Tensor, min_size: float = 1e-3):
    """Intersection of two crops, expressed in each crop's own normalised coordinates.

    Args:
        box_a, box_b: [B, 4] crop boxes (x0, y0, x1, y1) in the source image's [0, 1] coordinates.
        min_size: overlaps thinner than this (in source coordinates) count as empty.

    Returns:
        (local_a, local_b, valid): [B, 4] boxes in [0, 1] of view a / view b, and [B] bool.
    """
    inter = torch.cat([torch.maximum(box_a[:, :2], box_b[:, :2]), torch.minimum(box_a[:, 2:], box_b[:, 2:])], 1)
    valid = ((inter[:, 2] - inter[:, 0]) > min_size) & ((inter[:, 3] - inter[:, 1]) > min_size)

    def to_local(box):
        size = (box[:, 2:] - box[:, :2]).repeat(1, 2)
        return ((inter - box[:, :2].repeat(1, 2)) / size).clamp(0, 1)

    return to_local(box_a), to_local(box_b), valid


def align_to_box(maps: torch.Tensor, local_box: torch.Tensor, flipped: torch.Tensor, size: int,
                 sampling_ratio: int = -1) -> torch.Tensor:
    """RoIAligns each view's map onto its overlap box and undoes the view's horizontal flip.

    Args:
        maps: [B, C, h, w] per-view maps (e.g. cluster probabilities).
        local_box: [B, 4] overlap box in this view's unflipped [0, 1] coordinates.
        flipped: [B] bool, whether this view was flipped horizontally after cropping.
        size: output grid side S.
        sampling_ratio: RoIAlign's samples per output cell and side; -1 (torchvision's default, SlotCon's
            authors' choice) adapts them to the box, ceil(box side / S).

    Returns:
        [B, C, S, S] maps over the shared box, in the source image's orientation.
    """
    b, _, h, w = maps.shape
    box = local_box.clone()
    # In a flipped view, source-x u sits at 1 - u: mirror the box, sample, then mirror the samples back.
    box[flipped, 0], box[flipped, 2] = 1 - local_box[flipped, 2], 1 - local_box[flipped, 0]
    scale = torch.tensor([w, h, w, h], dtype=maps.dtype, device=maps.device)
    rois = torch.cat([torch.arange(b, dtype=maps.dtype, device=maps.device)[:, None], box.to(maps.dtype) * scale], 1)
    out = roi_align(maps, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=sampling_ratio,
                    aligned=True)
    return torch.where(flipped.view(b, 1, 1, 1), out.flip(-1), out)


def box_in_view(box: torch.Tensor, view_box: torch.Tensor, flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a crop lies in another view: its box in that view's displayed coordinates, and how much of it is inside.

    Args:
        box: [..., 4] the crop's box (x0, y0, x1, y1) in the source image's [0, 1] coordinates.
        view_box: [..., 4] the view's box in the same coordinates (broadcast against ``box``).
        flipped: [...] bool, whether the view was flipped horizontally after cropping.

    Returns:
        (local, inside): [..., 4] the crop's box in the view's [0, 1] coordinates as the view is displayed (flip
        applied), clipped to the view; [...] the fraction of the crop's area that lies inside the view.
    """
    origin = view_box[..., [0, 1, 0, 1]]
    size = (view_box[..., [2, 3, 2, 3]] - origin)
    local = (box - origin) / size
    clipped = local.clamp(0, 1)
    area = lambda b: (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)  # noqa: E731
    inside = area(clipped) / area(local).clamp_min(1e-12)
    mirrored = torch.stack([1 - clipped[..., 2], clipped[..., 1], 1 - clipped[..., 0], clipped[..., 3]], -1)
    return torch.where(flipped[..., None], mirrored, clipped), inside


def patch_centres_in(grid: tuple[int, int], box: torch.Tensor, flipped: torch.Tensor, other_box: torch.Tensor,
                     other_flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the patch centres of one view fall in another view of the same image.

    Args:
        grid: (h, w) patch grid of the first view.
        box, other_box: [B, 4] the two views' boxes in the source image's [0, 1] coordinates.
        flipped, other_flipped: [B] bool, their horizontal flips.

    Returns:
        (u, v): [B, h, w] each patch centre's coordinates in the other view as displayed ([0, 1) inside it).
    """
    h, w = grid
    v = ((torch.arange(h, device=box.device, dtype=box.dtype) + 0.5) / h)[None, :, None].expand(len(box), h, w)
    u = ((torch.arange(w, device=box.device, dtype=box.dtype) + 0.5) / w)[None, None, :].expand(len(box), h, w)
    u = torch.where(flipped[:, None, None], 1 - u, u)  # displayed -> the crop's own orientation
    x = box[:, 0, None, None] + u * (box[:, 2] - box[:, 0])[:, None, None]
    y = box[:, 1, None, None] + v * (box[:, 3] - box[:, 1])[:, None, None]
    u2 = (x - other_box[:, 0, None, None]) / (other_box[:, 2] - other_box[:, 0])[:, None, None]
    v2 = (y - other_box[:, 1, None, None]) / (other_box[:, 3] - other_box[:, 1])[:, None, None]
    return torch.where(other_flipped[:, None, None], 1 - u2, u2), v2


def region_in_view(mask: torch.Tensor, box: torch.Tensor, flipped: torch.Tensor, other_box: torch.Tensor,
                   other_flipped: torch.Tensor, other_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch region of one view, found in another view of the same image.

    Args:
        mask: [B, h, w] bool region on the first view's patch grid (as displayed).
        box, flipped, other_box, other_flipped: the two views' crops (see :func:`patch_centres_in`).
        other_grid: the other view's patch grid.

    Returns:
        (region, visible): [B, h', w'] bool, the other view's patches whose centre falls on a patch of the region
        (nearest patch); [B] the fraction of the region's patches whose centre lies inside the other view.
    """
    h, w = mask.shape[-2:]
    u, v = patch_centres_in(other_grid, other_box, other_flipped, box, flipped)  # other's centres in this view
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    cols = (u * w).floor().long().clamp(0, w - 1)
    rows = (v * h).floor().long().clamp(0, h - 1)
    batch = torch.arange(len(mask), device=mask.device)[:, None, None]
    region = mask[batch, rows, cols] & inside
    u1, v1 = patch_centres_in((h, w), box, flipped, other_box, other_flipped)
    seen = ((u1 >= 0) & (u1 < 1) & (v1 >= 0) & (v1 < 1) & mask).flatten(1).sum(1)
    return region, seen.float() / mask.flatten(1).sum(1).clamp_min(1)
