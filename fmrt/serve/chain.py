"""Visual programs and pointing -> segmenting over Ray Serve: a ``ProgramRunner`` deployment
composed, through constructor handles, with the CLIP, SAM and VLM deployments.

    Ingress (HTTP parsing, program validation, image decoding)  -- ChainRoutes
      └── ProgramRunner   (fmrt.chain.executor.Executor over fmrt.chain.modules.ServedOps)
            ├── ClipEncoder[clip]          (crops' embeddings, class embeddings)
            ├── SamEncoder/SamDecoder[sam] (embeddings by image id, point prompts, auto masks)
            └── VlmServer[vlm, ...]        (pointing, VQA)

A program runs as a dependency graph: every step whose inputs are ready is awaited concurrently
on the runner's event loop, each model call is an async handle call (so two ``Loc`` steps on
two images are two concurrent requests to the SAM and CLIP deployments, batched there with other
clients' requests). Per-image features are computed once per run (``fmrt.chain.modules``).

Routes (JSON; errors are ``{"error": {"message", "type", "code"}}``):

* ``POST /v1/programs/run``  ``{"program": str | "instruction": str, "images": {NAME: b64 or
  data URL}, "inputs"?: {NAME: number | bool | text}, "time_limit_s"?: float,
  "trace_images"?: bool, "vlm"?: served VLM name, "execution"?: {"sequential": false,
  "reuse": true}}`` (``execution`` is the benchmark's baseline switch: one step at a time
  and/or no per-run feature reuse) -> ``{"ok", "result", "result_type",
  "result_masks"?: [COCO RLE] (an ObjectList result with masks), "error": null | {"step",
  "line", "module", "type", "message"}, "time_ms", "cache", "trace": [{"step", "line",
  "module", "status", "inputs", "output", "output_type", "start_ms", "time_ms", "error"}],
  "program": text, "generated"?: {...}}``. A module failure or the run's time limit is a 200
  with ``ok: false`` and the structured step error (the trace shows what ran); steps that
  depend on a failed step are ``skipped``.
* ``POST /v1/point-segment``  ``{"image", "phrase", "vlm"?}`` -> ``{"phrase", "count",
  "points": [[x, y]], "masks": [COCO RLE], "boxes": [[x0, y0, x1, y1]], "scores", "width",
  "height", "vlm": {"model", "text", "count"}}``: the VLM points, SAM is prompted with each
  point, one mask per object (duplicate masks merged).

4xx: an invalid program (parse/validation: unknown module or argument, wrong type, undefined
variable, cycle, too many steps, ``__import__``/dunder names/attributes/calls in expressions,
numbers over 10^18, ``**`` bombs, nesting deeper than 32) -> 422 with ``line`` and ``reason``;
an instruction without a configured generator -> 400 ``no program generator configured``; a
generator that cannot produce a valid program -> 422 with its attempts; more images than
``max_images`` -> 413; undecodable images -> 400; bad fields -> 422; no VLM for
point-segment -> 400. Nothing a client sends is evaluated as Python, and every failure inside a
run is caught per step: a request cannot take the server down.

Options (``AppArgs.chain``, ``ChainOptions``): ``enabled`` (``"auto"``: when a CLIP-family and
a SAM model are served), ``time_limit_s`` (the most a run may take; requests may ask for less),
``max_steps``, ``max_images``, ``max_concurrency`` (steps in flight per run),
``generator`` (``None``, or a bundled program-LM name for
``fmrt.chain.generate.LocalProgramGenerator``), ``clip``/``sam``/``vlm`` (served names; default
the first of each family), ``pointing`` (None: VLMs of the llava family point), ``amg``
(automatic-mask parameters).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from fmrt.serve import http as H
from fmrt.serve.app import (FamilyRoutes, Route, _unwrap, model_family,
                            register_family_routes)

logger = logging.getLogger("fmrt.serve")

MAX_TIME_LIMIT_S = 600.0
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class ChainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: Any = Field("auto", description="auto | true | false")
    time_limit_s: float = Field(30.0, gt=0.0, le=MAX_TIME_LIMIT_S)
    max_steps: int = Field(32, ge=1, le=64)
    max_images: int = Field(8, ge=1, le=16)
    max_concurrency: int = Field(8, ge=1, le=64)
    generator: Optional[str] = None
    clip: Optional[str] = None
    sam: Optional[str] = None
    vlm: Optional[str] = None
    pointing: Optional[bool] = None
    amg: Dict[str, Any] = Field(default_factory=dict)
    num_replicas: int = Field(1, ge=1)


# ============================================================================== errors
class ChainRequestError(ValueError):
    """A request the runner refuses: HTTP ``status``, ``type`` and extra JSON fields. One
    pickled argument tuple, so it crosses Ray's process boundary intact."""

    def __init__(self, message: str, status: int = 422, type: str = "invalid_request",
                 extra: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type = message, int(status), type
        self.extra = dict(extra or {})

    def __reduce__(self):
        return (ChainRequestError, (self.message, self.status, self.type, self.extra))


class ChainHTTPError(H.HTTPError):
    """An ``HTTPError`` whose JSON error object carries extra fields (``line``, ``reason``,
    ``attempts``)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request",
                 extra: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(status, message, type)
        self.extra = dict(extra or {})

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["error"].update(self.extra)
        return d


def program_http_error(e: Exception) -> ChainHTTPError:
    """``ProgramError`` -> 422 with its line and reason."""
    return ChainHTTPError(422, f"invalid program: {e}", "invalid_program",
                          {"line": getattr(e, "line", 0), "reason": getattr(e, "reason", str(e))})


def map_chain_exception(e: BaseException) -> Optional[H.HTTPError]:
    cause = _unwrap(e)
    if isinstance(cause, H.HTTPError):
        return cause
    if isinstance(cause, ChainRequestError):
        return ChainHTTPError(cause.status, cause.message, cause.type, cause.extra)
    from fmrt.chain.program import ProgramError

    if isinstance(cause, ProgramError):
        return program_http_error(cause)
    return None


# ============================================================================== runner
def _mask_rles(masks: np.ndarray) -> List[Dict[str, Any]]:
    from fmrt.kernels import mask_to_rle

    if masks is None or len(masks) == 0:
        return []
    return mask_to_rle(np.ascontiguousarray(masks, dtype=bool)).to_coco()


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class ProgramRunner:
    """Runs visual programs and the pointing -> segmenting graph against deployment handles.

    ``clip``: a ``ClipEncoder`` handle; ``sam``: ``{"encoder", "decoder"}`` handles; ``vlms``:
    served name -> ``VlmServer`` handle (the first pointing one serves ``Loc``; ``pointing``
    names the ones that can point); ``generator``: None, a bundled program-LM name (loaded
    here, lazily) or a handle/object with ``generate(instruction, inputs)``."""

    def __init__(self, clip: Any = None, sam: Optional[Dict[str, Any]] = None,
                 vlms: Optional[Dict[str, Any]] = None, *, pointing: Optional[List[str]] = None,
                 generator: Any = None, options: Optional[Dict[str, Any]] = None,
                 call_timeout_s: float = 60.0) -> None:
        from fmrt.chain.modules import ModuleConfig

        self.opts = ChainOptions.model_validate(dict(options or {}))
        self.clip, self.sam = clip, dict(sam or {})
        self.vlms = dict(vlms or {})
        self.pointing = set(pointing or [])
        self.generator_spec = generator
        self._generator: Any = None
        self.call_timeout_s = float(call_timeout_s)
        cfg = ModuleConfig()
        if self.opts.amg:
            cfg.amg = {**cfg.amg, **self.opts.amg}
        self.config = cfg
        self._executors: Dict[Tuple[Optional[str], bool], Any] = {}
        self.runs = self.failed_runs = 0
        self._started = time.time()

    # ----------------------------------------------------------------- bindings
    def _vlm_name(self, name: Optional[str], *, point: bool) -> Optional[str]:
        if name is not None:
            if name not in self.vlms:
                raise ChainRequestError(f"VLM {name!r} is not served; available: "
                                        f"{list(self.vlms)}", 404, "model_not_found")
            return name
        if point:
            return next((n for n in self.vlms if n in self.pointing), None) or \
                next(iter(self.vlms), None)
        return next(iter(self.vlms), None)

    def _executor(self, vlm: Optional[str], trace_images: bool = True,
                  sequential: bool = False):
        # per-request options must not race on a shared executor: one per combination
        key = (vlm, bool(trace_images), bool(sequential))
        ex = self._executors.get(key)
        if ex is None:
            from fmrt.chain.executor import Executor
            from fmrt.chain.modules import ServedOps, served_modules

            ops = ServedOps(self.clip, self.sam, self.vlms.get(vlm) if vlm else None,
                            config=self.config, pointing=bool(vlm and vlm in self.pointing),
                            timeout_s=self.call_timeout_s)
            ex = Executor(served_modules(ops, self.config),
                          max_concurrency=self.opts.max_concurrency,
                          time_limit_s=self.opts.time_limit_s,
                          max_input_images=self.opts.max_images,
                          trace_images=bool(trace_images), sequential=bool(sequential))
            ex.ops = ops
            self._executors[key] = ex
        return ex

    def _get_generator(self):
        if self._generator is None:
            spec = self.generator_spec
            if spec is None:
                raise ChainRequestError("no program generator configured: send a 'program' "
                                        "instead of an 'instruction'", 400, "not_configured")
            if isinstance(spec, str):
                from fmrt.chain.generate import LocalProgramGenerator

                spec = LocalProgramGenerator(spec)
            self._generator = spec
        return self._generator

    async def _generate(self, instruction: str, types: Dict[str, str]):
        gen = self._get_generator()
        fn = getattr(gen, "generate", gen)
        try:
            if hasattr(fn, "remote"):
                out = await asyncio.wait_for(_aw(fn.remote(instruction, types)),
                                             self.call_timeout_s)
            else:
                out = await asyncio.wait_for(asyncio.to_thread(fn, instruction, types),
                                             self.call_timeout_s)
        except asyncio.TimeoutError:
            raise ChainRequestError("the program generator did not answer in time", 504,
                                    "timeout") from None
        except Exception as e:
            cause = _unwrap(e)
            extra = cause.to_dict() if hasattr(cause, "to_dict") else {}
            if isinstance(cause, ValueError):
                raise ChainRequestError(f"program generation failed: {cause}", 422,
                                        "generation_failed",
                                        {"attempts": extra.get("attempts", [])}) from None
            raise
        text = getattr(out, "text", out)
        if not isinstance(text, str):
            raise ChainRequestError("the program generator returned no program text", 502,
                                    "generation_failed")
        info = out.to_dict() if hasattr(out, "to_dict") else {"text": text}
        return text, _jsonable(info)

    # ----------------------------------------------------------------- programs
    async def run(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """``req``: ``{"program" | "instruction", "images": {NAME: HxWx3 uint8},
        "inputs": {NAME: scalar}, "time_limit_s"?, "trace_images"?, "vlm"?}`` (shape-checked
        by the ingress). Returns the response body."""
        from fmrt.chain.executor import summarize
        from fmrt.chain.program import ProgramError, VType, parse_program, type_of

        images = {k: (v if v.flags.writeable else v.copy())
                  for k, v in dict(req.get("images") or {}).items()}
        scalars = dict(req.get("inputs") or {})
        if len(images) > self.opts.max_images:
            raise ChainRequestError(f"{len(images)} images; the limit is "
                                    f"{self.opts.max_images}", 413, "too_many_images")
        values: Dict[str, Any] = {**images, **scalars}
        types = {k: str(type_of(v) or VType.ANY) for k, v in values.items()}
        generated = None
        text = req.get("program")
        if text is None:
            text, generated = await self._generate(req["instruction"], types)
        try:
            prog = parse_program(text, types, max_steps=self.opts.max_steps)
        except ProgramError as e:
            err = program_http_error(e)
            if generated is not None:
                err.extra["generated"] = generated
            raise ChainRequestError(err.message, 422, err.type, err.extra) from None
        limit = min(float(req.get("time_limit_s") or self.opts.time_limit_s),
                    self.opts.time_limit_s)
        trace_images = req.get("trace_images")
        execution = dict(req.get("execution") or {})
        ex = self._executor(self._vlm_name(req.get("vlm"), point=True),
                            True if trace_images is None else bool(trace_images),
                            bool(execution.get("sequential", False)))
        used = {k: v for k, v in values.items() if k in prog.inputs}
        from fmrt.chain.executor import NoReuseCache, RunCache

        cache = RunCache() if execution.get("reuse", True) else NoReuseCache()
        res = await ex.run_async(prog, used, time_limit_s=limit, cache=cache)
        self.runs += 1
        self.failed_runs += not res.ok
        body = res.to_dict()
        body["program"] = text
        if generated is not None:
            body["generated"] = generated
        if res.ok and type_of(res.result) is VType.OBJECTS and res.result.masks is not None:
            body["result_masks"] = _mask_rles(res.result.masks)
        if res.ok and type_of(res.result) is VType.IMAGE and not ex.trace_images:
            body["result"] = summarize(res.result, images=True)
        return _jsonable(body)

    # ----------------------------------------------------------------- point -> segment
    async def point_segment(self, image: np.ndarray, phrase: str, vlm: Optional[str] = None
                            ) -> Dict[str, Any]:
        from fmrt.chain.executor import RunCache, StepContext
        from fmrt.chain.modules import ModelModules

        name = self._vlm_name(vlm, point=True)
        if name is None:
            raise ChainRequestError("no VLM is served: point-segment needs a pointing VLM",
                                    400, "not_configured")
        ex = self._executor(name)
        img = image if image.flags.writeable else image.copy()
        ctx = StepContext("point_segment", 0, "PointSegment", RunCache(),
                          time.monotonic() + self.opts.time_limit_s)
        mm = ModelModules(ex.ops, self.config)
        try:
            objs, pts, count, text = await asyncio.wait_for(
                mm.point_segment(ctx, img, phrase), self.opts.time_limit_s)
        except asyncio.TimeoutError:
            raise ChainRequestError(f"point-segment exceeded its time limit of "
                                    f"{self.opts.time_limit_s:g} s", 504, "timeout") from None
        h, w = img.shape[:2]
        return _jsonable({
            "phrase": phrase, "count": len(objs), "points": pts.round(2).tolist(),
            "masks": _mask_rles(objs.masks), "boxes": objs.boxes.round(2).tolist(),
            "scores": [round(float(s), 5) for s in objs.scores], "width": int(w),
            "height": int(h), "vlm": {"model": name, "text": text, "count": count}})

    # ----------------------------------------------------------------- introspection
    def info(self) -> Dict[str, Any]:
        calls: Dict[str, int] = {}
        for ex in self._executors.values():
            for k, v in ex.ops.counts.items():
                calls[k] = calls.get(k, 0) + v
        return {"family": "chain", "vlms": list(self.vlms), "pointing": sorted(self.pointing),
                "generator": self.generator_spec if isinstance(self.generator_spec, str)
                else (None if self.generator_spec is None else type(self.generator_spec).__name__),
                "options": self.opts.model_dump(), "runs": self.runs,
                "failed_runs": self.failed_runs, "model_calls": calls,
                "uptime_s": round(time.time() - self._started, 3)}

    def ping(self) -> bool:
        return True


async def _aw(x):
    return await x


def _jsonable(v: Any) -> Any:
    """Numpy scalars/arrays and tuples -> JSON types (recursively)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


# ============================================================================== routes
@register_family_routes
class ChainRoutes(FamilyRoutes):
    """``handles``: ``{"programs": ProgramRunner handle}`` plus its limits
    (``"__options__"``: ``ChainOptions`` dict)."""

    family = "chain"
    prefix = "/v1"

    def __init__(self, handles, *, limits, timeout_s) -> None:
        handles = dict(handles)
        self.opts = ChainOptions.model_validate(dict(handles.pop("__options__", {}) or {}))
        super().__init__(handles, limits=limits, timeout_s=timeout_s)
        self.runner = self.handles[self.default]

    def routes(self) -> List[Route]:
        return [Route("POST", f"{self.prefix}/programs/run", self.run),
                Route("POST", f"{self.prefix}/point-segment", self.point_segment)]

    map_exception = staticmethod(map_chain_exception)
    upstream = "the program runner"

    async def _images(self, body: Dict[str, Any]) -> Dict[str, np.ndarray]:
        raw = body.get("images")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise H.unprocessable("field 'images' must be an object {NAME: base64 or data URL}")
        if len(raw) > self.opts.max_images:
            raise H.too_large(f"{len(raw)} images; a program takes at most "
                              f"{self.opts.max_images}")
        for k, v in raw.items():
            if not _NAME.match(k):
                raise H.unprocessable(f"image name {k[:40]!r} is not a valid variable name "
                                      "(a letter, then letters, digits or '_', at most 64)")
            if not isinstance(v, str):
                raise H.unprocessable(f"images[{k!r}] must be a base64 or data URL string")

        def decode():
            return {k: H.decode_image(v, f"images[{k!r}]", self.limits) for k, v in raw.items()}

        return await asyncio.to_thread(decode)

    def _scalars(self, body: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
        raw = body.get("inputs")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise H.unprocessable("field 'inputs' must be an object {NAME: number | bool | "
                                  "text}")
        if len(raw) > 64:
            raise H.too_large(f"{len(raw)} inputs; the limit is 64")
        out = {}
        for k, v in raw.items():
            if not _NAME.match(k):
                raise H.unprocessable(f"input name {k[:40]!r} is not a valid variable name")
            if k in names:
                raise H.unprocessable(f"input {k!r} is also an image name")
            if isinstance(v, bool) or (isinstance(v, int) and abs(v) <= 10 ** 18):
                out[k] = v
            elif isinstance(v, float) and np.isfinite(v) and abs(v) <= 1e18:
                out[k] = v
            elif isinstance(v, str) and len(v) <= 500:
                out[k] = v
            else:
                raise H.unprocessable(f"inputs[{k!r}] must be a number (|x| <= 1e18), a "
                                      "boolean or text of at most 500 characters")
        return out

    async def run(self, request):
        from fmrt.chain.program import ProgramError, parse_program

        body = await self.body(request)
        H.check_keys(body, ["program", "instruction", "images", "inputs", "time_limit_s",
                            "trace_images", "vlm", "execution"])
        execution = body.get("execution")
        if execution is not None:
            if not isinstance(execution, dict) or set(execution) - {"sequential", "reuse"} \
                    or not all(isinstance(v, bool) for v in execution.values()):
                raise H.unprocessable("field 'execution' must be {\"sequential\"?: bool, "
                                      "\"reuse\"?: bool}")
        program = body.get("program")
        instruction = body.get("instruction")
        if (program is None) == (instruction is None):
            raise H.unprocessable("give exactly one of 'program' (text) or 'instruction'")
        for k, v in (("program", program), ("instruction", instruction)):
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise H.unprocessable(f"field {k!r} must be non-empty text")
        if instruction is not None and len(instruction) > 2000:
            raise H.too_large(f"instruction has {len(instruction)} characters; the limit is "
                              "2000")
        limit = body.get("time_limit_s")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) \
                    or not 0 < limit <= self.opts.time_limit_s:
                raise H.unprocessable(f"time_limit_s must be a number in (0, "
                                      f"{self.opts.time_limit_s:g}]")
        tr = body.get("trace_images")
        if tr is not None and not isinstance(tr, bool):
            raise H.unprocessable("field 'trace_images' must be a boolean")
        vlm = H.get_str(body, "vlm")
        raw_images = body.get("images")
        if isinstance(raw_images, dict) and len(raw_images) > self.opts.max_images:
            raise H.too_large(f"{len(raw_images)} images; a program takes at most "
                              f"{self.opts.max_images}")
        names = list(raw_images) if isinstance(raw_images, dict) else []
        scalars = self._scalars(body, names)
        if program is not None:
            # validate before decoding any image or reaching a replica: a bad program costs
            # the ingress a parse (bounded: 20k characters, 64 steps, expression limits)
            types = {**{k: "Image" for k in names},
                     **{k: ("Bool" if isinstance(v, bool) else "Text" if isinstance(v, str)
                            else "Number") for k, v in scalars.items()}}
            try:
                await asyncio.to_thread(parse_program, program, types,
                                        max_steps=self.opts.max_steps)
            except ProgramError as e:
                raise program_http_error(e) from None
        images = await self._images(body)
        req = {"program": program, "instruction": instruction, "images": images,
               "inputs": scalars, "time_limit_s": limit, "trace_images": tr, "vlm": vlm,
               "execution": execution}
        run_limit = float(limit or self.opts.time_limit_s)
        # the runner enforces the run's limit; this one only guards against a lost replica
        out = await self.call(self.runner.run.remote(req),
                              timeout_s=run_limit + max(self.timeout_s, 30.0))
        return H.json_response(out)

    async def point_segment(self, request):
        body = await self.body(request)
        H.check_keys(body, ["image", "phrase", "vlm"])
        phrase = H.get_str(body, "phrase", required=True, limits=self.limits)
        if not phrase.strip():
            raise H.unprocessable("field 'phrase' must be non-empty text")
        if len(phrase) > 500:
            raise H.too_large("phrase has more than 500 characters")
        vlm = H.get_str(body, "vlm")
        s = body.get("image")
        if not isinstance(s, str):
            raise H.unprocessable("field 'image' must be a base64 or data URL string")
        img = await asyncio.to_thread(H.decode_image, s, "image", self.limits)
        out = await self.call(self.runner.point_segment.remote(img, phrase, vlm))
        return H.json_response({"object": "point_segment", **out})

    async def list_models(self) -> List[Dict[str, Any]]:
        return []  # the runner is not a model; its state is in GET /healthz

    async def check_health(self) -> Dict[str, str]:
        try:
            ok = await self.call(self.runner.ping.remote())
        except Exception as e:
            return {"programs": f"{type(e).__name__}: {e}"}
        return {"programs": "ok" if ok is True else str(ok)}


# ============================================================================== composition
def bind_program_runner(families: Dict[str, Dict[str, Any]], options: Dict[str, Any],
                        *, vlm_families: Optional[Dict[str, str]] = None,
                        call_timeout_s: float = 60.0) -> Any:
    """A bound ``ProgramRunner`` over already-bound deployments: ``families`` is the app's
    ``{route family: {served name: bound deployment(s)}}`` (what ``build_app`` collects);
    ``vlm_families``: served VLM name -> model family (llava VLMs point)."""
    opts = ChainOptions.model_validate(dict(options or {}))

    def pick(fam: str, name: Optional[str]):
        table = families.get(fam) or {}
        if name is not None:
            if name not in table:
                raise ValueError(f"chain: {fam} model {name!r} is not served; served: "
                                 f"{list(table)}")
            return table[name]
        return next(iter(table.values()), None)

    vlms = dict(families.get("vlm") or {})
    if opts.vlm is not None:
        if opts.vlm not in vlms:
            raise ValueError(f"chain: VLM {opts.vlm!r} is not served; served: {list(vlms)}")
        vlms = {opts.vlm: vlms[opts.vlm], **{k: v for k, v in vlms.items() if k != opts.vlm}}
    fams = vlm_families or {}
    if opts.pointing is None:
        pointing = [n for n in vlms if fams.get(n) == "llava"]
    else:
        pointing = list(vlms) if opts.pointing else []
    return ProgramRunner.options(name="ProgramRunner", num_replicas=opts.num_replicas).bind(
        pick("clip", opts.clip), pick("sam", opts.sam), vlms, pointing=pointing,
        generator=opts.generator, options=opts.model_dump(), call_timeout_s=call_timeout_s)


def compose_chain(families: Dict[str, Dict[str, Any]], args: Any) -> None:
    """``build_app`` hook: add ``families["chain"]`` when enabled (``auto``: a CLIP-family
    and a SAM model are served)."""
    opts = ChainOptions.model_validate(dict(getattr(args, "chain", None) or {}))
    en = opts.enabled
    if isinstance(en, str):
        en = en.lower()
    if en in (False, "false", "off", "no"):
        return
    if en in ("auto",) and not (families.get("clip") and families.get("sam")):
        return
    if en not in (True, "true", "on", "yes", "auto"):
        raise ValueError(f"chain.enabled must be auto, true or false, got {opts.enabled!r}")
    vlm_fams = {}
    for m in getattr(args, "models", []) or []:
        try:
            from fmrt.serve.app import served_name

            vlm_fams[served_name(m)] = model_family(m)
        except Exception:
            pass
    runner = bind_program_runner(families, opts.model_dump(), vlm_families=vlm_fams,
                                 call_timeout_s=float(getattr(args, "request_timeout_s", 60.0)))
    families["chain"] = {"programs": runner, "__options__": opts.model_dump()}


__all__ = ["ProgramRunner", "ChainRoutes", "ChainOptions", "ChainRequestError",
           "bind_program_runner", "compose_chain", "map_chain_exception"]


from fmrt.serve.app import APP_COMPOSERS  # noqa: E402

if compose_chain not in APP_COMPOSERS:
    APP_COMPOSERS.append(compose_chain)
