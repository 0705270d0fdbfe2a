"""One attention function for every model; the backend is a flag, not a subclass.

Backends:
  * ``"sdpa"``  - ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPU, a fused C++ kernel on CPU). Default.
  * ``"math"``  - explicit softmax(QK^T/sqrt(d))V in the input dtype. Used as the float64
    reference in tests and where an exporter or backend lacks SDPA.

The global default can be changed with ``set_attention_backend`` (or the ``FMRT_ATTENTION``
environment variable); every call may override it with ``backend=``.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")
_default_backend = os.environ.get("FMRT_ATTENTION", "sdpa")
if _default_backend not in BACKENDS:
    raise ValueError(f"FMRT_ATTENTION={_default_backend!r}; expected one of {BACKENDS}")


def get_attention_backend() -> str:
    return _default_backend


def set_attention_backend(name: str) -> None:
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    _default_backend = name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    prev = get_attention_backend()
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(prev)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
              backend: Optional[str] = None) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q: ``B x H x Lq x Dh``; k, v: ``B x H x Lk x Dh`` (same dtype).
        attn_mask: additive float mask broadcastable to ``B x H x Lq x Lk`` (``-inf`` blocks) or a
            boolean mask where ``True`` means *attend*.
        is_causal: apply a causal mask, aligned bottom-right when ``Lq != Lk`` (query ``i``
            sees keys ``<= i + Lk - Lq``); combined with ``attn_mask`` when both are given.
        backend: ``"sdpa"`` or ``"math"``; None uses the global default.
    Returns:
        ``B x H x Lq x Dh`` in the dtype of ``q``.
    """
    backend = backend or _default_backend
    if backend == "sdpa":
        lq, lk = q.shape[-2], k.shape[-2]
        if is_causal and (lq != lk or attn_mask is not None):
            # SDPA's is_causal aligns the triangle top-left (wrong for Lq < Lk, e.g. queries for
            # the last positions against cached keys) and refuses an attn_mask next to it: pass
            # the bottom-right causal mask of the "math" backend explicitly instead.
            causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            if attn_mask is None or attn_mask.dtype == torch.bool:
                attn_mask = causal if attn_mask is None else attn_mask & causal
            else:
                block = torch.zeros(lq, lk, dtype=attn_mask.dtype, device=q.device)
                attn_mask = attn_mask + block.masked_fill(~causal, float("-inf"))
            is_causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    if backend != "math":
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(scores.softmax(dim=-1), v)
