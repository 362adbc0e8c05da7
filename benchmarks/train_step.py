"""Images/s of the full ViL-Seg training step against a plain CLIP step, side by side in one run.

Both steps use the same model (encoders and heads), batch size, precision, optimizer (AdamW) and input resolution;
the data pipeline is excluded (batches are pre-built tensors) so the numbers are the model step alone.
  full: 2 global + n_local local views; cross-modal + vision contrast (EMA teacher forward + update) + IIC.
  full_detach: the same, with the clustering head on detached patch tokens (``loss.clu_detach``, the demo's step).
  clip: 1 view; cross-modal contrast only.
FLOPs of one step (forward + backward) are counted with torch.utils.flop_counter; on CUDA, model FLOPs
utilisation (MFU) is reported against --peak-tflops (H100 SXM dense bf16: 989).

    python benchmarks/train_step.py --model vilseg-demo --batch 64 --steps 20
    python benchmarks/train_step.py --model vilseg-vit-s16-minilm --batch 128 --precision bf16 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vilseg.models import create_model
from vilseg.objectives import EMATeacher, ViLSegObjective


def make_batch(model, batch: int, n_local: int, device):
    size = model.config.image.img_size
    views = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    views += [torch.randn(batch, 3, size // 2, size // 2, device=device) for _ in range(n_local)]
    captions = [f"a photo of a red circle and a blue square number {i}" for i in range(batch)]
    tokens = {k: v.to(device) for k, v in model.tokenizer(captions).items()}
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]] + [[0.1, 0.1, 0.4, 0.4]] * n_local,
                         device=device).expand(batch, -1, -1)
    flips = torch.zeros(batch, 2 + n_local, dtype=torch.bool, device=device)
    return views, tokens, boxes, flips


def make_step(model, kind: str, batch, autocast):
    views, tokens, boxes, flips = batch
    full = kind.startswith("full")
    weights = {"xm": 1.0, "vis": 0.5, "clu": 1.0} if full else {"xm": 1.0}
    objective = ViLSegObjective(weights, clu_detach=kind == "full_detach")
    teacher = EMATeacher(model.image_encoder, model.vision_head) if full else None
    step_views = views if full else views[:1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with autocast():
            out = model(step_views, tokens["input_ids"], tokens["attention_mask"], vision=teacher is not None,
                        n_cluster_views=objective.n_cluster_views, detach_cluster_input=objective.clu_detach)
            t_embed = teacher(step_views[:2]) if teacher is not None else None
            loss = objective(out, t_embed, boxes, flips)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(model.image_encoder, model.vision_head, 0.996)

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, steps: int, warmup: int, batch: int, device) -> dict:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    return {"seconds_per_step": seconds, "images_per_second": batch / seconds, "tflop_per_step": flops / 1e12}


def matmul_ceiling(device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate (TFLOP/s) of this GPU: the practical ceiling MFU is also reported against."""
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
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16)")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    results = {"model": args.model, "batch": args.batch, "precision": args.precision, "device": str(device),
               "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        results["measured_bf16_matmul_tflops"] = matmul_ceiling(device)
    for kind in ("clip", "full", "full_detach"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model = create_model(args.model).to(device).train()
        batch = make_batch(model, args.batch, args.n_local, device)
        results[kind] = measure(make_step(model, kind, batch, autocast), args.steps, args.warmup, args.batch, device)
        if device.type == "cuda":
            achieved = results[kind]["tflop_per_step"] / results[kind]["seconds_per_step"]
            results[kind]["achieved_tflops"] = achieved
            results[kind]["mfu"] = achieved / args.peak_tflops
            results[kind]["mfu_vs_measured_matmul"] = achieved / results["measured_bf16_matmul_tflops"]
            results[kind]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        del model
    results["full_over_clip_time_ratio"] = results["full"]["seconds_per_step"] / results["clip"]["seconds_per_step"]
    results["full_detach_over_clip_time_ratio"] = (results["full_detach"]["seconds_per_step"]
                                                   / results["clip"]["seconds_per_step"])
    print(json.dumps(results, indent=1))
    if device.type == "cuda":
        print(f"MFU (vs {args.peak_tflops:.0f} TFLOP/s peak)  clip {results['clip']['mfu']:.1%}   full "
              f"{results['full']['mfu']:.1%}   full_detach {results['full_detach']['mfu']:.1%}   "
              f"(measured bf16 matmul: {results['measured_bf16_matmul_tflops']:.0f} TFLOP/s)")
    print(f"images/s  clip {results['clip']['images_per_second']:.1f}   full ViL-Seg "
          f"{results['full']['images_per_second']:.1f}   full step takes {results['full_over_clip_time_ratio']:.2f}x "
          f"the CLIP step; with the clustering head detached (the demo) "
          f"{results['full_detach']['images_per_second']:.1f}, {results['full_detach_over_clip_time_ratio']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
