"""Model-backed visual-program modules in process (``fmrt.chain.modules.local_modules``) on
ShapesWorld scenes with ground truth: Loc (SAM automatic masks + CLIP, and VLM pointing + SAM
with a fake pointing VLM), Seg mask IoU, Select, Classify, Count of Loc, Vqa/List through fake
clients, and per-run feature reuse (one SAM embedding / one automatic-mask run per image per run,
asserted on the run cache's statistics and on the predictor's encoder counter)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmrt.chain import Executor, parse_program
from fmrt.chain.executor import NoReuseCache
from fmrt.chain.modules import (ModuleConfig, local_modules, mask_iou, ops_of, parse_list,
                                parse_phrase)
from fmrt.data import ShapesWorld
from fmrt.data.sam_data import eval_scenes

IMAGE = {"IMAGE": "Image"}
TWO = {"LEFT": "Image", "RIGHT": "Image"}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mods():
    return local_modules("shapes-clip", "shapes-sam", None, backend="torch", workers=2)


@pytest.fixture(scope="module")
def ex(mods):
    e = Executor(mods, max_concurrency=4, time_limit_s=60)
    yield e
    e.close()


def _scene(attrs, seed=0):
    return ShapesWorld(image_size=64, seed=seed).sample_scene(rng=seed, attributes=attrs)


def _run(ex, text, inputs, types=IMAGE, **kw):
    r = ex.run(parse_program(text, types), inputs, **kw)
    assert r.ok, r.error
    return r


def _match(pred_masks, gt_masks):
    """Best IoU of each ground-truth mask against the predicted masks."""
    if len(pred_masks) == 0:
        return np.zeros(len(gt_masks))
    return mask_iou(gt_masks, pred_masks).max(axis=1)


RED_CIRCLES = [("circle", "red", "large"), ("circle", "red", "small"),
               ("square", "red", "small"), ("circle", "blue", "large"),
               ("star", "green", "small")]


def test_parse_phrase_and_list():
    assert parse_phrase("the red circles") == {"size": None, "color": "red", "shape": "circle"}
    assert parse_phrase("small stars") == {"size": "small", "color": None, "shape": "star"}
    assert parse_phrase("shapes") == {"size": None, "color": None, "shape": None}
    assert parse_phrase("red blue circle") is None  # contradictory
    assert parse_phrase("a dog") is None  # not ShapesWorld vocabulary -> generic route
    assert parse_list("1. red\n2. blue\n- green, red\n* yellow.", 3) == ["red", "blue", "green"]


def test_loc_finds_the_red_circles(ex):
    sc = _scene(RED_CIRCLES, seed=3)
    gt = sc.ground_truth()
    want = [i for i, o in enumerate(sc.objects) if (o.color, o.shape) == ("red", "circle")]
    assert len(sc.objects) == 5 and len(want) == 2
    r = _run(ex, "B=Loc(image=IMAGE, object='red circles')\nN=Count(object=B)\nRESULT=B",
             {"IMAGE": sc.render()})
    objs = r.result
    assert len(objs) == 2 and objs.masks is not None and objs.labels == ["red circles"] * 2
    assert (_match(objs.masks, gt["masks"][want]) > 0.85).all()
    # the boxes are the masks' tight boxes and each holds one red circle's centre
    for (x0, y0, x1, y1) in objs.boxes:
        assert sum(x0 <= cx < x1 and y0 <= cy < y1 for cx, cy in gt["points"][want]) == 1
    assert r.values["N"] == 2
    # trace: the Loc step's output summary carries boxes/scores; Count its number
    tr = {t.step: t for t in r.trace}
    assert tr["B"].status == "ok" and tr["B"].output["count"] == 2 and tr["N"].output == 2


def test_seg_masks_match_ground_truth(ex):
    ious, counts = [], []
    for sc in eval_scenes(6, seed=0):
        r = _run(ex, "S=Seg(image=IMAGE)\nRESULT=S", {"IMAGE": sc.render()})
        counts.append((len(r.result), len(sc.objects)))
        ious.extend(_match(r.result.masks, sc.masks()).tolist())
    assert all(a == b for a, b in counts), counts
    assert np.mean(ious) > 0.9 and min(ious) > 0.7, ious


def test_count_of_loc_on_held_out_scenes(ex):
    """Count(Loc(phrase)) == the ground-truth count, for colour, shape and colour+shape
    phrases (the CLIP route recognises ShapesWorld colour and shape words)."""
    ok = total = 0
    for i, sc in enumerate(eval_scenes(8, seed=1)):
        o = sc.objects[i % len(sc.objects)]
        for phrase, kw in ((f"{o.color} {o.shape}s", dict(color=o.color, shape=o.shape)),
                           (f"{o.shape}s", dict(shape=o.shape)),
                           (f"{o.color} shapes", dict(color=o.color))):
            r = _run(ex, f"B=Loc(image=IMAGE, object='{phrase}')\nN=Count(object=B)\nRESULT=N",
                     {"IMAGE": sc.render()})
            ok += r.result == sc.count(**kw)
            total += 1
    assert ok / total >= 0.95, (ok, total)


def test_classify_and_select(ex):
    sc = _scene(RED_CIRCLES, seed=3)
    gt = sc.ground_truth()
    r = _run(ex, "S=Seg(image=IMAGE)\n"
                 "C=Classify(image=IMAGE, object=S, categories='circle,square,triangle,star')\n"
                 "K=Classify(image=IMAGE, object=S, categories='red,green,blue,yellow')\n"
                 "B=Select(image=IMAGE, object=S, query='blue')\n"
                 "R=Select(image=IMAGE, object=S, query='red', category='square')\n"
                 "RESULT=C", {"IMAGE": sc.render()})
    seg = r.values["S"]
    owner = mask_iou(seg.masks, gt["masks"]).argmax(axis=1)  # GT object of each mask
    assert sorted(owner.tolist()) == list(range(5))
    assert r.result.labels == [gt["shapes"][j] for j in owner]
    assert r.values["K"].labels == [gt["colors"][j] for j in owner]
    assert ((r.result.scores > 0.5) & (r.result.scores <= 1.0)).all()
    blue = r.values["B"]
    assert len(blue) == 1 and _match(blue.masks, gt["masks"][[3]])[0] > 0.85
    red_sq = r.values["R"]
    assert len(red_sq) == 1 and _match(red_sq.masks, gt["masks"][[2]])[0] > 0.85


def test_feature_reuse_one_sam_embedding_per_image_per_run(mods):
    """Four SAM/CLIP steps on each of two images: the SAM embedding and the automatic masks are
    computed once per image, each isolated object is CLIP-encoded once; without reuse they are
    computed once per step."""
    left, right = (_scene(RED_CIRCLES, seed=3).render(),
                   _scene([("star", "yellow", "large"), ("circle", "red", "small")], 5).render())
    prog = parse_program(
        "A=Loc(image=LEFT, object='circles')\nB=Loc(image=LEFT, object='red shapes')\n"
        "S=Seg(image=LEFT)\nC=Classify(image=LEFT, object=S, categories='circle,square,star')\n"
        "D=Loc(image=RIGHT, object='stars')\nT=Seg(image=RIGHT)\n"
        "NA=Count(object=A)\nND=Count(object=D)\n"
        "OK=Eval(expr='{NA} == 3 and {ND} == 1')\nRESULT=OK", TWO)
    ops = ops_of(mods)
    sam = ops.sam
    with Executor(mods, max_concurrency=6) as ex:
        before, runs0 = dict(ops.counts), sam.encoder_runs
        r = ex.run(prog, {"LEFT": left, "RIGHT": right})
        assert r.ok and r.result is True, r.error
        kinds = r.cache["by_kind"]
        assert kinds["sam_embedding"]["misses"] == 2  # one per image
        assert kinds["sam_auto"]["misses"] == 2
        assert kinds["sam_auto"]["hits"] == 3  # B, S on LEFT reuse A's masks; T reuses D's
        assert kinds["clip_object"]["misses"] == 5 + 2  # every object encoded once
        assert kinds["clip_object"]["hits"] >= 5 * 2  # B and C reuse A's object embeddings
        assert sam.encoder_runs - runs0 == 2
        assert ops.counts["sam_embedding"] - before.get("sam_embedding", 0) == 2
        # baseline: no reuse and one step at a time -> every step recomputes its features
        before, runs0 = dict(ops.counts), sam.encoder_runs
    with Executor(mods, sequential=True) as seq:
        r2 = seq.run(prog, {"LEFT": left, "RIGHT": right}, cache=NoReuseCache())
    assert r2.ok and r2.result is True
    assert r2.cache["by_kind"]["sam_embedding"]["misses"] == 5  # A B S D T (C reads S)
    assert sam.encoder_runs - runs0 == 5
    assert r2.cache["hits"] == 0


class FakePointingVlm:
    """Points at the ground-truth centres of the objects matching a ShapesWorld phrase (what a
    perfect pointing VLM answers); ``generate`` answers a count question from ground truth."""

    family = "llava"

    def __init__(self, scenes):
        self.by_key = {sc.render().tobytes(): sc for sc in scenes}
        self.calls = 0

    def _scene(self, image):
        return self.by_key[np.ascontiguousarray(image).tobytes()]

    def point(self, image, phrase):
        self.calls += 1
        sc = self._scene(image)
        q = parse_phrase(phrase)
        pts = [tuple(map(float, o.center)) for o in sc.objects
               if all(q[k] is None or getattr(o, k) == q[k] for k in ("size", "color", "shape"))]
        return {"text": "", "points": pts, "count": len(pts)}

    def generate(self, images, prompt, max_new_tokens=64, **kw):
        sc = self._scene(images[0])
        return str(len(sc.objects))


def test_loc_by_pointing_vlm_and_vqa(mods):
    sc = _scene(RED_CIRCLES, seed=3)
    gt = sc.ground_truth()
    ops = ops_of(mods)
    vlm = FakePointingVlm([sc])
    pm = local_modules(ops.clip, ops.sam, vlm, text=lambda p: "red\nblue\ngreen", workers=2)
    assert ops_of(pm).can_point
    with Executor(pm) as ex:
        r = _run(ex, "B=Loc(image=IMAGE, object='red circles')\nN=Count(object=B)\n"
                     "Q=Vqa(image=IMAGE, question='How many shapes are there?')\n"
                     "L=List(query='colours', max=2)\n"
                     "OK=Eval(expr='{Q} == 5 and {N} == 2')\nRESULT=OK", {"IMAGE": sc.render()})
    assert r.result is True and vlm.calls == 1
    assert r.values["L"] == ["red", "blue"]
    assert (_match(r.values["B"].masks, gt["masks"][[0, 1]]) > 0.85).all()
    # pointing=False forces the CLIP route even with a pointing VLM
    cm = local_modules(ops.clip, ops.sam, vlm, config=ModuleConfig(pointing=False), workers=1)
    assert not ops_of(cm).can_point


def test_module_failures_are_step_errors(ex):
    img = _scene(RED_CIRCLES, seed=3).render()
    r = ex.run(parse_program("Q=Vqa(image=IMAGE, question='what?')\nN=Eval(expr='{Q} == 1')\n"
                             "RESULT=N", IMAGE), {"IMAGE": img})
    assert not r.ok and r.error.type == "ModuleUnavailableError" and "VLM" in r.error.message
    assert [t.status for t in r.trace] == ["error", "skipped"]
    r = ex.run(parse_program("L=List(query='colours', max=1000)\nRESULT=L", {}), {})
    assert not r.ok and r.error.module == "List"
    r = ex.run(parse_program("B=Loc(image=IMAGE, object='   ')\nRESULT=B", IMAGE), {"IMAGE": img})
    assert not r.ok and r.error.type == "ModuleInputError"
    # objects of another image
    small = np.ascontiguousarray(img[:32, :32])
    r = ex.run(parse_program("S=Seg(image=A)\nC=Classify(image=B, object=S, categories='x,y')\n"
                             "RESULT=C", {"A": "Image", "B": "Image"}), {"A": img, "B": small})
    assert not r.ok and r.error.step == "C" and "image" in r.error.message


def test_nlvr_two_image_program(ex):
    """NLVR-style statement over two images with independent steps run concurrently."""
    left = _scene([("circle", "red", "small"), ("square", "blue", "large"),
                   ("circle", "green", "small")], seed=7)
    right = _scene([("triangle", "yellow", "large"), ("star", "purple", "small"),
                    ("square", "orange", "small")], seed=8)
    text = ("A=Seg(image=LEFT)\nB=Seg(image=RIGHT)\nC=Loc(image=LEFT, object='circles')\n"
            "D=Loc(image=RIGHT, object='circles')\nNA=Count(object=A)\nNB=Count(object=B)\n"
            "NC=Count(object=C)\nND=Count(object=D)\n"
            "OK=Eval(expr='{NA} + {NB} == 6 and {NC} + {ND} == 2')\nRESULT=OK")
    r = _run(ex, text, {"LEFT": left.render(), "RIGHT": right.render()}, TWO)
    assert r.result is True
    tr = {t.step: t for t in r.trace}
    # A and B (different images, no shared inputs) overlap in time
    a0, a1 = tr["A"].start_ms, tr["A"].start_ms + tr["A"].time_ms
    b0 = tr["B"].start_ms
    assert b0 < a1 and a0 < b0 + tr["B"].time_ms
