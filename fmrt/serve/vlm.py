"""Vision-language models (LLaVA, Flamingo) over Ray Serve behind an OpenAI-compatible route.

    Ingress (HTTP, JSON validation, image decoding)  -- VlmRoutes
      └── VlmServer[model]   (one per served VLM; @serve.batch: concurrent requests share one
                              ``VlmBatchRun`` = one batched prefill + decode steps)

Routes (errors are ``{"error": {"message", "type", "code"}}``):

* ``POST /v1/chat/completions``: the OpenAI chat-completions body: ``{"model"?, "messages":
  [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text"} |
  {"type": "image_url", "image_url": {"url": data URL or bare base64}}]}], "max_tokens"? |
  "max_completion_tokens"?, "temperature"? [0, 2], "top_p"? (0, 1], "stop"? str | [str] (<= 4),
  "seed"?, "stream"?, "stream_options"?: {"include_usage"}, "n"?: 1, "user"?}``.
  ``"model"`` selects the served VLM (missing: the default = the first served VLM).
  ``stream: false`` -> a ``chat.completion`` object; ``stream: true`` -> server-sent events
  ``data: {chat.completion.chunk}\\n\\n`` (first the assistant role, then text deltas, then a
  chunk with ``finish_reason``; with ``stream_options.include_usage`` a last chunk with
  ``usage`` and empty ``choices``), then ``data: [DONE]\\n\\n``.
  Pointing answers (ShapesWorld ``<point x=".." y="..">`` tags) also come back as structured
  data: ``choices[0].message.points = [{"x", "y"}]`` in pixels of the first original image and
  ``choices[0].message.count`` (in a stream: on the ``delta`` of the finishing chunk). Extra
  fields are ignored by OpenAI clients (their models allow extras).
* ``GET /v1/vlm/stats``: per model, the batching counters of its ``VlmServer``.
* ``GET /v1/models`` (shared) lists the VLMs with family, backend, max images, context length.

4xx: malformed JSON 400; schema errors (bad role, empty messages/content, max_tokens <= 0 or
above ``MAX_TOKENS``, temperature outside [0, 2], top_p outside (0, 1], n != 1, unknown fields)
422; undecodable images / bad data URLs 400; too many images 413 (the ingress cap and the
model's ``max_images``); prompt + max_tokens over the model's context length 400
(``context_length_exceeded``); unknown model 404.

Batching: ``VlmServer`` queues every request (streaming or not, ``chat``, ``answer``) on one
``@serve.batch`` async-generator method; a batch is one ``vlm.start_batch`` run whose decode
steps yield one text piece per request, so concurrent requests cost one forward per token
instead of one each. A caller whose stream is closed (the HTTP client went away: the proxy
cancels the ingress, the ingress cancels its handle generator, the replica cancels the
``chat_stream`` task) marks its slot cancelled; the batch loop calls ``run.cancel(i)`` before the
next decode step, so that row stops generating. The run itself is static: requests that arrive
during a run wait until it ends, then enter the batch queue together and form the next batch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError)
from ray import serve

from fmrt.serve import http as H
from fmrt.serve.app import (FAMILY_BINDERS, ROUTE_FAMILY, AppArgs, FamilyRoutes, Route,
                            _deployment_name, _unwrap, register_family_routes)

logger = logging.getLogger("fmrt.serve")

# Largest max_tokens a request may ask for, whatever the model: a request for 10**9 tokens is a
# client bug, not a long answer (the model's context length is checked separately, per model).
MAX_TOKENS = 8192
DEFAULT_MAX_TOKENS = 64  # the facade's default
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_MESSAGES = 256


# ============================================================================== errors
class VlmServeError(ValueError):
    """A bad VLM request detected inside a replica: ``(message, status, type)``. Plain
    positional args, so it survives Ray's pickling (``cls(*args)``)."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request") -> None:
        super().__init__(message, int(status), type)
        self.message, self.status, self.type = message, int(status), type

    def __str__(self) -> str:
        return self.message


def _msg(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:2000] if s else type(e).__name__


