"""Ray Serve application: one deployment per independently scaled stage, composed by handles.

    Ingress (HTTP, request parsing/validation, image decoding)
      └── ClipEncoder[model]  (one deployment per CLIP-family model; dynamic batching)

``build_app(AppArgs(...))`` binds one ``ClipEncoder`` per model and an ``Ingress`` holding a
``{family: {model name: handle}}`` table. The ingress owns a route table assembled from per-family
``FamilyRoutes`` classes (``FAMILY_ROUTES``) plus the shared ``GET /v1/models`` and
``GET /healthz``; a later family (SAM, VLMs, chains) registers its own deployment binder in
``FAMILY_BINDERS`` and its routes class with ``@register_family_routes`` and is served by the
same ingress.

CLIP routes (JSON in, JSON out; errors are ``{"error": {"message", "type", "code"}}``):

* ``POST /v1/embeddings``  ``{"model"?, "input": str | [str]}`` or ``{"model"?, "images": [b64]}``
  -> ``{"object": "list", "model", "input_type", "dim", "data": [{"object": "embedding",
  "index", "embedding": [float]}]}``
* ``POST /v1/classify``  ``{"model"?, "images": [b64], "labels": [str], "templates"?: [str],
  "top_k"?: int}`` -> ``{"model", "labels", "data": [{"index", "probs": [float, label order],
  "predictions": [{"label", "index", "prob"}, sorted by prob]}]}``; with ``"labelset": name``
  (and ``"labelset_version"?``) instead of labels/templates, the stored class embeddings are used
  (no label encoding) and the response adds ``"labelset": {"name", "version"}``
* ``POST /v1/labelsets``  ``{"name", "model"?, "classes", "mode"?, "templates"?,
  "descriptions"? | "description_source"?: "shapesworld"}`` -> 201 label-set metadata
  (``fmrt.chain.labelsets``)
* ``POST /v1/rank``  ``{"model"?, "query": str | "query_image": b64, "candidates": [str] |
  "images": [b64], "top_k"?: int}`` -> ``{"model", "query_type", "candidate_type",
  "scores": [float, input order], "data": [{"index", "score", "text"?}, sorted by score]}``

Images are base64 strings or ``data:image/...;base64,`` URLs (see ``fmrt.serve.http``).
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import (Any, Awaitable, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple,
                    Type)

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application

from fmrt.serve import http as H

logger = logging.getLogger("fmrt.serve")


# ============================================================================== defaults
def default_backend() -> str:
    """``"onnxruntime"`` when both onnxruntime and fmrt's ONNX Runtime backend import, else
    ``"torch"``."""
    try:
        if (importlib.util.find_spec("onnxruntime") is not None
                and importlib.util.find_spec("fmrt.runtime.onnxruntime_backend") is not None):
            return "onnxruntime"
    except (ImportError, ValueError):
        pass
    return "torch"


def model_family(name_or_path: str) -> str:
    from fmrt import pretrained

    cfg = pretrained.read_config(name_or_path)
    if cfg.get("family") is None and cfg.get("model_type") == "llava":
        return "llava"  # a Hugging Face LlavaForConditionalGeneration directory
    return str(cfg.get("family"))


# model family (fmrt.pretrained config) -> the route family that serves it. CoCa is a CLIP with a
# caption decoder: ``ClipRuntime`` drives both, so CoCa models get the CLIP routes.
ROUTE_FAMILY: Dict[str, str] = {"clip": "clip", "coca": "clip", "sam": "sam",
                                "llava": "vlm", "flamingo": "vlm"}


def default_models(family: str = "clip") -> List[str]:
    """Every bundled model (``fmrt/weights``) served by the ``family`` routes (for ``"clip"``:
    the CLIP and CoCa bundles)."""
    from fmrt import pretrained

    out = []
    for name in pretrained.list_pretrained():
        try:
            if ROUTE_FAMILY.get(model_family(name)) == family:
                out.append(name)
        except Exception:  # a half-written bundle must not break serving the others
            logger.warning("skipping unreadable bundled model %s", name)
    return out


def served_name(name_or_path: str) -> str:
    """The name clients select a model by: the bundle name or the directory's basename."""
    return os.path.basename(os.path.normpath(name_or_path))


def _deployment_name(prefix: str, model: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}"


