"""Two-stage LLaVA training on ShapesWorld, and its held-out evaluation.

    fmrt train llava --stage 1 --out runs/shapes-llava-s1            # projector only, captions
    fmrt train llava --stage 2 --init runs/shapes-llava-s1/model --out runs/shapes-llava-s2

Stage 1 builds ``shapes-llava-tiny`` (optionally with a learned per-patch position embedding
on the projected image features, ``image_pos_embed="learned"``), copies ``shapes-clip``'s
vision tower into it (frozen) and trains the projector alone on captions; ``lm_steps > 0``
(``--lm-steps``) first warms the LM up on the stage-2 text alone (``train_lm_text_only``).
Stage 2 starts from the stage-1 model and trains projector + LM (+ with ``tune_vision``,
Molmo-style, the vision tower at ``vision_lr_scale`` x lr) on questions, pointing and dense
descriptions (``fmrt.data.vlm_data.STAGE2_MIX``). With ``coord_tokens`` (``--coord-tokens 64``)
point coordinates are single ``<locN>`` tokens, trained against a Gaussian over neighbouring
values with ``coord_sigma``. The bundled model (BENCHMARKS.md has its commands) also takes
``shapes-negclip``'s tower (``vision_from``), an untied output head (``untie_embeddings``,
without which "yes" and "no" merge and existence questions stay at chance) and independent
turns (``independent_turns``: no question can be answered from another turn's text).
The loss is next-token cross-entropy on the answer tokens (and ``<eot>``) only. Checkpoints are resumable (``fmrt.train.common``); the final
model directory ``<out>/model`` is fmrt's format with the tokenizer (``<image>``/``<sep>``
included).

Short-run ablations (stage 2 only, 250 steps, batch 16, lr 3e-3, seed 0, from the same 60-step
stage-1 model unless noted; QA exact match / points inside / pointing exact count on 100 test
scenes; QA sigma ~0.025 at 407 questions):

  ======================================  =====  ======  =====  ==========================
  run                                      QA     inside  count  note
  ======================================  =====  ======  =====  ==========================
  baseline (token-mean loss, 3 turns)      0.482  0.090   0.29
  loss_weighting="answer"                  0.499  0.052   0.48   exists 0.51 (chance)
  + image_feature_norm="rms" (new stage 1) 0.452  0.068   0.51   colour 0.57 -> 0.16
  short questions only (QA_FIRST_MIX)      0.364  -       -      curriculum: worse
  description-heavy mix (describe 0.27)    0.504  0.087   0.53   exists 0.62 (first > 0.5)
  turns=6                                  0.526  0.129   0.48   counting 0.575
  turns=10                                 0.491  0.070   0.39   (so turns=6 is partly noise)
  ======================================  =====  ======  =====  ==========================

Full run with turns=6 + the description-heavy mix (stage 1 60 steps, stage 2 1200 steps, batch
16, lr 3e-3; 14.4 min total on 1 thread; 200 test scenes): QA 0.574 (count 0.705, count_all
0.645, colour 0.517, existence 0.500, shape 0.404; counting 0.675), points inside 0.107, exact
count 0.53 - the same as the previous best (0.575 / 0.112 / 0.515 in 26 min), so not bundled.

So none of these makes the LM use the image: normalising the image tokens to text scale hurts (the LM reads colour less), training on the
short answers alone is worse than the mix (the dense descriptions and pointing answers carry
the grounding signal), and more answers per image (turns) is the cheapest gain: the 64 image
tokens are paid once per row. A per-patch linear probe on the frozen stage-1 features reads the
colour of the covering object at 99.6% and its shape at 62% (chance 29%; raw pixels 34%), so the
tower keeps what existence / shape questions need and the LM's use of it is the bottleneck.
Clipping does not starve the projector: after warm-up the total gradient norm is 0.5-1.3
(clip 1.0) and AdamW's step is invariant to the uniform clip scale.

``evaluate_llava(model_dir, n_images)``: QA exact match overall and on counting, pointing (share
of predicted points inside a matching object, and inside any object; the median distance
of a point to the nearest target centre; exact counts; for one-target questions
the correlation of the first point with the target per axis, ``point_corr_x|y``),
dense-description exact match, on the test split.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fmrt.train import common


@dataclass
class LlavaTrainConfig:
    stage: int = 1
    arch: str = "shapes-llava-tiny"
    vision_from: str = "shapes-clip"      # bundled name / model dir whose vision tower is reused
    init_from: Optional[str] = None       # stage 2: the stage-1 model directory
    out_dir: str = "runs/shapes-llava"
    steps: int = 0                        # 0 = per-stage default
    batch_size: int = 32
    lr: float = 0.0                       # 0 = per-stage default
    weight_decay: float = 0.0
    warmup: int = 30
    turns: int = 0                        # question-answer turns per image (0 = per stage)
    seed: int = 0
    ckpt_every: int = 200
    threads: Optional[int] = None
    resume: bool = True
    # stage 2: also fine-tune the vision tower (Molmo-style), at lr * vision_lr_scale. Off by
    # default: 400 stage-2 steps (batch 16, lr 3e-3, learned position embedding) scored QA 0.528
    # tuned vs 0.518 frozen, points inside 0.14 vs 0.11 (100 test scenes) - no measurable gain.
    tune_vision: bool = False
    vision_lr_scale: float = 0.1
    # stage 1 (new model): LlavaConfig.image_pos_embed ("none" | "learned"); with a tuned tower
    # 400 stage-2 steps scored QA 0.528 learned vs 0.482 none (100 scenes, ~1.9 sigma), points
    # inside 0.14 either way. Default "none" = HF LLaVA.
    image_pos_embed: str = "none"
    # stage 1 (new model): LlavaConfig.image_feature_norm ("none" | "rms": RMSNorm on the
    # projector output, image tokens at ~text-embedding scale). 250 stage-2 steps: QA 0.452
    # with it vs 0.499 without (both loss_weighting="answer"), colour questions 0.16 vs 0.64.
    image_feature_norm: str = "none"
    # new model with image_feature_norm="rms": the RMSNorm's initial gain (LlavaConfig's
    # image_norm_init, 0.1: image tokens at norm ~1.3, text scale). A larger gain keeps image
    # tokens large against the LM's own updates, as without the norm (norm ~300 after stage 2).
    image_norm_init: float = 0.1
    # "token": one mean over every answer token of the batch; "answer": the mean over each
    # answer's tokens (and its <eot>), then the mean over answers - a one-token QA answer
    # weighs as much as a 30-token pointing answer (with "token" a yes/no answer is ~1/40 of a
    # pointing-plus-QA row's loss). 250 stage-2 steps: QA 0.499 "answer" vs 0.482 "token" on
    # 100 test scenes (within noise), existence still at chance; default stays "token".
    # "sqrt" (an answer of L tokens weighs sqrt(L)) sits between the two (a yes/no answer is
    # ~1% of a "token" batch loss with the description-heavy mix). It did not bring back the
    # existence questions that several stage-2 runs left at the prior: 3,500 steps with
    # independent turns scored existence loss ln 2 either way; the cause is the tied
    # embedding table (see untie_embeddings).
    loss_weighting: str = "token"
    # lr multiplier of the projector (and image norm / position embedding) parameters
    projector_lr_scale: float = 1.0
    mix: Optional[Dict[str, float]] = None  # stage-2 task weights (None = STAGE2_MIX)
    # stage 2 curriculum: the first qa_first_steps steps draw short questions only
    # (QA_FIRST_MIX: counting, colour, existence, shape - one-word answers), then ``mix``.
    # 250 steps on QA_FIRST_MIX alone scored QA 0.364 against 0.499 for the full mix (same
    # loss), so this curriculum is off by default.
    qa_first_steps: int = 0
    # stage 1 (new model): text-only LM warm-up before projector alignment (Flamingo's recipe:
    # the LM first learns the question/answer format and to copy the question's phrase). Off by
    # default: 400 steps (batch 32, final loss 0.51) then 400 stage-2 steps scored QA 0.47 on 100
    # test scenes against 0.53 without it (same stage-2 recipe), and 800 stage-2 steps after it
    # 0.53 on 200 scenes (below the 0.575 of 1500 steps without it).
    lm_steps: int = 0
    lm_batch_size: int = 32
    lm_lr: float = 3e-3
    # stage 2: weight of a dense auxiliary loss - a linear head on every projected image token
    # predicts the (shape, colour) of the object covering that patch (25 classes with
    # background). Training-only: the head is neither saved nor checkpointed (a resumed run
    # starts a fresh head). Why: a per-patch linear probe of the frozen shapes-clip tower reads
    # colour at 95-99% but shape at only ~60% at every layer (the contrastive tower pools
    # through the class token), so shape / existence / pointing questions lack per-patch
    # evidence. Off by default: a 600-step tuned-tower continuation of the bundled model with
    # weight 0.5 scored QA 0.609 vs 0.663 without it, points inside 0.153 vs 0.107 (100 scenes).
    dense_aux_weight: float = 0.0
    # with image_pos_embed="learned": "grid2d" initialises the position embedding to a 2-D
    # cosine code of each patch's (row, column) (position_code_2d), scaled to norm
    # image_pos_norm ("default": random std 0.02, or zeros when the embedding is added to a
    # continued model). Why: on one-object scenes the bundled model's points track the row
    # (correlation 0.96) but barely the column (0.39): the LM reads rows from the image tokens'
    # sequence positions, while the stage-2 projector leaves no position in the tokens
    # themselves. A 1,000-step continuation with it (plus RMSNorm, tuned tower) left the
    # column correlation at 0.47.
    image_pos_init: str = "default"
    image_pos_norm: float = 1.0
    # coordinate tokens (fmrt.data.vlm_data.build_vlm_tokenizer): > 0 writes a point's pixel
    # values as single tokens <loc0> .. <loc{N-1}> (64 = every pixel of the 64 px frame)
    # instead of digit by digit; a new model gets a vocabulary of 160, a continued one is
    # resized. The new embedding rows start as a smooth code of the value (init_coord_embeddings)
    # so neighbouring pixels start close in the tied input/output table.
    coord_tokens: int = 0
    # > 0: the loss on a coordinate token is cross-entropy against a Gaussian over the
    # coordinate tokens (std coord_sigma pixels) instead of the one-hot value: a near miss
    # costs less than a far one (plain cross-entropy treats 12 vs 13 like 12 vs 60).
    coord_sigma: float = 0.0
    # stage 1 (new model): LlavaConfig.vision_feature_select_strategy. "default" (HF LLaVA)
    # drops the class token; "full" keeps it as a 65th image token. Why: the contrastive
    # tower's class token is what CLIP training taught to summarise the scene (single-object
    # caption matching 0.977), while the patch tokens read a patch's shape at only ~62-70%
    # (benchmarks/probe_llava_features.py).
    vision_select: str = "default"
    # stage 2: pack each image's turns as independent continuations of the shared image prefix
    # (fmrt.data.vlm_data.encode_independent_turns): every question is trained in the
    # single-question format it is asked in, and none can be answered from an earlier turn's
    # description / caption / points instead of the image.
    independent_turns: bool = False
    # stage 1 (new model): an output head of its own instead of the tied embedding table
    # (LlamaConfig.tie_word_embeddings=False). Why: with the table tied, a one-word answer
    # seen only before <eot> (yes / no) gets the same input-side gradient for both words, and
    # until the model can tell presence the output side averages out: several stage-2 runs
    # ended with "yes" and "no" at cosine 0.99 (0.70 in runs that learned existence), where
    # the hidden state gets no gradient along their difference and existence questions stay
    # at the prior (training loss ln 2, also after 150 existence-only steps).
    untie_embeddings: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.mix is not None:
            from fmrt.data.vlm_data import STAGE2_MIX

            bad = sorted(set(self.mix) - set(STAGE2_MIX))
            if bad or not self.mix or min(self.mix.values()) < 0:
                raise ValueError(f"mix: unknown task(s) {bad} or negative / no weights; tasks "
                                 f"are {sorted(STAGE2_MIX)}")
        if self.loss_weighting not in LOSS_WEIGHTING_POWER:
            raise ValueError(f"loss_weighting must be one of {sorted(LOSS_WEIGHTING_POWER)}, "
                             f"got {self.loss_weighting!r}")
        if self.coord_tokens < 0 or self.coord_sigma < 0:
            raise ValueError("coord_tokens and coord_sigma must be >= 0")
        if self.vision_select not in ("default", "full"):
            raise ValueError(f"vision_select must be 'default' or 'full', got "
                             f"{self.vision_select!r}")
        if not self.steps:
            self.steps = 60 if self.stage == 1 else 800
        if not self.turns:
            self.turns = 2 if self.stage == 1 else 3
        if not self.lr:
            self.lr = 1e-3 if self.stage == 1 else 1.5e-3


#: stage-2 curriculum mix (``qa_first_steps``): the short-answer question kinds alone.
QA_FIRST_MIX: Dict[str, float] = {"count": 0.25, "count_all": 0.15, "what_color": 0.2,
                                  "exists": 0.2, "what_shape": 0.2}


def load_vision_from_clip(model, clip_name_or_dir: str) -> None:
    """Copy a CLIP model's image tower (``visual.*`` minus ``proj``) into ``model.vision_tower``."""
    from fmrt import pretrained

    p = pretrained.load_pretrained(clip_name_or_dir)
    sd = {k[len("visual."):]: v for k, v in p.model.state_dict().items()
          if k.startswith("visual.") and k != "visual.proj"}
    missing, unexpected = model.vision_tower.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{clip_name_or_dir}: vision tower mismatch: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return p.preprocess


