"""Shared test helpers: tiny random-weight model directories in fmrt's format."""
from __future__ import annotations

import os

import torch


def make_model_dir(path: str, *, family: str = "clip", seed: int = 0) -> str:
    """Write a random-init ShapesWorld-sized model (clip or coca) with the real tokenizer."""
    import fmrt
    from fmrt.pretrained import save_pretrained
    from fmrt.train.contrastive import SHAPES_MEAN, SHAPES_STD, build_tokenizer
    from fmrt.preprocess import PreprocessConfig
    from fmrt.data import TEMPLATES

    torch.manual_seed(seed)
    arch = "shapes-coca-tiny" if family == "coca" else "shapes-vit-tiny"
    m = fmrt.create_model(arch).eval()
    tk = build_tokenizer(m.context_length)
    pre = PreprocessConfig(image_size=64, mean=SHAPES_MEAN, std=SHAPES_STD, resize_mode="squash",
                           interpolation="bilinear")
    os.makedirs(path, exist_ok=True)
    return save_pretrained(path, family=family, model=m, config=m.config.to_dict(),
                           preprocess=pre, tokenizer=tk,
                           extra={"zero_shot_templates": list(TEMPLATES[:3])})
