"""Contrastive training on ShapesWorld: CLIP, NegCLIP (hard-negative fine-tuning) and CoCa.

    fmrt train clip    --out runs/shapes-clip
    fmrt train negclip --init runs/shapes-clip/model --out runs/shapes-negclip
    fmrt train coca    --out runs/shapes-coca

Every run writes resumable checkpoints (``checkpoint.safetensors`` + optimizer moments +
``trainer_state.json``) every ``ckpt_every`` steps and, at the end, a model directory
``<out>/model`` in fmrt's format (config, weights, tokenizer, preprocessing, provenance).
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fmrt.preprocess import PreprocessConfig, uint8_batch_to_tensor
from fmrt.train import common

# ShapesWorld images are synthetic RGB on a light background; these are the channel statistics
# of 10k generated 64x64 frames, rounded (mostly background, hence the high means).
SHAPES_MEAN = (0.85, 0.83, 0.81)
SHAPES_STD = (0.25, 0.26, 0.29)


@dataclass
class TrainConfig:
    family: str = "clip"               # clip | negclip | coca
    arch: Optional[str] = None         # registered architecture (default per family)
    out_dir: str = "runs/shapes-clip"
    init_from: Optional[str] = None    # model dir / bundled name to start from (NegCLIP)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    image_size: int = 64
    template_prob: float = 0.25        # fraction of captions wrapped in a prompt template
    single_prob: float = 0.3           # fraction of one-object scenes (zero-shot needs them)
    hard_negatives: int = 0            # hard negatives per caption on the text side (NegCLIP)
    hard_negative_weight: float = 1.0  # weight of the per-image ranking term (with negatives)
    mirror_prob: float = 0.0           # share of left/right relation captions given a mirrored twin
    # Auxiliary structure codes (StructureHeads; off by default). Probe findings (BENCHMARKS):
    # they did not lift hard-negative accuracy; the text tower never learned relation roles.
    structure_weight: float = 0.0      # image embedding -> per-group presence and x, y
    text_structure_weight: float = 0.0 # caption embedding -> per-group mention and role dx, dy
    structure_tied: bool = False       # one fixed orthonormal readout for both towers
    # Relation curriculum (off by default): for the first relation_curriculum_steps steps,
    # relation captions say only "to the left of" / "above" (a "right of" / "below" caption is
    # rewritten with its phrases swapped, kept only if still true), their hard negatives never
    # replace the relation word (role swaps and attribute edits only), and a relation caption is
    # drawn with probability curriculum_relation_prob. Why: a role swap's direction is role x
    # relation word, an XOR the towers get no gradient for; text-only probes learned it from
    # one relation word first (role sign 1.0 on "left" captions, 0.71 on all after 300 mixed
    # steps) while every mixed-from-the-start variant stayed at 0.49-0.50. With the image tower
    # in the loop it did not help: NegCLIP 1,500 steps with 700 curriculum steps scored
    # hard-negative accuracy 0.872 (session-3 bundle 0.873), relation captions 0.611 (0.632).
    relation_curriculum_steps: int = 0
    curriculum_relation_prob: float = 0.5
    # Clause-sum binding loss (off by default; clause_sum_loss): each conjunction caption's
    # text embedding (captions and hard negatives of the batch) must pick the re-normalised sum
    # of its clauses' embeddings (computed without gradient) among the sums of the batch; a
    # relation caption, the sum of its two phrases'. Why: a probe of the session-3 NegCLIP
    # (benchmarks/probe_binding.py) found its image embedding binds colour to shape -
    # "a red circle" + "a blue square" outscores "a red square" + "a blue circle" on 0.76 of
    # two-object images - while the two-clause caption is a bag of words (0.51): attribute
    # swaps then give neither tower a gradient (both score them alike), and one-clause
    # embeddings are already bound, so their sum is a bound target. 1 - cos to the sum does
    # not work (the sums of a caption and its swap sit at cosine 0.97; probe stayed 0.50).
    clause_sum_weight: float = 0.0
    # Colour-swap twins (off by default): a conjunction / relation caption is given, with this
    # probability, a twin scene whose two named objects trade colours, captioned by the
    # matching attribute-swap negative (colour_swap_twin): an image-side binding negative.
    swap_twin_prob: float = 0.0
    ckpt_every: int = 250
    threads: Optional[int] = None
    resume: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = "shapes-coca-tiny" if self.family == "coca" else "shapes-vit-tiny"
        if self.family == "negclip" and self.hard_negatives == 0:
            self.hard_negatives = 1
        if self.family not in ("clip", "negclip", "coca"):
            raise ValueError(f"unknown family {self.family!r}")
        if self.clause_sum_weight < 0:
            raise ValueError(f"clause_sum_weight must be >= 0, got {self.clause_sum_weight}")
        if not 0.0 <= self.swap_twin_prob <= 1.0:
            raise ValueError(f"swap_twin_prob must be in [0, 1], got {self.swap_twin_prob}")


def build_tokenizer(context_length: int):
    from fmrt.data import vocabulary
    from fmrt.models.tokenizer import WordTokenizer

    return WordTokenizer.build(vocabulary(), context_length=context_length)


class ShapesCaptionStream:
    """Training batches ``{"images": uint8 BxSxSx3, "captions": [B], "hard_negatives": [[k]],
    "positives": bool BxB}`` (``positives[i, j]``: caption j is true of image i),
    deterministic in ``(seed, step)``.

    A ``single_prob`` share of scenes hold one object: zero-shot classification is judged on
    one-object images, and the uniform 1-6 object count alone gives them only 1/6 of the data.
    Single-object captions are wrapped in a prompt template with ``template_prob`` so that
    template words are not unseen tokens at evaluation time.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        from fmrt.data import ShapesWorld, split_seed

        self.cfg = cfg
        self.world = ShapesWorld(image_size=cfg.image_size, seed=split_seed("train"))
        self.base_seed = split_seed("train")

    def __call__(self, step: int) -> Dict[str, Any]:
        from fmrt.data import TEMPLATES, apply_template, as_rng, is_true, render_batch

        cfg, world = self.cfg, self.world
        R = as_rng(np.random.default_rng([self.base_seed, cfg.seed, step]))
        k = max(1, cfg.hard_negatives)
        scenes, caps, negs, structs, neg_structs, flips = [], [], [], [], [], []

        def add(scene, cap, text, neg, flip):
            scenes.append(scene)
            structs.append(cap)
            caps.append(text)
            negs.append([str(n) for n in neg])
            neg_structs.extend(neg)
            flips.append(flip)

        while len(scenes) < cfg.batch_size:
            sc = world.sample_scene(R, num_objects=1 if R.u() < cfg.single_prob else None)
            if step < cfg.relation_curriculum_steps:
                got = curriculum_caption(sc, R, k, cfg.curriculum_relation_prob)
                if got is None:
                    continue
                cap, neg = got
            else:
                try:
                    cap, neg = world.caption_with_negatives(sc, R, k)
                except ValueError:  # a scene too simple for k negatives: draw another
                    continue
            text = str(cap)
            if cap.kind == "single" and R.u() < cfg.template_prob:
                label = text.split(" ", 1)[1]  # drop the article; the template brings its own
                text = apply_template(TEMPLATES[R.randint(len(TEMPLATES))], label)
            add(sc, cap, text, neg, False)
            if (cfg.swap_twin_prob and len(scenes) < cfg.batch_size
                    and cap.kind in ("conjunction", "relation") and R.u() < cfg.swap_twin_prob):
                twin = colour_swap_twin(sc, cap, R, k)
                if twin is not None:
                    add(twin[0], twin[1], str(twin[1]), twin[2], False)
            if (cfg.mirror_prob and len(scenes) < cfg.batch_size and R.u() < cfg.mirror_prob
                    and cap.kind == "relation"):
                twin = mirror_twin(sc, cap, R, k if cfg.hard_negatives else 1)
                if twin is not None:
                    add(twin[0], twin[1], str(twin[1]), twin[2], True)
        # Which captions are true of which images (a template does not change the truth). With
        # hard negatives the columns continue over them: a negative of caption j is false of
        # image j but may be true of another image of the batch.
        columns = structs + (neg_structs if cfg.hard_negatives else [])
        positives = np.array([[is_true(sc, c) for c in columns] for sc in scenes])
        images = render_batch(scenes)
        for i, flip in enumerate(flips):
            if flip:  # the twin's pixels are exactly the mirrored original (see mirror_twin)
                images[i] = images[i - 1][:, ::-1]
        out = {"images": images, "captions": caps, "hard_negatives": negs,
               "positives": positives}
        if cfg.structure_weight:
            out["structure"] = np.stack([scene_structure(sc) for sc in scenes])
        if cfg.text_structure_weight:
            out["text_structure"] = np.stack([caption_structure(c) for c in columns])
        if cfg.clause_sum_weight:
            out["clauses"] = [binding_parts(c) for c in columns]
        return out


