"""Segment Anything over Ray Serve: an encoder and a decoder deployment plus the HTTP routes.

    Ingress (HTTP parsing, image decoding)  -- SamRoutes
      └── SamDecoder[model]   (@serve.batch: concurrent prompts grouped per image, one decode each)
            └── SamEncoder[model]   (image encoder + embedding cache, automatic masks)

The two stages scale independently (``num_replicas`` each); the decoder gets the encoder's
handle in its constructor. The encoder keeps image embeddings in an LRU cache bounded in bytes
(``AppArgs.sam_cache_bytes``), keyed by the SHA-256 of the decoded pixels and shape (the
``image_id``), so a client sends an image once and then many prompts. With several encoder
replicas each holds its own cache (an id embedded on one replica is unknown to another: run one
encoder replica, or pin by sending the image).

Routes (JSON; errors are ``{"error": {"message", "type", "code"}}``):

* ``POST /v1/sam/embed``  ``{"model"?, "image": b64}`` -> ``{"image_id", "width", "height",
  "cached": bool}``
* ``POST /v1/sam/predict``  ``{"model"?, "image_id" | "image", "points"?: [[x, y], ...],
  "labels"?: [0|1, ...], "box"?: [x0, y0, x1, y1], "multimask_output"?: true,
  "return_lowres"?: false}`` (points and/or box; pixel coordinates of the original image)
  -> ``{"image_id", "width", "height", "masks": [{"size": [H, W], "counts": str}],
  "scores": [float], "lowres"?: [[[float]]], "batch": {"size"}}``; ``batch.size`` is
  how many prompts were decoded in the same decoder call as this one (debug).
* ``POST /v1/sam/auto``  ``{"model"?, "image", "points_per_side"?, "points_per_batch"?,
  "pred_iou_thresh"?, "stability_score_thresh"?, "box_nms_thresh"?, "crop_n_layers"?,
  "min_mask_region_area"?}`` -> ``{"width", "height", "masks": [{"segmentation": COCO RLE,
  "bbox": [x, y, w, h], "area", "predicted_iou", "stability_score", "point_coords",
  "crop_box"}]}``
* ``GET /v1/sam/stats`` -> per model: encoder cache and decoder batch statistics (prompts per
  model call, encoder lookups, ms per request waiting / decoding / RLE-encoding); ``ingress``:
  ms per predict request parsing, awaiting the decoder, building the response.

The decoder keeps copies of the embeddings it has used and asks the encoder at most every
``REVALIDATE_S`` (0.5 s) per image id whether it still holds them, so an evicted id answers 404
within that time; the model thread decodes every queued prompt of one kind per call.

4xx: unknown / evicted ``image_id`` 404; coordinates outside the image, bad labels, points and
labels of different lengths, malformed prompts 422; undecodable images 400; images over the
size limits 413.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from ray import serve

from fmrt.serve import http as H
from fmrt.serve.app import (FAMILY_BINDERS, AppArgs, FamilyRoutes, Route, _deployment_name,
                            _unwrap, register_family_routes)

logger = logging.getLogger("fmrt.serve")

MAX_POINTS = 64  # points per prompt (SAM was trained with at most ~10 correction clicks)
# /v1/sam/auto parameter bounds: (lo, hi). points_per_side 64 = 4096 prompts per crop layer,
# ~8 s per image for shapes-sam on one CPU core; more would hold a replica for minutes.
AUTO_INT_PARAMS = {"points_per_side": (1, 64), "points_per_batch": (1, 256),
                   "crop_n_layers": (0, 2), "min_mask_region_area": (0, 1 << 20)}
AUTO_FLOAT_PARAMS = {"pred_iou_thresh": (0.0, 1.0), "stability_score_thresh": (0.0, 1.0),
                     "box_nms_thresh": (0.0, 1.0)}
AUTO_DEFAULTS = {"points_per_side": 16, "points_per_batch": 64}


# ============================================================================== errors
# Plain one-argument exceptions: they cross Ray's process boundary by pickling, which re-calls
# ``cls(*args)``; SamRoutes turns them into HTTP errors.
class SamServeError(ValueError):
    """A bad SAM request detected inside a replica (-> 422)."""


class ImageIdNotFoundError(SamServeError, KeyError):
    """An ``image_id`` that was never embedded or has been evicted (-> 404)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ============================================================================== cache
