"""Flamingo's Perceiver resampler (open_flamingo ``PerceiverResampler`` layout).

A fixed set of ``num_latents`` learned latent vectors cross-attends to an image's visual tokens
(any number of them: 65 for a 64x64 ViT/8, 257 for 224x224 ViT/14, several frames of a video),
``depth`` times, each time with keys/values = ``[visual tokens; latents]``. The output is always
``num_latents`` tokens per image, so the language model's cross-attention cost does not depend on
the vision tower's input resolution.

Parameter names match open_flamingo (``latents``, ``frame_embs``, ``media_time_embs``,
``layers.N.0.{norm_media, norm_latents, to_q, to_kv, to_out}``, ``layers.N.1.{0,1,3}`` (the
feed-forward LayerNorm / Linear / Linear) and ``norm``), so its state dicts load unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:
    """open_flamingo's ``FeedForward``: LN -> Linear (no bias) -> GELU -> Linear (no bias)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media; latents]`` (the Flamingo paper's concatenation, so a latent
    can also keep its own content)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: media ``B x T x n1 x D``; latents ``B x T x n2 x D`` -> ``B x T x n2 x D``."""
        b, t, n2, _ = latents.shape
        h, dh = self.heads, self.dim_head
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)

        def heads_first(z: torch.Tensor) -> torch.Tensor:  # B x T x n x (h d) -> (B T) x h x n x d
            return z.reshape(b * t, z.shape[2], h, dh).transpose(1, 2)

        # Same math as open_flamingo's explicit softmax (it subtracts the row max first, which
        # SDPA's stable softmax does as well).
        out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
        out = out.transpose(1, 2).reshape(b, t, n2, h * dh)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """Visual tokens of any count -> ``num_latents`` tokens per image.

    Args:
        dim: width of the visual tokens (and of the latents / output).
        depth: number of (attention, feed-forward) layers.
        num_latents: output tokens per image.
        max_num_media: optional learned per-image time embeddings (``media_time_embs``).
        max_num_frames: optional learned per-frame embeddings (``frame_embs``).
    """

    def __init__(self, *, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8,
                 num_latents: int = 64, max_num_media: Optional[int] = None,
                 max_num_frames: Optional[int] = None, ff_mult: int = 4) -> None:
        super().__init__()
        self.dim, self.num_latents = dim, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = (nn.Parameter(torch.randn(max_num_frames, dim))
                           if max_num_frames is not None else None)
        self.media_time_embs = (nn.Parameter(torch.randn(max_num_media, 1, dim))
                                if max_num_media is not None else None)
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                           FeedForward(dim, ff_mult)]) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``B x T x F x v x D`` (T images of F frames of v tokens) or ``B x T x v x D``
        (F = 1). Returns ``B x T x num_latents x D``, whatever v and F are."""
        if x.dim() == 4:
            x = x.unsqueeze(2)
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"expected visual tokens B x T x [F x] v x {self.dim}, got "
                             f"{tuple(x.shape)}")
        b, t, f, v, d = x.shape
        if self.frame_embs is not None:
            if f > self.frame_embs.shape[0]:
                raise ValueError(f"{f} frames > max_num_frames {self.frame_embs.shape[0]}")
            x = x + self.frame_embs[:f].to(x.dtype)[None, None, :, None]
        x = x.reshape(b, t, f * v, d)
        if self.media_time_embs is not None:
            if t > self.media_time_embs.shape[0]:
                raise ValueError(f"{t} images > max_num_media {self.media_time_embs.shape[0]}")
            x = x + self.media_time_embs[:t].to(x.dtype)[None]
        latents = self.latents.to(x.dtype).expand(b, t, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