_CANONICAL_RELATION = {"to the right of": "to the left of", "below": "above"}


def canonical_relation_caption(scene, cap):
    """``cap`` with every "to the right of" / "below" clause rewritten as its converse
    ("B to the left of A", "B above A"); ``cap`` itself when a rewrite is not true of ``scene``
    (the relation margin is a fraction of the second object's width, so converses can differ)."""
    from fmrt.data import is_true
    from fmrt.data.language import Caption, Clause

    if cap.kind != "relation":
        return cap
    out = Caption(tuple(Clause(c.object, _CANONICAL_RELATION[c.relation], c.subject)
                        if c.relation in _CANONICAL_RELATION else c for c in cap.clauses),
                  cap.kind)
    return out if is_true(scene, out) else cap


def curriculum_caption(scene, R, k: int, relation_prob: float):
    """(caption, k hard negatives) for the relation curriculum (``relation_curriculum_steps``),
    or None when the scene cannot give them: a relation caption with probability
    ``relation_prob`` (where the scene has one), relations only as "left of" / "above", and
    negatives that never replace the relation word."""
    from fmrt.data import language as L

    kinds = [n for n in L.HARD_NEGATIVE_KINDS if n != "replace_relation"]
    want = "relation" if R.u() < relation_prob else None
    for t in range(6):
        try:
            cap = L.caption(scene, R, want if t < 3 else ("count" if t == 5 else None))
        except ValueError:
            continue
        cap = canonical_relation_caption(scene, cap)
        if cap.kind == "relation" and any(c.relation in _CANONICAL_RELATION
                                          for c in cap.clauses):
            continue   # no true canonical form: draw another caption
        negs = L.hard_negatives(scene, cap, R, k, kinds=kinds)
        if len(negs) == k:
            return cap, negs
    return None


