"""SAM automatic-mask-generator post-processing: fmrt (C++ one pass) vs segment-anything's amg.py.

Workload (issue #3 goal): 1,024 point prompts x 3 masks at 1024 x 1024, processed in chunks of
64 prompts x 3 = 192 masks (SAM's ``points_per_batch``), because all 3,072 float32 masks
would be 12 GiB. Per chunk both sides run ``SamAutomaticMaskGenerator._process_batch`` after the
model: IoU filter (> 0.88), stability score (offset 1.0) and filter (>= 0.95), threshold at 0,
boxes, crop-edge filter, RLE; then one NMS (0.7) over all survivors, and the survivors' RLEs as
amg.py's uncompressed dicts. Outputs are checked identical (boxes, IoU, stability, RLE lists) on
every chunk both sides ran.

* reference: segment-anything 1.0's ``utils/amg.py`` (loaded by path: the package imports
  torchvision, which is not installed) - ``MaskData.filter``, ``calculate_stability_score``,
  ``batched_mask_to_box``, ``is_box_near_crop_edge``, ``uncrop_masks``, ``mask_to_rle_pytorch``.
  torchvision's C++ ``batched_nms`` is replaced by fmrt's numpy implementation of the same
  greedy loop (NMS over ~1k boxes is well under 1% of either side's time).
* fmrt: ``fmrt.kernels.mask_post.amg_postprocess_batch`` (one C++ pass per mask, OpenMP over
  masks) + ``batched_nms`` + ``RLEBatch.select(keep).to_list()``.

The logits are SAM-like: 1-3 elliptic blobs per mask with random edge sharpness plus smooth
noise, built at 256 x 256 (the decoder's resolution) and upsampled bilinearly to 1024 x 1024.
Generating a chunk is not timed.

Script mode (the goal figure)::

    .venv/bin/python benchmarks/bench_mask_post.py            # all 16 chunks for fmrt,
                                                               # 2 chunks for amg.py, extrapolated
    .venv/bin/python benchmarks/bench_mask_post.py --ref-chunks 16   # time amg.py on all chunks

The amg.py side is slow (seconds per chunk), so by default it runs on the first
``--ref-chunks`` chunks and its total is extrapolated linearly from the per-chunk mean (the work
per chunk is statistically the same); the ratio on exactly the chunks both sides ran is printed
too. pytest-benchmark mode (one 48-mask chunk per round)::

    .venv/bin/pytest benchmarks/bench_mask_post.py --benchmark-only
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # script mode from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmrt import _native  # noqa: E402
from fmrt.kernels import mask_post as mp  # noqa: E402

PRED_IOU_THRESH = 0.88
STABILITY_THRESH = 0.95
STABILITY_OFFSET = 1.0
MASK_THRESHOLD = 0.0
BOX_NMS_THRESH = 0.7

THREADS = int(os.environ.get("FMRT_BENCH_THREADS", "0") or 0)
if THREADS:
    torch.set_num_threads(THREADS)


def load_amg():
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        raise ImportError("segment-anything is not installed (pip install -e '.[test]')")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "amg.py"
    s = importlib.util.spec_from_file_location("_sa_amg_bench", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- data
def make_chunk(chunk: int, prompts: int, size: int = 1024, low: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM-like logits float32 [prompts * 3, size, size] and IoU predictions [prompts * 3]."""
    g = torch.Generator().manual_seed(1000 + chunk)
    n = prompts * 3
    yy = torch.linspace(0, 1, low).view(1, low, 1)
    xx = torch.linspace(0, 1, low).view(1, 1, low)
    field = torch.full((n, low, low), -1.0)
    nblobs = torch.randint(1, 4, (n,), generator=g)
    for b in range(3):
        cx, cy = torch.rand(n, 1, 1, generator=g), torch.rand(n, 1, 1, generator=g)
        rx = 0.03 + 0.3 * torch.rand(n, 1, 1, generator=g)
        ry = 0.03 + 0.3 * torch.rand(n, 1, 1, generator=g)
        blob = 1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2
        field = torch.where((nblobs > b).view(n, 1, 1), torch.maximum(field, blob), field)
    sharp = 20 + 60 * torch.rand(n, 1, 1, generator=g)  # edge sharpness: stability varies
    noise = F.interpolate(torch.randn(n, 1, low // 8, low // 8, generator=g), (low, low),
                          mode="bilinear", align_corners=False)[:, 0]
    logits_low = (sharp * field.clamp(min=-0.5) + 1.5 * noise)[:, None]
    logits = F.interpolate(logits_low, (size, size), mode="bilinear", align_corners=False)[:, 0]
    iou = 0.7 + 0.3 * torch.rand(n, generator=g)
    return logits.contiguous(), iou


# --------------------------------------------------------------------------- the two pipelines
def ref_process_batch(amg, logits: torch.Tensor, iou: torch.Tensor) -> "object":
    """SamAutomaticMaskGenerator._process_batch after predict_torch (full-image crop)."""
    h, w = logits.shape[-2:]
    crop_box = [0, 0, w, h]
    data = amg.MaskData(masks=logits, iou_preds=iou)
    keep = data["iou_preds"] > PRED_IOU_THRESH
    data.filter(keep)
    data["stability_score"] = amg.calculate_stability_score(data["masks"], MASK_THRESHOLD, STABILITY_OFFSET)
    keep = data["stability_score"] >= STABILITY_THRESH
    data.filter(keep)
    data["masks"] = data["masks"] > MASK_THRESHOLD
    data["boxes"] = amg.batched_mask_to_box(data["masks"])
    keep = ~amg.is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, w, h])
    if not torch.all(keep):
        data.filter(keep)
    data["masks"] = amg.uncrop_masks(data["masks"], crop_box, h, w)
    data["rles"] = amg.mask_to_rle_pytorch(data["masks"])
    del data["masks"]
    return data


