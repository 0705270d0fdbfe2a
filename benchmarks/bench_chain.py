"""Visual-program latency: dependency-graph execution with per-run feature reuse vs strictly
sequential execution without reuse, on the same programs and scenes (in-process modules:
``fmrt.chain.modules.local_modules`` over shapes-clip + shapes-sam, torch, 1 intra-op thread);
plus the accuracy of the CLIP route of ``Loc`` on held-out ShapesWorld scenes.

Run: ``.venv/bin/python benchmarks/bench_chain.py [--pairs 6] [--loc-scenes 30] [--served 4]``
(prints a table; ``--served`` repeats the comparison through Ray Serve), or
``pytest benchmarks/bench_chain.py --benchmark-only``.

* graph + reuse: ``Executor(max_concurrency=8)`` with a ``RunCache``: independent steps run
  concurrently; one SAM embedding / one automatic-mask run per image, one CLIP encoding per
  isolated object, per run.
* baseline: ``Executor(sequential=True)`` with ``NoReuseCache``: one step at a time in
  topological order, every step computes its own features.

Both produce the same results (checked). The label-set vs re-encoding cost of classification is
measured by ``benchmarks/bench_cupl.py`` (``labelset_cost``); inside a program run, class
embeddings of a label list are computed once per run (``clip_text``) and the served binding
keeps them across runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TWO = {"LEFT": "Image", "RIGHT": "Image"}
ONE = {"IMAGE": "Image"}
CLASSES = ("'red circle,red square,blue circle,blue square,green star,yellow triangle,"
           "purple star,orange circle'")

#: name -> (program, input types, has independent model steps)
PROGRAMS: Dict[str, Tuple[str, Dict[str, str], bool]] = {
    "nlvr_counts": ("A=Seg(image=LEFT)\nB=Seg(image=RIGHT)\nC=Loc(image=LEFT, object='circles')\n"
                    "D=Loc(image=RIGHT, object='circles')\nNA=Count(object=A)\n"
                    "NB=Count(object=B)\nNC=Count(object=C)\nND=Count(object=D)\n"
                    "OK=Eval(expr='{NA} + {NB} == 6 and {NC} + {ND} == 2')\nRESULT=OK",
                    TWO, True),
    "nlvr_colors": ("A=Loc(image=LEFT, object='red shapes')\n"
                    "B=Loc(image=RIGHT, object='red shapes')\n"
                    "C=Loc(image=LEFT, object='blue shapes')\n"
                    "D=Loc(image=RIGHT, object='blue shapes')\n"
                    "NA=Count(object=A)\nNB=Count(object=B)\nNC=Count(object=C)\n"
                    "ND=Count(object=D)\nOK=Eval(expr='{NA} + {NB} > {NC} + {ND}')\nRESULT=OK",
                    TWO, True),
    "one_image_multi": ("S=Seg(image=IMAGE)\nC=Classify(image=IMAGE, object=S, categories="
                        + CLASSES + ")\nK=Loc(image=IMAGE, object='stars')\n"
                        "R=Select(image=IMAGE, object=S, query='red')\nNK=Count(object=K)\n"
                        "NR=Count(object=R)\nOK=Eval(expr='{NK} > {NR}')\nRESULT=OK", ONE, True),
    "tag_red_chain": ("L=Loc(image=IMAGE, object='red shapes')\nT=Tag(image=IMAGE, object=L)\n"
                      "RESULT=T", ONE, False),
}


def _scenes(n: int, seed: int = 11):
    from fmrt.data.sam_data import eval_scenes

    return eval_scenes(2 * n, seed=seed)


def _inputs(types: Dict[str, str], a, b) -> Dict[str, np.ndarray]:
    return {"LEFT": a.render(), "RIGHT": b.render()} if "LEFT" in types else {"IMAGE": a.render()}


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.shape == y.shape and bool((x == y).all())
    return x == y


def latency(mods, pairs: int = 6, repeats: int = 1) -> Dict[str, Dict[str, float]]:
    """Mean per-program latency (ms) of both executions over ``pairs`` scene pairs."""
    from fmrt.chain import Executor, parse_program
    from fmrt.chain.executor import NoReuseCache, RunCache

    scenes = _scenes(pairs)
    out: Dict[str, Dict[str, float]] = {}
    graph = Executor(mods, max_concurrency=8, trace_images=False, time_limit_s=600)
    seq = Executor(mods, sequential=True, trace_images=False, time_limit_s=600)
    try:
        for name, (text, types, indep) in PROGRAMS.items():
            prog = parse_program(text, types)
            warm = _inputs(types, scenes[0], scenes[1])
            seq.run(prog, warm, cache=NoReuseCache())  # warm-up (first-call allocations)
            graph.run(prog, warm)
            tg, ts, comp_g, comp_s = [], [], 0, 0
            for i in range(pairs):
                inp = _inputs(types, scenes[2 * i], scenes[2 * i + 1])
                for _ in range(repeats):
                    t = time.perf_counter()
                    rs = seq.run(prog, inp, cache=NoReuseCache())
                    ts.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    rg = graph.run(prog, inp, cache=RunCache())
                    tg.append(time.perf_counter() - t)
                    assert rg.ok and rs.ok, (rg.error, rs.error)
                    assert _same(rg.result, rs.result), name
                    comp_g += rg.cache["misses"]
                    comp_s += rs.cache["misses"]
            out[name] = {"sequential_no_reuse_ms": 1e3 * float(np.mean(ts)),
                         "graph_reuse_ms": 1e3 * float(np.mean(tg)),
                         "speedup": float(np.mean(ts) / np.mean(tg)),
                         "features_computed_per_run_graph": comp_g / (pairs * repeats),
                         "features_computed_per_run_sequential": comp_s / (pairs * repeats),
                         "independent_steps": indep}
    finally:
        graph.close()
        seq.close()
    return out


def loc_accuracy(mods, n_scenes: int = 30, seed: int = 2) -> Dict[str, float]:
    """CLIP route of Loc (SAM automatic masks + CLIP selection) on held-out scenes: for a
    colour+shape, a shape and a colour phrase about one object of each scene, the fraction of
    phrases with exactly the right number of objects, and the mean best-mask IoU of the
    ground-truth objects the phrase names."""
    from fmrt.chain import Executor, parse_program
    from fmrt.chain.modules import mask_iou
    from fmrt.data.sam_data import eval_scenes

    ex = Executor(mods, max_concurrency=4, trace_images=False, time_limit_s=600)
    exact = total = 0
    ious: List[float] = []
    by_kind: Dict[str, List[int]] = {}
    t0 = time.perf_counter()
    try:
        for i, sc in enumerate(eval_scenes(n_scenes, seed=seed)):
            o = sc.objects[i % len(sc.objects)]
            phrases = {"color_shape": (f"{o.color} {o.shape}s", dict(color=o.color,
                                                                     shape=o.shape)),
                       "shape": (f"{o.shape}s", dict(shape=o.shape)),
                       "color": (f"{o.color} shapes", dict(color=o.color))}
            text = "".join(f"{k.upper()}=Loc(image=IMAGE, object='{p}')\n"
                           for k, (p, _) in phrases.items()) + "RESULT=COLOR"
            r = ex.run(parse_program(text, ONE), {"IMAGE": sc.render()})
            assert r.ok, r.error
            gt = sc.masks()
            for k, (_, kw) in phrases.items():
                objs = r.values[k.upper()]
                want = [j for j, x in enumerate(sc.objects)
                        if all(getattr(x, a) == v for a, v in kw.items())]
                ok = len(objs) == len(want)
                exact += ok
                total += 1
                by_kind.setdefault(k, []).append(int(ok))
                if len(objs) and want:
                    ious.extend(mask_iou(gt[want], objs.masks).max(axis=1).tolist())
                elif want:
                    ious.extend([0.0] * len(want))
    finally:
        ex.close()
    return {"phrases": total, "exact_count": exact / total, "mean_iou": float(np.mean(ious)),
            **{f"exact_{k}": float(np.mean(v)) for k, v in by_kind.items()},
            "seconds": time.perf_counter() - t0}


def served_latency(pairs: int = 4, programs: Tuple[str, ...] = ("nlvr_counts", "nlvr_colors",
                                                                  "one_image_multi")
                   ) -> Dict[str, Dict[str, float]]:
    """The same comparison through Ray Serve: ``POST /v1/programs/run`` on a local app
    (shapes-clip + shapes-sam, torch, 1 thread per replica) with the default execution vs
    ``"execution": {"sequential": true, "reuse": false}``. The SAM encoder deployment keeps
    image embeddings across requests in both modes (its own cache), so the baseline still
    reuses those: the served ratio is a lower bound of the in-process one."""
    import requests

    from fmrt.serve.http import encode_image
    from fmrt.serve.launcher import free_port, start_serve

    session = start_serve({"models": ["shapes-clip", "shapes-sam"], "backend": "torch",
                           "num_threads": 1, "access_log": False, "request_timeout_s": 120,
                           "chain": {"time_limit_s": 300}},
                          host="127.0.0.1", port=free_port(),
                          ray_kwargs={"log_to_driver": False})
    out: Dict[str, Dict[str, float]] = {}
    try:
        scenes = _scenes(pairs)
        url = session.url + "/v1/programs/run"

        def call(text, inp, **kw):
            r = requests.post(url, json={"program": text, "trace_images": False,
                                         "images": {k: encode_image(v) for k, v in inp.items()},
                                         **kw}, timeout=600)
            assert r.status_code == 200 and r.json()["ok"], r.text[:500]
            return r.json()

        for name in programs:
            text, types, _ = PROGRAMS[name]
            base = {"execution": {"sequential": True, "reuse": False}}
            warm = _inputs(types, scenes[0], scenes[1])
            call(text, warm, **base)
            call(text, warm)
            tg, ts = [], []
            for i in range(pairs):
                inp = _inputs(types, scenes[2 * i], scenes[2 * i + 1])
                t = time.perf_counter()
                rs = call(text, inp, **base)
                ts.append(time.perf_counter() - t)
                t = time.perf_counter()
                rg = call(text, inp)
                tg.append(time.perf_counter() - t)
                assert rs["result"] == rg["result"], name
            out[name] = {"sequential_no_reuse_ms": 1e3 * float(np.mean(ts)),
                         "graph_reuse_ms": 1e3 * float(np.mean(tg)),
                         "speedup": float(np.mean(ts) / np.mean(tg))}
    finally:
        session.shutdown()
    return out


def _mods():
    import torch

    from fmrt.chain.modules import local_modules

    torch.set_num_threads(1)
    return local_modules("shapes-clip", "shapes-sam", None, backend="torch", workers=4)


def _table(lat, acc) -> List[str]:
    lines = ["program          | sequential, no reuse | graph + reuse | speedup | features "
             "computed per run (seq -> graph)"]
    for name, r in lat.items():
        lines.append(f"{name:16s} | {r['sequential_no_reuse_ms']:17.1f} ms | "
                     f"{r['graph_reuse_ms']:10.1f} ms | {r['speedup']:6.2f}x | "
                     f"{r['features_computed_per_run_sequential']:.1f} -> "
                     f"{r['features_computed_per_run_graph']:.1f}")
    if acc:
        lines.append(f"Loc (SAM auto masks + CLIP), {acc['phrases']} phrases: exact count "
                     f"{acc['exact_count']:.3f} (colour+shape {acc['exact_color_shape']:.3f}, "
                     f"shape {acc['exact_shape']:.3f}, colour {acc['exact_color']:.3f}), "
                     f"mean mask IoU {acc['mean_iou']:.3f}")
    return lines


# ---------------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def setup():
    from fmrt.chain import Executor, parse_program

    mods = _mods()
    sc = _scenes(1)
    text, types, _ = PROGRAMS["nlvr_counts"]
    return mods, parse_program(text, types), _inputs(types, sc[0], sc[1]), Executor


def test_nlvr_sequential_no_reuse(benchmark, setup):
    from fmrt.chain.executor import NoReuseCache

    mods, prog, inp, Executor = setup
    with Executor(mods, sequential=True, trace_images=False) as ex:
        benchmark.pedantic(lambda: ex.run(prog, inp, cache=NoReuseCache()), rounds=3,
                           iterations=1)


def test_nlvr_graph_reuse(benchmark, setup, bench_summary):
    mods, prog, inp, Executor = setup
    with Executor(mods, max_concurrency=8, trace_images=False) as ex:
        r = benchmark.pedantic(lambda: ex.run(prog, inp), rounds=3, iterations=1)
    assert r.ok
    bench_summary.append(f"bench_chain: nlvr_counts graph+reuse {benchmark.stats['mean']:.3f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--loc-scenes", type=int, default=30)
    ap.add_argument("--served", type=int, default=0, metavar="PAIRS",
                    help="also measure through Ray Serve with this many scene pairs")
    a = ap.parse_args()
    mods = _mods()
    t = time.perf_counter()
    lat = latency(mods, a.pairs, a.repeats)
    print(f"latency: {time.perf_counter() - t:.1f} s", flush=True)
    acc = loc_accuracy(mods, a.loc_scenes) if a.loc_scenes else None
    print("\n".join(_table(lat, acc)), flush=True)
    if a.served:
        srv = served_latency(a.served)
        print("served (Ray Serve, POST /v1/programs/run):")
        for name, r in srv.items():
            print(f"{name:16s} | {r['sequential_no_reuse_ms']:17.1f} ms | "
                  f"{r['graph_reuse_ms']:10.1f} ms | {r['speedup']:6.2f}x")