@torch.no_grad()
def standardize_projector(model, images: torch.Tensor, out_std: float = 0.02) -> Dict[str, float]:
    """Data-dependent projector init (the architecture stays LLaVA's, so HF parity holds).

    ``shapes-clip``'s penultimate-layer patch features have norm ~35 (a shared mean token of norm
    17.5; per-channel std from 0.5 to 8.8, median 2.3), so a default-initialised projector
    feeds the LM image tokens of norm ~47 next to text embeddings of norm ~0.25. Folding a
    per-channel standardisation ``(h - mean) / std`` into ``linear_1`` and starting
    ``linear_2`` at the LM's init scale (std 0.02) gives unit-scale inputs and image tokens of
    norm ~1. (Measured effect: none visible at 250 stage-2 steps - QA 0.47 vs 0.50 on 60 test
    images - it is kept because it makes the start independent of the tower's scale.)"""
    h = model.vision_hidden(images)
    if model.config.vision_feature_select_strategy == "default":
        h = h[:, 1:]
    h = h.reshape(-1, h.shape[-1]).float()
    mean, std = h.mean(0), h.std(0).clamp_min(1e-3)
    lin = model.projector.linear_1
    w = lin.weight / std[None, :]
    b = (lin.bias if lin.bias is not None else torch.zeros(w.shape[0])) - w @ mean
    lin.weight.copy_(w)
    if lin.bias is not None:
        lin.bias.copy_(b)
    if getattr(model.projector, "mlp", False):
        torch.nn.init.normal_(model.projector.linear_2.weight, std=out_std)
        if model.projector.linear_2.bias is not None:
            torch.nn.init.zeros_(model.projector.linear_2.bias)
    feats = model.projector(h[:4096])
    return {"feature_norm_before": float(h.norm(dim=-1).mean()),
            "feature_spread_before": float(h.std(0).norm()),
            "projected_norm_after": float(feats.norm(dim=-1).mean())}


