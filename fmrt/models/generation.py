"""Autoregressive generation for decoder-only LMs with a static KV cache.

One prefill forward over the (left-padded) prompts, then one-token decode steps, each writing
its keys/values in place into a preallocated ``KVCache``. Works with any model whose forward
takes ``(input_ids | inputs_embeds, attention_mask=, cache=, logits_to_keep=)`` and that has
``new_cache(batch, max_len)`` and a ``config`` with ``vocab_size``, ``max_position_embeddings``
and ``eos_token_ids`` (``fmrt.models.llama.LlamaForCausalLM``).

Decoding: greedy (``temperature=0``), or sampling at a temperature with top-k and/or top-p
(nucleus) filtering, reproducible through ``seed`` / a ``torch.Generator``. A row stops at a stop
token id (default: the model's eos ids), a stop string (needs ``detokenize``; the stop string and
anything after it are cut from the text, and the tokens that only produced it are dropped), or
after ``max_new_tokens`` / when the context (``max_len``) is full. Stop token ids are not part of
the returned tokens.

API:
  * ``generate(model, prompt_or_prompts, ...)`` -> ``Generation`` (one prompt: a list of ids or a
    1-D tensor) or a list of them (a list of prompts of any lengths, batched together).
  * ``stream(model, prompt, ...)`` -> iterator of new token ids, or of text pieces when
    ``detokenize`` is given (pieces join to the final text; text that might start a stop string
    is held back until it is known not to).
  * ``stream_batch(model, prompts, ...)`` -> per step, a list with each row's new piece (None for
    rows that have finished); ``.results`` on the returned object holds the ``Generation``s.
  * ``sample_next_token`` / ``filter_logits``: the sampling rule on a ``B x V`` logits matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch

Detokenize = Callable[[List[int]], str]
Prompt = Union[Sequence[int], torch.Tensor]


# ----------------------------------------------------------------------------- sampling
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to ``-inf``.

    logits: ``B x V`` float. ``top_k`` 0 = off; ties with the k-th value are kept. ``top_p``:
    keep the smallest set of most likely tokens whose probability reaches ``top_p`` (the token
    that crosses it included, so at least one token always survives); 1.0 = off.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
    """Next token ids ``B`` (long) from logits ``B x V``: argmax when ``temperature == 0``,
    else a draw from ``softmax(filter_logits(logits / temperature))``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- results
@dataclass
class Generation:
    tokens: List[int]                 # generated ids (stop token / stop-string tokens excluded)
    text: Optional[str] = None        # detokenized (stop string cut) when detokenize was given
    finish_reason: str = "length"     # "stop" (stop token or string) or "length"
    prompt_tokens: int = 0


@dataclass
class _Row:
    tokens: List[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0         # characters (or tokens, without detokenize) already streamed
    done: bool = False
    finish: str = "length"


def _check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   stop_strings: Sequence[str], detokenize: Optional[Detokenize]) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop strings must be non-empty strings, got {list(stop_strings)}")
    if stop_strings and detokenize is None:
        raise ValueError("stop strings need a detokenize callback (ids -> text)")


