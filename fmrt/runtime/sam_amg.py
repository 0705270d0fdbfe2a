"""``SamAutomaticMaskGenerator``: all masks of an image from a grid of point prompts.

    gen = SamAutomaticMaskGenerator(fmrt.load("shapes-sam", backend="onnxruntime"),
                                    points_per_side=16, output_mode="coco_rle")
    records = gen.generate(image_hxwx3_uint8)   # list of dicts, segment-anything's format

segment-anything's ``SamAutomaticMaskGenerator`` semantics and defaults, record for record: per
crop (the whole image, plus ``crop_n_layers`` layers of overlapping crops) a grid of single
positive points is decoded in batches of ``points_per_batch`` (3 multimask outputs each), masks
are kept when their predicted IoU ``> pred_iou_thresh`` and their stability score
``>= stability_score_thresh``, masks whose box touches a crop edge that is not an image edge are
dropped, duplicates are removed by box NMS within the crop (``box_nms_thresh``, by predicted IoU)
and across crops (``crop_nms_thresh``, smaller crops preferred), and optionally small islands
and holes are removed (``min_mask_region_area``).

Differences in *how*, not *what*:
  * the IoU filter runs on the low-res logits, before the (dominant) upscaling to the crop size,
    so only surviving masks are resized (the filter is per mask, so the survivors are the same);
    on the torch backend it runs even before the decoder's mask head: the IoU head needs only
    the transformer's tokens, so the upscaling + hypernetwork product is computed only for the
    prompts with a mask above ``pred_iou_thresh`` (``_decode_iou_first``);
  * after the model everything runs through ``fmrt.kernels.mask_post``'s native ops: one pass
    per mask for the stability score, box, area and COCO RLE (``amg_postprocess_batch``), C++
    NMS (``batched_nms``), C++ compressed-RLE strings (``RLEBatch.to_coco``);
  * the decoder is any ``SamPredictor`` backend (the torch one computes only the 3 multimask
    outputs), used statelessly (``image_state=``): the predictor's current image is untouched
    and crop embeddings land in its embedding cache;
  * ``min_mask_region_area`` does not need OpenCV: connected components (8-connectivity) are
    labelled in numpy, numbered in raster order of their first pixel. OpenCV's block-based
    labelling may number components differently, which matters only when every island of a mask
    is below the area threshold and several of them tie for the largest.

Record keys: ``segmentation`` (bool ``[H, W]`` for ``"binary_mask"``, ``{"size", "counts"}``
with a list of run lengths for ``"uncompressed_rle"`` or a pycocotools string for
``"coco_rle"``), ``area`` (int), ``bbox`` (XYWH ints), ``predicted_iou``, ``point_coords``
(``[[x, y]]``), ``stability_score``, ``crop_box`` (XYWH ints).
"""
from __future__ import annotations

import math
from itertools import product
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fmrt.runtime.sam import SamInputError, SamPredictor, apply_coords

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


# --------------------------------------------------------------------------- grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """``amg.build_point_grid``: ``[n^2, 2]`` (x, y) cell centres in ``[0, 1]^2``, row-major."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int
                                ) -> List[np.ndarray]:
    """``amg.build_all_layer_point_grids``: layer ``i`` has ``int(n / scale**i)`` points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer ** i)))
            for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
                        ) -> Tuple[List[List[int]], List[int]]:
    """``amg.generate_crop_boxes``: XYXY crops (the image first, then ``(2^(i+1))^2`` per layer
    ``i``) and their layer indices."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


