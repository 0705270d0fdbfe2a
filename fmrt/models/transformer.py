"""Pre-LN transformer blocks with the OpenAI CLIP parameter layout.

Parameter names follow OpenAI CLIP / open_clip (``attn.in_proj_weight``, ``attn.out_proj``,
``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``) so official state dicts load without renaming
inside a block.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.attention import attention


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected quick_gelu, gelu or gelu_tanh")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (fp16 inputs overflow the variance otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float() if self.bias is not None else None, self.eps).to(orig)


class MultiheadAttention(nn.Module):
    """Multi-head attention with a packed ``in_proj`` (nn.MultiheadAttention's parameter names).

    Self-attention when ``kv`` is None; cross-attention otherwise (``kv_dim`` may differ).
    """

    def __init__(self, *, width: int, heads: int, kv_dim: Optional[int] = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.kv_dim = kv_dim or width
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        if self.kv_dim != width:
            # separate key/value projections for cross-attention with another width
            self.kv_proj = nn.Linear(self.kv_dim, 2 * width)
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, kv: Optional[torch.Tensor] = None, *,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """x: ``B x L x W``; kv: ``B x S x kv_dim`` or None. Returns ``B x L x W``."""
        b, l, w = x.shape
        h = self.heads
        if kv is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            wq, wk, wv = self.in_proj_weight.chunk(3, dim=0)
            bq, bk, bv = self.in_proj_bias.chunk(3, dim=0)
            q = F.linear(x, wq, bq)
            if self.kv_dim != w:
                k, v = self.kv_proj(kv).chunk(2, dim=-1)
            else:
                k, v = F.linear(kv, wk, bk), F.linear(kv, wv, bv)
        s = k.shape[1]
        q = q.view(b, l, h, w // h).transpose(1, 2)
        k = k.view(b, s, h, w // h).transpose(1, 2)
        v = v.view(b, s, h, w // h).transpose(1, 2)
        o = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(o.transpose(1, 2).reshape(b, l, w))


class MLP(nn.Module):
    def __init__(self, *, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(act)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)) [+ x + cross_attn(ln_1_kv(x), kv)] + mlp(ln_2(x))."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "quick_gelu",
                 cross_attention: bool = False, kv_dim: Optional[int] = None) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadAttention(width=width, heads=heads)
        if cross_attention:
            self.ln_1_kv = LayerNorm(kv_dim or width)
            self.ln_1_q = LayerNorm(width)
            self.cross_attn = MultiheadAttention(width=width, heads=heads, kv_dim=kv_dim)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width=width, hidden=int(width * mlp_ratio), act=act)

    def forward(self, x: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        if kv is not None:
            x = x + self.cross_attn(self.ln_1_q(x), self.ln_1_kv(kv))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``layers`` pre-LN residual blocks (``resblocks.N``)."""

    def __init__(self, *, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 act: str = "quick_gelu", cross_attention: bool = False,
                 kv_dim: Optional[int] = None) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width=width, heads=heads, mlp_ratio=mlp_ratio, act=act,
                                   cross_attention=cross_attention, kv_dim=kv_dim)
            for _ in range(layers)])

    def forward(self, x: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, kv: Optional[torch.Tensor] = None,
                return_hidden: bool = False):
        """x: ``B x L x W``. With ``return_hidden`` also returns the input of every block plus
        the final output (``layers + 1`` tensors), e.g. for LLaVA's penultimate-layer features."""
        hidden: List[torch.Tensor] = []
        for blk in self.resblocks:
            if return_hidden:
                hidden.append(x)
            x = blk(x, attn_mask=attn_mask, is_causal=is_causal, kv=kv)
        if return_hidden:
            hidden.append(x)
            return x, hidden
        return x
