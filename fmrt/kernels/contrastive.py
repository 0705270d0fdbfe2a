"""Fused contrastive loss (CLIP softmax, NegCLIP hard negatives, SigLIP sigmoid) and fused top-k
inner-product scoring, without ever materialising the B x B logits / Q x N score matrix.

Contrastive loss, ``kind="softmax"`` (open_clip ``ClipLoss`` at world size 1)::

    S = logit_scale * image @ text.T                        # [B, B], never stored
    loss = (CE(S, arange(B)) + CE(S.T, arange(B))) / 2
         = (sum_i lse_j S_ij + sum_j lse_i S_ij - 2 sum_i S_ii) / (2B)

The forward walks S in tiles: an online log-sum-exp per row, and per row block a partial
(max, sum) per column, merged into the column log-sum-exp. It saves only the row and column LSE
(2B floats). The backward recomputes every tile once and forms
``dS = (softmax_rows(S) + softmax_cols(S) - 2I) / (2B)`` tile by tile, accumulating
``d_image = scale * dS @ text`` and ``d_text = scale * dS.T @ image``; ``d_scale =
sum(dS * image @ text.T) = sum(image * (dS @ text))``, an O(B*D) reduction of the unscaled
``d_image`` (no extra pass over the tiles). That is four B x B x D products in all (one forward,
three backward) against the naive autograd's three, but with a few cache-resident elementwise
passes instead of ~15 passes over a B x B matrix in memory, so it is faster already at B=8,192.

Hard negatives (NegCLIP, Yuksekgonul et al. 2023): ``hard_negative_features`` [M, D] are extra
*text* columns. As in NegCLIP's training code (``logits_per_text = logits_per_image.t()[:B]``)
they enter only the image->text cross-entropy (each image's softmax runs over B + M texts); the
text->image cross-entropy runs over the B real texts only (each text's softmax over the B
images). Both are still averaged over B and the two halves averaged.

``kind="sigmoid"`` (SigLIP, open_clip ``SigLipLoss`` / big_vision normalisation)::

    L = logit_scale * image @ text.T + logit_bias           # [B, B (+M)]
    loss = -sum_ij log_sigmoid(z_ij * L_ij) / B             # z = +1 on the diagonal, -1 elsewhere
         = (sum_ij softplus(L_ij) - sum_i L_ii) / B

Hard negatives in the sigmoid form are extra columns with z = -1. Gradients flow to both
features, the scale and the bias.

Layers (conventions in ``fmrt.kernels``):
  * :func:`contrastive_loss` / :func:`topk_scores` - public entry points (checks, backend choice).
  * ``torch.ops.fmrt.contrastive_loss`` -> ``(loss, row_lse [B], col_lse [B])`` (the LSEs are
    what the backward saves; empty for the sigmoid form), autograd through
    ``torch.ops.fmrt.contrastive_loss_backward``; ``torch.ops.fmrt.topk_scores``.
  * backends: "triton" (``contrastive_triton``), "cpu" (blocked torch, any device; top-k uses
    the native ``fmrt._C`` kernel), "reference" (materialises everything; float64-checkable).
  * :func:`onnx_translation_table` - decompositions into MatMul / ReduceLogSumExp / Softplus /
    TopK for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fmrt.kernels._triton import resolve_backend

__all__ = ["KINDS", "contrastive_loss", "contrastive_loss_reference", "topk_scores",
           "topk_scores_reference", "onnx_translation_table"]

KINDS = ("softmax", "sigmoid")

# Tile of the blocked CPU path: TILE_ROWS image rows x TILE_COLS text columns; two fp32 tile
# buffers = 64 MiB, far inside the 1.5 GB budget at any B. Bigger tiles mean fewer, larger GEMM
# calls, which matters most when the cores are shared (each MKL call ends in a thread barrier).
# One backward-like step (tile product + G@Y + G.T@X + exp) over an 8192 x 8192 x 512 problem on
# the 2-core AVX-512 CI box under load ~8, best of 3 (GFLOP/s of the three products):
#   512x1024 22 | 1024x1024 34 | 1024x2048 41 | 2048x2048 49 | 2048x4096 60 | 4096x4096 64.
# 2048 x 4096 gets most of the gain at half the memory of 4096 x 4096.
TILE_ROWS = 2048
TILE_COLS = 4096

# Column partial sums below exp(-60) may have lost terms to float32 underflow (the shared shift
# of a tile is the tile's largest logit, not the column's); such columns are recomputed exactly.
# Above it, everything dropped is < B * exp(-87) relative to >= exp(-60): below 1e-9 relative.
_UNDERFLOW_GUARD = math.exp(-60.0)
# softplus threshold: above it softplus(x) == x to within exp(-40) ~ 4e-18 (float64-exact).
_SOFTPLUS_THRESHOLD = 40.0


# --------------------------------------------------------------------------- checks
def _check_matrix(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(t.shape)}")


def _check_inputs(image, text, logit_scale, hard, kind, bias) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_matrix(image, "image_features")
    _check_matrix(text, "text_features")
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"batch mismatch: image_features has B={image.shape[0]} rows but "
                         f"text_features has {text.shape[0]}")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"dimension mismatch: image_features have D={image.shape[1]} but "
                         f"text_features have D={text.shape[1]}")
    if image.shape[0] == 0:
        raise ValueError("contrastive_loss needs at least one pair (B >= 1)")
    if hard is not None:
        _check_matrix(hard, "hard_negative_features")
        if hard.shape[1] != image.shape[1]:
            raise ValueError(f"dimension mismatch: hard_negative_features have D={hard.shape[1]} "
                             f"but image_features have D={image.shape[1]}")
    for name, t in (("logit_scale", logit_scale), ("logit_bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a 0-dim torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
        if t.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    if bias is not None and kind != "sigmoid":
        raise ValueError("logit_bias is only used by kind='sigmoid'")
    devs = {t.device for t in (image, text, logit_scale, hard, bias) if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")


def _compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) \
        else torch.float32


def _loss_dtype(image: Tensor, text: Tensor) -> torch.dtype:
    # open_clip computes the loss in the logits' dtype: that of the features (a 0-dim fp32 scale
    # does not promote bf16 features).
    return torch.promote_types(image.dtype, text.dtype)


# --------------------------------------------------------------------------- reference
def contrastive_loss_reference(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                               *, hard_negative_features: Optional[Tensor] = None,
                               kind: str = "softmax", logit_bias: Optional[Tensor] = None) -> Tensor:
    """Plain-torch formulation (materialises the [B, B (+M)] logits). Same arguments as
    :func:`contrastive_loss`; differentiable by ordinary autograd; exact in float64."""
    _check_inputs(image_features, text_features, logit_scale, hard_negative_features, kind,
                  logit_bias)
    B = image_features.shape[0]
    cols = text_features if hard_negative_features is None else \
        torch.cat([text_features, hard_negative_features.to(text_features.dtype)])
    logits_per_image = logit_scale * image_features @ cols.T
    if kind == "softmax":
        # open_clip ClipLoss.get_logits / forward (world size 1), NegCLIP's [:B] for the texts
        logits_per_text = logit_scale * text_features @ image_features.T
        labels = torch.arange(B, device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels)
                + F.cross_entropy(logits_per_text, labels)) / 2
    # open_clip SigLipLoss._loss: labels 2*eye - 1, -logsigmoid(labels * logits).sum() / B
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    labels = -torch.ones_like(logits_per_image)
    labels[:, :B] += 2 * torch.eye(B, device=labels.device, dtype=labels.dtype)
    return -F.logsigmoid(labels * logits_per_image).sum() / B


# --------------------------------------------------------------------------- blocked CPU path
def _segments(text: Tensor, hard: Optional[Tensor]):
    """Column segments: (tensor, is_text). Hard negatives are walked as their own segment so
    they are never concatenated (no [B + M, D] copy)."""
    segs = [(text, True)]
    if hard is not None and hard.shape[0] > 0:
        segs.append((hard, False))
    return segs


def _cpu_forward(x: Tensor, y: Tensor, h: Optional[Tensor], scale: Tensor, bias: Optional[Tensor],
                 kind: str) -> Tuple[Tensor, Tensor, Tensor]:
    cdt = _compute_dtype(x, y, h, scale, bias)
    x, y = x.to(cdt), y.to(cdt)  # no-ops for fp32/fp64; half inputs get one fp32 copy
    h = h.to(cdt) if h is not None else None
    B = x.shape[0]
    s = scale.to(cdt)
    b = bias.to(cdt) if bias is not None else torch.zeros((), dtype=cdt, device=x.device)
    bm, bn = TILE_ROWS, TILE_COLS
    buf = torch.empty(min(bm, B), max(min(bn, B), min(bn, h.shape[0] if h is not None else 0)),
                      dtype=cdt, device=x.device)
    diag_sum = torch.zeros((), dtype=cdt, device=x.device)
    if kind == "sigmoid":
        total = torch.zeros((), dtype=cdt, device=x.device)
        for i0 in range(0, B, bm):
            i1 = min(i0 + bm, B)
            xs = x[i0:i1] * s
            for seg, is_text in _segments(y, h):
                for j0 in range(0, seg.shape[0], bn):
                    j1 = min(j0 + bn, seg.shape[0])
                    t = torch.mm(xs, seg[j0:j1].T, out=buf[: i1 - i0, : j1 - j0])
                    t.add_(b)
                    if is_text:
                        diag_sum += t.diagonal(i0 - j0).sum()
                    total += F.softplus(t, threshold=_SOFTPLUS_THRESHOLD).sum()
        return (total - diag_sum) / B, x.new_empty(0), x.new_empty(0)

    row_lse = torch.empty(B, dtype=cdt, device=x.device)
    diag = torch.empty(B, dtype=cdt, device=x.device)
    col_max = torch.full((B,), -math.inf, dtype=cdt, device=x.device)
    col_sum = torch.zeros(B, dtype=cdt, device=x.device)
    for i0 in range(0, B, bm):
        i1 = min(i0 + bm, B)
        xs = x[i0:i1] * s
        r_max = torch.full((i1 - i0,), -math.inf, dtype=cdt, device=x.device)
        r_sum = torch.zeros(i1 - i0, dtype=cdt, device=x.device)
        for seg, is_text in _segments(y, h):
            for j0 in range(0, seg.shape[0], bn):
                j1 = min(j0 + bn, seg.shape[0])
                t = torch.mm(xs, seg[j0:j1].T, out=buf[: i1 - i0, : j1 - j0])
                if is_text:
                    d = t.diagonal(i0 - j0)
                    g0 = max(i0, j0)
                    diag[g0:g0 + d.shape[0]] = d
                m = t.amax(1)
                t.sub_(m[:, None]).exp_()                    # exp(S_ij - m_i), one exp per element
                new_max = torch.maximum(r_max, m)
                r_sum = r_sum * torch.exp(r_max - new_max) + t.sum(1) * torch.exp(m - new_max)
                r_max = new_max
                if not is_text:
                    continue
                # Column partials with the tile's largest logit mt as the shared shift:
                # sum_i exp(S_ij - mt) = sum_i exp(m_i - mt) * exp(S_ij - m_i), a matrix-vector
                # product instead of a second max + exp pass over the tile.
                mt = m.max()
                part = torch.mv(t.T, torch.exp(m - mt))
                pmax = mt.expand(j1 - j0).clone()
                low = part < _UNDERFLOW_GUARD
                if bool(low.any()):                          # rare: recompute those columns
                    idx = low.nonzero()[:, 0]
                    exact = xs @ seg[j0 + idx].T
                    emax = exact.amax(0)
                    pmax[idx] = emax
                    part[idx] = torch.exp(exact - emax).sum(0)
                cm = col_max[j0:j1]
                new_cm = torch.maximum(cm, pmax)
                col_sum[j0:j1] = col_sum[j0:j1] * torch.exp(cm - new_cm) + part * torch.exp(pmax - new_cm)
                col_max[j0:j1] = new_cm
        row_lse[i0:i1] = r_max + torch.log(r_sum)
    col_lse = col_max + torch.log(col_sum)
    # sum of per-row (lse - S_ii): each term is >= 0 and small when the model is good, so this
    # avoids the cancellation of sum(lse) - sum(diag) (both ~B * scale)
    loss = ((row_lse - diag).sum() + (col_lse - diag).sum()) / (2 * B)
    return loss, row_lse, col_lse


def _cpu_backward(grad: Tensor, x: Tensor, y: Tensor, h: Optional[Tensor], scale: Tensor,
                  bias: Optional[Tensor], row_lse: Tensor, col_lse: Tensor, kind: str):
    """Unscaled dS tiles G (softmax: P_row + P_col - 2I; sigmoid: sigmoid(L) - I), then
    dX = c * G @ [Y; H], dY = c * G[:, :B].T @ X, dH = c * G[:, B:].T @ X with
    c = grad * scale / (2B) (softmax) or grad * scale / B (sigmoid)."""
    cdt = _compute_dtype(x, y, h, scale, bias)
    xd, yd, hd = x.dtype, y.dtype, (h.dtype if h is not None else None)
    x, y = x.to(cdt), y.to(cdt)
    h = h.to(cdt) if h is not None else None
    B = x.shape[0]
    s = scale.to(cdt)
    b = bias.to(cdt) if bias is not None else torch.zeros((), dtype=cdt, device=x.device)
    bm, bn = TILE_ROWS, TILE_COLS
    nh = h.shape[0] if h is not None else 0
    dx = torch.zeros_like(x)
    dy = torch.zeros_like(y)
    dh = torch.zeros_like(h) if h is not None else None
    grads = {True: dy, False: dh}
    cols_w = max(min(bn, B), min(bn, nh))
    buf = torch.empty(min(bm, B), cols_w, dtype=cdt, device=x.device)
    buf2 = torch.empty(min(bm, B), cols_w, dtype=cdt, device=x.device)
    ds = torch.zeros((), dtype=cdt, device=x.device)
    gsum = torch.zeros((), dtype=cdt, device=x.device)
    for i0 in range(0, B, bm):
        i1 = min(i0 + bm, B)
        xi = x[i0:i1]
        xs = xi * s
        acc = dx[i0:i1]
        lr = row_lse[i0:i1, None] if kind == "softmax" else None
        for seg, is_text in _segments(y, h):
            dseg = grads[is_text]
            for j0 in range(0, seg.shape[0], bn):
                j1 = min(j0 + bn, seg.shape[0])
                t = torch.mm(xs, seg[j0:j1].T, out=buf[: i1 - i0, : j1 - j0])
                if kind == "softmax":
                    g = torch.sub(t, lr, out=buf2[: i1 - i0, : j1 - j0]).exp_()   # P_row
                    if is_text:
                        g.add_(t.sub_(col_lse[None, j0:j1]).exp_())            # + P_col
                        g.diagonal(i0 - j0).sub_(2.0)
                else:
                    g = t.add_(b).sigmoid_()
                    if is_text:
                        g.diagonal(i0 - j0).sub_(1.0)
                    gsum += g.sum()
                acc.addmm_(g, seg[j0:j1])
                dseg[j0:j1].addmm_(g.T, xi)
        ds += torch.vdot(xi.reshape(-1), acc.reshape(-1))     # sum(X * G@Y) = sum(G * XY^T)
    norm = (2 * B) if kind == "softmax" else B
    g0 = grad.to(cdt) / norm
    c = g0 * s
    dx.mul_(c)
    dy.mul_(c)
    if dh is not None:
        dh.mul_(c)
    d_scale = (g0 * ds).to(scale.dtype)
    d_bias = (g0 * gsum).to(bias.dtype) if bias is not None else None
    return (dx.to(xd), dy.to(yd), dh.to(hd) if dh is not None else None, d_scale, d_bias)


# --------------------------------------------------------------------------- custom ops
def _empty_like_none(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


@torch.library.custom_op("fmrt::contrastive_loss", mutates_args=())
def _contrastive_loss_op(image: Tensor, text: Tensor, logit_scale: Tensor,
                         hard_negatives: Optional[Tensor], logit_bias: Optional[Tensor],
                         kind: str, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fmrt.kernels import contrastive_triton as kt

        loss, row_lse, col_lse = kt.contrastive_forward(image, text, logit_scale, hard_negatives,
                                                        logit_bias, kind)
    else:
        loss, row_lse, col_lse = _cpu_forward(image, text, hard_negatives, logit_scale, logit_bias,
                                              kind)
    return loss.to(_loss_dtype(image, text)), row_lse, col_lse


@_contrastive_loss_op.register_fake
def _(image, text, logit_scale, hard_negatives, logit_bias, kind, backend):
    cdt = _compute_dtype(image, text, hard_negatives, logit_scale, logit_bias)
    if backend == "triton":
        cdt = torch.float32
    n = image.shape[0] if kind == "softmax" else 0
    loss = image.new_empty((), dtype=_loss_dtype(image, text))
    return loss, image.new_empty(n, dtype=cdt), image.new_empty(n, dtype=cdt)


@torch.library.custom_op("fmrt::contrastive_loss_backward", mutates_args=())
def _contrastive_loss_backward_op(grad: Tensor, image: Tensor, text: Tensor, logit_scale: Tensor,
                                  hard_negatives: Optional[Tensor], logit_bias: Optional[Tensor],
                                  row_lse: Tensor, col_lse: Tensor, kind: str, backend: str
                                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fmrt.kernels import contrastive_triton as kt

        dx, dy, dh, ds, db = kt.contrastive_backward(grad, image, text, logit_scale, hard_negatives,
                                                     logit_bias, row_lse, col_lse, kind)
    else:
        dx, dy, dh, ds, db = _cpu_backward(grad, image, text, hard_negatives, logit_scale,
                                           logit_bias, row_lse, col_lse, kind)
    # custom ops cannot return None: absent inputs get empty gradients
    return (dx, dy, dh if dh is not None else _empty_like_none(image), ds,
            db if db is not None else _empty_like_none(logit_scale))


@_contrastive_loss_backward_op.register_fake
def _(grad, image, text, logit_scale, hard_negatives, logit_bias, row_lse, col_lse, kind, backend):
    dh = torch.empty_like(hard_negatives) if hard_negatives is not None else image.new_empty(0)
    db = torch.empty_like(logit_bias) if logit_bias is not None else logit_scale.new_empty(0)
    return (torch.empty_like(image), torch.empty_like(text), dh, torch.empty_like(logit_scale), db)


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, hard, bias, kind, backend = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(image, text, logit_scale, hard, bias, row_lse, col_lse)
    ctx.kind, ctx.backend = kind, backend
    ctx.mark_non_differentiable(row_lse, col_lse)


def _backward(ctx, grad, _g_row, _g_col):
    image, text, logit_scale, hard, bias, row_lse, col_lse = ctx.saved_tensors
    dx, dy, dh, ds, db = torch.ops.fmrt.contrastive_loss_backward(
        grad, image, text, logit_scale, hard, bias, row_lse, col_lse, ctx.kind, ctx.backend)
    return (dx, dy, ds, dh if hard is not None else None, db if bias is not None else None,
            None, None)


_contrastive_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                     hard_negative_features: Optional[Tensor] = None, kind: str = "softmax",
                     logit_bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """CLIP / NegCLIP / SigLIP contrastive loss without the B x B logits.

    Args:
        image_features: ``[B, D]`` float (fp32/fp16/bf16/fp64), L2-normalised by the caller.
        text_features: ``[B, D]``, same D; row i is the positive of image i.
        logit_scale: 0-dim float tensor, the already-exponentiated scale (CLIP: ``exp(t)``).
        hard_negative_features: optional ``[M, D]`` extra negative texts (NegCLIP). They join the
            image->text softmax (over B + M columns) only; the text->image softmax runs over the
            B images as in NegCLIP. With ``kind="sigmoid"`` they are extra z = -1 columns.
        kind: ``"softmax"`` (open_clip ``ClipLoss``, world size 1) or ``"sigmoid"`` (SigLIP:
            ``-sum_ij log_sigmoid(z_ij * (scale * <x_i, y_j> + bias)) / B``).
        logit_bias: 0-dim tensor, SigLIP's bias (``kind="sigmoid"`` only; None means 0).
        backend: ``None``/"auto", "triton", "cpu" or "reference" (see ``fmrt.kernels``).

    Returns:
        0-dim loss in the features' dtype (accumulated in fp32, or fp64 for fp64 inputs), with
        gradients for the features, the scale and the bias.
    """
    _check_inputs(image_features, text_features, logit_scale, hard_negative_features, kind,
                  logit_bias)
    be = resolve_backend(backend, image_features, text_features)
    if be == "reference":
        return contrastive_loss_reference(image_features, text_features, logit_scale,
                                          hard_negative_features=hard_negative_features, kind=kind,
                                          logit_bias=logit_bias)
    loss, _, _ = torch.ops.fmrt.contrastive_loss(image_features, text_features, logit_scale,
                                                 hard_negative_features, logit_bias, kind, be)
    return loss


# --------------------------------------------------------------------------- top-k
def _check_topk(queries, gallery, k) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    for name, t in (("queries", queries), ("gallery", gallery)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be 1-D [D] or 2-D [Q, D], got shape {tuple(queries.shape)}")
    if gallery.dim() != 2:
        raise ValueError(f"gallery must be 2-D [N, D], got shape {tuple(gallery.shape)}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"dimension mismatch: queries have D={queries.shape[1]} but gallery has "
                         f"D={gallery.shape[1]}")
    if queries.device != gallery.device:
        raise ValueError(f"queries on {queries.device} but gallery on {gallery.device}")


def _sorted_merge(vals: Tensor, idx: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k of candidate (value, index) pairs: descending value, ties by ascending index, NaN
    first (a stable descending sort ranks NaN above every number)."""
    idx, order = torch.sort(idx, dim=1)
    vals = vals.gather(1, order)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals[:, :k].contiguous(), idx.gather(1, order[:, :k])


