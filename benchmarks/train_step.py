"""Time, FLOPs and peak memory of one training step per objective set, against a plain CLIP step, in one run.

Every set uses the same model, batch size, precision, optimizer (AdamW) and input resolution; the data pipeline is
excluded (batches are pre-built tensors), and a frozen text tower's features come from the text-feature cache
(warmed once, as training has them after a caption's first sighting), so the numbers are the model step alone.
Step time is the median over --steps timed steps. FLOPs of one step (forward + backward) are counted with
torch.utils.flop_counter, and a profile gives the share of time spent in the counted ops. Each set runs in a fresh
subprocess, so its peak memory is its own: peak resident memory on CPU, peak allocated memory on CUDA. On CUDA, model
FLOPs utilisation is reported against the measured bf16 matmul rate (and --peak-tflops).

    python benchmarks/train_step.py --model vilseg-demo --batch 64 --steps 20 --out benchmarks/results/train_step_cpu.json
    python benchmarks/train_step.py --precision fp32 bf16 --steps 20 --out benchmarks/results/train_step_cpu_bf16.json
    python benchmarks/train_step.py --model vilseg-vit-b16 --batch 128 --precision bf16 --device cuda
    python benchmarks/train_step.py --model clip-vit-b16 --sets clip vilseg clipself --batch 64 --precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import platform
import resource
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

OBJECTIVE_SETS = {  # name -> objectives config; "clip" is the baseline every ratio is taken against
    "clip": {"xm": {}},
    "vilseg": {"xm": {}, "vis": {"weight": 0.5, "dim": 128, "hidden": 256}, "clu": {"detach": True}},
    "xm+clu": {"xm": {}, "clu": {"detach": True}},  # the ablation's middle recipe: ViL-Seg without its vision contrast
    "vilseg+dense": {"xm": {}, "vis": {"weight": 0.5, "dim": 128, "hidden": 256}, "clu": {"detach": True},
                     "dense": {}},  # the scratch+dense recipe's stage (region distillation)
    "vilseg+pacl": {"xm": {}, "vis": {"weight": 0.5, "dim": 128, "hidden": 256}, "clu": {"detach": True},
                    "pacl": {}},  # the scratch+pacl recipe's stage (patch-aligned contrast)
    "mmc": {"mim": {}, "msd": {}, "gc": {}},
    "mmc+vilseg": {"xm": {}, "vis": {"weight": 0.5, "dim": 128, "hidden": 256}, "clu": {"detach": True},
                   "mim": {}, "msd": {}, "gc": {}},
    "maskco": {"maskco": {}},
    "slotcon": {"slotcon": {}},
    "slotcon+xm": {"slotcon": {}, "xm": {}},  # the slotcon_only recipe's stage (slots named through xm)
    "clipself": {"clipself": {}},  # CLIPSelf's fine-tune (a model started from a CLIP: clip-vit-b16, clip-tiny)
}
PROTOTYPES = {"n_prototypes": 64}  # SlotCon's prototypes live in the model (its slot head)


def make_batch(model, batch: int, n_global: int, n_local: int, device, negatives: bool = False) -> dict:
    from vilseg.data.masking import BlockMasking

    size, patch = model.config.image.img_size, model.config.image.patch_size
    views = [torch.randn(batch, 3, size, size, device=device) for _ in range(n_global)]
    views += [torch.randn(batch, 3, size // 2, size // 2, device=device) for _ in range(n_local)]
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]][:n_global] + [[0.1, 0.1, 0.4, 0.4]] * n_local,
                         device=device).expand(batch, -1, -1)
    masking, rng = BlockMasking((size // patch, size // patch)), np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([[masking(rng) for _ in range(n_global)] for _ in range(batch)])).to(device)
    out = {"views": views, "boxes": boxes, "flips": torch.zeros(batch, n_global + n_local, dtype=torch.bool,
                                                                device=device),
           "captions": [f"a photo of a red circle and a blue square number {i}" for i in range(batch)], "masks": masks}
    if negatives:  # as the demo's hard negatives: one word swapped
        out["neg_captions"] = [c.replace("red", "green") for c in out["captions"]]
        out["has_neg"] = torch.ones(batch, dtype=torch.bool, device=device)
    return out


def make_step(name: str, args, device, spec: dict | None = None):
    from vilseg.models import create_model
    from vilseg.objectives import EMATeacher, Learner, build_objectives
    from vilseg.training.stage import freeze_unused
    from vilseg.training.text_cache import TextFeatureCache

    torch.manual_seed(0)
    model = create_model(args.model, **(PROTOTYPES if "slotcon" in name else {})).to(device).train()
    objectives, weights = build_objectives(spec if spec is not None else OBJECTIVE_SETS[name], model)
    freeze_unused(model, set().union(*(o.model_parts() for o in objectives.values())))
    frozen_text = not any(p.requires_grad for p in model.text_encoder.parameters())
    cache = TextFeatureCache(model.text_encoder, model.tokenizer) if frozen_text else None
    learner = Learner(model, objectives, weights, n_global=1 if name == "clip" else 2, text_cache=cache).to(device)
    needs = learner.needs
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads()).to(device) if "teacher" in needs else None
    batch = make_batch(model, args.batch, 1 if name == "clip" else 2,
                       args.n_local if "local_views" in needs else 0, device, args.negatives and "captions" in needs)
    if cache is not None:
        cache(batch["captions"] + batch.get("neg_captions", []), device)  # warm: the bare step reads cached features
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    heads = learner.teacher_heads()

    def step():
        with autocast():
            loss = learner(batch, teacher, 10, 100)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learner.after_step()
        if teacher is not None:
            teacher.update(model.image_encoder, heads, 0.996)

    return step


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward",
              "aten::mkldnn_convolution", "aten::_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_efficient_attention",
              "aten::_efficient_attention_backward", "aten::_scaled_dot_product_flash_attention",
              "aten::_flash_attention_backward")


def matmul_share(step, device, steps: int = 3) -> float:
    """Fraction of the step's operator self-time spent in the ops the FLOP counter counts (matrix products,
    convolutions, attention). The rest (norms, activations, softmax, optimizer and EMA updates) costs time but no
    counted FLOPs: where it weighs more, the time ratio exceeds the FLOP ratio."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    counted = sum(getattr(e, attr) for e in events if e.key in MATMUL_OPS)
    return counted / max(total, 1e-9)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, args, spec: dict | None = None) -> dict:
    """One objective set, in this (fresh) process: seconds per step, images/s, TFLOPs per step, peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = make_step(name, args, device, spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    sync(device)
    times = []
    for _ in range(args.steps):  # the median step: robust to the machine's other work
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    out = {"seconds_per_step": seconds, "seconds_per_step_spread": [float(np.min(times)), float(np.max(times))],
           "images_per_second": args.batch / seconds}
    if not getattr(args, "time_only", False):
        with FlopCounterMode(display=False) as counter:
            step()
        out.update(tflop_per_step=counter.get_total_flops() / 1e12, matmul_time_share=matmul_share(step, device))
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:  # ru_maxrss is in KiB on Linux
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return out


def _call_child(fn, args, queue):
    try:
        queue.put(fn(*args))
    except BaseException as exn:  # the parent waits on the queue: tell it, rather than leave it waiting forever
        queue.put(RuntimeError(f"{fn.__name__}{args!r}: {type(exn).__name__}: {exn}"))
        raise


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a fresh (spawned) process, its result returned and its exception raised here: peak memory,
    threads and accelerate's per-process state are then the call's own. ``fn`` must be a module-level function."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, Exception):
        raise result
    return result


def run_isolated(name: str, args, spec: dict | None = None) -> dict:
    """:func:`measure` in a fresh process (its peak memory is then its own); ``spec`` overrides the named set."""
    return in_fresh_process(measure, name, args, spec)


def matmul_ceiling(device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate (TFLOP/s) of this GPU: the practical ceiling MFU is reported against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vilseg-demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-local", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--negatives", action="store_true", help="add a hard-negative caption per image (the demo)")
    parser.add_argument("--sets", nargs="+", default=None, choices=list(OBJECTIVE_SETS),
                        help="default: every set the model can train (clipself only for a model started from a CLIP)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="one or more: every set runs in each, side by side in this run (bf16: torch.autocast)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator's dense bf16 peak (H100/H200)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every (set, precision) in this many fresh processes, the precisions alternating, "
                             "and report the median: CPU step times drift by up to ~15%% within a run")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.sets is None:
        from vilseg.models.factory import get_model_config

        from_clip = bool(get_model_config(args.model).get("clip"))
        args.sets = [s for s in OBJECTIVE_SETS if s != "clipself" or from_clip]
    if "clip" not in args.sets:
        args.sets = ["clip", *args.sets]
    device = torch.device(args.device)
    precisions = list(dict.fromkeys(args.precision))
    results = {"model": args.model, "batch": args.batch, "n_local": args.n_local, "precision": precisions,
               "device": str(device), "machine": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "sets": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        results["measured_bf16_matmul_tflops"] = matmul_ceiling(device)
    # keys: the set's name in the first precision, "name@bf16" in the others; with --repeats, each set's precisions
    # alternate (fp32, bf16, fp32, bf16, ...) so that a drift of the machine's speed hits both alike
    for name in args.sets:
        for repeat in range(args.repeats):
            for precision in precisions:
                key = name if precision == precisions[0] else f"{name}@{precision}"
                trial = run_isolated(name, argparse.Namespace(**{**vars(args), "precision": precision,
                                                                 "time_only": repeat > 0}))
                if repeat == 0:
                    results["sets"][key] = {"precision": precision, **trial, "trials_seconds_per_step": []}
                results["sets"][key]["trials_seconds_per_step"].append(trial["seconds_per_step"])
    for r in results["sets"].values():
        r["seconds_per_step"] = float(np.median(r["trials_seconds_per_step"]))
        r["images_per_second"] = args.batch / r["seconds_per_step"]
        if device.type == "cuda":
            r["achieved_tflops"] = r["tflop_per_step"] / r["seconds_per_step"]
    for key, r in results["sets"].items():
        name, precision = key.split("@")[0], r["precision"]
        clip = results["sets"]["clip" if precision == precisions[0] else f"clip@{precision}"]
        r["time_ratio_to_clip"] = r["seconds_per_step"] / clip["seconds_per_step"]
        r["flop_ratio_to_clip"] = r["tflop_per_step"] / clip["tflop_per_step"]
        r["time_over_flop_ratio"] = r["time_ratio_to_clip"] / r["flop_ratio_to_clip"]
        if precision != precisions[0]:  # the same set's step in the first precision over this one's
            r[f"speedup_vs_{precisions[0]}"] = results["sets"][name]["seconds_per_step"] / r["seconds_per_step"]
        if device.type == "cuda":
            r["mfu_vs_peak"] = r["achieved_tflops"] / args.peak_tflops
            r["mfu_vs_measured_matmul"] = r["achieved_tflops"] / results["measured_bf16_matmul_tflops"]
        print(f"{key:16s} {r['images_per_second']:8.1f} img/s  {r['seconds_per_step'] * 1e3:8.1f} ms/step  "
              f"matmul share {r['matmul_time_share']:.0%}  "
              f"{r['tflop_per_step'] * 1e3:8.2f} GFLOP/step  peak {r['peak_memory_gib']:.2f} GiB  "
              f"time x{r['time_ratio_to_clip']:.2f} vs FLOPs x{r['flop_ratio_to_clip']:.2f} of the CLIP step"
              + (f"  x{r[f'speedup_vs_{precisions[0]}']:.2f} vs {precisions[0]}" if precision != precisions[0] else "")
              + (f"  MFU {r['mfu_vs_measured_matmul']:.1%} of measured matmul" if device.type == "cuda" else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
