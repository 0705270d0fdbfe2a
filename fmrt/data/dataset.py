"""Fixed ShapesWorld splits and a torch-style map dataset.

Item ``i`` of split ``s`` is generated from ``numpy.random.default_rng([split_seed(s),
task_code, seed, i])``: deterministic, independent of worker count and access order, and the
three splits are disjoint seed streams (no (split, i) pair shares a seed sequence with another).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from fmrt.data import language as L
from fmrt.data.scene import FastRNG, render_batch
from fmrt.data.vocab import class_labels, label_index
from fmrt.data.world import ShapesWorld

SPLITS = ("train", "val", "test")
_SPLIT_SEEDS = {"train": 0x5EED_0001, "val": 0x5EED_0002, "test": 0x5EED_0003}
TASKS = ("scene", "color_shape", "shape", "color", "winoground")
_TASK_CODES = {t: i for i, t in enumerate(TASKS)}
#: Suggested split sizes (any size works; items are generated on the fly).
DEFAULT_SPLIT_SIZES = {"train": 100_000, "val": 2_000, "test": 2_000}


def split_seed(split: str) -> int:
    """The root seed of a split's stream (``train``, ``val``, ``test``)."""
    try:
        return _SPLIT_SEEDS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}") from None


def item_rng(split: str, index: int, task: str = "scene", seed: int = 0) -> FastRNG:
    """The random stream of one dataset item."""
    return FastRNG(np.random.default_rng([split_seed(split), _TASK_CODES[task], int(seed), int(index)]))


class ShapesWorldDataset:
    """Map-style dataset (``len`` / ``[i]``; works with ``torch.utils.data.DataLoader`` given
    ``collate_fn=collate``).

    ``task``:

    - ``"scene"`` (default): 1-6 objects. Item keys: ``image`` (uint8 [H, W, 3]), ``caption``,
      ``caption_kind``, ``hard_negative``, ``dense_caption``, ``questions`` (list of
      (question, answer)), ``masks`` (bool [N, H, W]), ``points`` (float32 [N, 2], x y),
      ``boxes`` (int64 [N, 4], x0 y0 x1 y1 inclusive-exclusive), ``shapes``/``colors``/``sizes``
      (lists of words), ``shape_ids``/``color_ids``/``size_ids`` (int64 [N]), ``places``,
      ``num_objects``, ``background``, ``scene`` (the :class:`Scene`), ``index``.
    - ``"color_shape"``, ``"shape"``, ``"color"``: one object per image; adds ``label`` (int,
      index into :func:`class_labels(task)`) and ``label_name``.
    - ``"winoground"``: ``image0``, ``image1``, ``caption0``, ``caption1``, ``kind``,
      ``scene0``, ``scene1``.
    """

    def __init__(self, split: str, size: int, image_size: int = 64, task: str = "scene", seed: int = 0,
                 min_objects: int = 1, max_objects: int = 6):
        split_seed(split)
        if task not in _TASK_CODES:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.split = split
        self.size = int(size)
        self.image_size = image_size
        self.task = task
        self.seed = seed
        self.world = ShapesWorld(image_size, seed=seed, min_objects=min_objects, max_objects=max_objects)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Dict[str, object]:
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(i)
        R = item_rng(self.split, i, self.task, self.seed)
        w = self.world
        if self.task == "winoground":
            kind = ("relation", "color", "size")[i % 3]
            s0, s1, c0, c1 = w.winoground_scenes(R, kind)
            imgs = render_batch([s0, s1])
            return {"image0": imgs[0], "image1": imgs[1], "caption0": str(c0), "caption1": str(c1),
                    "kind": kind, "scene0": s0, "scene1": s1, "index": i}
        if self.task == "scene":
            scene = w.sample_scene(R)
            label = None
        else:
            K = len(class_labels(self.task))
            label = R.randint(K)
            if self.task == "color_shape":
                scene = w.single_object_scene(R, shape=class_labels("shape")[label % 4],
                                              color=class_labels("color")[label // 4])
            elif self.task == "shape":
                scene = w.single_object_scene(R, shape=class_labels("shape")[label])
            else:
                scene = w.single_object_scene(R, color=class_labels("color")[label])
        cap, negs = w.caption_with_negatives(scene, R, 1)
        item = {
            "image": scene.render(),
            "caption": str(cap),
            "caption_kind": cap.kind,
            "hard_negative": str(negs[0]),
            "dense_caption": str(L.dense_caption(scene)),
            "questions": L.questions(scene, R),
        }
        item.update(scene.ground_truth())
        item["scene"] = scene
        item["index"] = i
        if label is not None:
            o = scene.objects[0]
            assert label_index(self.task, o.shape, o.color) == label
            item["label"] = label
            item["label_name"] = class_labels(self.task)[label]
        return item


_STACK_KEYS = ("image", "image0", "image1", "label", "num_objects", "background", "index")


def collate(batch: List[Dict[str, object]]) -> Dict[str, object]:
    """Collate dataset items: fixed-shape fields (``image``, ``label``, ...) are stacked into
    torch tensors; variable-length ones (masks, points, boxes, captions, questions, scenes)
    stay lists."""
    import torch

    out: Dict[str, object] = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if k in _STACK_KEYS:
            out[k] = torch.as_tensor(np.stack([np.asarray(v) for v in vals]))
        else:
            out[k] = vals
    return out