def _structure_groups():
    from fmrt.data.vocab import COLORS, SHAPES, SIZES

    groups = [("color", "shape", c, s) for c in COLORS for s in SHAPES]
    groups += [("shape", None, s, None) for s in SHAPES]
    groups += [("size", "shape", z, s) for z in SIZES for s in SHAPES]
    return groups


STRUCTURE_GROUPS = _structure_groups()


def scene_structure(scene) -> np.ndarray:
    """``G x 3`` float32 targets of the auxiliary structure head, one row per object group of
    :data:`STRUCTURE_GROUPS` ((color, shape) pairs, shapes, (size, shape) pairs): whether the
    group is present (1/0) and the mean center x, y of its objects in [-1, 1] (0 when the group
    is absent; the loss masks positions of absent groups). Presence, not the count: counts are
    told apart by words alone, so the contrastive and ranking losses learn them; binding and
    relations are what a bag-of-words embedding cannot hold."""
    size = scene.image_size
    out = np.zeros((len(STRUCTURE_GROUPS), 3), np.float32)
    for g, (a1, a2, v1, v2) in enumerate(STRUCTURE_GROUPS):
        objs = [o for o in scene.objects
                if getattr(o, a1) == v1 and (a2 is None or getattr(o, a2) == v2)]
        if objs:
            out[g, 0] = 1.0
            out[g, 1] = 2.0 * np.mean([o.center[0] for o in objs]) / size - 1.0
            out[g, 2] = 2.0 * np.mean([o.center[1] for o in objs]) / size - 1.0
    return out


