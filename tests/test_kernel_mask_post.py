"""SAM mask post-processing (fmrt.kernels.mask_post) against segment-anything 1.0 itself.

segment-anything's package __init__ imports torchvision (not installed), so amg.py and the
modeling package are loaded by file path; the end-to-end generator test imports the real
``SamAutomaticMaskGenerator`` with a stub ``torchvision`` whose ``batched_nms`` is the
straightforward reference of torchvision's below. Every comparison is exact (torch.equal /
list equality), on the native C++ path (both kernel sets), the torch/numpy fallback
(FMRT_DISABLE_NATIVE=1) and the reference backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmrt import _native
from tests.helpers import segment_anything_root
from fmrt.kernels import mask_post as mp

ROOT = Path(__file__).resolve().parents[1]
HAS_C = _native._C is not None and hasattr(_native._C, "mask_stats")
SA_DIR = Path(segment_anything_root()) if segment_anything_root() else None
needs_sa = pytest.mark.skipif(SA_DIR is None, reason="segment-anything is not installed (test extra)")
# pycocotools 2.x vs NumPy 2 (inside pycocotools.mask.decode), not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# --------------------------------------------------------------------------- references
@pytest.fixture(scope="module")
def amg():
    if SA_DIR is None:
        pytest.skip("segment-anything is not installed (test extra)")
    spec = importlib.util.spec_from_file_location("_sa_amg_ref", SA_DIR / "utils" / "amg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sam_modeling():
    if SA_DIR is None:
        pytest.skip("segment-anything is not installed (test extra)")
    name = "_sa_modeling_ref"
    spec = importlib.util.spec_from_file_location(
        name, SA_DIR / "modeling" / "__init__.py", submodule_search_locations=[str(SA_DIR / "modeling")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # relative imports inside the package need the parent registered
    try:
        spec.loader.exec_module(mod)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(key)
    return mod


def ref_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list:
    """torchvision/csrc/ops/cpu/nms_kernel.cpp, line by line, in the boxes' dtype."""
    n = boxes.shape[0]
    if n == 0:
        return []
    zero = boxes.dtype.type(0)
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(torch.from_numpy(scores), descending=True, stable=True).indices.numpy()
    suppressed = np.zeros(n, bool)
    keep = []
    for _i in range(n):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(int(i))
        for _j in range(_i + 1, n):
            j = order[_j]
            if suppressed[j]:
                continue
            xx1, yy1 = max(x1[i], x1[j]), max(y1[i], y1[j])
            xx2, yy2 = min(x2[i], x2[j]), min(y2[i], y2[j])
            w = max(zero, xx2 - xx1)
            h = max(zero, yy2 - yy1)
            inter = w * h
            with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for empty boxes, as in C++
                ovr = inter / (areas[i] + areas[j] - inter)
            if float(ovr) > thr:
                suppressed[j] = True
    return keep


