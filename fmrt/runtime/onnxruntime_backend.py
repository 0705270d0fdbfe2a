"""ONNX Runtime engines for the exported graphs (``backend="onnxruntime"``).

    rt = fmrt.load("shapes-clip", backend="onnxruntime")                     # fp32, CPU
    rt = fmrt.load(model_dir, backend="onnxruntime", precision="int8", intra_op_threads=4)

The graphs come from the model directory's own ``onnx/`` folder when its manifest matches the
weights, otherwise from the export cache (``export.onnx_export.export_model_dir``: exported on
first use, reused afterwards). ``precision="int8"`` uses ``<graph>.int8.onnx`` (ORT dynamic
quantisation), created next to the fp32 graphs on first use (or in the export cache when that
folder is read-only).
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from export.specs import GraphSpec
from fmrt.runtime.base import BackendUnavailableError, Engine, RuntimeLoadError
from fmrt.runtime.clip import register_engine_loader

PRECISIONS = ("fp32", "int8")
_ORT_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)",
               "int64": "tensor(int64)", "int32": "tensor(int32)"}
_int8_lock = threading.Lock()


def physical_cores() -> int:
    """Physical CPU cores usable by this process (hyper-threads don't help GEMM-bound graphs)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    physical = None
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        physical = len(cores) or None
    except OSError:
        pass
    return max(1, min(logical, physical or logical))


def _resolve_providers(providers: Union[None, str, Sequence], device: Optional[str]) -> List:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = "cuda" if device and str(device).startswith("cuda") else "cpu"
    if isinstance(providers, str):
        if providers.lower() in ("cpu", "cpuexecutionprovider"):
            return ["CPUExecutionProvider"]
        if providers.lower() in ("cuda", "cudaexecutionprovider"):
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailableError(
                    "onnxruntime: CUDAExecutionProvider requested but this onnxruntime build "
                    f"offers only {available} (install onnxruntime-gpu with a CUDA device)")
            idx = int(str(device).split(":")[1]) if device and ":" in str(device) else 0
            return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        providers = [providers]
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendUnavailableError(f"onnxruntime providers {missing} are unavailable; "
                                      f"this build offers {available}")
    return list(providers)


def session_options(intra_op_threads: Optional[int] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(intra_op_threads or physical_cores())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    return so


def check_session_io(sess, spec: GraphSpec, path: str) -> None:
    """Raise ``RuntimeLoadError`` unless the session's inputs/outputs are exactly the spec's
    names, dtypes and shapes (named batch axis, static other dims)."""
    def describe(args):
        return [(a.name, a.type, list(a.shape)) for a in args]

    for kind, got, want in (("inputs", sess.get_inputs(), spec.inputs),
                            ("outputs", sess.get_outputs(), spec.outputs)):
        if [a.name for a in got] != [t.name for t in want]:
            raise RuntimeLoadError(
                f"{path}: graph {spec.name!r} {kind} are {[a.name for a in got]}, expected "
                f"{[t.name for t in want]} (export.specs); re-export the model")
        for a, t in zip(got, want):
            ok_dtype = a.type == _ORT_DTYPES.get(t.dtype)
            ok_shape = len(a.shape) == len(t.shape) and all(
                isinstance(s, str) or d == s for d, s in zip(a.shape, t.shape))
            ok_dyn = all(not isinstance(d, int) or d <= 0 for d, s in zip(a.shape, t.shape)
                         if isinstance(s, str))
            if not (ok_dtype and ok_shape and ok_dyn):
                raise RuntimeLoadError(
                    f"{path}: graph {spec.name!r} {kind} {describe(got)} do not match the spec "
                    f"{[(x.name, x.dtype, list(x.shape)) for x in want]}")


class OrtEngine:
    """One graph in one ``InferenceSession``; ``engine({input: array}) -> {output: array}``."""

    def __init__(self, path: str, spec: GraphSpec, *, providers: List, sess_options) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(path, sess_options=sess_options,
                                                providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise RuntimeLoadError(f"onnxruntime could not load {path}: {e}") from e
        check_session_io(self.session, spec, path)
        self.path, self.spec = path, spec
        self._out = list(spec.output_names)

    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        feed = self.spec.validate_inputs(inputs)
        outs = self.session.run(self._out, feed)
        return dict(zip(self._out, outs))


def _ensure_int8(onnx_dir: str, spec: GraphSpec, model_dir: str, cache_root: Optional[str]
                 ) -> str:
    """Path of the int8 graph, quantising it on first use (next to the fp32 graph when that
    folder is writable, else in the export cache)."""
    from export.quantize import int8_path, quantize_graph

    src = os.path.join(onnx_dir, spec.file)
    dst = int8_path(src)
    if os.path.isfile(dst):
        return dst
    with _int8_lock:
        if os.path.isfile(dst):
            return dst
        if not os.access(onnx_dir, os.W_OK):
            from export.onnx_export import export_model_dir

            cache = export_model_dir(model_dir, cache_root)
            src = os.path.join(cache, spec.file)
            dst = int8_path(src)
            if os.path.isfile(dst):
                return dst
        return quantize_graph(src, dst)


@register_engine_loader("onnxruntime")
def load_onnxruntime_engines(model_dir: str, graphs: Dict[str, GraphSpec], *,
                             precision: str = "fp32",
                             providers: Union[None, str, Sequence] = None,
                             intra_op_threads: Optional[int] = None,
                             onnx_dir: Optional[str] = None, cache_root: Optional[str] = None,
                             device: Optional[str] = None) -> Dict[str, Engine]:
    """``{graph name: OrtEngine}`` for ``graphs`` of the model in ``model_dir``.

    Args:
        precision: ``"fp32"`` or ``"int8"`` (dynamic int8 weights; CPU).
        providers: None/"cpu" (default), "cuda", or an explicit ORT providers list.
        intra_op_threads: ORT intra-op threads (default: the physical cores of this process).
        onnx_dir: a directory of exported graphs to use instead of the export cache.
        cache_root: fmrt cache root (default ``$FMRT_CACHE_DIR`` or ``~/.cache/fmrt``).
        device: "cpu" or "cuda[:i]" (shorthand for ``providers``).
    """
    try:
        import onnxruntime  # noqa: F401  (a clear error before any export work)
    except ImportError as e:
        raise BackendUnavailableError(f"onnxruntime is not installed: {e}") from e
    from export.onnx_export import ExportError, find_onnx_dir, manifest_problem, weights_sha256

    if precision not in PRECISIONS:
        raise RuntimeLoadError(f"onnxruntime precision {precision!r}; choose one of {PRECISIONS}")
    if onnx_dir is None:
        try:
            onnx_dir = find_onnx_dir(model_dir, cache_root)
        except ExportError as e:
            raise RuntimeLoadError(str(e)) from e
    else:
        if not os.path.isdir(onnx_dir):
            raise RuntimeLoadError(f"onnx_dir {onnx_dir} is not a directory")
        if os.path.isfile(os.path.join(onnx_dir, "manifest.json")):
            problem = manifest_problem(onnx_dir, weights_sha=weights_sha256(model_dir))
            if problem:
                raise RuntimeLoadError(f"onnx_dir {onnx_dir} does not match {model_dir}: {problem}")
    prov = _resolve_providers(providers, device)
    so = session_options(intra_op_threads)
    engines: Dict[str, Engine] = {}
    for name, spec in graphs.items():
        path = os.path.join(onnx_dir, spec.file)
        if not os.path.isfile(path):
            raise RuntimeLoadError(f"{onnx_dir}: missing {spec.file} for graph {name!r}")
        if precision == "int8":
            path = _ensure_int8(onnx_dir, spec, model_dir, cache_root)
        engines[name] = OrtEngine(path, spec, providers=prov, sess_options=so)
    return engines
