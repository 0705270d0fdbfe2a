"""fmrt.kernels.decode_masks: fused SAM output upscaling + hypernetwork product.

Forward and every gradient (src, hyper_in, six weights) against a float64 reference on small odd
shapes for the cpu and triton (interpreter) backends; fp16/bf16; the four selection modes (with a
proof that "best" computes only the chosen mask); the custom op (opcheck, torch.export sees one
node); ONNX export through the translation table in ONNX Runtime; parity with
segment-anything's own MaskDecoder at real size; bad inputs.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from tests.helpers import segment_anything_root

from fmrt.kernels import mask_decode as md
from fmrt.kernels import decode_masks, decode_masks_reference

WEIGHTS = ("conv1_weight", "conv1_bias", "ln_weight", "ln_bias", "conv2_weight", "conv2_bias")

# (B, C, h, w, C1, C2, M): odd widths exercise the channel padding of the Triton kernel and
# ragged last pixel blocks (5*7 = 35 and 3*9 = 27 pixels vs 16-pixel blocks).
SHAPES = [(2, 16, 5, 7, 8, 6, 4), (1, 37, 3, 9, 20, 17, 4), (3, 5, 1, 2, 3, 2, 2)]
BACKENDS = ["cpu", "triton"]


def make_inputs(B, C, h, w, C1, C2, M, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    # Scales keep the LayerNorm/GELU inputs O(1) so both GELUs are in their curved region.
    weights = {"conv1_weight": r(C, C1, 2, 2, scale=1 / math.sqrt(C)), "conv1_bias": r(C1, scale=0.5),
               "ln_weight": 1 + r(C1, scale=0.3), "ln_bias": r(C1, scale=0.3),
               "conv2_weight": r(C1, C2, 2, 2, scale=1 / math.sqrt(C1)), "conv2_bias": r(C2, scale=0.5)}
    return r(B, C, h, w), r(B, M, C2), weights, r(B, M)


def _cast(src, hyper, weights, dtype):
    return src.to(dtype), hyper.to(dtype), {k: v.to(dtype) for k, v in weights.items()}


def _tol(dtype):
    # absolute tolerance relative to max |logit|: fp32 accumulation everywhere; half types are
    # limited by rounding the output (and on GPU the conv2 operand) to 11 / 8 mantissa bits.
    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(shape, backend):
    src, hyper, weights, _ = make_inputs(*shape)
    ref = decode_masks_reference(src, hyper, **weights).masks
    dtype = torch.float32 if backend == "triton" else torch.float64
    s, h, wt = _cast(src, hyper, weights, dtype)
    out = decode_masks(s, h, **wt, backend=backend)
    B, C, h, w, C1, C2, M = shape
    assert out.masks.shape == (B, M, 4 * h, 4 * w) and out.masks.dtype == dtype
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.masks.double(), ref, rtol=0, atol=_tol(dtype) * scale)
    assert torch.equal(out.mask_index, torch.arange(M).expand(B, M))
    assert out.iou_pred is None


def test_cpu_float32_matches_float64_reference():
    src, hyper, weights, _ = make_inputs(*SHAPES[1])
    ref = decode_masks_reference(src, hyper, **weights).masks
    s32, h32, w32 = _cast(src, hyper, weights, torch.float32)
    out = decode_masks(s32, h32, **w32, backend="cpu").masks
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs(backend, dtype):
    src, hyper, weights, _ = make_inputs(*SHAPES[0])
    s, h, w = _cast(src, hyper, weights, dtype)
    # reference on the same (rounded) inputs, in float64: only the kernel's own rounding remains
    s64, h64, w64 = _cast(s, h, w, torch.float64)
    ref = decode_masks_reference(s64, h64, **w64).masks
    out = decode_masks(s, h, **w, backend=backend).masks
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=_tol(dtype) * ref.abs().max().item())


def test_real_channel_sizes_triton_small_image():
    # SAM's channel widths (256 -> 64 -> 32, no padding in the kernel) on a 6x5 embedding
    src, hyper, weights, _ = make_inputs(1, 256, 6, 5, 64, 32, 4)
    ref = decode_masks_reference(src, hyper, **weights).masks
    s, h, w = _cast(src, hyper, weights, torch.float32)
    out = decode_masks(s, h, **w, backend="triton").masks
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_auto_backend_on_cpu_uses_cpu_path(monkeypatch):
    src, hyper, weights, _ = make_inputs(*SHAPES[0])
    called = []
    real = md._fused_torch
    monkeypatch.setattr(md, "_fused_torch", lambda *a: called.append(1) or real(*a))
    out = decode_masks(src, hyper, **weights).masks
    assert called and out.shape == (2, 4, 20, 28)


def test_cpu_tiling_covers_partial_row_tiles(monkeypatch):
    # tiles of 2 rows over 5 rows (last tile 1 row) and of 1 row when w > tile size
    src, hyper, weights, _ = make_inputs(*SHAPES[0])
    ref = decode_masks_reference(src, hyper, **weights).masks
    for tile in (14, 3):
        monkeypatch.setattr(md, "_tile_pixels", lambda t=tile: t)
        out = decode_masks(src, hyper, **weights, backend="cpu").masks
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 * ref.abs().max().item())


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize("select", ["all", "multimask", "single", "best"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_modes(select, backend):
    src, hyper, weights, iou = make_inputs(*SHAPES[0])
    ref = decode_masks_reference(src, hyper, **weights).masks           # all 4 masks
    dtype = torch.float32 if backend == "triton" else torch.float64
    s, h, w = _cast(src, hyper, weights, dtype)
    out = decode_masks(s, h, **w, iou_pred=iou, select=select, backend=backend)
    want = {"all": [0, 1, 2, 3], "multimask": [1, 2, 3], "single": [0]}
    if select == "best":
        idx = iou[:, 1:].argmax(1) + 1
        assert out.mask_index.shape == (2, 1) and torch.equal(out.mask_index[:, 0], idx)
        torch.testing.assert_close(out.iou_pred[:, 0], iou.gather(1, idx[:, None])[:, 0])
        expect = ref[torch.arange(2), idx][:, None]
    else:
        assert torch.equal(out.mask_index, torch.tensor(want[select]).expand(2, -1))
        torch.testing.assert_close(out.iou_pred, iou[:, want[select]])
        expect = ref[:, want[select]]
    assert out.masks.shape == expect.shape
    torch.testing.assert_close(out.masks.double(), expect, rtol=0,
                               atol=_tol(dtype) * ref.abs().max().item())
    r = decode_masks_reference(src, hyper, **weights, iou_pred=iou, select=select)
    torch.testing.assert_close(r.masks, expect)
    assert torch.equal(r.mask_index, out.mask_index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_computes_only_the_chosen_mask(backend):
    # The non-chosen hypernetwork vectors are NaN: any pixel computed from them would be NaN.
    src, hyper, weights, _ = make_inputs(*SHAPES[0])
    s, h, w = _cast(src, hyper, weights, torch.float32)
    iou = torch.tensor([[9.0, 0.1, 0.7, 0.2], [9.0, 0.3, 0.1, 0.8]])
    poisoned = h.clone()
    poisoned[0, [0, 1, 3]] = float("nan")
    poisoned[1, [0, 1, 2]] = float("nan")
    out = decode_masks(s, poisoned, **w, iou_pred=iou, select="best", backend=backend)
    assert out.mask_index.tolist() == [[2], [3]]      # mask 0 (iou 9.0) is never a candidate
    assert torch.isfinite(out.masks).all()
    full = decode_masks(s, h, **w, backend=backend).masks
    torch.testing.assert_close(out.masks, full[[0, 1], [2, 3]][:, None])


# --------------------------------------------------------------------------- gradients
def _grads(fn, src, hyper, weights, grad_out, select="all", iou=None):
    leaves = {"src": src.clone().requires_grad_(), "hyper_in": hyper.clone().requires_grad_(),
              **{k: v.clone().requires_grad_() for k, v in weights.items()}}
    kw = {k: leaves[k] for k in WEIGHTS}
    out = fn(leaves["src"], leaves["hyper_in"], **kw, iou_pred=iou, select=select).masks
    (out * grad_out.to(out.dtype)).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_reference(shape, backend):
    src, hyper, weights, _ = make_inputs(*shape)
    B, C, h, w, C1, C2, M = shape
    gout = torch.randn(B, M, 4 * h, 4 * w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, ref = _grads(decode_masks_reference, src, hyper, weights, gout)
    dtype = torch.float32 if backend == "triton" else torch.float64
    s, hy, wt = _cast(src, hyper, weights, dtype)
    _, got = _grads(lambda *a, **k: decode_masks(*a, **k, backend=backend), s, hy, wt, gout)
    assert set(got) == set(ref) == {"src", "hyper_in", *WEIGHTS}
    for name in ref:
        assert got[name].dtype == dtype and got[name].shape == ref[name].shape, name
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), ref[name], rtol=0,
                                   atol=(1e-11 if dtype == torch.float64 else 5e-5) * scale,
                                   msg=lambda m, n=name: f"d {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_through_best_selection(backend):
    src, hyper, weights, iou = make_inputs(*SHAPES[0])
    gout = torch.randn(2, 1, 20, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, ref = _grads(decode_masks_reference, src, hyper, weights, gout, "best", iou)
    s, hy, wt = _cast(src, hyper, weights, torch.float32)
    _, got = _grads(lambda *a, **k: decode_masks(*a, **k, backend=backend), s, hy, wt, gout,
                    "best", iou.float())
    chosen = iou[:, 1:].argmax(1) + 1
    for b in range(2):                                   # unchosen hypernetwork rows get zero grad
        others = [m for m in range(4) if m != chosen[b]]
        assert torch.count_nonzero(got["hyper_in"][b, others]) == 0
    for name in ref:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=0,
                                   atol=5e-5 * ref[name].abs().max().item())


def test_half_precision_gradients_cpu():
    src, hyper, weights, _ = make_inputs(*SHAPES[0])
    s, hy, wt = _cast(src, hyper, weights, torch.bfloat16)
    gout = torch.randn(2, 4, 20, 28, dtype=torch.float64)
    _, ref = _grads(decode_masks_reference, *_cast(s, hy, wt, torch.float64),
                    gout.to(torch.bfloat16).double())
    _, got = _grads(lambda *a, **k: decode_masks(*a, **k, backend="cpu"), s, hy, wt, gout)
    for name in ref:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].double(), ref[name], rtol=0,
                                   atol=2e-2 * ref[name].abs().max().item())


def test_gradcheck_tiny():
    src, hyper, weights, _ = make_inputs(1, 3, 2, 1, 4, 3, 2)
    args = [t.requires_grad_() for t in (src, hyper, *weights.values())]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.fmrt.decode_masks(*a, 1e-6, "cpu"), args,
                                    fast_mode=True)


# --------------------------------------------------------------------------- custom op
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    src, hyper, weights, _ = make_inputs(*SHAPES[2])
    args = (src.requires_grad_(), hyper.requires_grad_(), *(v.requires_grad_() for v in weights.values()))
    torch.library.opcheck(torch.ops.fmrt.decode_masks.default, (*args, 1e-6, backend))


def test_opcheck_backward_op():
    src, hyper, weights, _ = make_inputs(*SHAPES[2])
    grad = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fmrt.decode_masks_backward.default,
                          (grad, src, hyper, *weights.values(), 1e-6))


def test_torch_export_sees_one_node():
    src, hyper, weights, iou = make_inputs(*SHAPES[0], dtype=torch.float32)

    class Dec(torch.nn.Module):
        def forward(self, src, hyper, iou):
            return decode_masks(src, hyper, **weights, iou_pred=iou, select="best").masks

    ep = torch.export.export(Dec(), (src, hyper, iou))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fmrt.decode_masks.default) == 1
    assert not any("convolution" in str(t) or "gelu" in str(t) for t in targets)
    torch.testing.assert_close(ep.module()(src, hyper, iou), Dec()(src, hyper, iou))


def test_torch_compile_fullgraph_forward_and_backward():
    src, hyper, weights, iou = make_inputs(*SHAPES[0], dtype=torch.float32)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(src, hyper, iou):
        return decode_masks(src, hyper, **weights, iou_pred=iou, select="best", backend="cpu").masks

    s1, s2 = src.clone().requires_grad_(), src.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend=capture)(s1, hyper, iou)
    ref = f(s2, hyper, iou)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    assert len(graphs) == 1
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("fmrt.decode_masks" in c for c in calls) == 1
    assert not any("conv" in c or "gelu" in c or "layer_norm" in c for c in calls)


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("select", ["all", "best"])
def test_onnx_export_runs_in_onnxruntime(select, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    src, hyper, weights, iou = make_inputs(*SHAPES[0], dtype=torch.float32)

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in weights.items():
                self.register_buffer(k, v)

        def forward(self, src, hyper, iou):
            r = decode_masks(src, hyper, iou_pred=iou, select=select,
                             **{k: getattr(self, k) for k in WEIGHTS})
            return r.masks, r.iou_pred, r.mask_index

    batch = torch.export.Dim("batch", min=1, max=1024)
    path = str(tmp_path / "decode.onnx")
    prog = torch.onnx.export(Dec().eval(), (src, hyper, iou), None, dynamo=True, opset_version=18,
                             custom_translation_table=md.onnx_translation_table(),
                             input_names=["src", "hyper_in", "iou_pred"],
                             output_names=["masks", "iou", "index"],
                             dynamic_shapes={"src": {0: batch}, "hyper": {0: batch}, "iou": {0: batch}})
    prog.save(path)
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert {"ConvTranspose", "LayerNormalization", "Erf", "MatMul"} <= ops
    assert not any(n.domain not in ("", "ai.onnx") for n in prog.model_proto.graph.node)
    if select == "best":
        assert "ArgMax" in ops and ops & {"Gather", "GatherElements", "GatherND"}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # a different batch size than the export example: the batch axis is dynamic
    src3, hyper3, _, iou3 = make_inputs(3, 16, 5, 7, 8, 6, 4, dtype=torch.float32, seed=5)
    got = sess.run(None, {"src": src3.numpy(), "hyper_in": hyper3.numpy(), "iou_pred": iou3.numpy()})
    ref = decode_masks_reference(src3.double(), hyper3.double(), iou_pred=iou3.double(), select=select,
                                 **{k: v.double() for k, v in weights.items()})
    np.testing.assert_allclose(got[0], ref.masks.numpy(), rtol=0,
                               atol=2e-5 * ref.masks.abs().max().item())
    np.testing.assert_allclose(got[1], ref.iou_pred.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got[2], ref.mask_index.numpy())


# --------------------------------------------------------------------------- SAM parity
def _load_sam_mask_decoder():
    """segment_anything.modeling.mask_decoder without the package __init__ (which imports the
    absent torchvision): a private package object whose submodules load by file path."""
    sa_root = segment_anything_root()
    if sa_root is None:
        pytest.skip("segment-anything is not installed")
    root = os.path.join(sa_root, "modeling")
    pkg_name = "_fmrt_test_sam.modeling"
    if pkg_name + ".mask_decoder" in sys.modules:
        return sys.modules[pkg_name + ".mask_decoder"]
    for name, path in (("_fmrt_test_sam", os.path.dirname(root)), (pkg_name, root)):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    for sub in ("common", "mask_decoder"):
        s = importlib.util.spec_from_file_location(f"{pkg_name}.{sub}", os.path.join(root, f"{sub}.py"))
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
    return sys.modules[pkg_name + ".mask_decoder"]


class _PassThroughTransformer(torch.nn.Module):
    """Stands in for SAM's TwoWayTransformer: returns (tokens, src as [B, hw, C])."""

    def forward(self, src, pos, tokens):
        return tokens, src.flatten(2).transpose(1, 2)


