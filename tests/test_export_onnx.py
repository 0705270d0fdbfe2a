"""ONNX export of CLIP's towers, the export cache, int8 quantisation and the onnxruntime backend."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fmrt  # noqa: E402
from export import onnx_export  # noqa: E402
from export.onnx_export import export_clip, export_model_dir, find_onnx_dir  # noqa: E402
from export.specs import clip_graphs  # noqa: E402
from fmrt.runtime.base import RuntimeLoadError  # noqa: E402

EOT = 2  # shapes-vit-tiny's eot id (WordTokenizer: <pad>=0, <sot>=1, <eot>=2, <unk>=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers import make_model_dir

    # a non-trivial logit scale so classify() probabilities are peaky
    return make_model_dir(str(tmp_path_factory.mktemp("models") / "tiny-clip"), logit_scale=50.0)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fmrt-cache"))


@pytest.fixture(scope="module")
def onnx_dir(model_dir, cache_root):
    return export_model_dir(model_dir, cache_root)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    from fmrt.pretrained import load_pretrained

    return load_pretrained(model_dir).model.eval()


@pytest.fixture(scope="module")
def graphs(torch_model):
    c = torch_model.config
    return clip_graphs(image_size=c.vision.image_size, context_length=c.text.context_length,
                       embed_dim=c.embed_dim)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _random_ids(batch, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    for i in range(batch):
        kind = i % 4
        if kind == 0:    # one eot inside
            ids[i, 1 + i % (length - 2)] = EOT
        elif kind == 1:  # eot at the last position
            ids[i, -1] = EOT
        elif kind == 2:  # several eots: the first one pools
            ids[i, 4], ids[i, 9] = EOT, EOT
        # kind 3: no eot -> last position pools
    return ids


# ------------------------------------------------------------------------- graphs + manifest
def test_graphs_pass_checker_and_match_specs(onnx_dir, graphs, model_dir):
    for name, spec in graphs.items():
        path = os.path.join(onnx_dir, spec.file)
        assert not [f for f in os.listdir(onnx_dir) if f.startswith(spec.file + ".")], \
            "small models must be single-file ONNX"
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        ins, outs = list(model.graph.input), list(model.graph.output)
        assert [i.name for i in ins] == list(spec.input_names)
        assert [o.name for o in outs] == list(spec.output_names)
        for v, t in zip(ins + outs, spec.inputs + spec.outputs):
            tt = v.type.tensor_type
            assert tt.elem_type == onnx.helper.np_dtype_to_tensor_dtype(t.np_dtype)
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            assert dims == list(t.shape), (v.name, dims, t.shape)
            assert dims[0] == "batch"
    m = json.load(open(os.path.join(onnx_dir, onnx_export.MANIFEST_FILE)))
    assert set(m["graphs"]) == {"image_encoder", "text_encoder"}
    assert m["weights_sha256"] == onnx_export.file_sha256(os.path.join(model_dir,
                                                                       "model.safetensors"))
    assert m["opset"] == 18 and m["fmrt_version"] == fmrt.__version__
    for g, e in m["graphs"].items():
        assert e["file"] == graphs[g].file
        assert e["sha256"] == onnx_export.file_sha256(os.path.join(onnx_dir, e["file"]))
    assert os.path.basename(onnx_dir).startswith("tiny-clip-" + m["weights_sha256"][:12])


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_ort_matches_torch(onnx_dir, graphs, torch_model, batch):
    img, txt = graphs["image_encoder"], graphs["text_encoder"]
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    ids = _random_ids(batch, seed=batch)
    with torch.no_grad():
        ref_i = torch_model.encode_image(x, normalize=True).numpy()
        ref_t = torch_model.encode_text(ids, normalize=True).numpy()
    out_i = _session(os.path.join(onnx_dir, img.file)).run(None, {"pixel_values": x.numpy()})[0]
    out_t = _session(os.path.join(onnx_dir, txt.file)).run(None, {"input_ids": ids.numpy()})[0]
    assert out_i.shape == (batch, 128) and out_t.shape == (batch, 128)
    assert np.abs(out_i - ref_i).max() < 1e-4
    assert np.abs(out_t - ref_t).max() < 1e-4


def test_torchscript_exporter_matches(model_dir, torch_model, tmp_path):
    paths = export_clip(model_dir, str(tmp_path), dynamo=False)
    assert json.load(open(tmp_path / "manifest.json"))["exporter"] == "torchscript"
    ids = _random_ids(5, seed=7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_t = torch_model.encode_text(ids, normalize=True).numpy()
        ref_i = torch_model.encode_image(x, normalize=True).numpy()
    out_t = _session(paths["text_encoder"]).run(None, {"input_ids": ids.numpy()})[0]
    out_i = _session(paths["image_encoder"]).run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(out_t - ref_t).max() < 1e-4 and np.abs(out_i - ref_i).max() < 1e-4


# ------------------------------------------------------------------------- facade
def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (80, 48), (33, 100), (128, 128)]
    return [rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8) for i in range(n)]


TEXTS = ["a red circle", "the big blue square left of a small green triangle", "yellow",
         "a small red square", "an unknownword circle"]


def test_facade_matches_torch_and_reuses_cache(model_dir, cache_root, onnx_dir):
    before = onnx_export.export_count()
    mtime = os.path.getmtime(os.path.join(onnx_dir, "manifest.json"))
    rt = fmrt.load(model_dir, backend="onnxruntime", cache_root=cache_root, intra_op_threads=1)
    ref = fmrt.load(model_dir, backend="torch")
    assert onnx_export.export_count() == before, "second use must reuse the cached export"
    assert os.path.getmtime(os.path.join(onnx_dir, "manifest.json")) == mtime
    assert export_model_dir(model_dir, cache_root) == onnx_dir
    assert onnx_export.export_count() == before
    assert rt.backend == "onnxruntime" and rt.info()["embed_dim"] == 128

    imgs = _images(5)
    e_ort, e_ref = rt.encode_image(imgs), ref.encode_image(imgs)
    assert e_ort.dtype == np.float32 and e_ort.shape == (5, 128)
    assert np.abs(e_ort - e_ref).max() < 1e-4
    t_ort, t_ref = rt.encode_text(TEXTS), ref.encode_text(TEXTS)
    assert np.abs(t_ort - t_ref).max() < 1e-4
    labels = ["red circle", "blue square", "green triangle"]
    p_ort, p_ref = rt.classify(imgs, labels), ref.classify(imgs, labels)
    np.testing.assert_allclose(p_ort.sum(1), 1.0, atol=1e-5)
    assert np.abs(p_ort - p_ref).max() < 1e-3
    assert (p_ort.argmax(1) == p_ref.argmax(1)).all()


def test_int8_graphs(model_dir, cache_root, onnx_dir):
    fp32 = fmrt.load(model_dir, backend="onnxruntime", cache_root=cache_root, intra_op_threads=1)
    q = fmrt.load(model_dir, backend="onnxruntime", precision="int8", cache_root=cache_root,
                  intra_op_threads=1)
    for g in ("image_encoder", "text_encoder"):
        path = os.path.join(onnx_dir, f"{g}.int8.onnx")
        assert os.path.isfile(path)
        assert q.engines[g].path == path
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert "MatMulInteger" in ops
    imgs = _images(8, seed=3)
    a, b = fp32.encode_image(imgs), q.encode_image(imgs)
    assert (a * b).sum(1).min() > 0.98
    a, b = fp32.encode_text(TEXTS), q.encode_text(TEXTS)
    assert (a * b).sum(1).min() > 0.98
    # a second load reuses the quantised files
    mtime = os.path.getmtime(os.path.join(onnx_dir, "image_encoder.int8.onnx"))
    fmrt.load(model_dir, backend="onnxruntime", precision="int8", cache_root=cache_root)
    assert os.path.getmtime(os.path.join(onnx_dir, "image_encoder.int8.onnx")) == mtime


def test_bad_precision(model_dir, cache_root, onnx_dir):
    with pytest.raises(RuntimeLoadError, match="precision"):
        fmrt.load(model_dir, backend="onnxruntime", precision="int4", cache_root=cache_root)


# ------------------------------------------------------------------------- cache behaviour
def test_cache_dir_defaults(model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FMRT_CACHE_DIR", str(tmp_path / "c"))
    sha = onnx_export.weights_sha256(model_dir)
    assert onnx_export.cache_dir_for(model_dir) == str(tmp_path / "c" / "onnx" /
                                                       f"tiny-clip-{sha[:12]}")
    monkeypatch.delenv("FMRT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert onnx_export.default_cache_root() == str(tmp_path / "home" / ".cache" / "fmrt")


def test_stale_cache_is_replaced(model_dir, onnx_dir, tmp_path):
    root = tmp_path / "root"
    target = onnx_export.cache_dir_for(model_dir, str(root))
    shutil.copytree(onnx_dir, target)
    m = json.load(open(os.path.join(target, "manifest.json")))
    m["weights_sha256"] = "0" * 64
    json.dump(m, open(os.path.join(target, "manifest.json"), "w"))
    before = onnx_export.export_count()
    out = export_model_dir(model_dir, str(root), dynamo=False)  # TorchScript: fast re-export
    assert out == target and onnx_export.export_count() == before + 2
    assert onnx_export.manifest_problem(target, weights_sha=onnx_export.weights_sha256(
        model_dir)) is None
    assert sorted(os.listdir(root / "onnx")) == [os.path.basename(target)]  # no temp leftovers


def test_export_by_older_code_is_replaced(model_dir, onnx_dir, tmp_path):
    # same weights, graphs traced by different model/exporter source: re-exported, not served
    root = tmp_path / "root"
    target = onnx_export.cache_dir_for(model_dir, str(root))
    shutil.copytree(onnx_dir, target)
    m = json.load(open(os.path.join(target, "manifest.json")))
    assert m["code_sha256"] == onnx_export.graph_code_sha256(m["family"])
    m["code_sha256"] = "1" * 64
    json.dump(m, open(os.path.join(target, "manifest.json"), "w"))
    assert "code" in onnx_export.manifest_problem(target, weights_sha=m["weights_sha256"])
    assert onnx_export.manifest_problem(target, weights_sha=m["weights_sha256"],
                                        check_code=False) is None
    before = onnx_export.export_count()
    assert export_model_dir(model_dir, str(root), dynamo=False) == target
    assert onnx_export.export_count() > before
    assert onnx_export.manifest_problem(target, weights_sha=m["weights_sha256"]) is None


def test_model_dir_onnx_subfolder_is_used(model_dir, onnx_dir, tmp_path):
    md = tmp_path / "with-onnx"
    shutil.copytree(model_dir, md)
    shutil.copytree(onnx_dir, md / "onnx")
    before = onnx_export.export_count()
    assert find_onnx_dir(str(md), str(tmp_path / "unused")) == str(md / "onnx")
    rt = fmrt.load(str(md), backend="onnxruntime", cache_root=str(tmp_path / "unused"))
    assert rt.engines["image_encoder"].path == str(md / "onnx" / "image_encoder.onnx")
    assert onnx_export.export_count() == before and not (tmp_path / "unused").exists()


def _rename_io(path, old, new):
    model = onnx.load(path)
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name == old:
            v.name = new
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new
    onnx.save(model, path)


@pytest.mark.parametrize("graph,old,new", [("image_encoder", "pixel_values", "pixels"),
                                           ("text_encoder", "text_embeds", "embeds")])
def test_spec_name_mismatch_raises(model_dir, onnx_dir, tmp_path, graph, old, new):
    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    _rename_io(str(bad / f"{graph}.onnx"), old, new)
    with pytest.raises(RuntimeLoadError, match=old):
        fmrt.load(model_dir, backend="onnxruntime", onnx_dir=str(bad))


def test_onnx_dir_from_other_weights_raises(model_dir, onnx_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(onnx_dir, other)
    m = json.load(open(other / "manifest.json"))
    m["weights_sha256"] = "f" * 64
    json.dump(m, open(other / "manifest.json", "w"))
    with pytest.raises(RuntimeLoadError, match="sha256"):
        fmrt.load(model_dir, backend="onnxruntime", onnx_dir=str(other))
