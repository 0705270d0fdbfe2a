"""VLM export (export/vlm_export.py): graph I/O against export.specs, the cache, the CLI route,
and the onnxruntime / tensorrt backends of the facade against torch: prefill and decode logits
within 1e-4 and identical greedy tokens, batch 1 and 3 with different prompt lengths."""
import json
import os

import numpy as np
import pytest
import torch

import fmrt
from fmrt.runtime.vlm import VlmRequest
from tests.test_vlm_runtime import _few_shot, _img, make_tiny_llava

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # shared 2-core host: see tests/test_vlm_runtime.py
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flamingo_onnx(tmp_path_factory):
    """shapes-flamingo exported once into a private cache; a second lookup reuses it."""
    from export import vlm_export

    root = str(tmp_path_factory.mktemp("cache"))
    before = vlm_export.export_count()
    d = vlm_export.vlm_onnx_dir("shapes-flamingo", root)
    assert vlm_export.export_count() == before + 3
    assert vlm_export.vlm_onnx_dir("shapes-flamingo", root) == d
    assert vlm_export.export_count() == before + 3
    return d


@pytest.fixture(scope="module")
def llava_export(tmp_path_factory):
    """A random tiny LLaVA exported through ``python -m export onnx MODEL --out DIR``."""
    from export.__main__ import main

    # std 0.1: logits ~4, backend differences ~1e-5, smallest top-2 gap of the greedy path 6e-3
    # image_pos_embed="learned": what `fmrt train llava` gives shapes-llava
    model_dir = make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")), std=0.1,
                                image_pos_embed="learned")
    out = str(tmp_path_factory.mktemp("llava_onnx"))
    assert main(["onnx", model_dir, "--out", out]) == 0
    return model_dir, out


@pytest.fixture(scope="module")
def pairs(flamingo_onnx, llava_export):
    """{family: (torch facade, onnxruntime facade)}"""
    kw = dict(backend="onnxruntime", intra_op_threads=1)
    return {"flamingo": (fmrt.load("shapes-flamingo"),
                         fmrt.load("shapes-flamingo", onnx_dir=flamingo_onnx, **kw)),
            "llava": (fmrt.load(llava_export[0]),
                      fmrt.load(llava_export[0], onnx_dir=llava_export[1], **kw))}


def _requests(family, n):
    from fmrt.data.flamingo_data import sample_episode

    if family == "flamingo":
        ep = sample_episode("test", "object", 1, 3)
        images, prompt = _few_shot(ep)
        reqs = [VlmRequest(images=images, prompt=prompt),
                VlmRequest(images=[images[0]], prompt="how many shapes are there?"),
                VlmRequest(images=images[:2], prompt="<image> output : red <|endofchunk|>"
                                                     "<image> output :")]
    else:
        reqs = [VlmRequest(images=[_img(seed=0)], prompt="describe the image."),
                VlmRequest(images=[_img(seed=1)], prompt="how many red circles are there?"),
                VlmRequest(images=[_img(30, 90, seed=2), _img(seed=3)], prompt="x")]
    return reqs[:n]


