"""Run a validated ``Program`` as a dependency graph.

Each step starts as soon as the steps it reads have finished, so independent steps (VisProg's
``Vqa(LEFT)`` / ``Vqa(RIGHT)``) run concurrently. Modules are callables behind one interface:

    def module(ctx: StepContext, **args) -> value          # run in the executor's thread pool
    async def module(ctx: StepContext, **args) -> value    # awaited on the run's event loop

so the served version plugs in Ray Serve deployment handles as async modules
(``async def Vqa(ctx, image, question): return await vlm.answer.remote(image, question)``)
while local modules (``Count``, ``Crop``, ``Eval``...) are plain functions (``builtin_modules``).

``ctx.cache`` is a per-run cache shared by every step of one run: ``get_or_compute(key, fn)``
computes each key once even when concurrent steps ask at the same time (the others wait), which
is how per-image features (a SAM image embedding, the CLIP embedding of each crop) are reused
across steps. ``ctx.image_key(img)`` gives a content key for an image.

A run has a time limit; a step that raises becomes a structured ``StepError`` (line, module,
error type, message), the steps that depend on it are ``skipped``, and the run returns
``ok=False`` with the error instead of raising. Every run returns a per-step trace: inputs,
outputs (images as PNG data URLs, object lists as boxes/scores/labels), status, start offset and
duration in milliseconds.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import hashlib
import inspect
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, Hashable, List, Mapping, Optional, Union

import numpy as np

from fmrt.chain import expr as X
from fmrt.chain.program import (ObjectList, Program, ProgramError, Ref, VType, conforms,
                                type_of)

ModuleFn = Callable[..., Union[Any, Awaitable[Any]]]

DEFAULT_TIME_LIMIT_S = 60.0
MAX_TRACE_IMAGE_SIDE = 512  # trace thumbnails: bigger images are downscaled before PNG encoding
MAX_INPUT_IMAGES = 16


class RunCache:
    """Thread-safe per-run memo: ``get_or_compute(key, fn)`` calls ``fn()`` once per key.

    Concurrent callers of the same key wait for the first one's result (or its exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futs: Dict[Hashable, cf.Future] = {}
        self.hits = self.misses = 0
        # per kind (a tuple key's first element, e.g. "sam_embedding"): [hits, misses]
        self._kinds: Dict[str, List[int]] = {}

    def _count(self, key: Hashable, hit: bool) -> None:
        kind = key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else None
        if kind is not None:
            self._kinds.setdefault(kind, [0, 0])[0 if hit else 1] += 1

    def _claim(self, key: Hashable) -> "tuple[cf.Future, bool]":
        """The future for ``key`` and whether this caller must compute it (first to ask)."""
        with self._lock:
            fut = self._futs.get(key)
            if fut is not None:
                self.hits += 1
                self._count(key, True)
                return fut, False
            fut = self._futs[key] = cf.Future()
            self.misses += 1
            self._count(key, False)
            return fut, True

    def get_or_compute(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        fut, owner = self._claim(key)
        if owner:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
        return fut.result()

    async def aget_or_compute(self, key: Hashable, fn: Callable[[], Awaitable[Any]]) -> Any:
        """The same for async modules (``fn`` returns an awaitable)."""
        fut, owner = self._claim(key)
        if owner:
            try:
                fut.set_result(await fn())
            except BaseException as e:
                fut.set_exception(e)
        return await asyncio.wrap_future(fut)

    async def aget_or_compute_many(self, keys: List[Hashable],
                                   fn: Callable[[List[int]], Awaitable[List[Any]]]) -> List[Any]:
        """Values for ``keys``; the ones nobody has asked for yet are computed by ONE call
        ``await fn(indices into keys)`` returning their values in that order (a batched encoder
        call for the crops not seen before), the others are awaited."""
        claims = [self._claim(k) for k in keys]
        own = [i for i, (_, owner) in enumerate(claims) if owner]
        if own:
            try:
                vals = list(await fn(own))
                if len(vals) != len(own):
                    raise RuntimeError(f"batch computed {len(vals)} values for {len(own)} keys")
                for i, v in zip(own, vals):
                    claims[i][0].set_result(v)
            except BaseException as e:
                for i in own:
                    if not claims[i][0].done():
                        claims[i][0].set_exception(e)
        return [await asyncio.wrap_future(f) for f, _ in claims]

    def stats(self) -> Dict[str, Any]:
        """``hits``/``misses``/``entries`` plus ``by_kind``: ``{kind: {"hits", "misses"}}``
        for tuple keys (a miss is one computation of that feature in this run)."""
        with self._lock:
            kinds = {k: {"hits": v[0], "misses": v[1]} for k, v in sorted(self._kinds.items())}
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._futs),
                "by_kind": kinds}


