"""Visual programs and pointing -> segmenting over Ray Serve (``fmrt.serve.chain``) on loopback
HTTP: a ProgramRunner composed with the CLIP, SAM and (fake or real) VLM deployments through
constructor handles; results + per-step traces; independent steps running concurrently;
per-run feature reuse; point-segment masks against ShapesWorld ground truth; every bad request
or injection attempt -> 4xx with the reason; module failures and time limits -> structured step
errors; the server stays up.

One Ray + Serve instance for the module. The pointing VLM is ``FakePointer`` (answers with the
ground-truth centres of the objects a phrase names); the bundled ``shapes-llava`` is added and
tested too when ``fmrt/weights/shapes-llava`` exists.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from ray import serve  # noqa: E402

from fmrt.serve.http import encode_image  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT = 90
LLAVA_DIR = os.path.join(REPO_ROOT, "fmrt", "weights", "shapes-llava")
HAS_LLAVA = os.path.isdir(LLAVA_DIR)
OPTIONS = {"time_limit_s": 30, "max_steps": 16, "max_images": 3, "max_concurrency": 8}


def _key(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FakePointer:
    """A pointing VLM that knows the scenes: ``table`` maps an image's SHA-1 to its objects
    ``(size, color, shape, cx, cy)``. ``answer`` gives the object count; a question containing
    'explode' raises (a module failure)."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def _objs(self, image):
        return self.table[_key(image)]

    async def point(self, image, phrase):
        from fmrt.chain.modules import parse_phrase

        self.calls += 1
        q = parse_phrase(phrase) or {}
        pts = [(cx, cy) for z, c, s, cx, cy in self._objs(image)
               if q.get("size") in (None, z) and q.get("color") in (None, c)
               and q.get("shape") in (None, s)]
        return {"text": f"{len(pts)}: " + " ".join(f"({x:.0f}, {y:.0f})" for x, y in pts),
                "points": pts, "count": len(pts)}

    async def answer(self, images, prompt, max_new_tokens=32):
        if "explode" in prompt:
            raise RuntimeError("the fake VLM exploded")
        return str(len(self._objs(images[0])))

    def ping(self):
        return True


def _scene(attrs, seed):
    from fmrt.data import ShapesWorld

    return ShapesWorld(image_size=64, seed=seed).sample_scene(rng=seed, attributes=attrs)


SCENES = {
    "red": _scene([("circle", "red", "large"), ("circle", "red", "small"),
                   ("square", "red", "small"), ("circle", "blue", "large"),
                   ("star", "green", "small")], 3),
    "left": _scene([("circle", "red", "small"), ("square", "blue", "large"),
                    ("circle", "green", "small")], 7),
    "right": _scene([("triangle", "yellow", "large"), ("star", "purple", "small"),
                     ("square", "orange", "small")], 8),
}


def _table():
    return {_key(sc.render()): [(o.size, o.color, o.shape, float(o.center[0]),
                                 float(o.center[1])) for o in sc.objects]
            for sc in SCENES.values()}


