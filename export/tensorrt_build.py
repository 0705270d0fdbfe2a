"""ONNX -> TensorRT engines, with an on-disk engine cache and a shared timing cache.

    plan_path = build_or_load(onnx_path, spec, precision="fp16")   # cached
    data = build_engine(onnx_path, spec)                            # serialized engine bytes

Precision, for TensorRT 10.x and 11.x alike (11.x removed the weak-typing builder flags
``BuilderFlag.FP16/INT8`` and the implicit-quantisation calibrators, 10.x deprecated them):
every network is built *strongly typed* and the precision lives in the ONNX graph itself:

  * ``"fp32"``: the float32 export; TF32 is switched off so results match PyTorch to ~1e-5.
  * ``"fp16"``: the ``<graph>.fp16.onnx`` export (float16 weights and compute, float32 I/O,
    LayerNorm statistics and the final L2 normalisation in float32), see
    ``export.onnx_export.ensure_variant``.
  * ``"int8"``: explicit quantisation: the float32 graph with symmetric int8 QuantizeLinear /
    DequantizeLinear pairs on every weight GEMM (``quantize_qdq``: ONNX Runtime's static
    quantiser with *entropy* calibration over batches from a user callable). TensorRT fuses
    each Q/DQ pair into an int8 kernel; the remaining layers run in float32.

The batch axis gets one optimisation profile from ``GraphSpec.batch_profile`` (min, opt, max).
Engines are cached under ``<cache_root>/tensorrt/`` keyed by the sha256 of the ONNX source,
the TensorRT version, the GPU name and compute capability, the precision, the profile and (int8)
the calibration data. ``tensorrt`` is imported lazily: a missing library or GPU raises
``fmrt.runtime.base.BackendUnavailableError``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from export.specs import GraphSpec
from fmrt.runtime.base import BackendUnavailableError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_BYTES = 4 << 30
MAX_CALIBRATION_BATCHES = 64
ENGINE_FORMAT = 1  # bump when engine building changes in a way that invalidates cached plans

_logger = None
_logger_lock = threading.Lock()
_build_count = 0


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


def build_count() -> int:
    """Engines built by this process (tests use it to prove that the engine cache is reused)."""
    return _build_count


# --------------------------------------------------------------------------- availability
def import_tensorrt():
    """``import tensorrt`` (>= 10), or ``BackendUnavailableError`` saying what is missing."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from missing CUDA/TensorRT shared libraries
        raise BackendUnavailableError(
            f"TensorRT is not available ({type(e).__name__}: {e}); install it with "
            "`pip install tensorrt` on a machine with an NVIDIA GPU and driver") from e
    try:
        major = int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        major = 0
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} is too old: fmrt needs TensorRT >= 10 "
            "(named-tensor execution API, int64 inputs)")
    return trt