def ref_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                    iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.boxes._batched_nms_vanilla (with the final sort made stable)."""
    thr = iou_threshold
    b, s, c = boxes.numpy(), scores.numpy(), idxs.numpy()
    keep_mask = np.zeros(len(s), bool)
    for cls in np.unique(c):
        cur = np.nonzero(c == cls)[0]
        keep_mask[cur[ref_nms(b[cur], s[cur], thr)]] = True
    keep = torch.from_numpy(np.nonzero(keep_mask)[0])
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["native-avx2", "native-generic", "fallback"])
def impl(request, monkeypatch):
    """Which CPU implementation runs: the extension with each kernel set, or the fallback."""
    if request.param == "fallback":
        monkeypatch.setenv("FMRT_DISABLE_NATIVE", "1")
        yield request.param
        return
    if not HAS_C:
        pytest.skip("fmrt._C is not built")
    isa = request.param.split("-")[1]
    if isa == "avx2" and _native._C.build_info()["kernel_isa"] != "avx2":
        pytest.skip("no AVX2 kernels on this CPU/build")
    monkeypatch.delenv("FMRT_DISABLE_NATIVE", raising=False)
    _native._C._set_kernel_isa(isa)
    try:
        yield request.param
    finally:
        _native._C._set_kernel_isa("auto")


def smooth_logits(n: int, h: int, w: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    """Blobby logits like SAM's (upsampled low-res noise), plus the edge cases by index."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, max(h // 6, 1), max(w // 6, 1), generator=g) * scale
    x = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0].contiguous()
    cases = [
        lambda m: m.fill_(-3.0),  # empty
        lambda m: m.fill_(3.0),  # full
        lambda m: (m.fill_(-3.0), m.__setitem__((h // 2, w // 2), 0.5)),  # single pixel
        lambda m: (m.fill_(-3.0), m.__setitem__((slice(None), 0), 2.0), m.__setitem__((h - 1, slice(None)), 2.0)),
        lambda m: m.copy_(torch.where((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0,
                                      torch.tensor(2.0), torch.tensor(-2.0))),  # checkerboard
        # values exactly on the thresholds 0, +-1 (strict >) and NaNs
        lambda m: m.copy_(torch.tensor([0.0, 1.0, -1.0, float("nan"), 1.5, -0.5])[
            torch.randint(0, 6, (h, w), generator=g)]),
        lambda m: (m.fill_(-3.0), m.__setitem__((0, w - 1), 1.0), m.__setitem__((h - 1, 0), 0.25)),  # corners
    ]
    for i, case in enumerate(cases[: max(n - 2, 0)]):
        case(x[i])
    return x


SHAPES = [(9, 37, 53), (3, 1, 1), (4, 1, 70), (4, 70, 1), (9, 64, 64), (9, 129, 37)]


def assert_rles_equal(ours: mp.RLEBatch, ref: list):
    assert len(ours) == len(ref)
    got = ours.to_list()
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a["size"] == b["size"], i
        assert a["counts"] == b["counts"], f"mask {i}: RLE differs"


def check_stats_against_amg(amg, x, t, off, stats, frame=None):
    ref_st = amg.calculate_stability_score(x, t, off)
    torch.testing.assert_close(stats.stability_score, ref_st, rtol=0, atol=0, equal_nan=True)
    masks = x > t
    assert torch.equal(stats.boxes, amg.batched_mask_to_box(masks))
    assert torch.equal(stats.areas, masks.sum((-1, -2)))
    if stats.rles is not None:
        if frame is not None:
            x0, y0, oh, ow = frame
            masks = amg.uncrop_masks(masks, [x0, y0, x0 + x.shape[-1], y0 + x.shape[-2]], oh, ow)
        assert_rles_equal(stats.rles, amg.mask_to_rle_pytorch(masks))


# --------------------------------------------------------------------------- postprocess_masks
@needs_sa
@pytest.mark.parametrize("low,input_size,original_size,img_size", [
    ((2, 3, 16, 16), (64, 48), (37, 29), 64),
    ((1, 1, 16, 16), (64, 64), (129, 129), 64),
    ((1, 3, 32, 32), (101, 128), (53, 67), 128),
])
def test_postprocess_masks_matches_sam(sam_modeling, low, input_size, original_size, img_size):
    masks = torch.randn(*low, generator=torch.Generator().manual_seed(1))
    fake_sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=img_size))
    ref = sam_modeling.Sam.postprocess_masks(fake_sam, masks, input_size, original_size)
    out = mp.postprocess_masks(masks, input_size, original_size, img_size=img_size)
    assert out.shape == (*low[:2], *original_size)
    assert torch.equal(out, ref)


def test_postprocess_masks_bad_inputs():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError):
        mp.postprocess_masks(x[0], (8, 8), (8, 8), img_size=8)
    with pytest.raises(TypeError):
        mp.postprocess_masks(x.long(), (8, 8), (8, 8), img_size=8)
    with pytest.raises(ValueError):
        mp.postprocess_masks(x, (9, 8), (8, 8), img_size=8)
    with pytest.raises(ValueError):
        mp.postprocess_masks(x, (8, 8), (0, 8), img_size=8)
    with pytest.raises(TypeError):
        mp.postprocess_masks(x.numpy(), (8, 8), (8, 8), img_size=8)


# --------------------------------------------------------------------------- mask_stats
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mask_stats_matches_amg(amg, impl, shape):
    x = smooth_logits(*shape, seed=sum(shape))
    for t, off in [(0.0, 1.0), (0.1, 0.3)]:  # 0.1 +- 0.3 is not exact in float32
        stats = mp.mask_stats(x, t, off)
        check_stats_against_amg(amg, x, t, off, stats)


@pytest.mark.parametrize("shape", [(9, 37, 53), (4, 1, 70), (4, 70, 1)], ids=lambda s: "x".join(map(str, s)))
def test_mask_stats_reference_backend(amg, shape):
    x = smooth_logits(*shape, seed=3)
    check_stats_against_amg(amg, x, 0.0, 1.0, mp.mask_stats(x, backend="reference"))


@pytest.mark.parametrize("frame_fn", [
    lambda h, w: (3, 5, h + 9, w + 4),  # interior crop
    lambda h, w: (0, 0, h + 7, w + 2),  # top-left
    lambda h, w: (4, 0, h, w + 4),  # full height: columns join across the boundary
    lambda h, w: (0, 3, h + 3, w),  # full width, bottom aligned
    lambda h, w: (2, 0, h, w + 2),  # right-aligned, full height
    lambda h, w: (0, 0, h, w),  # identity
], ids=["interior", "top-left", "full-height", "full-width", "right-full-height", "identity"])
@pytest.mark.parametrize("shape", [(9, 37, 53), (9, 1, 5), (9, 6, 1)], ids=lambda s: "x".join(map(str, s)))
def test_mask_stats_rle_frame_matches_uncrop(amg, impl, shape, frame_fn):
    n, h, w = shape
    x = smooth_logits(n, h, w, seed=11)
    frame = frame_fn(h, w)
    stats = mp.mask_stats(x, rle_frame=frame)
    assert stats.rles.size == (frame[2], frame[3])
    check_stats_against_amg(amg, x, 0.0, 1.0, stats, frame=frame)


def test_mask_stats_indices_and_leading_dims(impl):
    x = smooth_logits(12, 33, 21, seed=5)
    full = mp.mask_stats(x)
    idx = torch.tensor([7, 0, 7, 11, 3])
    sub = mp.mask_stats(x, indices=idx)
    assert torch.equal(sub.boxes, full.boxes[idx])
    assert torch.equal(sub.areas, full.areas[idx])
    torch.testing.assert_close(sub.stability_score, full.stability_score[idx], rtol=0, atol=0, equal_nan=True)
    assert sub.rles.to_list() == full.rles.select(idx).to_list()
    four = mp.mask_stats(x.reshape(3, 4, 33, 21), want_rle=False)
    assert four.boxes.shape == (3, 4, 4) and four.stability_score.shape == (3, 4)
    assert four.rles is None
    assert torch.equal(four.boxes.reshape(12, 4), full.boxes)
    empty = mp.mask_stats(x[:0])
    assert empty.boxes.shape == (0, 4) and len(empty.rles) == 0


def test_mask_stats_non_float32_uses_torch_semantics(amg):
    x = smooth_logits(5, 20, 30, seed=2).double()
    check_stats_against_amg(amg, x, 0.0, 1.0, mp.mask_stats(x))
    h = smooth_logits(5, 20, 30, seed=2).half()
    check_stats_against_amg(amg, h, 0.0, 1.0, mp.mask_stats(h))


@pytest.mark.skipif(not HAS_C, reason="fmrt._C is not built")
def test_kernel_sets_agree_on_large_mask():
    x = smooth_logits(6, 300, 517, seed=9)  # 517 = 8 * 64 + 5: full words, 8-lane blocks, tail
    _native._C._set_kernel_isa("generic")
    try:
        a = mp.mask_stats(x)
    finally:
        _native._C._set_kernel_isa("auto")
    b = mp.mask_stats(x)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.areas, b.areas)
    assert np.array_equal(a.rles.counts, b.rles.counts)
    torch.testing.assert_close(a.stability_score, b.stability_score, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- RLE
def test_mask_to_rle_matches_amg(amg, impl):
    x = smooth_logits(9, 37, 53, seed=4)
    masks = x > 0
    assert_rles_equal(mp.mask_to_rle(masks), amg.mask_to_rle_pytorch(masks))
    assert_rles_equal(mp.mask_to_rle(masks.numpy().astype(np.uint8)), amg.mask_to_rle_pytorch(masks))


def test_rle_decode_area_and_strings_match_amg_and_pycocotools(amg, impl):
    mask_utils = pytest.importorskip("pycocotools.mask")
    x = smooth_logits(9, 37, 53, seed=6)
    rles = mp.mask_stats(x).rles
    coco = rles.to_coco()
    for i, masks_i in enumerate(x > 0):
        rle = rles[i]
        m = masks_i.numpy()
        assert np.array_equal(mp.rle_to_mask(rle), amg.rle_to_mask(rle))
        assert np.array_equal(mp.rle_to_mask(rle), m)
        assert mp.area_from_rle(rle) == amg.area_from_rle(rle) == int(m.sum())
        # pycocotools decodes our uncompressed counts to the same mask...
        h, w = rle["size"]
        enc = mask_utils.frPyObjects(rle, h, w)
        assert np.array_equal(mask_utils.decode(enc).astype(bool), m)
        # ...and encodes the mask to exactly our compressed string
        theirs = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode("ascii")
        assert mp.rle_to_coco_string(rle["counts"]) == theirs == coco[i]["counts"]
        assert enc["counts"].decode("ascii") == theirs
        assert mp.coco_encode_rle(rle) == amg.coco_encode_rle(rle) == coco[i]
        assert mp.coco_string_to_rle(theirs, (h, w)) == rle
        assert int(mask_utils.area(enc)) == mp.area_from_rle(rle)


def test_rle_strings_roundtrip_extreme_counts(impl):
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    # large, tiny, growing and shrinking counts exercise multi-character and negative deltas
    for counts in ([0, 2**31 + 7, 1, 2**20, 3, 5, 2**26, 0 + 1, 31, 32, 33, 16, 15],
                   [5], [0, 5], list(rng.integers(1, 200, 300)), list(rng.integers(1, 2**30, 40))):
        counts = [int(c) for c in counts]
        total = sum(counts)
        s = mp.rle_to_coco_string(counts)
        assert mp._rle_to_string_py(np.asarray(counts, np.uint32)) == s
        h = 1
        assert mp.coco_string_to_rle(s, (h, total))["counts"] == counts
        assert mp._rle_from_string_py(s) == counts
        if total < 2**24:  # pycocotools round trip of the string (sizes it can decode cheaply)
            enc = mask_utils.frPyObjects({"size": [h, total], "counts": counts}, h, total)
            assert enc["counts"].decode("ascii") == s


def test_rle_batch_select_concat_areas():
    x = smooth_logits(6, 10, 12, seed=8)
    r = mp.mask_stats(x).rles
    assert np.array_equal(r.areas(), (x > 0).sum((-1, -2)).numpy())
    sel = r.select(torch.tensor([True, False, True, False, False, True]))
    assert sel.to_list() == [r[0], r[2], r[5]]
    assert r.select([-1])[0] == r[5]
    both = mp.RLEBatch.concat([sel, r])
    assert both.to_list() == sel.to_list() + r.to_list()
    assert len(r.select([])) == 0
    with pytest.raises(IndexError):
        r.select([6])
    with pytest.raises(ValueError):
        mp.RLEBatch.concat([r, mp.mask_stats(x[:, :5]).rles])


# --------------------------------------------------------------------------- NMS
def _random_boxes(rng, n, dtype, integer=False):
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(0, 40, (n, 2))
    if integer:  # SAM's boxes are integer pixel coordinates: many exact ties in IoU and area
        xy, wh = np.floor(xy), np.floor(wh)
    b = np.concatenate([xy, xy + wh], 1)
    b[::17] = b[1::17][: len(b[::17])] if n > 17 else b[::17]  # exact duplicates
    return torch.from_numpy(b.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,classes", [(0, 1), (1, 1), (150, 1), (150, 4)])
def test_batched_nms_matches_torchvision_reference(impl, dtype, n, classes):
    rng = np.random.default_rng(n * 7 + classes)
    for integer in (False, True):
        boxes = _random_boxes(rng, n, dtype, integer)
        # quantised scores: many exact ties, ordered by index as torch's stable sort does
        scores = torch.from_numpy(np.round(rng.uniform(0, 1, n), 1).astype(np.float32))
        idxs = torch.from_numpy(rng.integers(0, classes, n))
        for thr in (0.0, 0.3, 0.7, 1.0):
            ref = ref_batched_nms(boxes, scores, idxs, thr)
            for backend in ("auto", "reference"):
                out = mp.batched_nms(boxes, scores, idxs, thr, backend=backend)
                assert out.dtype == torch.int64
                assert torch.equal(out, ref), (backend, thr, integer)


def test_batched_nms_nan_scores_and_degenerate_boxes(impl):
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 9, 10]],
                         dtype=torch.float32)
    scores = torch.tensor([0.5, float("nan"), 0.9, 0.9, 0.5])
    idxs = torch.zeros(5, dtype=torch.int64)
    for thr in (0.0, 0.5, 0.89, 0.9, 0.91):  # IoU of boxes 0 and 4 is exactly 0.9
        assert torch.equal(mp.batched_nms(boxes, scores, idxs, thr), ref_batched_nms(boxes, scores, idxs, thr))


