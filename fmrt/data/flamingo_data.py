"""Interleaved ShapesWorld sequences for Flamingo: few-shot episodes of (image, text) chunks.

An episode is ``k`` in-context examples and a query, every chunk of one *task*::

    <sot><image> output : red <|endofchunk|><image> output : blue <|endofchunk|><image> output :

Tasks (answers are ShapesWorld words, see ``/work/shared/spec/shapes-world.md``):

* implicit ("output :" prompt; the task is only shown by the examples' answers, as in Flamingo's
  few-shot prompting): ``color`` (``red``), ``shape`` (``circle``), ``object``
  (``a large red circle``) on one-object scenes, ``count`` (``three``: number of shapes, 1-4).
* explicit ``qa``: ``question : what color is the circle ? answer : red`` with the spec's
  questions (counts, colors, yes/no existence, what shape is left of ...).

With 0 examples the implicit tasks are ambiguous (the query image alone does not say whether a
colour, a shape, a description or a count is wanted); examples disambiguate them, which is what
the 0 / 2 / 4-shot evaluation measures. Episodes are deterministic functions of
``(split, task, seed, index)`` (disjoint seed streams per split, as ``fmrt.data.dataset``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fmrt.data import language as L
from fmrt.data.dataset import split_seed
from fmrt.data.scene import FastRNG
from fmrt.data.vocab import NUMBER_WORDS, vocabulary, with_article
from fmrt.data.world import ShapesWorld

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
EXTRA_WORDS = ("question", "answer", "output", ":")
IMPLICIT_TASKS = ("color", "shape", "object", "count")
TASKS = IMPLICIT_TASKS + ("qa",)
QA_KINDS = ("count", "count_all", "what_color", "exists", "what_shape")
IGNORE = -100
_TASK_CODE = {t: i for i, t in enumerate(TASKS)}


def build_tokenizer(context_length: int = 128):
    """The ShapesWorld word tokenizer plus ``question answer output :`` and the added special
    tokens ``<image>`` (id 90) and ``<|endofchunk|>`` (id 91); every id is below 128, the
    vocabulary of ``shapes-lm-tiny``."""
    from fmrt.models.tokenizer import WordTokenizer

    tok = WordTokenizer.build(list(vocabulary()) + list(EXTRA_WORDS),
                              context_length=context_length)
    tok._tk.add_special_tokens([IMAGE_TOKEN, EOC_TOKEN])
    return tok


def special_ids(tok) -> Tuple[int, int]:
    """(media_token_id, eoc_token_id)"""
    return tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(EOC_TOKEN)


@dataclass
class Chunk:
    image: np.ndarray   # uint8 H x W x 3
    prompt: str         # "output :" or "question : ... answer :"
    answer: str


def _chunk(world: ShapesWorld, task: str, R: FastRNG) -> Chunk:
    if task in ("color", "shape", "object"):
        scene = world.single_object_scene(R)
        o = scene.objects[0]
        ans = {"color": o.color, "shape": o.shape,
               "object": with_article(f"{o.size} {o.color} {o.shape}")}[task]
        return Chunk(scene.render(), "output :", ans)
    if task == "count":
        scene = world.sample_scene(R, num_objects=1 + R.randint(4))
        return Chunk(scene.render(), "output :", NUMBER_WORDS[len(scene.objects) - 1])
    if task == "qa":
        scene = world.sample_scene(R, num_objects=1 + R.randint(4))
        qs = [(q, a) for q, a in L.questions(scene, R) if L.question_kind(q) in QA_KINDS]
        q, a = R.choice(qs)
        return Chunk(scene.render(), f"question : {q} answer :", a)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def episode_rng(split: str, task: str, index: int, seed: int = 0) -> FastRNG:
    return FastRNG(np.random.default_rng([split_seed(split), 0xF1A, _TASK_CODE[task], int(seed),
                                          int(index)]))


def sample_episode(split: str, task: str, index: int, n_chunks: int, *, seed: int = 0,
                   image_size: int = 64) -> List[Chunk]:
    """``n_chunks`` chunks of one task (the last is the query). Deterministic in its arguments;
    the first ``k`` chunks of an episode do not depend on ``n_chunks``."""
    R = episode_rng(split, task, index, seed)
    world = ShapesWorld(image_size, seed=seed)
    return [_chunk(world, task, R) for _ in range(n_chunks)]


def _ids(tok, text: str) -> List[int]:
    return tok._tk.encode(text, add_special_tokens=False).ids


def encode_episode(tok, chunks: Sequence[Chunk], *, query: bool = False
                   ) -> Tuple[List[int], List[int]]:
    """Token ids and labels of an episode. ``query=False``: every chunk complete, labels on the
    answer tokens and ``<|endofchunk|>`` of every chunk (so one episode trains 0..k-shot
    prediction). ``query=True``: the last chunk stops after its prompt (labels unused)."""
    img, eoc = special_ids(tok)
    ids, labels = [tok.sot_token_id], [IGNORE]
    for j, c in enumerate(chunks):
        p = [img] + _ids(tok, c.prompt)
        ids += p
        labels += [IGNORE] * len(p)
        if query and j == len(chunks) - 1:
            break
        a = _ids(tok, c.answer) + [eoc]
        ids += a
        labels += a
    return ids, labels


def collate_episodes(tok, episodes: Sequence[Sequence[Chunk]], preprocess, *,
                     lm_labels: bool = False) -> Dict[str, torch.Tensor]:
    """Training batch: ``input_ids`` / ``labels`` ``B x L`` (right-padded; ``labels`` are the
    next-token targets aligned with ``input_ids``, IGNORE where no loss), ``images``
    ``B x T x 3 x S x S`` normalised. ``lm_labels=True``: every real token is a target (text-only
    LM pre-training)."""
    from fmrt.preprocess import preprocess_images

    enc = [encode_episode(tok, ep) for ep in episodes]
    width = max(len(i) for i, _ in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(enc), width), IGNORE, dtype=torch.long)
    for r, (i, l) in enumerate(enc):
        ids[r, :len(i)] = torch.tensor(i)
        lab[r, :len(l)] = torch.tensor(i if lm_labels else l)
        if lm_labels:
            lab[r, 0] = IGNORE
    t = max(len(ep) for ep in episodes)
    imgs = [[c.image for c in ep] for ep in episodes]
    flat = preprocess_images([im for row in imgs for im in row], preprocess)
    if all(len(ep) == t for ep in episodes):
        images = flat.view(len(episodes), t, *flat.shape[1:])
    else:
        images = flat.new_zeros((len(episodes), t) + tuple(flat.shape[1:]))
        k = 0
        for r, row in enumerate(imgs):
            images[r, :len(row)] = flat[k:k + len(row)]
            k += len(row)
    return {"input_ids": ids, "labels": lab, "images": images}


def training_batch(tok, preprocess, step: int, batch_size: int, *, seed: int = 0,
                   n_chunks: int = 5, tasks: Sequence[str] = TASKS,
                   task_weights: Optional[Sequence[float]] = None,
                   lm_labels: bool = False) -> Dict[str, torch.Tensor]:
    """Batch ``step`` of the train split: episodes ``step * batch_size + r``, task drawn per
    episode (deterministic in ``(seed, step)``)."""
    R = np.random.default_rng([split_seed("train"), 0xF1B, seed, step])
    w = np.asarray(task_weights if task_weights is not None else [1.0] * len(tasks), float)
    picks = R.choice(len(tasks), size=batch_size, p=w / w.sum())
    eps = [sample_episode("train", tasks[p], step * batch_size + r, n_chunks, seed=seed)
           for r, p in enumerate(picks)]
    return collate_episodes(tok, eps, preprocess, lm_labels=lm_labels)
