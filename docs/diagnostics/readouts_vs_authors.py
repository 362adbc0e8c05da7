"""Diagnostic: vilseg's dense read-outs against their authors' public code, on identical weights and inputs.

    python docs/diagnostics/readouts_vs_authors.py --out docs/results/readouts_vs_authors.json

Needs the authors' repositories on disk (none of their code is part of vilseg): fetched as bare git mirrors, their
files are read with ``git show`` and imported from a temporary folder.

- SCLIP: wangf3014/SCLIP, ``clip/model.py``: ``VisionTransformer.forward(x, return_all=True, csa=True)``;
- NACLIP: sinahmr/NACLIP, ``clip/model.py``: ``set_params('reduced', 'naclip', 5)``, then
  ``forward(x, return_all=True)``;
- MaskCLIP: chongzhou96/MaskCLIP's ViT is an mmseg backbone (it needs mmcv-full 1.x, not installable here); its
  last-layer value path (``v += x``; ``v = ffn(norm2(v), identity=v)``; ``norm1``; the head's ``proj``) is the one
  CLIPSelf's authors reimplemented as ``forward_without_attn`` in wusize/CLIPSelf ``src/open_clip/transformer.py``
  ("use the maskclip-zhou style"), which is the reference run here.

Both SCLIP's and NACLIP's models are OpenAI's CLIP code (QuickGELU), so the weights are an open_clip
``ViT-B-16-quickgelu`` with random weights, copied into the authors' module by its own ``load_state_dict`` (the same
key names). Inputs: a 224 x 224 batch (the model's own grid, no position-embedding resampling) and a 448 x 336 one
(both resample: the authors with bicubic ``scale_factor`` interpolation, vilseg through timm's bicubic resample with
antialiasing), so the second row measures that deviation.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

MIRRORS = Path("/work/.mirror")


def load_module(repo: str, path: str, name: str, extra: dict[str, str] | None = None):
    """Imports ``path`` of the bare mirror ``repo`` (plus ``extra`` files beside it) from a temporary folder."""
    git = MIRRORS / repo.replace("/", "+") / "repo"
    folder = Path(tempfile.mkdtemp()) / name
    folder.mkdir(parents=True)
    for target, source in {"__init__.py": None, "model.py": path, **(extra or {})}.items():
        text = "" if source is None else subprocess.run(["git", "-C", str(git), "show", f"HEAD:{source}"],
                                                         check=True, capture_output=True, text=True).stdout
        (folder / target).write_text(text)
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module(f"{name}.model")


def authors_vit(module, visual, **kwargs):
    """The authors' VisionTransformer with the weights of an open_clip visual tower."""
    vit = module.VisionTransformer(input_resolution=224, patch_size=16, width=768, layers=12, heads=12,
                                   output_dim=512, **kwargs).eval()
    missing, unexpected = vit.load_state_dict(visual.state_dict(), strict=False)
    assert not missing and all("addition" in k for k in unexpected), (missing, unexpected)
    return vit


def ours(model, images, naming: str) -> torch.Tensor:
    from vilseg.inference.strategies import NAMINGS

    fn = NAMINGS[naming]().readout
    with torch.no_grad():
        out = model.dense_embeddings(model.image_encoder.normalize(images), readout=fn)["patch_embed"]
    return out.flatten(2).transpose(1, 2)  # [B, N, E], normalised


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    return {"max_abs_diff": float((a - b).abs().max()), "min_cosine": float((a * b).sum(-1).min())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import open_clip

    from vilseg.models import from_open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16-quickgelu").eval()
    path = Path(tempfile.mkdtemp()) / "clip.pt"
    torch.save(reference.state_dict(), path)
    model = from_open_clip("ViT-B-16-quickgelu", pretrained=str(path)).eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    sclip = load_module("wangf3014/SCLIP", "clip/model.py", "sclip_authors")
    naclip = load_module("sinahmr/NACLIP", "clip/model.py", "naclip_authors")
    clipself = load_module("wusize/CLIPSelf", "src/open_clip/transformer.py", "clipself_authors",
                           {"utils.py": "src/open_clip/utils.py"})
    sclip_vit = authors_vit(sclip, reference.visual)
    naclip_vit = authors_vit(naclip, reference.visual)
    naclip_vit.set_params("reduced", "naclip", 5.0)
    rows = {}
    for size in ((224, 224), (448, 336)):
        images = torch.rand(2, 3, *size)
        x = (images - mean) / std
        with torch.no_grad():
            theirs = {"sclip": sclip_vit(x, return_all=True, csa=True)[:, 1:],
                      "naclip": naclip_vit(x, return_all=True)[:, 1:],
                      "maskclip": clipself_maskclip(clipself, reference.visual, x)}
        for name, value in theirs.items():
            rows[f"{name}@{size[0]}x{size[1]}"] = compare(ours(model, images, name), value)
            print(name, size, rows[f"{name}@{size[0]}x{size[1]}"])
    report = {"reference": {"sclip": "wangf3014/SCLIP clip/model.py", "naclip": "sinahmr/NACLIP clip/model.py",
                            "maskclip": "wusize/CLIPSelf src/open_clip/transformer.py forward_without_attn "
                                        "(MaskCLIP's value path)"},
              "weights": "open_clip ViT-B-16-quickgelu, random (torch.manual_seed(0))", "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


def clipself_maskclip(module, visual, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense features through CLIPSelf's ``ResidualAttentionBlockV2.forward_without_attn`` (their last
    block) after open_clip's own first blocks; ``ln_post`` and ``proj`` on every token as CLIPSelf's
    ``_extract_roi_features_v2`` applies them. Position embeddings resampled as CLIPSelf does (bicubic to the grid)."""
    block = visual.transformer.resblocks[-1]
    theirs = module.ResidualAttentionBlockV2(768, 12, act_layer=type(block.mlp.gelu)).eval()
    theirs.load_state_dict(block.state_dict())
    b, _, h, w = x.shape
    tokens = visual.conv1(x).flatten(2).transpose(1, 2)
    grid = (h // 16, w // 16)
    pos = visual.positional_embedding
    if grid != (14, 14):
        pe = pos[1:].T.reshape(1, -1, 14, 14)
        pe = F.interpolate(pe, grid, mode="bicubic", align_corners=False).reshape(-1, grid[0] * grid[1]).T
        pos = torch.cat([pos[:1], pe])
    tokens = torch.cat([visual.class_embedding.view(1, 1, -1).expand(b, -1, -1), tokens], 1) + pos
    tokens = visual.ln_pre(tokens)
    with torch.no_grad():
        for blk in visual.transformer.resblocks[:-1]:
            tokens = blk(tokens)
        out = theirs.forward_without_attn(tokens.transpose(0, 1)).transpose(0, 1)  # their blocks are L, N, D
    return visual.ln_post(out[:, 1:]) @ visual.proj


if __name__ == "__main__":
    main()
