"""Triton availability and backend selection shared by every fused op in ``fmrt.kernels``.

Every op exposes ``backend=`` with the same vocabulary:
  * ``"auto"``      - Triton on CUDA tensors (when Triton imports), the CPU path otherwise.
  * ``"triton"``    - force the Triton kernels. On CPU tensors this needs the interpreter
                      (``TRITON_INTERPRET=1`` set before the first ``@triton.jit`` runs, i.e.
                      before ``fmrt.kernels`` is imported); used by the tests.
  * ``"cpu"``       - the real CPU implementation (C++ in ``fmrt._C`` or blocked torch).
  * ``"reference"`` - the plain-torch formulation (materialises everything; float64-checkable).

Triton kernels are written for triton 3.6 (the GPU image) and 3.7.1 (torch 2.13's pin, used in CI
under the interpreter): no ``tl.make_block_ptr``, no bf16 ``tl.dot`` on CPU.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() in {"1", "true", "True", "on"}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return False
    return True


def resolve_backend(backend: Optional[str], *tensors: torch.Tensor) -> str:
    """Map ``backend`` (None == "auto") to one of ``"triton"``, ``"cpu"``, ``"reference"``."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        return "triton" if (on_cuda and triton_available()) else ("reference" if on_cuda else "cpu")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        if not on_cuda and not interpret_mode():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1, set before "
                               "fmrt.kernels is imported")
    return backend
