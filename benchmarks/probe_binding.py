"""Colour-shape binding probes of CLIP-family models (BENCHMARKS.md, issue #2).

    python benchmarks/probe_binding.py shapes-clip shapes-negclip [runs/<run>/model ...]

3,000 two-object test-split scenes with distinct colours and shapes, bound one of two ways at
random; per model, how often the true binding outscores the swapped one through one-clause
captions (``clauses``: does the image embedding bind?), a two-clause caption (``caption``) and
a relation caption (``relation``), and the text tower's binding margin (``text``). Definitions:
``fmrt.train.evaluate.binding_probe`` (``fmrt eval`` reports the same on 1,000 scenes).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fmrt  # noqa: E402
from fmrt.train.evaluate import binding_probe, binding_scenes  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("FMRT_BENCH_THREADS", "1")))
    scenes = binding_scenes(3000)
    for name in sys.argv[1:] or ["shapes-clip", "shapes-negclip"]:
        r = binding_probe(fmrt.load(name, backend="torch"), scenes=scenes)
        print(f"{name}: clauses {r['clauses']:.3f}  caption {r['caption']:.3f}  "
              f"relation {r['relation']:.3f}  text {r['text']:+.4f}")