def request_error(e: BaseException) -> VlmServeError:
    """``VlmRequestError`` (the facade's ValueError) -> the HTTP error it stands for: 413 for too
    many images, 400 ``context_length_exceeded`` for prompts that do not fit, else 400."""
    m = _msg(e)
    low = m.lower()
    if "image" in low and any(k in low for k in ("too many", "at most", "images exceed",
                                                 "max_images")):
        return VlmServeError(m, 413, "too_many_images")
    if "context" in low or "too long" in low:
        return VlmServeError(m, 400, "context_length_exceeded")
    if any(k in low for k in ("decode", "base64", "data url", "not an image", "image format")):
        return VlmServeError(m, 400, "invalid_image")
    return VlmServeError(m, 400, "invalid_request")


def map_vlm_exception(e: BaseException) -> Optional[H.HTTPError]:
    cause = _unwrap(e)
    if isinstance(cause, H.HTTPError):
        return cause
    if isinstance(cause, VlmServeError):
        return H.HTTPError(cause.status, cause.message, cause.type)
    try:
        from fmrt.runtime.vlm import VlmRequestError
    except ImportError:  # pragma: no cover - facade not installed
        VlmRequestError = ()  # type: ignore[assignment]
    if VlmRequestError and isinstance(cause, VlmRequestError):
        err = request_error(cause)
        return H.HTTPError(err.status, err.message, err.type)
    return None


# ============================================================================== request models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: StrictStr = Field(min_length=1)
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, StrictStr]  # the object, or (leniently) the URL string itself

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImageURLPart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, List[ContentPart]]
    name: Optional[StrictStr] = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Number = Union[StrictInt, float]


class ChatCompletionRequest(_Strict):
    """The OpenAI chat-completions body fmrt accepts (fields it cannot honour are refused)."""

    model: Optional[StrictStr] = None
    messages: List[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Optional[Number] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[Number] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = Field(None, ge=1, le=1)
    user: Optional[StrictStr] = None
    presence_penalty: Optional[Number] = Field(None, ge=0.0, le=0.0)
    frequency_penalty: Optional[Number] = Field(None, ge=0.0, le=0.0)
    logprobs: Optional[Literal[False]] = None

    def new_tokens(self) -> int:
        return int(self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS)

    def stop_list(self) -> Optional[List[str]]:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _format_validation_error(e: ValidationError) -> str:
    out = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith(
            ("list[", "function-", "union[", "tagged-union[")))
        out.append(f"{loc or 'body'}: {err.get('msg')}")
    more = len(e.errors()) - 3
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def parse_chat_request(body: Dict[str, Any], limits: Optional[H.ServeLimits] = None
                       ) -> ChatCompletionRequest:
    """Validate an OpenAI chat-completions body (schema + semantics, no image decoding).

    Raises ``H.HTTPError``: 422 for schema/semantic errors, 413 for texts over
    ``limits.max_text_chars`` or more than ``limits.max_images`` images."""
    limits = limits or H.ServeLimits()
    if not isinstance(body, dict):
        raise H.unprocessable("the request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise H.unprocessable(_format_validation_error(e)) from None
    if (req.max_tokens is not None and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens):
        raise H.unprocessable("max_tokens and max_completion_tokens disagree; give one")
    stops = req.stop_list()
    if stops is not None:
        if not stops or len(stops) > MAX_STOP:
            raise H.unprocessable(f"'stop' must hold 1 to {MAX_STOP} strings")
        if any(not s for s in stops):
            raise H.unprocessable("'stop' strings must not be empty")
    if req.temperature is not None and not math.isfinite(req.temperature):
        raise H.unprocessable("temperature must be a finite number in [0, 2]")
    n_images = 0
    for i, m in enumerate(req.messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) \
            else m.content
        if not parts or all(isinstance(p, TextPart) and not p.text.strip() for p in parts):
            raise H.unprocessable(f"messages[{i}].content must not be empty")
        for j, p in enumerate(parts):
            if isinstance(p, TextPart):
                if len(p.text) > limits.max_text_chars:
                    raise H.too_large(f"messages[{i}].content[{j}] has {len(p.text)} characters;"
                                      f" the limit is {limits.max_text_chars}")
            else:
                if m.role != "user":
                    raise H.unprocessable(f"messages[{i}]: only user messages may hold images "
                                          f"(role is {m.role!r})")
                n_images += 1
    if req.messages[-1].role != "user":
        raise H.unprocessable(f"the last message must be a 'user' message (the one to answer), "
                              f"got {req.messages[-1].role!r}")
    if n_images > limits.max_images:
        raise H.too_large(f"the request holds {n_images} images; the limit is "
                          f"{limits.max_images}")
    return req


def count_images(req: ChatCompletionRequest) -> int:
    return sum(1 for m in req.messages if not isinstance(m.content, str)
               for p in m.content if isinstance(p, ImageURLPart))


def to_payload(req: ChatCompletionRequest, decode) -> Dict[str, Any]:
    """The body handed to ``VlmServer.chat`` / ``chat_stream``: the validated fields, with every
    image part replaced by ``{"type": "image", "image": HxWx3 uint8}`` (``decode(url, where)``
    decodes one data URL / base64 string)."""
    msgs = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            msgs.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for j, p in enumerate(m.content):
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "image",
                              "image": decode(p.url, f"messages[{i}].content[{j}].image_url")})
        msgs.append({"role": m.role, "content": parts})
    out = {"messages": msgs, "max_tokens": req.new_tokens(), "stream": req.stream,
           "include_usage": bool(req.stream_options and req.stream_options.include_usage)}
    for k in ("model", "temperature", "top_p", "seed"):
        v = getattr(req, k)
        if v is not None:
            out[k] = v
    if req.stop is not None:
        out["stop"] = req.stop_list()
    return out


