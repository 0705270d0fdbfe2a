"""Flamingo gated cross-attention (media-masked) and the gated FFN.

    idx = media_token_index(input_ids, media_token_id=IMAGE_ID)          # [B, T] int64
    y = gated_cross_attention(x, media, media_locations, alpha, ln_weight=..., ln_bias=...,
                              to_q=..., to_kv=..., to_out=..., heads=8)
    y = gated_ffn(y, beta, ln_weight=..., ln_bias=..., w1=..., w2=...)
    block = GatedCrossAttentionBlock(dim=1024, dim_visual=1024)          # open_flamingo layout

Semantics (open_flamingo / lucidrains flamingo-pytorch ``MaskedCrossAttention``):

* A text token's image index is the inclusive cumulative count of ``<image>`` tokens up to it
  (``media_token_index``): 0 before the first image, 1 from the first ``<image>`` token on, ...
* ``only_attend_immediate_media=True`` (default): a token with index i attends to the
  ``n_latents`` latents of image i only. ``False``: to the latents of images 1..i.
* A token whose set of visible images is empty gets EXACTLY zero from the attention branch.
  That is every token with index 0 (both modes; open_flamingo zeroes them only in the immediate
  mode and gives them a uniform average over all latents in the other) and, in the immediate mode,
  every token with index > T_img (more ``<image>`` tokens than images were given: its image does
  not exist; open_flamingo would average over all latents there). In the all-previous mode a token
  with index > T_img sees the T_img images that exist (the set open_flamingo's ``>=`` mask gives).
* ``out = x + tanh(alpha) * to_out(attention(LN(x), to_kv(media)))``; with Flamingo's gate
  initialisation alpha = 0 the output equals x exactly while d alpha is non-zero.
* ``gated_ffn``: ``x + tanh(beta) * W2 GELU(W1 LN(x))`` (no biases, exact erf GELU).

Projections have no bias (as in Flamingo); LayerNorm has weight and bias.

Backends (``backend=``, see ``fmrt.kernels._triton.resolve_backend``):

* ``"cpu"``: never builds the dense T x (T_img * n_latents) mask. Because the index is a cumulative
  count it is non-decreasing along the sequence, so the tokens of one image form one contiguous
  segment per batch row, and the keys a segment may see are one contiguous range too (image j's
  latents, or images 1..j). Attention runs per segment over its own keys only, with no mask at
  all (ATen's fused CPU flash-attention forward / backward per segment), and rows whose visible
  set is empty skip LayerNorm and the q / out projections entirely. The backward is explicit:
  the projections' GEMMs by hand, P recomputed from the saved log-sum-exp.
* ``"triton"``: projections in torch (cuBLAS), the attention core in Triton: each query block
  reads the min / max image index of its rows and loops over only the key blocks of those images,
  online softmax with fp32 accumulation; a Triton backward with fp32 atomics for dK / dV.
* ``"reference"``: the dense masked formulation in plain torch (float64-checkable, autograd).

``torch.ops.fmrt.gated_xattn`` is the custom op (fake + autograd registered) behind the cpu and
triton backends; it returns ``(out, q, kv, o, lse)`` where everything after ``out`` is the residual
the backward needs (non-differentiable), and its backward is the op ``fmrt::gated_xattn_backward``
(data-dependent segment planning stays inside an opaque node, so AOT autograd can trace it).
``onnx_translation_table()`` maps ``fmrt::gated_xattn`` to standard ONNX ops.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fmrt.kernels._triton import resolve_backend

__all__ = [
    "media_token_index",
    "gated_cross_attention",
    "gated_cross_attention_reference",
    "gated_ffn",
    "GatedCrossAttentionBlock",
    "onnx_translation_table",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- media index
def media_token_index(media_locations: Tensor, media_token_id: Optional[int] = None) -> Tensor:
    """Inclusive cumulative count of ``<image>`` tokens along the last axis.

    ``media_locations``: bool [B, T] (True at ``<image>`` tokens), or integer token ids [B, T]
    together with ``media_token_id``. Returns int64 [B, T]: 0 before the first image, i from the
    i-th ``<image>`` token (inclusive) up to the next one.
    """
    if not isinstance(media_locations, Tensor):
        raise TypeError("media_locations must be a torch.Tensor")
    if media_token_id is not None:
        if media_locations.is_floating_point() or media_locations.is_complex():
            raise TypeError("input_ids must be an integer tensor when media_token_id is given")
        media_locations = media_locations == int(media_token_id)
    elif media_locations.dtype != torch.bool:
        raise TypeError(f"media_locations must be bool (got {media_locations.dtype}); pass "
                        "media_token_id=... to derive it from input_ids")
    if media_locations.dim() < 1:
        raise ValueError("media_locations needs at least one (sequence) dimension")
    return media_locations.to(torch.int64).cumsum(-1)


# --------------------------------------------------------------------------- validation
def _check(x: Tensor, media: Tensor, media_locations: Tensor, alpha: Tensor, ln_weight: Tensor,
           ln_bias: Tensor, to_q: Tensor, to_kv: Tensor, to_out: Tensor, heads: int,
           dim_head: Optional[int]) -> Tuple[int, int]:
    named = dict(x=x, media=media, media_locations=media_locations, alpha=alpha, ln_weight=ln_weight,
                 ln_bias=ln_bias, to_q=to_q, to_kv=to_kv, to_out=to_out)
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    for name, t in named.items():
        if name != "media_locations" and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
    if media_locations.dtype != torch.bool:
        raise TypeError(f"media_locations must be a bool tensor, got {media_locations.dtype} "
                        "(use input_ids == media_token_id)")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, d], got shape {tuple(x.shape)}")
    B, T, d = x.shape
    if media.dim() != 4 or media.shape[0] != B:
        raise ValueError(f"media must be [B={B}, T_img, n_latents, d_media], got {tuple(media.shape)}")
    if media.shape[1] < 1 or media.shape[2] < 1:
        raise ValueError(f"media needs at least one image and one latent, got {tuple(media.shape)}")
    if tuple(media_locations.shape) != (B, T):
        raise ValueError(f"media_locations must be [B, T] = {(B, T)}, got {tuple(media_locations.shape)}")
    if alpha.numel() != 1 or alpha.dim() > 1:
        raise ValueError(f"alpha must be a 0-dim or [1] tensor, got shape {tuple(alpha.shape)}")
    if tuple(ln_weight.shape) != (d,) or tuple(ln_bias.shape) != (d,):
        raise ValueError(f"ln_weight / ln_bias must be [{d}], got {tuple(ln_weight.shape)} / "
                         f"{tuple(ln_bias.shape)}")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if to_q.dim() != 2 or to_q.shape[1] != d:
        raise ValueError(f"to_q must be [inner, d={d}], got {tuple(to_q.shape)}")
    inner = to_q.shape[0]
    if inner % heads:
        raise ValueError(f"to_q's inner dim {inner} is not divisible by heads={heads}")
    dh = inner // heads
    if dim_head is not None and dim_head != dh:
        raise ValueError(f"dim_head={dim_head} but to_q implies {inner} / {heads} = {dh}")
    if tuple(to_kv.shape) != (2 * inner, media.shape[3]):
        raise ValueError(f"to_kv must be [2*inner={2 * inner}, d_media={media.shape[3]}], "
                         f"got {tuple(to_kv.shape)}")
    if tuple(to_out.shape) != (d, inner):
        raise ValueError(f"to_out must be [d={d}, inner={inner}], got {tuple(to_out.shape)}")
    return inner, dh


# --------------------------------------------------------------------------- reference
def gated_cross_attention_reference(
    x: Tensor, media: Tensor, media_locations: Tensor, alpha: Tensor, *,
    ln_weight: Tensor, ln_bias: Tensor, to_q: Tensor, to_kv: Tensor, to_out: Tensor,
    heads: int, dim_head: Optional[int] = None, only_attend_immediate_media: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """Dense masked formulation of the module docstring's semantics (plain torch, autograd).

    Materialises the [B, heads, T, T_img * n_latents] scores and mask; use it in float64 as the
    ground truth. Same arguments as ``gated_cross_attention``.
    """
    inner, dh = _check(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
                       heads, dim_head)
    B, T, d = x.shape
    _, T_img, n, dm = media.shape
    xn = F.layer_norm(x, (d,), ln_weight, ln_bias, eps)
    q = (xn @ to_q.T).view(B, T, heads, dh).transpose(1, 2)
    k, v = (media.reshape(B, T_img * n, dm) @ to_kv.T).chunk(2, dim=-1)
    k = k.reshape(B, T_img * n, heads, dh).transpose(1, 2)
    v = v.reshape(B, T_img * n, heads, dh).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) * dh ** -0.5                       # [B, H, T, NK]
    idx = media_token_index(media_locations)                          # [B, T]
    key_img = torch.arange(T_img * n, device=x.device) // n + 1      # [NK]
    if only_attend_immediate_media:
        allowed = key_img[None, None, :] == idx[:, :, None]
    else:
        allowed = key_img[None, None, :] <= idx[:, :, None]
    allowed = allowed[:, None]                                        # [B, 1, T, NK]
    has = allowed.any(-1, keepdim=True)
    # Rows with nothing visible would softmax over -inf only (NaN): give them finite scores,
    # then zero their probabilities, so their output is exactly 0 and their gradient too.
    s = torch.where(allowed, s, float("-inf"))
    s = torch.where(has, s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.where(allowed, torch.softmax(s, dim=-1), torch.zeros((), dtype=s.dtype, device=s.device))
    o = (p @ v).transpose(1, 2).reshape(B, T, inner)
    return x + torch.tanh(alpha.reshape(())) * (o @ to_out.T)


# --------------------------------------------------------------------------- CPU path
# Per-segment attention kernels: ATen's fused CPU flash attention (forward returns the log-sum-exp
# the backward needs). One fused op per segment instead of ~7 (forward) / ~12 (backward) small
# ones: same speed on an idle core, but each small op is an OpenMP parallel region, and on a
# loaded 2-core host every region waits for a descheduled thread (measured ~20 ms per op at 2
# threads under load vs 0.07 ms at 1 thread). Plain matmul/softmax fallback if the ops go away.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # CPU half-precision GEMMs are slow or emulated; compute in fp32 and round the results.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Valid rows and per-(batch, image) segments. The image index is non-decreasing along T, so
    the rows of one (batch row, image) pair are contiguous, in order, among the valid rows."""

    def __init__(self, media_locations: Tensor, T_img: int, n: int, immediate: bool):
        B, T = media_locations.shape
        idx = media_token_index(media_locations)
        if immediate:
            valid = (idx >= 1) & (idx <= T_img)
            level = idx.clamp(max=T_img + 1)
        else:
            valid = idx >= 1
            level = idx.clamp(max=T_img)  # index > T_img sees all T_img images
        key = (torch.arange(B, device=idx.device)[:, None] * (T_img + 2) + level).reshape(-1)
        counts = torch.bincount(key, minlength=B * (T_img + 2)).view(B, T_img + 2).tolist()
        self.n_rows = B * T
        flat_valid = valid.reshape(-1)
        all_valid = bool(flat_valid.all())
        # rows=None: every row sees an image (e.g. <image> at position 0), so no gather / scatter
        self.rows = None if all_valid else flat_valid.nonzero().squeeze(1)
        self.count = B * T if all_valid else int(self.rows.numel())
        # (start, stop) among valid rows, batch row, (key_lo, key_hi)
        self.segments: List[Tuple[int, int, int, int, int]] = []
        pos = 0
        for b in range(B):
            for j in range(1, T_img + 1):
                c = counts[b][j]
                if c:
                    lo = (j - 1) * n if immediate else 0
                    self.segments.append((pos, pos + c, b, lo, j * n))
                    pos += c
        assert pos == self.count

    def gather(self, t: Tensor) -> Tensor:
        flat = t.reshape(self.n_rows, -1)
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def scatter(self, vals: Tensor, like_rows: int, zeros_like: Tensor) -> Tensor:
        if self.rows is None:
            return vals
        out = zeros_like.new_zeros((like_rows, vals.shape[1]))
        return out.index_copy_(0, self.rows, vals)


