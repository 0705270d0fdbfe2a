"""Fused native top-k (``fmrt._C``) vs torch full matmul + ``torch.topk`` (pytest-benchmark).

Run: ``pytest benchmarks/bench_topk.py --benchmark-only`` (or ``make bench``). Each group is
one shape; a ratio table (torch time / native time, from the best round) is printed in a
"benchmark summary" section. ``FMRT_BENCH_THREADS=n`` pins both sides to n threads.

The torch baseline for fp16 galleries converts the gallery to float32 per call, which is what
keeping an fp16 gallery costs without a fused kernel (CPU fp16 matmul is slower still).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fmrt import _native

D = 128
K = 10
SIZES = (10_000, 100_000)
QUERIES = (1, 32)
DTYPES = {"fp32": np.float32, "fp16": np.float16}

_RESULTS: dict = {}  # (N, Q, dtype) -> {impl: best seconds}

# FMRT_BENCH_THREADS=n pins both implementations to n threads (default: library defaults).
THREADS = int(os.environ.get("FMRT_BENCH_THREADS", "0") or 0)
if THREADS:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module", autouse=True)
def _ratio_report(bench_summary):
    yield
    rows = [(key, r) for key, r in sorted(_RESULTS.items()) if {"native", "torch"} <= r.keys()]
    if not rows:
        return
    isa = _native.build_info().get("kernel_isa", "n/a")
    bench_summary.append(f"top-k inner product, D={D}, k={K}, threads={THREADS or torch.get_num_threads()}, "
                         f"native kernels: {isa}; best round of each")
    bench_summary.append(f"{'N':>8} {'Q':>3} {'gallery':>7} {'native ms':>10} {'torch ms':>9} {'speedup':>8}")
    for (n, q, dt), r in rows:
        bench_summary.append(f"{n:>8} {q:>3} {dt:>7} {r['native'] * 1e3:>10.3f} "
                             f"{r['torch'] * 1e3:>9.3f} {r['torch'] / r['native']:>7.2f}x")


def _data(n: int, q: int, dtype):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((q, D)).astype(np.float32)
    gallery = rng.standard_normal((n, D)).astype(dtype)
    return queries, gallery


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("q", QUERIES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_topk(benchmark, impl, n, q, dtype):
    queries, gallery = _data(n, q, DTYPES[dtype])
    benchmark.group = f"topk N={n} Q={q} {dtype}"
    if impl == "native":
        if not _native.available():
            pytest.skip("fmrt._C is not built or FMRT_DISABLE_NATIVE is set")

        def run():
            return _native.topk_inner_product(queries, gallery, K, num_threads=THREADS or None)
    else:
        tq, tg = torch.from_numpy(queries), torch.from_numpy(gallery)

        def run():
            g = tg.float() if tg.dtype != torch.float32 else tg
            return torch.topk(tq @ g.T, K, dim=1)

    out = benchmark(run)
    assert tuple(out[1].shape) == (q, K)
    _RESULTS.setdefault((n, q, dtype), {})[impl] = benchmark.stats.stats.min
