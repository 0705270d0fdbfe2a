"""Model-backed visual-program modules: ``Loc``, ``Seg``, ``Select``, ``Classify``, ``Vqa``,
``List``, written once against an async *ops* interface and bound two ways:

* in-process (``local_modules``): the numpy facades - ``fmrt.load(clip)`` (``ClipRuntime``),
  ``SamPredictor`` + ``SamAutomaticMaskGenerator``, the VLM facade (``fmrt.runtime.vlm``) and a
  text-generation client (``fmrt.chain.cupl.TextSource`` or any ``prompt -> str`` callable);
* served (``served_modules``, used by ``fmrt.serve.chain.ProgramRunner``): Ray Serve deployment
  handles of ``ClipEncoder``, ``SamEncoder``/``SamDecoder`` and the VLM server.

    from fmrt.chain import Executor, parse_program
    from fmrt.chain.modules import local_modules
    mods = local_modules(clip="shapes-clip", sam="shapes-sam", vlm=None, backend="torch")
    prog = parse_program("B=Loc(image=IMAGE, object='red circles')\\nN=Count(object=B)\\n"
                         "RESULT=N")
    Executor(mods).run(prog, {"IMAGE": img}).result      # -> 2

What the modules do (images are ``H x W x 3`` uint8; boxes/points in original-image pixels):

* ``Loc(image, object)``: open-vocabulary localisation. With a *pointing* VLM (LLaVA family, or
  ``pointing=True``): ``vlm.point(image, phrase)`` -> points, SAM prompted with each point
  (multimask, best-scoring mask), duplicate masks (mask IoU > 0.5) merged. Otherwise: SAM
  automatic masks (``Seg``'s candidates), then CLIP keeps the masks matching the phrase (below).
* ``Seg(image)``: SAM automatic masks cleaned to one per object (``clean_masks``: largest
  connected component, background-sized masks dropped, duplicates / parts / merges of
  better-scoring masks dropped). On 30 held-out scenes x 4 phrases ("red circles", "circles",
  "red shapes", "shapes") the CLIP route returns exactly the right objects in 120/120 cases.
* ``Select(image, object, query, category)``: the objects that match ``query`` (CLIP, below).
* ``Classify(image, object, categories)``: each object labelled with its most probable category
  (score = that probability).
* ``Vqa(image, question)``: the VLM's short answer (text).
* ``List(query, max)``: up to ``max`` items from the text-generation client.

CLIP sees an object *isolated*: the image with every pixel outside the object's mask (or box)
replaced by the image's background colour (median of the pixels outside all objects), in the
original frame. That is a single-object ShapesWorld scene, what shapes-clip was trained on: on
201 objects of 60 held-out scenes isolation gives 100% colour+shape (24 labels) and 100%
size+colour+shape (48 labels) accuracy, while tight box crops (resized to 64^2) give 49% / 24%
(the objects become huge and lose their size cue).

Matching a phrase: when every word of it is ShapesWorld vocabulary (sizes, colours, shapes,
plurals, "shape(s)/object(s)", articles: "the red circles", "small star", "shapes"), each object
is classified over the 48 "size colour shape" classes (CLIP's template ensemble) and its score is
the probability mass of the classes consistent with the phrase; objects with score > 0.5 match.
Other phrases are contrasted with the 24 ShapesWorld "colour shape" classes: an object matches
when the phrase is its most probable label.

Per-run feature reuse (``ctx.cache``, ``fmrt.chain.executor.RunCache``), keys by kind:
``sam_embedding`` (one SAM image embedding per image per run, shared by pointing prompts and the
automatic mask generator), ``sam_auto`` (automatic masks per image: ``Seg`` and every CLIP-route
``Loc`` of that image share one run), ``clip_object`` (the CLIP embedding of each isolated
object, batched: ``Loc`` then ``Classify`` of the same objects encodes nothing new),
``clip_text`` (class embeddings of a label list), ``vlm_point``. A run with
``fmrt.chain.executor.NoReuseCache`` recomputes everything (the benchmark's baseline).

Errors a module raises become structured step errors: ``ModuleUnavailableError`` (no VLM / no
text client configured), ``ModuleInputError`` (bad argument values, e.g. ``List(max=1000)``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fmrt.chain.executor import ModuleFn, StepContext, builtin_modules
from fmrt.chain.program import ObjectList

MAX_LIST_ITEMS = 50
MAX_POINTS = 64  # pointing answers beyond this are truncated (a 64x64 scene holds <= 6 objects)
MAX_OBJECTS = 256  # objects per ObjectList a model module returns


class ModuleUnavailableError(RuntimeError):
    """The module needs a model / client this binding was not given (e.g. ``Vqa`` without a
    VLM)."""


class ModuleInputError(ValueError):
    """A module argument value the module cannot use (e.g. ``List(max=0)``)."""


# ====================================================================================== config
@dataclass
class ModuleConfig:
    """Knobs of the model-backed modules (both bindings).

    ``amg``: ``SamAutomaticMaskGenerator`` arguments for ``Seg``/CLIP-route ``Loc``
    (``points_per_side=16``: on 20 held-out scenes every object gets a mask with IoU > 0.7,
    0.37 s per 64^2 image on one core; 8 misses 2% of the objects at 0.12 s).
    ``max_area_frac``: masks larger than this fraction of the image are background.
    ``part_overlap``: a mask with more than this fraction of its pixels already covered by
    better-scoring kept masks is a duplicate, a part or a merge and dropped (``clean_masks``).
    ``dedup_iou``: pointing-route masks with a larger mask IoU are one object. ``pointing``:
    None = use VLM pointing when the VLM's family is "llava"; True/False force it.
    ``vqa_max_new_tokens``: answer length. ``match_threshold``: see ``ModelModules.match``."""

    amg: Dict[str, Any] = field(default_factory=lambda: {
        "points_per_side": 16, "points_per_batch": 64})
    max_area_frac: float = 0.5
    min_object_frac: float = 0.005  # smallest object: 20 px of a 64^2 image (small ~ 56 px)
    part_overlap: float = 0.3
    dedup_iou: float = 0.5
    match_threshold: float = 0.5
    pointing: Optional[bool] = None
    vqa_max_new_tokens: int = 16
    templates: Optional[Tuple[str, ...]] = None  # None: the CLIP model's own ensemble


# ====================================================================================== phrases
_ARTICLES = {"a", "an", "the", "all", "any", "every", "each", "some", "of"}
_GENERIC = {"shape", "shapes", "object", "objects", "thing", "things", "item", "items"}


def parse_phrase(text: str) -> Optional[Dict[str, Optional[str]]]:
    """``"the small red circles"`` -> ``{"size": "small", "color": "red", "shape": "circle"}``
    (None for an unmentioned attribute); None when a word is not ShapesWorld vocabulary or an
    attribute is named twice."""
    from fmrt.data.vocab import COLORS, SHAPES, SIZES

    words = re.findall(r"[a-z]+", str(text).lower())
    out: Dict[str, Optional[str]] = {"size": None, "color": None, "shape": None}
    seen = False
    for w in words:
        if w in _ARTICLES:
            continue
        if w in _GENERIC:
            seen = True
            continue
        s = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
        kind = ("size" if s in SIZES else "color" if s in COLORS else
                "shape" if s in SHAPES else None)
        if kind is None or (out[kind] is not None and out[kind] != s):
            return None
        out[kind] = s
        seen = True
    return out if seen else None


def _world_classes() -> Tuple[List[str], List[Tuple[str, str, str]]]:
    from fmrt.data.vocab import COLORS, SHAPES, SIZES

    attrs = [(z, c, s) for z in SIZES for c in COLORS for s in SHAPES]
    return [f"{z} {c} {s}" for z, c, s in attrs], attrs


def _contrast_classes() -> List[str]:
    from fmrt.data.vocab import COLORS, SHAPES

    return [f"{c} {s}" for c in COLORS for s in SHAPES]


# ====================================================================================== geometry
def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """``N x H x W`` bool -> ``N x 4`` float32 tight boxes ``(x0, y0, x1, y1)``,
    inclusive-exclusive (an empty mask gets ``(0, 0, 0, 0)``)."""
    out = np.zeros((masks.shape[0], 4), np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        if ys.size:
            out[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A x H x W``, ``B x H x W`` bool -> ``A x B`` IoU (float64)."""
    fa = a.reshape(a.shape[0], -1).astype(np.float32)
    fb = b.reshape(b.shape[0], -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D bool mask (ShapesWorld objects are connected
    and separated by >= 1 background pixel, so a few pixels a mask leaks onto a neighbour are a
    separate component)."""
    from fmrt.runtime.sam_amg import label_components

    labels, sizes = label_components(mask)
    if len(sizes) <= 2:
        return mask
    return labels == int(np.argmax(sizes[1:])) + 1


def clean_masks(masks: np.ndarray, scores: np.ndarray, *, max_area_frac: float,
                part_overlap: float) -> Tuple[np.ndarray, np.ndarray]:
    """Automatic masks -> one mask per object: ``(indices kept, their cleaned masks)``.

    Each mask is cut to its largest connected component; background-sized (> ``max_area_frac``
    of the image) and empty masks are dropped; then, best predicted IoU first, a mask is kept
    unless more than ``part_overlap`` of its pixels are already covered by kept masks (a
    duplicate, a part of a kept object, or a merge of kept objects). On 30 held-out scenes the
    largest-area-first variant lost 20% of the objects to masks that merged two neighbours."""
    n = masks.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), masks
    hw = masks.shape[1] * masks.shape[2]
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: List[int] = []
    cleaned: Dict[int, np.ndarray] = {}
    covered = np.zeros(masks.shape[1:], bool)
    for i in order:
        m = largest_component(masks[i]) if masks[i].any() else masks[i]
        area = int(m.sum())
        if area == 0 or area > max_area_frac * hw:
            continue
        if (covered & m).sum() > part_overlap * area:
            continue
        kept.append(int(i))
        cleaned[int(i)] = m
        covered |= m
    idx = np.array(sorted(kept), np.int64)
    out = (np.stack([cleaned[i] for i in idx]) if len(idx)
           else np.zeros((0,) + masks.shape[1:], bool))
    return idx, out


def residual_seeds(masks: np.ndarray, covered: np.ndarray, min_area: int) -> np.ndarray:
    """``K x 2`` (x, y) seed points of regions some mask covers but no kept mask does (the
    object a dropped merge-mask also held: on held-out scenes ~3% of the objects get no mask of
    their own from the automatic generator, only a share of a mask merging them with a
    neighbour). Each seed is the region pixel nearest the region's centroid; regions below
    ``min_area`` pixels are ignored; at most one seed per region of the union."""
    seeds: List[Tuple[float, float]] = []
    taken = covered.copy()
    for m in masks:
        r = m & ~taken
        if r.sum() < min_area:
            continue
        r = largest_component(r)
        if r.sum() < min_area:
            continue
        ys, xs = np.nonzero(r)
        cy, cx = ys.mean(), xs.mean()
        j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        seeds.append((float(xs[j]), float(ys[j])))
        taken |= r
    return np.array(seeds, np.float64).reshape(-1, 2)


def dedup_masks(masks: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy mask NMS (higher score first)."""
    order = np.argsort(-scores, kind="stable")
    kept: List[int] = []
    for i in order:
        if masks[i].sum() == 0:
            continue
        if kept and mask_iou(masks[[i]], masks[kept]).max() > iou:
            continue
        kept.append(int(i))
    return np.array(kept, np.int64)


def background_color(image: np.ndarray, objects: Optional[np.ndarray] = None) -> np.ndarray:
    """Median RGB of the pixels outside ``objects`` (``H x W`` bool), uint8 ``[3]``."""
    px = image.reshape(-1, 3) if objects is None or objects.all() else image[~objects]
    return np.median(px, axis=0).round().astype(np.uint8)


def object_regions(image: np.ndarray, objs: ObjectList) -> np.ndarray:
    """``N x H x W`` bool: each object's mask at the image's size, else its box."""
    h, w = image.shape[:2]
    n = len(objs)
    if objs.masks is not None and objs.masks.shape[1:] == (h, w):
        return objs.masks
    out = np.zeros((n, h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(objs.boxes):
        out[i, max(0, int(y0)):min(h, int(np.ceil(y1))),
            max(0, int(x0)):min(w, int(np.ceil(x1)))] = True
    return out


def isolate_objects(image: np.ndarray, regions: np.ndarray) -> List[np.ndarray]:
    """One image per region: the region's pixels on the image's background colour, in the
    original frame (what CLIP classifies; see the module docstring for why)."""
    bg = background_color(image, regions.any(axis=0) if len(regions) else None)
    out = []
    for r in regions:
        a = np.empty_like(image)
        a[:] = bg
        a[r] = image[r]
        out.append(a)
    return out


def _region_key(region: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(repr(region.shape).encode())
    h.update(np.packbits(region).tobytes())
    return h.hexdigest()


def _objects(image: np.ndarray, masks: np.ndarray, scores: np.ndarray, label: str
             ) -> ObjectList:
    masks = masks[:MAX_OBJECTS]
    scores = np.asarray(scores, np.float32)[:MAX_OBJECTS]
    return ObjectList(boxes_from_masks(masks), scores, [label] * len(masks), masks,
                      tuple(image.shape[:2]))


def _check_image(image: Any, what: str = "image") -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
            and image.dtype == np.uint8 and image.shape[0] > 0 and image.shape[1] > 0):
        raise ModuleInputError(f"{what} must be an H x W x 3 uint8 image")
    return image


def _check_objects(image: np.ndarray, obj: ObjectList) -> None:
    if obj.image_size not in ((0, 0), tuple(image.shape[:2])):
        raise ModuleInputError(f"the objects were found in a {obj.image_size[1]}x"
                               f"{obj.image_size[0]} image, not this {image.shape[1]}x"
                               f"{image.shape[0]} one")


def parse_list(text: str, max_items: int) -> List[str]:
    """A generated answer -> at most ``max_items`` distinct items (one per line or comma;
    bullets, numbering and quotes stripped)."""
    parts = re.split(r"[\n,;]+", text)
    out: List[str] = []
    for p in parts:
        p = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*", "", p).strip().strip("\"'").strip()
        p = p.rstrip(".").strip()
        if p and p.lower() not in {x.lower() for x in out} and len(p) <= 200:
            out.append(p)
        if len(out) >= max_items:
            break
    return out


# ====================================================================================== ops
class Ops:
    """What the modules need from the models; every method is a coroutine. Implementations:
    ``LocalOps`` (in-process facades) and ``ServedOps`` (deployment handles)."""

    can_point: bool = False
    has_vlm: bool = False
    has_text: bool = False

    async def sam_embedding(self, image: np.ndarray) -> Any: ...
    async def sam_point_masks(self, image: np.ndarray, state: Any, points: np.ndarray
                              ) -> Tuple[np.ndarray, np.ndarray]: ...
    async def sam_auto(self, image: np.ndarray, state: Any) -> Tuple[np.ndarray, np.ndarray]: ...
    async def clip_images(self, images: List[np.ndarray]) -> np.ndarray: ...
    async def clip_classes(self, labels: Tuple[str, ...]) -> Tuple[np.ndarray, float]: ...
    async def vlm_point(self, image: np.ndarray, phrase: str) -> Dict[str, Any]: ...
    async def vlm_answer(self, image: np.ndarray, question: str, max_new_tokens: int) -> str: ...
    async def generate_text(self, prompt: str) -> str: ...


class _StatePredictor:
    """A ``SamPredictor`` view whose ``encode_image`` returns a given state for the run's image
    (so the automatic mask generator reuses the run's SAM embedding instead of encoding again)."""

    def __init__(self, predictor: Any, image: np.ndarray, state: Any) -> None:
        self._p, self._shape, self._state = predictor, image.shape, state

    def encode_image(self, image, image_format: str = "RGB"):
        if tuple(np.shape(image)) == tuple(self._shape) and image_format == "RGB":
            return self._state  # AMG crop layer 0 is the whole image
        return self._p.encode_image(image, image_format)

    def __getattr__(self, name):
        return getattr(self._p, name)


class LocalOps(Ops):
    """In-process models. ``clip``: ``ClipRuntime``; ``sam``: ``SamPredictor``; ``vlm``: the VLM
    facade (``generate``, ``point``, ``family``) or None; ``text``: a ``cupl.TextSource``, a
    ``prompt -> str`` callable or None. Model calls run in ``pool`` threads (torch releases the
    GIL, so independent steps overlap)."""

    def __init__(self, clip: Any, sam: Any, vlm: Any = None, text: Any = None, *,
                 config: Optional[ModuleConfig] = None, workers: int = 4) -> None:
        self.clip, self.sam, self.vlm, self.text = clip, sam, vlm, text
        self.config = config or ModuleConfig()
        self.pool = cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="fmrt-chain-ops")
        self.has_vlm = vlm is not None
        self.has_text = text is not None
        p = self.config.pointing
        self.can_point = bool(vlm is not None and (p if p is not None else
                                                   getattr(vlm, "family", "") == "llava"))
        self.counts: Dict[str, int] = {}  # model calls by kind (tests and benchmarks read it)
        # SAM (stateless with image_state=) and CLIP encoders run concurrently; the VLM facade
        # generates with per-call caches but is not documented thread-safe, and the CLIP
        # runtime's label cache is an OrderedDict: both are serialised.
        self._vlm_lock = threading.Lock()
        self._text_lock = threading.Lock()

    def _n(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def sam_embedding(self, image):
        self._n("sam_embedding")
        return await self._run(self.sam.encode_image, image)

    async def sam_point_masks(self, image, state, points):
        pts = np.asarray(points, np.float64).reshape(-1, 1, 2)
        self._n("sam_decode")
        masks, scores, _ = await self._run(
            lambda: self.sam.predict_batch(pts, np.ones(pts.shape[:2], np.float32),
                                           select="best", image_state=state))
        return masks[:, 0], scores[:, 0]

    async def sam_auto(self, image, state):
        from fmrt.runtime.sam_amg import SamAutomaticMaskGenerator

        def run():
            gen = SamAutomaticMaskGenerator(self.sam, output_mode="binary_mask",
                                            **self.config.amg)
            gen.predictor = _StatePredictor(self.sam, image, state)
            recs = gen.generate(image)
            if not recs:
                return np.zeros((0,) + image.shape[:2], bool), np.zeros(0, np.float32)
            return (np.stack([r["segmentation"] for r in recs]),
                    np.array([r["predicted_iou"] for r in recs], np.float32))

        self._n("sam_auto")
        return await self._run(run)

    async def clip_images(self, images):
        self._n("clip_images")
        return await self._run(self.clip.encode_image, images)

    async def clip_classes(self, labels):
        self._n("clip_text")
        def encode():
            with self._text_lock:
                return self.clip.text_classifier(list(labels), self.config.templates)

        w = await self._run(encode)
        return w, float(self.clip.logit_scale)

    async def vlm_point(self, image, phrase):
        if self.vlm is None:
            raise ModuleUnavailableError("no VLM configured for pointing")
        self._n("vlm_point")
        def point():
            with self._vlm_lock:
                return self.vlm.point(image, phrase)

        return await self._run(point)

    async def vlm_answer(self, image, question, max_new_tokens):
        if self.vlm is None:
            raise ModuleUnavailableError("Vqa needs a VLM; none is configured")
        self._n("vlm_answer")
        def answer():
            with self._vlm_lock:
                return self.vlm.generate([image], question, max_new_tokens=max_new_tokens)

        return await self._run(answer)

    async def generate_text(self, prompt):
        if self.text is None:
            raise ModuleUnavailableError("List needs a text-generation client; none is "
                                         "configured")
        self._n("text")
        return await self._run(_call_text, self.text, prompt)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _call_text(source: Any, prompt: str) -> str:
    """A ``cupl.TextSource`` (``generate(prompt, Sampling) -> [str]``) or ``prompt -> str``."""
    gen = getattr(source, "generate", None)
    if gen is not None:
        from fmrt.chain.cupl import Sampling

        outs = gen(prompt, Sampling(n=1, temperature=0.0, max_tokens=128))
        return str(outs[0]) if outs else ""
    return str(source(prompt))


class ServedOps(Ops):
    """Deployment handles: ``clip`` (``ClipEncoder``), ``sam`` (``{"encoder", "decoder"}``),
    ``vlm`` (the VLM server: ``point``, ``answer``) and ``text`` (an async/sync ``prompt -> str``
    callable or a handle with ``generate``). Every call has ``timeout_s``."""

    def __init__(self, clip: Any = None, sam: Optional[Dict[str, Any]] = None, vlm: Any = None,
                 text: Any = None, *, config: Optional[ModuleConfig] = None,
                 pointing: Optional[bool] = None, timeout_s: float = 60.0) -> None:
        self.clip, self.sam, self.vlm, self.text = clip, sam or {}, vlm, text
        self.config = config or ModuleConfig()
        self.timeout_s = float(timeout_s)
        self.has_vlm = vlm is not None
        self.has_text = text is not None
        self.can_point = bool(vlm is not None and (pointing if pointing is not None
                                                   else self.config.pointing))
        self._classes: Dict[Tuple, Tuple[np.ndarray, float]] = {}  # label lists, across runs
        self._logit_scale: Optional[float] = None
        self.counts: Dict[str, int] = {}

    def _n(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _need(self, what: str, h: Any) -> Any:
        if h is None:
            raise ModuleUnavailableError(f"no {what} deployment is configured")
        return h

    async def _call(self, response):
        try:
            return await asyncio.wait_for(_await(response), self.timeout_s)
        except asyncio.TimeoutError:
            try:
                response.cancel()
            except Exception:
                pass
            raise TimeoutError(f"the model did not answer within {self.timeout_s:g} s") from None
        except Exception as e:
            # a replica's exception arrives wrapped (RayTaskError, whose text is a traceback):
            # the step error should carry what the replica raised
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    async def sam_embedding(self, image):
        self._n("sam_embedding")
        out = await self._call(self._need("SAM", self.sam.get("encoder")).embed.remote(image))
        return out["image_id"]

    async def sam_point_masks(self, image, image_id, points):
        from fmrt.kernels import coco_string_to_rle, rle_to_mask

        dec = self._need("SAM", self.sam.get("decoder"))
        self._n("sam_decode")
        # one request per point: the decoder's @serve.batch groups them into one decode
        outs = await asyncio.gather(*(self._call(dec.predict.remote(
            {"points": [[float(x), float(y)]], "labels": [1], "multimask_output": True,
             "return_lowres": False}, image_id=image_id)) for x, y in points))
        masks, scores = [], []
        for o in outs:
            j = int(np.argmax(o["scores"]))
            r = o["masks"][j]
            masks.append(rle_to_mask(coco_string_to_rle(r["counts"], r["size"])))
            scores.append(o["scores"][j])
        if not masks:
            return np.zeros((0,) + image.shape[:2], bool), np.zeros(0, np.float32)
        return np.stack(masks).astype(bool), np.asarray(scores, np.float32)

    async def sam_auto(self, image, image_id):
        from fmrt.kernels import coco_string_to_rle, rle_to_mask

        self._n("sam_auto")
        out = await self._call(self._need("SAM", self.sam.get("encoder")).auto.remote(
            image, dict(self.config.amg)))
        recs = out["masks"]
        if not recs:
            return np.zeros((0,) + image.shape[:2], bool), np.zeros(0, np.float32)
        masks = np.stack([rle_to_mask(coco_string_to_rle(r["segmentation"]["counts"],
                                                         r["segmentation"]["size"]))
                          for r in recs]).astype(bool)
        return masks, np.array([r["predicted_iou"] for r in recs], np.float32)

    async def clip_images(self, images):
        self._n("clip_images")
        return np.asarray(await self._call(self._need("CLIP", self.clip).embed_images.remote(
            list(images))), np.float32)

    async def clip_classes(self, labels):
        key = (tuple(labels), self.config.templates)
        hit = self._classes.get(key)
        if hit is not None:
            return hit
        from fmrt.data.vocab import apply_template

        clip = self._need("CLIP", self.clip)
        if self._logit_scale is None:
            info = await self._call(clip.info.remote())
            self._logit_scale = float(info.get("logit_scale", 100.0))
            self._templates = tuple(info.get("templates") or ("{}",))
        templates = self.config.templates or self._templates
        self._n("clip_text")
        emb = np.asarray(await self._call(clip.embed_texts.remote(
            [apply_template(t, lbl) for lbl in labels for t in templates])), np.float32)
        emb = emb.reshape(len(labels), len(templates), -1).mean(axis=1)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True).clip(min=1e-12)
        if len(self._classes) > 64:
            self._classes.pop(next(iter(self._classes)))
        self._classes[key] = (emb, self._logit_scale)
        return emb, self._logit_scale

    async def vlm_point(self, image, phrase):
        self._n("vlm_point")
        return await self._call(self._need("VLM", self.vlm).point.remote(image, phrase))

    async def vlm_answer(self, image, question, max_new_tokens):
        if self.vlm is None:
            raise ModuleUnavailableError("Vqa needs a VLM; none is configured")
        self._n("vlm_answer")
        return await self._call(self.vlm.answer.remote([image], question, max_new_tokens))

    async def generate_text(self, prompt):
        if self.text is None:
            raise ModuleUnavailableError("List needs a text-generation client; none is "
                                         "configured")
        self._n("text")
        gen = getattr(self.text, "generate", None)
        if gen is not None and hasattr(gen, "remote"):
            return str(await self._call(gen.remote(prompt)))
        out = await asyncio.to_thread(_call_text, self.text, prompt)
        return await _await(out) if asyncio.iscoroutine(out) else out


async def _await(x):
    return await x


# ====================================================================================== modules
class ModelModules:
    """The model-backed module functions over one ``Ops``; ``functions()`` gives the
    name -> async callable table (``StepContext`` first, then the step's arguments)."""

    def __init__(self, ops: Ops, config: Optional[ModuleConfig] = None) -> None:
        self.ops = ops
        self.config = config or getattr(ops, "config", None) or ModuleConfig()

    # ------------------------------------------------------------------ cached features
    async def sam_embedding(self, ctx: StepContext, image: np.ndarray) -> Any:
        return await ctx.cache.aget_or_compute(("sam_embedding", ctx.image_key(image)),
                                               lambda: self.ops.sam_embedding(image))

    async def candidates(self, ctx: StepContext, image: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray]:
        """Automatic masks of ``image``, cleaned to one per object (cached per run)."""
        async def compute():
            state = await self.sam_embedding(ctx, image)
            masks, scores = await self.ops.sam_auto(image, state)
            cfg = self.config
            keep, cleaned = clean_masks(masks, scores, max_area_frac=cfg.max_area_frac,
                                        part_overlap=cfg.part_overlap)
            scores = scores[keep]
            hw = image.shape[0] * image.shape[1]
            min_area = max(4, int(cfg.min_object_frac * hw))
            covered = cleaned.any(axis=0) if len(cleaned) else np.zeros(image.shape[:2], bool)
            small = masks[masks.reshape(len(masks), -1).sum(1) <= cfg.max_area_frac * hw]
            seeds = residual_seeds(small, covered, min_area)
            if len(seeds):  # objects only a dropped (merged) mask held: prompt SAM there
                extra, extra_scores = await self.ops.sam_point_masks(image, state, seeds)
                add_m, add_s = [], []
                for m, sc in zip(extra, extra_scores):
                    m = largest_component(m & ~covered) if m.any() else m
                    if m.sum() >= min_area:
                        add_m.append(m)
                        add_s.append(sc)
                        covered = covered | m
                if add_m:
                    cleaned = np.concatenate([cleaned, np.stack(add_m)])
                    scores = np.concatenate([scores, np.asarray(add_s, np.float32)])
            return cleaned, scores

        return await ctx.cache.aget_or_compute(("sam_auto", ctx.image_key(image)), compute)

    async def object_embeddings(self, ctx: StepContext, image: np.ndarray, regions: np.ndarray
                                ) -> np.ndarray:
        """``N x E`` CLIP embeddings of the isolated regions (each computed once per run; the
        new ones in one batched call)."""
        if len(regions) == 0:
            return np.zeros((0, 1), np.float32)
        ik = ctx.image_key(image)
        keys = [("clip_object", ik, _region_key(r)) for r in regions]

        async def compute(idx: List[int]) -> List[np.ndarray]:
            ims = isolate_objects(image, regions)
            emb = await self.ops.clip_images([ims[i] for i in idx])
            return list(emb)

        return np.stack(await ctx.cache.aget_or_compute_many(keys, compute))

    async def class_probs(self, ctx: StepContext, emb: np.ndarray, labels: Sequence[str]
                          ) -> np.ndarray:
        """``N x L`` CLIP probabilities of the embeddings over ``labels``."""
        labels = tuple(labels)
        w, scale = await ctx.cache.aget_or_compute(("clip_text", labels),
                                                   lambda: self.ops.clip_classes(labels))
        logits = scale * emb @ w.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    async def match(self, ctx: StepContext, image: np.ndarray, regions: np.ndarray,
                    phrase: str) -> np.ndarray:
        """Score in [0, 1] of each region for ``phrase`` (see the module docstring); a region
        matches when its score > ``config.match_threshold``."""
        if len(regions) == 0:
            return np.zeros(0, np.float32)
        emb = await self.object_embeddings(ctx, image, regions)
        q = parse_phrase(phrase)
        if q is not None:
            labels, attrs = _world_classes()
            p = await self.class_probs(ctx, emb, labels)
            ok = np.array([all(q[k] is None or q[k] == v
                               for k, v in zip(("size", "color", "shape"), a)) for a in attrs])
            return p[:, ok].sum(axis=1).astype(np.float32)
        phrase_n = " ".join(phrase.lower().split())
        labels = [phrase_n] + [c for c in _contrast_classes() if c != phrase_n]
        p = await self.class_probs(ctx, emb, labels)
        return np.where(p.argmax(axis=1) == 0, np.maximum(p[:, 0], 0.5 + 1e-6),
                        np.minimum(p[:, 0], 0.5)).astype(np.float32)

    # ------------------------------------------------------------------ modules
    async def Loc(self, ctx: StepContext, image: np.ndarray, object: str) -> ObjectList:
        image = _check_image(image)
        phrase = _phrase(object, "object")
        if self.ops.can_point:
            return await self._loc_point(ctx, image, phrase)
        masks, _ = await self.candidates(ctx, image)
        scores = await self.match(ctx, image, masks, phrase)
        keep = np.flatnonzero(scores > self.config.match_threshold)
        return _objects(image, masks[keep], scores[keep], phrase)

    async def _loc_point(self, ctx: StepContext, image: np.ndarray, phrase: str
                         ) -> ObjectList:
        ans = await ctx.cache.aget_or_compute(
            ("vlm_point", ctx.image_key(image), phrase),
            lambda: self.ops.vlm_point(image, phrase))
        objs, _ = await self._segment_points(ctx, image, phrase, ans)
        return objs

    async def _segment_points(self, ctx: StepContext, image: np.ndarray, phrase: str,
                              ans: Dict[str, Any]) -> Tuple[ObjectList, np.ndarray]:
        """SAM prompted with each of the VLM's points (best of the 3 multimask outputs), masks
        cut to their largest component; masks of background-sized regions (a point that missed
        every object) and duplicates (mask IoU > ``dedup_iou``: two points on one object)
        dropped. Returns (objects, their points)."""
        h, w = image.shape[:2]
        try:
            pts = np.asarray(ans.get("points") or [], np.float64).reshape(-1, 2)[:MAX_POINTS]
        except (TypeError, ValueError):
            raise ModuleInputError(f"the VLM's points are not (x, y) pairs: "
                                   f"{str(ans.get('points'))[:100]}") from None
        pts = pts[np.isfinite(pts).all(axis=1)]
        pts = np.clip(pts, 0, [w - 1, h - 1])  # a point a pixel off the edge still counts
        if len(pts) == 0:
            return ObjectList.empty((h, w)), pts
        state = await self.sam_embedding(ctx, image)
        masks, scores = await self.ops.sam_point_masks(image, state, pts)
        masks = np.stack([largest_component(m) if m.any() else m for m in masks])
        area = masks.reshape(len(masks), -1).sum(1)
        ok = (area > 0) & (area <= self.config.max_area_frac * h * w)
        keep = dedup_masks(np.where(ok[:, None, None], masks, False), scores,
                           self.config.dedup_iou)
        keep = np.sort(keep)
        return _objects(image, masks[keep], scores[keep], phrase), pts[keep]

    async def point_segment(self, ctx: StepContext, image: np.ndarray, phrase: str
                            ) -> Tuple[ObjectList, np.ndarray, Optional[int], str]:
        """The pointing -> segmenting graph: (objects, ``K x 2`` points, the VLM's count, its
        text). One mask per object (``_segment_points``)."""
        image = _check_image(image)
        phrase = _phrase(phrase, "phrase")
        ans = await self.ops.vlm_point(image, phrase)
        objs, pts = await self._segment_points(ctx, image, phrase, ans)
        return objs, pts, ans.get("count"), str(ans.get("text", ""))

    async def Seg(self, ctx: StepContext, image: np.ndarray) -> ObjectList:
        image = _check_image(image)
        masks, scores = await self.candidates(ctx, image)
        return _objects(image, masks, scores, "object")

    async def Select(self, ctx: StepContext, image: np.ndarray, object: ObjectList, query: str,
                     category: Optional[str] = None) -> ObjectList:
        image = _check_image(image)
        _check_objects(image, object)
        phrase = _phrase(query, "query")
        if category and category.lower() not in phrase.lower():
            phrase = f"{phrase} {category}"
        if len(object) == 0:
            return object
        scores = await self.match(ctx, image, object_regions(image, object), phrase)
        keep = np.flatnonzero(scores > self.config.match_threshold)
        out = object.subset(keep.tolist())
        out.scores = scores[keep]
        return out

    async def Classify(self, ctx: StepContext, image: np.ndarray, object: ObjectList,
                       categories: Any) -> ObjectList:
        image = _check_image(image)
        _check_objects(image, object)
        cats = _categories(categories)
        if len(object) == 0:
            return object
        emb = await self.object_embeddings(ctx, image, object_regions(image, object))
        p = await self.class_probs(ctx, emb, cats)
        j = p.argmax(axis=1)
        return ObjectList(object.boxes, p[np.arange(len(j)), j], [cats[i] for i in j],
                          object.masks, object.image_size)

    async def Vqa(self, ctx: StepContext, image: np.ndarray, question: str) -> str:
        image = _check_image(image)
        q = _phrase(question, "question")
        ans = await self.ops.vlm_answer(image, q, self.config.vqa_max_new_tokens)
        return " ".join(str(ans).split())[:500]

    async def List(self, ctx: StepContext, query: str, max: Any = 5) -> List[str]:
        q = _phrase(query, "query")
        if isinstance(max, bool) or not isinstance(max, (int, float)) or max != int(max) \
                or not 1 <= int(max) <= MAX_LIST_ITEMS:
            raise ModuleInputError(f"max must be an integer in [1, {MAX_LIST_ITEMS}], "
                                   f"got {max!r}")
        n = int(max)
        text = await self.ops.generate_text(
            f"List up to {n} {q}. Answer with one item per line and nothing else.")
        return parse_list(text, n)

    def functions(self) -> Dict[str, ModuleFn]:
        return {"Loc": self.Loc, "Seg": self.Seg, "Select": self.Select,
                "Classify": self.Classify, "Vqa": self.Vqa, "List": self.List}


def _phrase(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ModuleInputError(f"{what} must be non-empty text")
    return " ".join(v.split())[:500]


def _categories(v: Any) -> List[str]:
    if isinstance(v, str):
        v = [s for s in (x.strip() for x in v.split(",")) if s]
    cats = [" ".join(str(s).split()) for s in v]
    if not cats or not all(cats):
        raise ModuleInputError("categories must be a non-empty list of names")
    if len(cats) > 1000:
        raise ModuleInputError(f"at most 1000 categories, got {len(cats)}")
    return list(dict.fromkeys(cats))


# ====================================================================================== bindings
def _load(x: Any, backend: str, **kw) -> Any:
    if x is None or not isinstance(x, str):
        return x
    import fmrt

    return fmrt.load(x, backend=backend, **kw)


def local_modules(clip: Any = "shapes-clip", sam: Any = "shapes-sam", vlm: Any = None, *,
                  text: Any = None, backend: str = "torch",
                  config: Optional[ModuleConfig] = None, workers: int = 4,
                  sam_embedding_cache: int = 0) -> Dict[str, ModuleFn]:
    """Every module (builtins + model-backed) bound to in-process models.

    ``clip``/``sam``/``vlm``: a bundled name or model directory (loaded with
    ``fmrt.load(..., backend=backend)``) or an already-loaded facade; ``vlm=None``: ``Vqa``
    fails with a step error and ``Loc`` uses SAM automatic masks + CLIP. ``text``: a
    ``fmrt.chain.cupl.TextSource`` or a ``prompt -> str`` callable for ``List``.
    ``sam_embedding_cache``: the SAM predictor's own cross-run embedding cache when ``sam`` is
    loaded here (0: reuse only within a run, via ``ctx.cache``).

    ``ops_of(modules)`` is the ``LocalOps`` behind the table (its ``counts`` are model calls
    by kind; ``.sam.encoder_runs`` counts SAM image-encoder runs)."""
    c = _load(clip, backend)
    s = sam
    if isinstance(sam, str):
        import fmrt

        s = fmrt.load(sam, backend=backend, embedding_cache=sam_embedding_cache)
    v = _load(vlm, backend)
    ops = LocalOps(c, s, v, text, config=config, workers=workers)
    mods = builtin_modules()
    mods.update(ModelModules(ops, config).functions())
    return mods


def served_modules(ops: ServedOps, config: Optional[ModuleConfig] = None
                   ) -> Dict[str, ModuleFn]:
    """Every module bound to deployment handles (``ServedOps``)."""
    mods = builtin_modules()
    mods.update(ModelModules(ops, config).functions())
    return mods


def ops_of(modules: Dict[str, ModuleFn]) -> Ops:
    """The ``Ops`` behind a ``local_modules``/``served_modules`` table."""
    return modules["Loc"].__self__.ops  # type: ignore[attr-defined]


__all__ = ["ModuleConfig", "ModelModules", "LocalOps", "ServedOps", "Ops", "local_modules",
           "served_modules", "ops_of", "parse_phrase", "parse_list", "isolate_objects",
           "clean_masks", "residual_seeds", "largest_component", "dedup_masks",
           "boxes_from_masks", "mask_iou",
           "ModuleUnavailableError", "ModuleInputError", "MAX_LIST_ITEMS"]
