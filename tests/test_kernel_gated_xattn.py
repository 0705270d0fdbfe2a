"""Flamingo gated cross-attention (``fmrt.kernels.gated_xattn``): cpu and Triton (interpreter)
backends against a float64 dense reference, forward and every gradient, over media layouts that
hit the edge cases (no image, image at position 0, adjacent images, image last, more ``<image>``
tokens than images), both masking modes, zero gates, the custom op, ONNX export, bad inputs."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmrt.kernels import gated_xattn as G

# Odd sizes on purpose: T=37 spans two 32-row Triton query blocks, dim_head=12 pads to 16,
# n_latents=5 makes image boundaries fall inside 32-key blocks.
B, T, D, T_IMG, N_LAT, D_MEDIA, HEADS, DH = 2, 37, 29, 3, 5, 19, 2, 12
INNER = HEADS * DH
NAMES = ("x", "media", "alpha", "ln_weight", "ln_bias", "to_q", "to_kv", "to_out")

LAYOUTS = {
    "no_image": [],
    "image_at_0": [0, 20],
    "adjacent": [4, 5, 6],
    "image_last": [T - 1],
    "more_tokens_than_images": [2, 9, 15, 22, 30],  # 5 <image> tokens, T_IMG = 3 images
    "two_per_block": [1, 3, 33, 34],
}


def _locations(layout: str) -> torch.Tensor:
    locs = torch.zeros(B, T, dtype=torch.bool)
    locs[0, LAYOUTS[layout]] = True
    locs[1, [7, 8, 25]] = True  # a second, different row: per-row segments and offsets
    return locs


def _params(dtype=torch.float64, alpha=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    return {
        "x": r(B, T, D), "media": r(B, T_IMG, N_LAT, D_MEDIA),
        "alpha": torch.tensor([alpha], dtype=dtype),
        "ln_weight": 1 + r(D, s=0.2), "ln_bias": r(D, s=0.2),
        # scores of order 1-3, so the softmax is far from uniform and the test is sensitive
        "to_q": r(INNER, D, s=0.6), "to_kv": r(2 * INNER, D_MEDIA, s=0.6), "to_out": r(D, INNER, s=0.3),
    }


def _call(fn, p, locs, **kw):
    return fn(p["x"], p["media"], locs, p["alpha"], ln_weight=p["ln_weight"], ln_bias=p["ln_bias"],
              to_q=p["to_q"], to_kv=p["to_kv"], to_out=p["to_out"], heads=HEADS, **kw)


def _fwd_bwd(fn, p, locs, grad, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    out = _call(fn, leaves, locs, **kw)
    grads = torch.autograd.grad(out, [leaves[k] for k in NAMES], grad.to(out.dtype))
    return out.detach(), dict(zip(NAMES, grads))


def _open_flamingo_dense(p, locs, immediate=True):
    """open_flamingo's MaskedCrossAttention + gate, transcribed (einsum -> matmul): the -finfo.max
    fill, the detached row-max subtraction and the zeroing of index-0 rows in the immediate mode."""
    x, media = p["x"], p["media"]
    b, t, d = x.shape
    _, t_img, n, dm = media.shape
    q = F.layer_norm(x, (d,), p["ln_weight"], p["ln_bias"]) @ p["to_q"].T
    k, v = (media.reshape(b, t_img * n, dm) @ p["to_kv"].T).chunk(2, dim=-1)
    q, k, v = (z.reshape(b, z.shape[1], HEADS, DH).transpose(1, 2) for z in (q, k, v))
    sim = (q * DH ** -0.5) @ k.transpose(-1, -2)
    text_time = locs.cumsum(-1)
    media_time = torch.arange(t_img) + 1
    op = torch.eq if immediate else torch.ge
    mask = op(text_time[:, None, :, None], media_time.repeat_interleave(n)[None, None, None, :])
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    if immediate:
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    o = (attn @ v).transpose(1, 2).reshape(b, t, INNER)
    return x + p["alpha"].tanh() * (o @ p["to_out"].T)


# --------------------------------------------------------------------------- media index
def test_media_token_index():
    locs = torch.tensor([[False, True, False, True, True, False], [True] + [False] * 5])
    assert G.media_token_index(locs).tolist() == [[0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1]]
    ids = torch.tensor([[5, 9, 5, 9, 9, 5]])
    assert G.media_token_index(ids, media_token_id=9).tolist() == [[0, 1, 1, 2, 3, 3]]
    assert G.media_token_index(locs).dtype == torch.int64
    with pytest.raises(TypeError):
        G.media_token_index(ids)  # ids without media_token_id
    with pytest.raises(TypeError):
        G.media_token_index(torch.zeros(1, 3), media_token_id=1)


# --------------------------------------------------------------------------- reference sanity
@pytest.mark.parametrize("immediate", [True, False])
def test_reference_matches_open_flamingo_where_defined(immediate):
    # Where open_flamingo's semantics are well defined (every token sees >= 1 existing image)
    # our reference must agree with it; the edge cases are checked separately below.
    p = _params()
    locs = torch.zeros(B, T, dtype=torch.bool)
    locs[0, [0, 11, 12]] = True
    locs[1, [0, 30]] = True
    ours = _call(G.gated_cross_attention_reference, p, locs, only_attend_immediate_media=immediate)
    torch.testing.assert_close(ours, _open_flamingo_dense(p, locs, immediate), rtol=0, atol=1e-12)


@pytest.mark.parametrize("immediate", [True, False])
def test_reference_zero_rows(immediate):
    p = _params()
    locs = _locations("more_tokens_than_images")
    out = _call(G.gated_cross_attention_reference, p, locs, only_attend_immediate_media=immediate)
    idx = G.media_token_index(locs)
    zero_rows = (idx == 0) | ((idx > T_IMG) if immediate else torch.zeros_like(idx, dtype=torch.bool))
    assert torch.equal(out[zero_rows], p["x"][zero_rows])
    assert (out[~zero_rows] != p["x"][~zero_rows]).any(-1).all()


# --------------------------------------------------------------------------- backends vs reference
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all_previous"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_and_gradients_vs_float64_reference(backend, layout, immediate):
    locs = _locations(layout)
    p64 = _params()
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_g = _fwd_bwd(G.gated_cross_attention_reference, p64, locs, grad,
                              only_attend_immediate_media=immediate)
    # cpu runs in float64 itself (tight check); the Triton interpreter in float32.
    dtype, tol = (torch.float64, 1e-10) if backend == "cpu" else (torch.float32, 2e-5)
    p = {k: v.to(dtype) for k, v in p64.items()}
    out, g = _fwd_bwd(G.gated_cross_attention, p, locs, grad, backend=backend,
                      only_attend_immediate_media=immediate)
    assert out.dtype == dtype
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=tol * scale(ref_out))
    for k in NAMES:
        assert g[k].shape == p[k].shape, k
        torch.testing.assert_close(g[k].double(), ref_g[k], rtol=0, atol=tol * scale(ref_g[k]), msg=k)
    # tokens that see no image: exactly x, in every backend
    idx = G.media_token_index(locs)
    empty = (idx == 0) | ((idx > T_IMG) if immediate else torch.zeros_like(idx, dtype=torch.bool))
    assert torch.equal(out[empty], p["x"][empty])


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all_previous"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_unseen_images_are_never_read(backend, immediate):
    # Row 0 has two <image> tokens, so image 3's latents are visible to none of its tokens. Fill
    # them with NaN: a dense formulation multiplies them by a zero probability and returns NaN
    # (0 * NaN); the segment path and the Triton kernel (key loop bounded by the images present
    # in each query block) never load them.
    locs = torch.zeros(B, T, dtype=torch.bool)
    locs[0, [2, 9]] = True
    locs[1, [7, 8, 25]] = True
    dtype = torch.float64 if backend == "cpu" else torch.float32
    p = _params(dtype=dtype)
    clean = dict(p, media=p["media"].clone())
    clean["media"][0, 2] = 0.0
    p["media"] = p["media"].clone()
    p["media"][0, 2] = float("nan")
    out = _call(G.gated_cross_attention, p, locs, backend=backend, only_attend_immediate_media=immediate)
    assert torch.isfinite(out).all()
    ref = _call(G.gated_cross_attention_reference, {k: v.double() for k, v in clean.items()}, locs,
                only_attend_immediate_media=immediate)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-10 if backend == "cpu" else 2e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("immediate", [True, False])
def test_zero_gate_is_identity_with_nonzero_alpha_grad(backend, immediate):
    dtype = torch.float64 if backend != "triton" else torch.float32
    p = _params(dtype=dtype, alpha=0.0)
    locs = _locations("adjacent")
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    out, g = _fwd_bwd(G.gated_cross_attention, p, locs, grad, backend=backend,
                      only_attend_immediate_media=immediate)
    assert torch.equal(out, p["x"])  # bit for bit
    _, ref_g = _fwd_bwd(G.gated_cross_attention_reference, _params(alpha=0.0), locs, grad.double(),
                        only_attend_immediate_media=immediate)
    assert g["alpha"].abs().item() > 1e-3
    torch.testing.assert_close(g["alpha"].double(), ref_g["alpha"], rtol=1e-5, atol=0)
    # the weights behind the gate get no gradient at alpha = 0, x gets exactly grad
    assert torch.equal(g["to_q"], torch.zeros_like(g["to_q"]))
    assert torch.equal(g["x"], grad)


def test_zero_dim_alpha_and_grad_shape():
    p = _params()
    p["alpha"] = p["alpha"].reshape(())
    locs = _locations("image_at_0")
    grad = torch.randn(B, T, D, dtype=torch.float64)
    ref_out, ref_g = _fwd_bwd(G.gated_cross_attention_reference, p, locs, grad)
    out, g = _fwd_bwd(G.gated_cross_attention, p, locs, grad, backend="cpu")
    assert g["alpha"].shape == ()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(g["alpha"], ref_g["alpha"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs_forward_and_gradients(dtype):
    # bf16 under the interpreter goes through fp32 dots (the interpreter has no bf16 dot); on a GPU
    # the same kernel runs native bf16 tensor-core dots (tests marked gpu).
    locs = _locations("two_per_block")
    p = {k: v.to(dtype) for k, v in _params().items()}
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_out, ref_g = _fwd_bwd(G.gated_cross_attention_reference, {k: v.double() for k, v in p.items()},
                              locs, grad)
    out, g = _fwd_bwd(G.gated_cross_attention, p, locs, grad, backend="triton")
    # torch's own half-precision run of the dense formulation sets the error budget
    t_out, t_g = _fwd_bwd(G.gated_cross_attention_reference, p, locs, grad)
    assert out.dtype == dtype
    for name, got, tq, ref in [("out", out, t_out, ref_out)] + [(k, g[k], t_g[k], ref_g[k]) for k in NAMES]:
        assert got.dtype == dtype, name
        err = (got.double() - ref).abs().max().item()
        budget = (tq.double() - ref).abs().max().item()
        assert err <= 2 * budget + 4 * torch.finfo(dtype).eps * ref.abs().max().item(), (name, err, budget)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_inputs(dtype):
    locs = _locations("adjacent")
    ph = {k: v.to(dtype).requires_grad_(True) for k, v in _params().items()}
    ref = _call(G.gated_cross_attention_reference, {k: v.detach().double() for k, v in ph.items()}, locs)
    out = _call(G.gated_cross_attention, ph, locs, backend="cpu")
    assert out.dtype == dtype
    # computed in fp32, rounded once: within a few output ulps (|out| reaches ~8)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2 * ulp)
    out.sum().backward()
    assert all(ph[k].grad.dtype == dtype and torch.isfinite(ph[k].grad).all() for k in NAMES)


@pytest.mark.parametrize("immediate", [True, False])
def test_cpu_path_without_aten_flash_ops(monkeypatch, immediate):
    # the plain matmul / softmax fallback used if ATen's CPU flash-attention ops disappear
    monkeypatch.setattr(G, "_FLASH_CPU", None)
    monkeypatch.setattr(G, "_FLASH_CPU_BWD", None)
    locs = _locations("more_tokens_than_images")
    p = _params()
    grad = torch.randn(B, T, D, dtype=torch.float64)
    ref_out, ref_g = _fwd_bwd(G.gated_cross_attention_reference, p, locs, grad,
                              only_attend_immediate_media=immediate)
    out, g = _fwd_bwd(G.gated_cross_attention, p, locs, grad, backend="cpu",
                      only_attend_immediate_media=immediate)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for k in NAMES:
        torch.testing.assert_close(g[k], ref_g[k], rtol=0, atol=1e-11, msg=k)


def test_all_rows_valid_and_no_rows_valid_fast_paths():
    # image at position 0 in every row -> no gather/scatter; no image anywhere -> no attention
    p = _params()
    grad = torch.randn(B, T, D, dtype=torch.float64)
    for locs in (torch.zeros(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0, 13]), True),
                 torch.zeros(B, T, dtype=torch.bool)):
        ref_out, ref_g = _fwd_bwd(G.gated_cross_attention_reference, p, locs, grad)
        out, g = _fwd_bwd(G.gated_cross_attention, p, locs, grad, backend="cpu")
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
        for k in NAMES:
            torch.testing.assert_close(g[k], ref_g[k], rtol=0, atol=1e-11, msg=k)


# --------------------------------------------------------------------------- FFN + block
def test_gated_ffn_forward_and_grads():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(D, generator=g, dtype=torch.float64).requires_grad_()
    w1 = torch.randn(4 * D, D, generator=g, dtype=torch.float64).requires_grad_()
    w2 = torch.randn(D, 4 * D, generator=g, dtype=torch.float64).requires_grad_()
    out = G.gated_ffn(x, beta, ln_weight=w, ln_bias=b, w1=w1, w2=w2)
    ff = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, 4 * D, bias=False), torch.nn.GELU(),
                             torch.nn.Linear(4 * D, D, bias=False)).double()
    with torch.no_grad():
        ff[0].weight.copy_(w), ff[0].bias.copy_(b), ff[1].weight.copy_(w1), ff[3].weight.copy_(w2)
    torch.testing.assert_close(out, x + torch.tanh(beta) * ff(x))
    small = [t.detach()[tuple(slice(0, 5) for _ in range(t.dim()))].clone().requires_grad_(True)
             for t in (x[:1, :2], beta, w, b, w1, w2)]  # d = 5, hidden = 5: a fast gradcheck
    torch.autograd.gradcheck(
        lambda *a: G.gated_ffn(a[0], a[1], ln_weight=a[2], ln_bias=a[3], w1=a[4], w2=a[5]), small)
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    y = G.gated_ffn(x, zero, ln_weight=w, ln_bias=b, w1=w1, w2=w2)
    assert torch.equal(y, x)
    y.sum().backward()
    assert zero.grad.abs().item() > 0


def test_block_matches_open_flamingo_layout_and_semantics():
    torch.manual_seed(0)
    blk = G.GatedCrossAttentionBlock(dim=D, dim_visual=D_MEDIA, dim_head=DH, heads=HEADS, ff_mult=2,
                                     backend="cpu").double()
    assert sorted(blk.state_dict()) == sorted([
        "attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight",
        "attn.to_out.weight", "attn_gate", "ff.0.weight", "ff.0.bias", "ff.1.weight", "ff.3.weight",
        "ff_gate"])
    p = _params()
    locs = torch.zeros(B, T, dtype=torch.bool)
    locs[:, [0, 17]] = True
    assert torch.equal(blk(p["x"], p["media"], locs), p["x"])  # gates init to 0: identity
    with torch.no_grad():
        blk.attn_gate.fill_(0.6), blk.ff_gate.fill_(-0.3)
    out = blk(p["x"], p["media"], locs)
    a = blk.attn
    q = dict(x=p["x"], media=p["media"], alpha=blk.attn_gate, ln_weight=a.norm.weight, ln_bias=a.norm.bias,
             to_q=a.to_q.weight, to_kv=a.to_kv.weight, to_out=a.to_out.weight)
    h = _open_flamingo_dense(q, locs)
    expect = h + blk.ff_gate.tanh() * blk.ff(h)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in blk.parameters())


# --------------------------------------------------------------------------- custom op
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    dtype = torch.float64 if backend == "cpu" else torch.float32
    p = {k: v.to(dtype).requires_grad_(True) for k, v in _params().items()}
    locs = _locations("more_tokens_than_images")
    args = (p["x"], p["media"], locs, p["alpha"], p["ln_weight"], p["ln_bias"], p["to_q"], p["to_kv"],
            p["to_out"], HEADS, True, 1e-5, backend)
    torch.library.opcheck(torch.ops.fmrt.gated_xattn.default, args)
    out, q, kv, o, lse = torch.ops.fmrt.gated_xattn(*args)
    grad = torch.randn_like(out)
    bargs = (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:9]], q, kv, o, lse,
             *args[9:])
    torch.library.opcheck(torch.ops.fmrt.gated_xattn_backward.default, bargs)


def test_torch_export_sees_one_node():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = G.GatedCrossAttentionBlock(dim=D, dim_visual=D_MEDIA, dim_head=DH, heads=HEADS,
                                                  backend="cpu")

        def forward(self, x, media, locs):
            return self.blk(x, media, locs)

    p = _params(dtype=torch.float32)
    ep = torch.export.export(M(), (p["x"], p["media"], _locations("adjacent")))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fmrt.gated_xattn.default) == 1


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise():
    p = _params(dtype=torch.float32)
    locs = _locations("adjacent")

    def call(**over):
        q = dict(p)
        loc = over.pop("locs", locs)
        q.update(over)
        return _call(G.gated_cross_attention, q, loc, backend=over.pop("backend", "cpu"))

    with pytest.raises(TypeError, match="bool"):
        call(locs=locs.long())
    with pytest.raises(ValueError, match="media_locations"):
        call(locs=locs[:, :-1])
    with pytest.raises(ValueError, match="media"):
        call(media=p["media"][0])
    with pytest.raises(ValueError, match="media"):
        call(media=p["media"][:, :0])
    with pytest.raises(TypeError, match="dtype"):
        call(media=p["media"].double())
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=torch.zeros(2))
    with pytest.raises(ValueError, match="to_kv"):
        call(to_kv=p["to_kv"][:, :-1])
    with pytest.raises(ValueError, match="to_out"):
        call(to_out=p["to_out"][:-1])
    with pytest.raises(ValueError, match="ln_weight"):
        call(ln_weight=p["ln_weight"][:-1])
    with pytest.raises(ValueError, match="x must be"):
        call(x=p["x"][0])
    with pytest.raises(TypeError):
        call(x=p["x"].long())
    with pytest.raises(ValueError, match="unknown kernel backend"):
        _call(G.gated_cross_attention, p, locs, backend="cuda")
    with pytest.raises(ValueError, match="divisible"):
        G.gated_cross_attention(p["x"], p["media"], locs, p["alpha"], ln_weight=p["ln_weight"],
                                ln_bias=p["ln_bias"], to_q=p["to_q"], to_kv=p["to_kv"],
                                to_out=p["to_out"], heads=5)
    with pytest.raises(ValueError, match="dim_head"):
        _call(G.gated_cross_attention, p, locs, dim_head=DH + 1)
    with pytest.raises(ValueError, match="beta"):
        G.gated_ffn(p["x"], torch.zeros(3), ln_weight=p["ln_weight"], ln_bias=p["ln_bias"],
                    w1=torch.zeros(8, D), w2=torch.zeros(D, 8))
    with pytest.raises(ValueError, match="w1"):
        G.gated_ffn(p["x"], torch.zeros(()), ln_weight=p["ln_weight"], ln_bias=p["ln_bias"],
                    w1=torch.zeros(8, D), w2=torch.zeros(D, 7))


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("immediate", [True, False])
def test_onnx_export_runs_in_onnxruntime(tmp_path, immediate):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    class M(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in p.items()
                                             if k not in ("x", "media")})

        def forward(self, x, media, locs):
            q = dict(self.p, x=x, media=media)
            return _call(G.gated_cross_attention, q, locs, backend="cpu",
                         only_attend_immediate_media=immediate)

    p = _params(dtype=torch.float32)
    locs = _locations("more_tokens_than_images")
    m = M(p).eval()
    prog = torch.onnx.export(m, (p["x"], p["media"], locs), dynamo=True, opset_version=18,
                             custom_translation_table=G.onnx_translation_table())
    path = str(tmp_path / "gx.onnx")
    prog.save(path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"MatMul", "Softmax", "Where", "CumSum"} <= ops and not any("fmrt" in o for o in ops)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (p["x"], p["media"], locs))}
    got = sess.run(None, feeds)[0]
    ref = _call(G.gated_cross_attention_reference, _params(), locs,
                only_attend_immediate_media=immediate).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("immediate", [True, False])
def test_gpu_triton_vs_reference(dtype, immediate):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support in this build")
    g = torch.Generator().manual_seed(0)
    b, t, d, ti, n, dm, h, dh = 2, 1000, 256, 4, 64, 192, 4, 64
    locs = torch.zeros(b, t, dtype=torch.bool)
    locs[0, [10, 300, 301, 700, 950]] = True  # 5 tokens for 4 images, adjacent pair
    locs[1, [0, 64, 500, 999]] = True
    p64 = {"x": torch.randn(b, t, d, generator=g, dtype=torch.float64),
           "media": torch.randn(b, ti, n, dm, generator=g, dtype=torch.float64),
           "alpha": torch.tensor([0.5], dtype=torch.float64),
           "ln_weight": torch.ones(d, dtype=torch.float64), "ln_bias": torch.zeros(d, dtype=torch.float64),
           "to_q": torch.randn(h * dh, d, generator=g, dtype=torch.float64) / d ** 0.5,
           "to_kv": torch.randn(2 * h * dh, dm, generator=g, dtype=torch.float64) / dm ** 0.5,
           "to_out": torch.randn(d, h * dh, generator=g, dtype=torch.float64) / (h * dh) ** 0.5}
    grad = torch.randn(b, t, d, generator=g, dtype=torch.float64)

    def run(p, backend):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        out = G.gated_cross_attention(leaves["x"], leaves["media"], locs.to(leaves["x"].device),
                                      leaves["alpha"], ln_weight=leaves["ln_weight"],
                                      ln_bias=leaves["ln_bias"], to_q=leaves["to_q"],
                                      to_kv=leaves["to_kv"], to_out=leaves["to_out"], heads=h,
                                      only_attend_immediate_media=immediate, backend=backend)
        gr = torch.autograd.grad(out, [leaves[k] for k in NAMES], grad.to(out))
        return [out] + list(gr)

    ref = run(p64, "reference")
    got = run({k: v.to("cuda", dtype) for k, v in p64.items()}, "triton")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, r in zip(("out",) + NAMES, got, ref):
        err = (a.double().cpu() - r).abs().max().item() / max(1.0, r.abs().max().item())
        assert err < tol, (name, err)
