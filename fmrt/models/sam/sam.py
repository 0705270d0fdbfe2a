"""``Sam``: image encoder + prompt encoder + mask decoder, with the pixel normalisation and the
pad / un-pad geometry of segment-anything.

Frames: an original ``H0 x W0`` image is resized so its longest side is ``img_size`` (the
"input size" ``H x W``), then padded right/bottom to ``img_size x img_size``. Prompt coordinates
are in pixels of that padded input frame; the decoder's low-res masks cover the padded frame at
1/4 of ``img_size`` (256 for the official 1024 models). Resizing an image (and its prompt
coordinates) belongs to the predictor; ``Sam`` normalises, pads and un-pads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.config import ConfigMixin
from fmrt.models.sam.image_encoder import ImageEncoderViT
from fmrt.models.sam.mask_decoder import MaskDecoder
from fmrt.models.sam.prompt_encoder import PromptEncoder
from fmrt.models.sam.two_way_transformer import TwoWayTransformer

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet mean/std on the 0..255 scale
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class SamEncoderConfig(ConfigMixin):
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)  # JSON lists


@dataclass
class SamDecoderConfig(ConfigMixin):
    num_multimask_outputs: int = 3
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass
class SamConfig(ConfigMixin):
    """A SAM architecture. ``prompt_embed_dim`` is the encoder's output channels, the prompt
    token width and the decoder's transformer width (256 for the official models)."""

    encoder: SamEncoderConfig = field(default_factory=SamEncoderConfig)
    decoder: SamDecoderConfig = field(default_factory=SamDecoderConfig)
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: Tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: Tuple[float, float, float] = SAM_PIXEL_STD

    def __post_init__(self) -> None:
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)

    @property
    def image_embedding_size(self) -> int:
        return self.encoder.img_size // self.encoder.patch_size


class Sam(nn.Module):
    """Segment Anything.

    Args:
        image_encoder, prompt_encoder, mask_decoder: the three parts.
        pixel_mean, pixel_std: per-channel normalisation on the 0..255 scale (buffers that are not
            saved in the state dict, as in segment-anything).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    config: Optional[SamConfig] = None  # set by build_sam; saved in model directories

    def __init__(self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder,
                 mask_decoder: MaskDecoder, *, pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
                 pixel_std: Sequence[float] = SAM_PIXEL_STD) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32)
                             .view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32)
                             .view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    # ------------------------------------------------------------------ geometry
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and pad to the square model input.

        Args:
            x: ``B x 3 x H x W`` (or ``3 x H x W``) RGB pixel values on the 0..255 scale, already
                resized so that ``max(H, W) <= img_size`` (the longest side equal to it).
        Returns:
            ``B x 3 x img_size x img_size`` float, zero-padded right/bottom after normalising
            (so the padding is the mean colour).
        """
        if x.dim() == 3:
            x = x.unsqueeze(0)
        s = self.img_size
        if x.dim() != 4 or x.shape[1] != self.pixel_mean.shape[0] or x.shape[-2] > s or x.shape[-1] > s:
            raise ValueError(f"preprocess expects B x {self.pixel_mean.shape[0]} x H x W with "
                             f"H, W <= {s}, got {tuple(x.shape)}")
        x = (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, s - w, 0, s - h))

    def postprocess_masks(self, masks: torch.Tensor, input_size: Tuple[int, int],
                          original_size: Tuple[int, int]) -> torch.Tensor:
        """Low-res logits -> logits at the original image size.

        Args:
            masks: ``B x C x h x w`` decoder logits covering the padded input frame.
            input_size: ``(H, W)`` of the resized image before padding (the valid region).
            original_size: ``(H0, W0)`` of the image before resizing.
        Returns:
            ``B x C x H0 x W0`` logits (bilinear, ``align_corners=False``, in two stages - to the
            padded frame, crop, to the original size - exactly as segment-anything).
        """
        s = self.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : int(input_size[0]), : int(input_size[1])]
        return F.interpolate(masks, tuple(int(v) for v in original_size), mode="bilinear",
                             align_corners=False)

    # ------------------------------------------------------------------ model
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` resized pixels (0..255) -> ``B x C x h x w`` image embeddings."""
        return self.image_encoder(self.preprocess(images))

    def decode(self, image_embeddings: torch.Tensor, *, point_coords: Optional[torch.Tensor] = None,
               point_labels: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
               mask_input: Optional[torch.Tensor] = None, multimask_output: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode prompts against image embeddings.

        Args:
            image_embeddings: ``1 x C x h x w`` shared by all prompts, or one per prompt
                (``B x C x h x w``).
            point_coords: ``B x N x 2`` point ``(x, y)`` in pixels of the padded input frame.
            point_labels: ``B x N``: 1 positive, 0 negative, -1 padding, 2/3 box corners.
            boxes: ``B x 4`` ``x0, y0, x1, y1`` in pixels of the padded input frame.
            mask_input: ``B x 1 x 4h x 4w`` low-res logits from a previous prediction.
            multimask_output: 3 masks per prompt, else the single-mask output.
        Returns:
            low-res mask logits ``B x M x 4h x 4w`` and IoU predictions ``B x M`` (M = 3 or 1).
        """
        sparse, dense = self.prompt_encoder(point_coords=point_coords, point_labels=point_labels,
                                            boxes=boxes, masks=mask_input)
        return self.mask_decoder(image_embeddings=image_embeddings,
                                 image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask_output)

    def forward(self, images: torch.Tensor, *, point_coords: Optional[torch.Tensor] = None,
                point_labels: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                mask_input: Optional[torch.Tensor] = None, multimask_output: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode ``B`` images (``B x 3 x H x W`` resized pixels, 0..255) and decode one prompt set
        per image (prompt batch ``B``, or 1 image for ``B`` prompts); see ``decode``."""
        return self.decode(self.encode_image(images), point_coords=point_coords,
                           point_labels=point_labels, boxes=boxes, mask_input=mask_input,
                           multimask_output=multimask_output)


def build_sam(config: SamConfig) -> Sam:
    """A randomly initialised ``Sam`` of the given architecture (eval mode)."""
    e, d = config.encoder, config.decoder
    grid = config.image_embedding_size
    image_encoder = ImageEncoderViT(
        img_size=e.img_size, patch_size=e.patch_size, in_chans=e.in_chans, embed_dim=e.embed_dim,
        depth=e.depth, num_heads=e.num_heads, mlp_ratio=e.mlp_ratio,
        out_chans=config.prompt_embed_dim, qkv_bias=e.qkv_bias, use_abs_pos=e.use_abs_pos,
        use_rel_pos=e.use_rel_pos, window_size=e.window_size,
        global_attn_indexes=e.global_attn_indexes)
    prompt_encoder = PromptEncoder(embed_dim=config.prompt_embed_dim,
                                   image_embedding_size=(grid, grid),
                                   input_image_size=(e.img_size, e.img_size),
                                   mask_in_chans=config.mask_in_chans)
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(depth=d.transformer_depth,
                                      embedding_dim=config.prompt_embed_dim,
                                      num_heads=d.transformer_heads, mlp_dim=d.transformer_mlp_dim,
                                      attention_downsample_rate=d.attention_downsample_rate),
        num_multimask_outputs=d.num_multimask_outputs, iou_head_depth=d.iou_head_depth,
        iou_head_hidden_dim=d.iou_head_hidden_dim)
    sam = Sam(image_encoder, prompt_encoder, mask_decoder, pixel_mean=config.pixel_mean,
              pixel_std=config.pixel_std)
    sam.config = config
    return sam.eval()