def _sam_decoder_and_inputs(B, h, w, seed=0):
    mdec = _load_sam_mask_decoder()
    torch.manual_seed(seed)
    dec = mdec.MaskDecoder(transformer_dim=256, transformer=_PassThroughTransformer()).eval()
    with torch.no_grad():   # LayerNorm2d initialises to identity; make its affine non-trivial
        dec.output_upscaling[1].weight.normal_(1.0, 0.2)
        dec.output_upscaling[1].bias.normal_(0.0, 0.2)
    image = torch.randn(1, 256, h, w)
    pe = torch.randn(1, 256, h, w)
    sparse = torch.randn(B, 2, 256)
    dense = torch.randn(B, 256, h, w) * 0.1
    return dec, (image, pe, sparse, dense)


def _our_decode(dec, image, sparse, dense, select, backend):
    """decode_masks fed exactly what MaskDecoder.predict_masks feeds its upscaling path."""
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0).expand(sparse.shape[0], -1, -1)
    hs = torch.cat([tokens, sparse], 1)                       # pass-through transformer
    src = image + dense                                       # repeat_interleave of a batch of 1
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
    iou = dec.iou_prediction_head(hs[:, 0])
    return decode_masks(src, hyper, **md.upscaling_params(dec.output_upscaling), iou_pred=iou,
                        select=select, backend=backend)


