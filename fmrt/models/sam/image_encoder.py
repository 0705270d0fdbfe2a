"""SAM's image encoder: a plain ViT (ViTDet style) with windowed attention in most blocks, global
attention in a few, decomposed relative position bias, and a convolutional neck.

Parameter names match segment-anything's ``ImageEncoderViT`` so official checkpoints load as is
(``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,
attn.rel_pos_w,norm2,mlp.lin1,mlp.lin2}``, ``neck.{0..3}``).

Attention goes through the project's single ``fmrt.models.attention.attention`` (backend flag:
SDPA or explicit math); the decomposed relative position bias is passed to it as an additive
``attn_mask``, which both backends add to the scaled logits exactly where segment-anything adds it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.attention import attention
from fmrt.models.sam.common import LayerNorm2d, MLPBlock


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split ``B x H x W x C`` tokens into non-overlapping windows, zero-padding H and W up to a
    multiple of ``window_size`` (the 64x64 grid of the official models becomes 70x70 = 5x5
    windows of 14).

    Returns ``(B * nW) x ws x ws x C`` windows and the padded size ``(Hp, Wp)``.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of ``window_partition``: ``(B * nW) x ws x ws x C`` -> ``B x H x W x C`` (padding
    removed)."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
        q_size, k_size: number of query / key positions along the axis.
        rel_pos: ``L x Dh`` learned table; linearly resized when ``L != 2 * max(q, k) - 1`` (an
            input size other than the one the weights were trained at).
    Returns:
        ``q_size x k_size x Dh``.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                            q_size: Tuple[int, int], k_size: Tuple[int, int]) -> torch.Tensor:
    """MViTv2's decomposed relative position bias as an additive attention mask.

    ``bias[b, n, (qy, qx), (ky, kx)] = q . Rh[qy, ky] + q . Rw[qx, kx]`` with ``q`` the
    *unscaled* query at ``(qy, qx)``, as segment-anything computes it (it adds the terms after
    scaling ``q @ k^T``, which is where SDPA adds ``attn_mask``).

    Args:
        q: ``B x nH x (qh*qw) x Dh`` queries (before the 1/sqrt(Dh) scaling).
        rel_pos_h, rel_pos_w: ``(2*h-1) x Dh`` and ``(2*w-1) x Dh`` tables.
    Returns:
        ``B x nH x (qh*qw) x (kh*kw)`` float bias in the dtype of ``q``.
    """
    qh, qw = q_size
    kh, kw = k_size
    rh = get_rel_pos(qh, kh, rel_pos_h).to(q.dtype)  # qh x kh x Dh
    rw = get_rel_pos(qw, kw, rel_pos_w).to(q.dtype)  # qw x kw x Dh
    b, n, _, d = q.shape
    r_q = q.reshape(b, n, qh, qw, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # B x nH x qh x qw x kh
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # B x nH x qh x qw x kw
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x nH x qh x qw x kh x kw
    return bias.reshape(b, n, qh * qw, kh * kw)


class PatchEmbed(nn.Module):
    """``B x C x H x W`` image -> ``B x H/p x W/p x D`` patch tokens (a stride-p convolution)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative position bias.

    ``input_size`` is the grid the relative tables are sized for: the window for windowed blocks,
    the whole image grid for global blocks.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True,
                 input_size: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative position bias needs input_size")
            # Zero init as segment-anything (rel_pos_zero_init=True): training starts from plain
            # attention plus the absolute position embedding.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` -> ``B x H x W x C``."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x nH x HW x Dh
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        out = attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; ``window_size > 0`` attends within windows, 0 globally."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_rel_pos: bool = True, window_size: int = 0,
                 input_size: Tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                    use_rel_pos=use_rel_pos,
                                    input_size=input_size if window_size == 0
                                    else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act="gelu")
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """``B x in_chans x img_size x img_size`` normalised, padded images -> ``B x out_chans x
    (img_size/patch) x (img_size/patch)`` image embeddings."""

    def __init__(self, *, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, out_chans: int = 256, qkv_bias: bool = True,
                 use_abs_pos: bool = True, use_rel_pos: bool = True, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11)) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} out of range for depth {depth}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         use_rel_pos=use_rel_pos,
                         window_size=0 if i in global_attn_indexes else window_size,
                         input_size=(grid, grid))
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[-2:] != (self.img_size,) * 2:
            raise ValueError(f"image encoder expects B x {self.in_chans} x {self.img_size} x "
                             f"{self.img_size} (normalised and padded), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
