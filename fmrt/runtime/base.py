"""Backend engines: named numpy-in/numpy-out graphs, the same contract for every backend.

An engine runs one exported graph (e.g. CLIP's ``image_encoder``) given a dict of numpy inputs
keyed by the graph's input names and returns a dict keyed by its output names. The names and
shapes come from ``export.specs`` (defined once, shared by exporter and loaders).
"""
from __future__ import annotations

from typing import Dict, Protocol

import numpy as np

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class RuntimeLoadError(ValueError):
    """Unknown backend/model, or a model directory the backend cannot load."""


class BackendUnavailableError(RuntimeError):
    """The backend's library or hardware is missing (e.g. TensorRT without a GPU)."""


class Engine(Protocol):
    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        ...
