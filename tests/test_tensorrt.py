"""TensorRT backend.

Everywhere: a missing TensorRT or GPU raises ``BackendUnavailableError`` (not an ImportError), and
the CPU-side parts of the engine pipeline work: the float16 ONNX variant, the explicit Q/DQ int8
graph (checked with ONNX Runtime), calibration-batch handling and the engine cache key.
With TensorRT and a CUDA GPU: engines match PyTorch (fp32 < 1e-3, fp16 < 2e-2 in 1 - cosine),
dynamic batches (incl. above the profile maximum) run, and the engine cache is reused.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch

import fmrt
from export import onnx_export
from export import tensorrt_build as tb
from export.specs import clip_graphs
from fmrt.runtime.base import BackendUnavailableError

EOT = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers import make_model_dir

    return make_model_dir(str(tmp_path_factory.mktemp("trt-models") / "tiny-clip"), seed=1)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    from fmrt.pretrained import load_pretrained

    return load_pretrained(model_dir).model.eval()


@pytest.fixture(scope="module")
def graphs():
    return clip_graphs(image_size=64, context_length=32, embed_dim=128)


def _ids(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, 32), generator=g)
    for i in range(batch):
        if i % 3 == 0:
            ids[i, 1 + (i * 7) % 30] = EOT
        elif i % 3 == 1:
            ids[i, 3], ids[i, 20] = EOT, EOT
    return ids


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


# ------------------------------------------------------------------------- unavailability
def test_load_without_tensorrt_raises_backend_unavailable(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` -> ImportError
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        fmrt.load(model_dir, backend="tensorrt")
    with pytest.raises(BackendUnavailableError):
        tb.build_engine("unused.onnx", clip_graphs(image_size=64, context_length=32,
                                                   embed_dim=128)["image_encoder"])


def test_load_without_cuda_raises_backend_unavailable(model_dir, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        fmrt.load(model_dir, backend="tensorrt")


def test_old_tensorrt_is_rejected(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(BackendUnavailableError, match=">= 10"):
        tb.import_tensorrt()


def test_unavailable_here_without_patching(model_dir):
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_trt = False
    if has_trt:
        pytest.skip("TensorRT and CUDA are present")
    with pytest.raises(BackendUnavailableError):
        fmrt.load(model_dir, backend="tensorrt", precision="fp32")


# ------------------------------------------------------------------------- CPU-side pipeline
@pytest.fixture(scope="module")
def fp32_dir(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trt-onnx"))
    onnx_export.export_clip(model_dir, out, dynamo=False)  # TorchScript exporter: fast
    return out


def test_fp16_variant_matches_torch(model_dir, fp32_dir, torch_model, graphs):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    paths = {g: onnx_export.ensure_variant(model_dir, fp32_dir, g, "float16", dynamo=False)
             for g in graphs}
    assert paths["image_encoder"] == os.path.join(fp32_dir, "image_encoder.fp16.onnx")
    x = torch.randn(5, 3, 64, 64)
    ids = _ids(6)
    with torch.no_grad():
        ref_i = torch_model.encode_image(x, normalize=True).numpy()
        ref_t = torch_model.encode_text(ids, normalize=True).numpy()
    for g, feed, ref in (("image_encoder", {"pixel_values": x.numpy()}, ref_i),
                         ("text_encoder", {"input_ids": ids.numpy()}, ref_t)):
        m = onnx.load(paths[g])
        onnx.checker.check_model(m, full_check=True)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
        # I/O keeps the spec's dtypes
        spec = graphs[g]
        assert [i.name for i in m.graph.input] == list(spec.input_names)
        assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        out = ort.InferenceSession(paths[g], providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert 1 - _cos(out, ref).min() < 2e-3
    # cached: a second call does not export again
    before = onnx_export.export_count()
    onnx_export.ensure_variant(model_dir, fp32_dir, "image_encoder", "float16", dynamo=False)
    assert onnx_export.export_count() == before


def test_qdq_int8_graph(fp32_dir, graphs, torch_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    spec = graphs["image_encoder"]
    rng = np.random.default_rng(0)
    batches = tb.collect_calibration_batches(
        spec, lambda: (rng.standard_normal((4, 3, 64, 64)).astype(np.float32) for _ in range(3)))
    dst = tb.quantize_qdq(os.path.join(fp32_dir, spec.file), str(tmp_path / "q.onnx"), spec,
                          batches)
    m = onnx.load(dst)
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    zps = [onnx.numpy_helper.to_array(i) for i in m.graph.initializer if "zero_point" in i.name]
    assert zps and all((z == 0).all() and z.dtype == np.int8 for z in zps)  # symmetric int8
    x = rng.standard_normal((6, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.encode_image(torch.from_numpy(x), normalize=True).numpy()
    out = ort.InferenceSession(dst, providers=["CPUExecutionProvider"]).run(None, {
        "pixel_values": x})[0]
    assert _cos(out, ref).min() > 0.98
    assert not [f for f in os.listdir(tmp_path) if f != "q.onnx"]  # no temp leftovers


def test_calibration_batches(graphs):
    spec = graphs["text_encoder"]
    ids = np.zeros((4, 32), np.int32)
    got = tb.collect_calibration_batches(spec, [ids, {"input_ids": ids}])
    assert len(got) == 2 and got[0]["input_ids"].dtype == np.int64
    with pytest.raises(ValueError, match="shape"):
        tb.collect_calibration_batches(spec, [np.zeros((4, 31), np.int64)])
    with pytest.raises(ValueError, match="no batches"):
        tb.collect_calibration_batches(spec, lambda: iter(()))
    many = tb.collect_calibration_batches(spec, (ids for _ in range(1000)), max_batches=5)
    assert len(many) == 5
    assert tb.calibration_digest(got[:1]) == tb.calibration_digest(got[1:])


def test_engine_cache_key():
    base = dict(onnx_sha256="a" * 64, precision="fp16", profile=(1, 8, 64), trt_version="10.9",
                gpu="NVIDIA H100", compute_capability="9.0")
    k = tb.engine_cache_key(**base)
    assert k == tb.engine_cache_key(**base)
    for field, value in (("onnx_sha256", "b" * 64), ("precision", "fp32"),
                         ("profile", (1, 16, 64)), ("trt_version", "11.4"),
                         ("gpu", "NVIDIA A100"), ("compute_capability", "8.0")):
        assert tb.engine_cache_key(**{**base, field: value}) != k, field
    assert tb.engine_cache_key(**base, calibration="key:x") != k


# ------------------------------------------------------------------------- on a GPU
@pytest.fixture(scope="module")
def trt_ready():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    return True


@pytest.fixture(scope="module")
def trt_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trt-cache"))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_matches_torch(trt_ready, model_dir, torch_model, trt_cache, precision, tol):
    rt = fmrt.load(model_dir, backend="tensorrt", precision=precision, cache_root=trt_cache)
    img, txt = rt.engines["image_encoder"], rt.engines["text_encoder"]
    assert (img.min_batch, img.max_batch) == (1, 64)
    for batch in (1, 3, 17, 64, 70):  # 70 > profile max: split inside the engine
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        ids = _ids(batch, seed=batch)
        with torch.no_grad():
            ref_i = torch_model.encode_image(x, normalize=True).numpy()
            ref_t = torch_model.encode_text(ids, normalize=True).numpy()
        out_i = img({"pixel_values": x.numpy()})["image_embeds"]
        out_t = txt({"input_ids": ids.numpy()})["text_embeds"]
        assert out_i.shape == (batch, 128) and out_i.dtype == np.float32
        assert 1 - _cos(out_i, ref_i).min() < tol, (precision, batch)
        assert 1 - _cos(out_t, ref_t).min() < tol, (precision, batch)
        if precision == "fp32":
            assert np.abs(out_i - ref_i).max() < 1e-3 and np.abs(out_t - ref_t).max() < 1e-3
    # the facade agrees with the torch facade
    ref_rt = fmrt.load(model_dir, backend="torch")
    texts = ["a red circle", "blue square", "green"]
    assert 1 - _cos(rt.encode_text(texts), ref_rt.encode_text(texts)).min() < tol
    # second load: engines come from the cache
    before = tb.build_count()
    fmrt.load(model_dir, backend="tensorrt", precision=precision, cache_root=trt_cache)
    assert tb.build_count() == before
    plans = [f for f in os.listdir(os.path.join(trt_cache, "tensorrt"))
             if f.endswith(".plan") and f"-{precision}-" in f]
    assert len(plans) == 2


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_int8_calibrated(trt_ready, model_dir, torch_model, trt_cache):
    rng = np.random.default_rng(0)

    def calib(graph):
        for _ in range(4):
            if graph == "image_encoder":
                yield rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
            else:
                yield _ids(8, seed=int(rng.integers(1000))).numpy()

    rt = fmrt.load(model_dir, backend="tensorrt", precision="int8", calibration_data=calib,
                   calibration_key="random-v1", cache_root=trt_cache)
    x = torch.randn(9, 3, 64, 64)
    ids = _ids(9, seed=3)
    with torch.no_grad():
        ref_i = torch_model.encode_image(x, normalize=True).numpy()
        ref_t = torch_model.encode_text(ids, normalize=True).numpy()
    out_i = rt.engines["image_encoder"]({"pixel_values": x.numpy()})["image_embeds"]
    out_t = rt.engines["text_encoder"]({"input_ids": ids.numpy()})["text_embeds"]
    assert _cos(out_i, ref_i).min() > 0.95
    assert _cos(out_t, ref_t).min() > 0.95
