"""Fused kernels: contrastive logits/loss and top-k scoring, Flamingo gated cross-attention, SAM
mask decoding and mask post-processing.

Each op has a Triton kernel (GPU; tested on CPU under ``TRITON_INTERPRET=1``), a host launcher that
checks shapes, a ``torch.library`` custom op (fake + autograd registrations, so ``torch.compile`` and
``torch.export`` see one node), a real CPU path and a plain-torch reference. Submodules are imported
lazily so that importing ``fmrt`` never triggers ``@triton.jit``.
"""
from __future__ import annotations

import importlib
from typing import Any

from fmrt.kernels._triton import BACKENDS, interpret_mode, triton_available

# public name -> submodule that defines it
_EXPORTS = {
    "contrastive_loss": "contrastive",
    "contrastive_loss_reference": "contrastive",
    "topk_scores": "contrastive",
    "topk_scores_reference": "contrastive",
    "gated_cross_attention": "gated_xattn",
    "gated_cross_attention_reference": "gated_xattn",
    "gated_ffn": "gated_xattn",
    "media_token_index": "gated_xattn",
    "GatedCrossAttentionBlock": "gated_xattn",
    "decode_masks": "mask_decode",
    "decode_masks_reference": "mask_decode",
    "postprocess_masks": "mask_post",
    "mask_stats": "mask_post",
    "batched_nms": "mask_post",
    "amg_postprocess_batch": "mask_post",
    "mask_to_rle": "mask_post",
    "rle_to_mask": "mask_post",
    "rle_to_coco_string": "mask_post",
    "coco_string_to_rle": "mask_post",
}

__all__ = sorted(_EXPORTS) + ["BACKENDS", "interpret_mode", "triton_available"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'fmrt.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fmrt.kernels.{mod}"), name)
    globals()[name] = value
    return value
