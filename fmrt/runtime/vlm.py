"""``VlmModel``: the vision-language facade (LLaVA and Flamingo), the same on every backend.

    vlm = fmrt.load("shapes-flamingo" | "shapes-llava" | <fmrt model dir> | <HF llava dir>,
                    backend="torch" | "onnxruntime" | "tensorrt")
    vlm.generate([img_hxwx3_uint8, ...], "how many circles are there?")   # -> str
    vlm.generate(images, prompt, stream=True)                             # -> Iterator[str]
    vlm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ...}},
                                            {"type": "text", "text": "..."}]}])
    vlm.point(img, "red circles")   # {"text", "points": [(x, y)] original pixels, "count"}
    run = vlm.start_batch([VlmRequest(...), ...])   # serving: one batched prefill, then steps
    for pieces in run: ...          # per step: one str (maybe "") or None (finished) per request
    run.cancel(i); run.results      # -> [VlmResult]

Prompt formats (what the bundled ShapesWorld models were trained on, see
``fmrt.data.vlm_data`` and ``fmrt.data.flamingo_data``):
  * LLaVA: ``<sot> <image>*L*n {q1} <sep> {a1} <eot> {q2} <sep> ...`` - every image first
    (``L = image_seq_length`` placeholders each), then the user/assistant turns.
  * Flamingo: ``<sot> <image> output : red <|endofchunk|> <image> question : ... answer :`` -
    image parts become ``<image>`` in place; a user text that does not already end in ``:`` is
    asked as ``question : {text} answer :`` (the explicit-QA form of training); assistant turns
    end with ``<|endofchunk|>``.
  System messages are validated and dropped: neither model saw one in training.

Coordinates: images of any size are resized to the model's input (``preprocess.resize_mode``;
ShapesWorld bundles squash to 64 x 64); ``<point x=".." y="..">`` tags in the generated text are
rewritten into pixels of the FIRST original image of the request, also while streaming (a tag is
held back until its closing ``>`` so the streamed pieces concatenate to the returned text).

Backends: ``torch`` runs the fmrt modules with a static KV cache; ``onnxruntime`` / ``tensorrt``
run the graphs of ``export/vlm_export.py`` (vision graph, LM prefill graph, LM decode graph with
explicit past key/values; names and shape profiles in ``export.specs.vlm_graphs``). Sampling,
stop strings, streaming, cancellation and point parsing are one code path (``VlmBatchRun``) over
a per-backend "LM session" (``prefill() -> B x V logits``, ``step(tokens) -> B x V``,
``keep(rows)``), so every backend answers the same way.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fmrt.runtime.base import BACKENDS, BackendUnavailableError, RuntimeLoadError

FAMILIES = ("llava", "flamingo")
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
MAX_IMAGE_B64_BYTES = 12 * 1024 * 1024     # one image's base64 text (~9 MB of file)
MAX_MESSAGES = 256
# Flamingo trains on 5-chunk episodes (4 shots + query); 8 leaves room for 7 shots, and the
# perceiver has no per-media embedding limit (max_num_media None).
FLAMINGO_MAX_IMAGES = 8
LLAVA_MAX_IMAGES = 8
POINT_MAX_NEW_TOKENS = 160   # a pointing answer: ~13 tokens per point, ~12 for the count sentence


class VlmRequestError(ValueError):
    """A request the model cannot serve: bad messages/options, too many or undecodable images,
    a prompt + max_new_tokens that does not fit the context. The message says which."""


# ----------------------------------------------------------------------------- images
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)?,", re.I)


def decode_image_url(url_or_b64: str) -> np.ndarray:
    """A ``data:image/...;base64,...`` URL or bare base64 (PNG/JPEG/... bytes) -> ``H x W x 3``
    uint8 RGB. Raises ``VlmRequestError`` for anything else (http URLs, bad base64, non-images,
    images over ``fmrt.preprocess.MAX_IMAGE_SIDE`` / ``MAX_IMAGE_PIXELS``)."""
    from PIL import Image, UnidentifiedImageError

    from fmrt.preprocess import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

    if not isinstance(url_or_b64, str):
        raise VlmRequestError(f"image url must be a string, got {type(url_or_b64).__name__}")
    s = url_or_b64.strip()
    if len(s) > MAX_IMAGE_B64_BYTES:
        raise VlmRequestError(f"image of {len(s)} base64 bytes exceeds the limit of "
                              f"{MAX_IMAGE_B64_BYTES}")
    if s[:7].lower() in ("http://", "https:/"):
        raise VlmRequestError("image urls must be data URLs or base64 (remote http(s) urls are "
                              "not fetched)")
    if s[:5].lower() == "data:":
        m = _DATA_URL.match(s)
        if m is None:
            raise VlmRequestError("malformed data URL")
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise VlmRequestError(f"data URL media type {mime!r} is not an image")
        if ";base64" not in (m.group("params") or "").lower():
            raise VlmRequestError("only base64 data URLs are supported")
        s = s[m.end():]
    s = re.sub(r"\s+", "", s)
    if not s:
        raise VlmRequestError("empty image data")
    s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VlmRequestError(f"invalid base64 image ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))   # header only: check the size before decoding
            w, h = img.size
            if w <= 0 or h <= 0 or max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
                raise VlmRequestError(f"image of {w}x{h} is outside the limits (1..{MAX_IMAGE_SIDE}"
                                      f" px per side, {MAX_IMAGE_PIXELS} pixels)")
            img.load()
            arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    except VlmRequestError:
        raise
    except UnidentifiedImageError:
        raise VlmRequestError("image data is not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise VlmRequestError(f"cannot decode image ({e})") from None
    return np.ascontiguousarray(arr)


def _check_image(img: Any, where: str) -> np.ndarray:
    from fmrt.preprocess import InvalidImageError, check_image

    if isinstance(img, str):
        return decode_image_url(img)
    try:
        return check_image(img, 0)
    except InvalidImageError as e:
        raise VlmRequestError(f"{where}: {str(e).replace('image 0: ', '')}") from None


# ----------------------------------------------------------------------------- requests
@dataclass
class VlmRequest:
    """One generation request: ``images`` (HxWx3 uint8 arrays, or data URL / base64 strings)
    with a ``prompt``, or OpenAI-format ``messages`` (images inside; then ``images`` stays
    empty). Exactly one of ``prompt`` / ``messages``."""
    images: Optional[List[Any]] = None
    prompt: Optional[str] = None
    messages: Optional[List[Dict[str, Any]]] = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Union[None, str, Sequence[str]] = None
    seed: Optional[int] = None
    _prepared: Any = field(default=None, repr=False, compare=False)


@dataclass
class VlmResult:
    text: str
    finish_reason: str                     # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    points: Optional[List[Tuple[float, float]]] = None   # first original image's pixels
    count: Optional[int] = None


@dataclass
class _Prepared:
    ids: List[int]
    images: List[np.ndarray]
    first_size: Optional[Tuple[int, int]]   # (W, H) of the first original image
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: List[str]
    seed: Optional[int]


def _parse_messages(messages: Any) -> List[Tuple[str, List[Tuple[str, Any]]]]:
    """OpenAI messages -> [(role, [("text", str) | ("image", ndarray)])] (images decoded)."""
    if not isinstance(messages, (list, tuple)):
        raise VlmRequestError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise VlmRequestError("messages is empty")
    if len(messages) > MAX_MESSAGES:
        raise VlmRequestError(f"{len(messages)} messages exceed the limit of {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise VlmRequestError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise VlmRequestError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        content = m.get("content")
        parts: List[Tuple[str, Any]] = []
        if isinstance(content, str):
            parts.append(("text", content))
        elif isinstance(content, (list, tuple)):
            for j, p in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(p, dict):
                    raise VlmRequestError(f"{where} must be an object")
                kind = p.get("type")
                if kind == "text":
                    if not isinstance(p.get("text"), str):
                        raise VlmRequestError(f"{where}.text must be a string")
                    parts.append(("text", p["text"]))
                elif kind == "image_url":
                    iu = p.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        raise VlmRequestError(f"{where}.image_url.url must be a string")
                    try:
                        parts.append(("image", decode_image_url(url)))
                    except VlmRequestError as e:
                        raise VlmRequestError(f"{where}: {e}") from None
                elif kind == "image":
                    parts.append(("image", _check_image(p.get("image"), where)))
                else:
                    raise VlmRequestError(f"{where}.type must be 'text', 'image_url' or 'image', "
                                          f"got {kind!r}")
        elif content is None and role == "assistant":
            pass
        else:
            raise VlmRequestError(f"messages[{i}].content must be a string or a list of parts")
        if role != "user" and any(k == "image" for k, _ in parts):
            raise VlmRequestError(f"messages[{i}]: images are only accepted in user messages")
        out.append((role, parts))
    if out[-1][0] != "user":
        raise VlmRequestError(f"the last message must be a user message, got "
                              f"{out[-1][0]!r}")
    return out


# ----------------------------------------------------------------------------- prompt formats
from fmrt.data.vlm_data import encode_text as _words  # noqa: E402  (coordinate tokens)


class _LlavaFormat:
    """ShapesWorld LLaVA: ``<sot> <image>*L*n {q} <sep> {a} <eot> ...`` (fmrt.data.vlm_data)."""

    def __init__(self, tok, image_token_id: int, image_seq_length: int) -> None:
        from fmrt.data.vlm_data import SEP_TOKEN

        self.tok, self.img, self.L = tok, image_token_id, image_seq_length
        self.sep = tok.token_to_id(SEP_TOKEN)
        if self.sep is None:
            raise RuntimeLoadError("the LLaVA tokenizer lacks <sep> (a ShapesWorld VLM tokenizer "
                                   "from fmrt.data.vlm_data.build_vlm_tokenizer is expected)")
        self.stop_ids = [tok.eot_token_id]
        self._drop = {self.img, self.sep, tok.token_to_id("<image>")}

    def _clean(self, text: str) -> str:
        return text.replace("<image>", " ")   # images always go first (training format)

    def from_prompt(self, prompt: str, n_images: int) -> List[int]:
        return ([self.tok.sot_token_id] + [self.img] * (self.L * n_images)
                + _words(self.tok, self._clean(prompt)) + [self.sep])

    def from_messages(self, msgs) -> Tuple[List[int], List[np.ndarray]]:
        images = [v for role, parts in msgs if role == "user" for k, v in parts if k == "image"]
        ids = [self.tok.sot_token_id] + [self.img] * (self.L * len(images))
        pending: List[str] = []
        for role, parts in msgs:
            text = " ".join(v for k, v in parts if k == "text")
            if role == "user":
                pending.append(text)
            elif role == "assistant":
                ids += _words(self.tok, self._clean(" ".join(pending))) + [self.sep]
                ids += _words(self.tok, text) + [self.tok.eot_token_id]
                pending = []
        ids += _words(self.tok, self._clean(" ".join(pending))) + [self.sep]
        return ids, images

    def detok(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self._drop])

    def point_prompt(self, phrase: str) -> str:
        return f"point to the {phrase}"


class _FlamingoFormat:
    """ShapesWorld Flamingo episodes (fmrt.data.flamingo_data)."""

    def __init__(self, tok, media_token_id: int, eoc_token_id: int, eos_ids: Sequence[int]
                 ) -> None:
        self.tok, self.media, self.eoc = tok, media_token_id, eoc_token_id
        self.stop_ids = sorted(set(eos_ids) | {eoc_token_id})
        self._drop = {media_token_id, eoc_token_id}

    @staticmethod
    def wrap(text: str) -> str:
        t = " ".join(text.split())
        if not t:
            return "output :"
        return t if t.endswith(":") else f"question : {t} answer :"

    def from_prompt(self, prompt: str, n_images: int) -> List[int]:
        if "<image>" in prompt:
            n = prompt.count("<image>")
            if n != n_images:
                raise VlmRequestError(f"the prompt has {n} <image> markers but {n_images} "
                                      "image(s) were given")
            ids = _words(self.tok, prompt)
            return ids if ids[:1] == [self.tok.sot_token_id] else [self.tok.sot_token_id] + ids
        return [self.tok.sot_token_id] + [self.media] * n_images + _words(self.tok,
                                                                         self.wrap(prompt))

    def from_messages(self, msgs) -> Tuple[List[int], List[np.ndarray]]:
        ids, images = [self.tok.sot_token_id], []
        for role, parts in msgs:
            if role == "user":
                for k, v in parts:
                    if k == "image":
                        ids.append(self.media)
                        images.append(v)
                    elif v.strip():
                        ids += _words(self.tok, self.wrap(v))
                if not any(k == "text" and v.strip() for k, v in parts):
                    ids += _words(self.tok, self.wrap(""))
            elif role == "assistant":
                ids += _words(self.tok, " ".join(v for _, v in parts)) + [self.eoc]
        return ids, images

    def detok(self, ids: Sequence[int]) -> str:
        return " ".join(self.tok.decode([i for i in ids if i not in self._drop]).split())

    def point_prompt(self, phrase: str) -> str:
        return f"point to the {phrase}"


# ----------------------------------------------------------------------------- text rows
class _TextRow:
    """One request's generated tokens -> text, stop-string cut and stream pieces.

    The text is ``transform(detok(tokens))`` (point tags rescaled). A piece is released only when
    it cannot change any more: the tail that may start a stop string, or an unclosed ``<`` (a
    point tag whose digits are still coming) is held back."""

    def __init__(self, prep: _Prepared, detok: Callable[[List[int]], str],
                 transform: Callable[[str], str], stop_ids: Sequence[int]) -> None:
        self.prep = prep
        self.detok, self.transform = detok, transform
        self.stop_ids = set(stop_ids)
        self.stop = prep.stop
        self.tokens: List[int] = []
        self.steps = 0
        self.text = ""
        self.emitted = 0
        self.done = False
        self.finish = "length"
        self.generator = None
        if prep.temperature > 0 and prep.seed is not None:
            self.generator = torch.Generator().manual_seed(int(prep.seed))

    def _render(self, toks: List[int]) -> str:
        return self.transform(self.detok(toks))

    def accept(self, tok: int) -> str:
        self.steps += 1
        last = self.steps >= self.prep.max_new_tokens
        if tok in self.stop_ids:
            self.done, self.finish = True, "stop"
            return self._flush()
        self.tokens.append(tok)
        prev = len(self.text)
        self.text = self._render(self.tokens)
        if self.stop:
            lo = max(0, min(prev, len(self.text)) - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                n = len(self.tokens)   # drop the tokens that only produced the stop string
                while n > 0 and len(self._render(self.tokens[:n - 1])) >= cut:
                    n -= 1
                del self.tokens[n:]
                self.done, self.finish = True, "stop"
                return self._flush()
        if last:
            self.done = True
            return self._flush()
        safe = len(self.text) - self._holdback(self.text)
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def _holdback(self, text: str) -> int:
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        lt = text.rfind("<")
        if lt >= 0 and ">" not in text[lt:]:
            keep = max(keep, len(text) - lt)
        return max(keep, len(text) - len(text.rstrip("\ufffd")))

    def _flush(self) -> str:
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def cancel(self) -> None:
        if not self.done:
            self.done, self.finish = True, "cancelled"
            self.text = self.text[:self.emitted]   # what the client has seen


# ----------------------------------------------------------------------------- batch run
class VlmBatchRun:
    """One batched generation over ``VlmRequest``s: a batched prefill, then one-token decode
    steps of the rows still running (finished and cancelled rows are dropped from the batch, so
    they cost nothing afterwards). Iterate for per-step piece lists; ``results`` at any time."""

    def __init__(self, model: "VlmModel", preps: List[_Prepared]) -> None:
        self.model = model
        self.preps = preps
        self.rows = [_TextRow(p, model._format.detok, model._transform(p), model._format.stop_ids)
                     for p in preps]
        self._session = None
        self._started = False
        # cancel() may come from another thread (a server's event loop) while a step runs
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def cancel(self, i: int) -> None:
        """Stop request ``i`` (e.g. its client went away); its row leaves the batch before the
        next decode step. ``finish_reason`` becomes ``"cancelled"`` (unless it already ended)."""
        if not 0 <= i < len(self.rows):
            raise IndexError(f"request {i} outside a batch of {len(self.rows)}")
        with self._lock:
            self.rows[i].cancel()

    def _sample(self, logits: torch.Tensor, active: List[int]) -> List[int]:
        from fmrt.models.generation import sample_next_token

        toks = logits.argmax(dim=-1).tolist()   # greedy rows (the common case): one argmax
        for j, r in enumerate(active):
            p = self.rows[r].prep
            if p.temperature > 0:
                toks[j] = int(sample_next_token(logits[j:j + 1].float(), temperature=p.temperature,
                                                top_p=p.top_p, generator=self.rows[r].generator)[0])
        return toks

    def __iter__(self) -> Iterator[List[Optional[str]]]:
        if self._started:
            raise RuntimeError("a VlmBatchRun can be iterated once")
        self._started = True
        active = [i for i, r in enumerate(self.rows) if not r.done]
        if not active:
            return
        preps = [self.preps[i] for i in active]
        width = max(len(p.ids) for p in preps)
        max_new = max(p.max_new_tokens for p in preps)
        self._session = sess = self.model._lm.open([p.ids for p in preps],
                                                   [p.images for p in preps], width + max_new - 1)
        logits = sess.prefill()
        try:
            while True:
                toks = self._sample(logits, active)
                out: List[Optional[str]] = [None] * len(self.rows)
                with self._lock:
                    for j, r in enumerate(active):
                        row = self.rows[r]
                        if not row.done:
                            out[r] = row.accept(toks[j])
                yield out
                with self._lock:
                    still = [j for j, r in enumerate(active) if not self.rows[r].done]
                if not still:
                    break
                if len(still) < len(active):
                    sess.keep(still)
                    active = [active[j] for j in still]
                    toks = [toks[j] for j in still]
                logits = sess.step(toks)
        finally:
            with self._lock:
                for row in self.rows:
                    if not row.done:
                        row.cancel()
            self._session = None

    def run(self) -> List[VlmResult]:
        for _ in self:
            pass
        return self.results

    @property
    def results(self) -> List[VlmResult]:
        out = []
        for row, p in zip(self.rows, self.preps):
            pts, count = None, None
            if "<point" in row.text or "total of" in row.text:
                from fmrt.data import parse_point_answer

                arr, count = parse_point_answer(row.text)
                arr = np.asarray(arr).reshape(-1, 2)
                pts = [(float(x), float(y)) for x, y in arr] if "<point" in row.text else None
            out.append(VlmResult(text=row.text, finish_reason=row.finish,
                                 prompt_tokens=len(p.ids), completion_tokens=row.steps,
                                 points=pts, count=count))
        return out


# ----------------------------------------------------------------------------- torch LMs
def _select_cache(cache, idx: torch.Tensor) -> None:
    """Keep batch rows ``idx`` of a ``KVCache`` (in place: new, smaller buffers)."""
    cache.k = [k.index_select(0, idx) for k in cache.k]
    cache.v = [v.index_select(0, idx) for v in cache.v]
    cache.valid = cache.valid.index_select(0, idx)
    cache.next_pos = cache.next_pos.index_select(0, idx)
    if getattr(cache, "media_count", None) is not None:
        cache.media_count = cache.media_count.index_select(0, idx)
    cache.batch_size = int(idx.numel())


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids, mask


class _TorchSession:
    def __init__(self, call, cache, first: Dict[str, Any], device, on_keep=None) -> None:
        self.call, self.cache, self.first, self.device = call, cache, first, device
        self.on_keep = on_keep

    def prefill(self) -> torch.Tensor:
        with torch.inference_mode():
            out = self.call(**self.first, cache=self.cache, logits_to_keep=1)[:, -1].float()
        self.first = None
        return out

    def step(self, toks: List[int]) -> torch.Tensor:
        feed = torch.tensor(toks, dtype=torch.long, device=self.device)[:, None]
        with torch.inference_mode():
            return self.call(feed, cache=self.cache, logits_to_keep=1)[:, -1].float()

    def keep(self, rows: List[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        _select_cache(self.cache, idx)
        if self.on_keep is not None:
            self.on_keep(idx)


class _TorchLlavaLM:
    def __init__(self, model, preprocess) -> None:
        self.model, self.preprocess = model, preprocess
        self.device = next(model.parameters()).device
        self.pad = model.config.text.pad_token_id or 0

    def open(self, ids_rows, image_rows, max_len: int) -> _TorchSession:
        from fmrt.preprocess import preprocess_images

        ids, mask = _left_pad(ids_rows, self.pad)
        flat = [im for r in image_rows for im in r]
        lm = self.model.language_model
        with torch.inference_mode():
            px = preprocess_images(flat, self.preprocess).to(self.device) if flat else None
            emb = self.model.embed(ids.to(self.device), px)
        cache = lm.new_cache(len(ids_rows), max_len)
        first = dict(inputs_embeds=emb,
                     attention_mask=None if bool(mask.all()) else mask.to(self.device))

        def call(input_ids=None, **kw):
            return lm(input_ids, **kw)

        return _TorchSession(call, cache, first, self.device)


class _TorchFlamingoLM:
    def __init__(self, model, preprocess) -> None:
        self.model, self.preprocess = model, preprocess
        self.device = next(model.parameters()).device
        self.pad = model.lang_encoder.config.pad_token_id or 0
        # Flamingo.forward conditions its layers on the media (state on the shared modules):
        # runs stepped from different threads must not interleave inside one forward.
        self._lock = threading.Lock()

    def open(self, ids_rows, image_rows, max_len: int) -> _TorchSession:
        ids, mask = _left_pad(ids_rows, self.pad)
        # Media are always passed, zeros when no row has an image: the gated cross-attention
        # blocks then still apply their gated feed-forward to every token, as in training (the
        # torch Flamingo skips the whole block when media is None, which would make a text-only
        # row's answer depend on whether it shares a batch with an image row).
        if any(image_rows):
            px = _pad_images(image_rows, self.preprocess).to(self.device)
            with torch.inference_mode():
                media = self.model.encode_images(px)
        else:
            c = self.model.config
            media = torch.zeros(len(ids_rows), 1, c.num_latents, self.model.vision_encoder.width,
                                device=self.device)
        state = {"media": media}
        cache = self.model.new_cache(len(ids_rows), max_len)

        def call(input_ids, **kw):
            with self._lock:
                return self.model(input_ids, media=state["media"], **kw)

        def on_keep(idx):
            if state["media"] is not None:
                state["media"] = state["media"].index_select(0, idx)

        first = dict(input_ids=ids.to(self.device),
                     attention_mask=None if bool(mask.all()) else mask.to(self.device))
        return _TorchSession(call, cache, first, self.device, on_keep)


def _pad_images(image_rows: Sequence[Sequence[np.ndarray]], preprocess) -> torch.Tensor:
    """Per-row image lists (any counts >= 0) -> ``B x T_max x 3 x S x S`` normalised, zeros where
    a row has fewer images (never attended: a row has as many <image> tokens as images)."""
    from fmrt.preprocess import preprocess_images

    t = max(1, max(len(r) for r in image_rows))
    s = preprocess.image_size
    out = torch.zeros(len(image_rows), t, 3, s, s)
    for i, r in enumerate(image_rows):
        if r:
            out[i, :len(r)] = preprocess_images(list(r), preprocess)
    return out


# ----------------------------------------------------------------------------- the facade
class VlmModel:
    """See the module docstring. Build with ``VlmModel.load`` / ``fmrt.load``."""

    def __init__(self, *, name: str, family: str, backend: str, tokenizer, preprocess,
                 lm, fmt, context_length: int, max_images: int, image_size: int,
                 model_dir: str = "", torch_model=None) -> None:
        self.name, self.family, self.backend = name, family, backend
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self._lm, self._format = lm, fmt
        self.context_length = int(context_length)
        self.max_images = int(max_images)
        self.image_size = int(image_size)
        self.model_dir = model_dir
        self.torch_model = torch_model   # the fmrt nn.Module (torch backend), else None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str, backend: str = "torch", *, device: str = "cpu",
             tokenizer=None, **kwargs) -> "VlmModel":
        """A bundled name, an fmrt ``llava``/``flamingo`` model directory, or a Hugging Face
        ``LlavaForConditionalGeneration`` directory (its tokenizer: an fmrt ShapesWorld VLM
        tokenizer saved there, or ``tokenizer=`` an fmrt tokenizer / its directory; images are
        squashed to the tower's size with CLIP's mean/std). ``device``: torch device (torch
        backend) or ORT / TensorRT device (``"cuda[:i]"``). Other keyword args go to the graph
        backends: ``onnx_dir``, ``cache_root``, ``providers``, ``intra_op_threads``,
        ``precision`` ("fp32"), TensorRT ``workspace_gb`` / ``rebuild``. The graphs are exported
        into the cache on first use (``export.vlm_export.vlm_onnx_dir``)."""
        from fmrt import pretrained
        from fmrt.preprocess import PreprocessConfig

        if backend not in BACKENDS:
            raise RuntimeLoadError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        try:
            model_dir = pretrained.resolve(os.fspath(name_or_path))
            cfg = pretrained.read_config(model_dir)
        except (pretrained.PretrainedError, OSError) as e:
            raise RuntimeLoadError(str(e)) from None
        family = cfg.get("family") or ("llava" if cfg.get("model_type") == "llava" else None)
        if family not in FAMILIES:
            raise RuntimeLoadError(f"{name_or_path} is a {family!r} model, not one of {FAMILIES}")
        name = os.path.basename(os.path.normpath(model_dir))
        if "family" in cfg:
            p = pretrained.load_pretrained(model_dir)
            model, tok, pre = p.model.eval(), p.tokenizer, p.preprocess
        else:   # Hugging Face LLaVA directory
            from fmrt.models.llava import load_llava_checkpoint

            model = load_llava_checkpoint(model_dir).eval()
            tok = None
            vc = cfg.get("vision_config") or {}
            pre = PreprocessConfig(image_size=vc.get("image_size", 336), resize_mode="squash")
        if tokenizer is not None:
            from fmrt.models.tokenizer import load_tokenizer

            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if tok is None:
            from fmrt.models.tokenizer import TokenizerError, load_tokenizer

            try:
                tok = load_tokenizer(model_dir)
            except TokenizerError:
                raise RuntimeLoadError(f"{model_dir} has no fmrt tokenizer (tokenizer.json + "
                                       "tokenizer_config.json); pass tokenizer=") from None
        # the torch backend runs this module; the graph backends read its config and (LLaVA)
        # its embedding table on the host
        model = (model.to(device) if backend == "torch" else model).float()
        if family == "llava":
            c = model.config
            fmt = _LlavaFormat(tok, c.image_token_id, c.image_seq_length)
            ctx = c.text.max_position_embeddings
            max_images = max(1, min(LLAVA_MAX_IMAGES, (ctx - 16) // c.image_seq_length))
            image_size = c.vision.image_size
        else:
            lc = model.lang_encoder.config
            fmt = _FlamingoFormat(tok, model.media_token_id, model.eoc_token_id, lc.eos_token_ids)
            ctx = lc.max_position_embeddings
            max_images = model.config.max_num_media or FLAMINGO_MAX_IMAGES
            image_size = model.config.vision["image_size"]
        if pre.image_size != image_size:
            pre = PreprocessConfig.from_dict(dict(pre.to_dict(), image_size=image_size))
        if backend == "torch":
            lm = (_TorchLlavaLM if family == "llava" else _TorchFlamingoLM)(model, pre)
            torch_model = model
        else:
            lm = _load_graph_lm(backend, family, model, pre, model_dir,
                                device=None if device == "cpu" else device, **kwargs)
            torch_model = None
        return cls(name=name, family=family, backend=backend, tokenizer=tok, preprocess=pre,
                   lm=lm, fmt=fmt, context_length=ctx, max_images=max_images,
                   image_size=image_size, model_dir=model_dir, torch_model=torch_model)

    # -- coordinates -----------------------------------------------------------------------
    def _to_original(self, size: Tuple[int, int]) -> Callable[[str], str]:
        """Point-tag rewriter from the model's ``S x S`` input frame to an original image of
        ``size`` = (W, H), inverting ``preprocess.resize_mode`` (squash: per-axis scale;
        shortest: scale of the short side plus the centre-crop offset)."""
        from fmrt.data.vlm_data import rescale_point_text

        s = self.image_size
        w, h = size
        if (w, h) == (s, s):
            return lambda t: t
        if self.preprocess.resize_mode == "squash":
            return lambda t: rescale_point_text(t, (s, s), (w, h))
        scale = s / min(h, w)   # "shortest": resized to (rh, rw), then centre crop S x S
        rh, rw = max(s, round(h * scale)), max(s, round(w * scale))
        top, left = (rh - s) // 2, (rw - s) // 2
        tag = re.compile(r'<point\s+x\s*=\s*"(-?[0-9.]+)"\s+y\s*=\s*"(-?[0-9.]+)"\s*/?>')

        def sub(m):
            x = (float(m.group(1)) + left + 0.5) * w / rw - 0.5
            y = (float(m.group(2)) + top + 0.5) * h / rh - 0.5
            return f'<point x="{int(np.floor(x + 0.5))}" y="{int(np.floor(y + 0.5))}">'

        return lambda t: tag.sub(sub, t)

    def _transform(self, prep: _Prepared) -> Callable[[str], str]:
        return (lambda t: t) if prep.first_size is None else self._to_original(prep.first_size)

    # -- validation ------------------------------------------------------------------------
    def _prepare(self, req: VlmRequest) -> _Prepared:
        if not isinstance(req, VlmRequest):
            raise VlmRequestError(f"expected a VlmRequest, got {type(req).__name__}")
        mnt = req.max_new_tokens
        if isinstance(mnt, bool) or not isinstance(mnt, (int, np.integer)) or mnt < 1:
            raise VlmRequestError(f"max_new_tokens must be a positive integer, got {mnt!r}")
        try:
            temp, top_p = float(req.temperature), float(req.top_p)
        except (TypeError, ValueError):
            raise VlmRequestError("temperature and top_p must be numbers") from None
        if not (math.isfinite(temp) and 0.0 <= temp <= 100.0):
            raise VlmRequestError(f"temperature must be in [0, 100] (0 = greedy), got "
                                  f"{req.temperature!r}")
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise VlmRequestError(f"top_p must be in (0, 1], got {req.top_p!r}")
        stop = req.stop
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS or any(
                not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise VlmRequestError(f"stop must be a non-empty string or a list of at most "
                                  f"{MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} "
                                  f"characters, got {req.stop!r}")
        seed = req.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise VlmRequestError(f"seed must be an integer or None, got {seed!r}")
        if (req.prompt is None) == (req.messages is None):
            raise VlmRequestError("pass exactly one of prompt and messages")
        given = list(req.images or []) if not isinstance(req.images, np.ndarray) else [req.images]
        if req.prompt is not None:
            if not isinstance(req.prompt, str):
                raise VlmRequestError(f"prompt must be a string, got {type(req.prompt).__name__}")
            if len(given) > self.max_images:
                raise VlmRequestError(f"{len(given)} images exceed the limit of "
                                      f"{self.max_images} per request for {self.name}")
            images = [_check_image(im, f"images[{i}]") for i, im in enumerate(given)]
            ids = self._format.from_prompt(req.prompt, len(images))
        else:
            if given:
                raise VlmRequestError("with messages, images go inside the messages (image_url "
                                      "parts), not in images")
            msgs = _parse_messages(req.messages)
            ids, images = self._format.from_messages(msgs)
            if len(images) > self.max_images:
                raise VlmRequestError(f"{len(images)} images exceed the limit of "
                                      f"{self.max_images} per request for {self.name}")
        if len(ids) + int(mnt) > self.context_length:
            raise VlmRequestError(f"prompt of {len(ids)} tokens + max_new_tokens={int(mnt)} "
                                  f"exceeds the context length of {self.context_length}")
        first = (int(images[0].shape[1]), int(images[0].shape[0])) if images else None
        return _Prepared(ids=ids, images=images, first_size=first, max_new_tokens=int(mnt),
                         temperature=temp, top_p=top_p, stop=list(stop),
                         seed=None if seed is None else int(seed))

    def validate(self, req: VlmRequest) -> None:
        """Raise ``VlmRequestError`` if ``req`` cannot be served (the decoded images and ids are
        kept on the request for ``start_batch``)."""
        req._prepared = self._prepare(req)

    # -- generation ------------------------------------------------------------------------
    def start_batch(self, requests: Sequence[VlmRequest]) -> VlmBatchRun:
        """A ``VlmBatchRun`` over ``requests`` (validated here if not already; the first invalid
        one raises ``VlmRequestError``). Nothing runs until it is iterated."""
        if not requests:
            raise VlmRequestError("no requests")
        preps = []
        for r in requests:
            if getattr(r, "_prepared", None) is None:
                self.validate(r)
            preps.append(r._prepared)
        return VlmBatchRun(self, preps)

    def _generate(self, req: VlmRequest, stream: bool):
        run = self.start_batch([req])
        if not stream:
            return run.run()[0].text

        def pieces():
            for p in run:
                if p[0]:
                    yield p[0]

        return pieces()

    def generate(self, images: Sequence[np.ndarray], prompt: str, max_new_tokens: int = 64,
                 temperature: float = 0.0, stop=None, stream: bool = False, top_p: float = 1.0,
                 seed: Optional[int] = None) -> Union[str, Iterator[str]]:
        """Answer ``prompt`` about ``images`` (HxWx3 uint8, any size). Returns the text (point
        tags in the first image's original pixels), or with ``stream=True`` an iterator of text
        pieces that concatenate to it. Raises ``VlmRequestError`` for bad input."""
        req = VlmRequest(images=list(images or []), prompt=prompt, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        return self._generate(req, stream)

    def chat(self, messages: List[Dict[str, Any]], max_new_tokens: int = 64,
             temperature: float = 0.0, stop=None, stream: bool = False, top_p: float = 1.0,
             seed: Optional[int] = None) -> Union[str, Iterator[str]]:
        """``generate`` for OpenAI-format ``messages`` (see the module docstring)."""
        req = VlmRequest(messages=messages, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        return self._generate(req, stream)

    def point(self, image: np.ndarray, phrase: str, max_new_tokens: Optional[int] = None
              ) -> Dict[str, Any]:
        """Ask ``point to the {phrase}`` (e.g. ``"red circles"``): ``{"text", "points": [(x, y)]
        in the original image's pixels, "count": stated total or None}``."""
        if not isinstance(phrase, str) or not phrase.strip():
            raise VlmRequestError("phrase must be a non-empty string")
        prompt = self._format.point_prompt(phrase.strip())
        if max_new_tokens is None:
            n_prompt = len(self._format.from_prompt(prompt, 1))
            max_new_tokens = max(1, min(POINT_MAX_NEW_TOKENS, self.context_length - n_prompt))
        run = self.start_batch([VlmRequest(images=[image], prompt=prompt,
                                           max_new_tokens=max_new_tokens)])
        res = run.run()[0]
        return {"text": res.text, "points": list(res.points or []), "count": res.count}

    def __repr__(self) -> str:
        return (f"VlmModel(name={self.name!r}, family={self.family!r}, backend={self.backend!r}, "
                f"max_images={self.max_images}, context_length={self.context_length})")


# ----------------------------------------------------------------------------- graph backends
class _GraphSession:
    """The KV cache of the exported LM graphs as host arrays: ``past`` (2 per layer,
    ``B x kv_heads x P x D``), ``past_mask`` ``B x P`` (0 = left padding), ``next_pos`` ``B``
    (rotary position of the next token), Flamingo's ``media`` / ``media_count``."""

    def __init__(self, lm: "_GraphLM", first: Dict[str, np.ndarray], past_mask: np.ndarray,
                 media: Optional[np.ndarray], media_count: Optional[np.ndarray]) -> None:
        self.lm, self.first = lm, first
        self.past: List[np.ndarray] = []
        self.past_mask = past_mask
        self.next_pos = past_mask.sum(1).astype(np.int64)
        self.media, self.media_count = media, media_count

    def _run(self, graph: str, feed: Dict[str, np.ndarray]) -> torch.Tensor:
        out = self.lm.engines[graph](feed)
        self.past = [out[n] for n in self.lm.present_names]
        return torch.from_numpy(np.asarray(out["logits"], dtype=np.float32))

    def prefill(self) -> torch.Tensor:
        logits = self._run("lm_prefill", self.first)
        self.first = None
        return logits

    def step(self, toks: List[int]) -> torch.Tensor:
        ids = np.asarray(toks, dtype=np.int64)[:, None]
        feed = {"input_ids": ids, "position_ids": self.next_pos[:, None].copy(),
                "past_mask": self.past_mask}
        if self.media is not None:
            self.media_count = self.media_count + (ids[:, 0] == self.lm.media_token_id)
            feed["media"] = self.media
            feed["media_index"] = self.media_count[:, None].astype(np.int64)
        feed.update(zip(self.lm.past_names, self.past))
        logits = self._run("lm_decode", feed)
        self.past_mask = np.concatenate([self.past_mask, np.ones_like(ids)], axis=1)
        self.next_pos = self.next_pos + 1
        return logits

    def keep(self, rows: List[int]) -> None:
        idx = np.asarray(rows, dtype=np.int64)
        self.past = [np.ascontiguousarray(p[idx]) for p in self.past]
        self.past_mask, self.next_pos = self.past_mask[idx], self.next_pos[idx]
        if self.media is not None:
            self.media, self.media_count = self.media[idx], self.media_count[idx]


class _GraphLM:
    """LM sessions over the exported graphs (any ``Engine``: ONNX Runtime or TensorRT): the
    prompt prefill in one ``lm_prefill`` call, then one ``lm_decode`` call per step."""

    def __init__(self, family: str, model, engines: Dict[str, Any], graphs: Dict[str, Any],
                 preprocess) -> None:
        self.family, self.engines, self.graphs = family, engines, graphs
        self.preprocess = preprocess
        if family == "llava":
            lm = model.language_model
            self.image_token_id = model.config.image_token_id
            # the prefill graph takes inputs_embeds: text embeddings are a host-side lookup
            self.embed = lm.embed_tokens.weight.detach().float().cpu().numpy()
        else:
            lm = model.lang_encoder
            self.media_token_id = model.media_token_id
            self.media_shape = (model.config.num_latents, model.vision_encoder.width)
        self.pad = lm.config.pad_token_id or 0
        n = lm.config.num_layers
        self.past_names = [f"past.{i}.{k}" for i in range(n) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]

    def _chunks(self, graph: str, name: str, x: np.ndarray, out: str) -> np.ndarray:
        """Run a vision graph over ``x`` in batches within its TensorRT profile."""
        hi = self.graphs[graph].batch_profile[2]
        return np.concatenate([self.engines[graph]({name: x[i:i + hi]})[out]
                               for i in range(0, len(x), hi)])

    def open(self, ids_rows, image_rows, max_len: int) -> _GraphSession:
        ids_t, mask_t = _left_pad(ids_rows, self.pad)
        ids, mask = ids_t.numpy(), mask_t.numpy().astype(np.int64)
        if self.family == "llava":
            from fmrt.preprocess import preprocess_images

            emb = self.embed[ids]
            flat = [im for r in image_rows for im in r]
            if flat:
                px = preprocess_images(flat, self.preprocess).numpy()
                feats = self._chunks("vision", "pixel_values", px, "image_features")
                where = ids == self.image_token_id
                if int(where.sum()) != feats.shape[0] * feats.shape[1]:
                    raise ValueError(f"{int(where.sum())} image tokens for {feats.shape[0]} "
                                     f"image(s) x {feats.shape[1]} features")
                emb[where] = feats.reshape(-1, feats.shape[-1])
            first = {"inputs_embeds": np.ascontiguousarray(emb, dtype=np.float32),
                     "attention_mask": mask}
            return _GraphSession(self, first, mask, None, None)
        if any(image_rows):
            px = _pad_images(image_rows, self.preprocess).numpy()
            media = self._chunks("resampler", "pixel_values", px, "media")
        else:   # see _TorchFlamingoLM: zeros keep the gated feed-forward of training
            media = np.zeros((len(ids_rows), 1) + self.media_shape, dtype=np.float32)
        locs = ((ids == self.media_token_id) & (mask > 0)).astype(np.int64)
        first = {"input_ids": ids, "attention_mask": mask, "media": media,
                 "media_locations": locs}
        return _GraphSession(self, first, mask, media, locs.sum(1))


def _load_graph_lm(backend: str, family: str, model, preprocess, model_dir: str, *,
                   onnx_dir: Optional[str] = None, cache_root: Optional[str] = None,
                   providers=None, intra_op_threads: Optional[int] = None,
                   device: Optional[str] = None, precision: str = "fp32",
                   workspace_gb: float = 4.0, rebuild: bool = False, **_) -> _GraphLM:
    """``_GraphLM`` over the ``export/vlm_export.py`` graphs (exported once into the cache)."""
    from export.onnx_export import ExportError
    from export.vlm_export import graphs_for_model, vlm_onnx_dir

    graphs = graphs_for_model(model, family)
    if backend not in ("onnxruntime", "tensorrt"):
        raise RuntimeLoadError(f"unknown backend {backend!r}")
    if backend == "onnxruntime" and precision != "fp32":
        raise RuntimeLoadError("the VLM graphs run in fp32 on onnxruntime")
    if backend == "tensorrt" and precision != "fp32":
        # the VLM export has no float16 variant yet: strongly typed fp16 builds need one
        raise RuntimeLoadError("the VLM TensorRT engines are built in fp32 (precision='fp32')")
    # library / GPU checks first: nothing is exported for a backend that cannot run
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(f"onnxruntime is not installed: {e}") from e
    else:
        from export import tensorrt_build as tb

        tb.import_tensorrt()
        dev = tb.require_cuda(device)
    try:
        onnx_dir = onnx_dir or vlm_onnx_dir(model_dir, cache_root)
    except ExportError as e:
        raise RuntimeLoadError(str(e)) from e
    engines: Dict[str, Any] = {}
    if backend == "onnxruntime":
        from fmrt.runtime.onnxruntime_backend import (OrtEngine, _resolve_providers,
                                                      session_options)

        prov = _resolve_providers(providers, device)
        so = session_options(intra_op_threads)
        for name, spec in graphs.items():
            engines[name] = OrtEngine(os.path.join(onnx_dir, spec.file), spec, providers=prov,
                                      sess_options=so)
    else:
        from fmrt.runtime.tensorrt_backend import TensorRTEngine

        for name, spec in graphs.items():
            try:
                plan = tb.build_or_load(os.path.join(onnx_dir, spec.file), spec,
                                        precision="fp32", cache_root=cache_root,
                                        workspace_bytes=int(workspace_gb * (1 << 30)),
                                        device_index=dev, rebuild=rebuild)
            except (tb.EngineBuildError, ValueError) as e:
                raise RuntimeLoadError(f"TensorRT engine for {name!r}: {e}") from e
            engines[name] = TensorRTEngine(plan, spec, device_index=dev)
    return _GraphLM(family, model, engines, graphs, preprocess)


__all__ = ["VlmModel", "VlmRequest", "VlmResult", "VlmBatchRun", "VlmRequestError",
           "decode_image_url"]