@pytest.fixture(scope="module")
def server():
    from fmrt.serve.app import FAMILY_BINDERS, AppArgs, Ingress
    from fmrt.serve.chain import bind_program_runner
    from fmrt.serve.launcher import free_port, start_ray

    args = AppArgs(models=["shapes-clip", "shapes-sam"], backend="torch", num_threads=1,
                   request_timeout_s=30, batch_wait_timeout_s=0.005, access_log=False)
    families = {"clip": {"shapes-clip": FAMILY_BINDERS["clip"]("shapes-clip", "shapes-clip",
                                                                args, "torch")},
                "sam": {"shapes-sam": FAMILY_BINDERS["sam"]("shapes-sam", "shapes-sam", args,
                                                            "torch")}}
    vlms = {"fake-pointer": FakePointer.bind(_table())}
    vfam = {"fake-pointer": "llava"}
    if HAS_LLAVA:
        vlms["shapes-llava"] = FAMILY_BINDERS["llava"](LLAVA_DIR, "shapes-llava", args, "torch")
        vfam["shapes-llava"] = "llava"
    runner = bind_program_runner({**families, "vlm": vlms}, OPTIONS, vlm_families=vfam,
                                 call_timeout_s=30)
    families["chain"] = {"programs": runner, "__options__": OPTIONS}
    app = Ingress.bind(families, limits={"max_image_side": 256}, request_timeout_s=30)
    port = free_port()
    rs = start_ray(log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(app, name="fmrt-chain-test", route_prefix="/", blocking=False)
        yield {"url": f"http://127.0.0.1:{port}"}
    finally:
        try:
            serve.shutdown()
        finally:
            rs.stop()


def post(server, path, payload, timeout=TIMEOUT):
    return requests.post(server["url"] + path, json=payload, timeout=timeout)


def run(server, program, images, **kw):
    return post(server, "/v1/programs/run",
                {"program": program, "images": {k: encode_image(v) for k, v in images.items()},
                 **kw})


def _masks(rles):
    from fmrt.kernels import coco_string_to_rle, rle_to_mask

    return np.stack([rle_to_mask(coco_string_to_rle(r["counts"], r["size"])) for r in rles])


def _iou(pred, gt):
    from fmrt.chain.modules import mask_iou

    return mask_iou(gt, pred).max(axis=1)


# ------------------------------------------------------------------------------ composition
def test_compose_chain_only_when_clip_and_sam_are_served():
    from fmrt.serve.app import AppArgs
    from fmrt.serve.chain import compose_chain

    fam = {"clip": {"a": object()}}
    compose_chain(fam, AppArgs(models=["shapes-clip"]))
    assert "chain" not in fam  # auto: no SAM -> no runner
    fam = {"clip": {"a": object()}, "sam": {"b": object()}}
    compose_chain(fam, AppArgs(models=["shapes-clip"], chain={"enabled": False}))
    assert "chain" not in fam
    with pytest.raises(ValueError):
        compose_chain(fam, AppArgs(chain={"nope": 1}))
    with pytest.raises(ValueError):
        compose_chain(fam, AppArgs(chain={"vlm": "not-served"}))
    compose_chain(fam, AppArgs(models=["shapes-clip"], chain={"time_limit_s": 5}))
    assert set(fam["chain"]) == {"programs", "__options__"}
    assert fam["chain"]["__options__"]["time_limit_s"] == 5


# ------------------------------------------------------------------------------ programs
def test_nlvr_program_concurrent_steps_and_reuse(server):
    left, right = SCENES["left"].render(), SCENES["right"].render()
    prog = ("A=Seg(image=LEFT)\nB=Seg(image=RIGHT)\nC=Loc(image=LEFT, object='circles')\n"
            "D=Loc(image=RIGHT, object='circles')\nNA=Count(object=A)\nNB=Count(object=B)\n"
            "NC=Count(object=C)\nND=Count(object=D)\n"
            "OK=Eval(expr='{NA} + {NB} == 6 and {NC} + {ND} == 2')\nRESULT=OK")
    # fake-pointer is the default VLM and points: Loc uses pointing + SAM, Seg automatic masks
    r = run(server, prog, {"LEFT": left, "RIGHT": right})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] and body["result"] is True and body["error"] is None
    tr = {t["step"]: t for t in body["trace"]}
    assert all(t["status"] == "ok" for t in tr.values())
    assert tr["NC"]["output"] == 2 and tr["ND"]["output"] == 0
    assert tr["A"]["output"]["count"] == 3 and tr["C"]["inputs"]["image"]["ref"] == "LEFT"
    # the two Seg steps on different images overlap in time (dependency-graph execution)
    a, b = tr["A"], tr["B"]
    assert b["start_ms"] < a["start_ms"] + a["time_ms"] and a["start_ms"] < b["start_ms"] + \
        b["time_ms"]
    kinds = body["cache"]["by_kind"]
    assert kinds["sam_embedding"]["misses"] == 2  # one per image, shared by Seg and Loc
    assert body["program"] == prog
    # the benchmark's baseline: one step at a time, no per-run reuse -> same answer
    r = run(server, prog, {"LEFT": left, "RIGHT": right},
            execution={"sequential": True, "reuse": False})
    body = r.json()
    assert r.status_code == 200 and body["ok"] and body["result"] is True
    # A, B and C each embed their image (D's VLM points at nothing: no SAM call)
    assert body["cache"]["by_kind"]["sam_embedding"]["misses"] == 3 and body["cache"][
        "hits"] == 0
    tr = [t for t in body["trace"] if t["module"] in ("Seg", "Loc")]
    spans = sorted((t["start_ms"], t["start_ms"] + t["time_ms"]) for t in tr)
    assert all(b[0] >= a[1] - 0.5 for a, b in zip(spans, spans[1:]))  # no overlap


