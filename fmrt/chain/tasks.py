"""Visual-program tasks on held-out ShapesWorld data, scored against ground truth.

Tasks (``fmrt.data.program_data``; test split = held-out scenes *and* held-out instruction
wording / attribute combinations):

* NLVR-style statements over two images (``total``, ``compare``, ``both``, ``neither``, ``one``,
  ``side``): the program's Bool result against the statement's truth;
* ``count``: the Number result against the true count;
* ``tag`` ("tag the red shapes"): the result must be the input image with boxes drawn; the boxes
  the ``Tag`` step drew are matched one-to-one with the ground-truth boxes of the matching objects
  (greedy by IoU, a match needs IoU >= 0.5), and every drawn box must show on the output image
  (its corner pixel in the Tag colour). Correct = every true object matched, nothing extra.
* ``segment`` ("segment the stars"): the result is a colour-pop image. The objects ``ColorPop``
  kept are matched to the true instance masks (mask IoU >= 0.5, one-to-one), and the *image*
  itself is checked: its coloured pixels (channel spread > 40; the background and everything
  popped to gray have none) against the union of the true masks (IoU >= 0.5). Correct = both.

Each task is run with the reference program ("given") and with the program a generator writes
from the instruction ("generated"; an instruction without a valid program counts as wrong),
through ``fmrt.chain.executor.Executor`` with any module table: ``local_modules(clip=, sam=,
vlm=)`` of ``fmrt.chain.modules`` (real models), or ``oracle_modules`` built from the scenes'
ground truth (an upper bound that checks the programs themselves: every reference program
scores 1.0 with it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from fmrt.chain.executor import Executor, ModuleFn, RunCache, RunResult, builtin_modules, image_key
from fmrt.chain.program import ObjectList, Program, ProgramError, Ref, parse_program
from fmrt.data import program_data as D

IOU_MATCH = 0.5
COLOR_SPREAD = 40  # ShapesWorld colours have max-min channel spread >= 130; gray/background 0
TAG_RGB = (255, 0, 0)  # fmrt.chain.executor._tag's outline colour


class TaskError(ValueError):
    """Bad arguments to a task evaluation (unknown module source, no examples...)."""


# ---------------------------------------------------------------------------------- oracle
def _phrase_filter(text: str):
    from fmrt.chain.modules import parse_phrase

    q = parse_phrase(text)
    if q is None:
        raise ValueError(f"oracle: {text!r} is not a ShapesWorld object phrase")
    return lambda o: all(q[k] is None or getattr(o, k) == q[k] for k in ("size", "color",
                                                                          "shape"))


class OracleModules:
    """Ground-truth ``Loc``/``Seg``/``Select``/``Classify``/``Vqa`` for registered scenes
    (looked up by image content), plus the builtin modules. An image that was not registered
    is a step error."""

    def __init__(self) -> None:
        self._scenes: Dict[str, Any] = {}

    def register(self, image: np.ndarray, scene) -> None:
        self._scenes[image_key(image)] = scene

    def _scene(self, image: np.ndarray):
        sc = self._scenes.get(image_key(image))
        if sc is None:
            raise KeyError("oracle: unknown image (not a registered scene)")
        return sc

    @staticmethod
    def _objects(scene, idx: Sequence[int]) -> ObjectList:
        masks = scene.masks()
        S = scene.image_size
        return ObjectList(scene.boxes()[list(idx)].astype(np.float32), np.ones(len(idx)),
                          [scene.objects[i].describe() for i in idx],
                          masks[list(idx)] if len(idx) else np.zeros((0, S, S), bool), (S, S))

    def _identify(self, scene, obj: ObjectList) -> List[int]:
        """Scene index of each object of ``obj`` (best box IoU)."""
        gt = scene.boxes().astype(np.float32)
        return [int(np.argmax(box_iou(b[None], gt)[0])) if len(gt) else -1 for b in obj.boxes]

    def Loc(self, ctx, image, object):
        sc = self._scene(image)
        f = _phrase_filter(object)
        return self._objects(sc, [i for i, o in enumerate(sc.objects) if f(o)])

    def Seg(self, ctx, image):
        sc = self._scene(image)
        return self._objects(sc, list(range(len(sc.objects))))

    def Select(self, ctx, image, object, query, category=None):
        sc = self._scene(image)
        f = _phrase_filter(query if not category else f"{query} {category}")
        ids = self._identify(sc, object)
        return object.subset([j for j, i in enumerate(ids) if i >= 0 and f(sc.objects[i])])

    def Classify(self, ctx, image, object, categories):
        sc = self._scene(image)
        cats = [c.strip() for c in (categories.split(",") if isinstance(categories, str)
                                    else categories) if c.strip()]
        labels = []
        for i in self._identify(sc, object):
            hit = [c for c in cats if i >= 0 and _phrase_filter(c)(sc.objects[i])]
            labels.append(hit[0] if hit else cats[0])
        return ObjectList(object.boxes, np.ones(len(object)), labels, object.masks,
                          object.image_size)

    def Vqa(self, ctx, image, question):
        from fmrt.data.language import answer

        return answer(self._scene(image), question)

    def functions(self) -> Dict[str, ModuleFn]:
        mods = builtin_modules()
        mods.update({"Loc": self.Loc, "Seg": self.Seg, "Select": self.Select,
                     "Classify": self.Classify, "Vqa": self.Vqa})
        return mods


def oracle_modules(examples: Sequence[D.TaskExample] = ()) -> Dict[str, ModuleFn]:
    """An oracle module table knowing the scenes of ``examples``."""
    o = OracleModules()
    for ex in examples:
        for k, img in ex.images.items():
            o.register(img, ex.scenes[k])
    return o.functions()


# ---------------------------------------------------------------------------------- scoring
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A x 4``, ``B x 4`` boxes ``(x0, y0, x1, y1)`` (inclusive-exclusive) -> ``A x B``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0],
                                                                        b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1],
                                                                        b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def match(iou: np.ndarray, thr: float = IOU_MATCH) -> List[Tuple[int, int, float]]:
    """Greedy one-to-one matching (highest IoU first) of a ``P x G`` IoU matrix: ``(p, g,
    iou)`` pairs with IoU >= ``thr``."""
    pairs = sorted(((float(iou[p, g]), p, g) for p in range(iou.shape[0])
                    for g in range(iou.shape[1]) if iou[p, g] >= thr), reverse=True)
    used_p, used_g, out = set(), set(), []
    for v, p, g in pairs:
        if p not in used_p and g not in used_g:
            used_p.add(p)
            used_g.add(g)
            out.append((p, g, v))
    return out


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa = a.reshape(a.shape[0], -1).astype(np.float32)
    fb = b.reshape(b.shape[0], -1).astype(np.float32)
    inter = fa @ fb.T
    return inter / np.maximum(fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter, 1.0)


def _step_input(program: Program, run: RunResult, module: str) -> Optional[ObjectList]:
    """The ObjectList the step producing RESULT read, when that step is ``module``."""
    st = program.by_target.get(program.result)
    if st is not None and st.module == "Result" and isinstance(st.args.get("var"), Ref):
        st = program.by_target.get(st.args["var"].name)
    if st is None or st.module != module or not isinstance(st.args.get("object"), Ref):
        return None
    v = run.values.get(st.args["object"].name)
    return v if isinstance(v, ObjectList) else None


@dataclass
class TaskScore:
    kind: str
    correct: bool
    detail: Dict[str, Any] = field(default_factory=dict)


def score(ex: D.TaskExample, program: Optional[Program], run: Optional[RunResult]) -> TaskScore:
    """Score one run of ``program`` on ``ex`` (None program/run = no valid program)."""
    if program is None or run is None:
        return TaskScore(ex.kind, False, {"error": "no valid program"})
    if not run.ok:
        return TaskScore(ex.kind, False, {"error": run.error.to_dict() if run.error else
                                          "run failed"})
    res = run.result
    if ex.kind in D.NLVR_KINDS:
        return TaskScore(ex.kind, isinstance(res, bool) and res == ex.answer,
                         {"result": res, "answer": ex.answer})
    if ex.kind == "count":
        ok = isinstance(res, (int, float)) and not isinstance(res, bool) and res == ex.answer
        return TaskScore(ex.kind, bool(ok), {"result": res, "answer": ex.answer})
    src = ex.images["IMAGE"]
    scene = ex.scenes["IMAGE"]
    if not (isinstance(res, np.ndarray) and res.shape == src.shape):
        return TaskScore(ex.kind, False, {"error": "the result is not an image of the input's "
                                          "size"})
    gt_idx = list(ex.answer)
    if ex.kind == "tag":
        objs = _step_input(program, run, "Tag")
        if objs is None:
            return TaskScore(ex.kind, False, {"error": "RESULT is not a Tag step's output"})
        gt = scene.boxes()[gt_idx].astype(np.float32).reshape(-1, 4)
        m = match(box_iou(objs.boxes, gt)) if len(objs) and len(gt) else []
        drawn = all(tuple(res[min(int(y0), res.shape[0] - 1), min(int(x0), res.shape[1] - 1)])
                    == TAG_RGB for x0, y0, _, _ in objs.boxes)
        ok = len(m) == len(gt) == len(objs) and drawn
        return TaskScore(ex.kind, ok, {"pred": len(objs), "gt": len(gt), "matched": len(m),
                                       "drawn": drawn,
                                       "mean_iou": float(np.mean([v for *_, v in m]))
                                       if m else float(len(gt) == len(objs) == 0)})
    # segment
    objs = _step_input(program, run, "ColorPop")
    if objs is None:
        return TaskScore(ex.kind, False, {"error": "RESULT is not a ColorPop step's output"})
    gt_masks = scene.masks()[gt_idx] if gt_idx else np.zeros((0,) + src.shape[:2], bool)
    pm = objs.masks if objs.masks is not None else np.zeros((len(objs),) + src.shape[:2], bool)
    m = match(_mask_iou(pm, gt_masks)) if len(objs) and len(gt_idx) else []
    spread = res.max(axis=2).astype(np.int16) - res.min(axis=2).astype(np.int16)
    popped = spread > COLOR_SPREAD
    union = gt_masks.any(axis=0) if len(gt_idx) else np.zeros(src.shape[:2], bool)
    denom = (popped | union).sum()
    img_iou = float((popped & union).sum() / denom) if denom else 1.0
    ok = len(m) == len(gt_idx) == len(objs) and img_iou >= IOU_MATCH
    return TaskScore(ex.kind, ok, {"pred": len(objs), "gt": len(gt_idx), "matched": len(m),
                                   "image_iou": img_iou})


# ---------------------------------------------------------------------------------- running
def run_tasks(examples: Sequence[D.TaskExample], modules: Mapping[str, ModuleFn],
              programs: Optional[Sequence[Optional[str]]] = None, *,
              caches: Optional[List[RunCache]] = None, time_limit_s: float = 60.0
              ) -> List[TaskScore]:
    """Run and score each example's program (``programs[i]``; default the reference program;
    None = no valid program). ``caches``: one ``RunCache`` per example, shared between calls
    (so a second program over the same images reuses the per-image features)."""
    programs = [ex.program for ex in examples] if programs is None else list(programs)
    if len(programs) != len(examples):
        raise TaskError(f"{len(programs)} programs for {len(examples)} examples")
    out: List[TaskScore] = []
    with Executor(modules, trace_images=False, time_limit_s=time_limit_s) as exe:
        for i, (ex, text) in enumerate(zip(examples, programs)):
            if text is None:
                out.append(score(ex, None, None))
                continue
            try:
                prog = parse_program(text, ex.inputs)
            except ProgramError:
                out.append(score(ex, None, None))
                continue
            run = exe.run(prog, ex.images, cache=caches[i] if caches is not None else None)
            out.append(score(ex, prog, run))
    return out


def summarize(scores: Sequence[TaskScore]) -> Dict[str, float]:
    """Accuracy overall, on the NLVR statements, and per kind; mean IoUs of the image tasks."""
    def acc(xs):
        return float(np.mean([s.correct for s in xs])) if xs else float("nan")

    out = {"accuracy": acc(scores),
           "nlvr": acc([s for s in scores if s.kind in D.NLVR_KINDS])}
    for k in D.KINDS:
        xs = [s for s in scores if s.kind == k]
        if xs:
            out[k] = acc(xs)
    tag = [s.detail["mean_iou"] for s in scores if s.kind == "tag" and "mean_iou" in s.detail]
    seg = [s.detail["image_iou"] for s in scores if s.kind == "segment" and
           "image_iou" in s.detail]
    if tag:
        out["tag_box_iou"] = float(np.mean(tag))
    if seg:
        out["segment_image_iou"] = float(np.mean(seg))
    return out


def _modules(spec: Any, examples, *, clip: str, sam: str, vlm: Optional[str], backend: str
             ) -> Tuple[Dict[str, ModuleFn], str]:
    if isinstance(spec, Mapping):
        return dict(spec), "custom"
    if spec == "oracle":
        return oracle_modules(examples), "oracle"
    if spec == "local":
        from fmrt.chain.modules import local_modules

        return (local_modules(clip=clip, sam=sam, vlm=vlm, backend=backend),
                f"local(clip={clip}, sam={sam}, vlm={vlm}, {backend})")
    raise TaskError(f"modules must be 'oracle', 'local' or a module table, got {spec!r}")


def evaluate_program_tasks(n: int = 270, *, split: str = "test", seed: int = 0,
                           modules: Any = "oracle", generator: Any = "shapes-programs",
                           kinds: Sequence[str] = D.KINDS, clip: str = "shapes-clip",
                           sam: str = "shapes-sam", vlm: Optional[str] = None,
                           backend: str = "torch") -> Dict[str, Any]:
    """Run ``n`` tasks (kinds round-robin) with the reference programs and with generated ones.

    ``modules``: ``"oracle"`` (ground truth), ``"local"`` (``fmrt.chain.modules.local_modules``
    with ``clip``/``sam``/``vlm`` on ``backend``) or a module table. ``generator``: a bundled
    program-LM name / model dir (``LocalProgramGenerator``), a generator object (``generate``
    method), or None (given programs only). Returns ``{"model", "n", "modules", "given": {...},
    "generated": {...}, "generation": {validity, exact_match, mean_attempts, ...}}``."""
    if n < 1:
        raise TaskError("n must be >= 1")
    t0 = time.perf_counter()
    examples = D.task_set(split, n, kinds, seed=seed)
    mods, mdesc = _modules(modules, examples, clip=clip, sam=sam, vlm=vlm, backend=backend)
    caches = [RunCache() for _ in examples]
    t1 = time.perf_counter()
    given = run_tasks(examples, mods, caches=caches)
    t_given = time.perf_counter() - t1
    report: Dict[str, Any] = {"model": f"programs[{mdesc.split('(')[0]}]", "n": n,
                              "modules": mdesc, "split": split,
                              "given": summarize(given)}
    report["given"]["seconds_per_task"] = round(t_given / n, 4)
    if generator is not None:
        from fmrt.chain.generate import LocalProgramGenerator, ProgramGenerationError

        gen = LocalProgramGenerator(generator) if isinstance(generator, str) else generator
        t2 = time.perf_counter()
        if hasattr(gen, "generate_many"):
            res = gen.generate_many([ex.instruction for ex in examples],
                                    [ex.inputs for ex in examples])
        else:
            res = []
            for ex in examples:
                try:
                    res.append(gen.generate(ex.instruction, ex.inputs))
                except ProgramGenerationError as e:
                    res.append(e)
        t_gen = time.perf_counter() - t2
        texts = [None if isinstance(r, ProgramGenerationError) else r.text for r in res]
        valid_first = [not isinstance(r, ProgramGenerationError) and len(r.attempts) == 1
                       for r in res]
        report["generation"] = {
            "validity": float(np.mean([t is not None for t in texts])),
            "validity_first_attempt": float(np.mean(valid_first)),
            "exact_match": float(np.mean([t == ex.program for t, ex in zip(texts, examples)])),
            "mean_attempts": float(np.mean([len(r.attempts) for r in res])),
            "ms_per_program": round(t_gen * 1e3 / n, 2),
        }
        t3 = time.perf_counter()
        generated = run_tasks(examples, mods, texts, caches=caches)
        report["generated"] = summarize(generated)
        report["generated"]["seconds_per_task"] = round((time.perf_counter() - t3) / n, 4)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


__all__ = ["OracleModules", "oracle_modules", "score", "run_tasks", "summarize",
           "evaluate_program_tasks", "TaskScore", "TaskError", "box_iou", "match"]