class NoReuseCache(RunCache):
    """A ``RunCache`` that never reuses: every request computes (the no-feature-reuse baseline
    of ``benchmarks/bench_chain.py``); stats count every computation as a miss."""

    def _claim(self, key: Hashable) -> "tuple[cf.Future, bool]":
        with self._lock:
            self.misses += 1
            self._count(key, False)
            return cf.Future(), True


def image_key(img: np.ndarray) -> str:
    """A content key for an image (16-byte BLAKE2b of shape + pixels; ~0.1 ms at 256^2)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((img.shape, str(img.dtype))).encode())
    h.update(np.ascontiguousarray(img).data)
    return h.hexdigest()


@dataclass
class StepContext:
    """What a module sees besides its arguments."""

    step: str
    line: int
    module: str
    cache: RunCache
    deadline: float  # time.monotonic() deadline of the run
    services: Mapping[str, Any] = field(default_factory=dict)  # e.g. text generator, handles

    def image_key(self, img: np.ndarray) -> str:
        return image_key(img)

    @property
    def time_left_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass
class StepError:
    step: str
    line: int
    module: str
    type: str
    message: str

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "line": self.line, "module": self.module, "type": self.type,
                "message": self.message}


@dataclass
class StepTrace:
    step: str
    line: int
    module: str
    status: str = "pending"  # ok | error | skipped | timeout | pending
    inputs: Dict[str, Any] = field(default_factory=dict)
    output: Any = None
    output_type: str = ""
    start_ms: float = 0.0
    time_ms: float = 0.0
    error: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "line": self.line, "module": self.module,
                "status": self.status, "inputs": self.inputs, "output": self.output,
                "output_type": self.output_type, "start_ms": round(self.start_ms, 3),
                "time_ms": round(self.time_ms, 3), "error": self.error}


@dataclass
class RunResult:
    ok: bool
    result: Any
    result_type: str
    trace: List[StepTrace]
    error: Optional[StepError]
    time_ms: float
    cache: Dict[str, int]
    values: Dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self, include_values: bool = False) -> Dict[str, Any]:
        return {"ok": self.ok, "result": summarize(self.result) if self.ok else None,
                "result_type": self.result_type,
                "error": self.error.to_dict() if self.error else None,
                "time_ms": round(self.time_ms, 3), "cache": self.cache,
                "trace": [t.to_dict() for t in self.trace]}


# ---------------------------------------------------------------------------------- summaries
def png_data_url(img: np.ndarray, max_side: int = MAX_TRACE_IMAGE_SIDE) -> str:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def summarize(v: Any, images: bool = True) -> Any:
    """JSON-able summary of a program value for traces and responses."""
    t = type_of(v)
    if t is VType.IMAGE:
        d = {"type": "Image", "shape": list(v.shape)}
        if images:
            d["png"] = png_data_url(v)
        return d
    if t is VType.OBJECTS:
        return {"type": "ObjectList", "count": len(v), "boxes": v.boxes.round(2).tolist(),
                "scores": [round(float(s), 4) for s in v.scores], "labels": list(v.labels),
                "has_masks": v.masks is not None}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


# ---------------------------------------------------------------------------------- executor
class Executor:
    """Runs programs with ``modules`` (name -> callable). ``max_concurrency`` bounds steps in
    flight; ``time_limit_s`` bounds a run; ``sequential=True`` runs one step at a time in
    topological order (the baseline for the dependency-graph benchmark)."""

    def __init__(self, modules: Mapping[str, ModuleFn], *, max_concurrency: int = 8,
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S, trace_images: bool = True,
                 services: Optional[Mapping[str, Any]] = None, sequential: bool = False,
                 max_input_images: int = MAX_INPUT_IMAGES) -> None:
        self.modules = dict(modules)
        self.max_concurrency = max(1, int(max_concurrency))
        self.time_limit_s = float(time_limit_s)
        self.trace_images = trace_images
        self.services = dict(services or {})
        self.sequential = sequential
        self.max_input_images = max_input_images
        self._pool = cf.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="fmrt-chain")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- entry points
    def run(self, program: Program, inputs: Mapping[str, Any], *,
            time_limit_s: Optional[float] = None, cache: Optional[RunCache] = None) -> RunResult:
        """Synchronous ``run_async`` (from a thread when an event loop is already running)."""
        coro = self.run_async(program, inputs, time_limit_s=time_limit_s, cache=cache)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with cf.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, coro).result()

    async def run_async(self, program: Program, inputs: Mapping[str, Any], *,
                        time_limit_s: Optional[float] = None,
                        cache: Optional[RunCache] = None) -> RunResult:
        self._check_inputs(program, inputs)
        limit = self.time_limit_s if time_limit_s is None else float(time_limit_s)
        t0 = time.monotonic()
        deadline = t0 + limit
        cache = cache if cache is not None else RunCache()
        by_target = program.by_target
        traces = {st.target: StepTrace(st.target, st.line, st.module) for st in program.steps}
        values: Dict[str, Any] = dict(inputs)
        done: Dict[str, asyncio.Future] = {}
        loop = asyncio.get_running_loop()
        for st in program.steps:
            done[st.target] = loop.create_future()
        sem = asyncio.Semaphore(1 if self.sequential else self.max_concurrency)
        first_error: List[StepError] = []

        async def run_step(name: str) -> None:
            st = by_target[name]
            tr = traces[name]
            try:
                for d in st.deps:
                    if d in done:
                        ok = await done[d]
                        if not ok:
                            tr.status = "skipped"
                            tr.error = {"type": "DependencyFailed",
                                        "message": f"input {d!r} did not complete"}
                            done[name].set_result(False)
                            return
                async with sem:
                    kwargs = {k: self._resolve(v, values) for k, v in st.args.items()}
                    # Inputs name their source variable; only outputs carry PNGs (each image
                    # is encoded once, by the step that produced it).
                    tr.inputs = {k: self._summ(v, images=False, ref=st.args[k])
                                 for k, v in kwargs.items()}
                    ctx = StepContext(name, st.line, st.module, cache, deadline, self.services)
                    tr.start_ms = (time.monotonic() - t0) * 1e3
                    s0 = time.perf_counter()
                    try:
                        out = await self._call(st.module, ctx, kwargs, loop)
                        out = self._check_output(st, out)
                    finally:
                        tr.time_ms = (time.perf_counter() - s0) * 1e3
                values[name] = out
                tr.status, tr.output = "ok", self._summ(out)
                tr.output_type = str(type_of(out) or "")
                done[name].set_result(True)
            except asyncio.CancelledError:
                tr.status = "timeout"
                if not done[name].done():
                    done[name].set_result(False)
                raise
            except Exception as e:  # a module failure is data, not a crash
                err = StepError(name, st.line, st.module, type(e).__name__,
                                _message(e))
                tr.status, tr.error = "error", err.to_dict()
                first_error.append(err)
                if not done[name].done():
                    done[name].set_result(False)

        order = program.order or [st.target for st in program.steps]
        if self.sequential:
            async def all_steps():
                for n in order:
                    await run_step(n)
        else:
            async def all_steps():
                await asyncio.gather(*(run_step(n) for n in order))
        timed_out = False
        try:
            await asyncio.wait_for(all_steps(), timeout=max(limit, 1e-3))
        except asyncio.TimeoutError:
            timed_out = True
        elapsed = (time.monotonic() - t0) * 1e3
        err: Optional[StepError] = first_error[0] if first_error else None
        if timed_out:
            for tr in traces.values():
                if tr.status == "pending":
                    tr.status = "timeout"
            running = [tr for tr in traces.values() if tr.status == "timeout"]
            st = by_target[running[0].step] if running else program.steps[0]
            err = err or StepError(st.target, st.line, st.module, "TimeLimitExceeded",
                                   f"the run exceeded its time limit of {limit:g} s")
        ok = err is None and program.result in values
        result = values.get(program.result) if ok else None
        return RunResult(ok=ok, result=result,
                         result_type=str(type_of(result) or program.result_type) if ok else "",
                         trace=[traces[st.target] for st in program.steps], error=err,
                         time_ms=elapsed, cache=cache.stats(), values=values)

    # ----------------------------------------------------------------- helpers
    def _check_inputs(self, program: Program, inputs: Mapping[str, Any]) -> None:
        missing = [k for k in program.inputs if k not in inputs]
        if missing:
            raise ProgramError(f"missing program inputs {missing}")
        n_images = sum(1 for k in program.inputs if program.inputs[k] is VType.IMAGE)
        if n_images > self.max_input_images:
            raise ProgramError(f"{n_images} input images; the limit is {self.max_input_images}")
        for k, t in program.inputs.items():
            if not conforms(inputs[k], t):
                raise ProgramError(f"input {k!r} must be {t}, got {type(inputs[k]).__name__}"
                                   + (f" {getattr(inputs[k], 'shape', '')}"
                                      if isinstance(inputs[k], np.ndarray) else ""))
        missing_mods = sorted({st.module for st in program.steps} - set(self.modules))
        if missing_mods:
            raise ProgramError(f"no implementation for module(s) {missing_mods}")

    @staticmethod
    def _resolve(v: Any, values: Mapping[str, Any]) -> Any:
        if isinstance(v, Ref):
            return values[v.name]
        if isinstance(v, X.Expr):
            return _BoundExpr(v, {n: values[n] for n in v.names})
        return v

    def _summ(self, v: Any, images: bool = True, ref: Any = None) -> Any:
        if isinstance(v, _BoundExpr):
            return {"expr": v.expr.source, "vars": {k: summarize(x, False)
                                                    for k, x in v.env.items()}}
        out = summarize(v, images=images and self.trace_images)
        if isinstance(ref, Ref):
            out = {"ref": ref.name, "value": out}
        return out

    async def _call(self, module: str, ctx: StepContext, kwargs: Dict[str, Any],
                    loop: asyncio.AbstractEventLoop) -> Any:
        fn = self.modules[module]
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                getattr(fn, "__call__", None)):
            return await fn(ctx, **kwargs)
        out = await loop.run_in_executor(self._pool, lambda: fn(ctx, **kwargs))
        if inspect.isawaitable(out):  # e.g. a handle's DeploymentResponse
            out = await out
        return out

    @staticmethod
    def _check_output(st, out: Any) -> Any:
        if isinstance(out, tuple):
            out = list(out)
        if isinstance(out, np.generic):
            out = out.item()
        if type_of(out) is None:
            raise TypeError(f"{st.module} returned a {type(out).__name__}, not a program value")
        want = st.output
        if want not in (VType.ANY, VType.SCALAR) and not conforms(out, want):
            raise TypeError(f"{st.module} returned {type_of(out)}, its signature says {want}")
        return out


class _BoundExpr:
    """An Eval argument: the expression with its variables' values."""

    def __init__(self, expr: X.Expr, env: Dict[str, Any]) -> None:
        self.expr, self.env = expr, env

    def eval(self) -> Any:
        return self.expr.eval(self.env)


