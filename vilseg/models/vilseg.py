"""The ViL-Seg model: image encoder, text encoder, joint projections, vision head and clustering head."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, model_config_from_dict
from .heads import ClusterHead, mlp
from .image_encoder import ImageEncoder, build_image_encoder, tokens_to_map
from .text_encoder import build_text_encoder

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: a temperature below 0.01 destabilises training
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEXT_ASSETS = "text_encoder"


class ViLSeg(nn.Module):
    """Image and text towers with the heads ViL-Seg trains; computes embeddings, never losses.

    Args:
        image_encoder: :class:`ImageEncoder`.
        text_encoder: a text tower with ``forward(input_ids, attention_mask) -> [B, W]`` and a ``tokenizer``.
        embed_dim: joint image-text width E.
        vision_dim: output width of the vision-contrast head.
        vision_hidden: hidden width of the vision-contrast head.
        n_clusters: C.
        cluster_hidden: hidden width of the clustering head.
        init_logit_scale: initial log of the cross-modal logit scale.
        text_proj: "linear", "linear_identity_init" or "identity" (locked text space).
        text_subspace: k > 0 allocates the buffers of a fitted training-caption subspace (see
            :meth:`fit_text_subspace`); 0 for none.
        config: the :class:`ModelConfig` that built this model (saved with the weights).
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: nn.Module, embed_dim: int, vision_dim: int,
                 vision_hidden: int, n_clusters: int, cluster_hidden: int, init_logit_scale: float,
                 config: ModelConfig | None = None, text_proj: str = "linear", text_subspace: int = 0):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        width = image_encoder.width
        # Linear, so that with avg pooling the global joint embedding is the mean of the patch joint embeddings:
        # the cross-modal contrast then shapes the dense embeddings the segmenter reads.
        self.image_proj = nn.Linear(width, embed_dim)
        if text_proj == "identity":
            if text_encoder.width != embed_dim:
                raise ValueError(f"text_proj='identity' needs embed_dim == text width ({text_encoder.width}), "
                                 f"got embed_dim={embed_dim}")
            self.text_proj = nn.Identity()
        elif text_proj in ("linear", "linear_identity_init"):
            self.text_proj = nn.Linear(text_encoder.width, embed_dim)
            if text_proj == "linear_identity_init":  # trained, but starting from the text tower's own geometry
                if text_encoder.width != embed_dim:
                    raise ValueError("text_proj='linear_identity_init' needs embed_dim == text width")
                nn.init.eye_(self.text_proj.weight)
                nn.init.zeros_(self.text_proj.bias)
        else:
            raise ValueError(f"text_proj must be 'linear', 'linear_identity_init' or 'identity', got {text_proj!r}")
        self.vision_head = mlp(width, vision_hidden, vision_dim)
        self.cluster_head = ClusterHead(width, cluster_hidden, n_clusters)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.config = config
        # Training-caption subspace of the text features (None until fitted; None buffers are not in state_dict).
        k = int(text_subspace)
        self.register_buffer("text_mean", torch.zeros(text_encoder.width) if k else None)
        self.register_buffer("text_basis", torch.zeros(text_encoder.width, k) if k else None)

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config is not None and self.config.text.freeze:
            self.text_encoder.eval()  # a frozen tower keeps dropout off
        return self

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] tokens -> [B, E] L2-normalised joint-space text embeddings."""
        return F.normalize(self.text_proj(self.project_text_features(self.text_encoder(input_ids, attention_mask))),
                           dim=-1)

    def project_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Text-tower features -> their projection onto the fitted training-caption subspace (identity if none).

        ``t' = mu + U U^T (t - mu)``, with mu the mean and U [W, k] the top-k principal directions of the training
        captions' features. See :meth:`fit_text_subspace`.
        """
        if self.text_basis is None:
            return feats
        basis = self.text_basis.to(feats.dtype)
        centred = feats - self.text_mean.to(feats.dtype)
        return self.text_mean.to(feats.dtype) + (centred @ basis) @ basis.t()

    @torch.no_grad()
    def fit_text_subspace(self, texts: list[str], variance: float = 0.95, batch_size: int = 256) -> int:
        """Fits the subspace that text features are projected onto before ``text_proj``; returns its dimension k.

        The text projection is trained only on the directions the training captions span. Any other direction
        of a query (a word training never used, such as a synonym) meets weights that received no gradient and
        still hold their random initialisation, which scrambles the query. Projecting features onto the span of
        the training captions' features first (the smallest k principal directions that explain ``variance`` of
        their variance, around their mean) drops that untrained part and keeps what the query shares with the
        training vocabulary. With a web-scale caption set the subspace is close to the full space and this is
        nearly a no-op; with a narrow vocabulary it matters (docs/results.md, fifth session).

        Args:
            texts: training captions (a few thousand suffice).
            variance: fraction of the captions' feature variance the subspace keeps, in (0, 1].
            batch_size: captions encoded at a time.
        """
        if not 0 < variance <= 1:
            raise ValueError(f"variance must be in (0, 1], got {variance!r}")
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if len(texts) < 2:
            raise ValueError(f"fit_text_subspace needs at least 2 non-empty captions, got {len(texts)}")
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
        _, sv, vh = torch.linalg.svd(feats - mean, full_matrices=False)
        energy = (sv ** 2).cumsum(0) / (sv ** 2).sum().clamp_min(1e-30)
        k = int(torch.searchsorted(energy, torch.tensor(variance, dtype=energy.dtype) - 1e-12).item()) + 1
        k = min(k, vh.shape[0])
        self.text_mean = mean.float()
        self.text_basis = vh[:k].t().float().contiguous()
        if self.config is not None:
            self.config = dataclasses.replace(self.config, text_subspace=k)
        return k

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Tokenises and encodes raw strings; [len(texts), E] normalised."""
        device = self.logit_scale.device
        tokens = {k: v.to(device) for k, v in self.tokenizer(texts).items()}
        return self.encode_text(tokens["input_ids"], tokens.get("attention_mask"))

    def dense_embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference view of one batch of normalised images.

        Returns:
            dict with ``patch_embed`` [B, E, h, w] (L2-normalised joint-space patch embeddings),
            ``cluster_probs`` [B, C, h, w] and ``image_embed`` [B, E] (normalised).
        """
        feats = self.image_encoder(images)
        patch_joint = self.image_proj(feats.patch_tokens)  # [B, N, E]
        probs = self.cluster_head(feats.patch_tokens).softmax(-1)  # [B, N, C]
        return {
            "patch_embed": tokens_to_map(F.normalize(patch_joint, dim=-1), feats.grid),
            "cluster_probs": tokens_to_map(probs, feats.grid),
            "image_embed": F.normalize(self.image_proj(feats.global_token), dim=-1),
        }

    def forward(self, views: list[torch.Tensor], input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, vision: bool = True, n_cluster_views: int = 0,
                patch_masks: list[torch.Tensor | None] | None = None, detach_cluster_input: bool = False) -> dict:
        """Training view: embeddings for every augmented view of a batch.

        Args:
            views: list of [B, 3, H_v, W_v] normalised images; ``views[0]`` is paired with the captions.
            input_ids: [B, L] caption tokens (optional).
            attention_mask: [B, L].
            vision: also return the vision-head embedding of every view.
            n_cluster_views: return cluster logits for the first this-many views.
            patch_masks: optional per-view [B, h, w] bool masks.
            detach_cluster_input: the clustering head sees detached patch tokens, so the clustering loss trains the
                head only and never the encoder.

        Returns:
            dict: ``image_embed`` [B, E] (view 0), ``text_embed`` [B, E], ``vision_embed`` list of [B, P],
            ``cluster_logits`` list of [B, C, h, w], ``logit_scale`` (scalar, clamped, exponentiated).
        """
        out: dict = {"logit_scale": self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()}
        masks = patch_masks or [None] * len(views)
        feats = [self.image_encoder(v, patch_mask=m) for v, m in zip(views, masks)]
        out["image_embed"] = F.normalize(self.image_proj(feats[0].global_token), dim=-1)
        if input_ids is not None:
            out["text_embed"] = self.encode_text(input_ids, attention_mask)
        if vision:
            out["vision_embed"] = [F.normalize(self.vision_head(f.global_token), dim=-1) for f in feats]
        out["cluster_logits"] = [
            tokens_to_map(self.cluster_head(f.patch_tokens.detach() if detach_cluster_input else f.patch_tokens), f.grid)
            for f in feats[:n_cluster_views]]
        return out

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
        if cfg["text"]["backend"] == "open_clip":
            cfg["text"]["pretrained"] = None
        else:
            self.text_encoder.save_assets(directory / TEXT_ASSETS)
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
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
        model = build_vilseg(cfg, text_asset_dir=asset_dir)
        state = load_file(str(directory / WEIGHTS_NAME), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{directory / WEIGHTS_NAME}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def build_vilseg(cfg: ModelConfig, text_asset_dir=None) -> ViLSeg:
    """Builds a :class:`ViLSeg` from its config (the only place that reads a ModelConfig)."""
    return ViLSeg(
        image_encoder=build_image_encoder(cfg.image),
        text_encoder=build_text_encoder(cfg.text, asset_dir=text_asset_dir),
        embed_dim=cfg.embed_dim, vision_dim=cfg.vision_dim, vision_hidden=cfg.vision_hidden,
        n_clusters=cfg.n_clusters, cluster_hidden=cfg.cluster_hidden, init_logit_scale=cfg.init_logit_scale,
        config=cfg, text_proj=cfg.text_proj, text_subspace=cfg.text_subspace,
    )
