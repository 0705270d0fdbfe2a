"""fmrt._native top-k over inner products: native extension and torch fallback.

Float data is checked against torch.topk over the full score matrix with a tolerance (the
kernels accumulate in a different order than the BLAS matmul, so near-equal scores may swap);
small-integer data makes every score exact, so ordering and tie-breaking are checked exactly
against a stable argsort.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fmrt import _native

HAS_C = _native._C is not None
needs_c = pytest.mark.skipif(
    not HAS_C, reason="fmrt._C is not built (run `make build-ext`); native-specific test"
)

QS = (1, 3, 17)
NS = (1, 5, 1000, 4099)
DS = (7, 64, 129)
DTYPES = (np.float32, np.float16)


def _isas():
    if not HAS_C:
        return ["fallback"]
    isas = ["generic"]
    if _native._C.build_info()["kernel_isa"] == "avx2":
        isas.append("avx2")
    return isas


@pytest.fixture
def use_isa(request):
    """Run the native kernel set named by the test parameter, restoring the default after."""
    if HAS_C:
        _native._C._set_kernel_isa(request.param)
        yield request.param
        _native._C._set_kernel_isa("auto")
    else:
        yield request.param


def _exact_reference(q: np.ndarray, g: np.ndarray, k: int):
    """Top-k by (descending score, ascending index), computed in float64; NaN ranks first."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    s[np.isnan(s)] = np.inf  # integer test data never produces a real inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def _check_against_torch(q, g, k, scores, indices):
    """Tolerance-aware comparison with torch.topk on the full float32 score matrix."""
    g32 = torch.from_numpy(g.astype(np.float32))  # fp16 galleries: the rounded values
    full = torch.from_numpy(q) @ g32.T
    kk = min(k, g.shape[0])
    ref_s, _ = torch.topk(full, kk, dim=1)
    assert scores.shape == indices.shape == (q.shape[0], kk)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    tol = 1e-4 * max(1.0, float(full.abs().max()))
    np.testing.assert_allclose(scores, ref_s.numpy(), rtol=1e-4, atol=tol)
    # the returned scores are the scores of the returned rows ...
    rescored = np.take_along_axis(full.numpy(), indices, axis=1)
    np.testing.assert_allclose(scores, rescored, rtol=1e-4, atol=tol)
    # ... the rows are distinct, and the list is sorted
    for row in indices:
        assert len(set(row.tolist())) == kk
    assert np.all(np.diff(scores, axis=1) <= tol)


