"""Writes tests/data/vilseg_golden.safetensors with the pre-migration ViL-Seg objective (commit fe04f0d).

The migration of the three ViL-Seg losses to plug-in objectives must leave loss values and gradients unchanged;
this records them from the code as it was before the migration. Run once, at fe04f0d, from the repository root:

    python tests/data/make_vilseg_golden.py

It is removed by the migration commit (the old API it calls is gone); git keeps it.
"""
import json

import torch
from safetensors.torch import save_file

from vilseg.models import create_model
from vilseg.objectives import EMATeacher, ViLSegObjective

CAPTIONS = ["a red circle.", "two shapes: a blue square and a green cross.", "a photo of a yellow triangle.",
            "an image of a striped green circle and a red square."]
NEGATIVES = ["a blue circle.", "two shapes: a blue cross and a green cross.", "a photo of a yellow triangle.",
             "an image of a striped green circle and a red cross."]


def main():
    torch.manual_seed(0)
    model = create_model("vilseg-tiny-minilm").train()
    teacher = EMATeacher(model.image_encoder, model.vision_head)
    with torch.no_grad():  # a teacher that differs from the student, so that its path is exercised
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.cluster_head.net[-1].weight.mul_(30.0)  # peaked assignments: a clustering term far from zero
    b = 4
    views = [torch.randn(b, 3, 32, 32), torch.randn(b, 3, 32, 32), torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)]
    tok, neg = model.tokenizer(CAPTIONS), model.tokenizer(NEGATIVES)
    has_neg = torch.tensor([True, True, False, True])
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.9], [0.2, 0.1, 1.0, 1.0], [0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.8]])
    boxes = boxes.expand(b, 4, 4).clone()
    boxes[1, 1] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    boxes[1, 0] = torch.tensor([0.6, 0.6, 1.0, 1.0])  # image 1: disjoint global crops (no IIC pairs)
    flips = torch.tensor([[False, True, False, True], [True, False, False, False], [False, False, True, True],
                          [True, True, False, False]])
    out = {f"init.{k}": v.clone() for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    out.update({f"teacher.{k}": v.clone() for k, v in teacher.state_dict().items()})
    out.update({f"views.{i}": v for i, v in enumerate(views)})
    out.update({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                "neg_input_ids": neg["input_ids"], "neg_attention_mask": neg["attention_mask"], "has_neg": has_neg,
                "boxes": boxes, "flips": flips})
    for detach in (False, True):
        tag = "detach" if detach else "e2e"
        model.zero_grad(set_to_none=True)
        objective = ViLSegObjective({"xm": 1.0, "vis": 0.5, "clu": 1.0}, vis_temperature=0.1, align_size=4,
                                    clu_detach=detach)
        ids = torch.cat([tok["input_ids"], neg["input_ids"]])
        mask = torch.cat([tok["attention_mask"], neg["attention_mask"]])
        res = model(views, ids, mask, vision=True, n_cluster_views=2, detach_cluster_input=detach)
        terms = objective(res, teacher(views[:2]), boxes, flips, has_neg)
        terms["loss"].backward()
        for k in ("xm", "vis", "clu", "loss"):
            out[f"{tag}.term.{k}"] = terms[k].detach().clone()
        for name, p in model.named_parameters():
            if p.grad is not None:
                out[f"{tag}.grad.{name}"] = p.grad.clone()
    save_file({k: v.contiguous() for k, v in out.items()}, "tests/data/vilseg_golden.safetensors",
              metadata={"captions": json.dumps(CAPTIONS), "negatives": json.dumps(NEGATIVES),
                        "commit": "fe04f0d", "model": "vilseg-tiny-minilm"})


if __name__ == "__main__":
    main()
