"""CuPL on ShapesWorld with the bundled shapes-clip: zero-shot accuracy of label sets built from
templates vs descriptions vs both (test split, 24 ``colour shape`` classes plus the 4-shape and
6-colour tasks), and the per-request cost of a stored label set vs re-encoding the labels.

Run: ``.venv/bin/python benchmarks/bench_cupl.py`` (prints a table), or
``pytest benchmarks/bench_cupl.py --benchmark-only`` (label-set vs re-encode timings with
pytest-benchmark; the ratio goes to the benchmark summary).

Descriptions come from ``ShapesWorldSource`` (the offline stand-in for an LLM, see
``fmrt.chain.cupl``), 3 samples per CuPL prompt, styles ``prose`` (LLM-like sentences, many words
outside shapes-clip's vocabulary) and ``vocab`` (ShapesWorld words only).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N_TEST = 2000
REQUEST_IMAGES = 8


def run(n: int = N_TEST) -> Dict[str, Any]:
    import fmrt
    from fmrt.chain.cupl import Sampling, evaluate_cupl, labelset_cost

    rt = fmrt.load("shapes-clip", backend="torch")
    out: Dict[str, Any] = {"accuracy": {}, "cost": {}}
    for kind in ("color_shape", "shape", "color"):
        t = time.perf_counter()
        out["accuracy"][kind] = evaluate_cupl(n=n, kind=kind, rt=rt, sampling=Sampling(n=3))
        out["accuracy"][kind]["seconds"] = time.perf_counter() - t
    for n_img in (1, REQUEST_IMAGES):
        out["cost"][n_img] = labelset_cost(rt=rt, n_images=n_img, repeats=10)
    return out


def _table(res: Dict[str, Any]) -> List[str]:
    lines = ["task         | label set                | acc    | p(true) | margin"]
    for kind, r in res["accuracy"].items():
        for tag in ("single_template", "templates", "prose_descriptions", "prose_both",
                    "vocab_descriptions", "vocab_both"):
            lines.append(f"{kind:12s} | {tag:24s} | {r[tag + '_acc']:.4f} | "
                         f"{r[tag + '_p_true']:.4f}  | {r[tag + '_margin']:.4f}")
    for n_img, c in res["cost"].items():
        lines.append(f"cost, {n_img} image(s), {c['classes']} classes x "
                     f"{c['texts_encoded_per_request'] // c['classes']} templates: re-encode "
                     f"{c['reencode_ms']:.2f} ms, label set {c['labelset_ms']:.2f} ms "
                     f"({c['speedup']:.1f}x)")
    return lines


# ---------------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def setup():
    import fmrt
    from fmrt.chain.labelsets import build_labelset
    from fmrt.data import TEMPLATES, ShapesWorld, class_labels, split_seed

    rt = fmrt.load("shapes-clip", backend="torch")
    classes = class_labels("color_shape")
    imgs, _ = ShapesWorld(64, seed=split_seed("test")).classification_set(REQUEST_IMAGES, 0)
    ls = build_labelset("bench", classes, model=rt.name, encode_text=rt.encode_text,
                        templates=list(TEMPLATES))
    return rt, list(imgs), classes, ls


def test_classify_reencode_labels(benchmark, setup):
    from fmrt.data import TEMPLATES

    rt, imgs, classes, _ = setup

    def run_once():
        rt._classifiers.clear()
        return rt.classify(imgs, classes, list(TEMPLATES))
    benchmark(run_once)
    if benchmark.stats:  # None under --benchmark-disable
        setup_times["reencode"] = benchmark.stats.stats.median


def test_classify_labelset(benchmark, setup, bench_summary):
    rt, imgs, _, ls = setup
    benchmark(lambda: ls.classify(rt.encode_image(imgs), rt.name, rt.logit_scale))
    if benchmark.stats and "reencode" in setup_times:
        t = benchmark.stats.stats.median
        bench_summary.append(f"cupl label set vs re-encoding 240 prompts, {REQUEST_IMAGES} "
                             f"images: {setup_times['reencode'] / t:.1f}x faster")


setup_times: Dict[str, float] = {}


if __name__ == "__main__":
    res = run()
    print("\n".join(_table(res)))
    print({k: round(v["seconds"], 1) for k, v in res["accuracy"].items()})
    np.set_printoptions(precision=4)
