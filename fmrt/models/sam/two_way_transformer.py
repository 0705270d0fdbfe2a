"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each block runs (1) self-attention of the tokens, (2) token -> image cross-attention, (3) an MLP on
the tokens and (4) image -> token cross-attention, each followed by a residual add and LayerNorm.
Positional encodings are re-added to the queries and keys of every attention (the first block's
self-attention skips them: its tokens *are* the prompt embeddings). A final token -> image
attention closes the stack.

Cross-attentions project to ``embedding_dim / attention_downsample_rate`` channels (128 of 256
officially): the image side has h*w = 4096 tokens, so this halves their cost.

Parameter names match segment-anything's ``TwoWayTransformer``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from fmrt.models.attention import attention
from fmrt.models.sam.common import MLPBlock


class DownsampledAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the channel count by
    ``downsample_rate`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width "
                             f"{self.internal_dim} (= {embedding_dim} / {downsample_rate})")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q: B x Nq x C``, ``k, v: B x Nk x C`` -> ``B x Nq x C``."""
        out = attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                        self._heads(self.v_proj(v)))
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, *, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = DownsampledAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DownsampledAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act="relu")
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DownsampledAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``queries: B x T x C`` tokens, ``keys: B x HW x C`` image; PEs of the same shapes."""
        if self.skip_first_layer_pe:
            # segment-anything replaces (not adds to) the tokens here: no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Args: depth (2 officially), embedding_dim (256), num_heads (8), mlp_dim (2048),
    attention_downsample_rate (2)."""

    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = DownsampledAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: ``B x C x h x w``.
            image_pe: ``B x C x h x w`` positional encoding (or batch 1, broadcast).
            point_embedding: ``B x T x C`` output + prompt tokens.
        Returns:
            processed tokens ``B x T x C`` and image tokens ``B x hw x C``.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
