"""Image preprocessing shared by every backend: numpy uint8 images of any size in, the model's
normalised ``B x 3 x S x S`` float32 tensor out.

Each bundled model records its ``PreprocessConfig`` next to its weights (``fmrt.pretrained``), so
the torch, ONNX Runtime and TensorRT facades all feed their graphs identical pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Inputs above these limits are rejected instead of being resized: one 8k x 8k RGB frame is 192 MB
# of uint8 and ~770 MB once converted to float for resizing.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000


class InvalidImageError(ValueError):
    """An input that is not a decodable image of a supported shape, dtype or size."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224
    mean: Tuple[float, float, float] = OPENAI_MEAN
    std: Tuple[float, float, float] = OPENAI_STD
    # "shortest": resize the shorter side to image_size then centre-crop (OpenAI CLIP);
    # "squash": resize both sides to image_size (no crop: keeps every object of a scene).
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PreprocessConfig":
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


def check_image(img: Any, index: int = 0) -> np.ndarray:
    """Validate one image; returns it as ``H x W x 3`` uint8 (gray and RGBA are converted)."""
    if not isinstance(img, np.ndarray):
        raise InvalidImageError(f"image {index}: expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise InvalidImageError(f"image {index}: expected HxWx3 (or HxW, HxWx1, HxWx4), "
                                f"got shape {img.shape}")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise InvalidImageError(f"image {index}: empty image {img.shape}")
    if max(h, w) > MAX_IMAGE_SIDE or h * w > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"image {index}: {w}x{h} exceeds the limit of {MAX_IMAGE_SIDE} px "
                                f"per side / {MAX_IMAGE_PIXELS} pixels")
    if img.dtype != np.uint8:
        raise InvalidImageError(f"image {index}: expected dtype uint8, got {img.dtype}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def _resize_one(img: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    s = cfg.image_size
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    h, w = x.shape[1:]
    if (h, w) == (s, s):
        return x
    if cfg.resize_mode == "squash":
        size = (s, s)
    elif cfg.resize_mode == "shortest":
        scale = s / min(h, w)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
    else:
        raise ValueError(f"unknown resize_mode {cfg.resize_mode!r}")
    mode = cfg.interpolation
    # Antialiasing matters only when shrinking; bicubic overshoots, so clamp back to [0, 1].
    x = F.interpolate(x[None], size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"),
                      align_corners=False if mode in ("bilinear", "bicubic") else None)[0]
    x = x.clamp_(0.0, 1.0)
    top, left = (x.shape[1] - s) // 2, (x.shape[2] - s) // 2
    return x[:, top: top + s, left: left + s]


def preprocess_images(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> torch.Tensor:
    """``images``: list of ``H x W x 3`` uint8 arrays (RGB, any sizes) or one ``B x H x W x 3``
    array. Returns ``B x 3 x S x S`` float32, normalised with ``cfg.mean``/``cfg.std``."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise InvalidImageError("images must be a list of HxWx3 uint8 arrays")
    if len(images) == 0:
        raise InvalidImageError("images is empty")
    imgs = [check_image(im, i) for i, im in enumerate(images)]
    if all(im.shape[:2] == (cfg.image_size, cfg.image_size) for im in imgs):
        # Fast path (ShapesWorld frames already at model size): one batched conversion.
        return uint8_batch_to_tensor(np.stack(imgs), cfg)
    return _normalize(torch.stack([_resize_one(im, cfg) for im in imgs]), cfg)


def _normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def uint8_batch_to_tensor(images: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """Training fast path: ``B x S x S x 3`` uint8 numpy -> normalised ``B x 3 x S x S``."""
    return _normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0), cfg)


__all__: List[str] = ["PreprocessConfig", "InvalidImageError", "check_image", "preprocess_images",
                      "uint8_batch_to_tensor", "OPENAI_MEAN", "OPENAI_STD"]