@pytest.mark.parametrize("backend,size", [("cpu", 64), ("triton", 4)])
def test_parity_with_segment_anything_mask_decoder(backend, size):
    dec, (image, pe, sparse, dense) = _sam_decoder_and_inputs(2, size, size)
    with torch.no_grad():
        for multimask in (True, False):
            masks, iou = dec(image, pe, sparse, dense, multimask_output=multimask)
            ours = _our_decode(dec, image, sparse, dense, "multimask" if multimask else "single", backend)
            assert ours.masks.shape == masks.shape == (2, 3 if multimask else 1, 4 * size, 4 * size)
            torch.testing.assert_close(ours.masks, masks, rtol=0, atol=2e-5 * masks.abs().max().item())
            torch.testing.assert_close(ours.iou_pred, iou)
        # best-of-3 as SamPredictor picks it (argmax of the multimask IoU predictions)
        masks, iou = dec(image, pe, sparse, dense, multimask_output=True)
        best = _our_decode(dec, image, sparse, dense, "best", backend)
        k = iou.argmax(1)
        torch.testing.assert_close(best.masks[:, 0], masks[torch.arange(2), k], rtol=0,
                                   atol=2e-5 * masks.abs().max().item())
        assert torch.equal(best.mask_index[:, 0], k + 1)


