"""``fmrt train programs``: a tiny LLaMA that writes visual programs from ShapesWorld
instructions, so the bundled stack generates programs offline.

    fmrt train programs --out runs/shapes-programs --threads 1
    fmrt bundle runs/shapes-programs/model shapes-programs

Recipe: a LLaMA decoder (4 layers, hidden 128, GQA 4/2, tied embeddings, ~0.8M parameters,
1.6 MB in float16) trained from scratch on ``<bos> instruction <prog> program <eos>`` sequences
of the *train* split of ``fmrt.data.program_data``, colours, shapes and numbers
anonymised into slots (``ProgramTokenizer(delex=True)``) (batch ``s`` is drawn from ``(seed, s)``
alone, so a resumed run sees the same data), with the loss on the program tokens only. AdamW,
warm-up + cosine. The vocabulary (``ProgramTokenizer``, ~140 ids: instruction words and program
atoms) is stored in ``config.json`` under ``program_tokenizer``, so the model directory is an
ordinary ``llama``-family fmrt model.

At the end the model is measured on held-out *test* instructions (held-out wording and
attribute combinations): validity (the greedy output parses and validates) and exact match with
the reference program; the figures go into the provenance.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmrt.data import program_data as D
from fmrt.data.scene import FastRNG
from fmrt.train import common

#: The bundled architecture (``vocab_size`` is set from the tokenizer, rounded up to 16).
PROGRAM_LM_CONFIG: Dict[str, Any] = dict(
    hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
    max_position_embeddings=256, tie_word_embeddings=True)


@dataclass
class ProgramTrainConfig:
    out_dir: str = "runs/shapes-programs"
    steps: int = 400
    batch_size: int = 24
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 30
    seed: int = 0
    threads: Optional[int] = None
    ckpt_every: int = 200
    resume: bool = True
    eval_n: int = 270


def build_model(tok: D.ProgramTokenizer, seed: int = 0):
    from fmrt.models.llama import LlamaConfig, build_llama

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=-(-tok.vocab_size // 16) * 16, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **PROGRAM_LM_CONFIG)
    return build_llama(cfg)


def training_batch(tok: D.ProgramTokenizer, step: int, batch_size: int, seed: int = 0):
    """``input_ids``/``labels``: ``B x L`` long, right-padded (pad id / -100); a causal model
    never looks at the padding after a sequence, so no attention mask is needed."""
    R = FastRNG(np.random.default_rng([0x9A0_7A1, int(seed), int(step)]))
    pairs = [tok.encode_pair(x.text, x.delex_program if tok.delex else x.program)
             for x in (D.sample_instruction(R, "train") for _ in range(batch_size))]
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((batch_size, width), tok.pad_id, dtype=torch.long)
    lab = torch.full((batch_size, width), tok.IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        ids[i, :len(a)] = torch.tensor(a)
        lab[i, :len(b)] = torch.tensor(b)
    return ids, lab


def generate_programs(model, tok: D.ProgramTokenizer, instructions: Sequence[str], *,
                      batch_size: int = 64, temperature: float = 0.0,
                      seed: Optional[int] = None, max_new_tokens: int = 200,
                      threads: Optional[int] = 1) -> List[str]:
    """Program text for each instruction (greedy by default), batched with left padding.

    ``threads``: torch intra-op threads while decoding (restored after; None = leave as is).
    The model is tiny (0.8M parameters, ~20 ms a decode step at batch 64), so extra threads
    only add synchronisation: on the shared 2-core machine (load ~11) 45 programs took 946 ms
    each with torch's default threads and 50 ms each with one.

    Decoding is *slot-constrained*: a row may only emit the slot tokens its instruction fills
    (and never ``<bos>``/``<prog>``/``<pad>``/``<unk>``), so a program cannot name a colour
    the instruction did not mention (unconstrained, 1 of 27 held-out instructions ended in an
    unfillable ``<shape1>`` after three attempts). Same static KV cache and sampling rule as
    ``fmrt.models.generation``."""
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _generate(model, tok, instructions, batch_size, temperature, seed,
                         max_new_tokens)
    finally:
        if threads:
            torch.set_num_threads(prev)


def _generate(model, tok, instructions, batch_size, temperature, seed, max_new_tokens):
    from fmrt.models.generation import sample_next_token

    out: List[str] = []
    model.eval()
    room = model.config.max_position_embeddings
    V = model.config.vocab_size
    never = torch.zeros(V, dtype=torch.bool)
    never[[tok.pad_id, tok.bos_id, tok.prog_id, tok.unk_id]] = True
    never[tok.vocab_size:] = True  # ids past the tokenizer (vocabulary rounded up to 16)
    slot_ids = {t: tok.stoi[t] for t in D.slot_tokens() if t in tok.stoi}
    gen = None
    if temperature > 0 and seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    for s in range(0, len(instructions), batch_size):
        chunk = list(instructions[s:s + batch_size])
        prompts = [tok.prompt(t) for t in chunk]
        width = max(len(p) for p in prompts)
        if width >= room:
            raise ValueError(f"instruction of {width} tokens leaves no room for a program in "
                             f"the model's {room}-token context")
        n_new = min(max_new_tokens, room - width)
        b = len(prompts)
        ids = torch.full((b, width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.bool)
        banned = never.repeat(b, 1)
        for r, (p, t) in enumerate(zip(prompts, chunk)):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = True
            filled = tok.slots(t)
            for name, i in slot_ids.items():
                banned[r, i] = name not in filled
        rows: List[List[int]] = [[] for _ in range(b)]
        done = [False] * b
        cache = model.new_cache(b, width + n_new)
        with torch.inference_mode():
            logits = model(ids, attention_mask=None if bool(mask.all()) else mask, cache=cache,
                           logits_to_keep=1)[:, -1]
            for _ in range(n_new):
                logits = logits.float().masked_fill(banned, float("-inf"))
                nxt = sample_next_token(logits, temperature=temperature, generator=gen)
                for r, t in enumerate(nxt.tolist()):
                    if not done[r]:
                        if t == tok.eos_id:
                            done[r] = True
                        else:
                            rows[r].append(t)
                if all(done):
                    break
                nxt = torch.where(torch.tensor(done), tok.pad_id, nxt)
                logits = model(nxt[:, None], cache=cache, logits_to_keep=1)[:, -1]
        out += [tok.decode_program(r, t) for r, t in zip(rows, chunk)]
    return out


def evaluate_programs(model, tok: D.ProgramTokenizer, n: int = 270, seed: int = 0,
                      split: str = "test") -> Dict[str, Any]:
    """Validity and exact match of greedy programs for ``n`` held-out instructions (kinds
    round-robin), overall and per kind."""
    from fmrt.chain.program import ProgramError, parse_program

    items = D.instruction_set(split, n, seed=seed)
    t0 = time.perf_counter()
    progs = generate_programs(model, tok, [x.text for x in items])
    secs = time.perf_counter() - t0
    per: Dict[str, List[int]] = {}
    valid = exact = 0
    for x, p in zip(items, progs):
        try:
            parse_program(p, x.inputs)
            ok = int(not re.search(r"<(?:color|shape|num)\d>", p))  # unfilled slot = invalid
        except ProgramError:
            ok = 0
        em = int(p.strip() == x.program)
        valid += ok
        exact += em
        v = per.setdefault(x.kind, [0, 0, 0])
        v[0] += ok
        v[1] += em
        v[2] += 1
    return {"split": split, "n": n, "validity": valid / n, "exact_match": exact / n,
            "ms_per_program": round(secs * 1e3 / max(1, n), 2),
            "per_kind": {k: {"validity": a / c, "exact_match": b / c}
                         for k, (a, b, c) in per.items()}}


def train(cfg: ProgramTrainConfig) -> str:
    from fmrt.preprocess import PreprocessConfig
    from fmrt.pretrained import save_pretrained

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    tok = D.ProgramTokenizer.build()
    model = build_model(tok, cfg.seed)
    model.train()
    opt = common.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    start = 0
    if cfg.resume and common.has_checkpoint(ckpt):
        start = common.load_checkpoint(ckpt, model, opt)
    bar = common.Progress(cfg.steps, initial=start, desc="programs")
    for step, (ids, lab) in common.prefetch(
            lambda s: training_batch(tok, s, cfg.batch_size, cfg.seed), start, cfg.steps):
        lr = common.cosine_lr(step, total=cfg.steps, warmup=cfg.warmup, base_lr=cfg.lr)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               lab[:, 1:].reshape(-1), ignore_index=tok.IGNORE)
        common.optimizer_step(opt, loss, model.parameters(), lr=lr)
        bar.update(loss=loss.item(), lr=lr)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            common.save_checkpoint(ckpt, model, opt, step + 1)
    secs = bar.close()
    model.eval()
    t_eval = time.time()
    report = evaluate_programs(model, tok, n=cfg.eval_n, seed=cfg.seed)
    train_report = evaluate_programs(model, tok, n=min(cfg.eval_n, 90), seed=cfg.seed,
                                     split="train")
    prov = {
        "command": ("fmrt train programs " + " ".join(sys.argv[3:])) if len(sys.argv) > 2
        else "fmrt.train.programs.train",
        "train_config": asdict(cfg), "seed": cfg.seed, "steps": cfg.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": "fmrt.data.program_data train split (held-out pairs/wording excluded)",
        "wall_seconds_train": round(secs, 1), "wall_seconds_total": round(time.time() - t_start, 1),
        "eval_seconds": round(time.time() - t_eval, 1), "test": report,
        "train_sample": train_report, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    out = os.path.join(cfg.out_dir, "model")
    save_pretrained(out, family="llama", model=model, config=model.config.to_dict(),
                    preprocess=PreprocessConfig(), provenance=prov,
                    extra={"program_tokenizer": tok.to_dict(),
                           "program_inputs": {"nlvr": D.TWO_IMAGES, "image": D.ONE_IMAGE}})
    print({"test": {k: report[k] for k in ("validity", "exact_match")},
           "train": {k: train_report[k] for k in ("validity", "exact_match")}}, flush=True)
    return out


__all__ = ["ProgramTrainConfig", "PROGRAM_LM_CONFIG", "build_model", "training_batch",
           "generate_programs", "evaluate_programs", "train"]