def decode_image_url(url: str, where: str, limits: H.ServeLimits) -> np.ndarray:
    """An ``image_url`` (data URL or bare base64) -> ``H x W x 3`` uint8 (``H.HTTPError`` 400 /
    413 otherwise; remote http(s) URLs are refused: the server fetches nothing)."""
    if url[:8].lower().startswith(("http://", "https://")):
        raise H.bad_request(f"{where}: remote image URLs are not fetched; send the image as a "
                            "data URL (data:image/png;base64,...) or bare base64",
                            "invalid_image")
    return H.decode_image(url, where, limits)


def _decode_in_replica(url: str, where: str) -> np.ndarray:
    try:
        return decode_image_url(url, where, H.ServeLimits())
    except H.HTTPError as e:
        raise VlmServeError(e.message, e.status, e.type) from None


def normalize_body(body: Dict[str, Any]) -> Dict[str, Any]:
    """``VlmServer.chat``'s input: either what the ingress sends (images already decoded) or a
    raw OpenAI body from a handle caller (validated and decoded here)."""
    if not isinstance(body, dict):
        raise VlmServeError("the chat body must be a dict", 422)
    if "include_usage" in body:  # already normalised by the ingress
        return body
    try:
        req = parse_chat_request(body)
    except H.HTTPError as e:
        raise VlmServeError(e.message, e.status, e.type) from None
    return to_payload(req, _decode_in_replica)


# ============================================================================== SSE / responses
def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (compact JSON, no newlines inside)."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _points_json(points) -> List[Dict[str, float]]:
    return [{"x": float(x), "y": float(y)} for x, y in points]


def _extras(res: "Final") -> Dict[str, Any]:
    if res.points is None and res.count is None:
        return {}
    return {"points": _points_json(res.points or []), "count": res.count}


def _usage(res: "Final") -> Dict[str, int]:
    return {"prompt_tokens": int(res.prompt_tokens),
            "completion_tokens": int(res.completion_tokens),
            "total_tokens": int(res.prompt_tokens) + int(res.completion_tokens)}


def _finish(reason: str) -> str:
    # OpenAI knows "stop" | "length" | ...; a cancelled row never reaches a client.
    return reason if reason in ("stop", "length") else "stop"


def completion_response(cid: str, created: int, model: str, res: "Final") -> Dict[str, Any]:
    msg = {"role": "assistant", "content": res.text, **_extras(res)}
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": msg, "logprobs": None,
                         "finish_reason": _finish(res.finish_reason)}],
            "usage": _usage(res)}