_REL_DIRECTION = {"to the left of": (-1.0, 0.0), "to the right of": (1.0, 0.0),
                  "above": (0.0, -1.0), "below": (0.0, 1.0)}


def _phrase_groups(p) -> List[int]:
    idx = []
    for g, (a1, a2, v1, v2) in enumerate(STRUCTURE_GROUPS):
        if getattr(p, a1) == v1 and (a2 is None and (p.color is None if a1 == "shape" else p.shape is None)
                                     or a2 is not None and getattr(p, a2) == v2):
            idx.append(g)
    return idx


def caption_structure(caption) -> np.ndarray:
    """``G x 3`` float32 targets of the auxiliary text structure head (groups as
    :func:`scene_structure`): per group named by a phrase, its mention (1) and the relation role (subject of "to the left of" -> dx -1, its object
    dx +1; above/below on dy), the signed direction an image's group position must have for
    the caption to hold."""
    out = np.zeros((len(STRUCTURE_GROUPS), 3), np.float32)
    for cl in caption.clauses:
        d = _REL_DIRECTION.get(cl.relation) if cl.relation else None
        for role, p in enumerate(cl.phrases):
            for g in _phrase_groups(p):
                out[g, 0] = 1.0
                if d is not None:
                    sign = 1.0 if role == 0 else -1.0  # the object moves the other way
                    out[g, 1] += sign * d[0]
                    out[g, 2] += sign * d[1]
    return out