# ============================================================================== app args
class AppArgs(BaseModel):
    """Arguments of ``build_app`` (and of the ``args:`` block of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    models: List[str] = Field(default_factory=lambda: default_models("clip") + default_models(
                              "sam") + default_models("vlm"),
                              description="bundled names or model directories; empty = every "
                              "bundled CLIP-family, SAM and VLM model; the first of each route "
                              "family is its default")
    backend: Optional[str] = Field(None, description="torch | onnxruntime | tensorrt; "
                                                     "None = onnxruntime if importable else torch")
    max_batch_size: int = Field(32, ge=1, le=4096, description="items (texts or images) per "
                                                               "encoder batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)
    num_replicas: int = Field(1, ge=1, description="replicas per encoder deployment")
    num_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved per encoder replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per encoder replica")
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per "
                                                               "encoder replica")
    ingress_replicas: int = Field(1, ge=1)
    route_prefix: str = Field("/", description="HTTP prefix of the app (used by serve.run / the "
                                               "launcher; a config file sets its own)")
    request_timeout_s: float = Field(60.0, gt=0.0, description="ingress -> encoder call timeout")
    limits: Dict[str, int] = Field(default_factory=dict, description="ServeLimits overrides")
    access_log: bool = Field(True, description="Serve's per-request access log lines")
    load_kwargs: Dict[str, Any] = Field(default_factory=dict,
                                        description="extra fmrt.load() kwargs, e.g. "
                                                    "{device: cuda} for the torch backend")
    labelset_dir: Optional[str] = Field(None, description="label-set store (fmrt.chain."
                                                          "labelsets); None = FMRT_LABELSET_DIR "
                                                          "or the cache default")
    sam_cache_bytes: int = Field(256 << 20, ge=1, description="SAM image-embedding cache budget "
                                                              "per encoder replica (LRU)")
    vlm_max_batch_size: int = Field(8, ge=1, le=256, description="requests per VLM generation "
                                                                 "batch (1 = batching off)")
    vlm_batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0, description="wait for more "
                                            "requests once the VLM is idle (a run lasts 100s "
                                            "of ms; 0.05 s took 8 streams from 4 to 6.4 per "
                                            "batch)")
    chain: Dict[str, Any] = Field(default_factory=dict, description="ProgramRunner options "
                                  "(fmrt.serve.chain.ChainOptions): enabled (auto: when CLIP "
                                  "and SAM are served), time_limit_s, max_steps, max_images, "
                                  "generator, clip/sam/vlm, pointing, amg")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v):
        if isinstance(v, str):  # `serve run fmrt.serve.app:build_app models=a,b`
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, v):
        H.ServeLimits.from_dict(v)
        return v

    @field_validator("route_prefix")
    @classmethod
    def _check_prefix(cls, v):
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return v


# ============================================================================== CLIP encoder
def _total_items(batch: List[Sequence]) -> int:
    """``serve.batch`` size of a batch: items (texts/images), not requests."""
    return sum(len(x) for x in batch)


class _BatchStats:
    """Batch sizes one replica has run (debug counters exposed through ``info()``)."""

    def __init__(self) -> None:
        self.batches = self.items = self.requests = 0
        self.max_items = self.max_requests = 0
        self.items_hist: Counter = Counter()

    def record(self, n_requests: int, n_items: int) -> None:
        self.batches += 1
        self.items += n_items
        self.requests += n_requests
        self.max_items = max(self.max_items, n_items)
        self.max_requests = max(self.max_requests, n_requests)
        self.items_hist[n_items] += 1

    def to_dict(self) -> Dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "requests": self.requests,
                "max_items": self.max_items, "max_requests": self.max_requests,
                "mean_items": self.items / self.batches if self.batches else 0.0,
                "items_hist": {str(k): v for k, v in sorted(self.items_hist.items())}}


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class ClipEncoder:
    """One CLIP-family model behind ``ClipRuntime`` with dynamic batching.

    ``embed_texts(list[str])`` / ``embed_images(list[HxWx3 uint8])`` validate their own request,
    split it into chunks of at most ``max_batch_size`` items and queue them on ``@serve.batch``
    methods that flatten the chunks of concurrent requests into one runtime call and split the
    result back. A runtime failure on a merged batch is retried request by request, so one bad
    request cannot fail the others that shared its batch.
    """

    def __init__(self, model: str, backend: str = "torch", max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, num_threads: Optional[int] = None,
                 load_kwargs: Optional[Dict[str, Any]] = None,
                 labelset_dir: Optional[str] = None) -> None:
        from fmrt.runtime import load
        from fmrt.runtime.clip import ClipRuntime

        if num_threads:
            import torch

            torch.set_num_threads(int(num_threads))
        self.model = model
        self.runtime = load(model, backend=backend, **(load_kwargs or {}))
        if not isinstance(self.runtime, ClipRuntime):
            raise TypeError(f"{model} is not a CLIP-family (clip/coca) model")
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        for fn in (self._text_batch, self._image_batch):
            fn.set_max_batch_size(self.max_batch_size)
            fn.set_batch_wait_timeout_s(self.batch_wait_timeout_s)
        # Model calls run off the event loop (one thread: batches are serialised anyway), so the
        # replica keeps accepting and queueing requests while a batch computes.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fmrt-clip")
        self._stats = {"text": _BatchStats(), "image": _BatchStats()}
        self._started = time.time()
        from fmrt.chain.labelsets import ServedLabelSets

        self.labelsets = ServedLabelSets(served_name(model), labelset_dir)

    # ----------------------------------------------------------------- validation (per request)
    def _check_texts(self, texts: Any) -> List[str]:
        from fmrt.runtime.clip import ClassifyInputError

        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ClassifyInputError("texts must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise ClassifyInputError("texts must be a non-empty list of strings")
        return list(texts)

    def _check_images(self, images: Any) -> List[np.ndarray]:
        from fmrt.preprocess import InvalidImageError, check_image

        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise InvalidImageError("images must be a non-empty list of HxWx3 uint8 arrays")
        out = [check_image(im, i) for i, im in enumerate(images)]
        # Arrays that came through Ray's object store are read-only views; torch wants to own
        # writable memory.
        return [im if im.flags.writeable else im.copy() for im in out]

    # ----------------------------------------------------------------- batched encoders
    async def embed_texts(self, texts: List[str]) -> np.ndarray:
        """``N x E`` float32, L2-normalised (dynamically batched with concurrent callers)."""
        return await self._chunked(self._text_batch, self._check_texts(texts))

    async def embed_images(self, images: List[np.ndarray]) -> np.ndarray:
        """``N x E`` float32, L2-normalised (dynamically batched with concurrent callers)."""
        return await self._chunked(self._image_batch, self._check_images(images))

    async def _chunked(self, batch_fn, items: List[Any]) -> np.ndarray:
        n = self.max_batch_size
        parts = await asyncio.gather(*(batch_fn(items[i: i + n])
                                       for i in range(0, len(items), n)))
        for p in parts:
            if isinstance(p, BaseException):
                raise p
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_total_items)
    async def _text_batch(self, requests: List[List[str]]) -> List[Any]:
        return await self._run_batch("text", self.runtime.encode_text, requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_total_items)
    async def _image_batch(self, requests: List[List[np.ndarray]]) -> List[Any]:
        return await self._run_batch("image", self.runtime.encode_image, requests)

    async def _run_batch(self, kind: str, encode: Callable, requests: List[List[Any]]
                         ) -> List[Any]:
        """Returns one ``n_i x E`` array per request, or that request's exception."""
        loop = asyncio.get_running_loop()
        flat = [x for r in requests for x in r]
        self._stats[kind].record(len(requests), len(flat))
        try:
            emb = await loop.run_in_executor(self._pool, encode, flat)
        except Exception as e:
            if len(requests) == 1:
                return [e]
            logger.warning("%s batch of %d requests failed (%s); retrying one by one", kind,
                           len(requests), e)
            out: List[Any] = []
            for r in requests:
                try:
                    out.append(await loop.run_in_executor(self._pool, encode, r))
                except Exception as e1:
                    out.append(e1)
            return out
        return np.split(emb, np.cumsum([len(r) for r in requests])[:-1], axis=0)

    # ----------------------------------------------------------------- zero-shot
    async def classify(self, images: List[np.ndarray], labels: List[str],
                       templates: Optional[List[str]] = None) -> np.ndarray:
        """Zero-shot probabilities ``N x L`` (``ClipRuntime.classify`` with batched images)."""
        loop = asyncio.get_running_loop()
        images = self._check_images(images)
        # Raises ClassifyInputError for bad labels/templates; cached per (labels, templates).
        w = await loop.run_in_executor(self._pool, self.runtime.text_classifier, labels,
                                       templates)
        emb = await self.embed_images(images)
        logits = self.runtime.logit_scale * emb @ w.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    # ----------------------------------------------------------------- label sets
    async def create_labelset(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        """``spec``: ``fmrt.chain.labelsets.parse_create_request`` output; prompts are encoded
        through the batched text encoder. Returns the label set's metadata."""
        spec = dict(spec)
        if spec.get("templates") is None and spec.get("mode") != "descriptions":
            spec["templates"] = list(self.runtime.templates)  # the model's own ensemble
        ls = await self.labelsets.create(self.embed_texts, **spec)
        return ls.meta()

    async def classify_labelset(self, images: List[np.ndarray], name: str,
                                version: Optional[int] = None) -> Tuple[np.ndarray, List[str], int]:
        """Zero-shot with stored class embeddings (no text encoding): ``(N x L probs, classes,
        version)``."""
        ls = self.labelsets.get(name, version)  # LabelSetNotFoundError / LabelSetError
        emb = await self.embed_images(self._check_images(images))
        probs = ls.classify(emb, self.labelsets.model, self.runtime.logit_scale)
        return probs.astype(np.float32), list(ls.classes), int(ls.version)

    # ----------------------------------------------------------------- captioning
    async def caption(self, images: List[np.ndarray], max_length: Optional[int] = None
                      ) -> List[str]:
        """CoCa models: greedy captions, one per image. Other models: ClassifyInputError."""
        from fmrt.runtime.clip import ClassifyInputError

        images = self._check_images(images)
        if self.runtime.family != "coca":
            raise ClassifyInputError(f"model {self.model!r} is a {self.runtime.family} model and "
                                     "cannot caption; choose a CoCa model")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.runtime.generate_caption, images,
                                          max_length)

    # ----------------------------------------------------------------- introspection
    def info(self) -> Dict[str, Any]:
        info = dict(self.runtime.info())
        info.update({
            "model": self.model, "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            # zero-shot parameters, for clients that build class embeddings (fmrt.serve.chain)
            "logit_scale": float(self.runtime.logit_scale),
            "templates": list(self.runtime.templates),
            "batching": {k: v.to_dict() for k, v in self._stats.items()},
            "uptime_s": round(time.time() - self._started, 3),
        })
        try:
            ctx = serve.get_replica_context()
            info["replica"] = ctx.replica_tag if hasattr(ctx, "replica_tag") else str(
                ctx.replica_id)
        except Exception:
            pass
        return info

    def reset_stats(self) -> None:
        self._stats = {"text": _BatchStats(), "image": _BatchStats()}

    def ping(self) -> bool:
        return True