# --------------------------------------------------------------------------- small regions
def label_components(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """8-connected components of the True pixels of a 2-D bool mask.

    Returns ``(labels int32 [H, W], sizes int64 [n + 1])``: label 0 is the False pixels, labels
    ``1..n`` are components numbered in raster order of their first pixel; ``sizes[k]`` is the
    pixel count of label ``k``. Works on horizontal runs (union-find over runs of adjacent rows
    that touch, diagonals included), so the cost scales with the number of runs.
    """
    m = np.asarray(mask, dtype=bool)
    H, W = m.shape
    padded = np.zeros((H, W + 2), np.int8)
    padded[:, 1:-1] = m
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)           # exclusive; same (row, order) as the starts
    n = rows.size
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_start = np.searchsorted(rows, np.arange(H + 1))
    for r in range(1, H):
        a0, a1 = row_start[r], row_start[r + 1]      # runs of row r
        b0, b1 = row_start[r - 1], row_start[r]      # runs of row r - 1
        j = b0
        for i in range(a0, a1):
            # 8-connectivity: [s_i, e_i) touches [s_j, e_j) iff s_i <= e_j and s_j <= e_i
            while j < b1 and ends[j] < starts[i]:
                j += 1
            k = j
            while k < b1 and starts[k] <= ends[i]:
                ri, rk = find(i), find(k)
                if ri != rk:
                    parent[max(ri, rk)] = min(ri, rk)
                k += 1
    labels = np.zeros((H, W), np.int32)
    root_label: Dict[int, int] = {}
    run_label = np.empty(n, np.int32)
    for i in range(n):          # runs are in raster order: first-seen root = first pixel
        r = find(i)
        run_label[i] = root_label.setdefault(r, len(root_label) + 1)
    sizes = np.zeros(len(root_label) + 1, np.int64)
    np.add.at(sizes, run_label, (ends - starts).astype(np.int64))
    sizes[0] = H * W - sizes[1:].sum()
    for i in range(n):
        labels[rows[i], starts[i]:ends[i]] = run_label[i]
    return labels, sizes


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str
                         ) -> Tuple[np.ndarray, bool]:
    """``amg.remove_small_regions``: fill holes (``mode="holes"``) or drop islands
    (``"islands"``) smaller than ``area_thresh`` pixels; returns (mask, changed)."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = np.logical_xor(correct_holes, mask)
    regions, stats = label_components(working)
    sizes = stats[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(len(stats)) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


# --------------------------------------------------------------------------- generator
class SamAutomaticMaskGenerator:
    """See the module docstring; arguments and defaults are segment-anything's.

    Args:
        predictor: a ``SamPredictor`` (any backend), a ``Sam`` module (wrapped in the torch
            predictor) or a name / path for ``SamPredictor.load``.
        points_per_side / point_grids: exactly one: the grid size of crop layer 0 (layer ``i``
            uses ``int(points_per_side / crop_n_points_downscale_factor**i)``) or explicit
            normalised ``[K, 2]`` grids, one per layer.
        points_per_batch: point prompts per decoder call.
        pred_iou_thresh, stability_score_thresh, stability_score_offset: quality filters (a
            threshold ``<= 0`` disables its filter).
        box_nms_thresh / crop_nms_thresh: NMS IoU within a crop / across crops.
        crop_n_layers, crop_overlap_ratio, crop_n_points_downscale_factor: crops.
        min_mask_region_area: remove islands / holes below this area (0: off).
        output_mode: ``"binary_mask"``, ``"uncompressed_rle"`` or ``"coco_rle"``.
        post_backend: ``fmrt.kernels.mask_post`` backend (default ``"auto"``).
    """

    def __init__(self, predictor: Any, points_per_side: Optional[int] = 32,
                 points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
                 box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1,
                 point_grids: Optional[Sequence[np.ndarray]] = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask",
                 post_backend: Optional[str] = None) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side or point_grids")
        if not isinstance(crop_n_layers, int) or crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be an int >= 0, got {crop_n_layers!r}")
        if points_per_side is not None:
            if not isinstance(points_per_side, int) or points_per_side < 1:
                raise ValueError(f"points_per_side must be an int >= 1, got {points_per_side!r}")
            if not isinstance(crop_n_points_downscale_factor, int) or \
                    crop_n_points_downscale_factor < 1:
                raise ValueError("crop_n_points_downscale_factor must be an int >= 1")
            grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                crop_n_points_downscale_factor)
        else:
            grids = [np.asarray(g, dtype=np.float64)
                     for g in point_grids]  # type: ignore[union-attr]
            if len(grids) < crop_n_layers + 1:
                raise ValueError(f"point_grids has {len(grids)} grids; crop_n_layers="
                                 f"{crop_n_layers} needs {crop_n_layers + 1}")
        for i, g in enumerate(grids):
            if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0:
                raise ValueError(f"point grid {i} must be [K, 2] with K >= 1, got {g.shape}")
            if not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1:
                raise ValueError(f"point grid {i} must hold normalised coordinates in [0, 1]")
        if not isinstance(points_per_batch, int) or points_per_batch < 1:
            raise ValueError(f"points_per_batch must be an int >= 1, got {points_per_batch!r}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        for name, v in (("pred_iou_thresh", pred_iou_thresh),
                        ("stability_score_thresh", stability_score_thresh),
                        ("stability_score_offset", stability_score_offset),
                        ("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh),
                        ("crop_overlap_ratio", crop_overlap_ratio),
                        ("min_mask_region_area", min_mask_region_area)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if isinstance(predictor, SamPredictor):
            self.predictor = predictor
        elif isinstance(predictor, torch.nn.Module):
            self.predictor = SamPredictor.from_model(predictor)
        else:
            self.predictor = SamPredictor.load(predictor)
        self.point_grids = grids
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.post_backend = post_backend

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """All masks of ``image`` (``H x W x 3`` uint8 RGB) as segment-anything records, in
        its order (by crop, then by NMS score)."""
        data = self.generate_data(image)
        rles = data["rles"]
        if self.output_mode == "coco_rle":
            segs = rles.to_coco()
        elif self.output_mode == "binary_mask":
            from fmrt.kernels import rle_to_mask

            segs = [rle_to_mask(rles[i]) for i in range(len(rles))]
        else:
            segs = rles.to_list()
        areas = rles.areas().tolist()
        boxes = _xywh(data["boxes"]).tolist()
        crops = _xywh(data["crop_boxes"]).tolist()
        ious = data["iou_preds"].tolist()
        stab = data["stability_score"].tolist()
        points = data["points"].tolist()
        return [{"segmentation": segs[i], "area": int(areas[i]), "bbox": boxes[i],
                 "predicted_iou": float(ious[i]), "point_coords": [points[i]],
                 "stability_score": float(stab[i]), "crop_box": crops[i]}
                for i in range(len(rles))]

    @torch.no_grad()
    def generate_data(self, image: np.ndarray) -> Dict[str, Any]:
        """The masks before formatting: ``rles`` (``RLEBatch``), ``boxes`` int64 ``[K, 4]`` XYXY,
        ``iou_preds`` / ``stability_score`` float32 ``[K]``, ``points`` float64 ``[K, 2]``,
        ``crop_boxes`` int64 ``[K, 4]`` XYXY (torch tensors)."""
        from fmrt.kernels import batched_nms
        from fmrt.preprocess import InvalidImageError, check_image

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        try:
            image = check_image(image)
        except InvalidImageError as e:
            raise SamInputError(str(e)) from None
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers,
                                                     self.crop_overlap_ratio)
        parts = [self._process_crop(image, box, layer, orig_size)
                 for box, layer in zip(crop_boxes, layer_idxs)]
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["rles"]):
            cb = data["crop_boxes"]
            scores = 1 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))  # prefer smaller crops
            keep = batched_nms(data["boxes"].float(), scores,
                               torch.zeros(len(scores), dtype=torch.int64), self.crop_nms_thresh,
                               backend=_nms_backend(self.post_backend))
            data = _filter(data, keep)
        if self.min_mask_region_area > 0 and len(data["rles"]):
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh),
                self.post_backend)
        return data

    # ------------------------------------------------------------------ crops and batches
    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer: int,
                      orig_size: Tuple[int, int]) -> Dict[str, Any]:
        from fmrt.kernels import batched_nms

        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        im_size = (int(cropped.shape[0]), int(cropped.shape[1]))
        # stateless: the predictor's current image (if any) is left alone
        state = self.predictor.encode_image(cropped)
        points = self.point_grids[layer] * np.array(im_size)[None, ::-1]
        parts = [self._process_batch(state, points[i: i + self.points_per_batch], im_size,
                                     crop_box, orig_size)
                 for i in range(0, len(points), self.points_per_batch)]
        data = _cat(parts)
        if len(data["rles"]):
            keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                               torch.zeros(len(data["boxes"]), dtype=torch.int64),
                               self.box_nms_thresh, backend=_nms_backend(self.post_backend))
            data = _filter(data, keep)
        data["boxes"] = data["boxes"] + torch.tensor([[x0, y0, x0, y0]])
        data["points"] = data["points"] + torch.tensor([[x0, y0]], dtype=torch.float64)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]),
                                          dtype=torch.int64).reshape(-1, 4)
        return data

    def _process_batch(self, state, points: np.ndarray, im_size: Tuple[int, int],
                       crop_box: List[int], orig_size: Tuple[int, int]) -> Dict[str, Any]:
        from fmrt.kernels import amg_postprocess_batch

        p = self.predictor
        coords = apply_coords(points, im_size, p.img_size)[:, None, :]
        labels = np.ones(coords.shape[:2], np.float32)
        fast = self._decode_iou_first(state, coords)
        if fast is not None:
            iou, low, rows = fast
        else:
            iou, low = p.decode_lowres(coords, labels, multimask_output=True, image_state=state)
            rows = torch.arange(iou.shape[0])
        n_masks = iou.shape[1]
        iou_flat = iou.reshape(-1)
        idx = torch.arange(iou_flat.numel())
        if self.pred_iou_thresh > 0.0:
            idx = idx[iou_flat > self.pred_iou_thresh]
        if idx.numel() == 0:
            return _empty(crop_box, orig_size)
        # low holds the masks of the prompts in ``rows`` only (all prompts without the fast path)
        pos = torch.full((iou.shape[0],), -1, dtype=torch.int64)
        pos[rows] = torch.arange(rows.numel())
        low_sel = low[pos[idx // n_masks], idx % n_masks]
        logits = p.postprocess_masks(low_sel.unsqueeze(1), image_state=state)[:, 0]
        res = amg_postprocess_batch(
            logits, iou_flat[idx], pred_iou_thresh=0.0,
            stability_score_thresh=self.stability_score_thresh,
            stability_score_offset=self.stability_score_offset, mask_threshold=p.mask_threshold,
            crop_box=crop_box, orig_size=orig_size, backend=self.post_backend)
        kept = idx[res.index]
        pts = torch.from_numpy(np.repeat(points, n_masks, axis=0)).to(torch.float64)[kept]
        return {"rles": res.rles, "boxes": res.boxes.cpu(), "iou_preds": res.iou_preds.cpu(),
                "stability_score": res.stability_score.cpu(), "points": pts}

    def _decode_iou_first(self, state, coords: np.ndarray):
        """Torch backend, IoU filter on: run the two-way transformer and the IoU head for all
        prompts, then the mask head (upscaling + hypernetwork product) only for the prompts
        with a multimask output above ``pred_iou_thresh`` (with the trained shapes-sam at
        0.88, 1 prompt in 4 to 7 in 8 depending on the scene). The same maths as
        ``TorchPromptDecoder.decode`` on a subset of the batch (float rounding only), so the
        kept logits are the ones ``decode_lowres`` returns. Returns (iou [B, 3], low-res logits
        [B', 3, 4h, 4w] of the kept prompts, their indices [B']) or None where this does not
        apply.

        The transformer keeps the per-prompt image tokens factored
        (``FactoredImageTokens``: no ``B x h*w x C`` tensor), and the mask head reads them
        through ``MaskDecoder.upscale_tokens`` (two GEMMs in sub-pixel order instead of the
        transposed convolutions; the first one K deep from the factored tokens), in chunks
        of ``MASK_HEAD_CHUNK`` prompts so that its largest intermediate (``16 x 4h x 4w x
        C/8`` floats, 4 MB on shapes-sam) stays near the cores' 2 MB L2 caches: 21-25 vs 37 ms
        of CPU for 56 prompts at once alone, within noise of each other for chunks of 8-32
        inside the generator (shared 2-core box). Where the predictor fuses the mask head
        (``decode_masks``, SAM-sized embeddings) that kernel runs on the kept tokens."""
        from fmrt.runtime.sam import TorchPromptDecoder

        p = self.predictor
        eng = p.engines.get("mask_decoder_lowres")
        if self.pred_iou_thresh <= 0.0 or type(eng) is not TorchPromptDecoder or \
                p.max_points is not None:
            return None
        mod, dev = eng.module, eng.device
        batch = coords.shape[0]
        # _contract_prompts' layout without a box: the point, then a padding point (label -1)
        c = torch.from_numpy(np.concatenate([coords.astype(np.float32),
                                             np.zeros((batch, 1, 2), np.float32)], axis=1))
        lab = torch.from_numpy(np.concatenate([np.ones((batch, 1), np.float32),
                                               np.full((batch, 1), -1.0, np.float32)], axis=1))
        emb = torch.from_numpy(state.embedding).to(dev)
        md = mod.mask_decoder
        hw = tuple(emb.shape[-2:])
        dense = mod.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *hw)
        ious, lows, rows = [], [], []
        step = p.max_prompts_per_call
        with torch.inference_mode():
            for i in range(0, batch, step):
                sparse = mod.embed_points(c[i: i + step].to(dev), lab[i: i + step].to(dev))
                # hyper_in: the 3 multimask outputs only (all 4 for decode_masks)
                keys, hyper_in, iou = md._run_tokens(emb.to(mod.dtype), mod.image_pe, sparse,
                                                     dense, factored=True,
                                                     multimask_only=not eng.fused)
                keep = torch.nonzero((iou[:, 1:].float() > self.pred_iou_thresh).any(1))[:, 0]
                ious.append(iou[:, 1:].float().cpu())
                rows.append(keep.cpu() + i)
                for j in range(0, keep.numel(), MASK_HEAD_CHUNK):
                    k = keep[j: j + MASK_HEAD_CHUNK]
                    if eng.fused:
                        from fmrt.kernels import decode_masks
                        from fmrt.kernels.mask_decode import upscaling_params

                        src = _token_rows(keys, k)
                        src = src.transpose(1, 2).reshape(len(k), src.shape[-1], *hw)
                        low = decode_masks(src, hyper_in[k],
                                           **upscaling_params(md.output_upscaling),
                                           iou_pred=iou[k], select="multimask",
                                           backend=eng.kernel_backend).masks
                    elif isinstance(keys, torch.Tensor):
                        low = md.upscale_tokens(_token_rows(keys, k), hyper_in[k], hw)
                    else:   # FactoredImageTokens: the kept prompts, still factored
                        low = md.upscale_tokens(keys.select(k), hyper_in[k], hw)
                    lows.append(low.float().cpu())
        iou = torch.cat(ious)
        rows = torch.cat(rows)
        h = 4 * emb.shape[-2]
        low = torch.cat(lows) if lows else torch.zeros(0, iou.shape[1], h, 4 * emb.shape[-1])
        return iou, low, rows

    # ------------------------------------------------------------------ small regions
    @staticmethod
    def postprocess_small_regions(data: Dict[str, Any], min_area: int, nms_thresh: float,
                                  post_backend: Optional[str] = None) -> Dict[str, Any]:
        """``SamAutomaticMaskGenerator.postprocess_small_regions``: fill small holes, drop small
        islands, recompute the boxes of changed masks and drop new duplicates by NMS (unchanged
        masks preferred)."""
        from fmrt.kernels import batched_nms, mask_to_rle, rle_to_mask
        from fmrt.kernels.mask_post import RLEBatch

        rles = data["rles"]
        if len(rles) == 0:
            return data
        masks, scores = [], []
        for i in range(len(rles)):
            m = rle_to_mask(rles[i])
            m, changed_h = remove_small_regions(m, min_area, mode="holes")
            m, changed_i = remove_small_regions(m, min_area, mode="islands")
            masks.append(m)
            scores.append(float(not (changed_h or changed_i)))
        stack = torch.from_numpy(np.stack(masks))
        boxes = _mask_boxes(stack)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores),
                           torch.zeros(len(boxes), dtype=torch.int64), nms_thresh,
                           backend=_nms_backend(post_backend))
        counts = [rles.counts_of(i) for i in range(len(rles))]
        new_boxes = data["boxes"].clone()
        for i in keep.tolist():
            if scores[i] == 0.0:
                counts[i] = mask_to_rle(stack[i: i + 1]).counts_of(0)
                new_boxes[i] = boxes[i]
        lens = np.array([c.size for c in counts], np.int64)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        data = dict(data, boxes=new_boxes,
                    rles=RLEBatch(np.concatenate(counts).astype(np.uint32), offsets, rles.size))
        return _filter(data, keep)


# --------------------------------------------------------------------------- helpers
# Kept prompts per mask-head call in the automatic generator (see ``_decode_iou_first``).
MASK_HEAD_CHUNK = 16


def _token_rows(keys, rows: torch.Tensor) -> torch.Tensor:
    """The image tokens ``len(rows) x hw x C`` of the prompts ``rows`` from ``_run_tokens``'
    image tokens (a tensor, batch 1 when shared, or ``FactoredImageTokens``)."""
    if isinstance(keys, torch.Tensor):
        return keys.expand(-1 if keys.shape[0] > 1 else int(rows.max()) + 1, -1, -1)[rows]
    return keys.materialize(rows)


_KEYS = ("boxes", "iou_preds", "stability_score", "points", "crop_boxes")


def _nms_backend(post_backend: Optional[str]) -> Optional[str]:
    return post_backend if post_backend in (None, "auto", "cpu", "reference") else None


def _empty(crop_box: Sequence[int], orig_size: Tuple[int, int]) -> Dict[str, Any]:
    from fmrt.kernels.mask_post import RLEBatch

    return {"rles": RLEBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64),
                             (int(orig_size[0]), int(orig_size[1]))),
            "boxes": torch.zeros(0, 4, dtype=torch.int64),
            "iou_preds": torch.zeros(0), "stability_score": torch.zeros(0),
            "points": torch.zeros(0, 2, dtype=torch.float64)}


def _cat(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    from fmrt.kernels.mask_post import RLEBatch

    out: Dict[str, Any] = {"rles": RLEBatch.concat([p["rles"] for p in parts])}
    for k in _KEYS:
        if k in parts[0]:
            out[k] = torch.cat([p[k] for p in parts])
    return out


def _filter(data: Dict[str, Any], keep: torch.Tensor) -> Dict[str, Any]:
    out = {k: v[keep] for k, v in data.items() if k != "rles"}
    out["rles"] = data["rles"].select(keep)
    return out


def _xywh(boxes: torch.Tensor) -> torch.Tensor:
    out = boxes.clone().reshape(-1, 4)
    out[:, 2:] -= out[:, :2]
    return out


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``amg.batched_mask_to_box`` of bool ``[N, H, W]``: XYXY int64, inclusive; empty -> 0."""
    from fmrt.kernels import mask_stats

    return mask_stats(masks.to(torch.float32), 0.5, 0.25, want_rle=False).boxes.cpu()


__all__ = ["SamAutomaticMaskGenerator", "OUTPUT_MODES", "build_point_grid",
           "build_all_layer_point_grids", "generate_crop_boxes", "label_components",
           "remove_small_regions"]