class EmbeddingCache:
    """LRU of ``SamImageState`` by image id, bounded by the embeddings' bytes (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._d: "OrderedDict[str, Any]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Any:
        with self._lock:
            st = self._d.get(key)
            if st is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return st

    def put(self, key: str, state: Any) -> None:
        n = int(state.nbytes)
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return
            if n > self.max_bytes:  # would evict everything and still not fit
                return
            self._d[key] = state
            self._bytes += n
            while self._bytes > self.max_bytes:
                _, old = self._d.popitem(last=False)
                self._bytes -= int(old.nbytes)
                self.evictions += 1

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._d

    def to_dict(self) -> Dict[str, Any]:
        with self._lock:
            return {"entries": len(self._d), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def _not_found_message(key: str) -> str:
    return (f"unknown or evicted image_id {key!r}: POST the image to /v1/sam/embed again (or "
            "send it inline as 'image')")


def image_id(img: np.ndarray) -> str:
    """Content hash of decoded pixels: SHA-256 of the bytes and the shape."""
    h = hashlib.sha256(np.ascontiguousarray(img).tobytes())
    h.update(str(tuple(img.shape)).encode())
    return h.hexdigest()


def _load_predictor(model: str, backend: str, num_threads: Optional[int],
                    load_kwargs: Optional[Dict[str, Any]]):
    from fmrt.runtime.sam import SamPredictor

    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))
    # embedding_cache=0: the deployment's byte-bounded cache replaces the predictor's own.
    return SamPredictor.load(model, backend=backend, embedding_cache=0, **(load_kwargs or {}))


def _replica() -> Optional[str]:
    try:
        ctx = serve.get_replica_context()
        return ctx.replica_tag if hasattr(ctx, "replica_tag") else str(ctx.replica_id)
    except Exception:
        return None


# ============================================================================== encoder
@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class SamEncoder:
    """The image encoder, the embedding cache and the automatic mask generator."""

    def __init__(self, model: str, backend: str = "torch", cache_bytes: int = 256 << 20,
                 num_threads: Optional[int] = None,
                 load_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.model = model
        self.predictor = _load_predictor(model, backend, num_threads, load_kwargs)
        self.cache = EmbeddingCache(cache_bytes)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fmrt-sam-enc")
        self._inflight: Dict[str, "asyncio.Future"] = {}
        self.encoder_runs = 0
        self.auto_runs = 0

    def _encode(self, img: np.ndarray, key: str):
        from fmrt.runtime.sam import SamImageState

        st = self.predictor.encode_image(img)
        self.encoder_runs += 1
        return SamImageState(st.embedding, st.original_size, st.input_size, key)

    async def embed_state(self, image: np.ndarray) -> Tuple[Any, bool]:
        """``H x W x 3`` uint8 -> (``SamImageState`` with ``key`` = image id, was cached).
        Concurrent requests for the same new image share one encoder run."""
        from fmrt.preprocess import InvalidImageError, check_image

        try:
            img = check_image(image)
        except InvalidImageError as e:
            raise SamServeError(str(e)) from None
        key = image_id(img)
        st = self.cache.get(key)
        if st is not None:
            return st, True
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut), True
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._encode,
                                   img if img.flags.writeable else img.copy(), key)
        self._inflight[key] = fut
        try:
            st = await fut
        finally:
            self._inflight.pop(key, None)
        self.cache.put(key, st)
        return st, False

    async def embed(self, image: np.ndarray) -> Dict[str, Any]:
        st, cached = await self.embed_state(image)
        h, w = st.original_size
        return {"image_id": st.key, "width": int(w), "height": int(h), "cached": cached}

    def get_state(self, key: str) -> Any:
        st = self.cache.get(key)
        if st is None:
            raise ImageIdNotFoundError(_not_found_message(key))
        return st

    async def lookup(self, fetch: List[str], check: List[str]) -> Dict[str, Any]:
        """One call per decoder batch: ``fetch`` -> the ``SamImageState``, ``check`` (ids whose
        state the caller already holds) -> ``True``; an unknown or evicted id ->
        ``ImageIdNotFoundError`` (returned, not raised). Async so that it runs on the replica's
        event loop (a plain method would take a thread-pool hop per call)."""
        out: Dict[str, Any] = {}
        for k, want in [(k, True) for k in fetch] + [(k, False) for k in check]:
            st = self.cache.get(k)
            out[k] = (ImageIdNotFoundError(_not_found_message(k)) if st is None
                      else st if want else True)
        return out

    async def auto(self, image: np.ndarray, params: Dict[str, Any]) -> Dict[str, Any]:
        from fmrt.preprocess import InvalidImageError, check_image
        from fmrt.runtime.sam_amg import SamAutomaticMaskGenerator

        try:
            img = check_image(image)
        except InvalidImageError as e:
            raise SamServeError(str(e)) from None
        img = img if img.flags.writeable else img.copy()
        try:
            gen = SamAutomaticMaskGenerator(self.predictor, output_mode="coco_rle",
                                            **{**AUTO_DEFAULTS, **params})
        except ValueError as e:
            raise SamServeError(str(e)) from None
        loop = asyncio.get_running_loop()
        recs = await loop.run_in_executor(self._pool, gen.generate, img)
        self.auto_runs += 1
        return {"width": int(img.shape[1]), "height": int(img.shape[0]), "masks": recs}

    def info(self) -> Dict[str, Any]:
        return {**self.predictor.info(), "model": self.model, "cache": self.cache.to_dict(),
                "encoder_runs": self.encoder_runs, "auto_runs": self.auto_runs,
                "replica": _replica()}

    def ping(self) -> bool:
        return True


# ============================================================================== decoder
# A decoder batch used to fetch its image's embedding from the encoder on every batch: one handle
# round trip plus the state through the object store (128 KB for shapes-sam, 4 MB for sam_vit_b)
# and a copy, 3-7 ms of encoder CPU per request at 2-3 prompts per batch on the 2-core box. The
# decoder now keeps copies of the states it has used (LRU, the encoder cache's byte budget) and
# asks the encoder only whether they are still cached (ids only), at most every REVALIDATE_S per
# id: an image id the encoder evicts keeps decoding here for at most that long, then gets 404.
REVALIDATE_S = 0.5


class _StateCopies:
    """Decoder-side LRU of ``SamImageState`` copies (writable embeddings) with the monotonic
    time the encoder last confirmed each id. Used from the replica's event loop only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._d: "OrderedDict[str, List[Any]]" = OrderedDict()  # key -> [state, confirmed_at]
        self._bytes = 0

    def get(self, key: str) -> Optional[List[Any]]:
        e = self._d.get(key)
        if e is not None:
            self._d.move_to_end(key)
        return e

    def put(self, st: Any, confirmed_at: float) -> Any:
        """Keep ``st`` (copied if read-only: object-store arrays are read-only views and torch
        wants writable memory); returns the kept state."""
        if not st.embedding.flags.writeable:
            from fmrt.runtime.sam import SamImageState

            st = SamImageState(st.embedding.copy(), st.original_size, st.input_size, st.key)
        n = int(st.nbytes)
        if n > self.max_bytes or not st.key:
            return st
        self.drop(st.key)
        self._d[st.key] = [st, confirmed_at]
        self._bytes += n
        while self._bytes > self.max_bytes:
            _, (old, _) = self._d.popitem(last=False)
            self._bytes -= int(old.nbytes)
        return st

    def drop(self, key: str) -> None:
        e = self._d.pop(key, None)
        if e is not None:
            self._bytes -= int(e[0].nbytes)

    def to_dict(self) -> Dict[str, Any]:
        return {"entries": len(self._d), "bytes": self._bytes, "max_bytes": self.max_bytes}