def test_parity_gradients_with_segment_anything_modules():
    # autograd through SAM's own modules (float64) vs through decode_masks, same parameters
    dec, (image, pe, sparse, dense) = _sam_decoder_and_inputs(1, 6, 5)
    dec = dec.double()
    src = (image + dense).double().requires_grad_()
    hyper = torch.randn(1, 4, 32, dtype=torch.float64, requires_grad=True)
    up = dec.output_upscaling(src)
    ref = (hyper @ up.flatten(2)).view(1, 4, 24, 20)
    gout = torch.randn_like(ref)
    params = [src, hyper, *dec.output_upscaling.parameters()]
    ref_grads = torch.autograd.grad((ref * gout).sum(), params)
    ours = decode_masks(src, hyper, **md.upscaling_params(dec.output_upscaling), backend="cpu").masks
    torch.testing.assert_close(ours, ref)
    for g_ours, g_ref in zip(torch.autograd.grad((ours * gout).sum(), params), ref_grads):
        torch.testing.assert_close(g_ours, g_ref)


def test_upscaling_params_rejects_other_modules():
    with pytest.raises(ValueError, match="output_upscaling"):
        md.upscaling_params(torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 4, 3, stride=2)))
    seq = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.LayerNorm(4),
                              torch.nn.GELU(approximate="tanh"), torch.nn.ConvTranspose2d(4, 2, 2, stride=2),
                              torch.nn.GELU())
    with pytest.raises(ValueError):
        md.upscaling_params(seq)


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise():
    src, hyper, weights, iou = make_inputs(*SHAPES[0], dtype=torch.float32)

    def call(s=src, h=hyper, **over):
        kw = {**weights, **over}
        return decode_masks(s, h, **kw)

    with pytest.raises(ValueError, match="src must be"):
        call(s=src[0])
    with pytest.raises(ValueError, match="conv1_weight"):
        call(conv1_weight=weights["conv1_weight"][:, :, :1])
    with pytest.raises(ValueError, match="conv1_weight"):
        call(conv1_weight=weights["conv1_weight"][1:])
    with pytest.raises(ValueError, match="conv2_weight"):
        call(conv2_weight=weights["conv2_weight"][1:])
    with pytest.raises(ValueError, match="ln_weight"):
        call(ln_weight=weights["ln_weight"][1:])
    with pytest.raises(ValueError, match="hyper_in"):
        call(h=hyper[:, :, 1:])
    with pytest.raises(ValueError, match="hyper_in"):
        call(h=hyper[:1])
    with pytest.raises(TypeError, match="share one dtype"):
        call(h=hyper.double())
    with pytest.raises(TypeError, match="float16"):
        call(s=src.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(conv2_bias=[0.0] * 6)
    with pytest.raises(ValueError, match="iou_pred must be"):
        call(iou_pred=iou[:, :3])
    with pytest.raises(ValueError, match="needs iou_pred"):
        call(select="best")
    with pytest.raises(ValueError, match="select must be"):
        call(select="top")
    with pytest.raises(ValueError, match="M >= 2"):
        call(h=hyper[:, :1], select="multimask")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        call(backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        decode_masks(src.double(), hyper.double(), **{k: v.double() for k, v in weights.items()},
                     backend="triton")


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_cuda_sam_size(dtype):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    src, hyper, weights, iou = make_inputs(4, 256, 64, 64, 64, 32, 4)
    ref = decode_masks_reference(src, hyper, **weights, iou_pred=iou, select="best").masks
    s, h, w = _cast(src.cuda(), hyper.cuda(), {k: v.cuda() for k, v in weights.items()}, dtype)
    out = decode_masks(s, h, **w, iou_pred=iou.cuda(), select="best", backend="triton").masks
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=tol * ref.abs().max().item())
    _, got = _grads(lambda *a, **k: decode_masks(*a, **k, backend="triton"),
                    *_cast(src.cuda(), hyper.cuda(), {k: v.cuda() for k, v in weights.items()},
                           torch.float32), torch.randn(4, 4, 256, 256, dtype=torch.float64).cuda())
    assert all(torch.isfinite(g).all() for g in got.values())