# --------------------------------------------------------------------------- AMG helpers
def test_box_helpers_match_amg(amg):
    boxes = torch.tensor([[0, 0, 5, 5], [10, 3, 40, 60], [1, 19, 20, 21]])
    assert torch.equal(mp.box_xyxy_to_xywh(boxes[1]), amg.box_xyxy_to_xywh(boxes[1]))
    for crop in ([0, 0, 64, 64], [20, 10, 60, 70]):
        assert torch.equal(mp.uncrop_boxes_xyxy(boxes, crop), amg.uncrop_boxes_xyxy(boxes, crop))
        assert torch.equal(mp.is_box_near_crop_edge(boxes, crop, [0, 0, 80, 70]),
                           amg.is_box_near_crop_edge(boxes, crop, [0, 0, 80, 70]))


@pytest.fixture
def sam_generator(monkeypatch):
    """segment_anything.SamAutomaticMaskGenerator importable with a stub torchvision."""
    if SA_DIR is None:
        pytest.skip("segment-anything is not installed (test extra)")
    before = set(sys.modules)
    for key in [k for k in sys.modules if k == "segment_anything" or k.startswith("segment_anything.")]:
        monkeypatch.delitem(sys.modules, key)
    tv = types.ModuleType("torchvision")
    ops, boxes_mod = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.boxes")
    transforms, tf = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.transforms.functional")
    boxes_mod.batched_nms = ref_batched_nms
    boxes_mod.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    tf.resize = tf.to_pil_image = None
    tv.ops, ops.boxes, tv.transforms, transforms.functional = ops, boxes_mod, transforms, tf
    for name, mod in [("torchvision", tv), ("torchvision.ops", ops), ("torchvision.ops.boxes", boxes_mod),
                      ("torchvision.transforms", transforms), ("torchvision.transforms.functional", tf)]:
        monkeypatch.setitem(sys.modules, name, mod)
    try:
        mod = importlib.import_module("segment_anything.automatic_mask_generator")
        yield mod.SamAutomaticMaskGenerator
    finally:
        for key in set(sys.modules) - before:
            if key.startswith("segment_anything"):
                sys.modules.pop(key, None)