def chunk(cid: str, created: int, model: str, delta: Dict[str, Any],
          finish_reason: Optional[str] = None) -> Dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


# ============================================================================== batching
@dataclass
class Final:
    """The end of one request in a batch (``VlmResult`` as plain data)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    points: Optional[List[Tuple[float, float]]] = None
    count: Optional[int] = None

    @classmethod
    def of(cls, r: Any) -> "Final":
        pts = getattr(r, "points", None)
        return cls(text=str(r.text), finish_reason=str(r.finish_reason),
                   prompt_tokens=int(r.prompt_tokens), completion_tokens=int(r.completion_tokens),
                   points=None if pts is None else [(float(x), float(y)) for x, y in pts],
                   count=None if getattr(r, "count", None) is None else int(r.count))


class _Slot:
    """One request's place in a batch: the facade request and whether its caller went away
    (set on the caller's side, read by the batch loop between decode steps)."""

    __slots__ = ("req", "cancelled")

    def __init__(self, req: Any) -> None:
        self.req, self.cancelled = req, False


_EMPTY = object()  # a decode step produced no text for this row (held back or multi-byte)
_END = object()


class _Stats:
    """Counters of one replica (``info()["batching"]``)."""

    def __init__(self) -> None:
        self.batches = self.requests = self.max_batch = 0
        self.hist: Counter = Counter()
        self.completed = self.cancelled = self.failed = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.active_rows = self.active_runs = self.max_active_rows = 0
        self.decode_steps = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests,
                "max_batch": self.max_batch,
                "mean_batch": self.requests / self.batches if self.batches else 0.0,
                "batch_hist": {str(k): v for k, v in sorted(self.hist.items())},
                "completed": self.completed, "cancelled": self.cancelled, "failed": self.failed,
                "active_rows": self.active_rows, "active_runs": self.active_runs,
                "max_active_rows": self.max_active_rows, "decode_steps": self.decode_steps,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


def _replica() -> Optional[str]:
    try:
        ctx = serve.get_replica_context()
        return ctx.replica_tag if hasattr(ctx, "replica_tag") else str(ctx.replica_id)
    except Exception:
        return None


def _load_vlm(model: str, backend: str, load_kwargs: Dict[str, Any], fallback: bool):
    """``fmrt.load(model, backend)``; falls back to torch (with a warning; ``info()["backend"]``
    says which one runs) when the backend has no VLM path (``BackendUnavailableError``), or on
    any load error when the backend was not chosen explicitly (``fallback``). ``fmrt serve``
    defaults to onnxruntime for every bundled model: a VLM without ONNX graphs is still served
    rather than failing the whole app."""
    from fmrt.runtime import BackendUnavailableError, load

    try:
        return load(model, backend=backend, **load_kwargs)
    except Exception as e:
        if backend == "torch" or not (fallback or isinstance(e, BackendUnavailableError)):
            raise
        logger.warning("VLM %s: backend %s unavailable (%s: %s); serving it with torch",
                       model, backend, type(e).__name__, e)
        kw = {k: v for k, v in load_kwargs.items() if k in ("device", "tokenizer")}
        return load(model, backend="torch", **kw)


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})
class VlmServer:
    """One vision-language model (``fmrt.load(model) -> VlmModel``) with batched generation.

    Handle methods: ``chat(body) -> chat.completion dict``; ``chat_stream(body)`` -> async
    generator of ``chat.completion.chunk`` dicts; ``answer(images, prompt, max_new_tokens=32)
    -> str``; ``point(image, phrase) -> {"text", "points": [(x, y)], "count"}``; ``info()``
    (its ``batching`` counters are cumulative: compare two readings), ``ping()``. ``body`` is
    an OpenAI chat-completions dict (image parts as data URLs / base64, or ``{"type": "image",
    "image": ndarray}``)."""

    def __init__(self, model: str, backend: str = "torch", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.05,
                 num_threads: Optional[int] = None, load_kwargs: Optional[Dict[str, Any]] = None,
                 served_name: Optional[str] = None, backend_fallback: bool = False) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(int(num_threads))
        self.model = model
        self.name = served_name or model
        self.vlm = _load_vlm(model, backend, dict(load_kwargs or {}), backend_fallback)
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self._batched.set_max_batch_size(self.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s)
        # Set while no generation run is active. serve.batch forms a batch as soon as its
        # queue has requests (whatever the model is doing), so a request arriving during a run
        # would start a batch of its own, queued behind the run: with 8 closed-loop streams that
        # meant a mean batch of 1.4. Requests instead wait here until the model is free, then
        # enter serve.batch's queue together and form one batch.
        self._idle = asyncio.Event()
        self._idle.set()
        self._active_runs = 0
        # Model calls (prefill, each decode step, point) run on one thread off the event loop:
        # the replica keeps accepting, queueing and cancelling requests while a step computes;
        # a single thread because torch already uses every intra-op thread per step.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fmrt-vlm")
        self.stats = _Stats()
        self._started = time.time()

    # ----------------------------------------------------------------- requests
    def _request(self, *, images=None, prompt=None, messages=None, max_new_tokens=64,
                 temperature=0.0, top_p=1.0, stop=None, seed=None):
        from fmrt.runtime.vlm import VlmRequest, VlmRequestError

        n_images = len(images or []) + sum(
            1 for m in (messages or []) if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") in ("image",
                                                                               "image_url"))
        cap = int(getattr(self.vlm, "max_images", n_images))
        if n_images > cap:
            raise VlmServeError(f"the request holds {n_images} images; {self.name} accepts at "
                                f"most {cap}", 413, "too_many_images")
        images = [im if im.flags.writeable else im.copy() for im in (images or [])]
        if messages:  # arrays that came through Ray's object store are read-only views
            messages = [dict(m, content=[dict(p, image=p["image"].copy())
                                         if p.get("type") == "image"
                                         and isinstance(p.get("image"), np.ndarray)
                                         and not p["image"].flags.writeable else p
                                         for p in m["content"]])
                        if isinstance(m.get("content"), list) else m for m in messages]
        try:
            req = VlmRequest(images=images, prompt=prompt, messages=messages,
                             max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                             top_p=float(top_p), stop=stop, seed=seed)
            self.vlm.validate(req)
        except VlmRequestError as e:
            raise request_error(e) from None
        return req

    def _chat_request(self, body: Dict[str, Any]):
        p = normalize_body(body)
        return self._request(messages=p["messages"], max_new_tokens=p["max_tokens"],
                             temperature=p.get("temperature", 0.0), top_p=p.get("top_p", 1.0),
                             stop=p.get("stop"), seed=p.get("seed")), p

    # ----------------------------------------------------------------- batched generation
    async def _events(self, req) -> AsyncIterator[Any]:
        """This request's text pieces (str) then its ``Final``, from a shared batch run. When
        the consumer stops early (closed / cancelled), the slot is marked cancelled and the
        batch loop frees the row before its next decode step."""
        slot = _Slot(req)
        while self._active_runs > 0:
            await self._idle.wait()
        gen = self._batched(slot)
        finished = False
        try:
            async for item in gen:
                if item is _EMPTY:
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, Final):
                    finished = True
                yield item
        finally:
            if not finished:
                slot.cancelled = True
            await gen.aclose()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, slots: List[_Slot]):
        """One ``VlmBatchRun`` for the batch. Yields per decode step one entry per slot: a text
        piece, ``_EMPTY``, the slot's ``Final`` (once), an exception (once), or ``StopIteration``
        (that caller is done)."""
        n = len(slots)
        loop = asyncio.get_running_loop()
        st = self.stats
        self._active_runs += 1
        st.active_runs += 1
        self._idle.clear()
        agen = self._run_batch(slots, n, loop, st)
        try:
            async for out in agen:
                yield out
        finally:
            await agen.aclose()
            st.active_runs -= 1
            self._active_runs -= 1
            if self._active_runs == 0:
                self._idle.set()

    async def _run_batch(self, slots: List[_Slot], n: int, loop, st: "_Stats"):
        st.batches += 1
        st.requests += n
        st.max_batch = max(st.max_batch, n)
        st.hist[n] += 1
        out: List[Any] = [_EMPTY] * n
        done = [False] * n  # a Final / exception / StopIteration was sent
        rows: List[int] = []  # batch index of each run row
        errors: Dict[int, BaseException] = {}
        for i, s in enumerate(slots):
            if s.cancelled:
                done[i] = True
                st.cancelled += 1
            else:
                rows.append(i)
        run = None
        if rows:
            try:
                run = await loop.run_in_executor(self._pool, self.vlm.start_batch,
                                                 [slots[i].req for i in rows])
            except Exception as e:  # noqa: BLE001
                if len(rows) == 1:
                    errors[rows[0]] = e
                    rows = []
                else:  # find the culprit(s) so one bad request cannot fail the batch
                    logger.warning("VLM batch of %d failed to start (%s); retrying without "
                                   "the requests that fail alone", len(rows), e)
                    ok = []
                    for i in rows:
                        try:
                            self.vlm.validate(slots[i].req)
                            ok.append(i)
                        except Exception as e1:  # noqa: BLE001
                            errors[i] = e1
                    rows = ok
                    try:
                        run = await loop.run_in_executor(
                            self._pool, self.vlm.start_batch, [slots[i].req for i in rows]
                        ) if rows else None
                    except Exception as e2:  # noqa: BLE001
                        for i in rows:
                            errors[i] = e2
                        rows = []
        st.failed += len(errors)
        sent_cancel = [False] * len(rows)
        row_done = [False] * len(rows)
        st.active_rows += len(rows)
        st.max_active_rows = max(st.max_active_rows, st.active_rows)
        try:
            if errors:
                out = [StopIteration if done[i] else errors.get(i, _EMPTY) for i in range(n)]
                for i in errors:
                    done[i] = True
                yield out
            if run is not None:
                it = iter(run)
                while True:
                    for j, i in enumerate(rows):
                        if slots[i].cancelled and not row_done[j] and not sent_cancel[j]:
                            run.cancel(j)  # between steps: the run is not computing now
                            sent_cancel[j] = True
                    pieces = await loop.run_in_executor(self._pool, next, it, _END)
                    if pieces is _END:
                        break
                    st.decode_steps += 1
                    out = [StopIteration if done[i] else _EMPTY for i in range(n)]
                    for j, i in enumerate(rows):
                        p = pieces[j]
                        if row_done[j]:
                            continue
                        if p is None:
                            row_done[j] = True
                            st.active_rows -= 1
                            fin = self._final(run, j)
                            if fin is not None and not sent_cancel[j]:
                                self._record(fin)
                                out[i] = fin
                                done[i] = True
                        elif p and not sent_cancel[j]:
                            out[i] = p
                    yield out
                # rows whose result was not readable mid-run (or that never reported None)
                out = [StopIteration] * n
                for j, i in enumerate(rows):
                    if not row_done[j]:
                        row_done[j] = True
                        st.active_rows -= 1
                    if not done[i]:
                        if sent_cancel[j] or slots[i].cancelled:
                            done[i] = True
                            continue
                        fin = self._final(run, j)
                        if fin is None:
                            out[i] = VlmServeError("the model returned no result", 500,
                                                   "internal_error")
                        else:
                            self._record(fin)
                            out[i] = fin
                        done[i] = True
                if any(o is not StopIteration for o in out):
                    yield out
        finally:
            for j, i in enumerate(rows):
                if sent_cancel[j] or (slots[i].cancelled and not done[i]):
                    st.cancelled += 1
                if not row_done[j]:
                    st.active_rows -= 1
                    if run is not None and not sent_cancel[j]:
                        try:  # the batch itself was abandoned (replica shutting down)
                            run.cancel(j)
                        except Exception:  # noqa: BLE001
                            pass

    @staticmethod
    def _final(run, j: int) -> Optional[Final]:
        try:
            r = run.results[j]
        except Exception:  # results may only be readable once the whole run ends
            return None
        if r is None or getattr(r, "finish_reason", None) is None:
            return None
        return Final.of(r)

    def _record(self, fin: Final) -> None:
        self.stats.completed += 1
        self.stats.prompt_tokens += fin.prompt_tokens
        self.stats.completion_tokens += fin.completion_tokens

    async def _complete(self, req) -> Final:
        async for ev in self._events(req):
            if isinstance(ev, Final):
                return ev
        raise VlmServeError("the generation ended without a result", 500, "internal_error")

    # ----------------------------------------------------------------- handle API
    async def chat(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """OpenAI ``chat.completion`` dict for one chat-completions body (see class doc)."""
        req, p = self._chat_request(body)
        fin = await self._complete(req)
        return completion_response(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()),
                                   p.get("model") or self.name, fin)

    async def chat_stream(self, body: Dict[str, Any]):
        """Async generator of ``chat.completion.chunk`` dicts: the role chunk first (yielded
        right after validation, so a caller that awaits it learns about bad requests before
        committing to a stream), text deltas, the finishing chunk (``finish_reason``; pointing
        results on its delta), and with ``include_usage`` a usage chunk."""
        req, p = self._chat_request(body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = p.get("model") or self.name
        yield chunk(cid, created, model, {"role": "assistant", "content": ""})
        async for ev in self._events(req):
            if isinstance(ev, Final):
                yield chunk(cid, created, model, _extras(ev), _finish(ev.finish_reason))
                if p.get("include_usage"):
                    c = chunk(cid, created, model, {})
                    c["choices"] = []
                    c["usage"] = _usage(ev)
                    yield c
                return
            yield chunk(cid, created, model, {"content": ev})

    async def answer(self, images: List[np.ndarray], prompt: str, max_new_tokens: int = 32
                     ) -> str:
        """Greedy answer text for ``prompt`` about ``images`` (list of HxWx3 uint8), batched
        with concurrent requests."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise VlmServeError("prompt must be a non-empty string", 422)
        req = self._request(images=list(images or []), prompt=prompt,
                            max_new_tokens=int(max_new_tokens))
        return (await self._complete(req)).text

    async def point(self, image: np.ndarray, phrase: str) -> Dict[str, Any]:
        """``vlm.point``: ``{"text", "points": [(x, y)] in pixels of image, "count"}``."""
        from fmrt.runtime.vlm import VlmRequestError

        if not isinstance(phrase, str) or not phrase.strip():
            raise VlmServeError("phrase must be a non-empty string", 422)
        if not isinstance(image, np.ndarray):
            raise VlmServeError("image must be an HxWx3 uint8 array", 422)
        img = image if image.flags.writeable else image.copy()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self.vlm.point, img, phrase)
        except VlmRequestError as e:
            raise request_error(e) from None

    def info(self) -> Dict[str, Any]:
        return {"model": self.model, "name": self.name,
                "family": getattr(self.vlm, "family", None),
                "backend": getattr(self.vlm, "backend", None),
                "max_images": getattr(self.vlm, "max_images", None),
                "context_length": getattr(self.vlm, "context_length", None),
                "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "batching": self.stats.to_dict(),
                "uptime_s": round(time.time() - self._started, 3), "replica": _replica()}

    def ping(self) -> bool:
        return True


# ============================================================================== routes
@register_family_routes
class VlmRoutes(FamilyRoutes):
    """``POST /v1/chat/completions`` and ``GET /v1/vlm/stats``; ``handles``: served name ->
    ``VlmServer`` handle."""

    family = "vlm"
    prefix = "/v1"

    def __init__(self, handles, *, limits, timeout_s) -> None:
        super().__init__(handles, limits=limits, timeout_s=timeout_s)
        self._meta: Dict[str, Dict[str, Any]] = {}

    def routes(self) -> List[Route]:
        return [Route("POST", f"{self.prefix}/chat/completions", self.chat_completions),
                Route("GET", f"{self.prefix}/vlm/stats", self.stats)]

    map_exception = staticmethod(map_vlm_exception)

    async def _model_meta(self, name: str, handle) -> Dict[str, Any]:
        """``max_images`` / ``context_length`` of a served model (asked once, then cached), so
        the ingress refuses too many images before decoding any."""
        m = self._meta.get(name)
        if m is None:
            info = await self.call(handle.info.remote())
            m = self._meta[name] = {"max_images": info.get("max_images"),
                                    "context_length": info.get("context_length")}
        return m

    async def chat_completions(self, request):
        body = await self.body(request)
        name, handle = self.select(body)
        req = parse_chat_request(body, self.limits)
        meta = await self._model_meta(name, handle)
        n_images = count_images(req)
        cap = meta.get("max_images")
        if cap is not None and n_images > int(cap):
            raise H.HTTPError(413, f"the request holds {n_images} images; {name} accepts at "
                                   f"most {cap}", "too_many_images")
        payload = await asyncio.to_thread(
            to_payload, req, lambda url, where: decode_image_url(url, where, self.limits))
        payload["model"] = name
        if not req.stream:
            out = await self.call(handle.chat.remote(payload))
            return H.json_response(out)
        gen = handle.options(stream=True).chat_stream.remote(payload)
        # The first chunk comes right after the replica validated the request: await it here so
        # that a bad request still gets its 4xx status instead of a 200 stream with an error.
        try:
            first = await self.call(_anext(gen))
        except BaseException:
            gen.cancel()
            raise
        from starlette.responses import StreamingResponse

        return StreamingResponse(self._sse(gen, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def _sse(self, gen, first: Dict[str, Any]):
        """SSE bytes of a chunk stream; errors after the headers went out are sent as an
        ``{"error": ...}`` event (what OpenAI clients raise on). When the client disconnects,
        Starlette cancels this generator and the ``finally`` cancels the replica's stream,
        which frees the request's batch row."""
        exhausted = False
        try:
            yield sse(first)
            while True:
                try:
                    c = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                except StopAsyncIteration:
                    break
                yield sse(c)
            exhausted = True
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            yield sse(H.HTTPError(504, f"no token within {self.timeout_s:g} s",
                                  "timeout").to_dict())
        except Exception as e:  # noqa: BLE001
            from fmrt.serve.app import map_exception

            err = map_vlm_exception(e) or map_exception(e)
            if err.status >= 500:
                logger.exception("VLM stream failed")
            yield sse(err.to_dict())
        finally:
            if not exhausted:
                try:
                    gen.cancel()
                except Exception:  # noqa: BLE001
                    pass

    async def _infos(self) -> Dict[str, Any]:
        names = list(self.handles)
        res = await asyncio.gather(*(self.call(self.handles[n].info.remote()) for n in names),
                                   return_exceptions=True)
        return {n: (r if not isinstance(r, BaseException) else {"error": f"{type(r).__name__}:"
                                                                          f" {r}"})
                for n, r in zip(names, res)}

    async def stats(self, request):
        return H.json_response({"object": "vlm_stats", "models": await self._infos()})

    async def list_models(self) -> List[Dict[str, Any]]:
        infos = await self._infos()
        return [{"id": n, "object": "model", "created": 0, "owned_by": "fmrt",
                 "family": infos[n].get("family") or self.family, "route_family": self.family,
                 "default": n == self.default, "info": infos[n]} for n in self.handles]


async def _anext(gen):
    return await gen.__anext__()


# ============================================================================== binder
def _bind_vlm(model: str, name: str, args: AppArgs, backend: str) -> Any:
    opts: Dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.num_gpus:
        opts["num_gpus"] = args.num_gpus
    bs = int(getattr(args, "vlm_max_batch_size", 8))
    wait = float(getattr(args, "vlm_batch_wait_timeout_s", 0.05))
    return VlmServer.options(
        name=_deployment_name("VlmServer", name), num_replicas=args.num_replicas,
        max_ongoing_requests=max(128, 8 * bs), ray_actor_options=opts,
        logging_config={"enable_access_log": args.access_log},
    ).bind(model, backend=backend, max_batch_size=bs, batch_wait_timeout_s=wait,
           num_threads=args.num_threads, load_kwargs=dict(args.load_kwargs), served_name=name,
           backend_fallback=args.backend is None)


for _family in ("llava", "flamingo"):
    FAMILY_BINDERS[_family] = _bind_vlm
    ROUTE_FAMILY[_family] = "vlm"

__all__ = ["VlmServer", "VlmRoutes", "VlmServeError", "ChatCompletionRequest",
           "parse_chat_request", "to_payload", "completion_response", "chunk", "sse", "SSE_DONE",
           "MAX_TOKENS"]
