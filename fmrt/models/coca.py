"""CoCa (Yu et al. 2022): contrastive + captioning.

Parts (passed in; ``build_coca(config)`` assembles them):
  * ``visual``: the CLIP ViT; its token sequence (after ``ln_post``) feeds two attentional poolers.
  * ``contrastive_pool``: 1 learned query -> the image embedding (after ``proj``).
  * ``caption_pool``: ``n_queries`` learned queries -> the image tokens the decoder attends to.
  * ``text``: the unimodal causal text decoder (CLIP's text tower), pooled at end-of-text for the
    contrastive text embedding; its token states are the multimodal decoder's input.
  * ``decoder``: causal self-attention + cross-attention to the pooled image tokens, then a
    linear head over the vocabulary.
Loss = ``contrastive_weight`` * symmetric InfoNCE + ``caption_weight`` * next-token cross-entropy
(open_clip's defaults are 1 and 2).

The contrastive towers share CLIP's interface (``encode_image``/``encode_text``/``scale``), so the
CLIP export graphs, runtime facade and evaluation apply unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.clip import LOGIT_SCALE_MAX, CLIPTextConfig, CLIPVisionConfig, clip_contrastive_loss
from fmrt.models.config import ConfigMixin
from fmrt.models.text_transformer import TextTransformer
from fmrt.models.transformer import LayerNorm, MultiheadAttention, Transformer
from fmrt.models.vision_transformer import VisionTransformer


@dataclass
class CoCaDecoderConfig:
    layers: int = 2
    heads: int = 4
    n_queries: int = 16
    mlp_ratio: float = 4.0


@dataclass
class CoCaConfig(ConfigMixin):
    embed_dim: int = 128
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    decoder: CoCaDecoderConfig = field(default_factory=CoCaDecoderConfig)
    act: str = "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries cross-attending to a token sequence (CoCa / open_clip)."""

    def __init__(self, *, width: int, context_dim: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, width) * width ** -0.5)
        self.ln_q = LayerNorm(width)
        self.ln_k = LayerNorm(context_dim)
        self.attn = MultiheadAttention(width=width, heads=heads, kv_dim=context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: ``B x S x context_dim`` -> ``B x n_queries x width``."""
        q = self.ln_q(self.query).expand(tokens.shape[0], -1, -1)
        return self.attn(q, self.ln_k(tokens))


class CoCa(nn.Module):
    def __init__(self, *, visual: VisionTransformer, text: TextTransformer,
                 contrastive_pool: AttentionalPooler, caption_pool: AttentionalPooler,
                 decoder: Transformer, embed_dim: int, vocab_size: int,
                 init_logit_scale: float = math.log(1 / 0.07),
                 config: Optional[CoCaConfig] = None) -> None:
        super().__init__()
        self.visual, self.text = visual, text
        self.contrastive_pool, self.caption_pool = contrastive_pool, caption_pool
        self.decoder = decoder
        width = decoder.width
        self.ln_pool = LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.ln_final = LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.config = config
        self.embed_dim = embed_dim

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual.forward_tokens(images)[1]

    def _embed_image_tokens(self, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
        f = self.ln_pool(self.contrastive_pool(tokens)[:, 0]) @ self.proj
        return F.normalize(f, dim=-1) if normalize else f

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images: ``B x 3 x S x S`` normalised float. Returns ``B x E``."""
        return self._embed_image_tokens(self._image_tokens(images), normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """text: ``T x L`` int64 ids. Returns ``T x E``."""
        f = self.text(text)
        return F.normalize(f, dim=-1) if normalize else f

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def decode_logits(self, caption_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``B x L x V`` for ids ``text`` (``B x L``) given pooled image tokens."""
        h = self.text.forward_tokens(text)
        h = self.decoder(h, is_causal=True, kv=caption_tokens)
        return self.lm_head(self.ln_final(h))

    def forward(self, images: torch.Tensor, text: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (image features ``BxE``, text features ``BxE`` (both normalised), scale,
        caption logits ``B x (L-1) x V`` predicting ``text[:, 1:]``)."""
        tokens = self._image_tokens(images)
        img = self._embed_image_tokens(tokens, True)
        txt = self.encode_text(text, normalize=True)
        logits = self.decode_logits(self.caption_pool(tokens), text[:, :-1])
        return img, txt, self.scale(), logits

    def loss(self, images: torch.Tensor, text: torch.Tensor, *, pad_token_id: int,
             positives: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        img, txt, scale, logits = self(images, text)
        con = clip_contrastive_loss(img, txt, scale, positives=positives)
        target = text[:, 1:]
        cap = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                              ignore_index=pad_token_id)
        cfg = self.config or CoCaConfig()
        total = cfg.contrastive_weight * con + cfg.caption_weight * cap
        return total, {"contrastive": float(con.detach()), "caption": float(cap.detach())}

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, *, sot_token_id: int, eot_token_id: int,
                 max_length: Optional[int] = None, vocab_size: Optional[int] = None
                 ) -> torch.Tensor:
        """Greedy captions: ``B x T`` ids starting with sot, ending with eot (or cut at
        ``max_length``); rows that finished early are padded with eot. ``vocab_size``: only ids
        below it are generated (the tokenizer's vocabulary may be smaller than the head)."""
        max_length = min(max_length or self.context_length, self.context_length)
        cap = self.caption_pool(self._image_tokens(images))
        out = torch.full((images.shape[0], 1), sot_token_id, dtype=torch.long,
                         device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        # Re-running the short prefix each step costs O(T^2) tokens; with T <= 32 that is ~16x
        # one pass of a 2-layer decoder, cheaper than threading a KV cache through CLIP's tower.
        for _ in range(max_length - 1):
            nxt = self.decode_logits(cap, out)[:, -1, :vocab_size].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eot_token_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot_token_id
            if bool(done.all()):
                break
        return out


def build_coca(config: CoCaConfig) -> CoCa:
    v, t, d = config.vision, config.text, config.decoder
    visual = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                               layers=v.layers, heads=v.heads, output_dim=config.embed_dim,
                               mlp_ratio=v.mlp_ratio, act=config.act)
    text = TextTransformer(vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
                           layers=t.layers, heads=t.heads, output_dim=config.embed_dim,
                           eot_token_id=t.eot_token_id, mlp_ratio=t.mlp_ratio, act=config.act)
    con = AttentionalPooler(width=t.width, context_dim=v.width, heads=d.heads, n_queries=1)
    cap = AttentionalPooler(width=t.width, context_dim=v.width, heads=d.heads,
                            n_queries=d.n_queries)
    dec = Transformer(width=t.width, layers=d.layers, heads=d.heads, mlp_ratio=d.mlp_ratio,
                      act=config.act, cross_attention=True)
    return CoCa(visual=visual, text=text, contrastive_pool=con, caption_pool=cap, decoder=dec,
                embed_dim=config.embed_dim, vocab_size=t.vocab_size,
                init_logit_scale=config.init_logit_scale, config=config)


# ----------------------------------------------------------------------------- registry
from fmrt.pretrained import register_family_builder  # noqa: E402
from fmrt.registry import register_model  # noqa: E402

COCA_CONFIGS = {
    # Same towers as shapes-vit-tiny; a 2-layer multimodal decoder over 16 pooled image tokens.
    "shapes-coca-tiny": CoCaConfig(
        embed_dim=128, vision=CLIPVisionConfig(64, 8, 128, 4, 4),
        text=CLIPTextConfig(vocab_size=128, context_length=32, width=128, layers=3, heads=4,
                            eot_token_id=2),
        decoder=CoCaDecoderConfig(layers=2, heads=4, n_queries=16)),
}


def _register(name: str) -> None:
    @register_model(name, family="coca", description=f"CoCa {name}")
    def _factory(**overrides):
        return build_coca(CoCaConfig.from_dict({**COCA_CONFIGS[name].to_dict(), **overrides}))


for _name in COCA_CONFIGS:
    _register(_name)


@register_family_builder("coca")
def _build_from_dict(config: dict) -> CoCa:
    return build_coca(CoCaConfig.from_dict(config))