# ============================================================================== route tables
Handler = Callable[[Any], Awaitable[Any]]  # starlette Request -> Response


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


class FamilyRoutes:
    """Routes of one model family, served by the shared ``Ingress``.

    Subclasses set ``family`` (the ``fmrt.pretrained`` family name) and ``prefix``, and implement
    ``routes()``. ``handles`` maps served model name -> deployment handle (the first is the
    default)."""

    family: ClassVar[str] = ""
    prefix: ClassVar[str] = "/v1"

    def __init__(self, handles: Dict[str, Any], *, limits: H.ServeLimits,
                 timeout_s: float) -> None:
        if not handles:
            raise ValueError(f"no {self.family} models to serve")
        self.handles = dict(handles)
        self.default = next(iter(self.handles))
        self.limits = limits
        self.timeout_s = float(timeout_s)

    def routes(self) -> List[Route]:
        raise NotImplementedError

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def map_exception(e: BaseException) -> Optional[H.HTTPError]:
        """The family's HTTP error for an exception raised in a replica (e.g. a typed request
        error -> 4xx with its message); None lets it propagate (500)."""
        return None

    #: what a 504 says did not answer in time
    upstream: ClassVar[str] = "the model"

    async def call(self, response, timeout_s: Optional[float] = None) -> Any:
        """Await a ``DeploymentResponse`` with the request timeout (``timeout_s``, default the
        app's; 504 when exceeded); replica exceptions go through ``map_exception``."""
        async def _wait():
            return await response

        t = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(_wait(), t)
        except asyncio.TimeoutError:
            try:
                response.cancel()
            except Exception:
                pass
            raise H.HTTPError(504, f"{self.upstream} did not answer within {t:g} s",
                              "timeout") from None
        except H.HTTPError:
            raise
        except Exception as e:
            err = self.map_exception(e)
            if err is None:
                raise
            raise err from None

    def select(self, body: Dict[str, Any]) -> Tuple[str, Any]:
        name = H.get_str(body, "model")
        if name is None:
            name = self.default
        if name not in self.handles:
            raise H.not_found(f"model {name!r} is not served; available: {list(self.handles)}",
                              "model_not_found")
        return name, self.handles[name]

    async def body(self, request) -> Dict[str, Any]:
        return H.parse_json_object(await H.read_body(request, self.limits))

    async def decode(self, items: List[str], key: str) -> List[np.ndarray]:
        # Pillow decoding is CPU work: keep it off the ingress event loop.
        return await asyncio.to_thread(H.decode_images, items, key, self.limits)

    async def list_models(self) -> List[Dict[str, Any]]:
        infos = await asyncio.gather(*(self.call(h.info.remote()) for h in self.handles.values()),
                                     return_exceptions=True)
        out = []
        for (name, _), info in zip(self.handles.items(), infos):
            entry = {"id": name, "object": "model", "owned_by": "fmrt", "family": self.family,
                     "default": name == self.default}
            if isinstance(info, BaseException):
                entry["error"] = f"{type(info).__name__}: {info}"
            else:
                entry["info"] = info
            out.append(entry)
        return out

    async def check_health(self) -> Dict[str, str]:
        res = await asyncio.gather(*(self.call(h.ping.remote()) for h in self.handles.values()),
                                   return_exceptions=True)
        return {name: ("ok" if r is True else f"{type(r).__name__}: {r}")
                for name, r in zip(self.handles, res)}


