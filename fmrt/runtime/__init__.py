"""One facade per family over every backend (torch, onnxruntime, tensorrt).

``load(name_or_path, backend)`` reads the model directory's family and returns that family's
facade (for CLIP: ``ClipRuntime``) driving the chosen backend's engine.
"""
from __future__ import annotations

import os

from fmrt.runtime.base import BACKENDS, BackendUnavailableError, RuntimeLoadError
from fmrt.runtime.clip import ClipRuntime
from fmrt.runtime.index import RetrievalIndex


def load(name_or_path: str, backend: str = "torch", **kwargs):
    """Load a bundled model name or model directory behind its family's facade (SAM: also a
    segment-anything checkpoint file, or ``load("sam_vit_b", checkpoint=path)``)."""
    from fmrt import pretrained

    if backend not in BACKENDS:
        raise RuntimeLoadError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if os.path.isfile(os.fspath(name_or_path)) or "checkpoint" in kwargs:
        # a segment-anything checkpoint file, or load("sam_vit_b", checkpoint=path)
        from fmrt.runtime.sam import SamPredictor

        return SamPredictor.load(name_or_path, backend=backend, **kwargs)
    try:
        cfg = pretrained.read_config(name_or_path)
    except pretrained.PretrainedError as e:
        raise RuntimeLoadError(str(e)) from None
    family = cfg.get("family") or ("llava" if cfg.get("model_type") == "llava" else None)
    if family in ("llava", "flamingo"):
        from fmrt.runtime.vlm import VlmModel

        return VlmModel.load(name_or_path, backend=backend, **kwargs)
    if family in ("clip", "coca"):
        return ClipRuntime.load(name_or_path, backend=backend, **kwargs)
    if family == "sam":
        from fmrt.runtime.sam import SamPredictor

        return SamPredictor.load(name_or_path, backend=backend, **kwargs)
    raise RuntimeLoadError(f"no runtime facade for family {family!r} yet")


__all__ = ["load", "ClipRuntime", "RetrievalIndex", "BACKENDS", "BackendUnavailableError",
           "RuntimeLoadError"]
