"""Triton kernels for Flamingo's media-masked cross-attention core (see ``gated_xattn``).

Imported lazily (only when ``backend="triton"`` runs) so ``TRITON_INTERPRET`` can be set first.

Layouts: q, o, do [B, T, heads * dim_head]; kv [B, T_img * n_latents, 2 * heads * dim_head] (keys in
the first half, values in the second, exactly the output of ``media @ to_kv.T``); idx int32 [B, T]
(the cumulative ``<image>`` count); lse, delta [B, heads, T] fp32. Grid: (query blocks, B * heads).

Why this is cheaper than the dense formulation: each query block reads the min / max image index
of its rows (a block of 64 consecutive tokens spans one or two images in a typical interleaved
document) and loops over only those images' key blocks; with 4 images x 64 latents that is 64-128
keys instead of 256 per query, and no T x 256 mask ever exists. Softmax is online with fp32
accumulators; rows that see no image end with l = 0 and store exactly 0 (lse 0).

Backward: one kernel per query block recomputes P = exp(S - lse), accumulates dQ in registers and
adds its dK / dV contributions with fp32 atomics (only the few query blocks of one image touch a
key block, so contention is low; the sum order is not deterministic at the last-ulp level).
Portable to triton 3.6 and 3.7: no block pointers; fp32 dots request IEEE precision (no TF32).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from fmrt.kernels._triton import interpret_mode


@triton.jit
def _key_range(idx, m_in, N_LAT, N_IMG, IMMEDIATE: tl.constexpr):
    # Rows that see at least one image, and the [key_lo, key_hi) range covering all their images.
    if IMMEDIATE:
        valid = m_in & (idx >= 1) & (idx <= N_IMG)
        lo = tl.min(tl.where(valid, idx, N_IMG + 1), axis=0)
    else:
        valid = m_in & (idx >= 1)
        lo = tl.min(tl.where(valid, 1, N_IMG + 1), axis=0)
    hi = tl.max(tl.where(valid, tl.minimum(idx, N_IMG), 0), axis=0)
    return valid, (lo - 1) * N_LAT, hi * N_LAT


@triton.jit
def _allowed(idx, valid, offs_n, n_in, N_LAT, IMMEDIATE: tl.constexpr):
    key_img = offs_n // N_LAT + 1
    if IMMEDIATE:
        ok = key_img[None, :] == idx[:, None]
    else:
        ok = key_img[None, :] <= idx[:, None]
    return ok & n_in[None, :] & valid[:, None]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the CPU interpreter has no bf16 dot (it multiplies the raw bits): go through fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _xattn_fwd(Q, KV, IDX, O, LSE,
               T, N_LAT, N_IMG, H, INNER, scale,
               s_qb, s_qt, s_kb, s_kt, s_ob, s_ot, s_ib,
               IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < T
    d_in = offs_d < HEAD_DIM
    idx = tl.load(IDX + b * s_ib + offs_m, mask=m_in, other=0)
    valid, key_lo, key_hi = _key_range(idx, m_in, N_LAT, N_IMG, IMMEDIATE)

    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qt + h * HEAD_DIM + offs_d[None, :],
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = KV + b * s_kb + h * HEAD_DIM
    for start in range(key_lo, key_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_in = offs_n < key_hi
        kt = tl.load(kv_base + offs_n[None, :] * s_kt + offs_d[:, None],
                     mask=n_in[None, :] & d_in[:, None], other=0.0)               # [D, N]
        s = _dot(q, kt, IEEE, UPCAST) * scale
        ok = _allowed(idx, valid, offs_n, n_in, N_LAT, IMMEDIATE)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing seen yet
        p = tl.exp(s - m_safe[:, None])
        corr = tl.exp(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, axis=1)
        v = tl.load(kv_base + INNER + offs_n[:, None] * s_kt + offs_d[None, :],
                    mask=n_in[:, None] & d_in[None, :], other=0.0)                # [N, D]
        acc = acc * corr[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
    tl.store(O + b * s_ob + offs_m[:, None] * s_ot + h * HEAD_DIM + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=m_in)


@triton.jit
def _xattn_bwd(Q, KV, DO, LSE, DELTA, IDX, DQ, DKV,
               T, N_LAT, N_IMG, H, INNER, scale,
               s_qb, s_qt, s_kb, s_kt, s_ib, s_dkb, s_dkt,
               IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # q, do, dq share q's strides (all [B, T, inner] contiguous); kv and the fp32 dkv buffer are
    # [B, NK, 2 * inner].
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < T
    d_in = offs_d < HEAD_DIM
    md = m_in[:, None] & d_in[None, :]
    idx = tl.load(IDX + b * s_ib + offs_m, mask=m_in, other=0)
    valid, key_lo, key_hi = _key_range(idx, m_in, N_LAT, N_IMG, IMMEDIATE)

    row = b * s_qb + offs_m[:, None] * s_qt + h * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + row, mask=md, other=0.0)
    do = tl.load(DO + row, mask=md, other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_in, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = KV + b * s_kb + h * HEAD_DIM
    dkv_base = DKV + b * s_dkb + h * HEAD_DIM
    for start in range(key_lo, key_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_in = offs_n < key_hi
        nd_t = n_in[None, :] & d_in[:, None]
        kt = tl.load(kv_base + offs_n[None, :] * s_kt + offs_d[:, None], mask=nd_t, other=0.0)
        vt = tl.load(kv_base + INNER + offs_n[None, :] * s_kt + offs_d[:, None], mask=nd_t, other=0.0)
        s = _dot(q, kt, IEEE, UPCAST) * scale
        ok = _allowed(idx, valid, offs_n, n_in, N_LAT, IMMEDIATE)
        p = tl.exp(tl.where(ok, s - lse[:, None], float("-inf")))                    # [M, N]
        dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)                                # [N, D]
        dp = _dot(do, vt, IEEE, UPCAST)                                                      # [M, N]
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE, UPCAST)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE, UPCAST) * scale                         # [N, D]
        nd = n_in[:, None] & d_in[None, :]
        dst = dkv_base + offs_n[:, None] * s_dkt + offs_d[None, :]
        tl.atomic_add(dst, dk, mask=nd)
        tl.atomic_add(dst + INNER, dv, mask=nd)
    tl.store(DQ + row, dq * scale, mask=md)


def _blocks(dh: int) -> Tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(dh))
    if interpret_mode():
        return 32, 32, block_d, 4  # the interpreter is per-op: fewer, larger programs are faster
    # 64 x 64 tiles with 4 warps fit dim_head <= 64 in registers on sm_80+; halve N above that.
    return 64, (64 if block_d <= 64 else 32), block_d, 4


def _check_layout(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, heads: int):
    if q.dim() != 3 or kv.dim() != 3 or q.shape[0] != kv.shape[0]:
        raise ValueError(f"q must be [B, T, inner] and kv [B, NK, 2*inner]; got {tuple(q.shape)}, "
                         f"{tuple(kv.shape)}")
    if kv.shape[2] != 2 * q.shape[2] or q.shape[2] % heads:
        raise ValueError("kv's last dim must be 2 * inner and inner divisible by heads")
    if idx.dtype != torch.int32 or tuple(idx.shape) != tuple(q.shape[:2]):
        raise ValueError("idx must be int32 [B, T]")


def attention_forward(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, *, heads: int,
                      n_latents: int, n_images: int, immediate: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """o [B, T, inner] (q's dtype; exactly 0 on rows that see no image), lse [B, heads, T]."""
    _check_layout(q, kv, idx, heads)
    q, kv, idx = q.contiguous(), kv.contiguous(), idx.contiguous()
    B, T, inner = q.shape
    dh = inner // heads
    o = torch.empty_like(q)
    lse = torch.empty((B, heads, T), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    bm, bn, bd, warps = _blocks(dh)
    grid = (triton.cdiv(T, bm), B * heads)
    _xattn_fwd[grid](q, kv, idx, o, lse, T, n_latents, n_images, heads, inner, dh ** -0.5,
                     q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), o.stride(0), o.stride(1),
                     idx.stride(0), IMMEDIATE=bool(immediate), HEAD_DIM=dh,
                     IEEE=q.dtype in (torch.float32, torch.float64),
                     UPCAST=interpret_mode() and q.dtype == torch.bfloat16,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
    return o, lse


def attention_backward(q: torch.Tensor, kv: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                       lse: torch.Tensor, idx: torch.Tensor, *, heads: int, n_latents: int,
                       n_images: int, immediate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """dq [B, T, inner] fp32 and dkv [B, NK, 2 * inner] fp32 (dK first half, dV second)."""
    _check_layout(q, kv, idx, heads)
    q, kv, idx, do = q.contiguous(), kv.contiguous(), idx.contiguous(), do.contiguous()
    B, T, inner = q.shape
    dh = inner // heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij (the softmax-backward row term), [B, H, T]
    delta = (do.to(acc) * o.to(acc)).view(B, T, heads, dh).sum(-1).transpose(1, 2).contiguous()
    lse = lse.to(acc).contiguous()
    dq = torch.empty((B, T, inner), dtype=acc, device=q.device)
    dkv = torch.zeros((B, kv.shape[1], 2 * inner), dtype=acc, device=q.device)
    bm, bn, bd, warps = _blocks(dh)
    grid = (triton.cdiv(T, bm), B * heads)
    _xattn_bwd[grid](q, kv, do, lse, delta, idx, dq, dkv, T, n_latents, n_images, heads, inner,
                     dh ** -0.5, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), idx.stride(0),
                     dkv.stride(0), dkv.stride(1), IMMEDIATE=bool(immediate), HEAD_DIM=dh,
                     IEEE=q.dtype in (torch.float32, torch.float64),
                     UPCAST=interpret_mode() and q.dtype == torch.bfloat16,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
    return dq, dkv