def _topk_chunked_torch(q: Tensor, g: Tensor, k: int, chunk: int = 1 << 16) -> Tuple[Tensor, Tensor]:
    """Blockwise scores + exact merge on any device (never more than [Q, chunk] scores)."""
    Q, N = q.shape[0], g.shape[0]
    k = min(k, N)
    best_v = q.new_empty((Q, 0), dtype=torch.float32)
    best_i = torch.empty((Q, 0), dtype=torch.int64, device=q.device)
    qf = q.float()
    for n0 in range(0, N, chunk):
        sc = qf @ g[n0:n0 + chunk].float().T
        kk = min(k, sc.shape[1])
        v, i = _sorted_merge(sc, torch.arange(n0, n0 + sc.shape[1], device=q.device).expand(Q, -1),
                             kk)
        best_v, best_i = _sorted_merge(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k)
    return best_v, best_i


@torch.library.custom_op("fmrt::topk_scores", mutates_args=())
def _topk_scores_op(queries: Tensor, gallery: Tensor, k: int, backend: str
                    ) -> Tuple[Tensor, Tensor]:
    if queries.shape[0] == 0 or gallery.shape[0] == 0:
        kk = min(k, gallery.shape[0])
        return (queries.new_zeros((queries.shape[0], kk), dtype=torch.float32),
                torch.zeros((queries.shape[0], kk), dtype=torch.int64, device=queries.device))
    if backend == "triton":
        from fmrt.kernels import contrastive_triton as kt

        return kt.topk_scores(queries, gallery, k)
    if backend == "reference":
        return topk_scores_reference(queries, gallery, k)
    if queries.device.type != "cpu":
        return _topk_chunked_torch(queries, gallery, k)
    from fmrt import _native

    s, i = _native.topk_inner_product(queries, gallery, k)
    return torch.from_numpy(s), torch.from_numpy(i)


