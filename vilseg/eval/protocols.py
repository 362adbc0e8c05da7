"""Protocol presets: every knob of the two evaluation lineages, per dataset (../docs and protocols.md).

- ``A`` (GroupViT -> TCL): keep-ratio resize to short side 448, sliding window 448 / stride 224, TCL's nine templates,
  mmseg's class names; on datasets with a background class, a constant background channel in front of the class
  scores (TCL: 0.5, 0.4 with PAMR).
- ``B`` (SCLIP): short side 336 (448 COCO-Stuff, 560 Cityscapes), window 224 / stride 112, the 80 OpenAI ImageNet
  templates, SCLIP's name files with aliases; softmax(logit_scale * cosine) over all names, a class takes the max
  over its names; pixels whose best probability is under ``prob_thd`` are background; on V21 classes covering under
  ``area_thd`` of the foreground are dropped.

Every field can be overridden (``vilseg eval --set crop=336 templates=simple``), and the report holds the resolved
protocol. The synthetic world's splits keep each lineage's prediction rules but take the model's own input size as
their geometry and the Segmenter's templates (its images are drawn at the training size, and its captions follow
the vilseg templates): that is what makes ``vilseg eval`` agree with the demo.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

TCL_TEMPLATES = ("itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of many {}.",
                 "a photo of {}s.")
GROUPVIT_TEMPLATES = ("a photo of a {}.",)


def openai_templates() -> tuple[str, ...]:
    """The 80 OpenAI ImageNet prompt templates, as open_clip ships them."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


TEMPLATE_SETS = {"tcl": lambda: TCL_TEMPLATES, "groupvit": lambda: GROUPVIT_TEMPLATES, "openai": openai_templates,
                 "simple": lambda: ("a photo of a {}.",), "model": lambda: None}


@dataclass
class Protocol:
    """A resolved evaluation protocol. ``None`` sizes mean "the model's input size"."""

    name: str
    short: int | None = 448  # keep-ratio resize: short side ...
    long: int = 2048  # ... and long side bound
    crop: int | None = 448  # sliding window side
    stride: int | None = 224  # sliding window step
    templates: str = "tcl"  # a TEMPLATE_SETS key ("model": the Segmenter's own templates)
    names: str = "A"  # name files: "A", "B", or a path to a name file
    rule: str = "argmax"  # "argmax" (A) or "softmax" (B)
    bg_threshold: float | str | None = None  # A: the constant background channel; "model": the calibrated one
    logit_scale: float = 40.0  # B
    prob_thd: float = 0.0  # B: best probability under it -> background (class 0)
    area_thd: float | None = None  # B: classes under this fraction of the predicted foreground -> dropped
    pamr: bool = False  # PAMR post-processing of the score maps (10 iterations, dilations 1..24)

    def template_list(self, default: tuple[str, ...]) -> tuple[str, ...]:
        if self.templates not in TEMPLATE_SETS:
            if "{}" in self.templates:  # a literal list, separated by "|"
                return tuple(t for t in self.templates.split("|") if t)
            raise ValueError(f"templates must be one of {sorted(TEMPLATE_SETS)} or 'a {{}}.|the {{}}.', got "
                             f"{self.templates!r}")
        return TEMPLATE_SETS[self.templates]() or default

    def geometry(self, model_size: int) -> tuple[int, int, int]:
        """(short, crop, stride) with the model's input size filled in."""
        crop = self.crop or model_size
        return self.short or model_size, crop, self.stride or max(1, crop // 2)

    def as_dict(self) -> dict:
        return asdict(self)


def preset(protocol: str, dataset: str) -> Protocol:
    """The lineage's settings for one dataset."""
    if protocol == "A":
        p = Protocol("A")
        if dataset in ("voc21", "context60", "coco_object", "synthetic"):
            p.bg_threshold = 0.5
    elif protocol == "B":
        p = Protocol("B", short=336, crop=224, stride=112, templates="openai", names="B", rule="softmax")
        p.short = {"coco_stuff": 448, "cityscapes": 560}.get(dataset, 336)
        p.logit_scale = {"voc21": 65.0, "context60": 50.0, "coco_object": 50.0}.get(dataset, 40.0)
        if dataset in ("voc21", "context60", "coco_object", "synthetic"):
            p.prob_thd = 0.1
        if dataset == "voc21":
            p.area_thd = 0.1
    else:
        raise ValueError(f"protocol must be 'A' or 'B', got {protocol!r}")
    if dataset == "synthetic":
        p.short = p.crop = p.stride = None
        p.templates = "model"
        if protocol == "A":
            p.bg_threshold = "model"
    return p


def apply_overrides(protocol: Protocol, overrides: list[str]) -> Protocol:
    """``["crop=336", "pamr=true", "bg_threshold=0.4"]`` -> a new protocol; unknown keys and bad values raise a
    ValueError naming them."""
    types = {f.name: f.type for f in fields(Protocol)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key == "name":
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(k for k in types if k != 'name')}")
        value = value.strip()
        try:
            if value.lower() in ("none", "null"):
                parsed = None
            elif key == "pamr":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                parsed = value.lower() in ("true", "1")
            elif key in ("short", "long", "crop", "stride"):
                parsed = int(value)
            elif key in ("logit_scale", "prob_thd", "area_thd"):
                parsed = float(value)
            elif key == "bg_threshold":
                parsed = value if value == "model" else float(value)
            else:
                parsed = value
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not a valid value for {key}") from None
        changes[key] = parsed
    out = replace(protocol, **changes)
    if out.rule not in ("argmax", "softmax"):
        raise ValueError(f"--set rule={out.rule!r}: expected 'argmax' or 'softmax'")
    if changes.get("pamr") and protocol.name == "A" and "bg_threshold" not in changes \
            and protocol.bg_threshold == 0.5:
        out.bg_threshold = 0.4  # TCL's threshold with PAMR
    return out