class _DecodeStats:
    """Batch sizes and where a request's decoder time goes (seconds summed over requests;
    ``to_dict`` reports means per request in ms)."""

    def __init__(self) -> None:
        self.batches = self.requests = self.decodes = self.lookups = 0
        self.max_requests = self.max_group = 0
        self.group_hist: Counter = Counter()
        self.t = {"lookup": 0.0, "queue": 0.0, "decode": 0.0, "encode": 0.0}

    def record(self, n_requests: int, groups: List[int]) -> None:
        self.batches += 1
        self.requests += n_requests
        self.decodes += len(groups)
        self.max_requests = max(self.max_requests, n_requests)
        for g in groups:
            self.max_group = max(self.max_group, g)
            self.group_hist[g] += 1

    def to_dict(self) -> Dict[str, Any]:
        n = max(self.requests, 1)
        return {"batches": self.batches, "requests": self.requests, "decodes": self.decodes,
                "max_requests": self.max_requests, "max_group": self.max_group,
                "mean_group": self.requests / self.decodes if self.decodes else 0.0,
                "group_hist": {str(k): v for k, v in sorted(self.group_hist.items())},
                "encoder_lookups": self.lookups,
                # per request: its batch's encoder lookup, waiting for the model, the model
                # call of its group, RLE + response dicts of its group (group-shared times are
                # counted once per request that waited for them)
                "ms_per_request": {k: round(v * 1e3 / n, 3) for k, v in self.t.items()}}


