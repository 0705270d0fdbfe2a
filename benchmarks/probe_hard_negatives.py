"""Hard-negative accuracy by caption kind x negative kind (BENCHMARKS.md, issue #2, session 8).

    HN_N=4000 python benchmarks/probe_hard_negatives.py shapes-clip shapes-negclip [runs/<run>/model ...]

The ``fmrt eval`` set (``hard_negative_set(n, seed=split_seed("test"))``, one negative per
caption; n = 1,000 there, ``HN_N`` here), each negative labelled with the
``fmrt.data.language.HARD_NEGATIVE_KINDS`` entry that produces it (attribute swap, relation-order
swap, relation word, attribute or count replacement).
"""
import os
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fmrt  # noqa: E402
from fmrt.data import ShapesWorld, parse_caption, split_seed  # noqa: E402
from fmrt.data import language as L  # noqa: E402
from fmrt.train.evaluate import hard_negative_correct  # noqa: E402


def negative_kind(caption: str, negative: str) -> str:
    cap = parse_caption(caption)
    for name, candidates in L.HARD_NEGATIVE_KINDS.items():
        if any(str(c[0](cap, *c[1:])) == negative for c in candidates(cap)):
            return name
    return "?"


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("FMRT_BENCH_THREADS", "1")))
    n = int(os.environ.get("HN_N", "1000"))
    hn = ShapesWorld(64, seed=split_seed("test")).hard_negative_set(
        n, seed=split_seed("test"), negatives_per_caption=1)
    neg_kinds = [negative_kind(c, r[0]) for c, r in zip(hn["captions"], hn["hard_negatives"])]
    for name in sys.argv[1:] or ["shapes-clip", "shapes-negclip"]:
        ok = hard_negative_correct(fmrt.load(name, backend="torch"), hn)
        groups = defaultdict(list)
        for kind, nk, o in zip(hn["kinds"], neg_kinds, ok):
            groups[(kind, nk)].append(o)
        print(f"{name}: all {ok.mean():.4f}")
        for (kind, nk), v in sorted(groups.items()):
            print(f"  {kind:12s} {nk:22s} n={len(v):5d} acc={np.mean(v):.3f}")