def _ln_backward(dxn: Tensor, x: Tensor, w: Tensor, b: Tensor, eps: float
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recompute LayerNorm over the last dim (one fused pass; cheaper than saving its output) and
    run its fused backward. Returns (xn, dx, dw, db)."""
    shape = (x.shape[-1],)
    xn, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(dxn, x, shape, mean, rstd, w, b,
                                                          [True, True, True])
    return xn, dx, dw, db


def _segment_views(q_v: Tensor, kv: Tensor, seg, heads: int, dh: int):
    s0, s1, b, klo, khi = seg
    L, nk, inner = s1 - s0, khi - klo, heads * dh
    qs = q_v[s0:s1].view(L, heads, dh).transpose(0, 1)                          # [H, L, dh]
    ks = kv[b, klo:khi, :inner].reshape(nk, heads, dh).transpose(0, 1)        # [H, nk, dh]
    vs = kv[b, klo:khi, inner:].reshape(nk, heads, dh).transpose(0, 1)
    return qs, ks, vs


def _cpu_forward(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
                 heads: int, immediate: bool, eps: float):
    B, T, d = x.shape
    _, T_img, n, dm = media.shape
    inner = to_q.shape[0]
    dh = inner // heads
    scale = dh ** -0.5
    cd = _compute_dtype(x.dtype)
    plan = _Plan(media_locations, T_img, n, immediate)
    NK = T_img * n

    wq, wkv, wo = to_q.to(cd), to_kv.to(cd), to_out.to(cd)
    kv = (media.reshape(B * NK, dm).to(cd) @ wkv.T).view(B, NK, 2 * inner)
    x_flat = x.reshape(B * T, d).to(cd)
    o_v = x_flat.new_empty((plan.count, inner))
    lse_v = x_flat.new_zeros((heads, plan.count), dtype=_lse_dtype(x.dtype))
    if plan.count:
        x_v = plan.gather(x_flat)
        xn_v = F.layer_norm(x_v, (d,), ln_weight.to(cd), ln_bias.to(cd), eps)
        q_v = xn_v @ wq.T                                                       # [N, inner]
        for seg in plan.segments:
            s0, s1 = seg[0], seg[1]
            qs, ks, vs = _segment_views(q_v, kv, seg, heads, dh)
            if _FLASH_CPU is not None:
                os_, lse = _FLASH_CPU(qs[None], ks[None], vs[None], 0.0, False, scale=scale)
                os_, lse = os_[0], lse[0]
            else:
                sc = torch.matmul(qs, ks.transpose(1, 2)).mul_(scale)           # [H, L, nk]
                lse = torch.logsumexp(sc, dim=-1)
                os_ = torch.matmul(sc.sub_(lse.unsqueeze(-1)).exp_(), vs)
            o_v[s0:s1].view(s1 - s0, heads, dh).copy_(os_.transpose(0, 1))
            lse_v[:, s0:s1] = lse
        # out = x + tanh(alpha) * o Wout^T as one GEMM with the residual as its C operand; with
        # alpha = 0 (Flamingo's init) BLAS returns C, i.e. x bit for bit.
        t = float(torch.tanh(alpha.reshape(()).to(cd)))
        out_v = torch.addmm(x_v, o_v, wo.T, alpha=t)
        out = out_v if plan.rows is None else x_flat.index_copy(0, plan.rows, out_v)
    else:
        q_v = x_flat.new_zeros((0, inner))
        out = x_flat.clone()
    q = plan.scatter(q_v, B * T, q_v).view(B, T, inner)
    o = plan.scatter(o_v, B * T, o_v).view(B, T, inner)
    if plan.rows is not None:
        lse_v = lse_v.new_zeros((heads, B * T)).index_copy_(1, plan.rows, lse_v)
    lse = lse_v.view(heads, B, T).transpose(0, 1).contiguous()
    return (out.view(B, T, d).to(x.dtype), q.to(x.dtype), kv.to(x.dtype), o.to(x.dtype), lse)


def _gate_grads(go: Tensor, o: Tensor, wo: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """For out = x + t * (o @ wo.T): (d wo, d alpha, d o). With G = go^T o, d wo = t G and
    d alpha = (1 - t^2) <G, wo>: y = o wo^T is never needed (nor saved), and d alpha stays exact and
    non-zero at t = 0. d o = go (t wo): scaling the [d, inner] weight, not the [N, inner] product."""
    G = go.T @ o                                                                # [d, inner]
    acc = torch.promote_types(G.dtype, torch.float32)  # the scalar reduction never in bf16/fp16
    t_acc = t.to(acc)
    d_alpha = (1 - t_acc * t_acc) * (G.to(acc) * wo.to(acc)).sum()
    return t * G, d_alpha, go @ (t * wo)


def _cpu_backward(grad_out, x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv,
                  to_out, q, kv, o, lse, heads: int, immediate: bool, eps: float):
    B, T, d = x.shape
    _, T_img, n, dm = media.shape
    inner = to_q.shape[0]
    dh = inner // heads
    scale = dh ** -0.5
    NK = T_img * n
    cd = _compute_dtype(x.dtype)
    plan = _Plan(media_locations, T_img, n, immediate)
    wq, wkv, wo = to_q.to(cd), to_kv.to(cd), to_out.to(cd)
    t = torch.tanh(alpha.reshape(()).to(cd))
    kv = kv.to(cd)
    go_flat = grad_out.reshape(B * T, d).to(cd)
    dkv = torch.zeros((B, NK, 2 * inner), dtype=cd, device=x.device)
    if plan.count:
        go_v = plan.gather(go_flat)
        o_v = plan.gather(o).to(cd)
        q_v = plan.gather(q).to(cd)
        lse_v = lse.transpose(0, 1).reshape(heads, B * T)
        if plan.rows is not None:
            lse_v = lse_v.index_select(1, plan.rows)
        lse_v = lse_v.to(cd)
        d_wo, d_alpha, do_v = _gate_grads(go_v, o_v, wo, t)
        dq_v = torch.empty_like(q_v)
        for seg in plan.segments:
            s0, s1, b, klo, khi = seg
            L, nk = s1 - s0, khi - klo
            qs, ks, vs = _segment_views(q_v, kv, seg, heads, dh)
            dos = do_v[s0:s1].view(L, heads, dh).transpose(0, 1)
            os_ = o_v[s0:s1].view(L, heads, dh).transpose(0, 1)
            if _FLASH_CPU_BWD is not None:
                dqs, dks, dvs = _FLASH_CPU_BWD(dos[None], qs[None], ks[None], vs[None], os_[None],
                                               lse_v[None, :, s0:s1], 0.0, False, scale=scale)
                dqs, dks, dvs = dqs[0], dks[0], dvs[0]
            else:  # P recomputed from the saved log-sum-exp, then the softmax backward
                p = torch.matmul(qs, ks.transpose(1, 2)).mul_(scale).sub_(lse_v[:, s0:s1, None]).exp_()
                dvs = torch.matmul(p.transpose(1, 2), dos)
                delta = (dos * os_).sum(-1, keepdim=True)                       # [H, L, 1]
                ds = torch.matmul(dos, vs.transpose(1, 2)).sub_(delta).mul_(p).mul_(scale)
                dqs, dks = torch.matmul(ds, ks), torch.matmul(ds.transpose(1, 2), qs)
            dq_v[s0:s1].view(L, heads, dh).copy_(dqs.transpose(0, 1))
            dkv[b, klo:khi, :inner] += dks.transpose(0, 1).reshape(nk, inner)
            dkv[b, klo:khi, inner:] += dvs.transpose(0, 1).reshape(nk, inner)
        x_v = plan.gather(x.reshape(B * T, d)).to(cd)
        dxn = dq_v @ wq                                                         # [N, d]
        xn_v, dx_v, d_lnw, d_lnb = _ln_backward(dxn, x_v, ln_weight.to(cd), ln_bias.to(cd), eps)
        d_wq = dq_v.T @ xn_v
        dx = go_flat + dx_v if plan.rows is None else go_flat.index_add(0, plan.rows, dx_v)
    else:
        d_wo, d_wq = torch.zeros_like(wo), torch.zeros_like(wq)
        d_alpha = torch.zeros((), dtype=cd, device=x.device)
        d_lnw, d_lnb = torch.zeros_like(ln_weight, dtype=cd), torch.zeros_like(ln_bias, dtype=cd)
        dx = go_flat.clone()  # a custom op's outputs may not alias its inputs
    dkv_flat = dkv.view(B * NK, 2 * inner)
    d_wkv = dkv_flat.T @ media.reshape(B * NK, dm).to(cd)
    d_media = (dkv_flat @ wkv).view(B, T_img, n, dm)
    return (dx.view(B, T, d), d_media, d_alpha, d_lnw, d_lnb, d_wq, d_wkv, d_wo)


# --------------------------------------------------------------------------- Triton path (host)
def _triton_forward(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
                    heads: int, immediate: bool, eps: float):
    from fmrt.kernels import gated_xattn_triton as K

    B, T, d = x.shape
    _, T_img, n, dm = media.shape
    inner = to_q.shape[0]
    xn = F.layer_norm(x, (d,), ln_weight, ln_bias, eps)
    q = xn @ to_q.T                                                             # [B, T, inner]
    kv = media.reshape(B, T_img * n, dm) @ to_kv.T                              # [B, NK, 2 inner]
    idx = media_token_index(media_locations).to(torch.int32).contiguous()
    o, lse = K.attention_forward(q, kv, idx, heads=heads, n_latents=n, n_images=T_img,
                                 immediate=immediate)
    out = x + torch.tanh(alpha.reshape(())) * (o @ to_out.T)
    return out, q, kv, o, lse


def _triton_backward(grad_out, x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv,
                     to_out, q, kv, o, lse, heads: int, immediate: bool, eps: float):
    from fmrt.kernels import gated_xattn_triton as K

    B, T, d = x.shape
    _, T_img, n, dm = media.shape
    inner = to_q.shape[0]
    # Native-dtype GEMMs (cuBLAS accumulates in fp32 and rounds once); only the scalar in fp32.
    t = torch.tanh(alpha.reshape(()).float()).to(x.dtype)
    d_wo, d_alpha, do = _gate_grads(grad_out.reshape(B * T, d), o.reshape(B * T, inner), to_out, t)
    do = do.view(B, T, inner)
    idx = media_token_index(media_locations).to(torch.int32).contiguous()
    dq, dkv = K.attention_backward(q, kv, o, do, lse, idx, heads=heads, n_latents=n,
                                   n_images=T_img, immediate=immediate)
    dq = dq.to(x.dtype).reshape(B * T, inner)
    xn, dx_ln, d_lnw, d_lnb = _ln_backward(dq @ to_q, x.reshape(B * T, d), ln_weight, ln_bias, eps)
    d_wq = dq.T @ xn
    dkv = dkv.to(x.dtype).reshape(B * T_img * n, 2 * inner)
    media_flat = media.reshape(B * T_img * n, dm)
    d_wkv = dkv.T @ media_flat
    d_media = (dkv @ to_kv).view(B, T_img, n, dm)
    return (grad_out + dx_ln.view(B, T, d), d_media, d_alpha, d_lnw, d_lnb, d_wq, d_wkv, d_wo)


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("fmrt::gated_xattn", mutates_args=())
def _gated_xattn_op(x: Tensor, media: Tensor, media_locations: Tensor, alpha: Tensor,
                    ln_weight: Tensor, ln_bias: Tensor, to_q: Tensor, to_kv: Tensor, to_out: Tensor,
                    heads: int, only_immediate: bool, eps: float, backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out [B,T,d], q [B,T,inner], kv [B,T_img*n,2*inner], o [B,T,inner],
    lse [B,heads,T] fp32/fp64); all but ``out`` are residuals for the backward."""
    fwd = _triton_forward if backend == "triton" else _cpu_forward
    return fwd(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
               heads, only_immediate, eps)


@_gated_xattn_op.register_fake
def _(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out, heads,
      only_immediate, eps, backend):
    B, T, d = x.shape
    _, T_img, n, _ = media.shape
    inner = to_q.shape[0]
    return (torch.empty_like(x), x.new_empty((B, T, inner)), x.new_empty((B, T_img * n, 2 * inner)),
            x.new_empty((B, T, inner)), x.new_empty((B, heads, T), dtype=_lse_dtype(x.dtype)))


def _setup_context(ctx, inputs, output):
    (x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out, heads,
     only_immediate, eps, backend) = inputs
    _, q, kv, o, lse = output
    ctx.mark_non_differentiable(q, kv, o, lse)
    ctx.save_for_backward(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
                          q, kv, o, lse)
    ctx.cfg = (heads, only_immediate, eps, backend)


@torch.library.custom_op("fmrt::gated_xattn_backward", mutates_args=())
def _gated_xattn_backward_op(grad_out: Tensor, x: Tensor, media: Tensor, media_locations: Tensor,
                             alpha: Tensor, ln_weight: Tensor, ln_bias: Tensor, to_q: Tensor,
                             to_kv: Tensor, to_out: Tensor, q: Tensor, kv: Tensor, o: Tensor,
                             lse: Tensor, heads: int, only_immediate: bool, eps: float, backend: str
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, media, alpha, ln_weight, ln_bias, to_q, to_kv, to_out) of ``gated_xattn``'s
    ``out``. Its own op because the cpu backward plans segments from the data (bincount, nonzero),
    which AOT autograd could not trace; as an op it is one opaque node with a fake."""
    bwd = _triton_backward if backend == "triton" else _cpu_backward
    grads = bwd(grad_out, x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
                q, kv, o, lse, heads, only_immediate, eps)
    like = (x, media, alpha, ln_weight, ln_bias, to_q, to_kv, to_out)
    return tuple(g.reshape(t.shape).to(t.dtype) for g, t in zip(grads, like))


@_gated_xattn_backward_op.register_fake
def _(grad_out, x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out, q, kv, o,
      lse, heads, only_immediate, eps, backend):
    return tuple(torch.empty_like(t) for t in (x, media, alpha, ln_weight, ln_bias, to_q, to_kv, to_out))


def _backward(ctx, grad_out, _gq, _gkv, _go, _glse):
    (x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
     q, kv, o, lse) = ctx.saved_tensors
    heads, immediate, eps, backend = ctx.cfg
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    grads = torch.ops.fmrt.gated_xattn_backward(
        grad_out.contiguous(), x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv,
        to_out, q, kv, o, lse, heads, immediate, eps, backend)
    dx, dmedia, dalpha, dlnw, dlnb, dwq, dwkv, dwo = grads
    return (dx, dmedia, None, dalpha, dlnw, dlnb, dwq, dwkv, dwo, None, None, None, None)


_gated_xattn_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def gated_cross_attention(
    x: Tensor, media: Tensor, media_locations: Tensor, alpha: Tensor, *,
    ln_weight: Tensor, ln_bias: Tensor, to_q: Tensor, to_kv: Tensor, to_out: Tensor,
    heads: int, dim_head: Optional[int] = None, only_attend_immediate_media: bool = True,
    eps: float = 1e-5, backend: Optional[str] = None,
) -> Tensor:
    """Flamingo's gated, media-masked cross-attention: ``x + tanh(alpha) * to_out(attn(LN(x)))``.

    Args:
        x: text hidden states [B, T, d], float16 / bfloat16 / float32 / float64.
        media: Perceiver latents [B, T_img, n_latents, d_media], x's dtype and device.
        media_locations: bool [B, T], True at ``<image>`` tokens (see ``media_token_index``).
        alpha: the attention gate, a 0-dim or [1] tensor (Flamingo initialises it to 0).
        ln_weight, ln_bias: LayerNorm affine parameters [d] (eps = ``eps``).
        to_q: [inner, d]; to_kv: [2 * inner, d_media] (keys first, then values); to_out:
            [d, inner]; all bias-free, nn.Linear weight layout. inner = heads * dim_head.
        heads: number of attention heads; ``dim_head`` (optional) is checked against to_q.
        only_attend_immediate_media: True = each token sees its own image only; False = images
            1..index. Tokens that see no image get exactly zero from the branch (module docstring).
        backend: None / "auto" / "cpu" / "triton" / "reference".

    Returns [B, T, d] in x's dtype. Differentiable w.r.t. every tensor but media_locations.
    """
    _check(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out, heads, dim_head)
    b = resolve_backend(backend, x, media)
    kw: Dict[str, Any] = dict(ln_weight=ln_weight, ln_bias=ln_bias, to_q=to_q, to_kv=to_kv,
                              to_out=to_out, heads=heads, eps=eps,
                              only_attend_immediate_media=only_attend_immediate_media)
    if b == "reference":
        return gated_cross_attention_reference(x, media, media_locations, alpha, **kw)
    if b == "triton" and x.dtype == torch.float64 and x.is_cuda:
        raise TypeError("the Triton gated cross-attention takes float16/bfloat16/float32 on the GPU")
    return torch.ops.fmrt.gated_xattn(x, media, media_locations, alpha, ln_weight, ln_bias, to_q,
                                      to_kv, to_out, heads, bool(only_attend_immediate_media),
                                      float(eps), b)[0]


def gated_ffn(x: Tensor, beta: Tensor, *, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor,
              w2: Tensor, eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """Flamingo's gated feed-forward: ``x + tanh(beta) * (GELU(LN(x) @ w1.T) @ w2.T)``.

    x [..., d]; beta 0-dim or [1]; ln_weight / ln_bias [d]; w1 [hidden, d]; w2 [d, hidden]
    (nn.Linear layout, no biases, exact erf GELU as nn.GELU()). Plain torch on every backend:
    it is three GEMM-bound ops with nothing to mask, so a fused kernel would not beat cuBLAS/MKL;
    autograd gives every gradient, beta included, and it exports to ONNX as standard ops.
    """
    for name, t in dict(x=x, beta=beta, ln_weight=ln_weight, ln_bias=ln_bias, w1=w1, w2=w2).items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    resolve_backend(backend, x)
    d = x.shape[-1]
    if beta.numel() != 1 or beta.dim() > 1:
        raise ValueError(f"beta must be a 0-dim or [1] tensor, got shape {tuple(beta.shape)}")
    if tuple(ln_weight.shape) != (d,) or tuple(ln_bias.shape) != (d,):
        raise ValueError(f"ln_weight / ln_bias must be [{d}]")
    if w1.dim() != 2 or w1.shape[1] != d or tuple(w2.shape) != (d, w1.shape[0]):
        raise ValueError(f"w1 must be [hidden, {d}] and w2 [{d}, hidden], got {tuple(w1.shape)} / "
                         f"{tuple(w2.shape)}")
    h = F.gelu(F.layer_norm(x, (d,), ln_weight, ln_bias, eps) @ w1.T)
    return x + torch.tanh(beta.reshape(())) * (h @ w2.T)


class _MaskedCrossAttentionParams(nn.Module):
    """Parameter holder with open_flamingo's ``MaskedCrossAttention`` names (norm, to_q, to_kv,
    to_out), so its state dicts load unchanged."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


