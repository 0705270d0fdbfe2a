"""fmrt: an optimized edge and serving runtime for multimodal foundation models."""
from __future__ import annotations

__version__ = "0.1.0"

from fmrt.registry import create_model, list_models  # noqa: E402


def load(name_or_path: str, backend: str = "torch", **kwargs):
    """Load a model behind the numpy-in/numpy-out facade of ``backend``.

    ``backend`` is one of ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``; every backend
    offers the same methods (for CLIP: ``encode_image``, ``encode_text``, ``classify``, ``index``).
    """
    from fmrt.runtime import load as _load

    return _load(name_or_path, backend=backend, **kwargs)


__all__ = ["__version__", "create_model", "list_models", "load"]