def _message(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:2000]


# ---------------------------------------------------------------------------------- local modules
def _eval(ctx, expr: _BoundExpr):
    return expr.eval()


def _count(ctx, object: ObjectList):
    return len(object)


def _result(ctx, var):
    return var


def _union_box(image: np.ndarray, obj: ObjectList):
    h, w = image.shape[:2]
    if len(obj) == 0:
        return None
    x0, y0 = obj.boxes[:, 0].min(), obj.boxes[:, 1].min()
    x1, y1 = obj.boxes[:, 2].max(), obj.boxes[:, 3].max()
    return (int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h)),
            int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h)))


def _crop_to(image: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop region {box}")
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def _crop(ctx, image: np.ndarray, object: ObjectList):
    box = _union_box(image, object)
    return image.copy() if box is None else _crop_to(image, box)


def _directional(side: str):
    def crop(ctx, image: np.ndarray, object: ObjectList):
        h, w = image.shape[:2]
        box = _union_box(image, object)
        if box is None:
            return image.copy()
        x0, y0, x1, y1 = box
        region = {"left": (0, 0, x0, h), "right": (x1, 0, w, h), "above": (0, 0, w, y0),
                  "below": (0, y1, w, h)}[side]
        return _crop_to(image, region)
    crop.__name__ = f"crop_{side}"
    return crop


def _object_mask(image: np.ndarray, obj: ObjectList) -> np.ndarray:
    h, w = image.shape[:2]
    m = np.zeros((h, w), bool)
    if obj.masks is not None and obj.masks.shape[1:] == (h, w):
        return obj.masks.any(axis=0) if len(obj) else m
    for x0, y0, x1, y1 in obj.boxes:
        m[max(0, int(y0)):min(h, int(np.ceil(y1))), max(0, int(x0)):min(w, int(np.ceil(x1)))] = True
    return m


def _color_pop(ctx, image: np.ndarray, object: ObjectList):
    gray = (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    gray = np.repeat(gray[..., None], 3, axis=2).round().clip(0, 255).astype(np.uint8)
    m = _object_mask(image, object)[..., None]
    return np.where(m, image, gray)


def _bg_blur(ctx, image: np.ndarray, object: ObjectList):
    from PIL import Image, ImageFilter

    radius = max(1.0, min(image.shape[:2]) / 64)
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    m = _object_mask(image, object)[..., None]
    return np.where(m, image, blurred)


def _tag(ctx, image: np.ndarray, object: ObjectList):
    from PIL import Image, ImageDraw

    im = Image.fromarray(image.copy())
    d = ImageDraw.Draw(im)
    for (x0, y0, x1, y1), lab in zip(object.boxes.tolist(), object.labels):
        d.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 0), width=1)
        if lab:
            d.text((x0 + 1, max(0, y0 - 10)), lab[:40], fill=(255, 0, 0))
    return np.asarray(im)


def builtin_modules() -> Dict[str, ModuleFn]:
    """The modules that need no model: Eval, Count, Result, Crop (+ directional), ColorPop,
    BgBlur, Tag. Model-backed ones (Loc, Seg, Select, Classify, Vqa, List) come from the
    caller."""
    return {"Eval": _eval, "Count": _count, "Result": _result, "Crop": _crop,
            "CropLeftOf": _directional("left"), "CropRightOf": _directional("right"),
            "CropAbove": _directional("above"), "CropBelow": _directional("below"),
            "ColorPop": _color_pop, "BgBlur": _bg_blur, "Tag": _tag}


__all__ = ["Executor", "RunCache", "NoReuseCache", "RunResult", "StepContext", "StepError",
           "StepTrace", "builtin_modules", "image_key", "png_data_url", "summarize"]