def ref_finish(amg, parts: List["object"]) -> Dict[str, object]:
    data = amg.MaskData()
    for p in parts:
        data.cat(p)
    b = data["boxes"].float()
    keep = torch.from_numpy(mp._batched_nms_numpy(  # stand-in for torchvision's C++ batched_nms
        b.numpy(), data["iou_preds"].double().numpy(), np.zeros(len(b), np.int64), BOX_NMS_THRESH))
    data.filter(keep)
    return {"boxes": data["boxes"], "iou_preds": data["iou_preds"],
            "stability_score": data["stability_score"], "rles": data["rles"]}


def ours_process_batch(logits: torch.Tensor, iou: torch.Tensor) -> mp.AMGBatch:
    return mp.amg_postprocess_batch(
        logits, iou, pred_iou_thresh=PRED_IOU_THRESH, stability_score_thresh=STABILITY_THRESH,
        stability_score_offset=STABILITY_OFFSET, mask_threshold=MASK_THRESHOLD,
        num_threads=THREADS or None)


def ours_finish(parts: List[mp.AMGBatch]) -> Dict[str, object]:
    boxes = torch.cat([p.boxes for p in parts])
    ious = torch.cat([p.iou_preds for p in parts])
    stab = torch.cat([p.stability_score for p in parts])
    rles = mp.RLEBatch.concat([p.rles for p in parts])
    keep = mp.batched_nms(boxes.float(), ious, torch.zeros(len(boxes), dtype=torch.int64), BOX_NMS_THRESH)
    return {"boxes": boxes[keep], "iou_preds": ious[keep], "stability_score": stab[keep],
            "rles": rles.select(keep).to_list()}


def assert_same(ours: Dict[str, object], ref: Dict[str, object]) -> None:
    for key in ("boxes", "iou_preds", "stability_score"):
        if not torch.equal(ours[key], ref[key]):
            raise AssertionError(f"outputs differ: {key}")
    if ours["rles"] != ref["rles"]:
        raise AssertionError("outputs differ: rles")


def assert_same_batch(ours: mp.AMGBatch, ref) -> None:
    assert_same({"boxes": ours.boxes, "iou_preds": ours.iou_preds, "stability_score": ours.stability_score,
                 "rles": ours.rles.to_list()},
                {k: ref[k] for k in ("boxes", "iou_preds", "stability_score", "rles")})


