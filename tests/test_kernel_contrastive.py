"""fmrt.kernels.contrastive: fused CLIP / NegCLIP / SigLIP loss and fused top-k scoring.

Every backend is compared with a float64 reference (loss and every gradient) on odd shapes; the
Triton kernels run under TRITON_INTERPRET=1 on CPU hosts (tests/conftest.py), so shapes stay small.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmrt.kernels import contrastive as C
from fmrt.kernels import contrastive_loss, contrastive_loss_reference, topk_scores


def _inputs(B, D, M=0, kind="softmax", dtype=torch.float64, seed=0, scale=7.3, bias=-2.1):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 1.3 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    h = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1) if M else None
    sdt = torch.float64 if dtype == torch.float64 else torch.float32  # scale/bias stay fp32
    s = torch.tensor(scale, dtype=sdt).requires_grad_()
    b = torch.tensor(bias, dtype=sdt).requires_grad_() if kind == "sigmoid" else None
    cast = lambda t: t.to(dtype).requires_grad_() if t is not None else None  # noqa: E731
    return cast(x), cast(y), cast(h), s, b


def _loss_and_grads(x, y, h, s, b, kind, backend):
    loss = contrastive_loss(x, y, s, hard_negative_features=h, kind=kind, logit_bias=b,
                            backend=backend)
    ins = [t for t in (x, y, h, s, b) if t is not None]
    return loss, torch.autograd.grad(loss, ins)


def _reference64(x, y, h, s, b, kind):
    d = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    x, y, h, s, b = map(d, (x, y, h, s, b))
    loss = contrastive_loss_reference(x, y, s, hard_negative_features=h, kind=kind, logit_bias=b)
    ins = [t for t in (x, y, h, s, b) if t is not None]
    return loss, torch.autograd.grad(loss, ins)


@pytest.fixture
def small_tiles(monkeypatch):
    # several row and column tiles with ragged remainders at B=37
    monkeypatch.setattr(C, "TILE_ROWS", 16)
    monkeypatch.setattr(C, "TILE_COLS", 8)


CASES = [(37, 19, 0), (37, 33, 5), (29, 33, 11), (1, 19, 0), (16, 16, 16)]


@pytest.mark.parametrize("kind", C.KINDS)
@pytest.mark.parametrize("B,D,M", CASES)
def test_cpu_matches_float64_reference(small_tiles, kind, B, D, M):
    x, y, h, s, b = _inputs(B, D, M, kind)
    loss, grads = _loss_and_grads(x, y, h, s, b, kind, "cpu")
    rl, rg = _reference64(x, y, h, s, b, kind)
    torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(rg)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", C.KINDS)
@pytest.mark.parametrize("B,D,M", [(37, 19, 0), (37, 33, 5), (20, 17, 3)])
def test_cpu_float32(kind, B, D, M):
    x, y, h, s, b = _inputs(B, D, M, kind, dtype=torch.float32)
    loss, grads = _loss_and_grads(x, y, h, s, b, kind, "cpu")
    rl, rg = _reference64(x, y, h, s, b, kind)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", C.KINDS)
@pytest.mark.parametrize("B,D,M", [(37, 19, 0), (37, 33, 5), (21, 33, 17)])
def test_triton_matches_float64_reference(kind, B, D, M):
    x, y, h, s, b = _inputs(B, D, M, kind, dtype=torch.float32)
    loss, grads = _loss_and_grads(x, y, h, s, b, kind, "triton")
    rl, rg = _reference64(x, y, h, s, b, kind)
    torch.testing.assert_close(loss.double(), rl, rtol=2e-6, atol=2e-6)
    assert len(grads) == len(rg)
    for g, r in zip(grads, rg):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision_inputs(dtype, backend):
    x, y, h, s, b = _inputs(33, 19, 4, "softmax", dtype=dtype)
    loss, grads = _loss_and_grads(x, y, h, s, b, "softmax", backend)
    rl, rg = _reference64(x, y, h, s, b, "softmax")
    assert loss.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, torch.float32]
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(loss.double(), rl, rtol=tol, atol=tol)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())


def test_cpu_column_underflow_is_repaired():
    # Text 0 is anti-aligned with every image: its logits are ~200 below the tile's maximum, so
    # exp(S - tile max) underflows in fp32; the CPU path must recompute that column exactly.
    B, D = 24, 8
    x = F.normalize(torch.randn(B, D, dtype=torch.float64) * 0.05 + torch.eye(D)[0], dim=1)
    y = x.clone()
    y[0] = -x.mean(0)
    y = F.normalize(y, dim=1)
    s = torch.tensor(100.0, dtype=torch.float64)
    ins32 = [t.float().requires_grad_() for t in (x, y, s)]
    loss = contrastive_loss(*ins32, backend="cpu")
    grads = torch.autograd.grad(loss, ins32)
    ins64 = [t.clone().requires_grad_() for t in (x, y, s)]
    rl = contrastive_loss_reference(*ins64)
    rg = torch.autograd.grad(rl, ins64)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def test_reference_is_open_clip_cliploss():
    # open_clip ClipLoss.forward at world size 1, written out (logits_per_text computed as its own
    # product, as open_clip does) and NegCLIP's truncated text->image logits.
    x, y, h, s, _ = _inputs(13, 9, 4)
    lpi = s * x @ y.T
    lpt = s * y @ x.T
    labels = torch.arange(13)
    want = (F.cross_entropy(lpi, labels) + F.cross_entropy(lpt, labels)) / 2
    torch.testing.assert_close(contrastive_loss_reference(x, y, s), want)
    cat = torch.cat([y, h])
    lpi = s * x @ cat.T
    want = (F.cross_entropy(lpi, labels) + F.cross_entropy(lpi.T[:13], labels)) / 2
    torch.testing.assert_close(contrastive_loss_reference(x, y, s, hard_negative_features=h), want)


def test_sigmoid_matches_siglip_formula():
    x, y, _, s, b = _inputs(11, 7, 0, "sigmoid")
    logits = s * x @ y.T + b
    labels = 2 * torch.eye(11, dtype=logits.dtype) - 1
    want = -F.logsigmoid(labels * logits).sum() / 11
    torch.testing.assert_close(contrastive_loss(x, y, s, kind="sigmoid", logit_bias=b,
                                                backend="cpu"), want)


def test_default_backend_on_cpu_is_cpu_path():
    x, y, _, s, _ = _inputs(9, 5)
    assert torch.allclose(contrastive_loss(x, y, s), contrastive_loss_reference(x, y, s))


def test_bad_inputs():
    x, y, h, s, _ = _inputs(6, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch"):
        contrastive_loss(x, y[:5], s)
    with pytest.raises(ValueError, match="dimension"):
        contrastive_loss(x, y[:, :3], s)
    with pytest.raises(ValueError, match="2-D"):
        contrastive_loss(x[0], y, s)
    with pytest.raises(ValueError, match="2-D"):
        contrastive_loss(x, y[None], s)
    with pytest.raises(TypeError, match="floating"):
        contrastive_loss(x.long(), y, s)
    with pytest.raises(ValueError, match="0-dim"):
        contrastive_loss(x, y, s.reshape(1))
    with pytest.raises(TypeError):
        contrastive_loss(x, y, 3.0)
    with pytest.raises(ValueError, match="dimension"):
        contrastive_loss(x, y, s, hard_negative_features=h[:, :3])
    with pytest.raises(ValueError, match="kind"):
        contrastive_loss(x, y, s, kind="hinge")
    with pytest.raises(ValueError, match="sigmoid"):
        contrastive_loss(x, y, s, logit_bias=torch.tensor(0.0))
    with pytest.raises(ValueError, match="backend"):
        contrastive_loss(x, y, s, backend="cuda")
    with pytest.raises(ValueError):
        topk_scores(x, y[:, :3], 2)
    with pytest.raises(ValueError):
        topk_scores(x, y, 0)
    with pytest.raises(TypeError):
        topk_scores(x, y, 2.0)
    with pytest.raises(TypeError):
        topk_scores(x.long(), y, 2)
    with pytest.raises(ValueError):
        topk_scores(x, y[None], 2)


# --------------------------------------------------------------------------- custom op plumbing
def _op_args(backend, kind="softmax", M=3):
    x, y, h, s, b = _inputs(9, 5, M, kind, dtype=torch.float32)
    return (x, y, s, h, b, kind, backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", C.KINDS)
def test_opcheck(backend, kind):
    args = _op_args(backend, kind)
    torch.library.opcheck(torch.ops.fmrt.contrastive_loss.default, args)
    loss, row, col = torch.ops.fmrt.contrastive_loss(*args)
    grad = torch.tensor(1.0)
    x, y, s, h, b = [t.detach() if t is not None else None for t in args[:5]]
    torch.library.opcheck(torch.ops.fmrt.contrastive_loss_backward.default,
                          (grad, x, y, s, h, b, row, col, kind, backend))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_opcheck_topk(backend):
    q, g = torch.randn(3, 17), torch.randn(40, 17)
    torch.library.opcheck(torch.ops.fmrt.topk_scores.default, (q, g, 5, backend))


def test_torch_export_sees_one_node():
    class Loss(torch.nn.Module):
        def forward(self, x, y, s):
            return contrastive_loss(x, y, s)

    x, y, _, s, _ = _inputs(8, 4, dtype=torch.float32)
    ep = torch.export.export(Loss(), (x.detach(), y.detach(), s.detach()))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.fmrt.contrastive_loss.default in targets
    assert not any("mm" in str(t) for t in targets)


def test_torch_compile_backward():
    x, y, h, s, _ = _inputs(12, 6, 3, dtype=torch.float32)
    f = torch.compile(lambda a, b_, c, d: contrastive_loss(a, b_, c, hard_negative_features=d),
                      backend="aot_eager", fullgraph=True)
    loss = f(x, y, s, h)
    got = torch.autograd.grad(loss, (x, y, h, s))
    rl, rg = _reference64(x, y, h, s, None, "softmax")
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, rg):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- top-k
def _assert_topk_equal(got, want, atol=1e-5):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol, equal_nan=True)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Q,N,D,k", [(5, 301, 33, 10), (17, 40, 19, 1), (3, 7, 5, 20)])
def test_topk_matches_reference(backend, gdtype, Q, N, D, k):
    rng = np.random.default_rng(Q * N + D)
    q = torch.from_numpy(rng.standard_normal((Q, D), dtype=np.float32))
    g = torch.from_numpy(rng.standard_normal((N, D), dtype=np.float32)).to(gdtype)
    g[N // 2] = g[1]  # exact ties: lower index first
    s, i = topk_scores(q, g, k, backend=backend)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert s.shape == (Q, min(k, N))
    _assert_topk_equal((s, i), C.topk_scores_reference(q, g, k))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_topk_ties_nan_and_1d(backend):
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [float("nan"), 0.0], [1.0, 0.0],
                      [0.0, 2.0]] + [[-1.0, -1.0]] * 30)
    s, i = topk_scores(q, g, 4, backend=backend)
    assert i[0].tolist() == [3, 0, 1, 4]
    assert math.isnan(s[0, 0].item()) and s[0, 1:].tolist() == [1.0, 1.0, 1.0]
    assert i[1].tolist()[:2] == [3, 5]
    s1, i1 = topk_scores(q[1], g, 2, backend=backend)
    assert s1.shape == (2,) and i1.tolist() == [3, 5]


@pytest.mark.parametrize("backend", ["triton"])
def test_topk_large_k_fallback(backend, monkeypatch):
    from fmrt.kernels import contrastive_triton

    monkeypatch.setattr(contrastive_triton, "TOPK_FUSED_MAX_K", 4)
    q, g = torch.randn(3, 9), torch.randn(50, 9)
    _assert_topk_equal(topk_scores(q, g, 6, backend=backend), C.topk_scores_reference(q, g, 6))


# --------------------------------------------------------------------------- ONNX
def _ort_run(model, args):
    import onnxruntime as ort

    prog = torch.onnx.export(model, args, dynamo=True,
                             custom_translation_table=C.onnx_translation_table(), verbose=False)
    proto = prog.model_proto
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds), {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("kind,hard", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_onnx_export_contrastive(kind, hard):
    pytest.importorskip("onnxruntime")

    class Loss(torch.nn.Module):
        def forward(self, x, y, s, h, b):
            return contrastive_loss(x, y, s, hard_negative_features=h if hard else None, kind=kind,
                                    logit_bias=b if kind == "sigmoid" else None)

    x, y, h, s, b = _inputs(13, 9, 4, "sigmoid", dtype=torch.float32)
    args = tuple(t.detach() for t in (x, y, s, h, b))
    (out, *_), ops = _ort_run(Loss(), args)
    assert "MatMul" in ops and not any(o.startswith("fmrt") for o in ops)
    if kind == "softmax":
        assert "ReduceLogSumExp" in ops
    rl, _ = _reference64(x, y, h if hard else None, s, b if kind == "sigmoid" else None, kind)
    np.testing.assert_allclose(out, rl.item(), rtol=1e-5)


def test_onnx_export_topk():
    pytest.importorskip("onnxruntime")

    class TopK(torch.nn.Module):
        def forward(self, q, g):
            return topk_scores(q, g, 7)

    q, g = torch.randn(4, 19), torch.randn(50, 19)
    (vals, idx), ops = _ort_run(TopK(), (q, g))
    assert {"MatMul", "TopK"} <= ops
    rs, ri = C.topk_scores_reference(q, g, 7)
    np.testing.assert_allclose(vals, rs.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx, ri.numpy())


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,M", [("softmax", 0), ("softmax", 300), ("sigmoid", 0)])
def test_gpu_triton(dtype, kind, M):
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    x, y, h, s, b = _inputs(1031, 512, M, kind, dtype=torch.float32, scale=30.0)
    dev = [t.detach().cuda().to(dtype).requires_grad_() if t is not None and t.dim() == 2 else
           (t.detach().cuda().requires_grad_() if t is not None else None) for t in (x, y, h, s, b)]
    loss, grads = _loss_and_grads(*dev, kind, "triton")
    rl, rg = _reference64(*dev, kind)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), rl, rtol=tol, atol=tol)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())
    qs = torch.randn(16, 512, device="cuda")
    gal = torch.randn(100_003, 512, device="cuda").half()
    _assert_topk_equal(topk_scores(qs, gal, 10), C.topk_scores_reference(qs, gal, 10), atol=1e-3)
