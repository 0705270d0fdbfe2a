"""CLIP: an image tower and a text tower mapped into one embedding space.

``CLIP`` receives its two parts (``visual``, ``text``); ``build_clip(config)`` assembles them from
a ``CLIPConfig``. Named configs are registered in ``fmrt.models.clip_configs``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
class CLIPConfig:
    embed_dim: int = 512
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    act: str = "quick_gelu"
    init_logit_scale: float = math.log(1 / 0.07)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        d.pop("family", None)
        d.pop("arch", None)
        vision = CLIPVisionConfig(**d.pop("vision", {}))
        text = CLIPTextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)


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
                          groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip ``ClipLoss`` at world size 1): mean of image->text and
    text->image cross-entropies over ``B x B`` logits with matches on the diagonal.

    ``hard_negative_features`` (``M x E``, NegCLIP) are appended as extra columns of the
    image->text logits only; the text->image direction is unchanged, as in NegCLIP.
    ``groups`` (``B`` int64): rows with the same id carry the same caption; their targets are
    spread uniformly over the group instead of punishing a duplicate as a negative (in a
    synthetic world of ~50 single-object captions, batches of 128 hold many duplicates).
    """
    b = image_features.shape[0]
    texts = text_features if hard_negative_features is None else torch.cat(
        [text_features, hard_negative_features], dim=0)
    logits_i2t = logit_scale * image_features @ texts.t()
    logits_t2i = logits_i2t[:, :b].t()
    if groups is None:
        labels = torch.arange(b, device=image_features.device)
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    same = (groups[:, None] == groups[None, :]).to(logits_i2t.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    target_i2t = F.pad(target, (0, logits_i2t.shape[1] - b))
    return 0.5 * (F.cross_entropy(logits_i2t, target_i2t) + F.cross_entropy(logits_t2i, target))
