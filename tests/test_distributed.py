"""Two gloo processes on two halves of a batch train exactly as one process on the whole batch."""
import contextlib
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

SETS = {
    "vilseg": {"xm": {}, "vis": {"dim": 16, "hidden": 32}, "clu": {"align_size": 4}},
    "mmc": {"mim": {}, "msd": {"out_dim": 32, "hidden": 16, "bottleneck": 8}, "gc": {"dim": 8, "hidden": 16}},
    # queue of 40 < 3 steps x 2 views x 8 keys: the ring buffer wraps, so the order keys enter it is checked too
    "maskco": {"maskco": {"dim": 8, "hidden": 16, "queue_size": 40}},
    "slotcon": {"slotcon": {"hidden": 16, "align_size": 4}},
    "dense": {"xm": {}, "dense": {}, "pacl": {}},  # region distillation and patch-aligned contrast
}
STEPS = 3


def _batch(b=8):
    from vilseg.data.masking import BlockMasking

    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0], [0.1, 0.1, 0.4, 0.4]]).repeat(b, 1, 1)
    boxes[5, 1] = torch.tensor([0.85, 0.85, 1.0, 1.0])  # image 5: global views that do not overlap
    masking = BlockMasking((4, 4), (0.25, 0.75), min_block=1)  # masks of different sizes on the two halves
    return {"views": [torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g),
                      torch.randn(b, 3, 16, 16, generator=g)],
            "boxes": boxes, "flips": torch.rand(b, 3, generator=g) > 0.5,
            "masks": torch.from_numpy(np.stack([[masking(rng) for _ in range(2)] for _ in range(b)])),
            "captions": [f"a {c} {s}" for c, s in zip(["red", "blue", "green", "yellow"] * 2,
                                                       ["circle", "square", "cross", "triangle"] * 2)][:b],
            "neg_captions": [f"a {c} circle" for c in ["blue", "red", "red", "green"] * 2][:b],
            "has_neg": torch.tensor([True, True, False, True] * 2)[:b]}


def _half(batch, rank, world):
    b = len(batch["captions"]) // world
    part = slice(rank * b, (rank + 1) * b)
    return {k: ([x[part] for x in v] if k == "views" else v[part]) for k, v in batch.items()}


@contextlib.contextmanager
def _per_image_corruption():
    """The corruption of the global views with a fill that depends on the image alone (its negative). The shipped
    fills draw from the process's own batch ("image": the next image of that batch) or its own RNG ("noise"), so the
    two halves of a batch are corrupted differently from the whole; with this fill the test isolates the
    distributed maths of the losses. Restored on exit (the single-process reference runs in the test process)."""
    from functools import cached_property

    from vilseg.objectives.context import StepContext

    def corrupted(ctx):
        patch = ctx.model.image_encoder.patch_size
        masks = [ctx.batch["masks"][:, g, None].float().repeat_interleave(patch, 2).repeat_interleave(patch, 3)
                 for g in range(ctx.n_global)]
        return [torch.lerp(v, -v, m) for v, m in zip(ctx.global_views, masks)], masks

    original = StepContext.__dict__["corrupted"]
    StepContext.corrupted = cached_property(corrupted)
    StepContext.corrupted.__set_name__(StepContext, "corrupted")
    try:
        yield
    finally:
        StepContext.corrupted = original


def _train(name, batch, wrap=None):
    from vilseg.models import create_model
    from vilseg.objectives import EMATeacher, Learner, build_objectives
    from vilseg.training.stage import freeze_unused

    torch.manual_seed(0)
    model = create_model("vilseg-tiny", **({"n_prototypes": 8, "prototype_dim": 8, "prototype_hidden": 16}
                                           if name == "slotcon" else {}))
    with torch.no_grad():  # peaked cluster assignments: a clustering term with real gradients from the first step
        model.cluster_head.net[-1].weight.mul_(30.0)
    objectives, weights = build_objectives(SETS[name], model)
    freeze_unused(model, set().union(*(o.model_parts() for o in objectives.values())))
    learner = Learner(model, objectives, weights, n_global=2)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads())
    # SGD, whose step is linear in the gradient: AdamW divides by sqrt(v), which turns the round-off of gradients that
    # are exactly zero in theory (the key bias of attention, under softmax's shift invariance) into full steps
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    step_fn = wrap(learner) if wrap else learner
    losses = []
    with _per_image_corruption():
        for step in range(STEPS):
            terms = step_fn(batch, teacher, step, STEPS)
            terms["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            learner.after_step()
            teacher.update(model.image_encoder, learner.teacher_heads(), 0.9)
            losses.append(terms["loss"].detach())
    state = {f"learner.{k}": v.detach().clone() for k, v in learner.state_dict().items()}
    state.update({f"teacher.{k}": v.detach().clone() for k, v in teacher.state_dict().items()})
    return state, torch.stack(losses)


def _worker(rank, world, init_file, name, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import gloo_worker

    torch.set_num_threads(1)
    gloo_worker.start(rank, world, init_file)
    state, losses = _train(name, _half(_batch(), rank, world), wrap=DistributedDataParallel)
    gathered = [torch.zeros_like(losses) for _ in range(world)]
    dist.all_gather(gathered, losses)
    if rank == 0:
        torch.save({"state": state, "losses": torch.stack(gathered).mean(0)}, result_file)
    gloo_worker.leave()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETS))
def test_two_processes_train_like_one_process_on_the_concatenated_batch(name):
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), name, result), nprocs=2)
        ddp = torch.load(result, weights_only=True)
    torch.set_num_threads(1)
    single, losses = _train(name, _batch())
    # DDP's mean of the two processes' losses is the loss of the whole batch at every step
    torch.testing.assert_close(ddp["losses"], losses, rtol=1e-5, atol=1e-5)
    # After 3 SGD steps every parameter, buffer (MMC's centre) and teacher tensor agrees. Tolerance: the two runs sum
    # the same gradients in another order (float32 round-off, relative ~1e-7 of gradients of order 1, times lr 0.05
    # over 3 momentum steps: ~1e-7 to 1e-6 on the parameters; measured 8e-7). 2e-5 sits well above that and well
    # below the real errors it guards: a mean of per-process IIC mutual informations instead of one joint matrix
    # moves parameters by 1e-2, and normalising MIM by each process's own masked-pixel count by 1.7e-4.
    assert ddp["state"].keys() == single.keys()
    worst = max((ddp["state"][k].float() - v.float()).abs().max().item() for k, v in single.items())
    assert worst < 2e-5, worst
