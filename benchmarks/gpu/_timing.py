"""Shared timer of the GPU benchmark modules (``benchmarks/gpu/bench_*.py``)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds: CUDA events on a GPU (each iteration
    synchronised, so asynchronous launches are counted in full), one ``perf_counter`` run on CPU
    (smoke runs of these scripts under the Triton interpreter)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