# --------------------------------------------------------------------------- script mode
def run_script(prompts: int, chunk_prompts: int, size: int, ref_chunks: int) -> Dict[str, float]:
    amg = load_amg()
    n_chunks = (prompts + chunk_prompts - 1) // chunk_prompts
    ref_chunks = min(ref_chunks, n_chunks)
    print(f"mask post-processing: {prompts} prompts x 3 masks at {size}x{size}, chunks of "
          f"{chunk_prompts} prompts; native={_native.available()} "
          f"({_native.build_info().get('kernel_isa', 'n/a')}), torch threads={torch.get_num_threads()}",
          flush=True)
    ours_parts, ours_chunk_s = [], []
    ref_parts, ref_chunk_s = [], []
    for c in range(n_chunks):
        n_p = min(chunk_prompts, prompts - c * chunk_prompts)
        logits, iou = make_chunk(c, n_p, size)
        t0 = time.perf_counter()
        ours_parts.append(ours_process_batch(logits, iou))
        ours_chunk_s.append(time.perf_counter() - t0)
        if c < ref_chunks:
            t0 = time.perf_counter()
            ref_parts.append(ref_process_batch(amg, logits, iou))
            ref_chunk_s.append(time.perf_counter() - t0)
            assert_same_batch(ours_parts[-1], ref_parts[-1])
            print(f"  chunk {c}: fmrt {ours_chunk_s[-1] * 1e3:8.1f} ms   amg.py {ref_chunk_s[-1] * 1e3:9.1f} ms"
                  f"   kept {len(ours_parts[-1].rles)} of {3 * n_p}   (identical)", flush=True)
        else:
            print(f"  chunk {c}: fmrt {ours_chunk_s[-1] * 1e3:8.1f} ms   kept {len(ours_parts[-1].rles)}", flush=True)
        del logits
    t0 = time.perf_counter()
    ours_final = ours_finish(ours_parts)
    ours_finish_s = time.perf_counter() - t0
    # identical final outputs on the chunks both sides ran
    sub_ours = ours_finish(ours_parts[:ref_chunks])
    t0 = time.perf_counter()
    sub_ref = ref_finish(amg, ref_parts)
    ref_finish_s = time.perf_counter() - t0
    assert_same(sub_ours, sub_ref)

    ours_total = sum(ours_chunk_s) + ours_finish_s
    ref_mean = sum(ref_chunk_s) / len(ref_chunk_s)
    ref_total = ref_mean * n_chunks + ref_finish_s  # NMS over fewer boxes: a lower bound
    same_chunks = sum(ref_chunk_s) / sum(ours_chunk_s[:ref_chunks])
    res = {"ours_s": ours_total, "ref_s_est": ref_total, "ratio_est": ref_total / ours_total,
           "ratio_same_chunks": same_chunks, "kept": len(ours_final["rles"])}
    print(f"fmrt total (all {n_chunks} chunks + NMS + RLE dicts): {ours_total:.2f} s; "
          f"{len(ours_final['rles'])} masks after NMS")
    print(f"amg.py: {ref_mean:.2f} s per chunk over {ref_chunks} chunk(s)"
          + (f", extrapolated to {n_chunks}: {ref_total:.1f} s" if ref_chunks < n_chunks else f", total {ref_total:.1f} s"))
    print(f"speedup on the same {ref_chunks} chunk(s): {same_chunks:.1f}x; "
          f"full workload{' (amg.py extrapolated)' if ref_chunks < n_chunks else ''}: {res['ratio_est']:.1f}x "
          f"(goal >= 10x); outputs identical")
    return res


# --------------------------------------------------------------------------- pytest-benchmark
BENCH_PROMPTS = 16  # 48 masks of 1024 x 1024 (192 MiB of logits) per round
_RESULTS: Dict[str, float] = {}


@pytest.fixture(scope="module")
def bench_chunk():
    return make_chunk(0, BENCH_PROMPTS, 1024)


@pytest.fixture(scope="module", autouse=True)
def _ratio_report(bench_summary):
    yield
    if {"fmrt", "amg.py"} <= _RESULTS.keys():
        bench_summary.append(
            f"SAM AMG post-processing, {BENCH_PROMPTS} prompts x 3 masks at 1024x1024 (one chunk), "
            f"threads={THREADS or torch.get_num_threads()}: amg.py {_RESULTS['amg.py'] * 1e3:.0f} ms, "
            f"fmrt {_RESULTS['fmrt'] * 1e3:.0f} ms -> {_RESULTS['amg.py'] / _RESULTS['fmrt']:.1f}x "
            f"(native={_native.available()})")


@pytest.mark.parametrize("impl", ["fmrt", "amg.py"])
def test_amg_postprocess(benchmark, bench_chunk, impl):
    logits, iou = bench_chunk
    benchmark.group = f"SAM AMG post-processing {BENCH_PROMPTS}x3 masks 1024x1024"
    if impl == "fmrt":
        def run():
            return ours_finish([ours_process_batch(logits, iou)])
    else:
        try:
            amg = load_amg()
        except ImportError as e:
            pytest.skip(str(e))

        def run():
            return ref_finish(amg, [ref_process_batch(amg, logits, iou)])

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    assert len(out["rles"]) == len(out["boxes"])
    _RESULTS[impl] = benchmark.stats.stats.min


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64, help="prompts per chunk (x3 masks)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--ref-chunks", type=int, default=2, help="chunks the amg.py side runs on")
    a = ap.parse_args(argv)
    run_script(a.prompts, a.chunk, a.size, a.ref_chunks)


if __name__ == "__main__":
    main()