def structure_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target: ``B x G x 3``; MSE on counts, MSE on positions of present groups."""
    present = (target[..., 0] > 0).to(pred.dtype)
    count = F.mse_loss(pred[..., 0], target[..., 0])
    pos = (((pred[..., 1:] - target[..., 1:]) ** 2).sum(-1) * present).sum() / present.sum().clamp(min=1)
    return count + 0.5 * pos


_MIRROR_WORDS = {"left": "right", "right": "left"}


def mirror_twin(scene, caption, rng, k: int):
    """The left-right mirror of ``scene`` with ``caption`` mirrored ("left" <-> "right") and
    ``k`` hard negatives of its own, or None when the caption has no left/right relation or the
    twin lacks ``k`` negatives.

    Why: NegCLIP's negatives live on the text side only, and a text tower trained on
    ShapesWorld reads "left" and "right" as the same word (relation swaps score at chance,
    0.49) while the image tower barely separates an image from its mirror (0.57): neither side
    gets a gradient until the other moves. A mirrored twin in the same batch is an image-side
    hard negative: its caption is false of the original image and vice versa, so the
    text->image direction must tell the two images apart. Every ShapesWorld shape is symmetric
    about the vertical axis, so the twin's pixels are the original's flipped (the caller does
    that) and its objects are the originals with x mirrored."""
    import dataclasses

    from fmrt.data import parse_caption
    from fmrt.data.language import hard_negatives

    words = str(caption).split()
    if not any(w in _MIRROR_WORDS for w in words):
        return None
    size = scene.image_size
    objs = [dataclasses.replace(o, center=(size - o.center[0], o.center[1]),
                                box=(size - o.box[2], o.box[1], size - o.box[0], o.box[3]))
            for o in scene.objects]
    msc = dataclasses.replace(scene, objects=objs)
    mcap = parse_caption(" ".join(_MIRROR_WORDS.get(w, w) for w in words))
    mneg = hard_negatives(msc, mcap, rng, k)
    return (msc, mcap, mneg) if len(mneg) == k else None


def colour_swap_twin(scene, caption, rng, k: int):
    """``(twin, twin_caption, k negatives)`` or None: ``twin`` is ``scene`` with the colours
    of two objects traded so that one colour-swap hard negative of ``caption`` (two phrases of
    different colours trade them) becomes true of the twin and ``caption`` false of it, even
    with the relation margin at zero. Only colours are traded, so the twin has the same
    geometry (objects, sizes, positions) and differs from the original in exactly the binding
    that the swapped caption gets wrong. None when no such swap exists or the twin has fewer
    than ``k`` negatives of its own."""
    import dataclasses

    from fmrt.data import as_rng, is_true
    from fmrt.data import language as L

    rng = as_rng(rng)
    cands = [c for c in L.HARD_NEGATIVE_KINDS["swap_attributes"](caption) if c[-1] == "color"]
    rng.shuffle(cands)
    objs = scene.objects
    for item in cands:
        _, kx, px, ky, py, _ = item
        ix = [i for i, o in enumerate(objs) if px.matches(o)]
        iy = [i for i, o in enumerate(objs) if py.matches(o) and i not in ix]
        if not ix or not iy:
            continue
        i, j = ix[rng.randint(len(ix))], iy[rng.randint(len(iy))]
        new = list(objs)
        new[i] = dataclasses.replace(objs[i], color=objs[j].color)
        new[j] = dataclasses.replace(objs[j], color=objs[i].color)
        twin = dataclasses.replace(scene, objects=new)
        tcap = item[0](caption, *item[1:])
        if not is_true(twin, tcap) or is_true(twin, caption, margin=0.0):
            continue
        tneg = L.hard_negatives(twin, tcap, rng, k)
        if len(tneg) == k:
            return twin, tcap, tneg
    return None


class StructureHeads(torch.nn.Module):
    """Auxiliary readouts from L2-normalised embeddings to the structure codes of
    :func:`scene_structure` (images) and :func:`caption_structure` (captions). Not part of the
    model: saved beside the checkpoints, dropped from the final model directory, so export and
    serving see a plain CLIP.

    ``tied=False``: two free linear heads (the embedding only has to hold the code linearly,
    at any norm). ``tied=True``: one fixed readout with orthonormal rows (seed 1234) for both
    towers and a learned gain per tower (init 4, the norm of a 4-object scene code): image and
    caption codes then sit on the same embedding coordinates, so the CLIP score img . txt
    contains ``s_img . s_txt / (g_img g_txt)`` = sum over groups of presence * mention +
    x * dx + y * dy, positive exactly when the named relation holds.
    """

    def __init__(self, *, embed_dim: int, tied: bool) -> None:
        super().__init__()
        n = len(STRUCTURE_GROUPS) * 3
        if n > embed_dim and tied:
            raise ValueError(f"a tied readout needs embed_dim >= {n}, got {embed_dim}")
        self.tied = tied
        if tied:
            g = torch.Generator().manual_seed(1234)
            q, _ = torch.linalg.qr(torch.randn(embed_dim, n, generator=g))
            self.register_buffer("readout", q.t().contiguous())       # n x E, orthonormal rows
            self.gain = torch.nn.Parameter(torch.tensor([4.0, 4.0]))  # image, text
        else:
            self.image_head = torch.nn.Linear(embed_dim, n)
            self.text_head = torch.nn.Linear(embed_dim, n)
            self.scale = embed_dim ** 0.5  # unit-norm inputs -> O(1) features

    def _predict(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if self.tied:
            out = self.gain[which] * x @ self.readout.t()
        else:
            out = (self.image_head if which == 0 else self.text_head)(x * self.scale)
        return out.view(x.shape[0], -1, 3)

    def image_loss(self, image_features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """image_features: ``B x E`` normalised; target: ``B x G x 3`` (scene_structure)."""
        return structure_loss(self._predict(image_features, 0), target)

    def text_loss(self, text_features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """text_features: ``T x E`` normalised; target: ``T x G x 3`` (caption_structure)."""
        return F.mse_loss(self._predict(text_features, 1), target) * 3


def binding_parts(caption) -> List[str]:
    """The texts whose embeddings sum to a caption's binding target (:func:`clause_sum_loss`):
    a conjunction's clauses, a relation caption's two phrases (``"a red circle"``, ``"the blue
    square"``), nothing for one-phrase captions. A relation's target ignores the relation (it
    is the same for an order swap or another relation word), which the softmax over targets
    allows: it only asks the caption to prefer its own phrases' sum over other sums."""
    if len(caption.clauses) > 1:
        return [cl.text for cl in caption.clauses]
    cl = caption.clauses[0]
    return [p.text for p in cl.phrases] if cl.relation is not None else []


