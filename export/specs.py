"""The one definition of every exported graph: file name, input/output names, dtypes, shapes
with their dynamic axes, and TensorRT optimisation-profile ranges. The exporter writes graphs
from these specs and every runtime loader feeds/reads tensors by these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple, Union

import numpy as np

Dim = Union[int, str]  # str = a named dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: Tuple[Dim, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def dynamic_axes(self) -> Dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    # (min, opt, max) of the batch axis for TensorRT profiles; ORT accepts any batch.
    batch_profile: Tuple[int, int, int] = (1, 8, 64)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def validate_inputs(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The feed dict every backend runs: each input present, cast to its dtype, contiguous,
        static dims and a common batch size checked (KeyError / ValueError otherwise)."""
        feed: Dict[str, np.ndarray] = {}
        batch = None
        for t in self.inputs:
            if t.name not in inputs:
                raise KeyError(f"{self.name}: missing input {t.name!r}; got {sorted(inputs)}")
            x = np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype)
            if x.ndim != len(t.shape) or any(not isinstance(s, str) and d != s
                                             for d, s in zip(x.shape, t.shape)):
                raise ValueError(f"{self.name}: {t.name} has shape {x.shape}, expected {t.shape}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"{self.name}: inputs disagree on the batch size")
            batch = x.shape[0]
            feed[t.name] = x
        return feed

    def concrete_shape(self, spec: TensorSpec, batch: int) -> Tuple[int, ...]:
        return tuple(batch if d == "batch" else d for d in spec.shape)  # type: ignore[misc]


BATCH = "batch"


def clip_graphs(*, image_size: int, context_length: int, embed_dim: int) -> Dict[str, GraphSpec]:
    """CLIP's two towers. Outputs are L2-normalised embeddings (normalisation is inside the
    graph so every backend returns identical features)."""
    return {
        "image_encoder": GraphSpec(
            "image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, image_size, image_size)),),
            outputs=(TensorSpec("image_embeds", "float32", (BATCH, embed_dim)),)),
        "text_encoder": GraphSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", (BATCH, context_length)),),
            outputs=(TensorSpec("text_embeds", "float32", (BATCH, embed_dim)),)),
    }
