"""TensorRT engines for the exported graphs (``backend="tensorrt"``).

    rt = fmrt.load("shapes-clip", backend="tensorrt")                   # fp16 (default)
    rt = fmrt.load(model_dir, backend="tensorrt", precision="fp32")
    rt = fmrt.load(model_dir, backend="tensorrt", precision="int8",
                   calibration_data=lambda graph: batches_for(graph))

Engines are built from the ONNX export (``export.onnx_export``) by ``export.tensorrt_build`` and
cached on disk; the runner executes them with TensorRT's named-tensor API
(``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) on a private CUDA stream,
with torch CUDA tensors as device buffers (no pycuda). ``tensorrt`` and CUDA are only touched
when a TensorRT model is loaded; without them loading raises ``BackendUnavailableError``.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from export.specs import GraphSpec
from fmrt.runtime.base import BackendUnavailableError, Engine, RuntimeLoadError
from fmrt.runtime.clip import register_engine_loader

PRECISIONS = ("fp32", "fp16", "int8")


def _torch_dtype(trt, dt):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
             trt.DataType.BOOL: torch.bool}
    for name, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dt not in table:
        raise RuntimeLoadError(f"TensorRT I/O dtype {dt} is not supported by fmrt's runner")
    return table[dt]


class TensorRTEngine:
    """One deserialized engine + execution context; ``engine({input: array}) -> {output: array}``.

    Calls are serialised by a lock (one execution context); batches larger than the engine's
    profile maximum are split.
    """

    def __init__(self, plan: Union[bytes, str], spec: GraphSpec, *, device_index: int = 0) -> None:
        from export.tensorrt_build import get_logger, import_tensorrt

        trt = import_tensorrt()
        import torch

        self.spec = spec
        self.path = plan if isinstance(plan, str) else ""
        if isinstance(plan, str):
            with open(plan, "rb") as f:
                plan = f.read()
        self.device = torch.device("cuda", device_index)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(get_logger())
            self.engine = self.runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise RuntimeLoadError(
                    f"TensorRT could not deserialize the engine {self.path or '(bytes)'} (built "
                    "by another TensorRT version or for another GPU?); rebuild it")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise RuntimeLoadError("TensorRT could not create an execution context "
                                       "(out of GPU memory?)")
            self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != list(spec.input_names) or outputs != list(spec.output_names):
            raise RuntimeLoadError(
                f"engine {self.path or spec.name}: I/O {inputs} -> {outputs} do not match the "
                f"spec {list(spec.input_names)} -> {list(spec.output_names)}")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(inputs[0], 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._lock = threading.Lock()

    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        arrays = self.spec.validate_inputs(inputs)
        batch = next(iter(arrays.values())).shape[0]
        if batch == 0:
            return {t.name: np.zeros(self.spec.concrete_shape(t, 0), t.np_dtype)
                    for t in self.spec.outputs}
        if batch <= self.max_batch:
            with self._lock:
                return self._run(arrays)
        parts = []
        for i in range(0, batch, self.max_batch):
            with self._lock:
                parts.append(self._run({k: v[i: i + self.max_batch] for k, v in arrays.items()}))
        return {t.name: np.concatenate([p[t.name] for p in parts]) for t in self.spec.outputs}

    def _run(self, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        ctx = self.context
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            keep = []
            for name, x in arrays.items():
                t = torch.from_numpy(x).to(self.device).to(self.dtypes[name]).contiguous()
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"{self.spec.name}: TensorRT rejected {name} shape "
                                     f"{tuple(t.shape)} (profile batch {self.min_batch}.."
                                     f"{self.max_batch})")
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            outs = {}
            for t in self.spec.outputs:
                shape = tuple(ctx.get_tensor_shape(t.name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.spec.name}: unresolved output shape {shape}")
                o = torch.empty(shape, dtype=self.dtypes[t.name], device=self.device)
                ctx.set_tensor_address(t.name, o.data_ptr())
                outs[t.name] = o
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.spec.name}: TensorRT execution failed")
            self.stream.synchronize()
            del keep  # inputs may be released only after the engine has read them
            return {t.name: outs[t.name].cpu().numpy().astype(t.np_dtype, copy=False)
                    for t in self.spec.outputs}


def _calibration_for(calibration_data: Any, graph: str):
    """Per-graph calibration source from a dict ``{graph: source}`` or a callable
    ``fn(graph_name) -> iterable of batches``."""
    if calibration_data is None:
        return None
    if isinstance(calibration_data, Mapping):
        return calibration_data.get(graph)
    if callable(calibration_data):
        return lambda: calibration_data(graph)
    raise RuntimeLoadError("calibration_data must be a dict {graph: batches or callable} or a "
                           "callable(graph_name) -> iterable of batches")


@register_engine_loader("tensorrt")
def load_tensorrt_engines(model_dir: str, graphs: Dict[str, GraphSpec], *,
                          precision: str = "fp16", device: Union[None, int, str] = None,
                          calibration_data: Any = None,
                          calibration_key: Optional[str] = None,
                          profile: Optional[Tuple[int, int, int]] = None,
                          workspace_gb: float = 4.0, optimization_level: Optional[int] = None,
                          onnx_dir: Optional[str] = None, cache_root: Optional[str] = None,
                          rebuild: bool = False) -> Dict[str, Engine]:
    """``{graph name: TensorRTEngine}`` for the model in ``model_dir``.

    Args:
        precision: ``"fp16"`` (default), ``"fp32"`` or ``"int8"`` (explicit Q/DQ quantisation,
            entropy-calibrated on ``calibration_data``).
        device: CUDA device index or ``"cuda:i"`` (default: the current device).
        calibration_data: int8 only: ``{graph: callable or iterable}`` or a callable
            ``fn(graph_name) -> iterable`` of batches ``{input name: array}`` (or bare arrays).
        calibration_key: names the calibration set in the engine cache key.
        profile: (min, opt, max) batch of the optimisation profile (default: the spec's).
        workspace_gb: builder workspace limit.
        optimization_level: TensorRT builder optimisation level (0-5; default TensorRT's).
        onnx_dir: exported graphs to build from (default: the export cache).
        cache_root: fmrt cache root (default ``$FMRT_CACHE_DIR`` or ``~/.cache/fmrt``).
        rebuild: rebuild engines even when cached.
    """
    if precision not in PRECISIONS:
        raise RuntimeLoadError(f"tensorrt precision {precision!r}; choose one of {PRECISIONS}")
    from export import tensorrt_build as tb

    tb.import_tensorrt()
    device_index = tb.require_cuda(device)
    from export.onnx_export import (ExportError, ensure_variant, find_onnx_dir,
                                    manifest_problem, weights_sha256)

    try:
        if onnx_dir is None:
            onnx_dir = find_onnx_dir(model_dir, cache_root)
        else:
            problem = manifest_problem(onnx_dir, weights_sha=weights_sha256(model_dir))
            if problem and os.path.isfile(os.path.join(onnx_dir, "manifest.json")):
                raise RuntimeLoadError(f"onnx_dir {onnx_dir} does not match {model_dir}: "
                                       f"{problem}")
        engines: Dict[str, Engine] = {}
        for name, spec in graphs.items():
            src = os.path.join(onnx_dir, spec.file)
            if not os.path.isfile(src):
                raise RuntimeLoadError(f"{onnx_dir}: missing {spec.file} for graph {name!r}")
            fp16 = (ensure_variant(model_dir, onnx_dir, name, "float16", cache_root=cache_root)
                    if precision == "fp16" else None)
            calib = _calibration_for(calibration_data, name) if precision == "int8" else None
            if precision == "int8" and calib is None:
                raise RuntimeLoadError(f"precision='int8' needs calibration_data for {name!r}")
            try:
                plan = tb.build_or_load(
                    src, spec, precision=precision, cache_root=cache_root, profile=profile,
                    calibration_data=calib, calibration_key=calibration_key,
                    fp16_onnx_path=fp16, workspace_bytes=int(workspace_gb * (1 << 30)),
                    optimization_level=optimization_level, device_index=device_index,
                    rebuild=rebuild)
            except (tb.EngineBuildError, ValueError) as e:
                raise RuntimeLoadError(f"TensorRT engine for {name!r}: {e}") from e
            engines[name] = TensorRTEngine(plan, spec, device_index=device_index)
        return engines
    except ExportError as e:
        raise RuntimeLoadError(str(e)) from e


__all__ = ["TensorRTEngine", "load_tensorrt_engines", "BackendUnavailableError"]