def _as_prompts(prompts) -> tuple:
    """(list of id lists, single?)"""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            return [prompts.tolist()], True
        if prompts.dim() == 2:
            return prompts.tolist(), False
        raise ValueError(f"prompt tensor must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("empty prompt")
    if all(isinstance(p, int) for p in prompts):
        return [prompts], True
    out = []
    for p in prompts:
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not all(isinstance(t, int) for t in p):
            raise ValueError("a prompt must be a sequence of int token ids")
        out.append(p)
    return out, False


class GenerationRun:
    """One batched generation; iterate for per-step pieces, then read ``results``.

    Each step yields a list of length ``B``: a row's newly generated token id (without
    ``detokenize``), or its newly released text (with it, possibly ``""`` while text is held back
    for a possible stop string), or None once the row has finished.
    """

    def __init__(self, model, prompts: Optional[Sequence[Sequence[int]]] = None, *,
                 inputs_embeds: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 stop_token_ids: Optional[Sequence[int]] = None,
                 stop_strings: Optional[Sequence[str]] = None,
                 detokenize: Optional[Detokenize] = None, max_len: Optional[int] = None,
                 backend: Optional[str] = None) -> None:
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or ())
        _check_options(max_new_tokens, temperature, top_k, top_p, stop_strings, detokenize)
        cfg = model.config
        param = next(model.parameters())
        self.device = param.device
        max_len = max_len or cfg.max_position_embeddings
        if (prompts is None) == (inputs_embeds is None):
            raise ValueError("pass prompts (token ids) or inputs_embeds, not both")
        if prompts is not None:
            if not prompts:
                raise ValueError("no prompts")
            lens = [len(p) for p in prompts]
            if min(lens) == 0:
                raise ValueError("empty prompt: generation needs at least one prompt token")
            width = max(lens)
            flat = [t for p in prompts for t in p]
            if min(flat) < 0 or max(flat) >= cfg.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got "
                                 f"{min(flat)}..{max(flat)}")
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros(len(prompts), width, dtype=torch.bool)
            for i, p in enumerate(prompts):  # left padding: the last prompt token of every row
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)  # shares a slot
                mask[i, width - len(p):] = True
            self._inputs = dict(input_ids=ids.to(self.device))
            self.prompt_lens = lens
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
                raise ValueError(f"inputs_embeds must be B x n x hidden with n >= 1, got "
                                 f"{tuple(inputs_embeds.shape)}")
            b, width = inputs_embeds.shape[:2]
            mask = (torch.ones(b, width, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(torch.bool).cpu())
            if mask.shape != (b, width):
                raise ValueError(f"attention_mask must be {b} x {width}")
            self.prompt_lens = mask.sum(1).tolist()
            if min(self.prompt_lens) == 0:
                raise ValueError("empty prompt: a row of attention_mask has no real token")
            self._inputs = dict(inputs_embeds=inputs_embeds.to(self.device, param.dtype))
        if width >= max_len:
            raise ValueError(f"prompt of {width} tokens (padded batch width) leaves no room in a "
                             f"context of max_len={max_len}")
        self.batch = len(self.prompt_lens)
        self._mask = None if bool(mask.all()) else mask.to(self.device)
        self.width = width
        self.new_cap = min(max_new_tokens, max_len - width)
        self.model, self.backend = model, backend
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, float(top_p)
        if generator is None and seed is not None and temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generator = generator
        self.stop_ids = set(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
        self.stop_strings = stop_strings
        self.detokenize = detokenize
        self.rows = [_Row() for _ in range(self.batch)]
        self._pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    # -- per-row bookkeeping ------------------------------------------------------------
    def _accept(self, r: int, tok: int, last: bool):
        """Record a token for row ``r``; returns its stream piece."""
        row = self.rows[r]
        if tok in self.stop_ids:
            row.done, row.finish = True, "stop"
            return self._flush(row)
        row.tokens.append(tok)
        if self.detokenize is None:
            row.done = last
            return tok
        prev_len = len(row.text)
        row.text = self.detokenize(row.tokens)
        if self.stop_strings:
            # A new match can only end in the new text; look back by the longest stop string.
            lo = max(0, min(prev_len, len(row.text)) - max(map(len, self.stop_strings)) + 1)
            hits = [i for i in (row.text.find(s, lo) for s in self.stop_strings) if i >= 0]
            if hits:
                cut = min(hits)
                row.text = row.text[:cut]
                # drop the trailing tokens whose text lies inside the stop string
                n = len(row.tokens)
                while n > 0 and len(self.detokenize(row.tokens[:n - 1])) >= cut:
                    n -= 1
                del row.tokens[n:]
                row.done, row.finish = True, "stop"
                return self._flush(row)
        if last:
            row.done = True
            return self._flush(row)
        safe = len(row.text) - self._holdback(row.text)
        piece = row.text[row.emitted:safe] if safe > row.emitted else ""
        row.emitted = max(row.emitted, safe)
        return piece

    def _holdback(self, text: str) -> int:
        """Characters at the end of ``text`` that may still change: the longest suffix that is a
        proper prefix of a stop string, and an incomplete multi-byte character (U+FFFD)."""
        keep = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        tail = len(text) - len(text.rstrip("\ufffd"))
        return max(keep, tail)

    def _flush(self, row: _Row):
        if self.detokenize is None:
            return None
        piece = row.text[row.emitted:]
        row.emitted = len(row.text)
        return piece

    # -- the loop --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[List[Optional[Union[int, str]]]]:
        model = self.model
        cache = model.new_cache(self.batch, self.width + self.new_cap - 1)
        with torch.inference_mode():
            logits = model(**self._inputs, attention_mask=self._mask, cache=cache,
                           logits_to_keep=1, backend=self.backend)[:, -1]
            feed = torch.empty(self.batch, 1, dtype=torch.long, device=self.device)
            for step in range(self.new_cap):
                tok = sample_next_token(logits, temperature=self.temperature, top_k=self.top_k,
                                        top_p=self.top_p, generator=self.generator)
                last = step == self.new_cap - 1
                toks = tok.tolist()
                out: List[Optional[Union[int, str]]] = [None] * self.batch
                for r, t in enumerate(toks):
                    if not self.rows[r].done:
                        out[r] = self._accept(r, t, last)
                yield out
                if last or all(row.done for row in self.rows):
                    break
                # finished rows keep decoding a pad token (static batch shape); ignored
                if any(row.done for row in self.rows):
                    tok = torch.where(torch.tensor([row.done for row in self.rows],
                                                   device=self.device), self._pad, tok)
                feed[:, 0] = tok
                logits = model(feed, cache=cache, logits_to_keep=1, backend=self.backend)[:, -1]
        for row in self.rows:
            row.done = True

    @property
    def results(self) -> List[Generation]:
        return [Generation(tokens=list(r.tokens),
                           text=None if self.detokenize is None else r.text,
                           finish_reason=r.finish, prompt_tokens=n)
                for r, n in zip(self.rows, self.prompt_lens)]


def generate(model, prompts: Union[Prompt, Sequence[Prompt], None] = None, **kw
             ) -> Union[Generation, List[Generation]]:
    """Generate for one prompt (list of ids / 1-D tensor -> ``Generation``) or several (list of
    prompts / 2-D tensor -> list of ``Generation``, batched with left padding).

    Keyword args: ``max_new_tokens=64``, ``temperature=0.0`` (greedy), ``top_k=0``,
    ``top_p=1.0``, ``seed`` / ``generator``, ``stop_token_ids`` (default: the model's eos ids),
    ``stop_strings``, ``detokenize`` (ids -> str; fills ``Generation.text``), ``max_len``
    (context limit, default ``config.max_position_embeddings``), ``inputs_embeds`` +
    ``attention_mask`` instead of prompts, ``backend`` (attention backend).
    Raises ValueError for an empty prompt, a prompt that fills ``max_len``, ``temperature < 0``,
    ``top_p`` outside (0, 1], ``top_k < 0``, ``max_new_tokens < 1``, ids outside the vocabulary.
    """
    if prompts is None:
        run = GenerationRun(model, None, **kw)
        single = False
    else:
        plist, single = _as_prompts(prompts)
        run = GenerationRun(model, plist, **kw)
    for _ in run:
        pass
    res = run.results
    return res[0] if single else res


def stream_batch(model, prompts: Union[Sequence[Prompt], torch.Tensor, None] = None, **kw
                 ) -> GenerationRun:
    """A ``GenerationRun``: iterate it for per-step lists of each row's new piece (None once a
    row finished); its ``results`` afterwards. Same keyword arguments as ``generate``."""
    if prompts is None:
        return GenerationRun(model, None, **kw)
    plist, _ = _as_prompts(prompts)
    return GenerationRun(model, plist, **kw)


def stream(model, prompt: Optional[Prompt] = None, **kw) -> Iterator[Union[int, str]]:
    """Yield one prompt's new token ids as they are produced, or text pieces when
    ``detokenize`` is given (empty pieces are skipped). Same keyword arguments as ``generate``."""
    if prompt is None:
        run = GenerationRun(model, None, **kw)
    else:
        plist, single = _as_prompts(prompt)
        if not single:
            raise ValueError("stream takes one prompt; use stream_batch for several")
        run = GenerationRun(model, plist, **kw)
    for pieces in run:
        p = pieces[0]
        if p is not None and p != "":
            yield p