# ----------------------------------------------------------------------------- graphs
def test_graphs_match_specs(flamingo_onnx, llava_export):
    import onnx

    from export.specs import vlm_graphs  # noqa: F401  (the one definition of the I/O)
    from export.vlm_export import graphs_for_model, load_vlm

    for d, src in ((flamingo_onnx, "shapes-flamingo"), (llava_export[1], llava_export[0])):
        model, family, _ = load_vlm(fmrt.pretrained.resolve(src))
        specs = graphs_for_model(model, family)
        manifest = json.load(open(os.path.join(d, "manifest.json")))
        assert manifest["family"] == family and set(manifest["graphs"]) == set(specs)
        for name, spec in specs.items():
            g = onnx.load(os.path.join(d, spec.file)).graph
            assert [i.name for i in g.input] == list(spec.input_names)
            assert [o.name for o in g.output] == list(spec.output_names)
            for vi, ts in zip(list(g.input) + list(g.output), spec.inputs + spec.outputs):
                dims = [x.dim_param or x.dim_value for x in vi.type.tensor_type.shape.dim]
                assert dims == list(ts.shape), (name, vi.name)
    assert {"vision", "lm_prefill", "lm_decode"} == set(
        json.load(open(os.path.join(llava_export[1], "manifest.json")))["graphs"])


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", ["flamingo", "llava"])
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_decode_logits_and_greedy_tokens(pairs, family, batch):
    """Both backends' LM sessions, fed the same tokens: logits within 1e-4 after the prefill and
    every decode step (torch's greedy choice is fed to both; ORT's argmax must agree), with a
    row dropped half-way for batch 3 (cancel / finished rows)."""
    ref, ort = pairs[family]
    preps = [ref._prepare(r) for r in _requests(family, batch)]
    if batch > 1:
        assert len({len(p.ids) for p in preps}) == batch   # different prompt lengths
    width = max(len(p.ids) for p in preps)
    sessions = [m._lm.open([p.ids for p in preps], [p.images for p in preps], width + 20)
                for m in (ref, ort)]
    a, b = (s.prefill() for s in sessions)
    worst = float((a - b).abs().max())
    rows = list(range(batch))
    for step in range(14):
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"
        toks = a.argmax(-1).tolist()
        if step == 6 and batch == 3:
            keep = [0, 2]
            for s in sessions:
                s.keep(keep)
            toks = [toks[i] for i in keep]
            rows = keep
        a, b = (s.step(toks) for s in sessions)
        worst = max(worst, float((a - b).abs().max()))
    assert a.shape[0] == len(rows)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("family", ["flamingo", "llava"])
def test_facade_outputs_identical(pairs, family):
    ref, ort = pairs[family]
    assert ort.backend == "onnxruntime" and ort.family == family
    for kw in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "stop": ["the"]}):
        outs = []
        for m in (ref, ort):
            run = m.start_batch([VlmRequest(images=r.images, prompt=r.prompt, **kw)
                                 for r in _requests(family, 3)])
            res = run.run()
            outs.append(([(x.text, x.finish_reason, x.completion_tokens) for x in res],
                         [row.tokens for row in run.rows]))
        assert outs[0] == outs[1]
    req = _requests(family, 1)[0]
    assert "".join(ort.generate(req.images, req.prompt, stream=True, max_new_tokens=12)) == \
        ref.generate(req.images, req.prompt, max_new_tokens=12)


def test_onnxruntime_load_errors(llava_export, tmp_path):
    from fmrt.runtime import RuntimeLoadError

    with pytest.raises(RuntimeLoadError):
        fmrt.load(llava_export[0], backend="onnxruntime", onnx_dir=str(tmp_path))
    with pytest.raises(RuntimeLoadError, match="fp32"):
        fmrt.load(llava_export[0], backend="onnxruntime", onnx_dir=llava_export[1],
                  precision="int8")


# ----------------------------------------------------------------------------- tensorrt
def _tensorrt_ready() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _tensorrt_ready(), reason="TensorRT and a CUDA GPU are required")
@pytest.mark.parametrize("family", ["flamingo", "llava"])
def test_tensorrt_greedy_tokens_match_torch(pairs, flamingo_onnx, llava_export, family,
                                            tmp_path):
    src, onnx_dir = (("shapes-flamingo", flamingo_onnx) if family == "flamingo"
                     else llava_export)
    trt = fmrt.load(src, backend="tensorrt", onnx_dir=onnx_dir, cache_root=str(tmp_path))
    ref = pairs[family][0]
    for r in _requests(family, 3):
        assert trt.generate(r.images, r.prompt, max_new_tokens=12) == ref.generate(
            r.images, r.prompt, max_new_tokens=12)