def position_code_2d(grid: int, dim: int, norm: float = 1.0, full: bool = False
                     ) -> torch.Tensor:
    """``grid*grid x dim`` (plus a leading zero row for the class token when ``full``): half the
    channels a cosine code of the patch row, half of its column, each row scaled to L2 norm
    ``norm``. The code of a coordinate ``x`` is ``cos(pi k (x + 1/2) / grid)`` for ``k = 1 ..
    grid - 1`` (the DCT-II basis without its constant), repeated over the channels: distinct
    coordinates are orthogonal, where a MAE-style 1/10000^(k/d) sine-cosine code over 8
    positions gives neighbours a cosine of 0.98 (most of its frequencies barely turn)."""
    if dim % 2:
        raise ValueError(f"dim {dim} must be even")
    half = dim // 2
    k = (torch.arange(half, dtype=torch.float64) % (grid - 1)) + 1
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    def code(x):
        return torch.cos(torch.pi * k[None] * (x.reshape(-1, 1) + 0.5) / grid)
    e = torch.cat([code(r), code(c)], 1)
    e = e / e.norm(dim=1, keepdim=True) * norm
    if full:
        e = torch.cat([torch.zeros(1, dim, dtype=e.dtype), e])
    return e.float()


def padded_vocab_size(tok) -> int:
    """The LM vocabulary for ``tok``: its size rounded up to a multiple of 32 (160 with the 64
    coordinate tokens; the digit tokenizer's 88 ids fit the default 128)."""
    return -(-tok.vocab_size // 32) * 32


def init_coord_embeddings(lm, ids: List[int], *, n_freq: int = 12, seed: int = 0) -> None:
    """Set the embedding rows ``ids`` (coordinate tokens, value ``k = 0 .. N-1``) to a smooth
    code: ``sum_f cos(pi f (k + 1/2) / N) u_f`` for ``f = 1 .. n_freq`` over random orthonormal
    directions ``u_f``, plus a little of the mean row, at the table's mean row norm. For N = 64
    and 12 frequencies, neighbours start at cosine ~0.93, values 2 apart ~0.75, 4 apart ~0.19
    and 8 or more apart <= 0, so with the tied head a near miss is a small logit error from the
    first step. An untied output head (``lm_head``) gets the same rows."""
    w = lm.embed_tokens.weight
    n = len(ids)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(w.shape[1], n_freq, generator=g, dtype=torch.float64))
    f = torch.arange(1, n_freq + 1, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    code = torch.cos(torch.pi * f[None] * (k[:, None] + 0.5) / n) @ q.T     # N x d
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[ids] = False
    rows = w.detach()[keep].double()
    norm = rows.norm(dim=1).mean()
    code = code / code.norm(dim=1, keepdim=True) * norm * 0.95 + rows.mean(0) * 0.05
    with torch.no_grad():
        w[ids] = code.to(w.dtype)
        if lm.lm_head is not None:   # an untied head reads the same code
            lm.lm_head.weight[ids] = code.to(lm.lm_head.weight.dtype)


def _optimizer(model, cfg: LlavaTrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: no decay on gains, biases and embeddings; the vision
    tower's groups carry ``lr_scale = vision_lr_scale`` (a pretrained tower wants a smaller step
    than the freshly initialised projector / LM)."""
    groups: Dict[Any, List[torch.nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "embed" in n or n.endswith(".bias")
        scale = (cfg.vision_lr_scale if n.startswith("vision_tower.") else
                 cfg.projector_lr_scale if n.startswith(("projector.", "image_norm.",
                                                         "image_pos_embed")) else 1.0)
        groups.setdefault((no_decay, scale), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if nd else cfg.weight_decay, "lr_scale": sc}
         for (nd, sc), ps in sorted(groups.items(), key=lambda kv: kv[0])],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


#: answer-length exponent p of each ``loss_weighting``: a labelled token of an answer of L
#: tokens (its ``<eot>`` included) weighs L**-p, and the loss is the weighted mean.
LOSS_WEIGHTING_POWER = {"token": 0.0, "sqrt": 0.5, "answer": 1.0}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, weighting: str = "token",
                coord_ids: Optional[List[int]] = None, coord_sigma: float = 0.0
                ) -> torch.Tensor:
    """Next-token cross-entropy on positions whose next token is labelled (``labels`` B x n,
    -100 elsewhere), as a weighted mean: ``weighting="token"``, every labelled token alike;
    ``"answer"``, each maximal run of labelled tokens in a row (one answer and its ``<eot>``;
    turns are separated by unlabelled question tokens) weighs 1 in all, so answers count
    alike; ``"sqrt"``, an answer of L tokens weighs sqrt(L) (a yes/no answer, 2 tokens, gets
    1.4 against 5.5 for a 30-token description instead of 2 against 30 with "token").
    With ``coord_ids`` (the ids of coordinate values 0 .. N-1) and ``coord_sigma > 0``, a
    labelled coordinate's target is a Gaussian of std ``coord_sigma`` over the coordinate
    values around it (normalised), not its one-hot."""
    if weighting not in LOSS_WEIGHTING_POWER:
        raise ValueError(f"weighting must be one of {sorted(LOSS_WEIGHTING_POWER)}, got "
                         f"{weighting!r}")
    lab = labels[:, 1:]
    flat = lab.reshape(-1)
    on = flat != -100
    if not bool(on.any()):
        return logits.sum() * 0.0
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])[on]
    lg = lg.to(torch.promote_types(lg.dtype, torch.float32))
    y = flat[on]
    if coord_sigma > 0 and coord_ids:
        cid = torch.as_tensor(coord_ids, dtype=torch.long, device=y.device)
        value = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=y.device)
        value[cid] = torch.arange(len(coord_ids), device=y.device)
        v = value[y]
        is_c = v >= 0
        logp = torch.log_softmax(lg, dim=-1)
        nll = -logp.gather(1, y[:, None])[:, 0]
        if bool(is_c.any()):
            k = torch.arange(len(coord_ids), device=y.device, dtype=logp.dtype)
            q = torch.exp(-0.5 * ((k[None] - v[is_c, None].to(k.dtype)) / coord_sigma) ** 2)
            q = q / q.sum(1, keepdim=True)
            nll = nll.clone()
            nll[is_c] = -(q * logp[is_c][:, cid]).sum(1)
    else:
        nll = F.cross_entropy(lg, y, reduction="none")
    power = LOSS_WEIGHTING_POWER[weighting]
    if power == 0.0:
        return nll.mean()
    m = lab != -100
    prev = torch.cat([torch.zeros_like(m[:, :1]), m[:, :-1]], dim=1)
    seg = ((m & ~prev).reshape(-1).long().cumsum(0) - 1)[on]   # answer index per labelled token
    size = torch.zeros(int(seg.max()) + 1, dtype=nll.dtype, device=nll.device)
    size.index_add_(0, seg, torch.ones_like(nll))
    w = size[seg] ** -power
    return (w * nll).sum() / w.sum()


def train_lm_text_only(model, tok, cfg: LlavaTrainConfig, *, progress: bool = True
                       ) -> Dict[str, Any]:
    """Text-only warm-up of ``model.language_model`` (stage 1, before the projector): the
    stage-2 conversations with no image tokens at all (``<sot> {question} <sep> {answer} <eot>
    ...``), loss on the answers. The LM cannot see the image, so it learns the answer format,
    the answer priors and to copy the question's phrase into pointing answers. Rows are padded
    to the longest conversation (126 tokens for a batch of 32 with pointing / descriptions,
    against 146 with the 64 image tokens), so a step costs about what a stage-2 step of the same
    batch does (0.7 s CPU at batch 32, 1 thread)."""
    from fmrt.data.vlm_data import InstructionStream

    lm = model.language_model
    lm.train()
    for p in lm.parameters():
        p.requires_grad_(True)
    opt = common.adamw(lm, lr=cfg.lm_lr, weight_decay=0.0, betas=(0.9, 0.98))
    stream = InstructionStream(tok, stage=2, batch_size=cfg.lm_batch_size,
                               image_size=model.image_size, image_seq_length=0,
                               seed=cfg.seed + 20_000, turns=3, mix=cfg.mix)
    bar = common.Progress(cfg.lm_steps, desc="llava lm warm-up") if progress else None
    t0, loss = time.time(), torch.tensor(float("nan"))
    for step, batch in common.prefetch(stream, 0, cfg.lm_steps):
        lr = common.cosine_lr(step, total=cfg.lm_steps, warmup=cfg.warmup, base_lr=cfg.lm_lr)
        loss = answer_loss(lm(batch["input_ids"]), batch["labels"])
        common.optimizer_step(opt, loss, lm.parameters(), lr=lr)
        if bar:
            bar.update(loss=loss.item(), lr=lr)
    wall = bar.close() if bar else time.time() - t0
    lm.eval()
    return {"steps": cfg.lm_steps, "batch_size": cfg.lm_batch_size, "lr": cfg.lm_lr,
            "final_loss": round(loss.item(), 4), "wall_seconds": round(wall, 1)}


def _row_cosine(w: torch.Tensor, ids) -> float:
    if None in ids:
        return float("nan")
    a, b = w.detach()[list(ids)].float()
    return float(F.cosine_similarity(a, b, dim=0))


def train(cfg: LlavaTrainConfig, *, progress: bool = True) -> str:
    """Run (or resume) one stage; returns the final model directory."""
    import fmrt
    from fmrt import pretrained
    from fmrt.data.vlm_data import (InstructionStream, build_vlm_tokenizer, coord_token_ids,
                                    special_ids)
    from fmrt.preprocess import uint8_batch_to_tensor
    from fmrt.train.contrastive import canonical_command

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        base = pretrained.load_pretrained(cfg.init_from)
        if base.family != "llava":
            raise ValueError(f"{cfg.init_from} is a {base.family!r} model, not llava")
        model, tok, pre = base.model.float(), base.tokenizer, base.preprocess
        if cfg.image_pos_embed == "learned" and model.config.image_pos_embed == "none":
            # add the position embedding to a model trained without one: zero-initialised, so
            # the continued model starts exactly where the init model was
            model.add_image_pos_embed(std=0.0)
        if cfg.image_feature_norm == "rms" and model.config.image_feature_norm == "none":
            # add the RMSNorm to a model trained without one: the LM's first layer normalises
            # its input anyway, so layer 0 sees the same directions; what changes is that the
            # image tokens' residual stream is at text scale, where the LM's own updates count
            model.add_image_feature_norm()
        if cfg.coord_tokens and not coord_token_ids(tok):
            # continue a digit-coordinate model with coordinate tokens: same word ids, the
            # <loc> tokens appended after <image>/<sep>, the tied table grown to fit
            tok = build_vlm_tokenizer(tok.context_length, coord_tokens=cfg.coord_tokens)
            model.language_model.resize_token_embeddings(
                max(model.config.text.vocab_size, padded_vocab_size(tok)))
            init_coord_embeddings(model.language_model, coord_token_ids(tok), seed=cfg.seed)
        elif cfg.coord_tokens and len(coord_token_ids(tok)) != cfg.coord_tokens:
            raise ValueError(f"{cfg.init_from} has {len(coord_token_ids(tok))} coordinate "
                             f"tokens, not {cfg.coord_tokens}")
    else:
        if cfg.stage == 2:
            print("warning: stage 2 without --init (no stage-1 projector)", file=sys.stderr)
        tok = build_vlm_tokenizer(coord_tokens=cfg.coord_tokens)
        extra_kw: Dict[str, Any] = {"text": {}}
        if cfg.coord_tokens:   # 88 words/specials + N coordinates
            extra_kw["text"]["vocab_size"] = padded_vocab_size(tok)
        if cfg.untie_embeddings:
            extra_kw["text"]["tie_word_embeddings"] = False
        model = fmrt.create_model(cfg.arch, image_pos_embed=cfg.image_pos_embed,
                                  image_feature_norm=cfg.image_feature_norm,
                                  image_norm_init=cfg.image_norm_init,
                                  vision_feature_select_strategy=cfg.vision_select, **extra_kw)
        if cfg.coord_tokens:
            init_coord_embeddings(model.language_model, coord_token_ids(tok), seed=cfg.seed)
        pre = load_vision_from_clip(model, cfg.vision_from)
        probe = InstructionStream(tok, stage=1, batch_size=64, image_size=model.image_size,
                   seed=cfg.seed + 10_000)(0)["images"]
        cfg.extra["projector_standardization"] = standardize_projector(
            model, uint8_batch_to_tensor(probe, pre))
        if cfg.lm_steps and not (cfg.resume and common.has_checkpoint(cfg.out_dir)):
            cfg.extra["lm_warmup"] = train_lm_text_only(model, tok, cfg, progress=progress)
    if cfg.image_pos_init == "grid2d" and not (cfg.resume and
                                               common.has_checkpoint(cfg.out_dir)):
        if model.config.image_pos_embed != "learned":
            raise ValueError("image_pos_init='grid2d' needs image_pos_embed='learned'")
        full = model.config.image_seq_length > model.config.grid ** 2   # class token kept
        with torch.no_grad():
            model.image_pos_embed.copy_(position_code_2d(
                model.config.grid, model.config.text.hidden_size, cfg.image_pos_norm,
                full=full))
    if special_ids(tok)[0] != model.config.image_token_id:
        raise ValueError(f"tokenizer <image> id {special_ids(tok)[0]} != model image_token_id "
                         f"{model.config.image_token_id}")
    if tok.vocab_size > model.config.text.vocab_size:
        raise ValueError(f"vocabulary {tok.vocab_size} exceeds the LM's {model.config.text.vocab_size}")
    # the vision tower is frozen in stage 1 (and in stage 2 unless tune_vision); stage 1 also
    # freezes the LM
    tune_vision = cfg.stage == 2 and cfg.tune_vision
    for p in model.vision_tower.parameters():
        p.requires_grad_(tune_vision)
    for p in model.language_model.parameters():
        p.requires_grad_(cfg.stage == 2)
    model.train()
    if not tune_vision:
        model.vision_tower.eval()
    opt = _optimizer(model, cfg)
    aux_head = None
    if cfg.stage == 2 and cfg.dense_aux_weight > 0:
        from fmrt.data.vocab import COLORS, SHAPES

        aux_head = torch.nn.Linear(model.config.text.hidden_size, 1 + len(SHAPES) * len(COLORS))
        opt.add_param_group({"params": list(aux_head.parameters()), "weight_decay": 0.0,
                             "lr_scale": 1.0})
    start = 0
    if cfg.resume and common.has_checkpoint(cfg.out_dir):
        start = common.load_checkpoint(cfg.out_dir, model, opt)
        print(f"resuming {cfg.out_dir} at step {start}", file=sys.stderr)
    stream = InstructionStream(tok, stage=cfg.stage, batch_size=cfg.batch_size,
                               image_size=model.image_size,
                               image_seq_length=model.config.image_seq_length, seed=cfg.seed,
                               turns=cfg.turns, mix=cfg.mix,
                               patch_grid=model.config.grid if aux_head is not None else 0,
                               independent_turns=cfg.independent_turns)
    make_batch = stream
    if cfg.stage == 2 and cfg.qa_first_steps > 0:
        qa_stream = InstructionStream(tok, stage=2, batch_size=cfg.batch_size,
                                      image_size=model.image_size,
                                      image_seq_length=model.config.image_seq_length,
                                      seed=cfg.seed + 30_000, turns=cfg.turns, mix=QA_FIRST_MIX,
                                      independent_turns=cfg.independent_turns)

        def make_batch(step: int):  # deterministic in step, so resuming replays the schedule
            return qa_stream(step) if step < cfg.qa_first_steps else stream(step)
    params = [p for p in model.parameters() if p.requires_grad]
    coord_ids = coord_token_ids(tok)
    yes_no = (tok.token_to_id("yes"), tok.token_to_id("no"))
    bar = common.Progress(cfg.steps, initial=start, desc=f"llava stage {cfg.stage}") \
        if progress else None
    t0 = time.time()
    last_loss = float("nan")
    for step, batch in common.prefetch(make_batch, start, cfg.steps):
        lr = common.cosine_lr(step, total=cfg.steps, warmup=cfg.warmup, base_lr=cfg.lr)
        images = uint8_batch_to_tensor(batch["images"], pre)
        with torch.set_grad_enabled(tune_vision):
            hidden = model.vision_hidden(images)
        feats = model.project_hidden(hidden)
        logits = model(batch["input_ids"], image_features=feats,
                       position_ids=batch.get("position_ids"),
                       segment_ids=batch.get("segment_ids"))
        loss = answer_loss(logits, batch["labels"], cfg.loss_weighting,
                           coord_ids=coord_ids, coord_sigma=cfg.coord_sigma)
        if aux_head is not None:
            pf = feats[:, -model.config.grid ** 2:]   # patch tokens (class token dropped)
            aux = F.cross_entropy(aux_head(pf).reshape(-1, aux_head.out_features).float(),
                                  batch["patch_labels"].reshape(-1))
            loss = loss + cfg.dense_aux_weight * aux
        gnorm = common.optimizer_step(opt, loss, params + (list(aux_head.parameters())
                                                           if aux_head is not None else []),
                                      lr=lr)
        if step % 50 == 0:  # grads are still in place (clipped) after the step
            pn = [p.grad.norm() for n, p in model.named_parameters()
                  if p.grad is not None and n.startswith("projector.")]
            # yes_no_cos: the output rows of "yes" and "no"; near 1 they have merged and
            # existence questions stay at the prior (see untie_embeddings)
            print(f"step {step} loss {loss.item():.4f} grad_norm {gnorm:.3f} projector_grad "
                  f"{float(torch.stack(pn).norm()) if pn else 0.0:.3f} image_feat_norm "
                  f"{float(feats.detach().norm(dim=-1).mean()):.2f} yes_no_cos "
                  f"{_row_cosine(model.language_model.output_weight, yes_no):.3f}",
                  file=sys.stderr)
        last_loss = float(loss.detach())
        if bar:
            bar.update(loss=last_loss, lr=lr)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            common.save_checkpoint(cfg.out_dir, model, opt, step + 1,
                                   {"config": asdict(cfg), "elapsed_s": time.time() - t0})
    wall = bar.close() if bar else time.time() - t0
    prov: Dict[str, Any] = {
        "command": cfg.extra.get("command") or canonical_command(sys.argv),
        "train_config": asdict(cfg), "stage": cfg.stage, "seed": cfg.seed, "steps": cfg.steps,
        "wall_seconds_this_session": round(wall, 1), "final_loss": round(last_loss, 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "vision_tower": cfg.vision_from if not cfg.init_from else "from init",
    }
    if cfg.init_from:
        try:
            prev = pretrained.read_config(cfg.init_from).get("provenance", {})
            prov["previous_stages"] = prev.get("previous_stages", []) + [
                {k: prev.get(k) for k in ("command", "stage", "steps",
                                          "wall_seconds_this_session", "final_loss",
                                          "vision_tower")}]
        except Exception:  # provenance is informative only
            pass
    out = os.path.join(cfg.out_dir, "model")
    pretrained.save_pretrained(out, family="llava", model=model.eval(),
                               config=model.config.to_dict(), preprocess=pre, tokenizer=tok,
                               provenance=prov)
    print(f"llava stage {cfg.stage}: {cfg.steps - start} steps in {wall:.0f}s -> {out}",
          file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- evaluation
def _answers(model, tok, pre, examples: List[Dict[str, Any]], max_new_tokens: int,
             batch_size: int = 32) -> List[str]:
    from fmrt.data.vlm_data import decode_answer, prompt_ids
    from fmrt.preprocess import uint8_batch_to_tensor

    outs: List[str] = []
    n_img = model.config.image_seq_length
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        images = uint8_batch_to_tensor(np.stack([e["image"] for e in chunk]), pre)
        prompts = [prompt_ids(tok, e["question"], n_img) for e in chunk]
        res = model.generate(prompts, images, max_new_tokens=max_new_tokens,
                             stop_token_ids=[tok.eot_token_id])
        outs.extend(decode_answer(tok, r.tokens) for r in res)
    return outs


def evaluate_llava(model_dir: str, n_images: int = 200, *, seed: int = 0,
                   include_describe: bool = True) -> Dict[str, Any]:
    """Held-out test-split metrics of a llava model directory (or bundled name)."""
    from fmrt import pretrained
    from fmrt.data import parse_point_answer
    from fmrt.data.vlm_data import COUNT_KINDS, QA_KINDS, eval_examples, point_hits

    p = pretrained.load_pretrained(model_dir)
    model, tok, pre = p.model.eval(), p.tokenizer, p.preprocess
    ex = eval_examples(n_images, seed=seed, image_size=model.image_size)
    t0 = time.time()
    qa = [e for e in ex if e["kind"] in QA_KINDS]
    pt = [e for e in ex if e["kind"] == "point"]
    de = [e for e in ex if e["kind"] == "describe"] if include_describe else []
    qa_out = _answers(model, tok, pre, qa, 4)
    pt_out = _answers(model, tok, pre, pt, 100)
    de_out = _answers(model, tok, pre, de, 64) if de else []
    res: Dict[str, Any] = {"n_images": n_images, "n_qa": len(qa), "n_point": len(pt)}
    ok = [o.strip() == e["answer"] for o, e in zip(qa_out, qa)]
    res["qa_exact"] = float(np.mean(ok))
    for k in QA_KINDS:
        sel = [o for o, e in zip(ok, qa) if e["kind"] == k]
        if sel:
            res[f"qa_{k}"] = float(np.mean(sel))
    cnt = [o for o, e in zip(ok, qa) if e["kind"] in COUNT_KINDS]
    res["qa_counting"] = float(np.mean(cnt))
    hits = total = on_any = 0
    exact_total = exact_points = 0
    first, truth = [], []   # first predicted point vs the target, one-target questions
    errs = []               # each predicted point's distance to the nearest target centre
    for o, e in zip(pt_out, pt):
        pts, n = parse_point_answer(o)
        h, k = point_hits(e["scene"], e["question"], pts)
        hits, total = hits + h, total + k
        true_pts, true_n = parse_point_answer(e["answer"])
        lm = e["scene"].label_map()
        true_xy = np.asarray(true_pts, np.float64).reshape(-1, 2)
        for x, y in np.asarray(pts, np.float64).reshape(-1, 2):
            xi, yi = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
            on_any += int(0 <= xi < lm.shape[1] and 0 <= yi < lm.shape[0] and lm[yi, xi] > 0)
            if len(true_xy):
                errs.append(float(np.min(np.hypot(*(true_xy - [x, y]).T))))
        exact_total += int(n == true_n)
        exact_points += int(len(pts) == true_n)
        if true_n == 1 and len(pts):
            first.append(np.asarray(pts, np.float64).reshape(-1, 2)[0])
            truth.append(np.asarray(true_pts, np.float64).reshape(-1, 2)[0])
    res["point_inside"] = hits / total if total else float("nan")
    res["point_count_exact"] = exact_total / len(pt)
    res["point_npoints_exact"] = exact_points / len(pt)
    res["point_n_predicted"] = total
    # where misses go: on some object (the wrong one) or on the background; and how far
    res["point_on_any_object"] = on_any / total if total else float("nan")
    if errs:
        res["point_err_px_median"] = float(np.median(errs))
    if len(first) >= 3:
        # does the first point follow the object along each axis? (the bundled model's rows
        # do, its columns hardly: see BENCHMARKS.md)
        f, t = np.stack(first), np.stack(truth)
        for i, ax in enumerate("xy"):
            c = np.corrcoef(f[:, i], t[:, i])[0, 1] if f[:, i].std() > 0 else 0.0
            res[f"point_corr_{ax}"] = float(c)
    if de:
        res["describe_exact"] = float(np.mean([o.strip() == e["answer"]
                                               for o, e in zip(de_out, de)]))
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res
