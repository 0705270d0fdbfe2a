"""Training plumbing shared by every family: warm-up + cosine schedule, AdamW parameter groups,
resumable safetensors checkpoints, a background batch prefetcher and a progress bar.

Resume is exact: batch ``s`` is generated from ``(seed, s)`` alone, so a run restarted from the
checkpoint at step ``s`` sees the same data as one that never stopped.
"""
from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

CKPT_WEIGHTS = "checkpoint.safetensors"
CKPT_OPTIM = "optimizer.safetensors"
CKPT_STATE = "trainer_state.json"


def cosine_lr(step: int, *, total: int, warmup: int, base_lr: float, min_ratio: float = 0.05
              ) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine decay to
    ``min_ratio * base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, *, lr: float,
                   max_norm: float = 1.0) -> float:
    """One update shared by the trainers: set ``lr`` on every group (times the group's
    ``lr_scale`` when it has one, e.g. LLaVA's tuned vision tower), clear the grads, backward,
    clip the global grad norm of ``params`` to ``max_norm`` and step. Returns the norm before
    clipping. Grads stay in place until the next call (for logging)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return float(norm)


def adamw(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.98),
          eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW with no decay on gains, biases, embeddings and the logit scale (CLIP recipe)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)


def save_checkpoint(out_dir: str, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    """Write weights, optimizer moments (both safetensors) and the step, atomically enough for a
    crash between files to leave the previous complete checkpoint readable (state json last)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, CKPT_WEIGHTS + ".tmp"))
    opt_tensors: Dict[str, torch.Tensor] = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            opt_tensors[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
    save_file(opt_tensors, os.path.join(out_dir, CKPT_OPTIM + ".tmp"))
    os.replace(os.path.join(out_dir, CKPT_WEIGHTS + ".tmp"), os.path.join(out_dir, CKPT_WEIGHTS))
    os.replace(os.path.join(out_dir, CKPT_OPTIM + ".tmp"), os.path.join(out_dir, CKPT_OPTIM))
    with open(os.path.join(out_dir, CKPT_STATE), "w") as f:
        json.dump({"step": step, **(extra or {})}, f, indent=2)


def load_checkpoint(out_dir: str, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; returns the step to continue from."""
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, CKPT_STATE)) as f:
        step = int(json.load(f)["step"])
    model.load_state_dict(load_file(os.path.join(out_dir, CKPT_WEIGHTS)))
    flat = load_file(os.path.join(out_dir, CKPT_OPTIM))
    sd = opt.state_dict()
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return step


def has_checkpoint(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, CKPT_STATE))


def prefetch(make_batch: Callable[[int], Any], start: int, stop: int, depth: int = 2
             ) -> Iterator[Tuple[int, Any]]:
    """Yield ``(step, make_batch(step))`` for ``step`` in ``[start, stop)``, generating the next
    batches on a background thread (numpy rendering releases the GIL for most of its time, so
    data generation overlaps the model's forward/backward)."""
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop_flag = threading.Event()

    def worker():
        try:
            for s in range(start, stop):
                if stop_flag.is_set():
                    return
                q.put((s, make_batch(s)))
        except BaseException as e:  # surface generator errors in the training thread
            q.put((None, e))
        q.put((None, None))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            s, b = q.get()
            if s is None:
                if isinstance(b, BaseException):
                    raise b
                return
            yield s, b
    finally:
        stop_flag.set()


class Progress:
    """tqdm progress with running averages; falls back to periodic prints without a TTY."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        mininterval=2.0)
        self.avg: Dict[str, float] = {}
        self.t0 = time.time()

    def update(self, **metrics: float) -> None:
        for k, v in metrics.items():  # losses are smoothed; the learning rate is shown as is
            smooth = k != "lr" and k in self.avg
            self.avg[k] = 0.95 * self.avg[k] + 0.05 * v if smooth else v
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.avg.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.t0
