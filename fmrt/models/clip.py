"""CLIP: an image tower and a text tower mapped into one embedding space.

``CLIP`` receives its two parts (``visual``, ``text``); ``build_clip(config)`` assembles them from
a ``CLIPConfig``. Named configs are registered in ``fmrt.models.clip_configs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.config import ConfigMixin
from fmrt.models.text_transformer import TextTransformer
from fmrt.models.vision_transformer import VisionTransformer

# logit_scale is clamped at ln(100): OpenAI's "temperature no lower than 0.01" (CLIP paper, 2.5).
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    eot_token_id: int = 49407


@dataclass
class CLIPConfig(ConfigMixin):
    embed_dim: int = 512
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    act: str = "quick_gelu"
    init_logit_scale: float = math.log(1 / 0.07)


class CLIP(nn.Module):
    """Contrastive image-text model.

    ``forward(images, text)`` returns ``(image_features BxE, text_features TxE, logit_scale)`` with
    L2-normalised features and the exponentiated, clamped scale (a 0-dim tensor).
    """

    def __init__(self, *, visual: VisionTransformer, text: TextTransformer,
                 init_logit_scale: float = math.log(1 / 0.07), config: CLIPConfig | None = None
                 ) -> None:
        super().__init__()
        if visual.output_dim != text.output_dim:
            raise ValueError(f"tower output dims differ: {visual.output_dim} vs {text.output_dim}")
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.config = config
        self.embed_dim = visual.output_dim

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images: ``B x 3 x S x S`` float, already normalised. Returns ``B x E``."""
        f = self.visual(images)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """text: ``T x L`` int64 token ids. Returns ``T x E``."""
        f = self.text(text)
        return F.normalize(f, dim=-1) if normalize else f

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, images: torch.Tensor, text: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.encode_image(images, normalize=True), self.encode_text(text, normalize=True),
                self.scale())


def build_clip(config: CLIPConfig) -> CLIP:
    v, t = config.vision, config.text
    visual = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                               layers=v.layers, heads=v.heads, output_dim=config.embed_dim,
                               mlp_ratio=v.mlp_ratio, act=config.act)
    text = TextTransformer(vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
                           layers=t.layers, heads=t.heads, output_dim=config.embed_dim,
                           eot_token_id=t.eot_token_id, mlp_ratio=t.mlp_ratio, act=config.act)
    return CLIP(visual=visual, text=text, init_logit_scale=config.init_logit_scale, config=config)


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor, *,
                          hard_negative_features: torch.Tensor | None = None,
                          positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip ``ClipLoss`` at world size 1): mean of image->text and
    text->image cross-entropies over ``B x B`` logits with matches on the diagonal.

    ``hard_negative_features`` (``M x E``, NegCLIP) are appended as extra columns of the
    image->text logits only; the text->image direction is unchanged, as in NegCLIP.
    ``positives`` (``B x B`` or ``B x (B + M)`` bool, diagonal true): ``positives[i, j]`` when
    caption (or hard negative) ``j`` is also true of image ``i``. The target of each row is then spread uniformly over its positives
    instead of treating them as negatives. ShapesWorld captions are partial ("a circle"): in a
    batch of 64, each image has 4.7 true captions on average, so plain InfoNCE would push
    away 3.7 correct captions per image and hold the learned temperature near 1/15.
    """
    b = image_features.shape[0]
    texts = text_features if hard_negative_features is None else torch.cat(
        [text_features, hard_negative_features], dim=0)
    logits_i2t = logit_scale * image_features @ texts.t()
    logits_t2i = logits_i2t[:, :b].t()
    if positives is None:
        labels = torch.arange(b, device=image_features.device)
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    pos = positives.to(logits_i2t.dtype)
    target_i2t = F.pad(pos / pos.sum(dim=1, keepdim=True), (0, logits_i2t.shape[1] - pos.shape[1]))
    pos_t = pos[:, :b].t()
    target_t2i = pos_t / pos_t.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits_i2t, target_i2t) + F.cross_entropy(logits_t2i, target_t2i))


def hard_negative_ranking_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                               hard_negative_features: torch.Tensor, logit_scale: torch.Tensor
                               ) -> torch.Tensor:
    """Per-image ``(1 + k)``-way cross-entropy between its true caption and its own ``k`` hard
    negatives (``hard_negative_features``: ``B*k x E``, rows ``i*k .. i*k+k-1`` belong to image
    ``i``). In NegCLIP's batch softmax a caption's 3 negatives are 3 of ~250 columns, so at the
    temperature ShapesWorld settles at (scale ~20) they carry ~1% of the gradient; this term
    ranks each image's true caption directly above the negatives that differ from it by one
    word or word order, which is what compositional accuracy measures."""
    b = image_features.shape[0]
    negs = hard_negative_features.view(b, -1, hard_negative_features.shape[-1])
    pos = (image_features * text_features).sum(-1, keepdim=True)            # B x 1
    neg = torch.einsum("be,bke->bk", image_features, negs)                    # B x k
    logits = logit_scale * torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=logits.device))
