"""CLIP in: step-0 equivalence with open_clip (ViT-B-16 and a tiny config, in open_clip's formats), the training-free
dense read-outs against naive loops of their formulas, one read-out path through the Python API, `vilseg segment` and
`vilseg eval`, one-line errors, checked loading of every kind of weights, and training from a CLIP."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vilseg.cli import main as _main
from vilseg.errors import ConfigError
from vilseg.models import readouts
from vilseg.models import from_open_clip
from vilseg.models.clip import register_open_clip_config, resolve_clip

TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TEXTS = ["a red circle", "a photo of a dog on the grass", "tv"]


def cli(argv: list[str]) -> int:
    try:
        return _main(argv)
    except SystemExit as exn:
        return exn.code


def _randomise(model) -> None:
    """Non-trivial values where open_clip initialises constants (biases, norms, the logit scale)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "logit_scale" in name:
                p.add_(0.1 * torch.randn_like(p))


def _local_dir(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """A random open_clip model written in open_clip's local-dir format (config JSON + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model(register_open_clip_config(cfg))
    _randomise(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}))
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _local_dir(tmp_path_factory.mktemp("clip") / "tiny", TINY)


@pytest.fixture(scope="module")
def vit_b16_file(tmp_path_factory) -> Path:
    """A randomly initialised open_clip ViT-B-16 saved as open_clip's state dict with torch.save."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-16")
    _randomise(model)
    path = tmp_path_factory.mktemp("vitb16") / "ViT-B-16.bin"
    torch.save(model.state_dict(), path)
    return path


def _assert_step0_equivalent(model, reference, tokenizer, size: int, mean, std) -> None:
    reference.eval()
    model.eval()
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        ref_image = reference.encode_image(x, normalize=True)
        ref_text = reference.encode_text(tokenizer(TEXTS), normalize=True)
        got_image = model.dense_embeddings(model.image_encoder.normalize(images))["image_embed"]
        got_text = model.encode_texts(TEXTS)
    torch.testing.assert_close(got_image, ref_image, atol=2e-6, rtol=0)
    torch.testing.assert_close(got_text, ref_text, atol=2e-6, rtol=0)
    torch.testing.assert_close(model.logit_scale, reference.logit_scale.reshape(()), atol=0, rtol=0)
    torch.testing.assert_close(got_image @ got_text.t(), ref_image @ ref_text.t(), atol=2e-6, rtol=0)


def test_step0_equals_open_clip_for_a_tiny_quickgelu_config_in_open_clip_local_dir_format(tiny_dir):
    import open_clip

    reference = open_clip.create_model(f"local-dir:{tiny_dir}")  # open_clip's own loader, independently
    model = from_open_clip(f"local-dir:{tiny_dir}")
    assert model.config.image.timm_name == "vit_base_patch16_clip_quickgelu_224"  # QuickGELU, as the config says
    assert model.config.image.mean == (0.5, 0.4, 0.3)  # the folder's preprocessing
    _assert_step0_equivalent(model, reference, open_clip.get_tokenizer(f"local-dir:{tiny_dir}"), 32,
                             (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert model.init_report["kind"].startswith("CLIP (both towers")
    loaded = set(model.init_report["loaded"])
    assert {"logit_scale", "image_proj.weight"} <= loaded and any(k.startswith("text_encoder.") for k in loaded)
    assert not [k for k in model.state_dict() if k not in loaded and not k.startswith("cluster_head.")]


def test_step0_equals_open_clip_for_vit_b16_from_a_torch_saved_state_dict(vit_b16_file):
    import open_clip

    reference = open_clip.create_model("ViT-B-16", pretrained=str(vit_b16_file))
    model = from_open_clip("ViT-B-16", pretrained=str(vit_b16_file))
    assert model.config.embed_dim == 512 and model.config.image.timm_name == "vit_base_patch16_clip_224"
    _assert_step0_equivalent(model, reference, open_clip.get_tokenizer("ViT-B-16"), 224,
                             open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    # an export rebuilds offline from its own config (no open_clip weights needed) and gives the same embeddings
    from vilseg.models import ViLSeg

    folder = vit_b16_file.parent / "export"
    model.save_pretrained(folder)
    again = ViLSeg.from_pretrained(folder).eval()
    assert json.loads((folder / "config.json").read_text())["clip"]["pretrained"] is None
    with torch.no_grad():
        torch.testing.assert_close(again.encode_texts(TEXTS), model.eval().encode_texts(TEXTS))


def test_a_shorter_context_cuts_the_positional_table_and_keeps_every_caption_that_fits(tiny_dir):
    full = from_open_clip(f"local-dir:{tiny_dir}").eval()
    short = from_open_clip(f"local-dir:{tiny_dir}", clip={"context_length": 8}).eval()
    assert short.text_encoder.tower.positional_embedding.shape[0] == 8
    assert short.tokenizer(["a"])["input_ids"].shape == (1, 8)
    fits = ["a red circle", "tv", "a dog on grass"]  # at most 8 tokens with the start and end tokens
    with torch.no_grad():
        torch.testing.assert_close(short.encode_texts(fits), full.encode_texts(fits), atol=1e-6, rtol=0)
        long = ["a photo of a dog on the grass"]  # 10 tokens: truncated to 8, so another caption
        assert (short.encode_texts(long) - full.encode_texts(long)).abs().max() > 1e-3


def test_quick_gelu_follows_the_pretrained_tag_and_matters(tiny_dir):
    from vilseg.models.config import CLIPConfig

    assert resolve_clip(CLIPConfig(name="ViT-B-16", pretrained="openai")).model_cfg["quick_gelu"] is True
    assert not resolve_clip(CLIPConfig(name="ViT-B-16", pretrained="laion2b_s34b_b88k")).model_cfg.get("quick_gelu")
    assert resolve_clip(CLIPConfig(name="ViT-B-16-quickgelu")).model_cfg["quick_gelu"] is True
    # the tiny QuickGELU CLIP read with GELU is another function: the equivalence above depends on the activation
    gelu = from_open_clip(f"local-dir:{tiny_dir}", clip={"quick_gelu": False}).eval()
    quick = from_open_clip(f"local-dir:{tiny_dir}").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (gelu.dense_embeddings(x)["image_embed"] - quick.dense_embeddings(x)["image_embed"]).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["architecture", "missing_file", "unknown_tag", "offline_tag", "not_a_vit",
                                  "image_section"])
def test_loading_a_clip_fails_in_one_line_naming_the_problem(case, tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args, overrides, expect = {
        "architecture": (("ViT-B-16", str(tiny_dir / "open_clip_model.safetensors")), {}, "does not fit open_clip's"),
        "missing_file": (("ViT-B-16", str(tmp_path / "nope.bin")), {}, "no such file"),
        "unknown_tag": (("ViT-B-16", "laion9000"), {}, "neither a file nor a pretrained tag"),
        "offline_tag": (("ViT-B-16", "laion2b_s34b_b88k"), {}, "pass the file instead"),
        "not_a_vit": (("RN50", None), {}, "not a ViT"),
        "image_section": ((f"local-dir:{tiny_dir}", None), {"image": {"img_size": 64}}, "use clip.image_size"),
    }[case]
    with pytest.raises(ConfigError, match=expect) as info:
        from_open_clip(*args, **overrides)
    assert "\n" not in str(info.value)


def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    common = ["segment", str(image), "--classes", "cat", "--out", str(tmp_path / "out")]
    assert cli([*common, "--open-clip", f"local-dir:{tiny_dir}", "--model", str(tmp_path)]) == 2
    assert cli([*common, "--open-clip", "ViT-B-16", "--pretrained", str(tiny_dir / "open_clip_model.safetensors")]) == 2
    assert cli([*common, "--open-clip", "ViT-B-16", "--pretrained", str(tmp_path / "missing.bin")]) == 2
    assert cli([*common, "--open-clip", f"local-dir:{tiny_dir}", "--grouping", "clusters"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vilseg segment: ") and ": note: " not in line]
    assert len(errors) == 4 and "not --model and --open-clip" in errors[0]
    assert "does not fit open_clip's 'ViT-B-16'" in errors[1] and "no such file" in errors[2]
    assert "no trained clusters head" in errors[3]


# ------------------------------------------------------------------ the read-outs, against naive loops
def _naive(block, x: torch.Tensor, grid, prefix: int, kind: str, std: float = 5.0) -> torch.Tensor:
    """The read-outs' formulas token by token and head by head (x: [1, T, D])."""
    attn = block.attn
    heads, d = attn.num_heads, attn.head_dim
    width = heads * d
    w, b = attn.qkv.weight, attn.qkv.bias
    normed = block.norm1(x[0])
    q = normed @ w[:width].t() + b[:width]
    k = normed @ w[width:2 * width].t() + b[width:2 * width]
    v = normed @ w[2 * width:].t() + b[2 * width:]
    tokens = x.shape[1]
    positions = [None] * prefix + [(i // grid[1], i % grid[1]) for i in range(grid[0] * grid[1])]
    out = torch.zeros(tokens, width)
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        for i in range(tokens):
            if kind == "maskclip":
                out[i, part] = v[i, part]
                continue
            sim_k = torch.stack([(k[i, part] * k[j, part]).sum() / math.sqrt(d) for j in range(tokens)])
            if kind == "sclip":
                sim_q = torch.stack([(q[i, part] * q[j, part]).sum() / math.sqrt(d) for j in range(tokens)])
                weights = torch.softmax(sim_q, 0) + torch.softmax(sim_k, 0)
            else:
                prior = torch.tensor([0.0 if positions[i] is None or positions[j] is None else math.exp(
                    -((positions[i][0] - positions[j][0]) ** 2 + (positions[i][1] - positions[j][1]) ** 2)
                    / (2 * std ** 2)) for j in range(tokens)])
                weights = torch.softmax(sim_k + prior, 0)
            out[i, part] = sum(weights[j] * v[j, part] for j in range(tokens))
    projected = out @ attn.proj.weight.t() + attn.proj.bias
    if kind == "naclip":  # the reduced block: no residual, no feed-forward
        return projected[None]
    y = x[0] + projected
    return (y + block.mlp(block.norm2(y)))[None]


@pytest.mark.parametrize("kind", ["maskclip", "sclip", "naclip"])
def test_each_read_out_equals_a_naive_loop_of_its_formula(kind, tiny_dir):
    model = from_open_clip(f"local-dir:{tiny_dir}").eval()
    block = model.image_encoder.vit.blocks[-1]
    grid = (2, 3)
    x = torch.randn(1, 1 + 6, 64)
    std = 1.5  # small enough that the prior differs between neighbours on a 2 x 3 grid
    with torch.no_grad():
        fn = getattr(readouts, kind)
        got = fn(block, x, grid, 1, std=std) if kind == "naclip" else fn(block, x, grid, 1)
        torch.testing.assert_close(got, _naive(block, x, grid, 1, kind, std), atol=1e-5, rtol=1e-5)
        # and through the model: every patch read out, then ln_post and CLIP's proj, as the class token is
        from vilseg.inference.strategies import NAMINGS

        images = torch.randn(1, 3, 16, 24)
        naming = NAMINGS[kind](std) if kind == "naclip" else NAMINGS[kind]()
        dense = model.dense_embeddings(images, **naming.dense_kwargs(model))["patch_embed"]
        vit = model.image_encoder.vit
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for blk in vit.blocks[:-1]:
            tokens = blk(tokens)
        expect = F.normalize(model.image_proj(vit.norm(_naive(block, tokens, grid, 1, kind, std))[0, 1:]), dim=-1)
        torch.testing.assert_close(dense[0].flatten(1).t(), expect, atol=1e-5, rtol=1e-5)


def test_the_neighbourhood_prior_is_zero_for_prefix_tokens_and_one_on_the_diagonal():
    omega = readouts.neighbourhood((3, 4), 2, std=2.0)
    assert omega.shape == (14, 14) and omega[:2].abs().sum() == 0 and omega[:, :2].abs().sum() == 0
    assert torch.allclose(omega[2:, 2:].diagonal(), torch.ones(12))
    assert math.isclose(float(omega[2, 3]), math.exp(-1 / 8), rel_tol=1e-6)  # horizontal neighbours, distance 1


# ------------------------------------------------------------------ one read-out path
@pytest.mark.parametrize("naming", ["naclip", "sclip", "maskclip"])
def test_the_read_outs_give_the_same_labels_through_python_segment_and_eval(naming, tiny_dir, tmp_path):
    from data_prep import synthetic
    from vilseg import eval as ev
    from vilseg.inference import ReadOut, Segmenter

    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    classes = ["red circle", "blue square", "green cross"]
    out = tmp_path / "out"
    assert cli(["segment", str(image), "--open-clip", f"local-dir:{tiny_dir}", "--naming", naming, "--classes",
                ",".join(classes), "--out", str(out)]) == 0
    seg = Segmenter.from_open_clip(f"local-dir:{tiny_dir}", vocabulary=classes,
                                   readout=ReadOut("dense", naming, threshold=None, max_segments=None))
    result = seg.segment(image)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo.png")), result.labels)
    record = json.loads((out / "photo.json").read_text())
    assert (out / "photo_overlay.png").is_file() and record["classes"] == ["background", *classes]
    # vilseg eval on a synthetic split: its mIoU is the one of the Python API's score maps
    split = tmp_path / "eval"
    synthetic.write_eval_split(split, n=4, image_size=32, seed=3)
    report_path = tmp_path / "report.json"
    assert cli(["eval", "--open-clip", f"local-dir:{tiny_dir}", "--naming", naming, "--dataset", "synthetic",
                "--root", str(split), "--protocol", "A", "--set", "bg_threshold=none", "--out",
                str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["source"]["kind"] == "clip" and report["source"]["naming"] == naming
    ds = ev.load_dataset("synthetic", split)
    seg.set_vocabulary(ds.classes[1:])
    acc = ev.IoUAccumulator(len(ds.classes))
    for item in ds.items:
        scores, _ = seg.score_maps(item.image)
        acc.update((scores.argmax(0) + 1).numpy(), ds.label(item))
    assert abs(report["miou"] - 100 * acc.miou()) < 1e-9


def test_vilseg_segment_on_a_photo_with_a_vit_b16_state_dict_file(vit_b16_file, tmp_path):
    from skimage import data

    photo = tmp_path / "photo.jpg"
    Image.fromarray(data.astronaut()).save(photo)
    out = tmp_path / "out"
    assert cli(["segment", str(photo), "--open-clip", "ViT-B-16", "--pretrained", str(vit_b16_file), "--classes",
                "person,flag,rocket", "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "photo.png"))
    assert labels.shape == (512, 512) and labels.max() <= 3
    record = json.loads((out / "photo.json").read_text())
    assert record["segments"] and (out / "photo_overlay.png").is_file()
    assert json.loads((out / "segment_stats.json").read_text())["readout"] == "dense+naclip"


# ------------------------------------------------------------------ loading weights: all of it, or one line
def _timm_checkpoint(model, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.image_encoder.vit.state_dict().items()}, str(path))
    return path


def test_image_checkpoint_path_loads_every_tensor_or_fails_naming_them(tiny_dir, tmp_path):
    from vilseg import create_model

    source = create_model("vilseg-tiny-minilm")
    good = _timm_checkpoint(source, tmp_path / "vit.safetensors")
    loaded = create_model("vilseg-tiny-minilm", image={"checkpoint_path": str(good)})
    for k, v in source.image_encoder.vit.state_dict().items():
        torch.testing.assert_close(loaded.image_encoder.vit.state_dict()[k], v, msg=k)
    with pytest.raises(ConfigError, match="is a CLIP .* clip.pretrained"):
        create_model("vilseg-tiny-minilm", image={"checkpoint_path": str(tiny_dir / "open_clip_model.safetensors")})
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"\d+ of its \d+ tensors are not in the file"):
        create_model("vilseg-tiny-minilm", image={"checkpoint_path": str(tmp_path / "other.pt")})
    with pytest.raises(ConfigError, match="no such file"):
        create_model("vilseg-tiny-minilm", image={"checkpoint_path": str(tmp_path / "none.pt")})


def test_init_from_an_unrelated_file_fails_instead_of_loading_nothing(tmp_path):
    from vilseg import create_model
    from vilseg.training.stage import init_image_encoder

    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="model.init_from=.*are not in the file"):
        init_image_encoder(create_model("vilseg-tiny-minilm"), tmp_path / "other.pt")
    source = create_model("vilseg-tiny-minilm")
    checkpoint = _timm_checkpoint(source, tmp_path / "v.safetensors")
    report = init_image_encoder(create_model("vilseg-tiny-minilm"), checkpoint)
    assert len(report["loaded"]) == len(source.image_encoder.vit.state_dict())


def test_a_text_tower_whose_weights_lack_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from vilseg import create_model
    from vilseg.models.text_encoder import resolve_hf_name

    source = Path(resolve_hf_name("sentence-transformers/all-MiniLM-L6-v2"))
    partial = tmp_path / "minilm"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            (partial / name).write_bytes((source / name).read_bytes())
    state = load_file(str(source / "model.safetensors"))
    dropped = [k for k in state if "layer.5." in k]
    save_file({k: v for k, v in state.items() if k not in dropped}, str(partial / "model.safetensors"))
    with pytest.raises(ConfigError, match="lack .* tensors"):
        create_model("vilseg-tiny-minilm", text={"name": str(partial)})


def test_an_open_clip_text_tower_loads_every_tensor_of_a_file_and_refuses_another_architecture(tiny_dir):
    from vilseg import create_model

    with pytest.raises(ConfigError, match="does not fit open_clip's 'ViT-B-32'"):
        create_model("vilseg-tiny-minilm", text={"backend": "open_clip", "name": "ViT-B-32",
                                                 "pretrained": str(tiny_dir / "open_clip_model.safetensors")})


# ------------------------------------------------------------------ training from a CLIP
def _clip_file(tmp_path: Path) -> Path:
    """A tiny open_clip checkpoint of the registered clip-tiny architecture, saved with torch.save."""
    import open_clip

    from vilseg.models import get_model_config

    torch.manual_seed(3)
    model = open_clip.create_model(register_open_clip_config(get_model_config("clip-tiny")["clip"]["model_cfg"]))
    _randomise(model)
    path = tmp_path / "clip-tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_two_training_steps_from_a_tiny_open_clip_checkpoint_on_synthetic_shards(tmp_path):
    from vilseg.models import ViLSeg
    from vilseg.train import main as train_main

    path, reference = _clip_file(tmp_path)
    run = tmp_path / "run"
    final = train_main(["--config", "configs/clip/vilseg-debug.yaml", f"run.dir={run}", "train.steps=2",
                        f"model.overrides.clip.pretrained={path}"])
    report = json.loads((run / "init_report.json").read_text())["init"]
    assert report["source"].startswith("open_clip clip-tiny") and "text_encoder.tower.token_embedding.weight" in \
        report["loaded"] and all(k.startswith("cluster_head.") for k in report["new"])
    model = ViLSeg.from_pretrained(final).eval()
    tokenizer = model.tokenizer
    with torch.no_grad():  # the frozen text tower is still exactly the checkpoint's
        ids = tokenizer(TEXTS)["input_ids"]
        torch.testing.assert_close(model.encode_texts(TEXTS), F.normalize(reference.encode_text(ids), dim=-1))
    trained = model.image_encoder.vit.blocks[-1].attn.qkv.weight
    frozen = model.image_encoder.vit.blocks[0].attn.qkv.weight
    ref_vit = {k: v for k, v in reference.state_dict().items() if k.startswith("visual.transformer.resblocks.0.")}
    torch.testing.assert_close(frozen, ref_vit["visual.transformer.resblocks.0.attn.in_proj_weight"])  # model.freeze
    assert not torch.equal(trained, reference.state_dict()["visual.transformer.resblocks.1.attn.in_proj_weight"])
    # the image side's joint space is still the CLIP's: its class-token embedding barely moved at a 1e-5 rate
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mean = torch.tensor(model.config.image.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.config.image.std).view(1, 3, 1, 1)
        cos = F.cosine_similarity(model.dense_embeddings(model.image_encoder.normalize(images))["image_embed"],
                                  reference.encode_image((images - mean) / std, normalize=True))
    assert cos.min() > 0.99


def test_clipself_trains_the_dense_read_out_toward_a_frozen_copy_of_the_initial_clip(tmp_path):
    from vilseg.objectives.clipself import CLIPSelf, centre_square, grid_boxes, grid_choices
    from vilseg.train import main as train_main

    assert grid_choices(2) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert torch.equal(grid_boxes(1, 2), torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]))
    assert torch.equal(centre_square(torch.tensor([[0.0, 0.0, 4.0, 2.0]])), torch.tensor([[1.0, 0.0, 3.0, 2.0]]))
    path, reference = _clip_file(tmp_path)
    run = tmp_path / "run"
    train_main(["--config", "configs/clip/clipself-debug.yaml", f"run.dir={run}", "train.steps=2",
                f"model.overrides.clip.pretrained={path}"])
    # the teacher is the initial CLIP: its embedding of a crop is open_clip's encode_image of that crop
    from vilseg import create_model

    model = create_model("clip-tiny", clip={"pretrained": str(path)})
    objective = CLIPSelf(model, CLIPSelf.Options(max_split=2, max_boxes=4))
    view = torch.randn(1, 3, 32, 32)
    cells = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        got = objective.teacher_targets(view, cells, torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(got, reference.encode_image(view, normalize=True), atol=1e-5, rtol=0)


def test_the_vit_b16_text_tower_takes_quick_gelu_from_the_openai_tag(monkeypatch):
    """vilseg-vit-b16's open_clip text tower with pretrained='openai' is built with QuickGELU, as those weights were
    trained (checked without downloading: the loader is intercepted)."""
    import vilseg.models.clip as clip_module
    from vilseg import create_model

    seen = {}

    def intercept(clip, weights=True):
        seen["quick_gelu"] = clip.model_cfg.get("quick_gelu")
        raise ConfigError("intercepted")

    monkeypatch.setattr(clip_module, "create_open_clip", intercept)
    with pytest.raises(ConfigError, match="intercepted"):
        create_model("vilseg-vit-b16")
    assert seen["quick_gelu"] is True
