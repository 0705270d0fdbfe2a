"""``fmrt train flamingo``: a tiny Flamingo on ShapesWorld few-shot episodes.

    fmrt train flamingo --out runs/shapes-flamingo --threads 1
    fmrt bundle runs/shapes-flamingo/model shapes-flamingo

Recipe (two stages, both in this command):

1. **Language model** (``<out>/lm``, skipped when it exists or with ``--lm-from DIR``): a
   ``shapes-lm-tiny`` LLaMA (4 layers, hidden 160, vocab 128) trained from scratch, text only, on
   the same interleaved episodes with every ``<image>`` left as a bare placeholder token and the
   loss on every token. It learns the format (``<image>``, ``output :`` / ``question : ... answer
   :``, ``<|endofchunk|>``) and the answer vocabulary of each task, but it cannot see images, so
   its answers are guesses: this is the frozen, text-pretrained LM Flamingo starts from.
2. **Flamingo** (``<out>/model``): the bundled ``shapes-clip`` vision tower (frozen) -> Perceiver
   resampler -> gated cross-attention before every ``cross_attn_every_n_layers``-th LM layer
   (gates at 0). Only the resampler and the cross-attention blocks are trained (AdamW, warm-up +
   cosine), on 5-chunk episodes with the loss on every chunk's answer + ``<|endofchunk|>`` (so one
   episode trains 0- to 4-shot prediction).

At the end the model is evaluated few-shot (0, 2, 4 in-context examples) on held-out test
episodes (``few_shot_eval``) and the figures go into the model's provenance.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from fmrt.data import flamingo_data as FD
from fmrt.train import common


@dataclass
class FlamingoTrainConfig:
    out_dir: str = "runs/shapes-flamingo"
    vision_from: str = "shapes-clip"      # bundled name or CLIP model dir (vision tower)
    lm_from: Optional[str] = None         # an LM model dir from stage 1 (skips stage 1)
    lm_arch: str = "shapes-lm-tiny"
    lm_steps: int = 500
    lm_batch_size: int = 32
    lm_lr: float = 3e-3
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 30
    n_chunks: int = 5                     # 4 in-context examples + 1
    cross_attn_every_n_layers: int = 1
    num_latents: int = 8
    perceiver_depth: int = 2
    seed: int = 0
    threads: Optional[int] = None
    ckpt_every: int = 100
    resume: bool = True
    eval_n: int = 100                     # test episodes per task and shot count
    extra: Dict[str, Any] = field(default_factory=dict)


def _preprocess(vision_from: str):
    from fmrt.pretrained import read_config
    from fmrt.preprocess import PreprocessConfig

    return PreprocessConfig.from_dict(read_config(vision_from)["preprocess"])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t + 1 (IGNORE = no loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=FD.IGNORE)


def train_lm(cfg: FlamingoTrainConfig, tok, preprocess, out_dir: str) -> str:
    """Stage 1: text-only LM on interleaved episodes; writes a llama model dir."""
    import fmrt
    from fmrt.pretrained import save_pretrained

    torch.manual_seed(cfg.seed)
    lm = fmrt.create_model(cfg.lm_arch)
    lm.train()
    opt = common.adamw(lm, lr=cfg.lm_lr, weight_decay=0.1)
    bar = common.Progress(cfg.lm_steps, desc="lm")

    def make(s):  # images are not needed (and not rendered twice: cheap anyway)
        b = FD.training_batch(tok, preprocess, s, cfg.lm_batch_size, seed=cfg.seed + 1,
                              n_chunks=cfg.n_chunks, lm_labels=True)
        return b["input_ids"], b["labels"]

    for step, (ids, labels) in common.prefetch(make, 0, cfg.lm_steps):
        lr = common.cosine_lr(step, total=cfg.lm_steps, warmup=cfg.warmup, base_lr=cfg.lm_lr)
        loss = lm_loss(lm(ids), labels)
        common.optimizer_step(opt, loss, lm.parameters(), lr=lr)
        bar.update(loss=loss.item(), lr=lr)
    secs = bar.close()
    lm.eval()
    save_pretrained(out_dir, family="llama", model=lm, config=lm.config.to_dict(),
                    preprocess=preprocess, tokenizer=tok,
                    provenance={"stage": "flamingo-lm", "steps": cfg.lm_steps,
                                "batch_size": cfg.lm_batch_size, "lr": cfg.lm_lr,
                                "seed": cfg.seed, "wall_seconds": round(secs, 1),
                                "data": "fmrt.data.flamingo_data episodes, text only"})
    return out_dir


def build_from_parts(cfg: FlamingoTrainConfig, lm_dir: str, tok):
    """Flamingo around the stage-1 LM and the bundled CLIP vision tower."""
    from fmrt.models.flamingo import Flamingo, FlamingoConfig
    from fmrt.models.vision_transformer import VisionTransformer
    from fmrt.pretrained import load_pretrained

    clip = load_pretrained(cfg.vision_from)
    v = clip.config["config"]["vision"]
    vision_cfg = dict(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                      layers=v["layers"], heads=v["heads"], mlp_ratio=v["mlp_ratio"],
                      output_dim=clip.config["config"]["embed_dim"],
                      act=clip.config["config"].get("act", "quick_gelu"))
    vision = VisionTransformer(**vision_cfg)
    vision.load_state_dict(clip.model.visual.state_dict())
    lm = load_pretrained(lm_dir).model
    media_id, eoc_id = FD.special_ids(tok)
    fcfg = FlamingoConfig(vision=vision_cfg, lm=lm.config.to_dict(), media_token_id=media_id,
                          eoc_token_id=eoc_id,
                          cross_attn_every_n_layers=cfg.cross_attn_every_n_layers,
                          num_latents=cfg.num_latents, perceiver_depth=cfg.perceiver_depth)
    torch.manual_seed(cfg.seed)
    return Flamingo(fcfg, lm=lm, vision_encoder=vision)


def few_shot_eval(model, tok, preprocess, *, shots: Sequence[int] = (0, 2, 4), n: int = 100,
                  tasks: Sequence[str] = FD.TASKS, split: str = "test", seed: int = 0,
                  batch_size: int = 50, use_images: bool = True) -> Dict[str, Any]:
    """Exact-match accuracy of the generated answer to the query of ``n`` held-out episodes per
    task, with ``k`` in-context examples for each ``k`` in ``shots`` (the same query and the first
    ``k`` examples of one support set for every ``k``: paired comparison).

    ``use_images=False`` runs the bare language model (no media): the text-only baseline.
    Returns ``{"accuracy": {k: overall}, "implicit": {k: mean over the implicit tasks},
    "per_task": {task: {k: acc}}, "n": n}``.
    """
    from fmrt.models.generation import generate
    from fmrt.models.flamingo import pad_image_lists

    kmax = max(shots)
    per_task: Dict[str, Dict[int, float]] = {}
    model.eval()
    for task in tasks:
        eps = [FD.sample_episode(split, task, i, kmax + 1, seed=seed) for i in range(n)]
        per_task[task] = {}
        for k in shots:
            correct = 0
            for s in range(0, n, batch_size):
                rows = [ep[:k] + [ep[kmax]] for ep in eps[s:s + batch_size]]
                prompts = [FD.encode_episode(tok, r, query=True)[0] for r in rows]
                if use_images:
                    images = pad_image_lists([[c.image for c in r] for r in rows], preprocess)
                    gens = model.generate(images, prompts, max_new_tokens=8)
                else:
                    lm = model.lang_encoder if hasattr(model, "lang_encoder") else model
                    gens = generate(lm, prompts, max_new_tokens=8,
                                    stop_token_ids=[tok.eot_token_id, FD.special_ids(tok)[1]])
                for g, r in zip(gens, rows):
                    pred = " ".join(tok.decode(g.tokens).split())
                    correct += pred == r[-1].answer
            per_task[task][k] = correct / n
    acc = {k: sum(per_task[t][k] for t in tasks) / len(tasks) for k in shots}
    imp = [t for t in tasks if t in FD.IMPLICIT_TASKS]
    implicit = {k: sum(per_task[t][k] for t in imp) / len(imp) for k in shots} if imp else {}
    return {"accuracy": acc, "implicit": implicit, "per_task": per_task, "n": n, "split": split}


def evaluate_flamingo_model(name_or_dir: str, *, n: int = 100, seed: int = 0,
                            shots: Sequence[int] = (0, 2, 4)) -> Dict[str, Any]:
    """``few_shot_eval`` of a bundled name or model directory, as an ``fmrt eval`` report (one
    flat dict of accuracies: overall, implicit-task mean and per task, per shot count)."""
    from fmrt.pretrained import load_pretrained

    p = load_pretrained(name_or_dir)
    r = few_shot_eval(p.model, p.tokenizer, p.preprocess, shots=shots, n=n, seed=seed)
    flat: Dict[str, float] = {}
    for k in shots:
        flat[f"{k}-shot"] = r["accuracy"][k]
    for k in shots:
        flat[f"implicit {k}-shot"] = r["implicit"][k]
    for task, accs in r["per_task"].items():
        for k in shots:
            flat[f"{task} {k}-shot"] = accs[k]
    return {"model": p.name, "backend": "torch", "n": n, "few_shot": flat}


def _lm_only_eval(lm_dir: str, tok, preprocess, n: int) -> Dict[str, Any]:
    from fmrt.pretrained import load_pretrained

    lm = load_pretrained(lm_dir).model
    return few_shot_eval(lm, tok, preprocess, n=n, use_images=False)


def train(cfg: FlamingoTrainConfig) -> str:
    from fmrt.pretrained import save_pretrained

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    tok = FD.build_tokenizer()
    preprocess = _preprocess(cfg.vision_from)
    lm_dir = cfg.lm_from or os.path.join(cfg.out_dir, "lm")
    if not (cfg.lm_from or (cfg.resume and os.path.isfile(os.path.join(lm_dir, "config.json")))):
        train_lm(cfg, tok, preprocess, lm_dir)
    model = build_from_parts(cfg, lm_dir, tok)
    model.train()
    opt = common.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    start = 0
    if cfg.resume and common.has_checkpoint(ckpt):
        start = common.load_checkpoint(ckpt, model, opt)
    bar = common.Progress(cfg.steps, initial=start, desc="flamingo")

    def make(s):
        return FD.training_batch(tok, preprocess, s, cfg.batch_size, seed=cfg.seed,
                                 n_chunks=cfg.n_chunks)

    params = [p for p in model.parameters() if p.requires_grad]
    for step, b in common.prefetch(make, start, cfg.steps):
        lr = common.cosine_lr(step, total=cfg.steps, warmup=cfg.warmup, base_lr=cfg.lr)
        loss = lm_loss(model(b["input_ids"], images=b["images"]), b["labels"])
        common.optimizer_step(opt, loss, params, lr=lr)
        bar.update(loss=loss.item(), lr=lr)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            common.save_checkpoint(ckpt, model, opt, step + 1)
    secs = bar.close()
    model.eval()
    t_eval = time.time()
    report = few_shot_eval(model, tok, preprocess, n=cfg.eval_n, seed=cfg.seed)
    lm_report = _lm_only_eval(lm_dir, tok, preprocess, cfg.eval_n)
    gates = {f"layer{i}": {"attn": round(torch.tanh(l.gated_cross_attn_layer.attn_gate).item(), 4),
                           "ff": round(torch.tanh(l.gated_cross_attn_layer.ff_gate).item(), 4)}
             for i, l in enumerate(model.lang_encoder.layers)
             if l.gated_cross_attn_layer is not None}
    prov = {
        "command": "fmrt train flamingo " + " ".join(sys.argv[3:]) if len(sys.argv) > 2
        else "fmrt.train.flamingo.train",
        "train_config": asdict(cfg), "seed": cfg.seed, "steps": cfg.steps,
        "lm_dir": os.path.abspath(lm_dir), "vision_from": cfg.vision_from,
        "trainable_parameters": sum(p.numel() for p in params),
        "wall_seconds_flamingo_stage": round(secs, 1),
        "wall_seconds_total": round(time.time() - t_start, 1),
        "eval_seconds": round(time.time() - t_eval, 1),
        "few_shot": report, "lm_only_few_shot": lm_report, "tanh_gates": gates,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    out = os.path.join(cfg.out_dir, "model")
    save_pretrained(out, family="flamingo", model=model, config=asdict(model.config),
                    preprocess=preprocess, tokenizer=tok, provenance=prov)
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"flamingo": report, "lm_only": lm_report, "gates": gates}, f, indent=2)
    return out
