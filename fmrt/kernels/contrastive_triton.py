"""Triton kernels for ``fmrt.kernels.contrastive`` (GPU; CPU tests run them under
``TRITON_INTERPRET=1``). Inputs fp32/fp16/bf16 (fp64 is computed as fp32), fp32 accumulation.

Contrastive loss, five B x B x D products in all (the floor is four: one forward, three backward):
  * ``_fwd_kernel`` - P persistent programs (P ~ 2 x SMs); program p walks row blocks p, p+P, ...
    and, for each, all column tiles: online row LSE (softmax) or the row's softplus sum
    (sigmoid), the scaled diagonal, and per-program column partials (max, sum) merged in place
    into its own row of a [P, B] buffer (no atomics; 8*P*B bytes, 138 MB at P=264, B=65,536),
    reduced to the column LSE by one torch logsumexp over P.
  * ``_bwd_rows_kernel`` - one program per row block recomputes its tiles and accumulates
    d_image = G @ [text; hard] in registers ([BLOCK_M, D] fp32), plus sum(image * d_image) for
    d_scale and the row sums of G for d_bias.
  * ``_bwd_cols_kernel`` - one program per column block (texts, then hard negatives) recomputes
    its tiles and accumulates d_text = G.T @ image. Two kernels (one recomputation each) instead
    of one with atomic adds of [BLOCK_M, D] per tile (B^2 D / BLOCK_N fp32 atomics, ~17e9 at
    B=65,536: more memory traffic than the extra product costs).
  G is formed unscaled (softmax: P_row + P_col - 2I in [-2, 2]; sigmoid: sigmoid(L) - I), cast
  to the input dtype for the tensor-core product, and the constant grad*scale/(2B) is applied
  once at the store.

Top-k: ``_topk_block_kernel`` scores a [BLOCK_Q, BLOCK_N] tile of queries x gallery rows and
writes that block's own top-k (k rounds of max + lowest-index argmax; NaN first); a torch sort
merges the N / BLOCK_N * k candidates per query. The Q x N matrix is never written.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fmrt.kernels._triton import interpret_mode

# Fused top-k selection costs k rounds of reductions over the tile; above this k the blockwise
# torch path (scores chunk + exact merge) is used instead.
TOPK_FUSED_MAX_K = 64
_BIG = tl.constexpr(2147483647)  # "no candidate" index in the top-k kernel (sorts last)


# --------------------------------------------------------------------------- shared tile helper
@triton.jit
def _tile_dot(a_ptr, b_ptr, rows, cols, rmask, cmask, D, sam, sad, sbn, sbd,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 = A[rows] @ B[cols].T over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        a = tl.load(a_ptr + rows[:, None] * sam + ks[None, :] * sad,
                    mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * sbn + ks[None, :] * sbd,
                    mask=cmask[:, None] & km[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _log_sigmoid(z):
    # min(z, 0) - log(1 + exp(-|z|)): no overflow; log(1 + e) vs log1p(e) differs by < 6e-8
    # absolute per element (e < 2^-24 rounds 1 + e to 1).
    return tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(X, Y, H, scale_ptr, bias_ptr, ROW_OUT, DIAG_OUT, CMAX, CSUM,
                B, M, D, n_row_blocks,
                sxm, sxd, sym, syd, shm, shd,
                KIND: tl.constexpr, HAS_NEG: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    for rb in range(pid, n_row_blocks, nprog):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        diag = tl.zeros((BLOCK_M,), tl.float32)
        for j0 in range(0, B, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < B
            s = _tile_dot(X, Y, rows, cols, rmask, cmask, D, sxm, sxd, sym, syd,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE) * scale
            valid = rmask[:, None] & cmask[None, :]
            is_diag = rows[:, None] == cols[None, :]
            if KIND == 0:
                diag += tl.sum(tl.where(is_diag, s, 0.0), 1)
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # padded rows
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
                m_i = m_new
                # this program's column partials, merged into its own row of [P, B]
                cm = tl.max(s, 0)
                cm_safe = tl.where(cm == float("-inf"), 0.0, cm)        # padded columns
                cs = tl.sum(tl.exp(s - cm_safe[None, :]), 0)
                off = pid * B + cols
                om = tl.load(CMAX + off, mask=cmask, other=float("-inf"))
                osum = tl.load(CSUM + off, mask=cmask, other=0.0)
                nm = tl.maximum(om, cm)
                nm_safe = tl.where(nm == float("-inf"), 0.0, nm)
                ns = osum * tl.exp(om - nm_safe) + cs * tl.exp(cm - nm_safe)
                tl.store(CMAX + off, nm, mask=cmask)
                tl.store(CSUM + off, ns, mask=cmask)
            else:
                lg = s + bias
                diag += tl.sum(tl.where(is_diag, lg, 0.0), 1)
                z = tl.where(is_diag, lg, -lg)
                l_i += tl.sum(tl.where(valid, -_log_sigmoid(z), 0.0), 1)
        if HAS_NEG:
            for j0 in range(0, M, BLOCK_N):
                cols = j0 + tl.arange(0, BLOCK_N)
                cmask = cols < M
                s = _tile_dot(X, H, rows, cols, rmask, cmask, D, sxm, sxd, shm, shd,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE) * scale
                valid = rmask[:, None] & cmask[None, :]
                if KIND == 0:
                    s = tl.where(valid, s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
                    m_i = m_new
                else:
                    l_i += tl.sum(tl.where(valid, -_log_sigmoid(-(s + bias)), 0.0), 1)
        if KIND == 0:
            out = m_i + tl.log(tl.where(rmask, l_i, 1.0))
        else:
            out = l_i
        tl.store(ROW_OUT + rows, out, mask=rmask)
        tl.store(DIAG_OUT + rows, diag, mask=rmask)


# --------------------------------------------------------------------------- backward
@triton.jit
def _grad_tile(s, rows, cols, rmask, cmask, lse_r, lse_c, bias,
               KIND: tl.constexpr, IS_TEXT: tl.constexpr):
    """Unscaled dS tile: softmax P_row (+ P_col - 2I for text columns); sigmoid sigmoid(L) (- I)."""
    valid = rmask[:, None] & cmask[None, :]
    is_diag = (rows[:, None] == cols[None, :]) & valid
    if KIND == 0:
        g = tl.exp(s - lse_r[:, None])
        if IS_TEXT:
            g += tl.exp(s - lse_c[None, :]) - tl.where(is_diag, 2.0, 0.0)
    else:
        g = tl.sigmoid(s + bias)
        if IS_TEXT:
            g -= tl.where(is_diag, 1.0, 0.0)
    return tl.where(valid, g, 0.0)


@triton.jit
def _bwd_rows_kernel(X, Y, H, scale_ptr, bias_ptr, coef_ptr, LSE_R, LSE_C, DX, DS_PART, DB_PART,
                     B, M, D,
                     sxm, sxd, sym, syd, shm, shd, sdm, sdd,
                     KIND: tl.constexpr, HAS_NEG: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    rb = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    gsum = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, B, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < B
        s = _tile_dot(X, Y, rows, cols, rmask, cmask, D, sxm, sxd, sym, syd,
                      BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE) * scale
        lse_c = tl.load(LSE_C + cols, mask=cmask & (KIND == 0), other=0.0)
        g = _grad_tile(s, rows, cols, rmask, cmask, lse_r, lse_c, bias, KIND, True)
        gsum += tl.sum(g, 1)
        yt = tl.load(Y + cols[:, None] * sym + ds[None, :] * syd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            yt = yt.to(tl.float32)
        if IEEE:
            acc = tl.dot(g.to(yt.dtype), yt, acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(yt.dtype), yt, acc)
    if HAS_NEG:
        for j0 in range(0, M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < M
            s = _tile_dot(X, H, rows, cols, rmask, cmask, D, sxm, sxd, shm, shd,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE) * scale
            g = _grad_tile(s, rows, cols, rmask, cmask, lse_r, lse_r, bias, KIND, False)
            gsum += tl.sum(g, 1)
            ht = tl.load(H + cols[:, None] * shm + ds[None, :] * shd,
                         mask=cmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                ht = ht.to(tl.float32)
            if IEEE:
                acc = tl.dot(g.to(ht.dtype), ht, acc, input_precision="ieee")
            else:
                acc = tl.dot(g.to(ht.dtype), ht, acc)
    xt = tl.load(X + rows[:, None] * sxm + ds[None, :] * sxd,
                 mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(DS_PART + rb, tl.sum(tl.sum(acc * xt, 1), 0))
    tl.store(DB_PART + rb, tl.sum(gsum, 0))
    coef = tl.load(coef_ptr).to(tl.float32)
    tl.store(DX + rows[:, None] * sdm + ds[None, :] * sdd,
             (acc * coef).to(DX.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_cols_kernel(X, C, scale_ptr, bias_ptr, coef_ptr, LSE_R, LSE_C, DC,
                     B, NC, D,
                     sxm, sxd, scn, scd, sdn, sdd,
                     KIND: tl.constexpr, IS_TEXT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    cb = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NC
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    lse_c = tl.load(LSE_C + cols, mask=cmask & (KIND == 0) & IS_TEXT, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i0 in range(0, B, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < B
        s = _tile_dot(X, C, rows, cols, rmask, cmask, D, sxm, sxd, scn, scd,
                      BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE) * scale
        lse_r = tl.load(LSE_R + rows, mask=rmask & (KIND == 0), other=0.0)
        g = _grad_tile(s, rows, cols, rmask, cmask, lse_r, lse_c, bias, KIND, IS_TEXT)
        xt = tl.load(X + rows[:, None] * sxm + ds[None, :] * sxd,
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(g.to(xt.dtype)), xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g.to(xt.dtype)), xt, acc)
    coef = tl.load(coef_ptr).to(tl.float32)
    tl.store(DC + cols[:, None] * sdn + ds[None, :] * sdd,
             (acc * coef).to(DC.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------- launch helpers
def _kernel_dtype(t: Tensor) -> Tensor:
    return t.float() if t.dtype == torch.float64 else t


def _check_device(*ts: Optional[Tensor]) -> None:
    for t in ts:
        if t is not None and not t.is_cuda and not interpret_mode():
            raise RuntimeError("the Triton contrastive kernels need CUDA tensors (or "
                               "TRITON_INTERPRET=1 for CPU tensors)")


def _flags(x: Tensor) -> Tuple[bool, bool]:
    """(UPCAST, IEEE). The interpreter (numpy) has no bf16 dot: compute in fp32 there. fp32
    inputs use IEEE fp32 products unless torch allows TF32 for matmuls (torch's own default
    is no TF32, so the kernel matches torch.mm unless the user opted in)."""
    if interpret_mode() or not x.is_cuda:
        return True, True
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return False, ieee


def _configs(D: int, interp: bool):
    """fwd (BLOCK_M, BLOCK_N, BLOCK_K, warps); bwd ((rows kernel BLOCK_M, BLOCK_N, BLOCK_K),
    (cols kernel BLOCK_M, BLOCK_N, BLOCK_K), BLOCK_D, warps).

    Backward programs hold a [rows, next_pow2(D)] fp32 accumulator in registers (64 x 512 fp32 =
    128 KiB = 128 registers/thread at 8 warps; 16 warps caps threads at 128 registers, below
    what sm_90's wgmma needs). Sizes from ptxas resource usage of sm_90a builds (triton 3.7,
    bf16, D=512, 8 warps; registers / spill stack bytes):
      fwd 128x128 BK64 255/248 | 128x64 BK64 255/0 | 128x128 BK32 255/88 | 64x128 (4 warps) 255/648
      rows 64x32 255/296 | 64x16 255/280 | 32x64 255/24
      cols acc 64, loop 32: BK64 255/96, BK32 255/24 | acc 32, loop 64: 255/0
    """
    BD = max(16, triton.next_power_of_2(D))
    if interp:
        return (16, 16, 16, 4), ((16, 16, 16), (16, 16, 16), BD, 4)
    fwd = (128, 64, 64, 8)
    if BD <= 128:
        bwd = ((64, 64, 64), (64, 64, 64), BD, 8)
    elif BD <= 512:
        bwd = ((32, 64, 64), (32, 64, 32), BD, 8)
    else:
        bwd = ((16, 32, 32), (16, 32, 32), BD, 8)
    return fwd, bwd


def _num_programs(n_blocks: int, x: Tensor) -> int:
    if interpret_mode() or not x.is_cuda:
        return min(n_blocks, 3)    # several row blocks per program: exercises the merge path
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return min(n_blocks, 2 * sms)


def _scalars(x: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    sc = scale.detach().to(device=x.device, dtype=torch.float32).reshape(1)
    b = (bias.detach().to(device=x.device, dtype=torch.float32).reshape(1) if bias is not None
         else torch.zeros(1, device=x.device, dtype=torch.float32))
    return sc, b


# --------------------------------------------------------------------------- contrastive launchers
def contrastive_forward(image: Tensor, text: Tensor, logit_scale: Tensor,
                        hard: Optional[Tensor], bias: Optional[Tensor], kind: str
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss fp32 0-dim, row_lse fp32 [B], col_lse fp32 [B]) (LSEs empty for sigmoid)."""
    _check_device(image, text, hard)
    x, y = _kernel_dtype(image), _kernel_dtype(text)
    h = _kernel_dtype(hard) if hard is not None and hard.shape[0] > 0 else None
    if h is not None and h.dtype != y.dtype:
        h = h.to(y.dtype)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    B, D = x.shape
    M = h.shape[0] if h is not None else 0
    (BM, BN, BK, warps), _ = _configs(D, interpret_mode() or not x.is_cuda)
    upcast, ieee = _flags(x)
    n_rb = triton.cdiv(B, BM)
    P = _num_programs(n_rb, x)
    k = 0 if kind == "softmax" else 1
    row_out = torch.empty(B, device=x.device, dtype=torch.float32)
    diag = torch.empty(B, device=x.device, dtype=torch.float32)
    if k == 0:
        cmax = torch.full((P, B), -math.inf, device=x.device, dtype=torch.float32)
        csum = torch.zeros((P, B), device=x.device, dtype=torch.float32)
    else:
        cmax = csum = torch.empty(1, device=x.device, dtype=torch.float32)
    sc, b = _scalars(x, logit_scale, bias)
    hh = h if h is not None else x
    _fwd_kernel[(P,)](x, y, hh, sc, b, row_out, diag, cmax, csum, B, M, D, n_rb,
                      x.stride(0), x.stride(1), y.stride(0), y.stride(1), hh.stride(0), hh.stride(1),
                      KIND=k, HAS_NEG=h is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                      UPCAST=upcast, IEEE=ieee, num_warps=warps)
    if k == 0:
        col_lse = torch.logsumexp(cmax + torch.log(csum), dim=0)
        loss = ((row_out - diag).sum() + (col_lse - diag).sum()) / (2 * B)
        return loss, row_out, col_lse
    loss = row_out.sum() / B
    return loss, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)