def clause_sum_loss(model, tokenizer, text_features: torch.Tensor,
                    clauses: List[List[str]], scale: float = 100.0) -> torch.Tensor:
    """InfoNCE of each conjunction / relation caption against the clause sums of the batch:
    the rows ``j`` of ``text_features`` (``T x E``, L2-normalised) whose ``clauses[j]`` lists
    two or more texts (:func:`binding_parts`; order does not matter) are scored (``scale`` x cosine) against the distinct targets
    ``normalize(sum_c e(c))`` of all such rows, and must pick their own. ``e(c)``, the clauses'
    normalised embeddings, are computed without gradient (the target moves with the contrastive
    training of one-clause captions; the caption follows it). Zero when no row has clauses.

    Why a softmax and not ``1 - cos`` to the target: the clause sums of a caption and of its
    attribute swap sit at cosine 0.97 (mean over 500 two-object pairs, session-3 NegCLIP), so
    a bag-of-words caption embedding already gets ``1 - cos`` near its floor (measured: 0.025
    after 1,500 steps, binding probe still 0.50); the swapped caption is a hard negative of
    the same batch, so its clause sum is among the targets and only the difference between
    the two is rewarded."""
    rows = [j for j, cl in enumerate(clauses) if len(cl) > 1]
    if not rows:
        return text_features.sum() * 0.0
    keys = sorted({tuple(sorted(clauses[j])) for j in rows})   # a sum has no order
    key_index = {k: i for i, k in enumerate(keys)}
    uniq = sorted({c for k in keys for c in k})
    index = {c: i for i, c in enumerate(uniq)}
    with torch.no_grad():
        e = model.encode_text(trim_padding(tokenizer(uniq), tokenizer.pad_token_id),
                              normalize=True)
        target = F.normalize(torch.stack([e[[index[c] for c in k]].sum(0) for k in keys]),
                             dim=-1)
    logits = scale * text_features[rows] @ target.t()
    labels = torch.tensor([key_index[tuple(sorted(clauses[j]))] for j in rows])
    return F.cross_entropy(logits, labels)


def canonical_command(argv: List[str]) -> Optional[str]:
    """``fmrt ...`` for a run started from the CLI (``fmrt`` or ``python -m fmrt.cli``)."""
    if argv and (argv[0].endswith("fmrt") or argv[0].endswith("cli.py")):
        return "fmrt " + " ".join(shlex.quote(a) for a in argv[1:])
    return None


