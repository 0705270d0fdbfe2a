"""Segment Anything on CPU: encoder / decoder latency per backend, automatic mask generation
against segment-anything's own ``SamAutomaticMaskGenerator``, and AMG quality on ShapesWorld.

pytest-benchmark::

    FMRT_BENCH_THREADS=1 pytest benchmarks/bench_sam.py --benchmark-only

prints pytest-benchmark's tables and, in the "benchmark summary" section, ratio tables measured
in the same run (backend latency / torch latency; segment-anything AMG time / fmrt AMG time).
``FMRT_BENCH_VITB=0`` skips the ``sam_vit_b`` shapes (random weights; ~30 s per 1024 px encoder
call on one core, the first run also exports and int8-quantises the ViT-B ONNX graphs into the
fmrt export cache, a few minutes).

Script mode (tables only)::

    python benchmarks/bench_sam.py latency [--models shapes-sam sam_vit_b] [--rounds 5]
    python benchmarks/bench_sam.py amg [--scenes 5] [--points-per-side 32] [--vitb]
    python benchmarks/bench_sam.py quality [--scenes 200] [--points-per-side 16] [--backend torch]

What is measured:
  * encoder: ``SamPredictor.encode_image`` (preprocess + image encoder, cache off) on a 64x64
    ShapesWorld scene (shapes-sam) or a 600x800 image (sam_vit_b, 1024 px input);
  * decoder: ``SamPredictor.decode_lowres`` for a batch of single-point prompts (64 for
    shapes-sam as AMG decodes them, 16 for sam_vit_b), 3 multimask outputs, low-res logits;
  * AMG: ``generate`` end to end (encoder included, both sides) with ``output_mode="coco_rle"``,
    records compared field by field (masks as COCO RLE strings, boxes) with segment-anything's;
    script mode also reports the thread CPU time of each side (robust to other jobs on a
    shared box);
  * quality: share of ground-truth objects of held-out test scenes whose best generated mask has
    IoU >= 0.5 (issue goal: >= 90%).

segment-anything imports torchvision (not installed): it is imported with a stub torchvision
whose ``batched_nms`` is fmrt's C++ NMS (torchvision's is C++ too, so the baseline is not slowed
by a Python NMS) and whose ``resize`` / ``to_pil_image`` are PIL, which is what torchvision does
for PIL images. Both sides run single-threaded by default (``FMRT_BENCH_THREADS``): the dev box is
shared.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

THREADS = int(os.environ.get("FMRT_BENCH_THREADS", "1") or 1)
torch.set_num_threads(THREADS)
WITH_VITB = os.environ.get("FMRT_BENCH_VITB", "1") != "0"
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
DECODE_PROMPTS = {"shapes-sam": 64, "sam_vit_b": 16}
AMG_CASES = {
    # shapes-sam, default filters, 32 points a side = 1024 prompts in 16 batches of 64
    "shapes-sam-pps32": dict(model="shapes-sam", kw=dict(points_per_side=32)),
    # sam_vit_b shapes with random weights: 8x8 points; random weights give near-zero IoU
    # predictions, so the quality filters are off to leave masks to compare
    "sam_vit_b-pps8": dict(model="sam_vit_b", kw=dict(points_per_side=8, pred_iou_thresh=0.0,
                                                      stability_score_thresh=0.0)),
}


# --------------------------------------------------------------------------- models
@functools.lru_cache(maxsize=None)
def sam_model(name: str) -> torch.nn.Module:
    """The bundled trained shapes-sam, or sam_vit_b's architecture with random weights (seed 0)."""
    import fmrt
    import fmrt.pretrained

    if name == "shapes-sam":
        return fmrt.pretrained.load_pretrained("shapes-sam").model.float().eval()
    torch.manual_seed(0)
    return fmrt.create_model(name).float().eval()


def _source(name: str):
    from export.sam_export import SamSource, resolve_source

    if name == "shapes-sam":
        return resolve_source("shapes-sam", load=False)
    m = sam_model(name)
    # a stable cache key for the seed-0 random weights (the export cache is keyed by it)
    sha = hashlib.sha256(f"{name} random seed 0 fmrt-bench".encode()).hexdigest()
    return SamSource(m, m.config.to_dict(), sha, f"{name}-random")


@functools.lru_cache(maxsize=None)
def predictor(name: str, backend: str):
    """A ``SamPredictor`` (embedding cache off) for ``backend`` in ``BACKENDS``."""
    from export.sam_export import graphs_for_config
    from fmrt.runtime.sam import SamPredictor, _ort_engines

    if backend == "torch":
        return SamPredictor.from_model(sam_model(name), name=name, embedding_cache=0)
    src = _source(name)
    cfg = sam_model(name).config
    precision = "int8" if backend.endswith("int8") else "fp32"
    engines = _ort_engines(src, graphs_for_config(src.arch), precision=precision,
                           intra_op_threads=THREADS)
    return SamPredictor(name=name, engines=engines, graphs=graphs_for_config(src.arch),
                        img_size=cfg.encoder.img_size, pixel_mean=cfg.pixel_mean,
                        pixel_std=cfg.pixel_std, backend="onnxruntime", embedding_cache=0)