@_topk_scores_op.register_fake
def _(queries, gallery, k, backend):
    kk = min(k, gallery.shape[0])
    return (queries.new_empty((queries.shape[0], kk), dtype=torch.float32),
            queries.new_empty((queries.shape[0], kk), dtype=torch.int64))


def topk_scores_reference(queries: Tensor, gallery: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Full [Q, N] float32 scores + exact sorted selection (descending, ties by lower index)."""
    sc = queries.float() @ gallery.float().T
    kk = min(k, gallery.shape[0])
    idx = torch.arange(gallery.shape[0], device=sc.device).expand(sc.shape[0], -1)
    return _sorted_merge(sc, idx, kk)


def topk_scores(queries: Tensor, gallery: Tensor, k: int, *, backend: Optional[str] = None
                ) -> Tuple[Tensor, Tensor]:
    """Top-``k`` gallery rows by inner product, without the [Q, N] score matrix.

    Args:
        queries: ``[Q, D]`` (or ``[D]``) float tensor; scores are computed in fp32.
        gallery: ``[N, D]`` float tensor (fp16 galleries are read as fp16, converted per block).
        k: results per query (> 0), clamped to N.
        backend: None/"auto", "triton", "cpu" (native ``fmrt._C``) or "reference".

    Returns:
        ``(scores float32 [Q, k'], indices int64 [Q, k'])``, ``k' = min(k, N)``, sorted by
        descending score, ties by ascending index, NaN first; 1-D queries give 1-D results.
        Not differentiable.
    """
    squeeze = isinstance(queries, Tensor) and queries.dim() == 1
    if squeeze:
        queries = queries[None]
    _check_topk(queries, gallery, k)
    be = resolve_backend(backend, queries, gallery)
    s, i = torch.ops.fmrt.topk_scores(queries, gallery, k, be)
    return (s[0], i[0]) if squeeze else (s, i)


# --------------------------------------------------------------------------- ONNX
def onnx_translation_table() -> Dict[object, object]:
    """Translations for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

    ``fmrt::contrastive_loss`` becomes MatMul -> ReduceLogSumExp (rows and columns) ->
    ReduceSum (softmax) or MatMul -> Softplus -> ReduceSum (sigmoid); it materialises the logits,
    which is what an inference graph of the loss can do (forward only). ``fmrt::topk_scores``
    becomes MatMul -> TopK (ONNX TopK orders equal values by lower index, as we do)."""
    from onnxscript import opset18 as op

    def contrastive_loss_onnx(image, text, logit_scale, hard_negatives=None, logit_bias=None,
                              kind: str = "softmax", backend: str = "auto"):
        xf = op.Cast(image, to=1)                       # FLOAT: fp32 accumulation, as the kernels
        yf = op.Cast(text, to=1)
        sc = op.Cast(logit_scale, to=1)
        logits = op.Mul(op.MatMul(xf, op.Transpose(yf, perm=[1, 0])), sc)          # [B, B]
        diag = op.Mul(op.ReduceSum(op.Mul(xf, yf), [1], keepdims=0), sc)            # [B]
        bsz = op.Cast(op.Shape(image, start=0, end=1), to=1)                        # [1]
        if hard_negatives is not None:
            neg = op.Mul(op.MatMul(xf, op.Transpose(op.Cast(hard_negatives, to=1), perm=[1, 0])), sc)
        if kind == "softmax":
            rows = logits if hard_negatives is None else op.Concat(logits, neg, axis=1)
            row_lse = op.ReduceLogSumExp(rows, [1], keepdims=0)
            col_lse = op.ReduceLogSumExp(logits, [0], keepdims=0)
            total = op.Sub(op.Add(op.ReduceSum(row_lse, keepdims=0), op.ReduceSum(col_lse, keepdims=0)),
                           op.Mul(op.Constant(value_float=2.0), op.ReduceSum(diag, keepdims=0)))
            loss = op.Div(total, op.Mul(op.Constant(value_float=2.0), op.Squeeze(bsz, [0])))
        else:
            bias = op.Cast(logit_bias, to=1) if logit_bias is not None else op.Constant(value_float=0.0)
            total = op.ReduceSum(op.Softplus(op.Add(logits, bias)), keepdims=0)
            if hard_negatives is not None:
                total = op.Add(total, op.ReduceSum(op.Softplus(op.Add(neg, bias)), keepdims=0))
            total = op.Sub(total, op.ReduceSum(op.Add(diag, bias), keepdims=0))
            loss = op.Div(total, op.Squeeze(bsz, [0]))
            row_lse = op.ConstantOfShape(op.Constant(value_ints=[0]))
            col_lse = row_lse
        return op.CastLike(loss, image), row_lse, col_lse

    def topk_scores_onnx(queries, gallery, k: int, backend: str = "auto"):
        sc = op.MatMul(op.Cast(queries, to=1), op.Transpose(op.Cast(gallery, to=1), perm=[1, 0]))
        n = op.Shape(gallery, start=0, end=1)
        kk = op.Min(op.Constant(value_ints=[k]), n)
        vals, idx = op.TopK(sc, kk, axis=1, largest=1, sorted=1)
        return vals, idx

    return {torch.ops.fmrt.contrastive_loss.default: contrastive_loss_onnx,
            torch.ops.fmrt.topk_scores.default: topk_scores_onnx}
