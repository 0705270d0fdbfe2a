"""Colour-shape binding probes of CLIP-family models (BENCHMARKS.md, issue #2).

    python benchmarks/probe_binding.py shapes-clip shapes-negclip [runs/<run>/model ...]

3,000 two-object test-split scenes with distinct colours c0, c1 and shapes s0, s1, each bound
one of two ways (c0-s0 + c1-s1, or c0-s1 + c1-s0, at random). Prints, per model, how often the
true binding wins:
- ``clauses``: image . (t("a c0 s0") + t("a c1 s1")) against the swapped pair of one-object
  captions (does the image embedding bind, as read through one-clause text embeddings?);
- ``caption``: image . t("a c0 s0 and a c1 s1") against t("a c0 s1 and a c1 s0") (does the
  two-clause caption bind?);
- ``relation``: the same two bindings in a relation caption whose relation word is true of the
  scene (``"a c0 s0 to the left of a c1 s1"`` against ``"a c0 s1 to the left of a c1 s0"``);
- ``text``: cosine of the two-clause caption with its clause sum, minus its cosine with the
  swapped clause sum, averaged (0 for a bag-of-words text tower).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fmrt  # noqa: E402
from fmrt.data import ShapesWorld, as_rng, render_batch, split_seed  # noqa: E402
from fmrt.data.vocab import COLORS, SHAPES, SIZES  # noqa: E402


def binding_scenes(n: int = 3000, seed: int = 0):
    R = np.random.default_rng(seed)
    world = ShapesWorld(64, seed=split_seed("test"))
    rr = as_rng(np.random.default_rng(seed + 1))
    scenes, meta = [], []
    while len(scenes) < n:
        c = R.choice(len(COLORS), 2, replace=False)
        s = R.choice(len(SHAPES), 2, replace=False)
        y = int(R.integers(2))
        sh = (s[0], s[1]) if y else (s[1], s[0])
        attrs = [(SHAPES[sh[i]], COLORS[c[i]], SIZES[R.integers(len(SIZES))]) for i in range(2)]
        sc = world.sample_scene(rr, attributes=attrs)
        if len(sc.objects) == 2:
            o0 = next(o for o in sc.objects if o.color == COLORS[c[0]])
            o1 = next(o for o in sc.objects if o.color == COLORS[c[1]])
            scenes.append(sc)
            meta.append((c[0], c[1], s[0], s[1], y, int(o0.center[0] < o1.center[0])))
    return render_batch(scenes), np.array(meta)


def probe(name: str, images: np.ndarray, meta: np.ndarray) -> dict:
    rt = fmrt.load(name, backend="torch")
    e = rt.encode_image(list(images))
    y = meta[:, 4].astype(bool)
    def phrase(ci, si):
        return f"a {COLORS[ci]} {SHAPES[si]}"
    a0 = rt.encode_text([phrase(c0, s0) for c0, c1, s0, s1, *_ in meta])
    a1 = rt.encode_text([phrase(c1, s1) for c0, c1, s0, s1, *_ in meta])
    b0 = rt.encode_text([phrase(c0, s1) for c0, c1, s0, s1, *_ in meta])
    b1 = rt.encode_text([phrase(c1, s0) for c0, c1, s0, s1, *_ in meta])
    clauses = (((e * (a0 + a1)).sum(1) > (e * (b0 + b1)).sum(1)) == y).mean()
    ta = rt.encode_text([f"{phrase(c0, s0)} and {phrase(c1, s1)}" for c0, c1, s0, s1, *_ in meta])
    tb = rt.encode_text([f"{phrase(c0, s1)} and {phrase(c1, s0)}" for c0, c1, s0, s1, *_ in meta])
    caption = (((e * ta).sum(1) > (e * tb).sum(1)) == y).mean()
    # the same binding inside a relation caption (the relation word true of the scene)
    rel = ["to the left of" if left else "to the right of" for left in meta[:, 5]]
    ra = rt.encode_text([f"{phrase(m[0], m[2])} {r} {phrase(m[1], m[3])}" for m, r in zip(meta, rel)])
    rb = rt.encode_text([f"{phrase(m[0], m[3])} {r} {phrase(m[1], m[2])}" for m, r in zip(meta, rel)])
    relation = (((e * ra).sum(1) > (e * rb).sum(1)) == y).mean()
    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    text = ((ta * unit(a0 + a1)).sum(1) - (ta * unit(b0 + b1)).sum(1)).mean()
    return {"clauses": float(clauses), "caption": float(caption), "relation": float(relation),
            "text": float(text)}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("FMRT_BENCH_THREADS", "1")))
    images, meta = binding_scenes()
    for name in sys.argv[1:] or ["shapes-clip", "shapes-negclip"]:
        r = probe(name, images, meta)
        print(f"{name}: clauses {r['clauses']:.3f}  caption {r['caption']:.3f}  "
              f"relation {r['relation']:.3f}  text {r['text']:+.4f}")
