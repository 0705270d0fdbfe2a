"""Shared pytest configuration for the fmrt test suite."""
from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import pytest

# Exports and engines built by tests go to a throwaway cache, never the user's ~/.cache/fmrt.
os.environ.setdefault("FMRT_CACHE_DIR", tempfile.mkdtemp(prefix="fmrt-test-cache-"))

# Triton kernels run in the interpreter on CPU-only hosts. The flag is read when `@triton.jit`
# decorates a kernel, so it must be set before any fmrt.kernels module is imported.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cuda_available() -> bool:
    # The pinned torch is the CPU build, so also look for the device itself; tests that need
    # torch's CUDA support must still check torch.cuda.is_available() on their own.
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:  # noqa: BLE001 - a broken torch install just means "not via torch"
        pass
    try:
        from fmrt import _C

        if _C.has_cuda():
            return True
    except Exception:  # noqa: BLE001 - extension missing or built without CUDA
        pass
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def pytest_collection_modifyitems(config, items):
    # `gpu` tests (marker declared in pyproject.toml) are skipped, not failed, on CPU hosts.
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    """Deterministic numpy generator, fresh per test."""
    return np.random.default_rng(0)