def _check_prompt(prompt: Dict[str, Any], size: Tuple[int, int]) -> None:
    """Coordinates inside the image: x in [0, W], y in [0, H] (pixel edges inclusive)."""
    h, w = size
    pts = prompt.get("points")
    if pts is not None:
        p = np.asarray(pts, np.float64)
        bad = np.flatnonzero((p[:, 0] < 0) | (p[:, 0] > w) | (p[:, 1] < 0) | (p[:, 1] > h))
        if bad.size:
            i = int(bad[0])
            raise SamServeError(f"points[{i}] = {pts[i]} lies outside the {w}x{h} image "
                                f"(x in [0, {w}], y in [0, {h}])")
    box = prompt.get("box")
    if box is not None:
        x0, y0, x1, y1 = box
        if min(x0, y0) < 0 or x1 > w or y1 > h:
            raise SamServeError(f"box {box} lies outside the {w}x{h} image")


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class SamDecoder:
    """Prompt encoder + mask decoder. ``predict`` requests are queued on a ``@serve.batch``
    method, which resolves each batch's embeddings once and queues its prompts for the model by
    (image id, prompt shape, multimask); the model thread decodes every queued prompt of one
    kind (up to ``max_batch_size``) in one ``SamPredictor.predict_batch`` call against that
    image's embedding. ``max_batch_size=1`` is batching off: one prompt per model call."""

    def __init__(self, encoder: Any, model: str, backend: str = "torch",
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
                 num_threads: Optional[int] = None,
                 load_kwargs: Optional[Dict[str, Any]] = None,
                 state_cache_bytes: int = 256 << 20,
                 revalidate_s: float = REVALIDATE_S) -> None:
        self.encoder = encoder
        self.model = model
        self.predictor = _load_predictor(model, backend, num_threads, load_kwargs)
        self.states = _StateCopies(state_cache_bytes)
        self.revalidate_s = float(revalidate_s)
        self.configure(max_batch_size, batch_wait_timeout_s)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fmrt-sam-dec")
        self.stats = _DecodeStats()
        # (image key, point count, has box, multimask) -> [(state, prompt, t_enq, future)]
        self._pending: "OrderedDict[Tuple, List[Tuple]]" = OrderedDict()
        self._drainer: Optional["asyncio.Task"] = None

    def configure(self, max_batch_size: Optional[int] = None,
                  batch_wait_timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """Change this replica's batching at run time (benchmarks alternate batching on and off
        on one deployment instead of redeploying); returns the settings now in force."""
        if max_batch_size is not None:
            if isinstance(max_batch_size, bool) or int(max_batch_size) < 1:
                raise SamServeError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
            self.max_batch_size = int(max_batch_size)
            self._decode_batch.set_max_batch_size(self.max_batch_size)
        if batch_wait_timeout_s is not None:
            if not 0.0 <= float(batch_wait_timeout_s) <= 10.0:
                raise SamServeError(f"batch_wait_timeout_s must be in [0, 10], got "
                                    f"{batch_wait_timeout_s!r}")
            self.batch_wait_timeout_s = float(batch_wait_timeout_s)
            self._decode_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)
        return {"max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    async def predict(self, prompt: Dict[str, Any], image_id: Optional[str] = None,
                      image: Optional[np.ndarray] = None) -> Dict[str, Any]:
        """``prompt``: ``{"points"?: [[x, y]], "labels"?: [int], "box"?: [4],
        "multimask_output": bool, "return_lowres": bool}`` (shape-checked by the ingress)."""
        if image is not None:
            st, _ = await self.encoder.embed_state.remote(image)
            ref: Any = self.states.put(st, time.monotonic())
        else:
            ref = image_id
        res = await self._decode_batch((ref, prompt, time.perf_counter()))
        if isinstance(res, BaseException):
            raise res
        return res

    async def _states_for(self, ids: List[str]) -> Dict[str, Any]:
        """id -> ``SamImageState`` or ``ImageIdNotFoundError``: local copies, confirmed by the
        encoder at most every ``revalidate_s``; at most one encoder call."""
        now = time.monotonic()
        out: Dict[str, Any] = {}
        fetch, check = [], []
        for k in ids:
            e = self.states.get(k)
            if e is None:
                fetch.append(k)
            else:
                out[k] = e[0]
                if now - e[1] > self.revalidate_s:
                    check.append(k)
        if not fetch and not check:
            return out
        self.stats.lookups += 1
        try:
            got = await self.encoder.lookup.remote(fetch, check)
        except Exception as e:  # encoder unavailable: fail these ids, not the replica
            got = {k: _unwrap(e) for k in fetch + check}
        for k, v in got.items():
            if isinstance(v, BaseException):
                self.states.drop(k)
                out[k] = v
            elif v is True:
                e = self.states.get(k)  # None if a concurrent batch's put evicted it meanwhile
                if e is not None:
                    e[1] = now
            else:
                out[k] = self.states.put(v, now)
        return out

    # Ray Serve forms a batch as soon as batch_wait_timeout_s passes after its first request,
    # whether or not the model is free (ray/serve/batching.py, _process_batches), and with
    # max_concurrent_batches=1 the next batches wait behind the running one already formed. With
    # a 10 ms wait and a 30 ms decode that left 2-3 prompts per decode while ~20 requests queued
    # (shapes-sam, 32 HTTP clients, 2 cores). So batches run concurrently up to their lookups and
    # hand their prompts to ``_enqueue``; the one model thread then takes every queued prompt of
    # a kind (up to max_batch_size) each time it frees: batches sized by the backlog.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _decode_batch(self, items: List[Tuple[Any, Dict[str, Any], float]]) -> List[Any]:
        """``items``: (image id or ``SamImageState``, prompt, enqueue time). Embeddings come
        from the local copies (``_states_for``: at most one encoder call per batch), prompts
        are range-checked and queued for the model by (image, point count, box, multimask).
        Returns one response dict or exception per item."""
        t0 = time.perf_counter()
        results: List[Any] = [None] * len(items)
        states = await self._states_for(sorted({r for r, _, _ in items if isinstance(r, str)}))
        self.stats.t["lookup"] += (time.perf_counter() - t0) * len(items)
        futs: Dict[int, "asyncio.Future"] = {}
        for i, (ref, p, t_enq) in enumerate(items):
            st = states[ref] if isinstance(ref, str) else ref
            if isinstance(st, BaseException):
                results[i] = st
                continue
            try:
                _check_prompt(p, st.original_size)
            except SamServeError as e:
                results[i] = e
                continue
            pts = p.get("points")
            sig = (st.key or id(st), 0 if pts is None else len(pts), p.get("box") is not None,
                   bool(p.get("multimask_output", True)))
            futs[i] = self._enqueue(sig, st, p, t_enq)
        if futs:
            done = await asyncio.gather(*futs.values(), return_exceptions=True)
            for i, r in zip(futs, done):
                results[i] = r
        return results

    def _enqueue(self, sig: Tuple, st: Any, prompt: Dict[str, Any],
                 t_enq: float) -> "asyncio.Future":
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.setdefault(sig, []).append((st, prompt, t_enq, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        """The model loop: while prompts are queued, decode up to ``max_batch_size`` of the
        oldest kind in one ``predict_batch`` call (off the event loop)."""
        loop = asyncio.get_running_loop()
        while self._pending:
            sig = next(iter(self._pending))
            entries = self._pending[sig]
            take, rest = entries[:self.max_batch_size], entries[self.max_batch_size:]
            if rest:
                self._pending[sig] = rest  # stays first: the oldest kind goes again next
            else:
                del self._pending[sig]
            t0 = time.perf_counter()
            st_ = self.stats
            st_.record(len(take), [len(take)])
            for e in take:
                st_.t["queue"] += t0 - e[2]
            try:
                res, t_dec, t_enc = await loop.run_in_executor(
                    self._pool, self._decode_group, [(e[0], e[1]) for e in take])
                st_.t["decode"] += t_dec * len(take)
                st_.t["encode"] += t_enc * len(take)
            except Exception as e:  # one bad group must not fail the others
                res = [e] * len(take)
            for e, r in zip(take, res):
                if not e[3].done():
                    (e[3].set_exception(r) if isinstance(r, BaseException)
                     else e[3].set_result(r))

    def _decode_group(self, group: List[Tuple[Any, Dict[str, Any]]]
                      ) -> Tuple[List[Any], float, float]:
        """-> (response dicts, model seconds, RLE + response seconds)."""
        from fmrt.kernels import mask_to_rle
        from fmrt.runtime.sam import SamInputError

        t0 = time.perf_counter()
        st = group[0][0]
        prompts = [p for _, p in group]
        coords = labels = boxes = None
        if prompts[0].get("points") is not None:
            coords = np.asarray([p["points"] for p in prompts], np.float64)
            labels = np.asarray([p["labels"] for p in prompts], np.float32)
        if prompts[0].get("box") is not None:
            boxes = np.asarray([p["box"] for p in prompts], np.float64)
        try:
            masks, scores, low = self.predictor.predict_batch(
                coords, labels, boxes, multimask_output=bool(prompts[0].get(
                    "multimask_output", True)), image_state=st)
        except SamInputError as e:
            raise SamServeError(str(e)) from None
        t1 = time.perf_counter()
        n, c = masks.shape[:2]
        h, w = st.original_size
        # RLE in calls of ~256K pixels: one call per 64x64 shapes-sam group (per-call overhead),
        # one per prompt at 480x640 (a 42-mask call ran at 3.1 ms/mask vs 1.35 in 3-mask calls:
        # the masks fall out of cache)
        step = max(1, (1 << 18) // max(c * h * w, 1))
        rles: List[Any] = []
        for b in range(0, n, step):
            m = masks[b:b + step]
            rles.extend(mask_to_rle(m.reshape((-1,) + m.shape[2:])).to_coco())
        out = []
        for b in range(n):
            r = {"image_id": st.key, "width": int(w), "height": int(h),
                 "masks": rles[b * c:(b + 1) * c],
                 "scores": scores[b].astype(np.float64).tolist(), "batch": {"size": n}}
            if prompts[b].get("return_lowres"):
                r["lowres"] = np.round(low[b].astype(np.float64), 5).tolist()
            out.append(r)
        return out, t1 - t0, time.perf_counter() - t1

    def info(self) -> Dict[str, Any]:
        return {**self.predictor.info(), "model": self.model,
                "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "batching": self.stats.to_dict(), "state_copies": self.states.to_dict(),
                "replica": _replica()}

    def reset_stats(self) -> None:
        self.stats = _DecodeStats()

    def ping(self) -> bool:
        return True


# ============================================================================== routes
def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise H.unprocessable(f"{where} must be a finite number, got {v!r}")
    return float(v)


def parse_prompt(body: Dict[str, Any]) -> Dict[str, Any]:
    """The prompt fields of a predict body, shape-checked (coordinates are range-checked by the
    decoder once the image size is known)."""
    prompt: Dict[str, Any] = {}
    pts, labels, box = body.get("points"), body.get("labels"), body.get("box")
    if pts is None and labels is None and box is None:
        raise H.unprocessable("give 'points' + 'labels' and/or 'box'")
    if (pts is None) != (labels is None):
        raise H.unprocessable("'points' and 'labels' must be given together")
    if pts is not None:
        if not isinstance(pts, list) or not pts:
            raise H.unprocessable("'points' must be a non-empty list of [x, y]")
        if len(pts) > MAX_POINTS:
            raise H.unprocessable(f"'points' has {len(pts)} points; the limit is {MAX_POINTS}")
        for i, p in enumerate(pts):
            if not isinstance(p, list) or len(p) != 2:
                raise H.unprocessable(f"points[{i}] must be [x, y], got {p!r}")
        prompt["points"] = [[_num(p[0], f"points[{i}][0]"), _num(p[1], f"points[{i}][1]")]
                            for i, p in enumerate(pts)]
        if not isinstance(labels, list):
            raise H.unprocessable("'labels' must be a list of 0 (negative) / 1 (positive)")
        if len(labels) != len(pts):
            raise H.unprocessable(f"'labels' has {len(labels)} entries but 'points' has "
                                  f"{len(pts)}; give one label per point")
        for i, lab in enumerate(labels):
            if isinstance(lab, bool) or lab not in (0, 1):
                raise H.unprocessable(f"labels[{i}] = {lab!r}: labels must be 0 (negative) "
                                      "or 1 (positive)")
        prompt["labels"] = [int(lab) for lab in labels]
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise H.unprocessable("'box' must be [x0, y0, x1, y1]")
        b = [_num(v, f"box[{i}]") for i, v in enumerate(box)]
        if b[2] < b[0] or b[3] < b[1]:
            raise H.unprocessable(f"'box' {box} must have x0 <= x1 and y0 <= y1")
        prompt["box"] = b
    for k in ("multimask_output", "return_lowres"):
        v = body.get(k)
        if v is not None and not isinstance(v, bool):
            raise H.unprocessable(f"field {k!r} must be a boolean")
    prompt["multimask_output"] = body.get("multimask_output", True) is not False
    prompt["return_lowres"] = bool(body.get("return_lowres", False))
    return prompt


def parse_auto_params(body: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, (lo, hi) in AUTO_INT_PARAMS.items():
        v = H.get_int(body, k, lo=lo, hi=hi)
        if v is not None:
            out[k] = v
    for k, (lo, hi) in AUTO_FLOAT_PARAMS.items():
        if body.get(k) is not None:
            v = _num(body[k], k)
            if not lo <= v <= hi:
                raise H.unprocessable(f"field {k!r} must be in [{lo}, {hi}], got {v}")
            out[k] = v
    return out


def map_sam_exception(e: BaseException) -> Optional[H.HTTPError]:
    cause = _unwrap(e)
    msg = str(cause).strip().splitlines()[0][:2000] if str(cause).strip() else ""
    if isinstance(cause, ImageIdNotFoundError):
        return H.not_found(msg or "unknown image_id", "image_not_found")
    if isinstance(cause, SamServeError):
        return H.unprocessable(msg or "invalid SAM request")
    return None


class _IngressTiming:
    """Where a successful ``/v1/sam/predict`` spends its time in this ingress replica: body
    read + JSON parse + validation, awaiting the decoder handle (hop + decoder queue + decode +
    RLE + the reply's trip back), building the JSON response."""

    def __init__(self) -> None:
        self.requests = 0
        self.parse = self.wait = self.respond = 0.0

    def add(self, parse: float, wait: float, respond: float) -> None:
        self.requests += 1
        self.parse += parse
        self.wait += wait
        self.respond += respond

    def to_dict(self) -> Dict[str, Any]:
        n = max(self.requests, 1)
        return {"requests": self.requests,
                "ms_per_request": {"parse": round(self.parse * 1e3 / n, 3),
                                   "decoder_call": round(self.wait * 1e3 / n, 3),
                                   "respond": round(self.respond * 1e3 / n, 3)}}


@register_family_routes
class SamRoutes(FamilyRoutes):
    """``handles``: served name -> ``{"encoder": SamEncoder handle, "decoder": SamDecoder
    handle}`` (what ``_bind_sam`` binds)."""

    family = "sam"
    prefix = "/v1/sam"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timing = _IngressTiming()

    def routes(self) -> List[Route]:
        p = self.prefix
        return [Route("POST", f"{p}/embed", self.embed),
                Route("POST", f"{p}/predict", self.predict),
                Route("POST", f"{p}/auto", self.auto),
                Route("GET", f"{p}/stats", self.stats)]

    map_exception = staticmethod(map_sam_exception)

    async def _image(self, body, key: str = "image") -> np.ndarray:
        s = body.get(key)
        if not isinstance(s, str):
            raise H.unprocessable(f"field {key!r} must be a base64 or data URL string")
        return await asyncio.to_thread(H.decode_image, s, key, self.limits)

    async def embed(self, request):
        body = await self.body(request)
        H.check_keys(body, ["model", "image"])
        name, hs = self.select(body)
        if body.get("image") is None:
            raise H.unprocessable("missing required field 'image'")
        img = await self._image(body)
        out = await self.call(hs["encoder"].embed.remote(img))
        return H.json_response({"model": name, **out})

    async def predict(self, request):
        t0 = time.perf_counter()
        body = await self.body(request)
        H.check_keys(body, ["model", "image_id", "image", "points", "labels", "box",
                            "multimask_output", "return_lowres"])
        name, hs = self.select(body)
        iid = H.get_str(body, "image_id")
        if (iid is None) == (body.get("image") is None):
            raise H.unprocessable("give exactly one of 'image_id' or 'image'")
        prompt = parse_prompt(body)
        img = await self._image(body) if iid is None else None
        t1 = time.perf_counter()
        out = await self.call(hs["decoder"].predict.remote(prompt, image_id=iid, image=img))
        t2 = time.perf_counter()
        resp = H.json_response({"model": name, **out})
        self._timing.add(t1 - t0, t2 - t1, time.perf_counter() - t2)
        return resp

    async def auto(self, request):
        body = await self.body(request)
        allowed = ["model", "image", *AUTO_INT_PARAMS, *AUTO_FLOAT_PARAMS]
        H.check_keys(body, allowed)
        name, hs = self.select(body)
        if body.get("image") is None:
            raise H.unprocessable("missing required field 'image'")
        params = parse_auto_params(body)
        img = await self._image(body)
        out = await self.call(hs["encoder"].auto.remote(img, params))
        return H.json_response({"model": name, **out})

    async def _infos(self):
        names = list(self.handles)
        enc = await asyncio.gather(*(self.call(self.handles[n]["encoder"].info.remote())
                                     for n in names), return_exceptions=True)
        dec = await asyncio.gather(*(self.call(self.handles[n]["decoder"].info.remote())
                                     for n in names), return_exceptions=True)
        out = {}
        for n, e, d in zip(names, enc, dec):
            out[n] = {"encoder": e if not isinstance(e, BaseException) else {"error": str(e)},
                      "decoder": d if not isinstance(d, BaseException) else {"error": str(d)}}
        return out

    async def stats(self, request):
        return H.json_response({"object": "sam_stats", "models": await self._infos(),
                                "ingress": {"predict": self._timing.to_dict(),
                                            "replica": _replica()}})

    async def list_models(self) -> List[Dict[str, Any]]:
        infos = await self._infos()
        return [{"id": n, "object": "model", "owned_by": "fmrt", "family": self.family,
                 "default": n == self.default, "info": infos[n]} for n in self.handles]

    async def check_health(self) -> Dict[str, str]:
        names = list(self.handles)
        res = await asyncio.gather(
            *(self.call(self.handles[n][k].ping.remote()) for n in names
              for k in ("encoder", "decoder")), return_exceptions=True)
        out = {}
        for i, n in enumerate(names):
            a, b = res[2 * i], res[2 * i + 1]
            bad = [r for r in (a, b) if r is not True]
            out[n] = "ok" if not bad else f"{type(bad[0]).__name__}: {bad[0]}"
        return out


# ============================================================================== binder
# Ray Serve runs a replica's user code on a second event loop in its own thread and the handle
# router on a third; every request then crosses threads (and the GIL) twice more. Both SAM stages
# never block their loop (model calls run in a one-thread executor), so they run user code and
# router on the replica's main loop (Ray's throughput settings). Measured on the 2-core box
# (shapes-sam, 32 HTTP clients, CPU per request): decoder replica 14-18 -> 8-10 ms, and
# 38-43 -> 64-78 req/s with batching on. (The same setting on the shared Ingress gained nothing.)
SERVE_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                     "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def _bind_sam(model: str, name: str, args: AppArgs, backend: str) -> Dict[str, Any]:
    """Bound ``SamEncoder`` + ``SamDecoder`` (given the encoder's handle) for one model; the
    ingress gets both handles as ``{"encoder", "decoder"}``."""
    opts: Dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.num_gpus:
        opts["num_gpus"] = args.num_gpus
    opts["runtime_env"] = {"env_vars": dict(SERVE_REPLICA_ENV)}
    log = {"enable_access_log": args.access_log}
    enc = SamEncoder.options(
        name=_deployment_name("SamEncoder", name), num_replicas=args.num_replicas,
        ray_actor_options=dict(opts), logging_config=log,
    ).bind(model, backend=backend, cache_bytes=args.sam_cache_bytes,
           num_threads=args.num_threads, load_kwargs=dict(args.load_kwargs))
    dec = SamDecoder.options(
        name=_deployment_name("SamDecoder", name), num_replicas=args.num_replicas,
        max_ongoing_requests=max(256, 4 * args.max_batch_size), ray_actor_options=dict(opts),
        logging_config=log,
    ).bind(enc, model, backend=backend, max_batch_size=args.max_batch_size,
           batch_wait_timeout_s=args.batch_wait_timeout_s, num_threads=args.num_threads,
           load_kwargs=dict(args.load_kwargs), state_cache_bytes=args.sam_cache_bytes)
    return {"encoder": enc, "decoder": dec}


FAMILY_BINDERS["sam"] = _bind_sam

__all__ = ["SamEncoder", "SamDecoder", "SamRoutes", "EmbeddingCache", "ImageIdNotFoundError",
           "SamServeError", "image_id", "parse_prompt", "parse_auto_params"]
