"""Fused SAM mask decoding (``fmrt.kernels.decode_masks``, CPU path) vs segment-anything's unfused
``MaskDecoder.output_upscaling`` + hypernetwork product (pytest-benchmark).

Run: ``pytest benchmarks/bench_mask_decode.py --benchmark-only``. Each group is one case at SAM's
real size (image embedding 256 x 64 x 64 -> masks 256 x 256, C1=64, C2=32, M=4 mask tokens):

  * ``all``       B=1, all 4 masks.
  * ``best``      B=1, best of masks 1..3 by the IoU prediction. The baseline computes all 4 masks
                  then selects (what SAM does); the fused path selects first and computes one.
  * ``multimask`` B=8 prompts, masks 1..3 (SAM's ``multimask_output=True``).

The summary prints, per case, time (best round) and the ratio unfused / fused, plus the peak
bytes allocated by one call of each (from torch's profiler allocation events; the inputs and
weights exist before the call and are not counted). ``FMRT_BENCH_THREADS=n`` pins both sides to
n threads (on a shared machine, n=1 avoids OpenMP barrier stalls when another process holds a core).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from fmrt.kernels.mask_decode import decode_masks, upscaling_params

THREADS = int(os.environ.get("FMRT_BENCH_THREADS", "0") or 0)
if THREADS:
    torch.set_num_threads(THREADS)

CASES = {"all": (1, "all"), "best": (1, "best"), "multimask": (8, "multimask")}
_RESULTS: dict = {}   # case -> {impl: (best seconds, peak bytes)}


def _sam_output_upscaling() -> torch.nn.Module:
    """segment_anything's MaskDecoder (random init, transformer_dim=256) without the package
    __init__, which imports the absent torchvision."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything is not installed")
    root = os.path.join(list(spec.submodule_search_locations)[0], "modeling")
    pkg = "_fmrt_bench_sam.modeling"
    if pkg + ".mask_decoder" not in sys.modules:
        for name, path in (("_fmrt_bench_sam", os.path.dirname(root)), (pkg, root)):
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
        for sub in ("common", "mask_decoder"):
            s = importlib.util.spec_from_file_location(f"{pkg}.{sub}", os.path.join(root, f"{sub}.py"))
            m = importlib.util.module_from_spec(s)
            sys.modules[s.name] = m
            s.loader.exec_module(m)
    torch.manual_seed(0)
    dec = sys.modules[pkg + ".mask_decoder"].MaskDecoder(transformer_dim=256,
                                                         transformer=torch.nn.Identity())
    return dec.output_upscaling.eval()


def _peak_alloc_bytes(fn) -> float:
    """Peak of (allocated - freed) bytes over one call, from the profiler's allocation events."""
    try:
        from torch._C._profiler import _EventType

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            fn()
        events = []

        def walk(node):
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            for child in node.children:
                walk(child)

        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
    except Exception:  # noqa: BLE001 - private profiler API; the timing stands without it
        return float("nan")
    cur = peak = 0
    for _, size in sorted(events):
        cur += size
        peak = max(peak, cur)
    return float(peak)


@pytest.fixture(scope="module")
def sam_setup():
    up = _sam_output_upscaling()
    with torch.no_grad():
        up[1].weight.normal_(1.0, 0.2)
        up[1].bias.normal_(0.0, 0.2)
    return up, {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in upscaling_params(up).items()}


@pytest.fixture(scope="module", autouse=True)
def _ratio_report(bench_summary):
    yield
    rows = [(c, r) for c, r in _RESULTS.items() if {"fused", "unfused"} <= r.keys()]
    if not rows:
        return
    bench_summary.append(f"SAM mask decode, 256x64x64 -> Mx256x256, CPU, threads="
                         f"{THREADS or torch.get_num_threads()}; best round of each")
    bench_summary.append(f"{'case':>10} {'B':>2} {'unfused ms':>10} {'fused ms':>9} {'speedup':>8} "
                         f"{'unfused MiB':>11} {'fused MiB':>9} {'mem ratio':>9}")
    for case, r in rows:
        (tu, mu), (tf, mf) = r["unfused"], r["fused"]
        bench_summary.append(f"{case:>10} {CASES[case][0]:>2} {tu * 1e3:>10.2f} {tf * 1e3:>9.2f} "
                             f"{tu / tf:>7.2f}x {mu / 2**20:>11.1f} {mf / 2**20:>9.1f} {mu / mf:>8.1f}x")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_mask_decode(benchmark, sam_setup, impl, case):
    up, params = sam_setup
    B, select = CASES[case]
    g = torch.Generator().manual_seed(1)
    src = torch.randn(B, 256, 64, 64, generator=g)
    hyper = torch.randn(B, 4, 32, generator=g)
    iou = torch.rand(B, 4, generator=g)
    benchmark.group = f"mask decode {case} B={B}"

    if impl == "fused":
        def run():
            return decode_masks(src, hyper, **params, iou_pred=iou, select=select, backend="cpu").masks
    else:
        def run():
            # MaskDecoder.predict_masks + the selection that follows it in SAM
            x = up(src)
            b, c, h, w = x.shape
            masks = (hyper @ x.view(b, c, h * w)).view(b, -1, h, w)
            if select == "multimask":
                return masks[:, 1:]
            if select == "best":
                k = iou[:, 1:].argmax(1) + 1
                return masks[torch.arange(b), k][:, None]
            return masks

    with torch.no_grad():
        out = benchmark(run)
        peak = _peak_alloc_bytes(run)
    assert out.shape[0] == B and out.shape[-2:] == (256, 256)
    _RESULTS.setdefault(case, {})[impl] = (benchmark.stats.stats.min, peak)