class _StubPredictor:
    """Stands in for SamPredictor: returns prepared logits for each batch of points."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.device = torch.device("cpu")
        self.model = types.SimpleNamespace(mask_threshold=0.0)
        self.transform = types.SimpleNamespace(apply_coords=lambda pts, size: pts)

    def set_image(self, image):
        pass

    def reset_image(self):
        pass

    def predict_torch(self, point_coords, point_labels, multimask_output=True, return_logits=True):
        masks, iou = self.outputs.pop(0)
        return masks, iou, None


@pytest.mark.parametrize("crop_box,orig_size", [([0, 0, 53, 37], (37, 53)), ([10, 6, 47, 35], (40, 60))],
                         ids=["full-image", "crop"])
def test_amg_process_crop_matches_segment_anything(sam_generator, impl, crop_box, orig_size):
    """_process_batch + _process_crop of the real generator vs amg_postprocess_batch + NMS."""
    h, w = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
    gen = sam_generator.__new__(sam_generator)
    gen.pred_iou_thresh, gen.stability_score_thresh, gen.stability_score_offset = 0.5, 0.6, 1.0
    gen.points_per_batch, gen.box_nms_thresh = 4, 0.7
    gen.point_grids = [np.random.default_rng(0).uniform(0, 1, (10, 2))]
    g = torch.Generator().manual_seed(7)
    batches = []
    for b in range(3):  # 10 points in batches of 4: 4, 4, 2
        nb = 4 if b < 2 else 2
        logits = smooth_logits(nb * 3, h, w, seed=20 + b, scale=6.0).reshape(nb, 3, h, w)
        iou = torch.rand(nb, 3, generator=g)
        batches.append((logits, iou))
    gen.predictor = _StubPredictor(batches)
    image = np.zeros((orig_size[0], orig_size[1], 3), np.uint8)
    ref = gen._process_crop(image, crop_box, 0, orig_size)

    kept = []
    for logits, iou in batches:
        kept.append(mp.amg_postprocess_batch(
            logits.flatten(0, 1), iou.flatten(0, 1), pred_iou_thresh=0.5, stability_score_thresh=0.6,
            stability_score_offset=1.0, crop_box=crop_box, orig_size=orig_size))
    boxes = torch.cat([k.boxes for k in kept])
    ious = torch.cat([k.iou_preds for k in kept])
    stab = torch.cat([k.stability_score for k in kept])
    rles = mp.RLEBatch.concat([k.rles for k in kept])
    keep = mp.batched_nms(boxes.float(), ious, torch.zeros(len(boxes), dtype=torch.int64), 0.7)
    assert torch.equal(mp.uncrop_boxes_xyxy(boxes[keep], crop_box), ref["boxes"])
    assert torch.equal(ious[keep], ref["iou_preds"])
    assert torch.equal(stab[keep], ref["stability_score"])
    assert rles.select(keep).to_list() == ref["rles"]
    assert len(ref["rles"]) > 0  # the case is not vacuous


# --------------------------------------------------------------------------- custom ops, export
def test_custom_ops_opcheck(impl):
    x = smooth_logits(5, 13, 17, seed=1)[1:].contiguous()  # no empty mask: 0/0 = NaN != NaN in opcheck
    torch.library.opcheck(torch.ops.fmrt.sam_mask_stats.default, (x, 0.0, 1.0, "cpu"))
    torch.library.opcheck(torch.ops.fmrt.sam_mask_stats.default, (x.reshape(1, 4, 13, 17), 0.1, 0.5, "reference"))
    st, boxes, areas = mp.sam_mask_stats_op(x)
    full = mp.mask_stats(x, want_rle=False)
    assert torch.equal(boxes, full.boxes) and torch.equal(areas, full.areas)
    b = _random_boxes(np.random.default_rng(0), 40, np.float32)
    s = torch.rand(40, generator=torch.Generator().manual_seed(0))
    i = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.fmrt.batched_nms.default, (b, s, i, 0.5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert torch.equal(torch.ops.fmrt.batched_nms(b, s, i, 0.5), ref_batched_nms(b, s, i, 0.5))


def test_sam_mask_stats_op_compiles_and_has_zero_grad():
    x = smooth_logits(4, 9, 11, seed=2).requires_grad_(True)
    st, boxes, areas = mp.sam_mask_stats_op(x)
    (st.nan_to_num().sum()).backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    fn = torch.compile(lambda t: mp.sam_mask_stats_op(t), backend="eager", fullgraph=True)
    y = smooth_logits(4, 9, 11, seed=2)
    for a, b in zip(fn(y), mp.sam_mask_stats_op(y)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_sam_mask_stats_onnx_export_matches_reference(tmp_path, amg):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    class M(torch.nn.Module):
        def forward(self, logits):
            return mp.sam_mask_stats_op(logits, 0.0, 1.0, backend="cpu")

    x = smooth_logits(9, 37, 53, seed=21)
    path = tmp_path / "mask_stats.onnx"
    prog = torch.onnx.export(M().eval(), (x,), dynamo=True, custom_translation_table=mp.onnx_translation_table())
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    st, boxes, areas = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(st, amg.calculate_stability_score(x, 0.0, 1.0).numpy())  # NaN == NaN here
    np.testing.assert_array_equal(boxes, amg.batched_mask_to_box(x > 0).numpy())
    np.testing.assert_array_equal(areas, (x > 0).sum((-1, -2)).numpy())


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise(impl):
    x = torch.zeros(2, 4, 5)
    with pytest.raises(TypeError):
        mp.mask_stats(x.numpy())
    with pytest.raises(TypeError):
        mp.mask_stats(x.long())
    with pytest.raises(ValueError):
        mp.mask_stats(torch.zeros(5))
    with pytest.raises(ValueError):
        mp.mask_stats(torch.zeros(2, 0, 5))
    with pytest.raises(ValueError):
        mp.mask_stats(x, rle_frame=(1, 0, 4, 5))  # does not fit
    with pytest.raises(ValueError):
        mp.mask_stats(x, rle_frame=(0, 0, 4))
    with pytest.raises(ValueError):
        mp.mask_stats(x, backend="triton")
    with pytest.raises(ValueError):
        mp.mask_stats(x, backend="nope")
    with pytest.raises(ValueError):
        mp.mask_stats(x, backend="cuda")  # CPU tensor
    with pytest.raises(IndexError):
        mp.mask_stats(x, indices=[2])
    with pytest.raises(TypeError):
        mp.mask_stats(x, indices=torch.tensor([True, False]))
    with pytest.raises(TypeError):
        mp.mask_stats(x, mask_threshold="0")
    with pytest.raises(ValueError):
        mp.mask_stats(x, stability_offset=float("nan"))
    b, s, i = torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError):
        mp.batched_nms(b[:, :3], s, i, 0.5)
    with pytest.raises(ValueError):
        mp.batched_nms(b, s[:2], i, 0.5)
    with pytest.raises(TypeError):
        mp.batched_nms(b.long(), s, i, 0.5)
    with pytest.raises(TypeError):
        mp.batched_nms(b, s, i.float(), 0.5)
    with pytest.raises(ValueError):
        mp.batched_nms(b, s, i, 0.5, backend="cuda")
    with pytest.raises(TypeError):
        mp.mask_to_rle(x)  # logits, not binary masks
    with pytest.raises(ValueError):
        mp.rle_to_mask({"size": [2, 3], "counts": [1, 2]})  # sums to 3, not 6
    with pytest.raises(TypeError):
        mp.rle_to_mask({"size": [2, 3], "counts": "33"})
    with pytest.raises(ValueError):
        mp.rle_to_coco_string([-1, 2])
    with pytest.raises(ValueError):
        mp.coco_string_to_rle("\x7f", (1, 1))  # outside '0'..'o'
    with pytest.raises(ValueError):
        mp.coco_string_to_rle("k", (1, 1))  # continuation bit set at the end
    with pytest.raises(ValueError):
        mp.coco_string_to_rle("5", (2, 3))  # decodes to [5], not 6 pixels
    with pytest.raises(ValueError):
        mp.amg_postprocess_batch(x, torch.zeros(3))
    with pytest.raises(ValueError):
        mp.amg_postprocess_batch(x, torch.zeros(2), crop_box=[0, 0, 4, 4])


@pytest.mark.skipif(not HAS_C, reason="fmrt._C is not built")
def test_native_entry_points_check_dtypes():
    C = _native._C
    with pytest.raises(TypeError):
        C.mask_stats(np.zeros((1, 2, 2), np.float64))
    with pytest.raises(ValueError):
        C.mask_stats(np.zeros((2, 2), np.float32))
    with pytest.raises(IndexError):
        C.mask_stats(np.zeros((1, 2, 2), np.float32), indices=np.array([1]))
    with pytest.raises(TypeError):
        C.batched_nms(np.zeros((1, 4), np.int64), np.zeros(1), np.zeros(1, np.int64), 0.5)
    with pytest.raises(ValueError):
        C.rle_from_bits(np.zeros((1, 2, 1), np.uint64), 65)
    with pytest.raises(ValueError):
        C.rle_decode(np.array([1, 2], np.uint32), 2, 2)


# --------------------------------------------------------------------------- CUDA
CUDA_SOURCES = [ROOT / "csrc" / "cuda" / "mask_post.cu"]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(tmp_path, src):
    """The CUDA kernels compile for sm_90 (H100/H200) and sm_87 (Jetson Orin)."""
    cmd = [NVCC, "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_87,code=sm_87", "-I", str(ROOT / "csrc"), "-c", str(src),
           "-o", str(tmp_path / (src.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and HAS_C and hasattr(_native._C, "mask_stats_cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(9, 37, 53), (4, 1, 70), (4, 70, 1), (5, 256, 1000), (2, 1024, 1024)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_mask_stats_matches_cpu(amg, shape):
    if not _cuda_ready():
        pytest.skip("needs torch with CUDA and fmrt._C built with FMRT_BUILD_CUDA=1")
    x = smooth_logits(*shape, seed=13)
    for t, off in [(0.0, 1.0), (0.1, 0.3)]:
        for frame in (None, (2, 1, shape[1] + 3, shape[2] + 5)):
            gpu = mp.mask_stats(x.cuda(), t, off, rle_frame=frame, backend="cuda")
            assert gpu.boxes.is_cuda
            cpu = mp.mask_stats(x, t, off, rle_frame=frame, backend="cpu")
            assert torch.equal(gpu.boxes.cpu(), cpu.boxes)
            assert torch.equal(gpu.areas.cpu(), cpu.areas)
            torch.testing.assert_close(gpu.stability_score.cpu(), cpu.stability_score, rtol=0, atol=0,
                                       equal_nan=True)
            assert np.array_equal(gpu.rles.counts, cpu.rles.counts)
            assert np.array_equal(gpu.rles.offsets, cpu.rles.offsets)
            check_stats_against_amg(amg, x, t, off, cpu, frame=frame)


@pytest.mark.gpu
def test_cuda_amg_batch_and_indices():
    if not _cuda_ready():
        pytest.skip("needs torch with CUDA and fmrt._C built with FMRT_BUILD_CUDA=1")
    x = smooth_logits(12, 64, 80, seed=3)
    iou = torch.rand(12, generator=torch.Generator().manual_seed(0))
    a = mp.amg_postprocess_batch(x, iou, pred_iou_thresh=0.3, stability_score_thresh=0.5)
    b = mp.amg_postprocess_batch(x.cuda(), iou.cuda(), pred_iou_thresh=0.3, stability_score_thresh=0.5)
    assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.boxes, b.boxes.cpu())
    assert a.rles.to_list() == b.rles.to_list()