def require_cuda(device: Union[None, int, str] = None) -> int:
    """Index of the CUDA device to use, or ``BackendUnavailableError`` without one."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False (no GPU, no "
            "driver, or a CPU-only torch build)")
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, str):
        if not device.startswith("cuda"):
            raise BackendUnavailableError(f"TensorRT runs on CUDA devices, not {device!r}")
        device = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    if not 0 <= int(device) < torch.cuda.device_count():
        raise BackendUnavailableError(f"no CUDA device {device}; "
                                      f"{torch.cuda.device_count()} visible")
    return int(device)


def get_logger():
    """One ``trt.Logger`` per process (TensorRT expects a single logger)."""
    global _logger
    trt = import_tensorrt()
    with _logger_lock:
        if _logger is None:
            _logger = trt.Logger(trt.Logger.WARNING)
        return _logger


def gpu_identity(device_index: int = 0) -> Dict[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu": torch.cuda.get_device_name(device_index),
            "compute_capability": f"{major}.{minor}"}


# --------------------------------------------------------------------------- cache keys
def _sha256_file(path: str) -> str:
    from export.onnx_export import file_sha256

    return file_sha256(path)


def engine_cache_key(*, onnx_sha256: str, precision: str, profile: Tuple[int, int, int],
                     trt_version: str, gpu: str, compute_capability: str,
                     calibration: str = "") -> str:
    """sha256 hex of everything an engine depends on."""
    fields = {"format": ENGINE_FORMAT, "onnx_sha256": onnx_sha256, "precision": precision,
              "profile": list(profile), "tensorrt": trt_version, "gpu": gpu,
              "compute_capability": compute_capability, "calibration": calibration}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def engine_cache_dir(cache_root: Optional[str] = None) -> str:
    from export.onnx_export import default_cache_root

    return os.path.join(cache_root or default_cache_root(), "tensorrt")


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


# --------------------------------------------------------------------------- calibration data
CalibrationSource = Union[Callable[[], Iterable[Any]], Iterable[Any]]


def collect_calibration_batches(spec: GraphSpec, data: CalibrationSource,
                                max_batches: int = MAX_CALIBRATION_BATCHES
                                ) -> List[Dict[str, np.ndarray]]:
    """Materialise calibration batches: ``data`` is a callable returning an iterable (or an
    iterable) of ``{input name: array}`` dicts, or of bare arrays for single-input graphs."""
    it = data() if callable(data) else data
    out: List[Dict[str, np.ndarray]] = []
    for item in it:
        if not isinstance(item, dict):
            if len(spec.inputs) != 1:
                raise ValueError(f"{spec.name}: calibration batches must be dicts keyed by "
                                 f"{spec.input_names}")
            item = {spec.inputs[0].name: item}
        batch = {}
        for t in spec.inputs:
            if t.name not in item:
                raise ValueError(f"{spec.name}: calibration batch lacks {t.name!r}")
            x = np.ascontiguousarray(np.asarray(item[t.name]), dtype=t.np_dtype)
            if x.ndim != len(t.shape) or any(not isinstance(s, str) and d != s
                                             for d, s in zip(x.shape, t.shape)):
                raise ValueError(f"{spec.name}: calibration {t.name} has shape {x.shape}, "
                                 f"expected {t.shape}")
            batch[t.name] = x
        out.append(batch)
        if len(out) >= max_batches:
            break
    if not out:
        raise ValueError(f"{spec.name}: the calibration data yielded no batches")
    return out


def calibration_digest(batches: Sequence[Dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(str(b[k].shape).encode())
            h.update(b[k].tobytes())
    return h.hexdigest()


def quantize_qdq(src: str, dst: str, spec: GraphSpec,
                 batches: Sequence[Dict[str, np.ndarray]], *, per_channel: bool = True,
                 op_types: Sequence[str] = ("MatMul", "Gemm")) -> str:
    """Explicit int8 quantisation for TensorRT: symmetric int8 Q/DQ pairs on the inputs of each
    weight GEMM (activation-activation MatMuls in attention stay float), activation ranges from
    entropy calibration over ``batches``. Written atomically to ``dst``."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    model = onnx.load(src)
    inits = {i.name for i in model.graph.initializer}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"fmrt_node_{i}"
    nodes = [n.name for n in model.graph.node
             if n.op_type in op_types and len(n.input) > 1 and n.input[1] in inits]
    if not nodes:
        raise EngineBuildError(f"{src}: no weight GEMMs to quantise")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    work = tempfile.mkdtemp(prefix=".qdq-", dir=os.path.dirname(os.path.abspath(dst)))
    try:
        named = os.path.join(work, "named.onnx")
        onnx.save(model, named)
        out = os.path.join(work, "qdq.onnx")
        root = logging.getLogger()
        prev = root.level
        root.setLevel(max(prev, logging.ERROR))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    named, out, _Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel, nodes_to_quantize=nodes,
                    calibrate_method=CalibrationMethod.Entropy,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
        finally:
            root.setLevel(prev)
        from export.quantize import move_into_place

        return move_into_place(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- building
def _network_flags(trt) -> int:
    flags = 0
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is not None:  # required for strong typing on 10.x; accepted and ignored on 11.x
        flags |= 1 << int(flag)
    return flags


def build_engine(onnx_path: str, spec: GraphSpec, *, precision: str = "fp32",
                 profile: Optional[Tuple[int, int, int]] = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 timing_cache_path: Optional[str] = None,
                 optimization_level: Optional[int] = None, device_index: int = 0) -> bytes:
    """Build a serialized engine from ``onnx_path`` (which must already carry the precision:
    the fp32 / fp16 / Q/DQ graph, see the module doc). ``precision`` only toggles TF32 (off for
    ``"fp32"``)."""
    global _build_count
    trt = import_tensorrt()
    import torch

    lo, opt, hi = profile or spec.batch_profile
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"bad batch profile {(lo, opt, hi)}: need 1 <= min <= opt <= max")
    logger = get_logger()
    with torch.cuda.device(device_index):
        builder = trt.Builder(logger)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.path.abspath(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
        got_in = [network.get_input(i).name for i in range(network.num_inputs)]
        got_out = [network.get_output(i).name for i in range(network.num_outputs)]
        if got_in != list(spec.input_names) or got_out != list(spec.output_names):
            raise EngineBuildError(f"{onnx_path}: I/O {got_in} -> {got_out} do not match the spec "
                                   f"{list(spec.input_names)} -> {list(spec.output_names)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if precision == "fp32" and tf32 is not None:
            config.clear_flag(tf32)
        prof = builder.create_optimization_profile()
        for t in spec.inputs:
            prof.set_shape(t.name, spec.concrete_shape(t, lo), spec.concrete_shape(t, opt),
                           spec.concrete_shape(t, hi))
        config.add_optimization_profile(prof)

        cache = None
        if timing_cache_path:
            blob = b""
            if os.path.isfile(timing_cache_path):
                with open(timing_cache_path, "rb") as f:
                    blob = f.read()
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, True)  # ignore_mismatch

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} "
                                   f"({precision}, batch profile {(lo, opt, hi)}); see its log")
        if cache is not None:
            try:
                _atomic_write(timing_cache_path, bytes(config.get_timing_cache().serialize()))
            except Exception as e:  # noqa: BLE001 - the timing cache is an optimisation only
                log.warning("could not save the TensorRT timing cache %s: %s",
                            timing_cache_path, e)
    _build_count += 1
    return bytes(serialized)


