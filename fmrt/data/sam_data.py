"""Prompt/mask batches for training and evaluating Segment Anything on ShapesWorld.

Every object of a scene is one training example: its instance mask plus one prompt, either a
point (uniform over the mask's pixels, or the object's centre) or its box with SAM's jitter.
Iterative correction points depend on the model's own predictions, so they are sampled in the
trainer (``fmrt.train.sam.sample_correction_points``), not here.

Batch ``step`` is generated from ``numpy.random.default_rng([split_seed(split), SAM_STREAM,
seed, step])`` alone: resumed runs see the same data as uninterrupted ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from fmrt.data.dataset import item_rng, split_seed
from fmrt.data.scene import FastRNG, Scene, render_batch
from fmrt.data.world import ShapesWorld

#: Stream code that keeps the SAM batches apart from the other tasks' streams of a split.
SAM_STREAM = 0x5A77

PROMPT_POINT, PROMPT_BOX = 0, 1


@dataclass
class SamPromptConfig:
    """``point_prob``: share of point prompts (the rest are boxes). ``center_prob``: share of
    point prompts placed at the object's centre (the rest uniform over its mask; the centre is
    what the evaluation clicks). ``box_noise`` / ``box_noise_max``: SAM's box jitter, each
    coordinate moved by Gaussian noise with std ``box_noise`` x the box side, clipped to
    ``box_noise_max`` pixels (10% and 20 px in the SAM paper; at 64 px a side is 6-20 px, so the
    jitter is 0.6-2 px). ``max_prompts_per_image``: objects used per image (all when ``None``)."""

    image_size: int = 64
    point_prob: float = 0.5
    center_prob: float = 0.5
    box_noise: float = 0.1
    box_noise_max: float = 20.0
    max_prompts_per_image: Optional[int] = None


def jitter_box(box: Sequence[float], rng: FastRNG, image_size: int, noise: float = 0.1,
               noise_max: float = 20.0) -> np.ndarray:
    """SAM's box augmentation: ``float32 [4]`` ``x0, y0, x1, y1`` with each coordinate moved by
    N(0, ``noise`` x side) clipped to ``noise_max`` px, then clipped to the image and kept at
    least 1 px wide/high."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    g = rng.gen
    d = g.normal(0.0, 1.0, 4) * noise * np.array([w, h, w, h])
    d = np.clip(d, -noise_max, noise_max)
    b = np.array([x0, y0, x1, y1]) + d
    b = np.clip(b, 0.0, float(image_size))
    b[2] = max(b[2], b[0] + 1.0)
    b[3] = max(b[3], b[1] + 1.0)
    return b.astype(np.float32)


def object_prompts(scene: Scene, rng: FastRNG, cfg: SamPromptConfig,
                   masks: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """One prompt per object of ``scene`` (at most ``cfg.max_prompts_per_image``, a random
    subset). Returns ``masks`` bool [P, S, S], ``kinds`` int64 [P] (0 point, 1 box), ``points``
    float32 [P, 2] ``(x, y)`` pixels (zeros for boxes), ``boxes`` float32 [P, 4] (zeros for
    points)."""
    masks = scene.masks() if masks is None else masks
    n = len(scene.objects)
    order = list(range(n))
    if cfg.max_prompts_per_image is not None and n > cfg.max_prompts_per_image:
        order = sorted(rng.sample(order, cfg.max_prompts_per_image))
    P = len(order)
    kinds = np.zeros(P, dtype=np.int64)
    points = np.zeros((P, 2), dtype=np.float32)
    boxes = np.zeros((P, 4), dtype=np.float32)
    for j, i in enumerate(order):
        o = scene.objects[i]
        if rng.u() < cfg.point_prob:
            if rng.u() < cfg.center_prob:
                points[j] = o.center
            else:
                ys, xs = np.nonzero(masks[i])
                k = rng.randint(len(xs))
                points[j] = (xs[k], ys[k])
        else:
            kinds[j] = PROMPT_BOX
            boxes[j] = jitter_box(o.box, rng, scene.image_size, cfg.box_noise, cfg.box_noise_max)
    return {"masks": masks[order], "kinds": kinds, "points": points, "boxes": boxes}


class SamPromptStream:
    """Training batches, deterministic in ``(seed, step)``::

        images       uint8   [B, S, S, 3]
        masks        bool    [P, S, S]    ground-truth instance mask of each prompt
        image_index  int64   [P]          image of each prompt
        kinds        int64   [P]          0 point, 1 box
        points       float32 [P, 2]       (x, y) pixel of point prompts
        boxes        float32 [P, 4]       jittered x0, y0, x1, y1 of box prompts

    Scenes come from the train split's seed stream; test-split scenes are never drawn.
    """

    def __init__(self, cfg: SamPromptConfig, *, batch_size: int, seed: int = 0,
                 split: str = "train") -> None:
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.root = split_seed(split)
        self.world = ShapesWorld(image_size=cfg.image_size, seed=self.root)

    def __call__(self, step: int) -> Dict[str, np.ndarray]:
        R = FastRNG(np.random.default_rng([self.root, SAM_STREAM, self.seed, int(step)]))
        scenes = [self.world.sample_scene(R) for _ in range(self.batch_size)]
        parts: List[Dict[str, np.ndarray]] = []
        index: List[np.ndarray] = []
        for b, sc in enumerate(scenes):
            p = object_prompts(sc, R, self.cfg)
            parts.append(p)
            index.append(np.full(len(p["kinds"]), b, dtype=np.int64))
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["images"] = render_batch(scenes)
        out["image_index"] = np.concatenate(index)
        return out


def eval_scenes(n: int, *, seed: int = 0, split: str = "test", image_size: int = 64
                ) -> List[Scene]:
    """The first ``n`` scenes of a split: scene ``i`` is exactly the scene of
    ``ShapesWorldDataset(split, ...)[i]`` (task ``scene``), so held-out test scenes are never
    seen in training."""
    world = ShapesWorld(image_size=image_size, seed=seed)
    return [world.sample_scene(item_rng(split, i, "scene", seed)) for i in range(n)]
