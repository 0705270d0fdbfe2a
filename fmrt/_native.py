"""Native kernels (``fmrt._C``) with pure torch/numpy fallbacks.

fmrt must import and work without the compiled extension: every entry point here checks
:func:`available` and otherwise runs an equivalent (slower) implementation. Setting the
environment variable ``FMRT_DISABLE_NATIVE=1`` forces the fallbacks (checked per call).

Top-k contract (native and fallback alike): results are sorted by descending score, ties
broken by the lower gallery index, NaN scores rank above every number (as in ``torch.topk``),
``k`` larger than the gallery is clamped to ``N``.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import numpy as np

try:  # the extension is optional: source checkouts and CPU-only wheels may lack it
    from fmrt import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _C = None

__all__ = [
    "available",
    "build_info",
    "topk_inner_product",
    "topk_inner_product_fallback",
]

# Fallback: gallery rows per matmul block, so the [Q, block] score matrix stays ~64 MiB.
_FALLBACK_SCORE_BUDGET = 16 * 1024 * 1024  # floats


def _disabled() -> bool:
    return os.environ.get("FMRT_DISABLE_NATIVE", "").strip().lower() in {"1", "true", "yes", "on"}


def available() -> bool:
    """True when the compiled extension is importable and not disabled via FMRT_DISABLE_NATIVE."""
    return _C is not None and not _disabled()


def build_info() -> dict:
    """Build details of the extension (empty when it is not available)."""
    return dict(_C.build_info()) if available() else {}


# --------------------------------------------------------------------------- validation
def _to_numpy(x: Any, name: str) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of fmrt
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        x = x.cpu().numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - report as a type problem
            raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}") from e
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x


def _prepare(queries: Any, gallery: Any, k: Any) -> Tuple[np.ndarray, np.ndarray, int, bool]:
    """Validate inputs; returns C-contiguous float32 queries [Q, D], float32/float16 gallery
    [N, D], k, and whether the query was 1-D."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    q = _to_numpy(queries, "queries")
    g = _to_numpy(gallery, "gallery")
    if q.dtype.kind != "f":
        raise TypeError(f"queries must be floating point, got dtype {q.dtype}")
    if g.dtype.kind != "f":
        raise TypeError(f"gallery must be floating point, got dtype {g.dtype}")
    squeeze = q.ndim == 1
    if squeeze:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"queries must be 1-D [D] or 2-D [Q, D], got shape {tuple(q.shape)}")
    if g.ndim != 2:
        raise ValueError(f"gallery must be 2-D [N, D], got shape {tuple(g.shape)}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries have D={q.shape[1]} but gallery has D={g.shape[1]}"
        )
    q = np.ascontiguousarray(q, dtype=np.float32)
    # fp16 galleries stay fp16 (converted block by block); anything else becomes float32.
    g = np.ascontiguousarray(g, dtype=np.float16 if g.dtype == np.float16 else np.float32)
    return q, g, k, squeeze


# --------------------------------------------------------------------------- top-k
def topk_inner_product(
    queries: Any, gallery: Any, k: int, *, num_threads: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows by inner product with each query.

    Args:
        queries: ``[Q, D]`` (or ``[D]``) floating array/tensor; computed in float32.
        gallery: ``[N, D]`` float32 or float16 array/tensor (other float dtypes are cast to
            float32). fp16 galleries are converted block by block, never as a whole.
        k: number of results per query, ``> 0``; clamped to ``N``.
        num_threads: native thread count (``None``: OpenMP default); ignored by the fallback.

    Returns:
        ``(scores float32 [Q, k'], indices int64 [Q, k'])`` with ``k' = min(k, N)``, sorted by
        descending score, ties by ascending index; 1-D queries give 1-D results.
    """
    q, g, k, squeeze = _prepare(queries, gallery, k)
    if available():
        scores, indices = _C.topk_ip(q, g, k, num_threads=int(num_threads or 0))
    else:
        scores, indices = _topk_fallback(q, g, k)
    if squeeze:
        return scores[0], indices[0]
    return scores, indices


def topk_inner_product_fallback(queries: Any, gallery: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The pure torch implementation used when ``fmrt._C`` is unavailable (same contract)."""
    q, g, k, squeeze = _prepare(queries, gallery, k)
    scores, indices = _topk_fallback(q, g, k)
    if squeeze:
        return scores[0], indices[0]
    return scores, indices


def _select_sorted(scores, k: int):
    """Exact top-k of a [Q, B] float32 tensor: (values, column indices), descending, ties by
    lower column. torch.topk alone does not define which of several equal values it keeps."""
    import torch

    Q, B = scores.shape
    kk = min(k, B)
    if bool(torch.isnan(scores).any()):  # rare: a stable sort ranks NaN first, ties by index
        vals, order = torch.sort(scores, dim=1, descending=True, stable=True)
        return vals[:, :kk], order[:, :kk]
    kth = torch.topk(scores, kk, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = scores > kth
    equal = scores == kth
    # all scores above the k-th value, then the lowest-index ones equal to it
    need = kk - above.sum(dim=1, keepdim=True)
    keep = above | (equal & (torch.cumsum(equal, dim=1) <= need))
    cols = keep.nonzero()[:, 1].view(Q, kk)  # row-major order: ascending column per row
    vals = scores.gather(1, cols)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, cols.gather(1, order)


def _topk_fallback(q: np.ndarray, g: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    import torch

    Q, N = q.shape[0], g.shape[0]
    k = min(k, N)
    if Q == 0 or N == 0:
        return np.zeros((Q, k), np.float32), np.zeros((Q, k), np.int64)
    tq = torch.from_numpy(q)
    block = max(1024, _FALLBACK_SCORE_BUDGET // max(Q, 1))
    best_v = best_i = None
    for n0 in range(0, N, block):
        gb = torch.from_numpy(g[n0 : n0 + block])
        if gb.dtype != torch.float32:
            gb = gb.float()  # fp32 accumulation, as in the native kernel
        vals, idx = _select_sorted(tq @ gb.T, k)
        idx = idx + n0
        if best_v is None:
            best_v, best_i = vals, idx
            continue
        # Merge: order candidates by index first so a stable sort by score breaks ties by index.
        cand_v = torch.cat([best_v, vals], dim=1)
        cand_i = torch.cat([best_i, idx], dim=1)
        cand_i, order = torch.sort(cand_i, dim=1)
        cand_v = cand_v.gather(1, order)
        cand_v, order = torch.sort(cand_v, dim=1, descending=True, stable=True)
        best_v, best_i = cand_v[:, :k], cand_i.gather(1, order[:, :k])
    return best_v.numpy().astype(np.float32, copy=False), best_i.numpy().astype(np.int64, copy=False)
