"""Triton kernel for ``fmrt.kernels.decode_masks`` (see ``mask_decode`` for the math).

One program handles BLOCK_P consecutive input pixels (row-major within one batch item):

    acc1 [BLOCK_P, 4*BC1]  = src pixels [BLOCK_P, C] @ W1 [C, 4*BC1]       (K-loop over C, fp32 acc)
    -> view [BLOCK_P*4, BC1] + b1 -> LayerNorm over the C1 real channels -> GELU       (fp32)
    z2 [BLOCK_P*4, 4*BC2]  = g1 @ W2 [BC1, 4*BC2]                                    (fp32 acc)
    -> view [BLOCK_P*16, BC2] + b2 -> GELU -> per mask m: sum(g2 * hyper[b, m]) -> 16 logits/px

Row r of the [BLOCK_P*16, .] view is (pixel r // 16, conv1 tap (r // 4) % 4, conv2 tap r % 4),
so its output pixel is Y = 4i + 2a + d, X = 4j + 2c + e. Nothing but the logits reaches memory.

Channel widths are padded on the host to powers of two >= 16 (tl.dot needs every dimension
>= 16): W1 [C, 4*BC1] and W2 [BC1, 4*BC2] get zero columns/rows, the LayerNorm statistics use
the C1 real channels only, and padded channels stay exactly 0 through GELU (gelu(0) = 0) and meet
zero hypernetwork entries. At SAM size (C=256, C1=64, C2=32) nothing is padded.

Portability (triton 3.6 on the GPU image, 3.7.1 here): plain pointer arithmetic (no
``tl.make_block_ptr``), ``tl.reshape`` with ``can_reorder=False``; under the interpreter the dot
operands are upcast to fp32 (numpy has no bf16 matmul).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fmrt.kernels._triton import interpret_mode

_TORCH_TO_DOT = {torch.float16, torch.bfloat16, torch.float32}


@triton.jit
def _gelu(x):
    # exact-erf GELU (nn.GELU's default), in fp32
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _decode_masks_kernel(src_ptr, w1_ptr, b1_ptr, lnw_ptr, lnb_ptr, w2_ptr, b2_ptr, hyp_ptr, out_ptr,
                         C, H, W, M, C1, eps,
                         BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BC1: tl.constexpr,
                         BC2: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    HW = H * W
    # one flat grid axis (axis 1 is capped at 65,535 programs on CUDA; B can be 1,000s of prompts)
    n_blk = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    pid_p = pid % n_blk
    b = (pid // n_blk).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < HW
    offs_k = tl.arange(0, BLOCK_K)
    n1 = tl.arange(0, 4 * BC1)
    src_base = src_ptr + b * C * HW

    # ---- conv1 for the 4 taps at once: [BLOCK_P, C] @ [C, 4*BC1]
    acc1 = tl.zeros((BLOCK_P, 4 * BC1), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < C
        # NCHW: consecutive pixels are contiguous for a fixed channel -> coalesced along BLOCK_P
        x = tl.load(src_base + kk[None, :] * HW + offs_p[:, None],
                    mask=pmask[:, None] & kmask[None, :], other=0.0)
        w1 = tl.load(w1_ptr + kk[:, None] * (4 * BC1) + n1[None, :], mask=kmask[:, None], other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
            w1 = w1.to(tl.float32)
        if IEEE:
            acc1 = tl.dot(x, w1, acc1, input_precision="ieee")
        else:
            acc1 = tl.dot(x, w1, acc1)

    # ---- bias + LayerNorm over the C1 real channels of each (pixel, tap) + GELU, fp32
    c1 = tl.arange(0, BC1)
    c1mask = c1 < C1
    z1 = tl.reshape(acc1, (BLOCK_P * 4, BC1)) + tl.load(b1_ptr + c1)[None, :]
    mean = tl.sum(z1, axis=1) / C1                   # padded channels hold exactly 0
    d = tl.where(c1mask[None, :], z1 - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C1
    rstd = 1.0 / tl.sqrt(var + eps)
    ln = d * rstd[:, None] * tl.load(lnw_ptr + c1)[None, :] + tl.load(lnb_ptr + c1)[None, :]
    g1 = _gelu(ln)

    # ---- conv2 for the 4 taps at once: [BLOCK_P*4, BC1] @ [BC1, 4*BC2]
    n2 = tl.arange(0, 4 * BC2)
    w2 = tl.load(w2_ptr + c1[:, None] * (4 * BC2) + n2[None, :])
    if DOT_F32:
        w2 = w2.to(tl.float32)
    else:
        g1 = g1.to(w2.dtype)
    if IEEE:
        z2 = tl.dot(g1, w2, input_precision="ieee")
    else:
        z2 = tl.dot(g1, w2)
    c2 = tl.arange(0, BC2)
    g2 = _gelu(tl.reshape(z2, (BLOCK_P * 16, BC2)) + tl.load(b2_ptr + c2)[None, :])

    # ---- output coordinates of the 16 sub-pixels of each input pixel
    r = tl.arange(0, BLOCK_P * 16)
    p = pid_p * BLOCK_P + r // 16
    s1 = (r // 4) % 4
    s2 = r % 4
    i = p // W
    j = p % W
    Y = 4 * i + 2 * (s1 // 2) + s2 // 2
    X = 4 * j + 2 * (s1 % 2) + s2 % 2
    omask = p < HW
    out_off = Y * (4 * W) + X
    for m in range(0, M):
        hv = tl.load(hyp_ptr + (b * M + m) * BC2 + c2)                 # fp32, zero-padded
        val = tl.sum(g2 * hv[None, :], axis=1)
        tl.store(out_ptr + (b * M + m) * (16 * HW) + out_off,
                 val.to(out_ptr.dtype.element_ty), mask=omask)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def decode_masks_triton(src: Tensor, hyper: Tensor, w1: Tensor, b1: Tensor, lnw: Tensor,
                        lnb: Tensor, w2: Tensor, b2: Tensor, eps: float) -> Tensor:
    """Launch the fused kernel. src [B, C, h, w], hyper [B, M, C2], conv1 [C, C1, 2, 2] + [C1],
    LayerNorm [C1] x2, conv2 [C1, C2, 2, 2] + [C2], one dtype in {fp16, bf16, fp32}.
    Returns [B, M, 4h, 4w] in src's dtype; all accumulation in fp32."""
    if src.dtype not in _TORCH_TO_DOT:
        raise TypeError(f"decode_masks(backend='triton'): dtype {src.dtype} is not supported "
                        "(float16, bfloat16, float32); use backend='cpu' for float64")
    if not src.is_cuda and not interpret_mode():
        raise RuntimeError("decode_masks(backend='triton') on CPU tensors needs TRITON_INTERPRET=1")
    B, C, h, w = src.shape
    M = hyper.shape[1]
    C1, C2 = w1.shape[1], w2.shape[1]
    BC1, BC2 = _pow2_at_least_16(C1), _pow2_at_least_16(C2)
    dev, dt = src.device, src.dtype
    # Host-side weight layout (tiny: 256*256 + 64*128 elements at SAM size): per-pixel matrices
    # with columns (tap, channel), channels zero-padded to BC1 / BC2.
    w1p = torch.zeros(C, 4, BC1, dtype=dt, device=dev)
    w1p[:, :, :C1] = w1.permute(0, 2, 3, 1).reshape(C, 4, C1)
    w2p = torch.zeros(BC1, 4, BC2, dtype=dt, device=dev)
    w2p[:C1, :, :C2] = w2.permute(0, 2, 3, 1).reshape(C1, 4, C2)

    def pad_f32(v: Tensor, n: int) -> Tensor:
        out = torch.zeros(*v.shape[:-1], n, dtype=torch.float32, device=dev)
        out[..., :v.shape[-1]] = v
        return out

    b1p, lnwp, lnbp, b2p = pad_f32(b1, BC1), pad_f32(lnw, BC1), pad_f32(lnb, BC1), pad_f32(b2, BC2)
    hypp = pad_f32(hyper, BC2)
    out = torch.empty(B, M, 4 * h, 4 * w, dtype=dt, device=dev)
    if B == 0 or h * w == 0:
        return out
    # 16 pixels per program: the widest live tiles are acc1 [16, 4*BC1] and z2/g2 [64, 4*BC2]
    # = 8,192 fp32 at SAM size, 64 registers/thread at 4 warps; tl.dot needs BLOCK_P >= 16.
    BLOCK_P = 16
    BLOCK_K = min(64, _pow2_at_least_16(C))
    grid = (triton.cdiv(h * w, BLOCK_P) * B,)
    _decode_masks_kernel[grid](
        src.contiguous(), w1p, b1p, lnwp, lnbp, w2p, b2p, hypp, out,
        C, h, w, M, C1, float(eps),
        BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, BC1=BC1, BC2=BC2,
        DOT_F32=interpret_mode(), IEEE=(dt == torch.float32), num_warps=4)
    return out