class GatedCrossAttentionBlock(nn.Module):
    """open_flamingo / flamingo-pytorch ``GatedCrossAttentionBlock`` on fmrt's kernels.

    Same parameter names (``attn.norm``, ``attn.to_q``, ``attn.to_kv``, ``attn.to_out``,
    ``attn_gate``, ``ff.0`` LayerNorm, ``ff.1`` / ``ff.3`` Linear, ``ff_gate``), gates initialised
    to 0 (shape [1]), so a fresh block is the identity. ``forward(x [B,T,dim], media
    [B,T_img,n,dim_visual], media_locations bool [B,T])``.
    """

    def __init__(self, *, dim: int, dim_visual: Optional[int] = None, dim_head: int = 64,
                 heads: int = 8, ff_mult: int = 4, only_attend_immediate_media: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.heads = heads
        self.only_attend_immediate_media = only_attend_immediate_media
        self.backend = backend
        self.attn = _MaskedCrossAttentionParams(dim, dim_visual or dim, dim_head, heads)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False),
                                nn.GELU(), nn.Linear(dim * ff_mult, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: Tensor, media: Tensor, media_locations: Tensor) -> Tensor:
        a = self.attn
        x = gated_cross_attention(
            x, media, media_locations, self.attn_gate, ln_weight=a.norm.weight, ln_bias=a.norm.bias,
            to_q=a.to_q.weight, to_kv=a.to_kv.weight, to_out=a.to_out.weight, heads=self.heads,
            only_attend_immediate_media=self.only_attend_immediate_media, eps=a.norm.eps,
            backend=self.backend)
        ln, l1, _, l2 = self.ff
        return gated_ffn(x, self.ff_gate, ln_weight=ln.weight, ln_bias=ln.bias, w1=l1.weight,
                         w2=l2.weight, eps=ln.eps, backend=self.backend)