FAMILY_ROUTES: Dict[str, Type[FamilyRoutes]] = {}


def register_family_routes(cls: Type[FamilyRoutes]) -> Type[FamilyRoutes]:
    FAMILY_ROUTES[cls.family] = cls
    return cls


@register_family_routes
class ClipRoutes(FamilyRoutes):
    family = "clip"
    prefix = "/v1"

    def routes(self) -> List[Route]:
        p = self.prefix
        return [Route("POST", f"{p}/embeddings", self.embeddings),
                Route("POST", f"{p}/classify", self.classify),
                Route("POST", f"{p}/rank", self.rank),
                Route("POST", f"{p}/captions", self.captions),
                Route("POST", f"{p}/labelsets", self.labelsets)]

    async def _embed(self, handle, *, texts=None, images=None) -> np.ndarray:
        if texts is not None:
            return await self.call(handle.embed_texts.remote(texts))
        return await self.call(handle.embed_images.remote(images))

    def _texts(self, body, key: str, required: bool = False, allow_scalar: bool = False):
        return H.get_str_list(body, key, max_items=self.limits.max_texts, required=required,
                              allow_scalar=allow_scalar, max_chars=self.limits.max_text_chars,
                              what="texts")

    # ----------------------------------------------------------------- POST /v1/embeddings
    async def embeddings(self, request):
        body = await self.body(request)
        H.check_keys(body, ["model", "input", "images", "encoding_format", "user"])
        name, handle = self.select(body)
        fmt = H.get_str(body, "encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise H.unprocessable("encoding_format must be 'float' or 'base64'")
        texts = self._texts(body, "input", allow_scalar=True)
        raw = H.get_images(body, "images", self.limits)
        if (texts is None) == (raw is None):
            raise H.unprocessable("give exactly one of 'input' (texts) or 'images'")
        if texts is not None:
            emb = await self._embed(handle, texts=texts)
        else:
            emb = await self._embed(handle, images=await self.decode(raw, "images"))
        if fmt == "base64":
            import base64

            enc = [base64.b64encode(np.ascontiguousarray(e, dtype="<f4").tobytes()).decode()
                   for e in emb]
        else:
            enc = emb.tolist()
        return H.json_response({
            "object": "list", "model": name, "input_type": "text" if texts is not None else "image",
            "dim": int(emb.shape[1]),
            "data": [{"object": "embedding", "index": i, "embedding": e}
                     for i, e in enumerate(enc)]})

    # ----------------------------------------------------------------- POST /v1/classify
    async def classify(self, request):
        body = await self.body(request)
        H.check_keys(body, ["model", "images", "labels", "templates", "top_k", "labelset",
                            "labelset_version"])
        name, handle = self.select(body)
        raw = H.get_images(body, "images", self.limits, required=True)
        if body.get("labelset") is not None:  # stored class embeddings: no label encoding
            return await self._classify_labelset(body, name, handle, raw)
        labels = H.get_str_list(body, "labels", max_items=self.limits.max_labels, required=True,
                                max_chars=self.limits.max_text_chars, what="labels")
        templates = H.get_str_list(body, "templates", max_items=self.limits.max_templates,
                                   max_chars=self.limits.max_text_chars, what="templates")
        if templates is not None:
            bad = [i for i, t in enumerate(templates) if "{}" not in t]
            if bad:
                raise H.unprocessable(f"templates{bad} lack the '{{}}' label placeholder")
        top_k = H.get_int(body, "top_k", lo=1) or len(labels)
        images = await self.decode(raw, "images")
        probs = await self.call(handle.classify.remote(images, labels, templates))
        data = []
        for i, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")[:top_k]
            data.append({"index": i, "probs": row.tolist(),
                         "predictions": [{"label": labels[j], "index": int(j),
                                          "prob": float(row[j])} for j in order]})
        return H.json_response({"object": "list", "model": name, "labels": labels, "data": data})

    async def _classify_labelset(self, body, name, handle, raw):
        if body.get("labels") is not None or body.get("templates") is not None:
            raise H.unprocessable("give either 'labelset' or 'labels'/'templates', not both")
        ls_name = H.get_str(body, "labelset")
        version = H.get_int(body, "labelset_version", lo=1)
        images = await self.decode(raw, "images")
        probs, labels, version = await self.call(
            handle.classify_labelset.remote(images, ls_name, version))
        top_k = H.get_int(body, "top_k", lo=1) or len(labels)
        data = []
        for i, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")[:top_k]
            data.append({"index": i, "probs": row.tolist(),
                         "predictions": [{"label": labels[j], "index": int(j),
                                          "prob": float(row[j])} for j in order]})
        return H.json_response({"object": "list", "model": name, "labels": labels,
                                "labelset": {"name": ls_name, "version": version},
                                "data": data})

    # ----------------------------------------------------------------- POST /v1/labelsets
    async def labelsets(self, request):
        """``{"name", "model"?, "classes", "mode"?, "templates"?, "descriptions"? |
        "description_source"?: "shapesworld", "description_style"?, "samples_per_prompt"?}``
        -> the label set's metadata (``fmrt.chain.labelsets``)."""
        from fmrt.chain.labelsets import parse_create_request

        body = await self.body(request)
        H.check_keys(body, ["name", "model", "classes", "mode", "templates", "descriptions",
                            "description_source", "description_style", "samples_per_prompt"])
        name, handle = self.select(body)
        spec = await asyncio.to_thread(parse_create_request, body,
                                       max_text_chars=self.limits.max_text_chars)
        meta = await self.call(handle.create_labelset.remote(spec))
        return H.json_response({"object": "labelset", "model": name, **meta}, 201)

    # ----------------------------------------------------------------- POST /v1/captions
    async def captions(self, request):
        body = await self.body(request)
        H.check_keys(body, ["model", "images", "max_length"])
        name, handle = self.select(body)
        raw = H.get_images(body, "images", self.limits, required=True)
        max_length = H.get_int(body, "max_length", lo=2)
        caps = await self.call(handle.caption.remote(await self.decode(raw, "images"),
                                                     max_length))
        return H.json_response({"object": "list", "model": name,
                                "data": [{"index": i, "caption": c} for i, c in enumerate(caps)]})

    # ----------------------------------------------------------------- POST /v1/rank
    async def rank(self, request):
        body = await self.body(request)
        H.check_keys(body, ["model", "query", "query_image", "candidates", "images", "top_k"])
        name, handle = self.select(body)
        q_text = H.get_str(body, "query", limits=self.limits)
        q_image = body.get("query_image")
        if (q_text is None) == (q_image is None):
            raise H.unprocessable("give exactly one of 'query' (text) or 'query_image'")
        if q_image is not None and not isinstance(q_image, str):
            raise H.unprocessable("field 'query_image' must be a base64 or data URL string")
        c_texts = self._texts(body, "candidates")
        c_raw = H.get_images(body, "images", self.limits)
        if (c_texts is None) == (c_raw is None):
            raise H.unprocessable("give exactly one of 'candidates' (texts) or 'images'")
        n = len(c_texts) if c_texts is not None else len(c_raw)
        top_k = H.get_int(body, "top_k", lo=1) or n
        if q_image is not None:
            q_img = await asyncio.to_thread(H.decode_image, q_image, "query_image", self.limits)
        c_imgs = await self.decode(c_raw, "images") if c_raw is not None else None
        q_emb, c_emb = await asyncio.gather(
            self._embed(handle, texts=[q_text]) if q_text is not None
            else self._embed(handle, images=[q_img]),
            self._embed(handle, texts=c_texts) if c_texts is not None
            else self._embed(handle, images=c_imgs))
        q = q_emb[0] / max(float(np.linalg.norm(q_emb[0])), 1e-12)
        c = c_emb / np.linalg.norm(c_emb, axis=1, keepdims=True).clip(min=1e-12)
        scores = (c @ q).astype(np.float64)
        order = np.argsort(-scores, kind="stable")[:top_k]
        data = []
        for j in order:
            d = {"index": int(j), "score": float(scores[j])}
            if c_texts is not None:
                d["text"] = c_texts[j]
            data.append(d)
        return H.json_response({
            "object": "list", "model": name,
            "query_type": "text" if q_text is not None else "image",
            "candidate_type": "text" if c_texts is not None else "image",
            "scores": scores.tolist(), "data": data})


# ============================================================================== ingress
def _unwrap(e: BaseException) -> BaseException:
    """The user exception inside a Ray ``RayTaskError`` (what a replica raised)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def map_exception(e: BaseException) -> H.HTTPError:
    """Exceptions raised by model replicas -> HTTP errors (4xx for bad input, else 5xx)."""
    cause = _unwrap(e)
    if isinstance(cause, H.HTTPError):
        return cause
    from fmrt.models.tokenizer import TokenizerError
    from fmrt.preprocess import InvalidImageError
    from fmrt.runtime.clip import ClassifyInputError

    msg = str(cause).strip().splitlines()[0][:2000] if str(cause).strip() else ""
    if isinstance(cause, InvalidImageError):
        return H.HTTPError(422, msg or "invalid image", "invalid_image")
    if isinstance(cause, (ClassifyInputError, TokenizerError)):
        return H.unprocessable(msg or "invalid input")
    from fmrt.chain.labelsets import LabelSetError, LabelSetNotFoundError

    if isinstance(cause, LabelSetNotFoundError):
        return H.not_found(msg or "label set not found", "labelset_not_found")
    if isinstance(cause, LabelSetError):
        return H.unprocessable(msg or "invalid label set request")
    name = type(cause).__name__
    try:
        from ray.serve.exceptions import BackPressureError

        if isinstance(cause, BackPressureError):
            return H.HTTPError(503, f"server overloaded: {msg}", "overloaded")
    except ImportError:  # pragma: no cover
        pass
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        if isinstance(cause, (RayActorError, ActorDiedError, ActorUnavailableError)):
            return H.HTTPError(503, f"model replica unavailable: {name}: {msg}", "unavailable")
    except ImportError:  # pragma: no cover
        pass
    return H.HTTPError(500, f"internal error: {name}: {msg}", "internal_error")


def _route_path(request) -> str:
    scope = request.scope
    path = scope.get("path", "/")
    root = scope.get("root_path", "") or ""
    if root and root != "/" and path.startswith(root):
        path = path[len(root):] or "/"
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class Ingress:
    """HTTP entry point: a route table over every served family (plain Starlette requests)."""

    def __init__(self, families: Dict[str, Dict[str, Any]], limits: Optional[Dict] = None,
                 request_timeout_s: float = 60.0) -> None:
        self.limits = H.ServeLimits.from_dict(limits)
        self.providers: List[FamilyRoutes] = []
        self.table: Dict[str, Dict[str, Handler]] = {}
        for family, handles in families.items():
            if family not in FAMILY_ROUTES:
                raise ValueError(f"no HTTP routes for model family {family!r}; "
                                 f"known {sorted(FAMILY_ROUTES)}")
            provider = FAMILY_ROUTES[family](handles, limits=self.limits,
                                             timeout_s=request_timeout_s)
            self.providers.append(provider)
            for r in provider.routes():
                self._add(r)
        self._add(Route("GET", "/v1/models", self.models))
        self._add(Route("GET", "/healthz", self.healthz))

    def _add(self, r: Route) -> None:
        methods = self.table.setdefault(r.path, {})
        if r.method in methods:
            raise ValueError(f"route {r.method} {r.path} registered twice")
        methods[r.method] = r.handler

    async def __call__(self, request):
        path = _route_path(request)
        methods = self.table.get(path)
        try:
            if methods is None:
                raise H.not_found(f"no route {path!r}; routes: {sorted(self.table)}")
            handler = methods.get(request.method)
            if handler is None:
                err = H.HTTPError(405, f"{request.method} not allowed on {path}; allowed: "
                                       f"{sorted(methods)}", "method_not_allowed")
                resp = H.error_response(err)
                resp.headers["Allow"] = ", ".join(sorted(methods))
                return resp
            return await handler(request)
        except H.HTTPError as e:
            return H.error_response(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # replica errors and bugs: never hang, never a bare 500 page
            err = map_exception(e)
            if err.status >= 500:
                logger.exception("request %s %s failed", request.method, path)
            return H.error_response(err)

    async def models(self, request):
        data: List[Dict[str, Any]] = []
        for p in self.providers:
            data.extend(await p.list_models())
        return H.json_response({"object": "list", "data": data})

    async def healthz(self, request):
        status: Dict[str, str] = {}
        for p in self.providers:
            status.update(await p.check_health())
        ok = all(v == "ok" for v in status.values())
        return H.json_response({"status": "ok" if ok else "unavailable", "models": status},
                               200 if ok else 503)


# ============================================================================== builders
def _bind_clip(model: str, name: str, args: AppArgs, backend: str) -> Application:
    opts: Dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.num_gpus:
        opts["num_gpus"] = args.num_gpus
    return ClipEncoder.options(
        name=_deployment_name("ClipEncoder", name), num_replicas=args.num_replicas,
        max_ongoing_requests=max(64, 2 * args.max_batch_size), ray_actor_options=opts,
        logging_config={"enable_access_log": args.access_log},
    ).bind(model, backend=backend, max_batch_size=args.max_batch_size,
           batch_wait_timeout_s=args.batch_wait_timeout_s, num_threads=args.num_threads,
           load_kwargs=dict(args.load_kwargs), labelset_dir=args.labelset_dir)


# callable(families, args): adds deployments composed over the bound models (e.g. the
# program runner, families["chain"]); registered on import like FAMILY_BINDERS
APP_COMPOSERS: List[Callable[[Dict[str, Dict[str, Any]], "AppArgs"], None]] = []

# family -> callable(model name or dir, served name, args, backend) -> bound deployment
FAMILY_BINDERS: Dict[str, Callable[[str, str, AppArgs, str], Application]] = {
    "clip": _bind_clip, "coca": _bind_clip}


def build_app(args: AppArgs) -> Application:
    """Bind one encoder deployment per model and the shared ``Ingress``.

    ``args`` may be an ``AppArgs`` or a plain dict (what a Serve config file's ``args:`` gives)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args or {}))
    models = list(args.models) or default_models() + default_models("sam") + default_models("vlm")
    if not models:
        raise ValueError("no models to serve: none given and no bundled CLIP-family model in "
                         "fmrt/weights")
    backend = args.backend or default_backend()
    families: Dict[str, Dict[str, Application]] = {}
    for m in models:
        family = model_family(m)
        route_family = ROUTE_FAMILY.get(family, family)
        if family not in FAMILY_BINDERS or route_family not in FAMILY_ROUTES:
            raise ValueError(f"{m}: serving the {family!r} family is not supported yet")
        name = served_name(m)
        if any(name in v for v in families.values()):
            raise ValueError(f"two models are served as {name!r}")
        families.setdefault(route_family, {})[name] = FAMILY_BINDERS[family](m, name, args,
                                                                             backend)
    for compose in APP_COMPOSERS:  # graphs over the bound models (fmrt.serve.chain)
        compose(families, args)
    return Ingress.options(num_replicas=args.ingress_replicas,
                           logging_config={"enable_access_log": args.access_log}).bind(
        families, limits=dict(args.limits), request_timeout_s=args.request_timeout_s)


# A Serve config file's `import_path` may name either (both take one AppArgs/dict argument).
build_app_from_args = build_app

# Families whose deployments and routes live in their own module register themselves on import
# (FAMILY_BINDERS / FAMILY_ROUTES); imported here so the ingress replica sees them too.
from fmrt.serve import sam as _sam  # noqa: E402,F401
from fmrt.serve import vlm as _vlm  # noqa: E402,F401
from fmrt.serve import chain as _chain  # noqa: E402,F401

__all__ = ["AppArgs", "build_app", "build_app_from_args", "ClipEncoder", "Ingress",
           "FamilyRoutes", "ClipRoutes", "Route", "register_family_routes", "FAMILY_ROUTES",
           "FAMILY_BINDERS", "ROUTE_FAMILY", "default_backend", "default_models", "map_exception"]