def build_or_load(onnx_path: str, spec: GraphSpec, *, precision: str = "fp16",
                  cache_root: Optional[str] = None, profile: Optional[Tuple[int, int, int]] = None,
                  calibration_data: Optional[CalibrationSource] = None,
                  calibration_key: Optional[str] = None,
                  fp16_onnx_path: Optional[str] = None,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                  optimization_level: Optional[int] = None, device_index: int = 0,
                  rebuild: bool = False) -> str:
    """Path of a cached serialized engine for ``spec`` at ``precision``, building it if needed.

    Args:
        onnx_path: the float32 graph (``export.onnx_export``).
        fp16_onnx_path: for ``"fp16"``: the float16 variant (required).
        calibration_data: for ``"int8"``: a callable returning an iterable (or an iterable) of
            batches ``{input name: array}`` (arrays for single-input graphs) of real inputs.
        calibration_key: a name for the calibration set; included in the cache key instead of
            a digest of the batches (which needs them materialised).
        rebuild: ignore a cached engine.
    """
    trt = import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision {precision!r}; choose one of {PRECISIONS}")
    profile = tuple(profile or spec.batch_profile)  # type: ignore[assignment]
    source = onnx_path
    if precision == "fp16":
        if not fp16_onnx_path:
            raise ValueError("precision='fp16' needs fp16_onnx_path (the .fp16.onnx variant)")
        source = fp16_onnx_path
    batches = None
    calib = ""
    if precision == "int8":
        if calibration_data is None:
            raise ValueError("precision='int8' needs calibration_data: a callable returning "
                             "batches of real inputs for entropy calibration")
        if calibration_key:
            calib = f"key:{calibration_key}"
        else:
            batches = collect_calibration_batches(spec, calibration_data)
            calib = f"sha256:{calibration_digest(batches)}"
    ident = gpu_identity(device_index)
    key = engine_cache_key(onnx_sha256=_sha256_file(source), precision=precision,
                           profile=profile, trt_version=str(trt.__version__), gpu=ident["gpu"],
                           compute_capability=ident["compute_capability"], calibration=calib)
    root = engine_cache_dir(cache_root)
    plan = os.path.join(root, f"{spec.name}-{precision}-{key[:16]}.plan")
    if os.path.isfile(plan) and not rebuild:
        return plan
    os.makedirs(root, exist_ok=True)
    if precision == "int8":
        if batches is None:
            batches = collect_calibration_batches(spec, calibration_data)  # type: ignore[arg-type]
        qdq = os.path.join(root, f"{spec.name}-int8-{key[:16]}.qdq.onnx")
        source = quantize_qdq(onnx_path, qdq, spec, batches)
    timing = os.path.join(root, _safe(f"timing-trt{trt.__version__}-{ident['gpu']}-"
                                      f"sm{ident['compute_capability']}.cache"))
    data = build_engine(source, spec, precision=precision,
                        profile=profile,  # type: ignore[arg-type]
                        workspace_bytes=workspace_bytes, timing_cache_path=timing,
                        optimization_level=optimization_level, device_index=device_index)
    _atomic_write(plan, data)
    meta = {"graph": spec.name, "precision": precision, "profile": list(profile),
            "tensorrt": str(trt.__version__), **ident, "calibration": calib,
            "onnx": os.path.abspath(source), "key": key}
    _atomic_write(plan[: -len(".plan")] + ".json", json.dumps(meta, indent=2).encode())
    return plan