# --------------------------------------------------------------------------- native
@needs_c
@pytest.mark.parametrize("use_isa", _isas(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("Q,N,D", list(itertools.product(QS, NS, DS)))
def test_native_matches_torch_topk(use_isa, dtype, Q, N, D):
    rng = np.random.default_rng(Q * 1_000_003 + N * 131 + D)
    q = rng.standard_normal((Q, D)).astype(np.float32)
    g = rng.standard_normal((N, D)).astype(dtype)
    for k in sorted({1, 5, N}):
        s, i = _native._C.topk_ip(q, g, k)
        _check_against_torch(q, g, k, s, i)


@needs_c
@pytest.mark.parametrize("use_isa", _isas(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("Q,N", [(1, 70_000), (3, 30_000), (17, 4099), (33, 2500), (40, 20_000)])
def test_native_ties_exact(use_isa, dtype, num_threads, Q, N):
    """Integer data: heavy ties; order must be (score desc, index asc) for every work split.
    Sizes exceed the kernel's single-thread cutoff (Q*N*D >= 2^21) so threads really split."""
    rng = np.random.default_rng(N + Q)
    D = 33
    q = rng.integers(-2, 3, (Q, D)).astype(np.float32)
    g = rng.integers(-2, 3, (N, D)).astype(dtype)
    for k in (1, 7, 100, N):
        s, i = _native._C.topk_ip(q, g, k, num_threads=num_threads)
        ref_s, ref_i = _exact_reference(q, g, k)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(s, ref_s.astype(np.float32))


@needs_c
def test_native_all_equal_scores_returns_lowest_indices():
    q = np.ones((2, 4), np.float32)
    g = np.zeros((300_000, 4), np.float32)
    s, i = _native._C.topk_ip(q, g, 5, num_threads=2)
    np.testing.assert_array_equal(i, np.tile(np.arange(5), (2, 1)))
    np.testing.assert_array_equal(s, np.zeros((2, 5), np.float32))


@needs_c
def test_native_nan_and_inf_rank_like_torch():
    q = np.ones((1, 3), np.float32)
    g = np.zeros((6, 3), np.float32)
    g[1] = np.inf
    g[4, 0] = np.nan
    g[5] = -np.inf
    s, i = _native._C.topk_ip(q, g, 6)
    assert i[0].tolist() == [4, 1, 0, 2, 3, 5]  # NaN first (as torch.topk), then +inf
    assert np.isnan(s[0, 0]) and s[0, 1] == np.inf and s[0, -1] == -np.inf


@needs_c
def test_native_fp16_special_values():
    """Subnormal, inf and signed zero halves convert exactly (F16C and portable paths)."""
    halves = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, np.inf, 1.0, -2.5],
                      dtype=np.float16)
    g = halves.reshape(-1, 1)
    q = np.ones((1, 1), np.float32)
    for isa in _isas():
        _native._C._set_kernel_isa(isa)
        try:
            for nq in (1, 5):  # row-major and packed paths
                s, i = _native._C.topk_ip(np.repeat(q, nq, 0), g, len(halves))
                expect = g.astype(np.float32)[i[0], 0]
                np.testing.assert_array_equal(s[0], expect)
                assert s[0, 0] == np.inf and s[0, -1] == np.float32(-65504.0)
        finally:
            _native._C._set_kernel_isa("auto")


@needs_c
def test_native_k_clamped_and_empty_inputs():
    q = np.ones((2, 3), np.float32)
    g = np.arange(12, dtype=np.float32).reshape(4, 3)
    s, i = _native._C.topk_ip(q, g, 100)
    assert s.shape == (2, 4) and i[0].tolist() == [3, 2, 1, 0]
    s, i = _native._C.topk_ip(np.zeros((0, 3), np.float32), g, 2)
    assert s.shape == (0, 2) and i.shape == (0, 2)
    s, i = _native._C.topk_ip(q, np.zeros((0, 3), np.float32), 2)
    assert s.shape == (2, 0) and i.shape == (2, 0)


@needs_c
def test_native_rejects_bad_input():
    q = np.ones((2, 3), np.float32)
    g = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="k must be positive"):
        _native._C.topk_ip(q, g, 0)
    with pytest.raises(ValueError, match="k must be positive"):
        _native._C.topk_ip(q, g, -3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        _native._C.topk_ip(q, np.ones((4, 5), np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        _native._C.topk_ip(q[0], g, 1)
    with pytest.raises(TypeError, match="float32"):
        _native._C.topk_ip(q.astype(np.float64), g, 1)
    with pytest.raises(TypeError, match="float32 or float16"):
        _native._C.topk_ip(q, g.astype(np.int32), 1)


@needs_c
def test_native_accepts_non_contiguous():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((6, 16)).astype(np.float32)[::2]
    g = rng.standard_normal((16, 300)).astype(np.float32).T  # Fortran order
    s, i = _native._C.topk_ip(q, g, 10)
    _check_against_torch(np.ascontiguousarray(q), np.ascontiguousarray(g), 10, s, i)


@needs_c
def test_module_info():
    info = _native._C.build_info()
    assert info["version"] == _native._C.__version__
    assert _native._C.num_threads() >= 1
    assert isinstance(_native._C.has_cuda(), bool)
    assert _native._C.kernel_isa() in {"avx2", "generic"}
    with pytest.raises(ValueError):
        _native._C._set_kernel_isa("sse9")


@needs_c
@pytest.mark.skipif(not (HAS_C and _native._C.has_cuda()),
                    reason="fmrt._C built without CUDA (FMRT_BUILD_CUDA=1) or no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_cuda_matches_cpu(dtype):
    rng = np.random.default_rng(11)
    for Q, N, D in [(1, 1, 7), (3, 5, 64), (17, 4099, 129), (40, 20_000, 9)]:
        q = rng.integers(-2, 3, (Q, D)).astype(np.float32)  # exact scores: exact comparison
        g = rng.integers(-2, 3, (N, D)).astype(dtype)
        for k in sorted({1, 5, 100, N}):
            s, i = _native._C.topk_ip_cuda(q, g, k)
            ref_s, ref_i = _exact_reference(q, g, min(k, N))
            np.testing.assert_array_equal(i, ref_i)
            np.testing.assert_array_equal(s, ref_s.astype(np.float32))
        q = rng.standard_normal((Q, D)).astype(np.float32)
        g = rng.standard_normal((N, D)).astype(dtype)
        s, i = _native._C.topk_ip_cuda(q, g, 10)
        _check_against_torch(q, g, 10, s, i)


# --------------------------------------------------------------------------- public API
@pytest.fixture(params=["native", "fallback"])
def mode(request, monkeypatch):
    if request.param == "native":
        if not HAS_C:
            pytest.skip("fmrt._C is not built (run `make build-ext`)")
        monkeypatch.delenv("FMRT_DISABLE_NATIVE", raising=False)
        assert _native.available()
    else:
        monkeypatch.setenv("FMRT_DISABLE_NATIVE", "1")
        assert not _native.available()
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("Q,N,D", [(1, 1, 7), (3, 5, 64), (17, 1000, 129), (3, 4099, 7)])
def test_public_api_matches_torch(mode, dtype, Q, N, D):
    rng = np.random.default_rng(Q + N + D)
    q = rng.standard_normal((Q, D)).astype(np.float32)
    g = rng.standard_normal((N, D)).astype(dtype)
    for k in sorted({1, 5, N}):
        s, i = _native.topk_inner_product(q, g, k)
        _check_against_torch(q, g, k, s, i)


def test_public_api_ties_exact(mode):
    rng = np.random.default_rng(5)
    q = rng.integers(-2, 3, (5, 8)).astype(np.float32)
    g = rng.integers(-2, 3, (6000, 8)).astype(np.float16)
    s, i = _native.topk_inner_product(q, g, 64)
    ref_s, ref_i = _exact_reference(q, g, 64)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_public_api_accepts_tensors_and_1d_queries(mode):
    rng = np.random.default_rng(6)
    g = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal(8).astype(np.float32))
    s, i = _native.topk_inner_product(q, g, 4)
    assert s.shape == (4,) and i.shape == (4,)
    ref = torch.topk(g @ q, 4)
    np.testing.assert_allclose(s, ref.values.numpy(), rtol=1e-5, atol=1e-5)
    # float64 and bfloat16 inputs are accepted (cast to float32)
    s64, _ = _native.topk_inner_product(q.double(), g.double(), 4)
    np.testing.assert_allclose(s64, s, rtol=1e-5, atol=1e-5)
    sbf, _ = _native.topk_inner_product(q, g.bfloat16(), 4)
    assert sbf.dtype == np.float32


def test_public_api_errors(mode):
    q = np.ones((2, 3), np.float32)
    g = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="k must be positive"):
        _native.topk_inner_product(q, g, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        _native.topk_inner_product(q, g, 2.0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        _native.topk_inner_product(q, np.ones((4, 2), np.float32), 1)
    with pytest.raises(ValueError, match="gallery must be 2-D"):
        _native.topk_inner_product(q, np.ones(3, np.float32), 1)
    with pytest.raises(ValueError, match="queries must be"):
        _native.topk_inner_product(np.ones((1, 2, 3), np.float32), g, 1)
    with pytest.raises(TypeError, match="floating point"):
        _native.topk_inner_product(q, g.astype(np.int64), 1)
    with pytest.raises(TypeError, match="real numbers"):
        _native.topk_inner_product(q, np.array([["a", "b", "c"]]), 1)


def test_public_api_k_clamped(mode):
    q = np.ones((1, 2), np.float32)
    g = np.array([[1, 0], [3, 0], [2, 0]], np.float32)
    s, i = _native.topk_inner_product(q, g, 10)
    assert i.tolist() == [[1, 2, 0]] and s.tolist() == [[3.0, 2.0, 1.0]]


def test_fallback_multi_block_merge(monkeypatch):
    """Force tiny fallback blocks so the cross-block merge (and its tie order) is exercised."""
    monkeypatch.setattr(_native, "_FALLBACK_SCORE_BUDGET", 1)  # -> 1024-row blocks
    rng = np.random.default_rng(7)
    q = rng.integers(-2, 3, (3, 6)).astype(np.float32)
    g = rng.integers(-2, 3, (5000, 6)).astype(np.float32)
    g[[7, 2500, 4999]] = np.nan
    for k in (1, 10, 3000):
        s, i = _native.topk_inner_product_fallback(q, g, k)
        assert i[:, :3].tolist() == [[7, 2500, 4999][:k]] * 3  # NaN rows first, by index
        _, ref_i = _exact_reference(q, g, k)
        np.testing.assert_array_equal(i, ref_i)


def test_fmrt_imports_without_extension(monkeypatch):
    """With the extension unavailable, the public entry points still work."""
    monkeypatch.setattr(_native, "_C", None)
    assert not _native.available()
    assert _native.build_info() == {}
    s, i = _native.topk_inner_product(np.ones((1, 2), np.float32), np.eye(2, dtype=np.float32), 1)
    assert i.tolist() == [[0]]