def bench_image(name: str, seed: int = 0) -> np.ndarray:
    if name == "shapes-sam":
        from fmrt.data.sam_data import eval_scenes

        return eval_scenes(seed + 1, split="test")[seed].render()
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    img[100:300, 200:400] = (200, 30, 30)
    img[300:, 400:] = (20, 40, 220)
    return img


def decode_inputs(name: str, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` single positive points on a grid, in the resized input frame (as AMG sends them)."""
    from fmrt.runtime.sam import apply_coords
    from fmrt.runtime.sam_amg import build_point_grid

    img = bench_image(name)
    side = int(np.ceil(np.sqrt(n)))
    pts = build_point_grid(side)[:n] * np.array(img.shape[:2])[None, ::-1]
    coords = apply_coords(pts, img.shape[:2], sam_model(name).image_encoder.img_size)[:, None, :]
    return coords.astype(np.float32), np.ones(coords.shape[:2], np.float32)


# --------------------------------------------------------------------------- segment-anything
@functools.lru_cache(maxsize=None)
def segment_anything():
    """The segment_anything package, imported with a stub torchvision (see the module doc)."""
    if importlib.util.find_spec("segment_anything") is None:
        raise RuntimeError("segment-anything is not installed")
    from PIL import Image

    from fmrt.kernels import batched_nms

    tv = types.ModuleType("torchvision")
    ops, boxes = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.boxes")
    tr = types.ModuleType("torchvision.transforms")
    tf = types.ModuleType("torchvision.transforms.functional")
    boxes.batched_nms = lambda boxes, scores, idxs, iou_threshold: batched_nms(
        boxes, scores, idxs.long(), iou_threshold, backend="cpu")
    boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    tf.to_pil_image = Image.fromarray
    tf.resize = lambda img, size: img.resize((size[1], size[0]), Image.BILINEAR)
    tv.ops, ops.boxes, tv.transforms, tr.functional = ops, boxes, tr, tf
    stubs = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
             "torchvision.transforms": tr, "torchvision.transforms.functional": tf}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("segment_anything")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@functools.lru_cache(maxsize=None)
def official_model(name: str):
    from tests.test_sam_predictor import official_sam

    return official_sam(segment_anything(), sam_model(name))


def amg_pair(case: str):
    """(segment-anything generator, fmrt generator, model name) for an ``AMG_CASES`` key."""
    from fmrt.runtime.sam_amg import SamAutomaticMaskGenerator

    c = AMG_CASES[case]
    kw = dict(c["kw"], output_mode="coco_rle")
    theirs = segment_anything().SamAutomaticMaskGenerator(official_model(c["model"]), **kw)
    ours = SamAutomaticMaskGenerator(predictor(c["model"], "torch"), **kw)
    return theirs, ours, c["model"]


def same_records(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x["segmentation"] == y["segmentation"] and x["bbox"] == y["bbox"] and
        abs(x["predicted_iou"] - y["predicted_iou"]) < 1e-5 for x, y in zip(a, b))


def _best(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------- pytest-benchmark
_LAT: Dict[Tuple[str, str, str], float] = {}      # (model, stage, backend) -> best seconds
_AMG: Dict[Tuple[str, str], float] = {}           # (case, impl) -> best seconds
_AMG_SAME: Dict[str, bool] = {}
MODELS = ("shapes-sam", "sam_vit_b") if WITH_VITB else ("shapes-sam",)


def _rounds(name: str) -> int:
    return 2 if name == "sam_vit_b" else 5


@pytest.fixture(scope="module", autouse=True)
def _report(bench_summary):
    yield
    bench_summary.extend(latency_table(_LAT))
    bench_summary.extend(amg_table(_AMG, _AMG_SAME))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", ["encoder", "decoder"])
@pytest.mark.parametrize("name", MODELS)
def test_sam_latency(benchmark, name, stage, backend):
    p = predictor(name, backend)
    img = bench_image(name)
    benchmark.group = f"sam {name} {stage}"
    if stage == "encoder":
        fn = functools.partial(p.encode_image, img)
    else:
        state = p.encode_image(img)
        coords, labels = decode_inputs(name, DECODE_PROMPTS[name])
        fn = functools.partial(p.decode_lowres, coords, labels, image_state=state)
    fn()  # warm-up (ORT session allocation, torch first-call overheads)
    r = _rounds(name)
    benchmark.pedantic(fn, rounds=r, iterations=1)
    _LAT[(name, stage, backend)] = benchmark.stats.stats.min


@pytest.mark.parametrize("impl", ["segment_anything", "fmrt"])
@pytest.mark.parametrize("case", [c for c in AMG_CASES if AMG_CASES[c]["model"] in MODELS])
def test_sam_amg(benchmark, case, impl):
    try:
        theirs, ours, name = amg_pair(case)
    except RuntimeError as e:
        pytest.skip(str(e))
    img = bench_image(name, seed=1)
    gen = theirs if impl == "segment_anything" else ours
    benchmark.group = f"sam amg {case}"
    rounds = 1 if name == "sam_vit_b" else 3
    if name != "sam_vit_b":
        gen.generate(img)  # warm-up
    out = benchmark.pedantic(gen.generate, args=(img,), rounds=rounds, iterations=1)
    _AMG[(case, impl)] = benchmark.stats.stats.min
    if impl == "fmrt":   # runs after "segment_anything" (parameters vary innermost first)
        if case in _AMG_OUT:
            _AMG_SAME[case] = same_records(_AMG_OUT[case], out)
    else:
        _AMG_OUT[case] = out


_AMG_OUT: Dict[str, Any] = {}


# --------------------------------------------------------------------------- tables
def latency_table(lat: Dict[Tuple[str, str, str], float]) -> List[str]:
    if not lat:
        return []
    lines = [f"SAM latency, threads={THREADS}, best round; ratio = backend ms / torch ms "
             f"(< 1: faster than torch)",
             f"{'model':<11} {'stage':<8} {'backend':<17} {'ms':>9} {'vs torch':>9}"]
    for (name, stage, backend), t in sorted(lat.items(), key=lambda kv: (
            kv[0][0], kv[0][1], BACKENDS.index(kv[0][2]))):
        base = lat.get((name, stage, "torch"))
        ratio = f"{t / base:>8.2f}x" if base else "      n/a"
        what = "" if stage == "encoder" else f" ({DECODE_PROMPTS[name]} prompts)"
        lines.append(f"{name:<11} {stage:<8} {backend:<17} {t * 1e3:>9.1f} {ratio}{what}")
    return lines


def amg_table(amg: Dict[Tuple[str, str], float], same: Dict[str, bool],
              cpu: Optional[Dict[Tuple[str, str], float]] = None) -> List[str]:
    """``cpu``: the same times as this thread's CPU time (``time.thread_time``): on the shared
    box other jobs preempt either side, which moves wall-clock ratios by +-30% between runs;
    CPU time counts only the time each side actually ran (cache pollution by the other jobs
    still shows)."""
    cases = sorted({c for c, _ in amg})
    if not cases:
        return []
    lines = [f"SAM automatic mask generation end to end vs segment-anything, threads={THREADS} "
             f"(goal: >= 5x, same masks)",
             f"{'case':<18} {'segment-anything ms':>20} {'fmrt ms':>9} {'speed-up':>9} {'same':>5}"
             + (f" {'cpu: sa ms':>11} {'fmrt ms':>8} {'speed-up':>9}" if cpu else "")]
    for c in cases:
        a, b = amg.get((c, "segment_anything")), amg.get((c, "fmrt"))
        if a is None or b is None:
            continue
        line = (f"{c:<18} {a * 1e3:>20.0f} {b * 1e3:>9.0f} {a / b:>8.2f}x "
                f"{str(same.get(c, '?')):>5}")
        if cpu and (c, "fmrt") in cpu:
            ca, cb = cpu[(c, "segment_anything")], cpu[(c, "fmrt")]
            line += f" {ca * 1e3:>11.0f} {cb * 1e3:>8.0f} {ca / cb:>8.2f}x"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- script mode
def run_latency(models, rounds: Optional[int], backends=BACKENDS) -> List[str]:
    lat = {}
    for name in models:
        img = bench_image(name)
        for backend in backends:
            p = predictor(name, backend)
            r = rounds or _rounds(name)
            p.encode_image(img)
            lat[(name, "encoder", backend)] = _best(lambda: p.encode_image(img), r)
            state = p.encode_image(img)
            coords, labels = decode_inputs(name, DECODE_PROMPTS[name])
            dec = functools.partial(p.decode_lowres, coords, labels, image_state=state)
            dec()
            lat[(name, "decoder", backend)] = _best(dec, max(r, 3))
            print(f"  {name} {backend}: encoder {lat[(name, 'encoder', backend)] * 1e3:.1f} ms, "
                  f"decoder {lat[(name, 'decoder', backend)] * 1e3:.1f} ms", flush=True)
    return latency_table(lat)


def run_amg(n_scenes: int, pps: int, vitb: bool) -> List[str]:
    """shapes-sam over ``n_scenes`` held-out scenes (summed time; one warm-up scene first), and
    optionally the sam_vit_b case once."""
    from fmrt.data.sam_data import eval_scenes

    AMG_CASES["shapes-sam-pps32"]["kw"]["points_per_side"] = pps
    amg, same = {}, {}
    theirs, ours, _ = amg_pair("shapes-sam-pps32")
    scenes = [s.render() for s in eval_scenes(n_scenes + 1, split="test")]
    theirs.generate(scenes[0])
    ours.generate(scenes[0])
    t_sa = t_ours = c_sa = c_ours = 0.0
    n_same = n_masks = 0
    for img in scenes[1:]:
        t, c = time.perf_counter(), time.thread_time()
        a = theirs.generate(img)
        t_sa += time.perf_counter() - t
        c_sa += time.thread_time() - c
        t, c = time.perf_counter(), time.thread_time()
        b = ours.generate(img)
        t_ours += time.perf_counter() - t
        c_ours += time.thread_time() - c
        n_same += same_records(a, b)
        n_masks += len(a)
    case = f"shapes-sam-pps{pps}"
    amg[(case, "segment_anything")], amg[(case, "fmrt")] = t_sa / n_scenes, t_ours / n_scenes
    cpu = {(case, "segment_anything"): c_sa / n_scenes, (case, "fmrt"): c_ours / n_scenes}
    same[case] = n_same == n_scenes
    print(f"  {case}: {n_scenes} scenes, identical records in {n_same}/{n_scenes}, "
          f"{n_masks / n_scenes:.1f} masks/scene (times are per scene)", flush=True)
    if vitb:
        theirs, ours, name = amg_pair("sam_vit_b-pps8")
        img = bench_image(name, seed=1)
        t = time.perf_counter()
        a = theirs.generate(img)
        amg[("sam_vit_b-pps8", "segment_anything")] = time.perf_counter() - t
        t = time.perf_counter()
        b = ours.generate(img)
        amg[("sam_vit_b-pps8", "fmrt")] = time.perf_counter() - t
        same["sam_vit_b-pps8"] = same_records(a, b)
        print(f"  sam_vit_b-pps8: {len(a)} / {len(b)} masks", flush=True)
    return amg_table(amg, same, cpu)


def run_quality(n_scenes: int, pps: int, backend: str) -> List[str]:
    """Recall at IoU 0.5 of the bundled shapes-sam's AMG on held-out ShapesWorld test scenes."""
    from fmrt.data.sam_data import eval_scenes
    from fmrt.kernels import rle_to_mask
    from fmrt.runtime.sam_amg import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(predictor("shapes-sam", backend), points_per_side=pps,
                                    output_mode="uncompressed_rle")
    found = total = n_masks = 0
    best: List[float] = []
    t = time.perf_counter()
    for sc in eval_scenes(n_scenes, split="test"):
        img = sc.render()
        recs = gen.generate(img)
        masks = (np.stack([rle_to_mask(r["segmentation"]) for r in recs]) if recs
                 else np.zeros((0,) + img.shape[:2], bool))
        n_masks += len(recs)
        for gt in sc.masks():
            gt = gt.astype(bool)
            iou = 0.0
            if len(masks):
                inter = (masks & gt).sum((1, 2))
                union = (masks | gt).sum((1, 2))
                iou = float((inter / np.maximum(union, 1)).max())
            best.append(iou)
            found += iou >= 0.5
            total += 1
    dt = time.perf_counter() - t
    return [f"shapes-sam AMG quality, {n_scenes} held-out test scenes, points_per_side={pps}, "
            f"backend={backend}: objects found at IoU >= 0.5: {found}/{total} = "
            f"{found / max(total, 1):.1%} (goal >= 90%), mean best IoU {np.mean(best):.3f}, "
            f"{n_masks / n_scenes:.1f} masks/scene, {dt / n_scenes * 1e3:.0f} ms/scene"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("latency")
    a.add_argument("--models", nargs="+", default=list(MODELS))
    a.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    a.add_argument("--rounds", type=int, default=None)
    a = sub.add_parser("amg")
    a.add_argument("--scenes", type=int, default=5)
    a.add_argument("--points-per-side", type=int, default=32)
    a.add_argument("--vitb", action="store_true", help="also the sam_vit_b case (~2 min)")
    a = sub.add_parser("quality")
    a.add_argument("--scenes", type=int, default=200)
    a.add_argument("--points-per-side", type=int, default=16)
    a.add_argument("--backend", default="torch", choices=BACKENDS)
    args = ap.parse_args(argv)
    if args.cmd == "latency":
        lines = run_latency(args.models, args.rounds, tuple(args.backends))
    elif args.cmd == "amg":
        lines = run_amg(args.scenes, args.points_per_side, args.vitb)
    else:
        lines = run_quality(args.scenes, args.points_per_side, args.backend)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
