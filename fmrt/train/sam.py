"""Segment Anything training and evaluation on ShapesWorld instance masks.

    fmrt train sam --out runs/shapes-sam
    fmrt eval shapes-sam          # evaluate_sam on held-out test scenes

The recipe follows the SAM paper (Kirillov et al. 2023, section 3 and appendix A), scaled down:

* Every object of a scene is one example: its instance mask and one prompt, a point (uniform in
  the mask, or its centre) or its box jittered by N(0, 10% of the side) per coordinate
  (``fmrt.data.sam_data``).
* Iterative correction (``correction_iters`` extra rounds, 2 by default; the paper uses 8 plus 2
  rounds without a new point): after each prediction a new point is drawn uniformly from the
  error region between the predicted and the true mask; it is positive where the error is a
  false negative, negative where it is a false positive. The previous round's low-res logits
  are the next round's ``mask_input``.
* A lone prompt (one point, or a box) is ambiguous, so it gets the 3 multimask outputs and the
  mask loss is taken on the best of them only (minimum over the 3). Once a correction point is
  added the prompt has more than one element and the model returns the single-mask output
  (token 0), as SAM does.
* Mask loss: focal (alpha 0.25, gamma 2) and dice, weighted 20:1; plus the MSE between each
  predicted IoU and the IoU of that (thresholded) mask with the truth, for all 3 masks.
* Gradients: every round's loss counts (the total is their mean), and each round back-propagates
  into the decoder, the prompt encoder and the shared image embedding. The previous logits fed as
  ``mask_input`` are detached (as in the public SAM fine-tuning code): the mask prompt is an
  input, not a path for gradients into the earlier round. The mask handed on after a multimask
  round is the best one by loss (the one that received the gradient).

Deterministic in ``(seed, step)``: the batch comes from ``SamPromptStream`` and the correction
points from a ``torch.Generator`` seeded with ``(seed, step)``, so a resumed run continues
exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fmrt.train import common

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


@dataclass
class SamTrainConfig:
    arch: str = "shapes-sam-tiny"
    out_dir: str = "runs/shapes-sam"
    steps: int = 600
    batch_size: int = 16               # images per step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 40
    seed: int = 0
    image_size: int = 64
    point_prob: float = 0.5            # share of point prompts (rest: boxes)
    center_prob: float = 0.5           # share of point prompts at the object centre
    # 2 of the (mean 3.5) objects per image: the decoder runs 3 rounds per prompt and costs
    # ~0.04 s per prompt-round (fwd + bwd, 1 core) against ~0.06 s per image for the encoder, so
    # 16 images x 2 prompts x 3 rounds is ~2 s a step on one core.
    max_prompts_per_image: Optional[int] = 2
    correction_iters: int = 2          # extra rounds with a corrective point each
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    ckpt_every: int = 250
    threads: Optional[int] = None
    resume: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ losses


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) per mask, averaged over pixels.

    Args:
        logits: ``... x H x W`` mask logits (float).
        targets: same shape, 0/1 (bool or float).
    Returns:
        ``...`` per-mask loss: mean over pixels of ``a_t (1 - p_t)^gamma BCE`` with
        ``a_t = alpha`` on positives and ``1 - alpha`` on negatives.
    """
    t = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss per mask: ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` with
    ``p = sigmoid(logits)`` over the last two dims (``... x H x W`` -> ``...``)."""
    t = targets.to(logits.dtype).flatten(-2)
    p = torch.sigmoid(logits).flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims (``... x H x W`` -> ``...`` float); two empty
    masks count as IoU 1."""
    pred, target = pred.bool().flatten(-2), target.bool().flatten(-2)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, *,
             focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """SAM's loss for one round.

    Args:
        logits: ``P x M x H x W`` mask logits (M = 3 multimask outputs, or 1).
        iou_pred: ``P x M`` predicted IoUs.
        target: ``P x H x W`` ground-truth masks.
    Returns:
        ``(loss, parts, best)``: the scalar loss (mean over prompts of ``focal_weight * focal +
        dice_weight * dice`` of the best of the M masks, plus ``iou_weight`` x the MSE between
        predicted and actual IoU over all M masks), detached ``parts`` (focal, dice, iou_mse,
        iou: actual IoU of the best mask) and ``best`` (``P`` index of the mask with the lowest
        mask loss).
    """
    t = target[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, t)
    dice = dice_loss(logits, t)
    per_mask = focal_weight * focal + dice_weight * dice          # P x M
    best = per_mask.detach().argmin(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    mask_term = per_mask[rows, best].mean()
    actual = mask_iou(logits.detach() > 0, t)                     # P x M, no gradient
    iou_mse = F.mse_loss(iou_pred, actual)
    loss = mask_term + iou_weight * iou_mse
    parts = {"focal": focal[rows, best].mean().detach(), "dice": dice[rows, best].mean().detach(),
             "iou_mse": iou_mse.detach(), "iou": actual[rows, best].mean()}
    return loss, parts, best


def sample_correction_points(pred: torch.Tensor, target: torch.Tensor,
                             generator: Optional[torch.Generator] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's corrective clicks: one point per mask drawn uniformly from the error region.

    Args:
        pred: ``P x H x W`` bool predicted masks.
        target: ``P x H x W`` bool ground truth.
        generator: torch generator for the draws (determinism).
    Returns:
        ``coords`` float32 ``P x 2`` (x, y) pixel indices and ``labels`` int64 ``P``: 1 where
        the point falls in a false negative (missed object pixel), 0 in a false positive. A
        prediction with no error gets a positive point drawn uniformly from the object.
    """
    P, H, W = target.shape
    pred, target = pred.bool().reshape(P, -1), target.bool().reshape(P, -1)
    err = pred ^ target
    has_err = err.any(1, keepdim=True)
    region = torch.where(has_err, err, target)
    r = torch.rand(P, H * W, generator=generator)
    idx = torch.where(region, r, torch.full_like(r, -1.0)).argmax(1)
    labels = target.gather(1, idx[:, None])[:, 0].long()  # in the truth: a missed pixel -> +
    coords = torch.stack([(idx % W).float(), (idx // W).float()], dim=1)
    return coords, labels


# ------------------------------------------------------------------------------------ model io


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 B x H x W x 3`` -> ``float32 B x 3 x H x W`` on the 0..255 scale (``Sam``
    normalises)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def decode_rounds(model, embeddings: torch.Tensor, target: torch.Tensor, *,
                  points: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                  rounds: int = 1, generator: Optional[torch.Generator] = None,
                  loss_fn=None, pick: str = "gt") -> Tuple[List[torch.Tensor], List[Dict]]:
    """Run the interactive loop for one prompt group (all points, or all boxes).

    Args:
        model: ``Sam``.
        embeddings: ``P x C x h x w`` image embedding of each prompt.
        target: ``P x H x W`` bool masks in the model's low-res frame.
        points: ``P x 2`` first click (positive) for a point group; ``boxes``: ``P x 4`` for a
            box group (exactly one of them).
        rounds: 1 + number of correction clicks.
        loss_fn: ``sam_loss``-like callable ``(logits, iou_pred, target) -> (loss, parts,
            best)``; when ``None`` (evaluation) the mask handed on is chosen by ``pick``:
            ``"gt"`` the best by IoU with the truth, ``"score"`` the highest predicted IoU.
    Returns:
        per round: the losses (empty without ``loss_fn``) and a dict with ``logits``
        (``P x M x H x W``), ``iou_pred``, ``chosen`` (``P x H x W`` logits handed on) and
        ``parts``.
    """
    P = target.shape[0]
    coords = points[:, None, :] if points is not None else target.new_zeros((P, 0, 2), dtype=torch.float32)
    labels = torch.ones((P, coords.shape[1]), dtype=torch.long)
    prev = None
    losses, outs = [], []
    for r in range(rounds):
        multimask = r == 0  # one point or one box: ambiguous; more prompts: the single mask
        logits, iou_pred = model.decode(
            embeddings, point_coords=coords if coords.shape[1] else None,
            point_labels=labels if coords.shape[1] else None, boxes=boxes, mask_input=prev,
            multimask_output=multimask)
        rows = torch.arange(P)
        parts: Dict[str, torch.Tensor] = {}
        if loss_fn is not None:
            loss, parts, best = loss_fn(logits, iou_pred, target)
            losses.append(loss)
        elif pick == "score":
            best = iou_pred.argmax(1)
        else:
            best = mask_iou(logits > 0, target[:, None].expand_as(logits)).argmax(1)
        chosen = logits[rows, best].detach()
        outs.append({"logits": logits, "iou_pred": iou_pred, "chosen": chosen, "parts": parts})
        if r + 1 < rounds:
            c, lab = sample_correction_points(chosen > 0, target, generator)
            coords = torch.cat([coords, c[:, None]], dim=1)
            labels = torch.cat([labels, lab[:, None]], dim=1)
            prev = chosen[:, None]
    return losses, outs


def round_generator(seed: int, step: int) -> torch.Generator:
    """The correction-point generator of step ``step``: a function of ``(seed, step)`` only."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, 0xC11C]).generate_state(1)[0]))
    return g


def train_step_loss(model, batch: Dict[str, np.ndarray], cfg: SamTrainConfig, step: int
                    ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Forward one batch through all rounds; returns the loss and logged scalars."""
    from fmrt.data.sam_data import PROMPT_BOX, PROMPT_POINT

    images = images_to_tensor(batch["images"])
    emb = model.encode_image(images)
    g = round_generator(cfg.seed, step)
    kinds = torch.from_numpy(batch["kinds"])
    masks = torch.from_numpy(batch["masks"])
    index = torch.from_numpy(batch["image_index"])
    h = model.prompt_encoder.mask_input_size
    if tuple(masks.shape[-2:]) != tuple(h):  # ground truth in the decoder's low-res frame
        masks = F.interpolate(masks[:, None].float(), size=h, mode="nearest")[:, 0] > 0.5
    rounds = 1 + cfg.correction_iters

    def loss_fn(logits, iou_pred, target):
        return sam_loss(logits, iou_pred, target, focal_weight=cfg.focal_weight,
                        dice_weight=cfg.dice_weight, iou_weight=cfg.iou_weight)

    total, n_terms = 0.0, 0
    logs: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for kind, name in ((PROMPT_POINT, "point"), (PROMPT_BOX, "box")):
        sel = (kinds == kind).nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        kw = ({"points": torch.from_numpy(batch["points"])[sel]} if kind == PROMPT_POINT
              else {"boxes": torch.from_numpy(batch["boxes"])[sel]})
        losses, outs = decode_rounds(model, emb[index[sel]], masks[sel], rounds=rounds,
                                     generator=g, loss_fn=loss_fn, **kw)
        w = sel.numel()
        # prompts of both groups weigh the same: each group's mean loss x its share of prompts
        for loss in losses:
            total = total + loss * w
        n_terms += w * len(losses)
        for r, o in enumerate(outs):
            for k, v in o["parts"].items():
                key = f"{k}{r}" if k == "iou" else k
                logs[key] = logs.get(key, 0.0) + float(v) * w
                counts[key] = counts.get(key, 0) + w
    loss = total / n_terms
    return loss, {k: v / counts[k] for k, v in logs.items()}


# ------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate_sam(model, n: int = 200, seed: int = 0, *, split: str = "test",
                 batch_size: int = 64, clicks: int = 3) -> Dict[str, float]:
    """Mean IoU on held-out ShapesWorld scenes (``fmrt.data.sam_data.eval_scenes``: the first
    ``n`` scenes of ``split``), over every object:

    * ``point_best``: one positive point at the object's centre, best of the 3 masks (by IoU
      with the truth, the oracle SAM reports); ``point_top``: the mask with the highest predicted
      IoU (what a user without the truth picks);
    * ``box_best`` / ``box_top``: the exact tight box ``Scene.boxes()`` (``x0, y0, x1, y1``,
      inclusive-exclusive), likewise;
    * ``point_clicks{k}``: after ``k - 1`` corrective clicks from the error region (single-mask
      output, previous logits as mask input), starting from the centre click.

    Masks are the low-res logits brought to the scene size with ``Sam.postprocess_masks`` and
    thresholded at 0.
    """
    from fmrt.data.sam_data import eval_scenes
    from fmrt.data.scene import render_batch

    model = model.eval()
    S = model.img_size
    scenes = eval_scenes(n, seed=seed, split=split, image_size=S)
    g = torch.Generator().manual_seed(int(seed))
    sums: Dict[str, float] = {}
    count = 0
    for b0 in range(0, len(scenes), batch_size):
        chunk = scenes[b0: b0 + batch_size]
        emb = model.encode_image(images_to_tensor(render_batch(chunk)))
        idx = torch.tensor([i for i, sc in enumerate(chunk) for _ in sc.objects], dtype=torch.long)
        if idx.numel() == 0:
            continue
        target = torch.from_numpy(np.concatenate([sc.masks() for sc in chunk]))
        centers = torch.from_numpy(np.concatenate([sc.points() for sc in chunk])).float()
        boxes = torch.from_numpy(np.concatenate([sc.boxes() for sc in chunk])).float()
        e = emb[idx]

        def full(logits):  # low-res logits -> masks at the scene size
            return model.postprocess_masks(logits, (S, S), (S, S)) > 0

        res = {}
        for name, kw in (("point", {"points": centers}), ("box", {"boxes": boxes})):
            rounds = clicks if name == "point" else 1
            _, outs = decode_rounds(model, e, target, rounds=rounds, generator=g, **kw)
            first = outs[0]["logits"]
            ious = mask_iou(full(first), target[:, None].expand(-1, first.shape[1], -1, -1))
            res[f"{name}_best"] = ious.max(1).values
            res[f"{name}_top"] = ious.gather(1, outs[0]["iou_pred"].argmax(1, keepdim=True))[:, 0]
            if name == "point":
                for r in range(1, rounds):
                    res[f"point_clicks{r + 1}"] = mask_iou(full(outs[r]["logits"])[:, 0], target)
        for k, v in res.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += idx.numel()
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["objects"] = count
    out["scenes"] = len(scenes)
    return out


def evaluate_sam_model(name_or_dir: str, *, n: int = 200, seed: int = 0) -> Dict[str, Any]:
    """``evaluate_sam`` of a bundled name or model directory, as an ``fmrt eval`` report."""
    from fmrt.pretrained import load_pretrained

    p = load_pretrained(name_or_dir)
    return {"model": p.name, "backend": "torch", "n": n,
            "sam": evaluate_sam(p.model, n=n, seed=seed)}


# ------------------------------------------------------------------------------------ train


def sam_preprocess(model):
    """The ``PreprocessConfig`` recorded with a SAM model: its pixel statistics on the 0..1 scale
    and its square input size. ``Sam`` itself normalises 0..255 pixels and pads; the predictor
    resizes the longest side to ``img_size`` (ShapesWorld frames already are 64x64)."""
    from fmrt.preprocess import PreprocessConfig

    c = model.config
    return PreprocessConfig(image_size=c.encoder.img_size,
                            mean=tuple(v / 255.0 for v in c.pixel_mean),
                            std=tuple(v / 255.0 for v in c.pixel_std),
                            resize_mode="squash", interpolation="bilinear")


def train(cfg: SamTrainConfig, *, progress: bool = True, eval_n: int = 0) -> str:
    """Run (or resume) a SAM training job; returns the final model directory
    ``<out_dir>/model``. ``eval_n > 0`` also records ``evaluate_sam`` on that many test scenes in
    the provenance."""
    import fmrt
    from fmrt import pretrained
    from fmrt.data.sam_data import SamPromptConfig, SamPromptStream
    from fmrt.train.contrastive import canonical_command

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = fmrt.create_model(cfg.arch).train()
    if model.img_size != cfg.image_size:
        raise ValueError(f"{cfg.arch} takes {model.img_size}px images, config says "
                         f"{cfg.image_size}")
    opt = common.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                       eps=1e-8)
    start = 0
    if cfg.resume and common.has_checkpoint(cfg.out_dir):
        start = common.load_checkpoint(cfg.out_dir, model, opt)
        print(f"resuming {cfg.out_dir} at step {start}", file=sys.stderr)
    stream = SamPromptStream(SamPromptConfig(image_size=cfg.image_size, point_prob=cfg.point_prob,
                                             center_prob=cfg.center_prob,
                                             max_prompts_per_image=cfg.max_prompts_per_image),
                             batch_size=cfg.batch_size, seed=cfg.seed)
    bar = common.Progress(cfg.steps, initial=start, desc="train sam") if progress else None
    t0 = time.time()
    history: List[float] = []
    for step, batch in common.prefetch(stream, start, cfg.steps):
        lr = common.cosine_lr(step, total=cfg.steps, warmup=cfg.warmup, base_lr=cfg.lr)
        loss, logs = train_step_loss(model, batch, cfg, step)
        common.optimizer_step(opt, loss, model.parameters(), lr=lr)
        history.append(float(loss.detach()))
        if bar:
            bar.update(loss=history[-1], lr=lr, **logs)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            common.save_checkpoint(cfg.out_dir, model, opt, step + 1,
                                   {"config": asdict(cfg), "elapsed_s": time.time() - t0})
    wall = bar.close() if bar else time.time() - t0
    model.eval()
    provenance: Dict[str, Any] = {
        "command": cfg.extra.get("command") or canonical_command(sys.argv),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "seed": cfg.seed, "steps": cfg.steps,
        "wall_seconds_this_session": round(wall, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "recipe": ("ShapesWorld instance masks; point (centre or uniform) / jittered box prompts; "
                   f"{cfg.correction_iters} corrective clicks from the error region with the "
                   "previous logits as mask input; best-of-3 focal+dice 20:1 + IoU MSE"),
    }
    if eval_n:
        provenance["eval_test"] = {"n_scenes": eval_n,
                                   **evaluate_sam(model, n=eval_n, seed=cfg.seed)}
    out = os.path.join(cfg.out_dir, "model")
    pretrained.save_pretrained(out, family="sam", model=model, config=model.config.to_dict(),
                               preprocess=sam_preprocess(model), provenance=provenance)
    print(f"sam: {cfg.steps - start} steps in {wall:.0f}s -> {out}", file=sys.stderr)
    return out
