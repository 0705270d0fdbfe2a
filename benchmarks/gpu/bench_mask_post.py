"""GPU timing of SAM mask post-processing (fmrt CUDA kernel) vs segment-anything's amg.py on CUDA.

``run(rows)`` appends one dict per case (keys op, shape, baseline, baseline_ms, ours_ms, speedup,
max_abs_err) for ``benchmarks/gpu/run_all.py``; ``python benchmarks/gpu/bench_mask_post.py`` prints
them. Needs a CUDA device and ``fmrt._C`` built with ``FMRT_BUILD_CUDA=1``; otherwise it appends
nothing and says why.

Cases, on one chunk of SAM's automatic mask generator (64 prompts x 3 = 192 masks of 1024 x 1024
float32 logits, already on the GPU):
  * stability + threshold + boxes: fmrt ``mask_stats(want_rle=False, backend="cuda")`` (one read
    of the logits) vs ``amg.calculate_stability_score`` + ``logits > 0`` + ``batched_mask_to_box``.
  * the same + COCO RLE: fmrt computes a 1-bit mask on the GPU, copies it (1/32 of the logits'
    bytes) and run-length encodes on the CPU; amg.py adds ``mask_to_rle_pytorch`` on the GPU.
max_abs_err is the largest difference in stability score or box coordinate (0 expected); RLEs
must be identical (inf otherwise).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_MASKS, SIZE = 192, 1024
REPS = 3


def _load_amg():
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "utils" / "amg.py"
    s = importlib.util.spec_from_file_location("_sa_amg_gpu_bench", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def _logits(device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(0)
    low = torch.randn(N_MASKS, 1, 32, 32, generator=g) * 8  # blobby, SAM-like masks
    low = F.interpolate(low.to(device), (256, 256), mode="bilinear", align_corners=False)
    return F.interpolate(low, (SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].contiguous()


def _time(fn, sync):
    fn()  # warm-up (CUDA context, allocator, kernels)
    sync()
    best = float("inf")
    out = None
    for _ in range(REPS):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, out


def run(rows: list) -> None:
    import torch

    from fmrt import _native
    from fmrt.kernels import mask_post as mp

    if not torch.cuda.is_available():
        print("bench_mask_post: no CUDA device visible to torch; skipped")
        return
    if not (_native.available() and hasattr(_native._C, "mask_stats_cuda")):
        print("bench_mask_post: fmrt._C lacks the CUDA kernels (build with FMRT_BUILD_CUDA=1); skipped")
        return
    amg = _load_amg()
    dev = torch.device("cuda")
    x = _logits(dev)
    sync = torch.cuda.synchronize
    shape = f"{N_MASKS}x{SIZE}x{SIZE}"

    if amg is not None:
        base_name = "amg.py (torch CUDA)"

        def base_stats():
            st = amg.calculate_stability_score(x, 0.0, 1.0)
            return st, amg.batched_mask_to_box(x > 0.0)

        def base_rle():
            st, boxes = base_stats()
            return st, boxes, amg.mask_to_rle_pytorch(x > 0.0)
    else:  # segment-anything not installed: its formulation as fmrt's torch reference backend
        base_name = "amg.py formulation (fmrt reference, torch CUDA)"

        def base_stats():
            s = mp.mask_stats(x, want_rle=False, backend="reference")
            return s.stability_score, s.boxes

        def base_rle():
            s = mp.mask_stats(x, want_rle=True, backend="reference")
            return s.stability_score, s.boxes, s.rles.to_list()

    def ours_stats():
        return mp.mask_stats(x, want_rle=False, backend="cuda")

    def ours_rle():
        return mp.mask_stats(x, want_rle=True, backend="cuda")

    def err(st_a, box_a, st_b, box_b):
        d_st = (st_a.float() - st_b.float()).abs()
        d_st = torch.where(torch.isnan(st_a) & torch.isnan(st_b), torch.zeros_like(d_st), d_st)
        return max(float(d_st.nan_to_num(float("inf")).max()), float((box_a - box_b).abs().max()))

    b_ms, (b_st, b_box) = _time(base_stats, sync)
    o_ms, o = _time(ours_stats, sync)
    rows.append({"op": "sam mask_stats (stability+threshold+box)", "shape": shape, "baseline": base_name,
                 "baseline_ms": b_ms, "ours_ms": o_ms, "speedup": b_ms / o_ms,
                 "max_abs_err": err(o.stability_score, o.boxes, b_st, b_box)})

    b_ms, (b_st, b_box, b_rles) = _time(base_rle, sync)
    o_ms, o = _time(ours_rle, sync)
    e = err(o.stability_score, o.boxes, b_st, b_box)
    if o.rles.to_list() != b_rles:
        e = float("inf")
    rows.append({"op": "sam mask_stats + COCO RLE", "shape": shape, "baseline": base_name,
                 "baseline_ms": b_ms, "ours_ms": o_ms, "speedup": b_ms / o_ms, "max_abs_err": e})


if __name__ == "__main__":
    out: list = []
    run(out)
    for r in out:
        print(r)