def trim_padding(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Drop trailing all-pad columns: exact for a causal tower pooled at end-of-text, and
    ShapesWorld captions use ~8 of the 32 positions, so the text tower does ~4x less work."""
    used = (ids != pad_token_id).any(dim=0).nonzero()
    return ids[:, : int(used.max()) + 1] if used.numel() else ids


def train(cfg: TrainConfig, *, progress: bool = True) -> str:
    """Run (or resume) a training job; returns the final model directory."""
    import fmrt
    from fmrt import pretrained

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        base = pretrained.load_pretrained(cfg.init_from)
        model, tokenizer = base.model.float().train(), base.tokenizer
        arch_config = base.config["config"]
    else:
        model = fmrt.create_model(cfg.arch).train()
        tokenizer = build_tokenizer(model.context_length)
        arch_config = model.config.to_dict()
        if tokenizer.vocab_size > model.text.vocab_size:
            raise ValueError(f"vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                             f"embedding table ({model.text.vocab_size})")
    pre = PreprocessConfig(image_size=model.image_size, mean=SHAPES_MEAN, std=SHAPES_STD,
                           resize_mode="squash", interpolation="bilinear")
    opt = common.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume and common.has_checkpoint(cfg.out_dir):
        start = common.load_checkpoint(cfg.out_dir, model, opt)
        print(f"resuming {cfg.out_dir} at step {start}", file=sys.stderr)
    stream = ShapesCaptionStream(cfg)
    heads = aux_opt = None
    if (cfg.structure_weight or cfg.text_structure_weight) and cfg.family != "coca":
        heads = StructureHeads(embed_dim=model.embed_dim, tied=cfg.structure_tied)
        heads_path = os.path.join(cfg.out_dir, "structure_heads.safetensors")
        if start and os.path.isfile(heads_path):
            from safetensors.torch import load_file

            heads.load_state_dict(load_file(heads_path))
        # the tied readout is fixed; only its two gains learn, at a scalar's learning rate
        aux_opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad],
                                    lr=1e-2 if cfg.structure_tied else cfg.lr, weight_decay=0.0)
    bar = common.Progress(cfg.steps, initial=start, desc=f"train {cfg.family}") if progress else None
    t0 = time.time()
    for step, batch in common.prefetch(stream, start, cfg.steps):
        lr = common.cosine_lr(step, total=cfg.steps, warmup=cfg.warmup, base_lr=cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        images = uint8_batch_to_tensor(batch["images"], pre)
        text = trim_padding(tokenizer(batch["captions"]), tokenizer.pad_token_id)
        positives = torch.from_numpy(batch["positives"])
        if cfg.family == "coca":
            loss, parts = model.loss(images, text, pad_token_id=tokenizer.pad_token_id,
                                     positives=positives)
        else:
            img, txt, scale = model(images, text)
            hn = None
            if cfg.hard_negatives:
                negs = [n for row in batch["hard_negatives"] for n in row]
                hn = model.encode_text(trim_padding(tokenizer(negs), tokenizer.pad_token_id),
                                       normalize=True)
            loss = fmrt.models.clip_contrastive_loss(img, txt, scale, hard_negative_features=hn,
                                                     positives=positives)
            parts = {}
            if hn is not None and cfg.hard_negative_weight > 0:
                rank = fmrt.models.hard_negative_ranking_loss(img, txt, hn, scale)
                loss = loss + cfg.hard_negative_weight * rank
                parts = {"rank": float(rank.detach())}
            allt = txt if hn is None else torch.cat([txt, hn], 0)   # the batch's columns
            if cfg.clause_sum_weight:
                cs = clause_sum_loss(model, tokenizer, allt, batch["clauses"])
                loss = loss + cfg.clause_sum_weight * cs
                parts["clause"] = float(cs.detach())
            if heads is not None and cfg.text_structure_weight:
                tst = heads.text_loss(allt, torch.from_numpy(batch["text_structure"]))
                loss = loss + cfg.text_structure_weight * tst
                parts["tstruct"] = float(tst.detach())
            if heads is not None and cfg.structure_weight:
                st = heads.image_loss(img, torch.from_numpy(batch["structure"]))
                loss = loss + cfg.structure_weight * st
                parts["struct"] = float(st.detach())
        opt.zero_grad(set_to_none=True)
        if aux_opt is not None:
            aux_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if aux_opt is not None:
            aux_opt.step()
        if bar:
            bar.update(loss=float(loss.detach()), lr=lr, **parts)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            if heads is not None:  # before the state json, which marks the checkpoint complete
                from safetensors.torch import save_file

                os.makedirs(cfg.out_dir, exist_ok=True)
                save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()},
                          os.path.join(cfg.out_dir, "structure_heads.safetensors"))
            common.save_checkpoint(cfg.out_dir, model, opt, step + 1,
                                   {"config": asdict(cfg), "elapsed_s": time.time() - t0})
    wall = bar.close() if bar else time.time() - t0
    provenance = {
        "command": cfg.extra.get("command") or canonical_command(sys.argv),
        "train_config": asdict(cfg), "seed": cfg.seed, "steps": cfg.steps,
        "wall_seconds_this_session": round(wall, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    from fmrt.data import TEMPLATES

    model_family = "coca" if cfg.family == "coca" else "clip"
    out = os.path.join(cfg.out_dir, "model")
    pretrained.save_pretrained(out, family=model_family, model=model.eval(), config=arch_config,
                               preprocess=pre, tokenizer=tokenizer, provenance=provenance,
                               extra={"zero_shot_templates": list(TEMPLATES)})
    print(f"{cfg.family}: {cfg.steps - start} steps in {wall:.0f}s -> {out}", file=sys.stderr)
    return out
