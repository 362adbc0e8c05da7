"""The ViL-Seg model: image encoder, text encoder, joint projections, vision head and clustering head."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, model_config_from_dict
from .heads import ClusterHead, SlotHead
from .image_encoder import ImageEncoder, ImageFeatures, build_image_encoder, tokens_to_map
from .text_encoder import build_text_encoder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEXT_ASSETS = "text_encoder"
REFERENCE_NAME = "text_reference.safetensors"  # the score reference (ViLSeg.fit_text_reference), when fitted


class ViLSeg(nn.Module):
    """Image and text towers with the joint projections and the clustering head; computes embeddings, never losses.

    Training-only heads (the vision-contrast head, MMC's heads, ...) belong to the objectives that train them
    (:mod:`vilseg.objectives`); this module holds what inference needs.

    Args:
        image_encoder: :class:`ImageEncoder`.
        text_encoder: a text tower with ``forward(input_ids, attention_mask) -> [B, W]`` and a ``tokenizer``.
        embed_dim: joint image-text width E.
        n_clusters: C.
        cluster_hidden: hidden width of the clustering head.
        init_logit_scale: initial log of the cross-modal logit scale.
        config: the :class:`ModelConfig` that built this model (saved with the weights).
        joint: ``"learned"`` (fresh image and text projections into the joint space) or ``"clip"`` (a CLIP's joint
            space: ``image_proj`` holds CLIP's ``proj`` and the text tower's output is already joint, so
            ``text_proj`` is the identity; vilseg/models/clip.py).
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: nn.Module, embed_dim: int, n_clusters: int,
                 cluster_hidden: int, init_logit_scale: float, config: ModelConfig | None = None,
                 n_prototypes: int = 0, prototype_dim: int = 128, prototype_hidden: int = 512, joint: str = "learned"):
        super().__init__()
        if joint not in ("learned", "clip"):
            raise ValueError(f"joint must be 'learned' or 'clip', got {joint!r}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        width = image_encoder.width
        # Linear, so that with avg pooling the global joint embedding is the mean of the patch joint embeddings:
        # the cross-modal contrast then shapes the dense embeddings the segmenter reads.
        self.image_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Identity() if joint == "clip" else nn.Linear(text_encoder.width, embed_dim)
        self.joint = joint
        self.init_report = None  # a CLIP-built model: which tensors came from the CLIP (vilseg/models/clip.py)
        self.text_reference: torch.Tensor | None = None  # [E], see fit_text_reference; saved in its own file
        self.cluster_head = ClusterHead(width, cluster_hidden, n_clusters)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.slot_head = SlotHead(width, prototype_hidden, prototype_dim, n_prototypes) if n_prototypes else None
        self.config = config

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.text_encoder.parameters()):
            self.text_encoder.eval()  # a frozen tower (text.freeze, or model.freeze) keeps dropout off
        return self

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] tokens -> [B, E] L2-normalised joint-space text embeddings."""
        return self.embed_text_features(self.text_encoder(input_ids, attention_mask))

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, W] text-tower features (e.g. cached ones of a frozen tower) -> [B, E] normalised joint embeddings."""
        return F.normalize(self.text_proj(feats), dim=-1)

    @torch.no_grad()
    def fit_text_reference(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Fixes the reference that class names are centred against: the mean joint-space embedding of ``texts``
        (the training captions; ``train.export`` fits it). Returns it ([E], float32, CPU).

        Text embeddings share a large common component (prompt template, caption wording), and regions that no name
        describes drift towards it. Subtracting a mean before scoring removes it. Subtracting the mean of the names
        being asked would make a segment's score for one class depend on which other classes are in the list, so
        that a calibrated background threshold meant something else in every vocabulary; this reference is fixed
        with the model instead (:meth:`VocabularyIndex.build` with ``center=True`` subtracts it).

        Args:
            texts: training captions (a few thousand suffice).
            batch_size: captions encoded at a time.
        """
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if len(texts) < 2:
            raise ValueError(f"fit_text_reference needs at least 2 non-empty captions, got {len(texts)}")
        was_training = self.training
        self.eval()
        total = None
        for i in range(0, len(texts), batch_size):
            part = self.encode_texts(texts[i:i + batch_size]).detach().double().sum(0).cpu()
            total = part if total is None else total + part
        self.train(was_training)
        self.text_reference = (total / len(texts)).float()
        return self.text_reference

    @torch.no_grad()
    def fold_text_subspace(self, texts: list[str], variance: float = 0.95, batch_size: int = 256) -> int:
        """Restricts the text projection to the principal subspace of the training captions' features; returns k.

        The text projection is trained only along the directions that the training captions' features span. Any
        other direction of a query (a word training never used, such as a synonym) meets weights that received no
        gradient and still hold their random initialisation, which scrambles the query. Projecting the features
        onto the span of the captions first, ``t' = mu + U U^T (t - mu)`` (mu their mean, U [W, k] the fewest
        principal directions that keep ``variance`` of their variance), drops that untrained part and keeps what
        the query shares with the training vocabulary. With a web-scale caption set the subspace is nearly the whole
        space and this is close to a no-op; with a narrow vocabulary it matters (docs/results.md).

        The projection is linear, so it is folded into ``text_proj``: with text_proj(t) = W t + b,

            W' = W U U^T ,   b' = b + W (mu - U U^T mu)

        and inference keeps one text path. Folding twice composes the two projections.

        Args:
            texts: training captions (a few thousand suffice).
            variance: fraction of the captions' feature variance the subspace keeps, in (0, 1].
            batch_size: captions encoded at a time.
        """
        if not 0 < variance <= 1:
            raise ValueError(f"variance must be in (0, 1], got {variance!r}")
        if self.joint == "clip":
            from ..errors import ConfigError

            raise ConfigError("train.text_subspace folds the captions' subspace into a learned text projection; a "
                              "model started from a CLIP keeps CLIP's text space (set train.text_subspace: null)")
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if len(texts) < 2:
            raise ValueError(f"fold_text_subspace needs at least 2 non-empty captions, got {len(texts)}")
        device = self.logit_scale.device
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        feats = []
        for i in range(0, len(texts), batch_size):
            tokens = {k: v.to(device) for k, v in self.tokenizer(texts[i:i + batch_size]).items()}
            feats.append(self.text_encoder(tokens["input_ids"], tokens.get("attention_mask")).double())
        self.text_encoder.train(was_training)
        feats = torch.cat(feats)
        mean = feats.mean(0)
        _, sv, vh = torch.linalg.svd(feats - mean, full_matrices=False)  # float64: close singular values
        energy = (sv ** 2).cumsum(0) / (sv ** 2).sum().clamp_min(1e-30)
        k = min(int(torch.searchsorted(energy, torch.tensor(variance, dtype=energy.dtype) - 1e-12).item()) + 1,
                vh.shape[0])
        projector = vh[:k].t() @ vh[:k]  # [W, W] = U U^T
        weight = self.text_proj.weight.double()
        self.text_proj.bias.add_((weight @ (mean - projector @ mean)).to(self.text_proj.bias.dtype))
        self.text_proj.weight.copy_((weight @ projector).to(self.text_proj.weight.dtype))
        return k

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Tokenises and encodes raw strings; [len(texts), E] normalised."""
        device = self.logit_scale.device
        tokens = {k: v.to(device) for k, v in self.tokenizer(texts).items()}
        return self.encode_text(tokens["input_ids"], tokens.get("attention_mask"))

    def embed_image(self, global_token: torch.Tensor) -> torch.Tensor:
        """[B, D] global tokens -> [B, E] L2-normalised joint-space image embeddings."""
        return F.normalize(self.image_proj(global_token), dim=-1)

    def embed_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] patch tokens -> [B, N, E] L2-normalised joint-space patch embeddings (what pooled naming, the
        ``dense`` and the ``pacl`` objectives read)."""
        return F.normalize(self.image_proj(patch_tokens), dim=-1)

    def cluster_logits(self, feats: ImageFeatures, detach: bool = False) -> torch.Tensor:
        """Clustering-head logits of every patch, [B, C, h, w]; ``detach`` keeps their gradient out of the encoder."""
        tokens = feats.patch_tokens.detach() if detach else feats.patch_tokens
        return tokens_to_map(self.cluster_head(tokens), feats.grid)

    def dense_embeddings(self, images: torch.Tensor, keep_block: int | None = None,
                         readout=None) -> dict[str, torch.Tensor]:
        """Inference view of one batch of normalised images.

        Args:
            images: [B, 3, H, W] normalised.
            keep_block: also return the tokens entering this encoder block (for :meth:`segment_embeddings`).
            readout: a dense read-out of the last block (:mod:`vilseg.models.readouts`); ``patch_embed`` is then its
                patch tokens, projected as the image embedding is (the clusters still read the usual tokens).

        Returns:
            dict with ``patch_embed`` [B, E, h, w] (L2-normalised joint-space patch embeddings),
            ``cluster_probs`` [B, C, h, w], ``image_embed`` [B, E] (normalised), with a slot head ``slot_dots``
            [B, K, h, w] (every patch's cosine to the K prototypes), and with ``keep_block`` ``hidden`` [B, P + N, D]
            and ``hidden_block`` (an int).
        """
        feats = self.image_encoder(images, keep_block=keep_block, readout=readout)
        patches = feats.patch_tokens if readout is None else feats.readout_tokens
        out = {
            "patch_embed": tokens_to_map(self.embed_patches(patches), feats.grid),
            "cluster_probs": self.cluster_logits(feats).softmax(1),
            "image_embed": self.embed_image(feats.global_token),
        }
        if self.slot_head is not None:
            out["slot_dots"] = self.slot_head(feats.patch_tokens, feats.grid)[1]
        if keep_block is not None:
            out["hidden"], out["hidden_block"] = feats.hidden, keep_block
        return out

    def segment_embeddings(self, hidden: torch.Tensor, masks: torch.Tensor, start_block: int) -> torch.Tensor:
        """[B, P + N, D] tokens entering ``start_block``, [B, S, N] bool segment masks (or [B, N] segment ids of a
        partition, 0..S-1) -> [B, S, E] normalised joint-space embeddings of every segment encoded on its own from
        that block on (:meth:`ImageEncoder.encode_segments`), projected exactly as the image embedding is."""
        if masks.dtype != torch.bool:
            masks = F.one_hot(masks, int(masks.max()) + 1).transpose(1, 2).bool()
        return self.embed_image(self.image_encoder.encode_segments(hidden, masks, start_block))

    forward = dense_embeddings

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``model.safetensors`` + ``config.json`` (+ text-tower assets) into ``directory``."""
        from safetensors.torch import save_file

        if self.config is None:
            raise ValueError("this model has no config; build it with vilseg.create_model")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = dataclasses.asdict(self.config)
        cfg["image"]["pretrained"] = False  # weights come from the safetensors file
        cfg["image"]["checkpoint_path"] = None
        cfg["clip"]["pretrained"] = None  # the CLIP's architecture is in clip.model_cfg
        if cfg["text"]["backend"] == "open_clip":
            cfg["text"]["pretrained"] = None
        else:
            self.text_encoder.save_assets(directory / TEXT_ASSETS)
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        if self.text_reference is not None:
            save_file({"mean": self.text_reference.detach().float().contiguous().cpu()},
                      str(directory / REFERENCE_NAME), metadata={"format": "pt"})
        elif (directory / REFERENCE_NAME).exists():
            (directory / REFERENCE_NAME).unlink()  # a stale reference of another model
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "ViLSeg":
        """Loads a model written by :meth:`save_pretrained` (safetensors only: nothing is unpickled)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a vilseg checkpoint directory")
        cfg = model_config_from_dict(json.loads((directory / CONFIG_NAME).read_text()), str(directory / CONFIG_NAME))
        asset_dir = directory / TEXT_ASSETS if cfg.text.backend == "hf" else None
        model = build_vilseg(cfg, text_asset_dir=asset_dir, weights=False)
        weights = directory / WEIGHTS_NAME
        try:
            state = load_file(str(weights), device=map_location)
        except Exception as exn:  # safetensors raises its own error types for truncated or foreign files
            raise ValueError(f"{weights} is not a readable safetensors file: {exn}") from exn
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape]
        if missing or unexpected or reshaped:
            raise ValueError(f"{weights} does not fit the model its config.json describes: {len(missing)} missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                             f"{len(reshaped)} of another shape (e.g. {reshaped[:2]})")
        model.load_state_dict(state)
        reference = directory / REFERENCE_NAME
        if reference.is_file():
            try:
                mean = load_file(str(reference))["mean"]
            except Exception as exn:
                raise ValueError(f"{reference} is not a readable text reference (a safetensors file with a 'mean' "
                                 f"tensor): {exn}") from exn
            dim = model.image_proj.out_features
            if tuple(mean.shape) != (dim,):
                raise ValueError(f"{reference}: the text reference has shape {tuple(mean.shape)}, the model's joint "
                                 f"space has {dim} dimensions")
            model.text_reference = mean.float()
        return model


def build_vilseg(cfg: ModelConfig, text_asset_dir=None, weights: bool = True) -> ViLSeg:
    """Builds a :class:`ViLSeg` from its config (the only place that reads a ModelConfig). A config with a CLIP
    (``clip.name``) is built from the CLIP, with its weights unless ``weights`` is False (an export, whose
    safetensors follow)."""
    if cfg.clip.name or cfg.clip.model_cfg:
        return build_from_clip(cfg, weights=weights)
    return ViLSeg(
        image_encoder=build_image_encoder(cfg.image),
        text_encoder=build_text_encoder(cfg.text, asset_dir=text_asset_dir),
        embed_dim=cfg.embed_dim, n_clusters=cfg.n_clusters, cluster_hidden=cfg.cluster_hidden,
        init_logit_scale=cfg.init_logit_scale, config=cfg, n_prototypes=cfg.n_prototypes,
        prototype_dim=cfg.prototype_dim, prototype_hidden=cfg.prototype_hidden,
    )


def build_from_clip(cfg: ModelConfig, weights: bool = True) -> ViLSeg:
    """A :class:`ViLSeg` whose towers, projections and logit scale are a CLIP's (vilseg/models/clip.py): the image
    tower timm's CLIP ViT with the CLIP's weights, the text tower the CLIP's own module, ``image_proj`` CLIP's
    ``proj``, ``text_proj`` the identity. ``model.init_report`` lists the tensors that came from the CLIP."""
    from .clip import clip_parts, clip_text_tower, init_report, load_clip_weights
    from .text_encoder import OpenCLIPTextEncoder, OpenCLIPTokenizer

    cfg, source, tokenizer = clip_parts(cfg, weights)
    context = cfg.text.context_length
    text_encoder = OpenCLIPTextEncoder(clip_text_tower(source, context), OpenCLIPTokenizer(tokenizer, context),
                                       width=cfg.embed_dim)
    if cfg.text.freeze:
        text_encoder.requires_grad_(False)
    model = ViLSeg(build_image_encoder(cfg.image), text_encoder, embed_dim=cfg.embed_dim, n_clusters=cfg.n_clusters,
                   cluster_hidden=cfg.cluster_hidden, init_logit_scale=cfg.init_logit_scale, config=cfg,
                   n_prototypes=cfg.n_prototypes, prototype_dim=cfg.prototype_dim,
                   prototype_hidden=cfg.prototype_hidden, joint="clip")
    model.init_report = init_report(cfg.clip, load_clip_weights(model, source) if weights else [], weights)
    return model