def contrastive_backward(grad: Tensor, image: Tensor, text: Tensor, logit_scale: Tensor,
                         hard: Optional[Tensor], bias: Optional[Tensor], row_lse: Tensor,
                         col_lse: Tensor, kind: str):
    """(d_image, d_text, d_hard or None, d_scale, d_bias or None), in the inputs' dtypes."""
    _check_device(image, text, hard)
    x, y = _kernel_dtype(image), _kernel_dtype(text)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    h = hard if hard is not None and hard.shape[0] > 0 else None
    if h is not None:
        h = _kernel_dtype(h).to(x.dtype)
    B, D = x.shape
    M = h.shape[0] if h is not None else 0
    _, (rcfg, ccfg, BD, warps) = _configs(D, interpret_mode() or not x.is_cuda)
    upcast, ieee = _flags(x)
    k = 0 if kind == "softmax" else 1
    sc, b = _scalars(x, logit_scale, bias)
    norm = 2 * B if k == 0 else B
    g0 = grad.detach().to(device=x.device, dtype=torch.float32).reshape(1) / norm
    coef = g0 * sc
    if k == 0:
        lse_r, lse_c = row_lse.float().contiguous(), col_lse.float().contiguous()
    else:
        lse_r = lse_c = torch.zeros(1, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dy = torch.empty_like(y)
    try:
        return _backward_launch(grad, image, text, logit_scale, hard, bias, x, y, h, B, M, D,
                                rcfg, ccfg, BD, warps, upcast, ieee, k, sc, b, g0, coef,
                                lse_r, lse_c, dx, dy)
    except triton.runtime.errors.OutOfResources:
        # a GPU with less shared memory / registers than the sm_90 the tiles are sized for
        half = lambda c: (max(16, c[0] // 2), max(16, c[1] // 2), 32)  # noqa: E731
        return _backward_launch(grad, image, text, logit_scale, hard, bias, x, y, h, B, M, D,
                                half(rcfg), half(ccfg), BD, warps, upcast, ieee,
                                k, sc, b, g0, coef, lse_r, lse_c, dx, dy)


def _backward_launch(grad, image, text, logit_scale, hard, bias, x, y, h, B, M, D,
                     rcfg, ccfg, BD, warps, upcast, ieee, k, sc, b, g0, coef, lse_r, lse_c, dx, dy):
    BM, BN, BK = rcfg
    n_rb = triton.cdiv(B, BM)
    ds_part = torch.empty(n_rb, device=x.device, dtype=torch.float32)
    db_part = torch.empty(n_rb, device=x.device, dtype=torch.float32)
    hh = h if h is not None else x
    _bwd_rows_kernel[(n_rb,)](x, y, hh, sc, b, coef, lse_r, lse_c, dx, ds_part, db_part, B, M, D,
                              x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                              hh.stride(0), hh.stride(1), dx.stride(0), dx.stride(1),
                              KIND=k, HAS_NEG=h is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                              BLOCK_D=BD, UPCAST=upcast, IEEE=ieee, num_warps=warps)
    BM, BN, BK = ccfg
    _bwd_cols_kernel[(triton.cdiv(B, BN),)](
        x, y, sc, b, coef, lse_r, lse_c, dy, B, B, D,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), dy.stride(0), dy.stride(1),
        KIND=k, IS_TEXT=True, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD,
        UPCAST=upcast, IEEE=ieee, num_warps=warps)
    dh = None
    if hard is not None:
        if h is None:
            dh = torch.zeros_like(hard)
        else:
            dh = torch.empty_like(h)
            _bwd_cols_kernel[(triton.cdiv(M, BN),)](
                x, h, sc, b, coef, lse_r, lse_c, dh, B, M, D,
                x.stride(0), x.stride(1), h.stride(0), h.stride(1), dh.stride(0), dh.stride(1),
                KIND=k, IS_TEXT=False, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD,
                UPCAST=upcast, IEEE=ieee, num_warps=warps)
            dh = dh.to(hard.dtype)
    d_scale = (ds_part.sum() * g0[0]).to(logit_scale.dtype)
    d_bias = (db_part.sum() * g0[0]).to(bias.dtype) if bias is not None else None
    return dx.to(image.dtype), dy.to(text.dtype), dh, d_scale, d_bias


# --------------------------------------------------------------------------- top-k
@triton.jit
def _topk_block_kernel(Q, G, OUT_S, OUT_I, NQ, N, D, n_blocks,
                       sqm, sqd, sgn, sgd,
                       K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    nb = tl.program_id(0)
    qb = tl.program_id(1)
    qs = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = qs < NQ
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    # exact fp32 products (fp16 galleries are widened per tile): the kernel is bound by reading
    # the gallery (N*D*2 bytes), not by the Q x N x D products at small Q.
    s = _tile_dot(Q, G, qs, cols, qmask, cmask, D, sqm, sqd, sgn, sgd,
                  BLOCK_Q, BLOCK_N, BLOCK_K, True, True)
    colb = cols[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
    isnan = s != s
    taken = colb >= N
    out_base = qs * (n_blocks * K) + nb * K
    for t in tl.static_range(K):
        nan_idx = tl.min(tl.where(isnan & (~taken), colb, _BIG), 1)
        key = tl.where(taken | isnan, float("-inf"), s)
        m = tl.max(key, 1)
        num_idx = tl.min(tl.where((~taken) & (~isnan) & (s == m[:, None]), colb, _BIG), 1)
        idx = tl.where(nan_idx < _BIG, nan_idx, num_idx)
        hit = colb == idx[:, None]
        val = tl.sum(tl.where(hit, s, 0.0), 1)
        val = tl.where(idx < _BIG, val, float("-inf"))
        taken = taken | hit
        tl.store(OUT_S + out_base + t, val, mask=qmask)
        tl.store(OUT_I + out_base + t, idx.to(tl.int64), mask=qmask)


def topk_scores(queries: Tensor, gallery: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """(scores fp32 [Q, k'], indices int64 [Q, k']), k' = min(k, N); see contrastive.topk_scores."""
    from fmrt.kernels.contrastive import _sorted_merge, _topk_chunked_torch

    _check_device(queries, gallery)
    Q, D = queries.shape
    N = gallery.shape[0]
    kk = min(k, N)
    if kk > TOPK_FUSED_MAX_K:
        return _topk_chunked_torch(queries, gallery, kk)
    q = queries.float() if queries.dtype == torch.float64 else queries
    g = gallery.float() if gallery.dtype == torch.float64 else gallery
    interp = interpret_mode() or not q.is_cuda
    BQ = 16 if (interp or Q <= 16) else 32
    BN = 16 if interp else 256
    BK = 16 if interp else 64
    n_blocks = triton.cdiv(N, BN)
    cand_s = torch.empty((Q, n_blocks * kk), device=q.device, dtype=torch.float32)
    cand_i = torch.empty((Q, n_blocks * kk), device=q.device, dtype=torch.int64)
    grid = (n_blocks, triton.cdiv(Q, BQ))
    _topk_block_kernel[grid](q, g, cand_s, cand_i, Q, N, D, n_blocks,
                             q.stride(0), q.stride(1), g.stride(0), g.stride(1),
                             K=kk, BLOCK_Q=BQ, BLOCK_N=BN, BLOCK_K=BK, num_warps=4)
    return _sorted_merge(cand_s, cand_i, kk)
