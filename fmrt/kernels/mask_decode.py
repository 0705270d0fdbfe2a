"""Fused SAM mask decoding: output upscaling + hypernetwork product in one per-pixel pass.

segment-anything's ``MaskDecoder`` turns the transformer's image embedding ``src`` [B, C, h, w]
(C=256, h=w=64) into mask logits with::

    up = GELU(ConvT2(GELU(LayerNorm2d(ConvT1(src)))))     # [B, C2, 4h, 4w]  (C2 = 32)
    masks = (hyper_in @ up.view(B, C2, 16hw)).view(B, M, 4h, 4w)

where ``ConvT1 = ConvTranspose2d(C, C1, 2, stride=2)`` (C1 = 64) and ``ConvT2 =
ConvTranspose2d(C1, C2, 2, stride=2)``. Because kernel size == stride == 2 the transposed
convolutions never overlap: output pixel (Y, X) depends on the single input pixel
(Y // 4, X // 4), through sub-pixel tap ((Y // 2) % 2, (X // 2) % 2) of conv1 and tap
(Y % 2, X % 2) of conv2. Per input pixel the whole path is therefore a small MLP::

    x [C] -> z1 = x @ W1 [C, 4*C1] (+ b1)  -> 4 vectors of C1 -> LayerNorm (over C1) -> GELU
          -> z2 = g1 @ W2 [C1, 4*C2] (+ b2) -> 16 vectors of C2 -> GELU -> dot hyper [M, C2]
          -> 16 logits per mask (a 4x4 output patch)

``decode_masks`` evaluates exactly that, a block of input pixels at a time, and never
materialises the [B, C1, 2h, 2w] (4 MiB fp32 per prompt at SAM size) or [B, C2, 4h, 4w] (8 MiB)
tensors nor the LayerNorm temporaries of the unfused module. Peak allocations of one call at
B=1, 4 masks (benchmarks/bench_mask_decode.py): unfused 28.0 MiB, fused CPU path 3.4 MiB with 1
thread / 5.5 MiB with 2 (tile-sized buffers + the 1 MiB output); at B=8 224 MiB vs 8-10 MiB.
It can pick, per batch item, the best of the multimask outputs by the IoU head's prediction
*before* computing any pixels (``select="best"``), so only one mask's logits are produced.

Layers (see ``fmrt.kernels`` for the conventions):
  * ``decode_masks`` - public entry: input checks, mask selection (standard torch ops, exported as
    ArgMax/Gather), then the custom op.
  * ``torch.ops.fmrt.decode_masks`` - the fused op (fake + autograd registered); backward is
    ``torch.ops.fmrt.decode_masks_backward`` (blocked torch recomputation, any device).
  * backends: "triton" (``mask_decode_triton``), "cpu" (blocked torch; runs on any device),
    "reference" (the unfused formulation, float64-checkable), "auto".
  * ``onnx_translation_table()`` - decomposition into ConvTranspose / LayerNormalization / Erf /
    MatMul for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fmrt.kernels._triton import resolve_backend

__all__ = ["DecodedMasks", "SELECT_MODES", "decode_masks", "decode_masks_reference",
           "upscaling_params", "onnx_translation_table"]

SELECT_MODES = ("all", "multimask", "single", "best")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Input pixels per tile of the blocked CPU path, per intra-op thread. At SAM size (C=256, C1=64,
# C2=32) a 512-pixel tile keeps each intermediate of a tile within ~1 MiB (z1: 512*256*4 B =
# 512 KiB, conv2 output: 512*16*32*4 B = 1 MiB), i.e. cache-resident, while each matmul
# (512x256 @ 256x256, 67 MFLOP) is big enough for BLAS. Measured single-threaded on the 2-core dev
# box (B=1, 64x64 -> 256x256, best of 10): tiles of 256..2048 px are within ~10% of each other
# (12-13 ms), the whole image as one tile (4096 px) is ~1.3x slower (16.5-17 ms). The tile grows
# with the thread count so each thread's share of every matmul stays ~512 rows and an image costs
# ~8 tiles x 6 OpenMP parallel regions whatever the thread count: each region ends in a barrier,
# which stalls when another process holds a core. Measured with 2 threads on the 2-core box at
# load ~10 (best of 8): 512-px tiles 73-191 ms, 1024-px tiles 39-47 ms, unfused 207-247 ms.
CPU_TILE_PIXELS = 512


def _tile_pixels() -> int:
    return CPU_TILE_PIXELS * max(1, torch.get_num_threads())


class DecodedMasks(NamedTuple):
    """Result of :func:`decode_masks`.

    masks:      [B, M', 4h, 4w] mask logits, dtype of ``src``.
    iou_pred:   [B, M'] the IoU predictions of the returned masks (``None`` if no ``iou_pred`` was
                given).
    mask_index: [B, M'] int64, which of the M hypernetwork outputs each returned mask is (e.g.
                1..3 for ``select="multimask"``; the argmax for ``select="best"``).
    """

    masks: Tensor
    iou_pred: Optional[Tensor]
    mask_index: Tensor


# --------------------------------------------------------------------------- checks
def _check(src: Tensor, hyper_in: Tensor, w1: Tensor, b1: Tensor, lnw: Tensor, lnb: Tensor,
           w2: Tensor, b2: Tensor, iou_pred: Optional[Tensor]) -> None:
    named = {"src": src, "hyper_in": hyper_in, "conv1_weight": w1, "conv1_bias": b1,
             "ln_weight": lnw, "ln_bias": lnb, "conv2_weight": w2, "conv2_bias": b2}
    if iou_pred is not None:
        named["iou_pred"] = iou_pred
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"decode_masks: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"decode_masks: {name} must be float16/bfloat16/float32/float64, "
                            f"got {t.dtype}")
    if src.dim() != 4:
        raise ValueError(f"decode_masks: src must be [B, C, h, w], got shape {tuple(src.shape)}")
    B, C, h, w = src.shape
    if w1.dim() != 4 or tuple(w1.shape[2:]) != (2, 2) or w1.shape[0] != C:
        raise ValueError(f"decode_masks: conv1_weight must be [C={C}, C1, 2, 2] (ConvTranspose2d "
                         f"kernel 2, stride 2), got {tuple(w1.shape)}")
    C1 = w1.shape[1]
    if w2.dim() != 4 or tuple(w2.shape[2:]) != (2, 2) or w2.shape[0] != C1:
        raise ValueError(f"decode_masks: conv2_weight must be [C1={C1}, C2, 2, 2], got "
                         f"{tuple(w2.shape)}")
    C2 = w2.shape[1]
    for name, t, n in (("conv1_bias", b1, C1), ("ln_weight", lnw, C1), ("ln_bias", lnb, C1),
                       ("conv2_bias", b2, C2)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"decode_masks: {name} must be [{n}], got {tuple(t.shape)}")
    if hyper_in.dim() != 3 or hyper_in.shape[0] != B or hyper_in.shape[2] != C2:
        raise ValueError(f"decode_masks: hyper_in must be [B={B}, M, C2={C2}], got "
                         f"{tuple(hyper_in.shape)}")
    if hyper_in.shape[1] < 1:
        raise ValueError("decode_masks: hyper_in has no masks (M == 0)")
    if iou_pred is not None and tuple(iou_pred.shape) != (B, hyper_in.shape[1]):
        raise ValueError(f"decode_masks: iou_pred must be [B={B}, M={hyper_in.shape[1]}], got "
                         f"{tuple(iou_pred.shape)}")
    dtypes = {name: t.dtype for name, t in named.items() if name != "iou_pred"}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"decode_masks: src, hyper_in and the weights must share one dtype, got "
                        f"{ {k: str(v).replace('torch.', '') for k, v in dtypes.items()} }")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"decode_masks: all tensors must be on one device, got {sorted(map(str, devices))}")


# --------------------------------------------------------------------------- reference
def _gelu_grad(z: Tensor) -> Tensor:
    # d/dz [z * Phi(z)] = Phi(z) + z * phi(z) (exact-erf GELU, nn.GELU's default).
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) * (
        1.0 / math.sqrt(2.0 * math.pi))


def _reference_core(src: Tensor, hyper: Tensor, w1: Tensor, b1: Tensor, lnw: Tensor, lnb: Tensor,
                    w2: Tensor, b2: Tensor, eps: float) -> Tensor:
    """The unfused formulation, op for op as segment-anything writes it, in the input dtype."""
    x = F.conv_transpose2d(src, w1, b1, stride=2)
    u = x.mean(1, keepdim=True)                         # LayerNorm2d (segment_anything.modeling.common)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    x = lnw[:, None, None] * x + lnb[:, None, None]
    x = F.gelu(x)
    x = F.gelu(F.conv_transpose2d(x, w2, b2, stride=2))
    b, c, H, W = x.shape
    return (hyper @ x.reshape(b, c, H * W)).reshape(b, -1, H, W)


# --------------------------------------------------------------------------- blocked torch path
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 are accumulated in fp32 (CPU half matmuls are also slower than fp32 ones).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepared(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, cdt: torch.dtype):
    """Weights as per-pixel matrices: W1r [C, 4*C1] with columns (a, c, o) = conv1 tap (a, c),
    channel o; W2r [C1, 4*C2] with columns (d, e, p); biases repeated per tap."""
    C, C1 = w1.shape[:2]
    C2 = w2.shape[1]
    w1r = w1.to(cdt).permute(0, 2, 3, 1).reshape(C, 4 * C1)
    w2r = w2.to(cdt).permute(0, 2, 3, 1).reshape(C1, 4 * C2)
    return w1r, b1.to(cdt).repeat(4), w2r, b2.to(cdt).repeat(4)


def _row_tiles(h: int, w: int):
    rows = max(1, min(h, _tile_pixels() // max(w, 1)))
    for r0 in range(0, h, rows):
        yield r0, min(h, r0 + rows)


def _fused_torch(src: Tensor, hyper: Tensor, w1: Tensor, b1: Tensor, lnw: Tensor, lnb: Tensor,
                 w2: Tensor, b2: Tensor, eps: float) -> Tensor:
    """Blocked forward: per batch item, per tile of whole input rows, three matmuls + LayerNorm
    + 2 GELUs on tile-sized buffers; each tile's [M, 4*rows, 4w] logits go straight to the output."""
    B, C, h, w = src.shape
    M, C1, C2 = hyper.shape[1], w1.shape[1], w2.shape[1]
    cdt = _compute_dtype(src.dtype)
    w1r, b1r, w2r, b2r = _prepared(w1, b1, w2, b2, cdt)
    lnw_c, lnb_c, hyp = lnw.to(cdt), lnb.to(cdt), hyper.to(cdt)
    out = torch.empty(B, M, 4 * h, 4 * w, dtype=src.dtype, device=src.device)
    out8 = out.view(B, M, h, 2, 2, w, 2, 2)              # (i, a, d, j, c, e): Y = 4i+2a+d, X = 4j+2c+e
    src_c = src.contiguous()
    for b in range(B):
        xb = src_c[b].reshape(C, h * w)
        for r0, r1 in _row_tiles(h, w):
            T = (r1 - r0) * w
            # [T, C] as a transposed view of the NCHW rows: BLAS reads it in place (no copy).
            xt = xb[:, r0 * w:r1 * w].t()
            if xt.dtype != cdt:
                xt = xt.to(cdt)
            z1 = torch.addmm(b1r, xt, w1r)                           # [T, 4*C1]
            g1 = F.layer_norm(z1.view(T * 4, C1), (C1,), lnw_c, lnb_c, eps)
            g1 = torch.ops.aten.gelu_(g1)
            z2 = torch.addmm(b2r, g1, w2r)                           # [T*4, 4*C2]
            g2 = torch.ops.aten.gelu_(z2).view(T * 16, C2)
            logits = torch.mm(hyp[b], g2.t())                        # [M, T*16], (i, j, a, c, d, e)
            out8[b, :, r0:r1].copy_(logits.view(M, r1 - r0, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6))
            del z1, g1, z2, g2, logits     # free before the next tile allocates: one tile live, not two
    return out


def _backward_torch(grad: Tensor, src: Tensor, hyper: Tensor, w1: Tensor, b1: Tensor, lnw: Tensor,
                    lnb: Tensor, w2: Tensor, b2: Tensor, eps: float) -> Tuple[Tensor, ...]:
    """Blocked backward: recomputes each tile's forward (no activations were saved) and
    accumulates the weight gradients; memory is tile-sized like the forward's."""
    B, C, h, w = src.shape
    M, C1, C2 = hyper.shape[1], w1.shape[1], w2.shape[1]
    cdt = _compute_dtype(src.dtype)
    w1r, b1r, w2r, b2r = _prepared(w1, b1, w2, b2, cdt)
    lnw_c, lnb_c, hyp = lnw.to(cdt), lnb.to(cdt), hyper.to(cdt)
    src_c = src.contiguous()
    g8 = grad.reshape(B, M, h, 2, 2, w, 2, 2)
    d_src = torch.empty(B, C, h * w, dtype=src.dtype, device=src.device)
    d_hyp = torch.zeros(B, M, C2, dtype=cdt, device=src.device)
    d_w1r = torch.zeros(C, 4 * C1, dtype=cdt, device=src.device)
    d_w2r = torch.zeros(C1, 4 * C2, dtype=cdt, device=src.device)
    d_b1 = torch.zeros(4 * C1, dtype=cdt, device=src.device)
    d_b2 = torch.zeros(4 * C2, dtype=cdt, device=src.device)
    d_lnw = torch.zeros(C1, dtype=cdt, device=src.device)
    d_lnb = torch.zeros(C1, dtype=cdt, device=src.device)
    for b in range(B):
        xb = src_c[b].reshape(C, h * w)
        for r0, r1 in _row_tiles(h, w):
            T = (r1 - r0) * w
            xt = xb[:, r0 * w:r1 * w].t().to(cdt)                    # [T, C]
            z1 = torch.addmm(b1r, xt, w1r).view(T * 4, C1)
            var, mu = torch.var_mean(z1, dim=1, unbiased=False, keepdim=True)
            rstd = torch.rsqrt(var + eps)
            nrm = (z1 - mu) * rstd
            ln = torch.addcmul(lnb_c, nrm, lnw_c)
            g1 = F.gelu(ln)
            z2 = torch.addmm(b2r, g1, w2r).view(T * 16, C2)
            g2 = F.gelu(z2)
            # upstream grad in the tile's row order (i, j, a, c, d, e) -> [T*16, M]
            go = g8[b, :, r0:r1].permute(1, 4, 2, 5, 3, 6, 0).reshape(T * 16, M).to(cdt)
            d_hyp[b].addmm_(go.t(), g2)
            dz2 = (go @ hyp[b]).mul_(_gelu_grad(z2)).view(T * 4, 4 * C2)
            d_b2 += dz2.sum(0)
            d_w2r.addmm_(g1.t(), dz2)
            dl = (dz2 @ w2r.t()).mul_(_gelu_grad(ln))                # [T*4, C1]
            d_lnw += (dl * nrm).sum(0)
            d_lnb += dl.sum(0)
            dn = dl * lnw_c
            dz1 = rstd * (dn - dn.mean(1, keepdim=True) - nrm * (dn * nrm).mean(1, keepdim=True))
            dz1 = dz1.view(T, 4 * C1)
            d_b1 += dz1.sum(0)
            d_w1r.addmm_(xt.t(), dz1)
            d_src[b, :, r0 * w:r1 * w] = (w1r @ dz1.t()).to(src.dtype)   # [C, T]
    d_w1 = d_w1r.view(C, 2, 2, C1).permute(0, 3, 1, 2).contiguous()
    d_w2 = d_w2r.view(C1, 2, 2, C2).permute(0, 3, 1, 2).contiguous()
    return (d_src.view(B, C, h, w), d_hyp.to(hyper.dtype), d_w1.to(w1.dtype),
            d_b1.view(4, C1).sum(0).to(b1.dtype), d_lnw.to(lnw.dtype), d_lnb.to(lnb.dtype),
            d_w2.to(w2.dtype), d_b2.view(4, C2).sum(0).to(b2.dtype))


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fmrt::decode_masks", mutates_args=())
def _decode_masks_op(src: Tensor, hyper: Tensor, conv1_weight: Tensor, conv1_bias: Tensor,
                     ln_weight: Tensor, ln_bias: Tensor, conv2_weight: Tensor, conv2_bias: Tensor,
                     ln_eps: float, backend: str) -> Tensor:
    """Fused upscaling + hypernetwork product: src [B,C,h,w], hyper [B,M,C2] -> [B,M,4h,4w]."""
    args = (src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight, conv2_bias)
    kind = resolve_backend(backend, *args)
    if kind == "triton":
        from fmrt.kernels.mask_decode_triton import decode_masks_triton

        return decode_masks_triton(*args, ln_eps)
    if kind == "reference":
        return _reference_core(*args, ln_eps)
    return _fused_torch(*args, ln_eps)


@_decode_masks_op.register_fake
def _(src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight, conv2_bias, ln_eps,
      backend):
    B, _, h, w = src.shape
    return src.new_empty(B, hyper.shape[1], 4 * h, 4 * w)


@torch.library.custom_op("fmrt::decode_masks_backward", mutates_args=())
def _decode_masks_backward_op(grad: Tensor, src: Tensor, hyper: Tensor, conv1_weight: Tensor,
                              conv1_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                              conv2_weight: Tensor, conv2_bias: Tensor, ln_eps: float
                              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of fmrt::decode_masks for src, hyper and the six weights (blocked recompute)."""
    return _backward_torch(grad, src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias,
                           conv2_weight, conv2_bias, ln_eps)


@_decode_masks_backward_op.register_fake
def _(grad, src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight, conv2_bias,
      ln_eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in
                 (src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight, conv2_bias))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.ln_eps = inputs[8]


def _backward(ctx, grad):
    grads = torch.ops.fmrt.decode_masks_backward(grad.contiguous(), *ctx.saved_tensors, ctx.ln_eps)
    return (*grads, None, None)


_decode_masks_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def _select(hyper_in: Tensor, iou_pred: Optional[Tensor], select: str
            ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Pick the hypernetwork vectors (and IoU scores) of the masks to compute, before any pixels."""
    B, M, C2 = hyper_in.shape
    if select not in SELECT_MODES:
        raise ValueError(f"decode_masks: select must be one of {SELECT_MODES}, got {select!r}")
    if select in ("multimask", "best") and M < 2:
        raise ValueError(f"decode_masks: select={select!r} needs M >= 2 masks (mask 0 is the "
                         f"single-mask output), got M={M}")
    if select == "best":
        if iou_pred is None:
            raise ValueError("decode_masks: select='best' needs iou_pred [B, M]")
        # argmax over the multimask outputs 1..M-1 (segment-anything's SamPredictor convention)
        index = iou_pred[:, 1:].argmax(dim=1, keepdim=True) + 1             # [B, 1]
        hyper = torch.gather(hyper_in, 1, index.unsqueeze(-1).expand(B, 1, C2))
        return hyper, torch.gather(iou_pred, 1, index), index
    sl = {"all": slice(0, M), "multimask": slice(1, M), "single": slice(0, 1)}[select]
    index = torch.arange(M, device=hyper_in.device)[sl].unsqueeze(0).expand(B, -1)
    return hyper_in[:, sl], (None if iou_pred is None else iou_pred[:, sl]), index


def decode_masks(src: Tensor, hyper_in: Tensor, *, conv1_weight: Tensor, conv1_bias: Tensor,
                 ln_weight: Tensor, ln_bias: Tensor, conv2_weight: Tensor, conv2_bias: Tensor,
                 ln_eps: float = 1e-6, iou_pred: Optional[Tensor] = None, select: str = "all",
                 backend: Optional[str] = None) -> DecodedMasks:
    """SAM's mask-decoder output upscaling and hypernetwork product, fused per input pixel.

    Args:
        src: [B, C, h, w] image embedding after the two-way transformer (SAM: C=256, h=w=64).
        hyper_in: [B, M, C2] hypernetwork outputs, one per mask token (SAM: M=4, C2=32).
        conv1_weight, conv1_bias: [C, C1, 2, 2], [C1] of ``ConvTranspose2d(C, C1, 2, stride=2)``.
        ln_weight, ln_bias: [C1] of ``LayerNorm2d(C1)``; ``ln_eps`` its epsilon (SAM: 1e-6).
        conv2_weight, conv2_bias: [C1, C2, 2, 2], [C2] of ``ConvTranspose2d(C1, C2, 2, stride=2)``.
        iou_pred: optional [B, M] IoU-head predictions; required for ``select="best"``.
        select: which masks to compute -
            ``"all"``       all M masks;
            ``"multimask"`` masks 1..M-1 (``MaskDecoder(multimask_output=True)``);
            ``"single"``    mask 0 (``multimask_output=False``);
            ``"best"``      per batch item the mask among 1..M-1 with the highest ``iou_pred``,
                            chosen before any pixel is computed (only that mask's logits are).
        backend: None/"auto", "triton", "cpu" or "reference" (see ``fmrt.kernels._triton``).

    All float tensors must share one dtype (float16, bfloat16, float32; float64 except on Triton)
    and device. The fused paths accumulate in float32 (float64 for float64 inputs).

    Returns:
        ``DecodedMasks(masks [B, M', 4h, 4w] in src's dtype, iou_pred [B, M'] or None,
        mask_index [B, M'] int64)``. Differentiable w.r.t. src, hyper_in and all six weights.
    """
    _check(src, hyper_in, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight, conv2_bias,
           iou_pred)
    backend = backend or "auto"
    resolve_backend(backend, src)                      # unknown names / missing Triton raise here
    hyper, iou_sel, index = _select(hyper_in, iou_pred, select)
    masks = torch.ops.fmrt.decode_masks(src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias,
                                        conv2_weight, conv2_bias, float(ln_eps), backend)
    return DecodedMasks(masks, iou_sel, index)


def decode_masks_reference(src: Tensor, hyper_in: Tensor, *, conv1_weight: Tensor,
                           conv1_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                           conv2_weight: Tensor, conv2_bias: Tensor, ln_eps: float = 1e-6,
                           iou_pred: Optional[Tensor] = None, select: str = "all") -> DecodedMasks:
    """Plain-torch reference of :func:`decode_masks` (same arguments and result): the unfused
    module path in the input dtype, computing all M masks and selecting afterwards, as
    segment-anything does. Use float64 inputs for a ground truth."""
    _check(src, hyper_in, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight, conv2_bias,
           iou_pred)
    _, iou_sel, index = _select(hyper_in, iou_pred, select)
    masks = _reference_core(src, hyper_in, conv1_weight, conv1_bias, ln_weight, ln_bias,
                            conv2_weight, conv2_bias, float(ln_eps))
    B, _, H, W = masks.shape
    masks = torch.gather(masks, 1, index.reshape(B, -1, 1, 1).expand(-1, -1, H, W))
    return DecodedMasks(masks, iou_sel, index)


def upscaling_params(output_upscaling: torch.nn.Module) -> Dict[str, object]:
    """The ``decode_masks`` weight kwargs of segment-anything's ``MaskDecoder.output_upscaling``
    (``Sequential(ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, GELU)``)::

        decode_masks(src, hyper_in, **upscaling_params(decoder.output_upscaling), ...)
    """
    mods = list(output_upscaling.children())
    ok = (len(mods) == 5 and all(isinstance(mods[i], torch.nn.ConvTranspose2d) for i in (0, 3))
          and all(isinstance(mods[i], torch.nn.GELU) and mods[i].approximate == "none" for i in (2, 4)))
    if ok:
        for conv in (mods[0], mods[3]):
            ok = ok and tuple(conv.kernel_size) == (2, 2) and tuple(conv.stride) == (2, 2) and \
                tuple(conv.padding) == (0, 0) and tuple(conv.output_padding) == (0, 0) and \
                tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.bias is not None
    ln = mods[1] if len(mods) == 5 else None
    if not ok or not all(hasattr(ln, a) for a in ("weight", "bias", "eps")):
        raise ValueError("upscaling_params: expected SAM's output_upscaling = Sequential("
                         "ConvTranspose2d(k=2, s=2), LayerNorm2d, GELU, ConvTranspose2d(k=2, s=2), GELU)")
    return {"conv1_weight": mods[0].weight, "conv1_bias": mods[0].bias, "ln_weight": ln.weight,
            "ln_bias": ln.bias, "ln_eps": float(ln.eps), "conv2_weight": mods[3].weight,
            "conv2_bias": mods[3].bias}


# --------------------------------------------------------------------------- ONNX
def onnx_translation_table() -> Dict[object, object]:
    """``{torch.ops.fmrt.decode_masks.default: fn}`` for ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``: the op becomes ConvTranspose -> Transpose ->
    LayerNormalization -> Erf-GELU -> Transpose -> ConvTranspose -> Erf-GELU -> MatMul (opset >= 17).
    The selection in :func:`decode_masks` is standard torch (ArgMax/Gather) and exports as is."""
    from onnxscript import opset18 as op

    def _gelu(x):
        half = op.CastLike(0.5, x)
        one = op.CastLike(1.0, x)
        inv_sqrt2 = op.CastLike(1.0 / math.sqrt(2.0), x)
        return op.Mul(op.Mul(half, x), op.Add(one, op.Erf(op.Mul(x, inv_sqrt2))))

    def decode_masks_onnx(src, hyper, conv1_weight, conv1_bias, ln_weight, ln_bias, conv2_weight,
                          conv2_bias, ln_eps: float = 1e-6, backend: str = "auto"):
        y = op.ConvTranspose(src, conv1_weight, conv1_bias, kernel_shape=[2, 2], strides=[2, 2])
        y = op.Transpose(y, perm=[0, 2, 3, 1])                           # NHWC: LN over channels
        ln = op.LayerNormalization(y, ln_weight, ln_bias, axis=-1, epsilon=ln_eps)
        y = _gelu(ln[0] if isinstance(ln, (tuple, list)) else ln)       # (Y, Mean, InvStdDev)
        y = op.Transpose(y, perm=[0, 3, 1, 2])
        y = op.ConvTranspose(y, conv2_weight, conv2_bias, kernel_shape=[2, 2], strides=[2, 2])
        y = _gelu(op.Transpose(y, perm=[0, 2, 3, 1]))                    # [B, H, W, C2]
        hyp = op.Transpose(op.Unsqueeze(hyper, [1]), perm=[0, 1, 3, 2])  # [B, 1, C2, M]
        return op.Transpose(op.MatMul(y, hyp), perm=[0, 3, 1, 2])        # [B, M, H, W]

    return {torch.ops.fmrt.decode_masks.default: decode_masks_onnx}