# --------------------------------------------------------------------------- ONNX
def _onnx_gated_xattn(x, media, media_locations, alpha, ln_weight, ln_bias, to_q, to_kv, to_out,
                      heads: int, only_immediate: bool, eps: float, backend: str):
    """onnxscript (traced) decomposition of ``fmrt::gated_xattn`` into standard opset-18 ops: the
    dense masked formulation (the key-image ids come from CumSum over a ones tensor shaped like
    media's [B, T_img, n], so no Range / shape arithmetic on n is needed)."""
    from onnxscript import opset18 as op

    i64 = lambda v: op.Constant(value_ints=list(v))  # noqa: E731
    xn = op.LayerNormalization(x, ln_weight, ln_bias, axis=-1, epsilon=eps)
    if isinstance(xn, (tuple, list)):  # the tracer returns all three optional outputs
        xn = xn[0]
    q = op.MatMul(xn, op.Transpose(to_q, perm=[1, 0]))                            # [B, T, inner]
    media_flat = op.Reshape(media, op.Concat(i64([0, -1]), op.Shape(media, start=3), axis=0))
    kv = op.MatMul(media_flat, op.Transpose(to_kv, perm=[1, 0]))                   # [B, NK, 2i]
    k, v = op.Split(kv, axis=-1, num_outputs=2)
    head_shape = i64([0, 0, heads, -1])
    qh = op.Transpose(op.Reshape(q, head_shape), perm=[0, 2, 1, 3])                # [B, H, T, dh]
    kt = op.Transpose(op.Reshape(k, head_shape), perm=[0, 2, 3, 1])                # [B, H, dh, NK]
    vh = op.Transpose(op.Reshape(v, head_shape), perm=[0, 2, 1, 3])                # [B, H, NK, dh]
    dh = op.CastLike(op.Shape(qh, start=3, end=4), x)
    s = op.Div(op.MatMul(qh, kt), op.Sqrt(dh))                                    # [B, H, T, NK]
    idx = op.Unsqueeze(op.CumSum(op.Cast(media_locations, to=7), op.Constant(value_int=1)),
                       i64([1, 3]))                                               # [B, 1, T, 1]
    ones = op.ConstantOfShape(op.Shape(media, start=0, end=3), value=_onnx_one_int64())
    key_img = op.Unsqueeze(op.Reshape(op.CumSum(ones, op.Constant(value_int=1)), i64([0, -1])),
                           i64([1, 2]))                                            # [B, 1, 1, NK]
    allowed = op.Equal(key_img, idx) if only_immediate else op.LessOrEqual(key_img, idx)
    has = op.Greater(op.ReduceMax(op.Cast(allowed, to=1), i64([-1]), keepdims=1),
                     op.Constant(value_float=0.0))                                 # [B, 1, T, 1]
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    s = op.Where(allowed, s, op.CastLike(op.Constant(value_float=float("-inf")), x))
    s = op.Where(has, s, zero)           # rows that see nothing: finite scores, zeroed below
    p = op.Where(allowed, op.Softmax(s, axis=-1), zero)
    lse = op.Where(has, op.ReduceLogSumExp(s, i64([-1]), keepdims=1), zero)
    lse = op.Cast(op.Squeeze(lse, i64([3])), to=1)                                # [B, H, T]
    o = op.Reshape(op.Transpose(op.MatMul(p, vh), perm=[0, 2, 1, 3]), i64([0, 0, -1]))
    out = op.Add(x, op.Mul(op.Tanh(alpha), op.MatMul(o, op.Transpose(to_out, perm=[1, 0]))))
    return out, q, kv, o, lse


def _onnx_one_int64():
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.ones((1,), dtype=np.int64))


def onnx_translation_table() -> Dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: maps
    ``fmrt::gated_xattn`` to LayerNormalization, MatMul, CumSum, Equal / LessOrEqual, Where,
    Softmax and ReduceLogSumExp (the dense masked formulation: at inference sizes the [T, T_img*n]
    scores are small next to the projections, and ONNX has no cheap segment loop)."""
    return {torch.ops.fmrt.gated_xattn.default: _onnx_gated_xattn}
