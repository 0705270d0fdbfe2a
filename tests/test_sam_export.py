"""SAM export: the image encoder and segment-anything's ONNX decoder contract, checked with the
ONNX checker and run in ONNX Runtime against torch (and against segment-anything's own
``SamOnnxModel``), the export cache, the onnxruntime / tensorrt predictor backends and the
multi-axis graph spec. One export of a tiny model (2 encoder blocks) per module.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import fmrt
from export.specs import SAM_POINTS_PROFILE, SAM_PROMPT_PROFILE, MultiAxisGraphSpec, sam_graphs
from fmrt.runtime import BackendUnavailableError, RuntimeLoadError
from fmrt.runtime.sam import SamInputError, SamPredictor
from fmrt.runtime.sam_amg import SamAutomaticMaskGenerator
from tests.test_sam_predictor import official_sam, sa, scene, tiny_sam  # noqa: F401  (sa: fixture)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """The dev box's 2 cores are shared with other jobs; with 2 intra-op threads each small op
    ends in an OpenMP barrier that stalls while the other core is busy (measured at load ~5:
    the crops case 115 s with 2 threads, 6 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_sam(depth=2)   # half the encoder: a quicker export, same graph structure


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    from fmrt.pretrained import PreprocessConfig, save_pretrained

    d = str(tmp_path_factory.mktemp("sam") / "tiny-sam")
    return save_pretrained(d, family="sam", model=model, config=model.config.to_dict(),
                           preprocess=PreprocessConfig(image_size=64))


@pytest.fixture(scope="module")
def onnx_dir(model_dir):
    from export.sam_export import sam_onnx_dir

    return sam_onnx_dir(model_dir)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _decoder_inputs(batch, n, *, mask, orig=(48.0, 80.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, n, 2, generator=g) * 64
    labels = torch.randint(0, 2, (batch, n), generator=g).float()
    labels[:, -1] = -1                       # the padding point, as the predictor sends it
    if n >= 3:
        labels[:, -3:-1] = torch.tensor([2.0, 3.0])   # and a box as two corners
        labels[:, -1] = 1
    return {"image_embeddings": torch.randn(1, 128, 16, 16, generator=g),
            "point_coords": coords, "point_labels": labels,
            "mask_input": torch.randn(1, 1, 64, 64, generator=g) * 3,
            "has_mask_input": torch.tensor([1.0 if mask else 0.0]),
            "orig_im_size": torch.tensor(orig)}


# --------------------------------------------------------------------------- the graphs
def test_graphs_checked_and_pinned_to_spec(onnx_dir, model_dir):
    import onnx

    from export.onnx_export import read_manifest, weights_sha256

    specs = sam_graphs(img_size=64, embed_dim=128, embed_size=16)
    man = read_manifest(onnx_dir)
    assert man["family"] == "sam" and man["weights_sha256"] == weights_sha256(model_dir)
    assert sorted(man["graphs"]) == sorted(specs)
    for name, spec in specs.items():
        path = os.path.join(onnx_dir, spec.file)
        onnx.checker.check_model(path, full_check=True)
        g = onnx.load(path).graph
        for got, want in ((g.input, spec.inputs), (g.output, spec.outputs)):
            assert [v.name for v in got] == [t.name for t in want]
            for v, t in zip(got, want):
                dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                assert dims == list(t.shape), (name, t.name, dims)
    low = onnx.load(os.path.join(onnx_dir, "mask_decoder_lowres.onnx")).graph
    assert not any(n.op_type == "Resize" for n in low.node)   # the cut removed the resize


@pytest.mark.parametrize("batch,n,mask,orig", [(1, 1, False, (48.0, 80.0)),
                                               (1, 4, True, (150.0, 97.0)),
                                               (3, 2, True, (64.0, 64.0)),
                                               (2, 5, False, (1.0, 7.0))])
def test_decoder_contract_ort_matches_torch(onnx_dir, model, batch, n, mask, orig):
    from export.sam_export import SamOnnxDecoder

    feed = _decoder_inputs(batch, n, mask=mask, orig=orig)
    with torch.no_grad():
        want = SamOnnxDecoder(model).eval()(*feed.values())
    got = _session(os.path.join(onnx_dir, "mask_decoder.onnx")).run(
        None, {k: v.numpy() for k, v in feed.items()})
    assert got[0].shape == (batch, 4, int(orig[0]), int(orig[1]))
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() < TOL
    low = _session(os.path.join(onnx_dir, "mask_decoder_lowres.onnx")).run(
        None, {k: v.numpy() for k, v in feed.items() if k != "orig_im_size"})
    assert np.abs(low[0] - got[1]).max() < 1e-6 and np.abs(low[1] - got[2]).max() < 1e-6


@pytest.mark.parametrize("n,mask,orig", [(2, False, (48.0, 80.0)), (4, True, (150.0, 97.0))])
def test_decoder_contract_matches_segment_anything_onnx_model(sa, onnx_dir, model, n, mask, orig):
    """segment-anything's own SamOnnxModel (return_single_mask=False) on the same weights."""
    from segment_anything.utils.onnx import SamOnnxModel

    ref = SamOnnxModel(official_sam(sa, model), return_single_mask=False).eval()
    feed = _decoder_inputs(1, n, mask=mask, orig=orig, seed=3)
    with torch.no_grad():
        want = ref(*feed.values())
    got = _session(os.path.join(onnx_dir, "mask_decoder.onnx")).run(
        None, {k: v.numpy() for k, v in feed.items()})
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() < TOL


def test_encoder_ort_matches_torch(onnx_dir, model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.image_encoder(x).numpy()
    got = _session(os.path.join(onnx_dir, "image_encoder.onnx")).run(None, {"pixel_values":
                                                                          x.numpy()})[0]
    assert got.shape == (2, 128, 16, 16) and np.abs(got - want).max() < TOL


def test_masks_to_original_matches_segment_anything(sa, model):
    from segment_anything.utils.onnx import SamOnnxModel

    from export.sam_export import masks_to_original

    ref = SamOnnxModel(official_sam(sa, model), return_single_mask=False)
    low = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    for size in ((1.0, 1.0), (37.0, 53.0), (150.0, 97.0), (64.0, 64.0)):
        osz = torch.tensor(size)
        assert torch.equal(masks_to_original(low, osz, 64), ref.mask_postprocessing(low, osz))


# --------------------------------------------------------------------------- predictor backends
def test_onnxruntime_predictor_matches_torch(model_dir, onnx_dir):
    from export import sam_export

    before = sam_export.export_count()
    p_ort = fmrt.load(model_dir, backend="onnxruntime", intra_op_threads=1)
    assert sam_export.export_count() == before          # the cached export was reused
    assert p_ort.backend == "onnxruntime" and isinstance(p_ort, SamPredictor)
    p_t = fmrt.load(model_dir)
    img = scene(61, 45, seed=4)
    p_ort.set_image(img)
    p_t.set_image(img)
    assert np.abs(p_ort.get_image_embedding() - p_t.get_image_embedding()).max() < TOL
    prompts = [dict(point_coords=[[20, 30]], point_labels=[1]),
               dict(point_coords=[[20, 30], [40, 5]], point_labels=[1, 0], box=[3, 4, 40, 50]),
               dict(box=[3, 4, 40, 50], multimask_output=False),
               dict(point_coords=[[20, 30]], point_labels=[1], select="best")]
    for kw in prompts:
        (mt, st, lt), (mo, so, lo) = (p.predict(**kw, return_logits=True) for p in (p_t, p_ort))
        assert mo.shape == mt.shape and np.abs(so - st).max() < TOL
        assert np.abs(lo - lt).max() < TOL and np.abs(mo - mt).max() < TOL
        mask_in = lt[:1]
        _, s2t, _ = p_t.predict(**kw, mask_input=mask_in)
        _, s2o, _ = p_ort.predict(**kw, mask_input=mask_in)
        assert np.abs(s2o - s2t).max() < TOL
    kw = dict(points_per_side=5, pred_iou_thresh=0.1, stability_score_thresh=0.3,
              box_nms_thresh=1.0, output_mode="uncompressed_rle")
    a = SamAutomaticMaskGenerator(p_t, **kw).generate(img)
    b = SamAutomaticMaskGenerator(p_ort, **kw).generate(img)
    assert len(a) == len(b) > 5
    same = sum(x["segmentation"] == y["segmentation"] for x, y in zip(a, b))
    assert same >= len(a) - 1   # a pixel at |logit| < 1e-5 may flip between backends


def test_int8_and_bad_options(model_dir, onnx_dir):
    p8 = fmrt.load(model_dir, backend="onnxruntime", precision="int8", intra_op_threads=1)
    assert os.path.isfile(os.path.join(onnx_dir, "image_encoder.int8.onnx"))
    p = fmrt.load(model_dir)
    img = scene(seed=6)
    p8.set_image(img)
    p.set_image(img)
    _, s8, l8 = p8.predict([[30, 20]], [1])
    _, s, low = p.predict([[30, 20]], [1])
    assert np.all(np.isfinite(l8)) and np.abs(s8 - s).max() < 0.2
    with pytest.raises(RuntimeLoadError, match="precision"):
        fmrt.load(model_dir, backend="onnxruntime", precision="fp16")
    with pytest.raises(RuntimeLoadError, match="onnxruntime"):
        fmrt.load(model_dir, backend="onnxruntime", workspace_gb=2)
    with pytest.raises(RuntimeLoadError, match="backend"):
        fmrt.load(model_dir, backend="tflite")


def test_fp16_variant_and_cli(model, model_dir, onnx_dir, capsys):
    """The float16 decoder (TensorRT's strongly typed fp16 input) runs in ORT close to torch;
    the CLI reuses the cached export and writes the int8 graphs."""
    import json

    from export.sam_export import SamPromptDecoder, ensure_sam_variant, export_count, main

    path = ensure_sam_variant(model_dir, onnx_dir, "mask_decoder_lowres", "float16")
    assert path == os.path.join(onnx_dir, "mask_decoder_lowres.fp16.onnx")
    feed = _decoder_inputs(3, 4, mask=True)
    feed.pop("orig_im_size")
    with torch.no_grad():
        want = SamPromptDecoder(model)(*feed.values())
    got = _session(path).run(None, {k: v.numpy() for k, v in feed.items()})
    assert np.abs(got[0] - want[0].numpy()).max() < 0.01
    assert np.abs(got[1] - want[1].numpy()).max() < 0.05 * want[1].abs().max().item()
    n = export_count()
    assert main([model_dir, "--int8"]) == 0 and export_count() == n
    out = json.loads(capsys.readouterr().out)
    assert os.path.isfile(out["mask_decoder.int8"]) and os.path.isfile(out["image_encoder.int8"])
    # the project-wide `python -m export onnx` routes SAM models here (same cached export)
    from export.__main__ import main as export_main

    assert export_main(["onnx", model_dir, "--int8"]) == 0 and export_count() == n
    assert json.loads(capsys.readouterr().out) == out


def test_export_rejects_other_families(tmp_path):
    from export.onnx_export import ExportError
    from export.sam_export import export_sam
    from tests.helpers import make_model_dir

    clip_dir = make_model_dir(str(tmp_path / "clip"))
    with pytest.raises(ExportError, match="not 'sam'"):
        export_sam(clip_dir, str(tmp_path / "out"))
    with pytest.raises(ExportError, match="SAM module"):
        export_sam(torch.nn.Linear(2, 2), str(tmp_path / "out"))


def test_tensorrt_backend_unavailable_without_gpu(model_dir, onnx_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: see test_tensorrt_predictor_matches_torch")
    with pytest.raises(BackendUnavailableError):
        fmrt.load(model_dir, backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 0.05)])
def test_tensorrt_predictor_matches_torch(model_dir, onnx_dir, precision, tol):
    pytest.importorskip("tensorrt")
    p_trt = fmrt.load(model_dir, backend="tensorrt", precision=precision)
    p_t = fmrt.load(model_dir)
    img = scene(seed=7)
    p_trt.set_image(img)
    p_t.set_image(img)
    emb_err = np.abs(p_trt.get_image_embedding() - p_t.get_image_embedding()).max()
    assert emb_err < tol * 10
    pts = np.random.default_rng(0).uniform(0, 48, (SAM_PROMPT_PROFILE[2] + 3, 1, 2))
    _, st, lt = p_t.predict_batch(pts, np.ones(pts.shape[:2]))
    _, so, lo = p_trt.predict_batch(pts, np.ones(pts.shape[:2]))   # split at the profile max
    assert np.abs(so - st).max() < tol and np.abs(lo - lt).max() < tol * 100
    many = np.zeros((SAM_POINTS_PROFILE[2], 2))
    with pytest.raises(SamInputError, match="exceed"):
        p_trt.predict(many, np.ones(len(many)))


# --------------------------------------------------------------------------- the spec
def test_multi_axis_spec():
    spec = sam_graphs(img_size=64, embed_dim=128, embed_size=16)["mask_decoder_lowres"]
    assert isinstance(spec, MultiAxisGraphSpec)
    ok = {"image_embeddings": np.zeros((1, 128, 16, 16)), "point_coords": np.zeros((3, 2, 2)),
          "point_labels": np.zeros((3, 2)), "mask_input": np.zeros((1, 1, 64, 64)),
          "has_mask_input": np.zeros(1)}
    feed = spec.validate_inputs(ok)
    assert all(v.dtype == np.float32 for v in feed.values())
    with pytest.raises(ValueError, match="'num_points'"):
        spec.validate_inputs({**ok, "point_labels": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="'batch'"):
        spec.validate_inputs({**ok, "point_labels": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="expected"):
        spec.validate_inputs({**ok, "mask_input": np.zeros((1, 1, 32, 32))})
    with pytest.raises(KeyError, match="has_mask_input"):
        spec.validate_inputs({k: v for k, v in ok.items() if k != "has_mask_input"})
    shapes = [spec.concrete_shape(spec.inputs[1], b) for b in spec.batch_profile]
    assert shapes == [(b, n, 2) for b, n in zip(SAM_PROMPT_PROFILE, SAM_POINTS_PROFILE)]
    assert spec.concrete_shape(spec.inputs[0], 16) == (1, 128, 16, 16)
