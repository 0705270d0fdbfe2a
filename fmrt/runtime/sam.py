"""``SamPredictor``: Segment Anything's promptable predictor, the same facade on every backend.

    p = fmrt.load("shapes-sam", backend="onnxruntime")       # or "torch", "tensorrt"
    p.set_image(image_hxwx3_uint8)                           # encoded once; embedding cached
    masks, scores, low_res = p.predict(point_coords=[[30, 20]], point_labels=[1])
    masks, scores, low_res = p.predict(box=[10, 12, 40, 50], multimask_output=False)
    masks, scores, low_res = p.predict(point_coords=..., point_labels=..., mask_input=low_res[[0]])
    masks, scores, low_res = p.predict_batch(point_coords=pts_Bx1x2, point_labels=ones_Bx1)

Semantics are segment-anything's ``SamPredictor``:

* ``set_image``: ``H x W x 3`` uint8 RGB (gray / RGBA are converted, ``image_format="BGR"`` is
  flipped), any size. Resized so the longest side is the model's ``img_size`` (PIL bilinear,
  ``ResizeLongestSide.apply_image``: ``new = int(old * img_size / max(H, W) + 0.5)``), normalised
  with the model's pixel mean / std and zero-padded right / bottom to ``img_size`` square; the
  image encoder runs once. Embeddings of the last ``embedding_cache`` images are kept by content
  hash, so setting an image again costs no encoder run.
* Prompts are in original-image pixels, ``(x, y)``; they are scaled into the resized frame in
  float64 (``apply_coords``) and fed as float32. A box is its two corners with labels 2 and 3
  (segment-anything's ONNX convention, identical to its prompt encoder's box path); points
  without a box get one padding point ``(0, 0)`` with label -1, as ``PromptEncoder`` pads. A
  call with neither points nor box gets just the padding point (segment-anything's ``predict``
  would use no sparse token at all there, which no exported decoder can express).
* Labels: 1 positive, 0 negative, -1 padding (ignored: no position, the "not a point"
  embedding), 2 / 3 box top-left / bottom-right corner. Anything else is a ``SamInputError``.
* Coordinates outside the image are allowed (segment-anything allows them too: the positional
  encoding extrapolates); NaN / inf are not. Boxes must have ``x0 <= x1`` and ``y0 <= y1``.
* Outputs: ``masks`` ``[C, H, W]`` bool at the original size (``logits > 0``; float logits with
  ``return_logits=True``), ``scores`` ``[C]`` float32 (IoU predictions), ``low_res_logits``
  ``[C, 4h, 4w]`` float32 (feed one back as ``mask_input``). ``C`` = 3 with
  ``multimask_output=True``, 1 without; ``select="best"`` returns only the multimask output
  with the highest score (on the torch backend only that mask's pixels are computed).

Backends run two graphs of ``export.specs.sam_graphs``: ``image_encoder`` and
``mask_decoder_lowres`` (segment-anything's ONNX decoder contract without the resize). The
low-res logits are resized to the original size on the host with
``fmrt.kernels.postprocess_masks`` (``Sam.postprocess_masks``), identically on every backend. The
torch backend decodes only the selected masks, through the fused ``fmrt.kernels.decode_masks``
for SAM-sized embeddings (``fused=`` overrides). Errors: ``SamInputError`` (a ``ValueError``) for
bad inputs, ``ImageNotSetError`` (also a ``RuntimeError``, as segment-anything raises) when
predicting before ``set_image``.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from export.specs import SAM_POINTS_PROFILE, SAM_PROMPT_PROFILE, GraphSpec
from fmrt.runtime.base import BACKENDS, BackendUnavailableError, Engine, RuntimeLoadError

SELECT_MODES = ("all", "multimask", "single", "best")
# Prompts per decoder call: the automatic mask generator's default batch and the TensorRT
# profile's maximum; larger batches are split (results do not depend on the split).
MAX_PROMPTS_PER_CALL = SAM_PROMPT_PROFILE[2]
VALID_LABELS = (-1, 0, 1, 2, 3)

ArrayLike = Union[np.ndarray, Sequence, torch.Tensor]


class SamInputError(ValueError):
    """A bad image or prompt (shape, dtype, label, NaN, ...)."""


class ImageNotSetError(SamInputError, RuntimeError):
    """``predict`` before ``set_image`` (a ``RuntimeError`` in segment-anything)."""


# --------------------------------------------------------------------------- geometry
def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape``: (newh, neww) with the longest side equal to
    ``long_side_length`` (float64, ``int(x + 0.5)``)."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


def resize_longest_side(image: np.ndarray, target_length: int) -> np.ndarray:
    """``ResizeLongestSide.apply_image``: PIL bilinear resize (what torchvision's ``resize`` does
    for a PIL image) of an ``H x W x 3`` uint8 array."""
    newh, neww = get_preprocess_shape(image.shape[0], image.shape[1], target_length)
    if (newh, neww) == image.shape[:2]:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_size: Tuple[int, int], target_length: int
                 ) -> np.ndarray:
    """``ResizeLongestSide.apply_coords``: ``[..., 2]`` (x, y) original pixels -> the resized
    frame, float64."""
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, target_length)
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(boxes: np.ndarray, original_size: Tuple[int, int], target_length: int
                ) -> np.ndarray:
    """``ResizeLongestSide.apply_boxes``: ``[B, 4]`` XYXY -> the resized frame."""
    return apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size,
                        target_length).reshape(-1, 4)


@dataclass(frozen=True)
class SamImageState:
    """What ``set_image`` computes: the ``[1, C, h, w]`` float32 embedding, the original
    ``(H, W)`` and the resized ``(h_in, w_in)`` before padding. ``set_image_state`` restores it
    (e.g. from a server's embedding cache)."""

    embedding: np.ndarray
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    key: str = ""

    @property
    def nbytes(self) -> int:
        return int(self.embedding.nbytes)


# --------------------------------------------------------------------------- input checks
def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - ragged lists etc.
        raise SamInputError(f"{name} is not an array: {e}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise SamInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _finite(arr: np.ndarray, name: str) -> np.ndarray:
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise SamInputError(f"{name} contains NaN or inf")
    return arr


def _labels(arr: np.ndarray, name: str = "point_labels") -> np.ndarray:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise SamInputError(f"{name} must be whole numbers in {VALID_LABELS}")
    bad = ~np.isin(arr, VALID_LABELS)
    if np.any(bad):
        raise SamInputError(f"{name} must be in {VALID_LABELS} (-1 padding, 0 negative, "
                            f"1 positive, 2/3 box corners), got {sorted(set(arr[bad].tolist()))}")
    return arr.astype(np.float32)


def _check_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    boxes = _finite(boxes, name)
    if np.any(boxes[..., 2] < boxes[..., 0]) or np.any(boxes[..., 3] < boxes[..., 1]):
        raise SamInputError(f"{name} must be XYXY with x0 <= x1 and y0 <= y1")
    return boxes


def _select(iou: torch.Tensor, low: torch.Tensor, select: str
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Host-side mask selection over all M decoder outputs (index 0 = single-mask output)."""
    if select == "all":
        return iou, low
    if select == "multimask":
        return iou[:, 1:], low[:, 1:]
    if select == "single":
        return iou[:, :1], low[:, :1]
    idx = iou[:, 1:].argmax(dim=1, keepdim=True) + 1   # "best": fmrt.kernels.decode_masks' rule
    low = torch.gather(low, 1, idx[:, :, None, None].expand(-1, -1, *low.shape[-2:]))
    return torch.gather(iou, 1, idx), low


def _select_mode(multimask_output: bool, select: Optional[str]) -> str:
    if select is None:
        return "multimask" if multimask_output else "single"
    if select not in SELECT_MODES:
        raise SamInputError(f"select must be one of {SELECT_MODES}, got {select!r}")
    return select


# --------------------------------------------------------------------------- engines
class TorchImageEncoder:
    """``image_encoder`` graph on a torch ``Sam`` (numpy in / out)."""

    def __init__(self, model: torch.nn.Module, spec: GraphSpec, device: str = "cpu") -> None:
        from export.sam_export import SamImageEncoderGraph

        self.module = SamImageEncoderGraph(model).to(device).eval()
        self.spec, self.device = spec, torch.device(device)

    @torch.inference_mode()
    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        x = torch.from_numpy(self.spec.validate_inputs(inputs)["pixel_values"]).to(self.device)
        return {"image_embeddings": self.module(x).cpu().numpy()}


# The fused mask head (fmrt.kernels.decode_masks) pays off on SAM-sized embeddings and loses on
# tiny ones, where its per-prompt tile loop is mostly overhead. Measured on the 2-core dev box
# (noisy, best of 3): sam_vit_b shapes (64x64 grid, 16 prompts, 3 masks) fused 0.7-1.0 s vs the
# unfused module 2.0 s; shapes-sam-tiny (16x16 grid, 64 prompts) fused 0.35-0.75 s vs 0.16-0.22 s.
# ``fused=None`` therefore fuses from a 32x32 grid (1024 cells) up.
FUSED_MIN_GRID_CELLS = 1024


class TorchPromptDecoder:
    """``mask_decoder_lowres`` graph on a torch ``Sam``; ``decode`` is the facade's fast path
    (torch tensors, only the selected masks computed, through the fused mask head when
    ``fused``; ``None`` = from ``FUSED_MIN_GRID_CELLS`` embedding cells up)."""

    def __init__(self, model: torch.nn.Module, spec: GraphSpec, device: str = "cpu", *,
                 fused: Optional[bool] = None, kernel_backend: Optional[str] = None) -> None:
        from export.sam_export import SamPromptDecoder

        self.module = SamPromptDecoder(model).to(device).eval()
        self.spec, self.device = spec, torch.device(device)
        if fused is None:
            h, w = spec.inputs[0].shape[2:]
            fused = h * w >= FUSED_MIN_GRID_CELLS
        self.fused, self.kernel_backend = bool(fused), kernel_backend

    @torch.inference_mode()
    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        feed = {k: torch.from_numpy(v).to(self.device)
                for k, v in self.spec.validate_inputs(inputs).items()}
        iou, low = self.module(**feed)
        return {"iou_predictions": iou.cpu().numpy(), "low_res_masks": low.cpu().numpy()}

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               mask_input: Optional[torch.Tensor], select: str
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        emb, coords, labels = embedding.to(dev), coords.to(dev), labels.to(dev)
        mask = None if mask_input is None else mask_input.to(dev)
        iou, low = self.module.decode(emb, coords, labels, mask, select=select,
                                      backend=self.kernel_backend if self.fused else "unfused")
        return iou.cpu(), low.cpu()


def _torch_engines(model: torch.nn.Module, graphs: Dict[str, GraphSpec], *, device: str = "cpu",
                   fused: Optional[bool] = None, kernel_backend: Optional[str] = None
                   ) -> Dict[str, Engine]:
    model = model.float().to(device).eval()
    return {"image_encoder": TorchImageEncoder(model, graphs["image_encoder"], device),
            "mask_decoder_lowres": TorchPromptDecoder(model, graphs["mask_decoder_lowres"], device,
                                                      fused=fused,
                                                      kernel_backend=kernel_backend)}


def _ort_engines(src, graphs: Dict[str, GraphSpec], *, precision: str = "fp32",
                 providers: Any = None, intra_op_threads: Optional[int] = None,
                 onnx_dir: Optional[str] = None, cache_root: Optional[str] = None,
                 device: Optional[str] = None) -> Dict[str, Engine]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"onnxruntime is not installed: {e}") from e
    from export.sam_export import sam_onnx_dir
    from fmrt.runtime.onnxruntime_backend import (OrtEngine, _resolve_providers,
                                                  session_options)

    if precision not in ("fp32", "int8"):
        raise RuntimeLoadError(f"onnxruntime precision {precision!r}; choose 'fp32' or 'int8'")
    onnx_dir = onnx_dir or sam_onnx_dir(src, cache_root)
    prov = _resolve_providers(providers, device)
    so = session_options(intra_op_threads)
    engines: Dict[str, Engine] = {}
    for name in ("image_encoder", "mask_decoder_lowres"):
        spec = graphs[name]
        path = os.path.join(onnx_dir, spec.file)
        if not os.path.isfile(path):
            raise RuntimeLoadError(f"{onnx_dir}: missing {spec.file} for graph {name!r}")
        if precision == "int8":
            path = _int8_graph(src, onnx_dir, spec, cache_root)
        engines[name] = OrtEngine(path, spec, providers=prov, sess_options=so)
    return engines


def _int8_graph(src, onnx_dir: str, spec: GraphSpec, cache_root: Optional[str]) -> str:
    from export.sam_export import int8_variant, sam_onnx_dir

    if not os.access(onnx_dir, os.W_OK):  # a read-only bundled onnx/: quantise into the cache
        onnx_dir = sam_onnx_dir(src, cache_root)
    return int8_variant(os.path.join(onnx_dir, spec.file))


def _tensorrt_engines(src, graphs: Dict[str, GraphSpec], *, precision: str = "fp32",
                      device: Union[None, int, str] = None, onnx_dir: Optional[str] = None,
                      cache_root: Optional[str] = None, workspace_gb: float = 4.0,
                      optimization_level: Optional[int] = None, rebuild: bool = False
                      ) -> Dict[str, Engine]:
    """Engines built by ``export.tensorrt_build`` (strongly typed: fp32 from the float32 graphs,
    fp16 from the ``.fp16.onnx`` variants), decoder profile over prompts and points from the
    spec (``SAM_PROMPT_PROFILE`` x ``SAM_POINTS_PROFILE``)."""
    if precision not in ("fp32", "fp16"):
        raise RuntimeLoadError(f"tensorrt precision {precision!r} for SAM; choose 'fp32' or "
                               "'fp16' (int8 needs calibration data, not wired for SAM)")
    from export import tensorrt_build as tb

    tb.import_tensorrt()
    device_index = tb.require_cuda(device)
    from export.sam_export import ensure_sam_variant, sam_onnx_dir
    from fmrt.runtime.tensorrt_backend import TensorRTEngine

    onnx_dir = onnx_dir or sam_onnx_dir(src, cache_root)
    engines: Dict[str, Engine] = {}
    for name in ("image_encoder", "mask_decoder_lowres"):
        spec = graphs[name]
        path = os.path.join(onnx_dir, spec.file)
        if not os.path.isfile(path):
            raise RuntimeLoadError(f"{onnx_dir}: missing {spec.file} for graph {name!r}")
        fp16 = (ensure_sam_variant(src, onnx_dir, name, "float16", cache_root=cache_root)
                if precision == "fp16" else None)
        try:
            plan = tb.build_or_load(path, spec, precision=precision, cache_root=cache_root,
                                    fp16_onnx_path=fp16,
                                    workspace_bytes=int(workspace_gb * (1 << 30)),
                                    optimization_level=optimization_level,
                                    device_index=device_index, rebuild=rebuild)
        except (tb.EngineBuildError, ValueError) as e:
            raise RuntimeLoadError(f"TensorRT engine for {name!r}: {e}") from e
        engines[name] = TensorRTEngine(plan, spec, device_index=device_index)
    return engines


def _resolve_source(name_or_path: Any, checkpoint: Optional[str] = None):
    """-> ``export.sam_export.SamSource`` (RuntimeLoadError on anything unusable)."""
    from export.onnx_export import ExportError, file_sha256
    from export.sam_export import SamSource, resolve_source
    from fmrt.models.clip_checkpoint import CheckpointError

    try:
        if checkpoint is not None:
            import fmrt
            from fmrt.registry import get_model_entry

            entry = get_model_entry(str(name_or_path))
            if entry.family != "sam":
                raise RuntimeLoadError(f"{name_or_path!r} is not a SAM architecture")
            model = fmrt.create_model(str(name_or_path), checkpoint=checkpoint)
            sha = (file_sha256(checkpoint) if os.path.isfile(checkpoint)
                   else resolve_source(checkpoint, load=False).sha)
            return SamSource(model, model.config.to_dict(), sha, str(name_or_path),
                             os.fspath(checkpoint))
        return resolve_source(name_or_path, load=False)
    except (ExportError, CheckpointError, KeyError, OSError) as e:
        raise RuntimeLoadError(f"cannot load SAM model {name_or_path!r}: {e}") from None


# --------------------------------------------------------------------------- facade
class SamPredictor:
    """See the module docstring. Build with ``SamPredictor.load`` / ``fmrt.load`` or, around an
    in-memory ``Sam``, ``SamPredictor.from_model``.

    Holds a current image (like segment-anything's predictor). For concurrent callers (a
    server) every decode method also takes ``image_state=`` (from ``encode_image``): such calls
    read no instance state and can share one predictor across threads."""

    def __init__(self, *, name: str, engines: Dict[str, Engine], graphs: Dict[str, GraphSpec],
                 img_size: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 backend: str = "torch", mask_threshold: float = 0.0, embedding_cache: int = 4,
                 max_points: Optional[int] = None,
                 max_prompts_per_call: int = MAX_PROMPTS_PER_CALL) -> None:
        self.name, self.backend = name, backend
        self.engines, self.graphs = engines, graphs
        self.img_size = int(img_size)
        self.pixel_mean = np.asarray(pixel_mean, np.float32).reshape(1, 3, 1, 1)
        self.pixel_std = np.asarray(pixel_std, np.float32).reshape(1, 3, 1, 1)
        self.mask_threshold = float(mask_threshold)
        dec = graphs["mask_decoder_lowres"]
        self.embed_dim = int(dec.inputs[0].shape[1])
        self.embed_size = int(dec.inputs[0].shape[2])
        self.mask_input_size = (4 * self.embed_size, 4 * self.embed_size)
        self.num_masks = int(dec.outputs[0].shape[1])
        self.max_points = max_points
        self.max_prompts_per_call = int(max_prompts_per_call)
        self.embedding_cache = int(embedding_cache)
        self._cache: "OrderedDict[str, SamImageState]" = OrderedDict()
        self._lock = threading.Lock()
        self._state: Optional[SamImageState] = None
        self.encoder_runs = 0  # image-encoder calls (tests check the embedding cache with it)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, name_or_path: Any, backend: str = "torch", *,
             checkpoint: Optional[str] = None, device: Optional[str] = None,
             precision: Optional[str] = None, fused: Optional[bool] = None,
             kernel_backend: Optional[str] = None, embedding_cache: int = 4,
             **kwargs: Any) -> "SamPredictor":
        """Load a bundled name (``shapes-sam``), a SAM model directory, a segment-anything
        checkpoint file (``sam_vit_b_01ec64.pth``), or a registered architecture with
        ``checkpoint=`` (``load("sam_vit_b", checkpoint=path)``).

        Args:
            backend: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
            device: torch: ``"cpu"`` / ``"cuda[:i]"``; onnxruntime: ``"cuda"`` selects the CUDA
                provider; tensorrt: the CUDA device.
            precision: onnxruntime ``"fp32"`` (default) / ``"int8"``; tensorrt ``"fp32"``
                (default) / ``"fp16"``.
            fused, kernel_backend: torch only: decode through ``fmrt.kernels.decode_masks``
                (and its backend); ``None``: fused for SAM-sized embeddings (>= 32x32).
            kwargs: onnxruntime: ``providers``, ``intra_op_threads``, ``onnx_dir``,
                ``cache_root``; tensorrt: ``onnx_dir``, ``cache_root``, ``workspace_gb``,
                ``optimization_level``, ``rebuild``.
        """
        from export.onnx_export import ExportError
        from export.sam_export import graphs_for_config
        from fmrt.models.sam import SamConfig

        if backend not in BACKENDS:
            raise RuntimeLoadError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        src = _resolve_source(name_or_path, checkpoint)
        graphs = graphs_for_config(src.arch)
        max_points = None
        try:
            if backend == "torch":
                bad = set(kwargs) - {"cache_root", "onnx_dir"}
                if bad or precision not in (None, "fp32"):
                    raise RuntimeLoadError(f"torch backend: unexpected options "
                                           f"{sorted(bad) or {'precision': precision}}")
                engines = _torch_engines(src.model, graphs, device=device or "cpu", fused=fused,
                                         kernel_backend=kernel_backend)
            elif backend == "onnxruntime":
                engines = _ort_engines(src, graphs, precision=precision or "fp32", device=device,
                                       **kwargs)
            else:
                engines = _tensorrt_engines(src, graphs, precision=precision or "fp32",
                                            device=device, **kwargs)
                max_points = SAM_POINTS_PROFILE[2]
        except ExportError as e:
            raise RuntimeLoadError(str(e)) from e
        except TypeError as e:  # unknown keyword for this backend
            raise RuntimeLoadError(f"{backend} backend: {e}") from None
        cfg = SamConfig.from_dict(src.arch)
        return cls(name=src.name, engines=engines, graphs=graphs, img_size=cfg.encoder.img_size,
                   pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std, backend=backend,
                   embedding_cache=embedding_cache, max_points=max_points)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, device: str = "cpu",
                   fused: Optional[bool] = None,
                   kernel_backend: Optional[str] = None, name: str = "sam",
                   embedding_cache: int = 4) -> "SamPredictor":
        """The torch-backend predictor around an in-memory ``Sam`` (weights shared, not copied)."""
        from export.sam_export import graphs_for_sam

        graphs = graphs_for_sam(model)
        engines = _torch_engines(model, graphs, device=device, fused=fused,
                                 kernel_backend=kernel_backend)
        return cls(name=name, engines=engines, graphs=graphs,
                   img_size=int(model.image_encoder.img_size),
                   pixel_mean=model.pixel_mean.flatten().tolist(),
                   pixel_std=model.pixel_std.flatten().tolist(), backend="torch",
                   mask_threshold=float(getattr(model, "mask_threshold", 0.0)),
                   embedding_cache=embedding_cache)

    def info(self) -> Dict[str, Any]:
        return {"name": self.name, "family": "sam", "backend": self.backend,
                "img_size": self.img_size, "embed_dim": self.embed_dim,
                "embed_size": self.embed_size, "mask_input_size": list(self.mask_input_size)}

    # ------------------------------------------------------------------ image
    def preprocess(self, image: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int]]:
        """``H x W x 3`` uint8 RGB -> (``[1, 3, S, S]`` float32 encoder input, resized (h, w))."""
        resized = resize_longest_side(image, self.img_size)
        x = resized.transpose(2, 0, 1)[None].astype(np.float32)
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = resized.shape[:2]
        out = np.zeros((1, 3, self.img_size, self.img_size), np.float32)
        out[:, :, :h, :w] = x
        return out, (h, w)

    def encode_image(self, image: ArrayLike, image_format: str = "RGB") -> SamImageState:
        """Encode one image (cached by content); does not change the current image."""
        from fmrt.preprocess import InvalidImageError, check_image

        if image_format not in ("RGB", "BGR"):
            raise SamInputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        try:
            img = check_image(image)
        except InvalidImageError as e:
            raise SamInputError(str(e)) from None
        if image_format == "BGR":
            img = img[..., ::-1]
        img = np.ascontiguousarray(img)
        h = hashlib.sha1(img.tobytes())
        h.update(str(img.shape).encode())
        key = h.hexdigest()
        with self._lock:
            state = self._cache.get(key)
            if state is not None:
                self._cache.move_to_end(key)
                return state
        pixels, input_size = self.preprocess(img)
        emb = self.engines["image_encoder"]({"pixel_values": pixels})["image_embeddings"]
        state = SamImageState(np.ascontiguousarray(emb, dtype=np.float32),
                              (int(img.shape[0]), int(img.shape[1])), input_size, key)
        with self._lock:
            self.encoder_runs += 1
            if self.embedding_cache > 0:
                self._cache[key] = state
                while len(self._cache) > self.embedding_cache:
                    self._cache.popitem(last=False)
        return state

    def set_image(self, image: ArrayLike, image_format: str = "RGB") -> None:
        """Encode ``image`` (``H x W x 3`` uint8) and make it the current image."""
        self._state = self.encode_image(image, image_format)

    def set_image_state(self, state: SamImageState) -> None:
        """Make a previously computed ``SamImageState`` the current image (no encoder run)."""
        self._state = self._check_state(state)

    def _check_state(self, state: SamImageState) -> SamImageState:
        if not isinstance(state, SamImageState):
            raise SamInputError(f"image_state must be a SamImageState, got {type(state).__name__}")
        emb = np.asarray(state.embedding)
        want = (1, self.embed_dim, self.embed_size, self.embed_size)
        if emb.shape != want:
            raise SamInputError(f"embedding must be {want}, got {emb.shape}")
        oh, ow = state.original_size
        if get_preprocess_shape(oh, ow, self.img_size) != tuple(state.input_size):
            raise SamInputError(f"input_size {state.input_size} does not match original_size "
                                f"{state.original_size} for img_size {self.img_size}")
        return state

    def reset_image(self) -> None:
        self._state = None

    @property
    def is_image_set(self) -> bool:
        return self._state is not None

    @property
    def image_state(self) -> SamImageState:
        return self._require_image()

    @property
    def original_size(self) -> Tuple[int, int]:
        return self._require_image().original_size

    @property
    def input_size(self) -> Tuple[int, int]:
        return self._require_image().input_size

    def get_image_embedding(self) -> np.ndarray:
        """``[1, C, h, w]`` float32 embedding of the current image."""
        return self._require_image().embedding

    def _require_image(self, state: Optional[SamImageState] = None) -> SamImageState:
        if state is not None:
            return self._check_state(state)
        if self._state is None:
            raise ImageNotSetError("no image set: call set_image(image) before predicting")
        return self._state

    # ------------------------------------------------------------------ prompts
    def transform_coords(self, coords: ArrayLike) -> np.ndarray:
        """Original-image (x, y) -> the encoder's resized frame (float64)."""
        return apply_coords(_to_numpy(coords, "point_coords"), self.original_size, self.img_size)

    def predict(self, point_coords: Optional[ArrayLike] = None,
                point_labels: Optional[ArrayLike] = None, box: Optional[ArrayLike] = None,
                mask_input: Optional[ArrayLike] = None, multimask_output: bool = True,
                return_logits: bool = False, select: Optional[str] = None, *,
                image_state: Optional[SamImageState] = None
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt (segment-anything's ``SamPredictor.predict``).

        Args:
            point_coords: ``[N, 2]`` (x, y) in original-image pixels; point_labels: ``[N]``.
            box: ``[4]`` (or ``[1, 4]``) XYXY in original-image pixels.
            mask_input: ``[1, 4h, 4w]`` low-res logits from a previous prediction.
            multimask_output: 3 masks, else the single-mask output.
            return_logits: float logits instead of bool masks.
            select: overrides ``multimask_output``: ``"multimask"``, ``"single"``, ``"best"``
                (the multimask output with the highest score) or ``"all"`` (all 4 outputs).
            image_state: decode against this image (``encode_image``'s result) instead of the
                current one; such calls keep no state and may run concurrently.
        Returns:
            masks ``[C, H, W]`` (bool, or float32 logits), scores ``[C]`` float32, low-res
            logits ``[C, 4h, 4w]`` float32.
        """
        self._require_image(image_state)
        coords = labels = boxes = masks = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise SamInputError("point_coords and point_labels must be given together")
            coords = _to_numpy(point_coords, "point_coords")
            labels = _to_numpy(point_labels, "point_labels")
            if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
                raise SamInputError(f"point_coords must be [N, 2] (x, y) with N >= 1, got shape "
                                    f"{coords.shape}")
            if labels.shape != (coords.shape[0],):
                raise SamInputError(f"point_labels must be [N] = [{coords.shape[0]}], got shape "
                                    f"{labels.shape}")
            coords, labels = coords[None], labels[None]
        if box is not None:
            boxes = _to_numpy(box, "box")
            if boxes.shape not in ((4,), (1, 4)):
                raise SamInputError(f"box must be [4] XYXY, got shape {boxes.shape}")
            boxes = boxes.reshape(1, 4)
        if mask_input is not None:
            masks = _to_numpy(mask_input, "mask_input")
            if masks.shape != (1,) + self.mask_input_size:
                raise SamInputError(f"mask_input must be [1, {self.mask_input_size[0]}, "
                                    f"{self.mask_input_size[1]}] low-res logits, got shape "
                                    f"{masks.shape}")
            masks = masks[None]
        m, s, low = self.predict_batch(coords, labels, boxes, masks, multimask_output,
                                       return_logits, select, image_state=image_state)
        return m[0], s[0], low[0]

    def predict_batch(self, point_coords: Optional[ArrayLike] = None,
                      point_labels: Optional[ArrayLike] = None,
                      boxes: Optional[ArrayLike] = None, mask_input: Optional[ArrayLike] = None,
                      multimask_output: bool = True, return_logits: bool = False,
                      select: Optional[str] = None, *,
                      image_state: Optional[SamImageState] = None
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``B`` prompts on the current image, in original-image pixels: point_coords
        ``[B, N, 2]`` + point_labels ``[B, N]``, boxes ``[B, 4]``, mask_input
        ``[B, 1, 4h, 4w]`` (any subset, same ``B``). Returns masks ``[B, C, H, W]``, scores
        ``[B, C]``, low-res logits ``[B, C, 4h, 4w]`` (numpy).

        Every prompt of a batch has the same point count ``N``. Padding shorter prompts with
        label -1 points is allowed but not free: each padding point is one more token in the
        two-way transformer, so results move slightly (group prompts by ``N`` for exactness).
        Prompts are decoded ``max_prompts_per_call`` at a time; the split does not change the
        results."""
        state = self._require_image(image_state)
        coords = labels = bx = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise SamInputError("point_coords and point_labels must be given together")
            c = _finite(_to_numpy(point_coords, "point_coords"), "point_coords")
            if c.ndim != 3 or c.shape[2] != 2 or c.shape[1] == 0:
                raise SamInputError(f"point_coords must be [B, N, 2] with N >= 1, got shape "
                                    f"{c.shape}")
            lab = _to_numpy(point_labels, "point_labels")
            if lab.shape != c.shape[:2]:
                raise SamInputError(f"point_labels must be [B, N] = {list(c.shape[:2])}, got "
                                    f"shape {lab.shape}")
            coords = apply_coords(c, state.original_size, self.img_size)
            labels = _labels(lab)
        if boxes is not None:
            b = _to_numpy(boxes, "boxes")
            if b.ndim != 2 or b.shape[1] != 4:
                raise SamInputError(f"boxes must be [B, 4] XYXY, got shape {b.shape}")
            bx = apply_boxes(_check_boxes(b, "boxes"), state.original_size, self.img_size)
        return tuple(t.numpy() for t in self.predict_torch(  # type: ignore[return-value]
            coords, labels, bx, mask_input, multimask_output, return_logits, select,
            image_state=state))

    def predict_torch(self, point_coords: Optional[ArrayLike], point_labels: Optional[ArrayLike],
                      boxes: Optional[ArrayLike] = None, mask_input: Optional[ArrayLike] = None,
                      multimask_output: bool = True, return_logits: bool = False,
                      select: Optional[str] = None, *,
                      image_state: Optional[SamImageState] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """segment-anything's ``predict_torch``: prompts already in the resized input frame
        (``transform_coords``), batched (``[B, N, 2]``, ``[B, N]``, ``[B, 4]``,
        ``[B, 1, 4h, 4w]``). Returns torch CPU tensors: masks ``[B, C, H, W]`` (bool or
        logits), IoU predictions ``[B, C]``, low-res logits ``[B, C, 4h, 4w]``."""
        state = self._require_image(image_state)
        iou, low = self.decode_lowres(point_coords, point_labels, boxes, mask_input,
                                      multimask_output=multimask_output, select=select,
                                      image_state=state)
        masks = self.postprocess_masks(low, image_state=state)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low

    def postprocess_masks(self, low_res: torch.Tensor, *,
                          image_state: Optional[SamImageState] = None) -> torch.Tensor:
        """``[B, C, 4h, 4w]`` low-res logits -> ``[B, C, H, W]`` logits at the original size
        (``fmrt.kernels.postprocess_masks``: ``Sam.postprocess_masks``)."""
        from fmrt.kernels import postprocess_masks

        state = self._require_image(image_state)
        s = self.img_size
        if tuple(low_res.shape[-2:]) == (s, s) and tuple(state.input_size) == (s, s) and \
                tuple(state.original_size) == (s, s):
            # a same-size bilinear resample (align_corners=False) samples every pixel at its
            # own centre with weight 1 and 0: the identity, exactly. shapes-sam on its 64x64
            # scenes (64x64 logits) hits this for every mask (~3% of automatic masks' time).
            return low_res
        return postprocess_masks(low_res, state.input_size, state.original_size,
                                 img_size=self.img_size)

    def decode_lowres(self, point_coords: Optional[ArrayLike], point_labels: Optional[ArrayLike],
                      boxes: Optional[ArrayLike] = None, mask_input: Optional[ArrayLike] = None,
                      *, multimask_output: bool = True, select: Optional[str] = None,
                      image_state: Optional[SamImageState] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder only: prompts in the input frame (see ``predict_torch``) -> IoU
        predictions ``[B, C]`` and low-res logits ``[B, C, 4h, 4w]`` (torch, CPU, float32)."""
        state = self._require_image(image_state)
        mode = _select_mode(multimask_output, select)
        coords, labels, mask, batch = self._contract_prompts(point_coords, point_labels, boxes,
                                                             mask_input)
        emb = torch.from_numpy(state.embedding)
        if self.max_points is not None and coords.shape[1] > self.max_points:
            raise SamInputError(f"{coords.shape[1]} prompt points (points + box corners + "
                                f"padding) exceed this {self.backend} engine's {self.max_points}")
        ious, lows = [], []
        if mask is not None and batch > 1:
            # the decoder contract has one mask prompt per call: decode prompt by prompt
            chunks = [(slice(i, i + 1), mask[i: i + 1]) for i in range(batch)]
        else:
            step = self.max_prompts_per_call
            chunks = [(slice(i, i + step), mask) for i in range(0, batch, step)]
        for sl, m in chunks:
            iou, low = self._decode(emb, coords[sl], labels[sl], m, mode)
            ious.append(iou)
            lows.append(low)
        if len(ious) == 1:
            return ious[0], lows[0]
        return torch.cat(ious), torch.cat(lows)

    def _decode(self, emb: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                mask: Optional[torch.Tensor], mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
        eng = self.engines["mask_decoder_lowres"]
        if isinstance(eng, TorchPromptDecoder):
            return eng.decode(emb, coords, labels, mask, mode)
        if mask is None:
            mask_np = np.zeros((1, 1) + self.mask_input_size, np.float32)
            has = np.zeros(1, np.float32)
        else:
            mask_np, has = mask.numpy(), np.ones(1, np.float32)
        out = eng({"image_embeddings": emb.numpy(), "point_coords": coords.numpy(),
                   "point_labels": labels.numpy(), "mask_input": mask_np,
                   "has_mask_input": has})
        return _select(torch.from_numpy(np.asarray(out["iou_predictions"], np.float32)),
                       torch.from_numpy(np.asarray(out["low_res_masks"], np.float32)), mode)

    def _contract_prompts(self, point_coords, point_labels, boxes, mask_input):
        """Batched prompts -> the decoder contract's (coords [B, N', 2] f32, labels [B, N'] f32,
        mask [B, 1, 4h, 4w] f32 or None, B): points, then box corners (labels 2, 3) or one
        padding point (label -1) when there is no box."""
        parts_c, parts_l = [], []
        sizes = {}
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise SamInputError("point_coords and point_labels must be given together")
            c = _finite(_to_numpy(point_coords, "point_coords"), "point_coords")
            lab = _to_numpy(point_labels, "point_labels")
            if c.ndim != 3 or c.shape[2] != 2 or c.shape[1] == 0:
                raise SamInputError(f"point_coords must be [B, N, 2] with N >= 1, got shape "
                                    f"{c.shape}")
            if lab.shape != c.shape[:2]:
                raise SamInputError(f"point_labels must be [B, N] = {list(c.shape[:2])}, got "
                                    f"shape {lab.shape}")
            parts_c.append(c.astype(np.float32))
            parts_l.append(_labels(lab))
            sizes["point_coords"] = c.shape[0]
        if boxes is not None:
            b = _to_numpy(boxes, "boxes")
            if b.ndim != 2 or b.shape[1] != 4:
                raise SamInputError(f"boxes must be [B, 4] XYXY, got shape {b.shape}")
            b = _check_boxes(b, "boxes")
            parts_c.append(b.reshape(-1, 2, 2).astype(np.float32))
            parts_l.append(np.tile(np.array([[2.0, 3.0]], np.float32), (b.shape[0], 1)))
            sizes["boxes"] = b.shape[0]
        mask = None
        if mask_input is not None:
            m = _finite(_to_numpy(mask_input, "mask_input"), "mask_input")
            if m.ndim != 4 or m.shape[1:] != (1,) + self.mask_input_size:
                raise SamInputError(f"mask_input must be [B, 1, {self.mask_input_size[0]}, "
                                    f"{self.mask_input_size[1]}], got shape {m.shape}")
            mask = torch.from_numpy(m.astype(np.float32))
            sizes["mask_input"] = m.shape[0]
        if len(set(sizes.values())) > 1:
            raise SamInputError(f"prompt batch sizes differ: {sizes}")
        batch = next(iter(sizes.values())) if sizes else 1
        if batch == 0:
            raise SamInputError("empty prompt batch")
        if boxes is None:
            parts_c.append(np.zeros((batch, 1, 2), np.float32))
            parts_l.append(np.full((batch, 1), -1.0, np.float32))
        coords = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts_c, axis=1)))
        labels = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts_l, axis=1)))
        return coords, labels, mask, batch


__all__ = ["SamPredictor", "SamImageState", "SamInputError", "ImageNotSetError",
           "get_preprocess_shape", "resize_longest_side", "apply_coords", "apply_boxes",
           "SELECT_MODES"]
