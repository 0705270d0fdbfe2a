"""ONNX Runtime dynamic int8 quantisation of exported graphs: ``<graph>.onnx`` ->
``<graph>.int8.onnx`` beside it.

Weights of MatMul/Gemm (and the token-embedding Gather) are stored as int8 (``QuantType.QInt8``,
symmetric); activations are quantised on the fly per batch (``DynamicQuantizeLinear`` ->
``MatMulInteger``). The patch-embedding Conv stays float: ``ConvInteger`` is slower than the
float conv on ORT's CPU provider and the conv is a small share of the FLOPs.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from typing import Dict, Iterable, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Gather")


def move_into_place(src: str, dst: str) -> str:
    """Move a finished graph from a scratch dir onto ``dst`` atomically: copy beside ``dst``
    first (the scratch dir may be on another filesystem), then ``os.replace``, so concurrent
    readers see the old file or the new one, never a partial one."""
    tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.move(src, tmp)
    os.replace(tmp, dst)
    return dst


def int8_path(fp32_path: str) -> str:
    root, ext = os.path.splitext(fp32_path)
    return f"{root}.int8{ext}"


def quantize_graph(src: str, dst: Optional[str] = None, *,
                   op_types: Sequence[str] = DEFAULT_OP_TYPES, per_channel: bool = True,
                   preprocess: bool = True) -> str:
    """Dynamically quantise one ONNX graph to int8 weights; returns the output path.

    ``preprocess`` runs ORT's ``quant_pre_process`` (graph optimisation + ONNX shape inference)
    first, as ORT recommends; it is skipped with a warning if it fails. The result is written to a
    temporary file and renamed into place, so readers never see a partial file.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = dst or int8_path(src)
    out_dir = os.path.dirname(os.path.abspath(dst))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".quant-", dir=out_dir)
    try:
        model_in = src
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = os.path.join(work, "pre.onnx")
            try:
                # Symbolic shape inference does not handle the exporter's dynamic batch dim; ONNX's
                # own shape inference is enough for dynamic quantisation.
                quant_pre_process(src, pre, skip_symbolic_shape=True)
                model_in = pre
            except Exception as e:  # noqa: BLE001
                log.warning("quant_pre_process failed on %s (%s); quantising the raw graph", src, e)
        tmp = os.path.join(work, "q.onnx")
        prev = logging.getLogger().level
        logging.getLogger().setLevel(max(prev, logging.ERROR))  # ORT logs via the root logger
        try:
            quantize_dynamic(model_in, tmp, weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(op_types), per_channel=per_channel)
        finally:
            logging.getLogger().setLevel(prev)
        return move_into_place(tmp, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantize_dir(onnx_dir: str, graphs: Optional[Iterable[str]] = None, *,
                 out_dir: Optional[str] = None, force: bool = False, **kw) -> Dict[str, str]:
    """Quantise the graphs of an export directory (all graphs of its manifest by default).
    Existing ``<graph>.int8.onnx`` files are kept unless ``force``. Returns ``{graph: path}``."""
    from export.onnx_export import read_manifest

    manifest = read_manifest(onnx_dir) or {}
    files = {g: e["file"] for g, e in manifest.get("graphs", {}).items()}
    names = list(graphs) if graphs is not None else list(files)
    out: Dict[str, str] = {}
    for g in names:
        src = os.path.join(onnx_dir, files.get(g, f"{g}.onnx"))
        dst = int8_path(os.path.join(out_dir or onnx_dir, os.path.basename(src)))
        if force or not os.path.isfile(dst):
            quantize_graph(src, dst, **kw)
        out[g] = dst
    return out