def test_loc_clip_route_result_masks_and_image_outputs(server):
    sc = SCENES["red"]
    gt = sc.masks()
    prog = ("S=Seg(image=IMAGE)\nB=Select(image=IMAGE, object=S, query='red circles')\n"
            "T=Tag(image=IMAGE, object=B)\nRESULT=B")
    r = run(server, prog, {"IMAGE": sc.render()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] and body["result"]["count"] == 2, body.get("error")
    masks = _masks(body["result_masks"])
    assert masks.shape == (2, 64, 64) and (_iou(masks, gt[[0, 1]]) > 0.85).all()
    tag = next(t for t in body["trace"] if t["step"] == "T")
    assert tag["output"]["png"].startswith("data:image/png;base64,")
    assert tag["output"]["shape"] == [64, 64, 3]
    # without trace images the trace carries no PNGs
    r = run(server, prog.replace("RESULT=B", "RESULT=T"), {"IMAGE": sc.render()},
            trace_images=False)
    body = r.json()
    assert body["ok"] and "png" in body["result"]
    assert all("png" not in (t["output"] or {}) for t in body["trace"]
               if isinstance(t["output"], dict))


def test_vqa_and_pointing_loc(server):
    sc = SCENES["red"]
    r = run(server, "B=Loc(image=IMAGE, object='red circles')\nN=Count(object=B)\n"
                    "Q=Vqa(image=IMAGE, question='How many shapes are there?')\n"
                    "OK=Eval(expr='{Q} == 5 and {N} == 2')\nRESULT=OK", {"IMAGE": sc.render()},
            vlm="fake-pointer")
    body = r.json()
    assert r.status_code == 200 and body["ok"] and body["result"] is True, body
    assert body["cache"]["by_kind"]["vlm_point"]["misses"] == 1


def test_point_segment_with_fake_pointer(server):
    sc = SCENES["red"]
    gt = sc.masks()
    r = post(server, "/v1/point-segment", {"image": encode_image(sc.render()),
                                           "phrase": "the red circles", "vlm": "fake-pointer"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 2 == len(body["masks"]) == len(body["points"]) == len(body["boxes"])
    assert body["vlm"]["model"] == "fake-pointer" and body["vlm"]["count"] == 2
    masks = _masks(body["masks"])
    assert (_iou(masks, gt[[0, 1]]) > 0.85).all()
    for (x, y), (x0, y0, x1, y1) in zip(body["points"], body["boxes"]):
        assert x0 <= x < x1 and y0 <= y < y1
    r = post(server, "/v1/point-segment", {"image": encode_image(sc.render()),
                                           "phrase": "purple triangles"})
    assert r.status_code == 200 and r.json()["count"] == 0 and r.json()["masks"] == []


# Quality floor of the VLM-backed chain: the issue #5 pointing target is not met, so this is a
# regression guard. Every point of the answer inside the right objects, with the right count, on
# 60 of these scenes (torch, no serving): session-6 bundle 7/60, session-5 bundle 3/60; on the 6
# scenes here (SAM masks at IoU > 0.7) the session-5 bundle got 3 and the session-6 one 2, so 6
# scenes measure luck more than the model: the floor catches a broken chain, not a worse VLM.
POINT_SEGMENT_MIN = 1 / 3


@pytest.mark.skipif(not HAS_LLAVA, reason="fmrt/weights/shapes-llava is not bundled yet")
def test_point_segment_with_shapes_llava(server):
    from fmrt.data.sam_data import eval_scenes

    good = total = 0
    for sc in eval_scenes(6, seed=0):
        o = sc.objects[0]
        phrase = f"the {o.color} {o.shape}s"
        r = post(server, "/v1/point-segment", {"image": encode_image(sc.render()),
                                               "phrase": phrase, "vlm": "shapes-llava"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["masks"]) == len(body["points"])
        if body["masks"]:   # one full-frame mask per point (a point on the background may
            # get an empty or a neighbour's mask: SAM's answer, not a chain error)
            assert _masks(body["masks"]).shape[1:] == sc.masks().shape[1:]
        want = [i for i, x in enumerate(sc.objects) if (x.color, x.shape) == (o.color, o.shape)]
        total += 1
        if body["count"] == len(want):
            good += (_iou(_masks(body["masks"]), sc.masks()[want]) > 0.7).all()
    assert good / total >= POINT_SEGMENT_MIN, (good, total)


# ------------------------------------------------------------------------------ safety
IMG = None


def _img_b64():
    global IMG
    if IMG is None:
        IMG = encode_image(SCENES["left"].render())
    return IMG


BAD_PROGRAMS = [
    # (program, expected reason substring)
    ("A=Eval(expr='__import__(\"os\").system(\"id\")')\nRESULT=A", "call"),
    ("__class__=Count(object=X)\nRESULT=__class__", "underscore"),
    ("A=Loc(image=IMAGE.__class__, object='x')\nRESULT=A", "attribute"),
    ("A=Eval(expr='IMAGE.shape')\nRESULT=A", "attribute"),
    ("A=Eval(expr='10 ** 100')\nRESULT=A", ""),
    ("A=Eval(expr='9 ** 9 ** 9')\nRESULT=A", ""),
    ("A=Eval(expr='" + "(" * 200 + "1" + ")" * 200 + "')\nRESULT=A", "nest"),
    ("A=Eval(expr='1')\n" + "".join(f"B{i}=Eval(expr='{i}')\n" for i in range(20))
     + "RESULT=A", "steps"),
    ("A=Exec(code='print(1)')\nRESULT=A", "unknown module"),
    ("A=Count(object=NOPE)\nRESULT=A", "undefined"),
    ("A=Count(object=IMAGE)\nRESULT=A", "expects ObjectList"),
    ("A=Eval(expr='B')\nB=Eval(expr='A')\nRESULT=A", "cycle"),
    ("A=Eval(expr='[x for x in range(10**9)]')\nRESULT=A", ""),
    ("A=Eval(expr='lambda: 1')\nRESULT=A", "lambda"),
    ("A=Eval(expr='1e400')\nRESULT=A", ""),
    ("A=Seg(image=IMAGE)", "RESULT"),
]


@pytest.mark.parametrize("prog,reason", BAD_PROGRAMS)
def test_bad_programs_are_422_with_line_and_reason(server, prog, reason):
    r = post(server, "/v1/programs/run", {"program": prog, "images": {"IMAGE": _img_b64()}})
    if r.status_code == 200:  # a runtime bound (e.g. exponent result) -> structured step error
        body = r.json()
        assert body["ok"] is False and body["error"]["type"] in ("ExprError",), body
        return
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_program" and "line" in err and err["reason"]
    assert reason.lower() in err["message"].lower(), err


def test_bad_requests_are_4xx(server):
    img = _img_b64()
    ok_prog = "S=Seg(image=IMAGE)\nN=Count(object=S)\nRESULT=N"
    cases = [
        ({"program": ok_prog}, 422),  # IMAGE undefined (no images)
        ({"program": ok_prog, "instruction": "count", "images": {"IMAGE": img}}, 422),
        ({"images": {"IMAGE": img}}, 422),
        ({"program": 5, "images": {"IMAGE": img}}, 422),
        ({"program": ok_prog, "images": [img]}, 422),
        ({"program": ok_prog, "images": {"__IMAGE": img}}, 422),
        ({"program": ok_prog, "images": {"IMAGE": "not base64!!"}}, 400),
        ({"program": ok_prog, "images": {f"I{i}": img for i in range(4)}}, 413),
        ({"program": ok_prog, "images": {"IMAGE": img}, "time_limit_s": 10_000}, 422),
        ({"program": ok_prog, "images": {"IMAGE": img}, "time_limit_s": -1}, 422),
        ({"program": ok_prog, "images": {"IMAGE": img}, "unknown": 1}, 422),
        ({"program": ok_prog, "images": {"IMAGE": img}, "inputs": {"K": 10 ** 30}}, 422),
        ({"program": ok_prog, "images": {"IMAGE": img}, "vlm": "nope"}, 404),
        ({"program": ok_prog, "images": {"IMAGE": img}, "execution": {"fast": True}}, 422),
        ({"program": "A=Eval(expr='1')\nRESULT=A" + "\n#" * 30_000, "images": {}}, 422),
    ]
    for payload, status in cases:
        r = post(server, "/v1/programs/run", payload)
        assert r.status_code == status, (payload.keys(), r.status_code, r.text[:300])
        assert "message" in r.json()["error"]
    r = requests.post(server["url"] + "/v1/programs/run", data=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400
    r = post(server, "/v1/programs/run", {"instruction": "count the circles",
                                          "images": {"IMAGE": img}})
    assert r.status_code == 400 and "no program generator configured" in r.json()["error"][
        "message"]
    for payload, status in [({"phrase": "circles"}, 422), ({"image": img}, 422),
                            ({"image": img, "phrase": ""}, 422),
                            ({"image": "zzz", "phrase": "circles"}, 400),
                            ({"image": img, "phrase": "x", "vlm": "nope"}, 404)]:
        r = post(server, "/v1/point-segment", payload)
        assert r.status_code == status, (payload, r.text)


def test_module_failures_and_time_limit_are_step_errors(server):
    img = SCENES["left"].render()
    r = run(server, "Q=Vqa(image=IMAGE, question='explode please')\nN=Eval(expr='{Q} == 1')\n"
                    "RESULT=N", {"IMAGE": img})
    body = r.json()
    assert r.status_code == 200 and body["ok"] is False
    assert body["error"]["step"] == "Q" and body["error"]["line"] == 1
    assert "exploded" in body["error"]["message"]
    assert [t["status"] for t in body["trace"]] == ["error", "skipped"]
    r = run(server, "A=Eval(expr='1 / 0')\nRESULT=A", {})
    assert r.json()["ok"] is False and "zero" in r.json()["error"]["message"].lower()
    r = run(server, "L=List(query='colours', max=3)\nRESULT=L", {})
    assert r.json()["ok"] is False and r.json()["error"]["type"] == "ModuleUnavailableError"
    # a run over its time limit stops with a structured error, not a hung request
    other = SCENES["right"].render()
    r = run(server, "S=Seg(image=IMAGE)\nT=Seg(image=OTHER)\nN=Count(object=S)\nRESULT=N",
            {"IMAGE": np.ascontiguousarray(img[::-1]), "OTHER": np.ascontiguousarray(
                other[:, ::-1])}, time_limit_s=0.05)
    body = r.json()
    assert r.status_code == 200 and body["ok"] is False
    assert body["error"]["type"] == "TimeLimitExceeded"
    # concurrent bad and good requests: the server answers all, then is healthy
    good = "A=Eval(expr='2 + 3')\nRESULT=A"
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(run, server, good if i % 2 else "A=Eval(expr='9**9**9**9')\n"
                          "RESULT=A", {}) for i in range(16)]
        codes = [f.result().status_code for f in futs]
    assert all(c in (200, 422) for c in codes)
    assert requests.get(server["url"] + "/healthz", timeout=TIMEOUT).json()["status"] == "ok"
    assert run(server, good, {}).json()["result"] == 5


# ------------------------------------------------------------------------------ generator
class _Gen:
    """A program generator stand-in (``fmrt.chain.generate``'s interface)."""

    def generate(self, instruction, inputs=None):
        from fmrt.chain.generate import Attempt, ProgramGenerationError

        if "impossible" in instruction:
            raise ProgramGenerationError(instruction, [Attempt("A=Nope()", "line 1: unknown")])

        class Out:
            text = "A=Eval(expr='{K} * 2')\nRESULT=A"

            def to_dict(self):
                return {"instruction": instruction, "program": self.text, "inputs": inputs}

        return Out()


def test_runner_with_a_program_generator_no_server():
    """The runner's instruction path (``ProgramRunner`` used as a plain class, no handles):
    generated program + its provenance in the response; generation failure -> 422 with the
    attempts; no generator -> 400."""
    import asyncio

    from fmrt.serve.chain import ChainRequestError, ProgramRunner

    cls = ProgramRunner.func_or_class
    r = cls(generator=_Gen())
    out = asyncio.run(r.run({"instruction": "double K", "images": {}, "inputs": {"K": 21}}))
    assert out["ok"] and out["result"] == 42 and out["generated"]["inputs"] == {"K": "Number"}
    assert out["program"].startswith("A=Eval")
    with pytest.raises(ChainRequestError) as ei:
        asyncio.run(r.run({"instruction": "impossible", "images": {}}))
    assert ei.value.status == 422 and ei.value.extra["attempts"][0]["text"] == "A=Nope()"
    with pytest.raises(ChainRequestError) as ei:
        asyncio.run(cls().run({"instruction": "x", "images": {}}))
    assert ei.value.status == 400 and "no program generator configured" in str(ei.value)
