"""Segment Anything (SAM): the segment-anything architecture, one component per file.

``image_encoder`` (ViT, windowed + global attention, decomposed relative position bias, conv neck),
``prompt_encoder`` (points, boxes, mask prompt, random-Fourier positional encoding),
``two_way_transformer``, ``mask_decoder`` (4 mask tokens, hypernetwork MLPs, IoU head, 4x
upscaling), ``sam`` (``Sam``, ``SamConfig``, ``build_sam``), ``configs`` (registered names
``sam_vit_b/l/h`` and ``shapes-sam-tiny``) and ``checkpoint`` (official checkpoints).
"""
from fmrt.models.sam import checkpoint, configs  # noqa: F401  (registers models + loader)
from fmrt.models.sam.checkpoint import config_from_state_dict, load_sam_checkpoint
from fmrt.models.sam.configs import SAM_CONFIGS
from fmrt.models.sam.image_encoder import ImageEncoderViT
from fmrt.models.sam.mask_decoder import MaskDecoder
from fmrt.models.sam.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from fmrt.models.sam.sam import (Sam, SamConfig, SamDecoderConfig, SamEncoderConfig, build_sam)
from fmrt.models.sam.two_way_transformer import TwoWayTransformer

__all__ = ["Sam", "SamConfig", "SamEncoderConfig", "SamDecoderConfig", "build_sam", "SAM_CONFIGS",
           "ImageEncoderViT", "PromptEncoder", "PositionEmbeddingRandom", "MaskDecoder",
           "TwoWayTransformer", "config_from_state_dict", "load_sam_checkpoint"]
