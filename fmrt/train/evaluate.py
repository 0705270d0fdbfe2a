"""``fmrt eval``: zero-shot, linear probe, retrieval and compositional metrics on the held-out
ShapesWorld test split, through the same runtime facade that serves the model (any backend).

Metric definitions (ShapesWorld specifics):
  * zero-shot top-1 over ``[color] [shape]`` (24), ``[shape]`` (4) and ``[color]`` (6) labels on
    one-object images, with one template (``a photo of a {}.``) and with the template ensemble;
  * linear probe: multinomial logistic regression on frozen image features (train split) for the
    24 classes, accuracy on the test split;
  * retrieval R@1/R@5: a ShapesWorld caption is usually true of several images, so a retrieved
    item counts as a hit when the caption is *true of* the image (judged by the world's caption
    evaluator), not only when it is the generating pair;
  * hard-negative accuracy: the true caption scores above its hard negative (one per caption,
    binary as in SugarCREPE); Winoground text / image / group scores (Thrush et al. 2022);
  * binding (:func:`binding_probe`): on two-object images, does the true colour-shape binding
    outscore the swapped one, read through one-clause captions, a two-clause caption and a
    relation caption;
  * CoCa: on one-object images, the fraction of generated captions naming exactly the object's
    shape, color and size, and the fraction of captions (any scene) that are true of the image.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

SINGLE_TEMPLATE = "a photo of a {}."


def zero_shot_accuracy(rt, images: Sequence[np.ndarray], labels: np.ndarray,
                       classnames: Sequence[str], templates: Sequence[str]) -> float:
    probs = rt.classify(images, list(classnames), templates=list(templates))
    return float((probs.argmax(1) == labels).mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 *, n_classes: int, weight_decay: float = 1e-4, steps: int = 200) -> float:
    """Multinomial logistic regression with L-BFGS on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt = torch.from_numpy((train_x - mu) / sd).double()
    xs = torch.from_numpy((test_x - mu) / sd).double()
    yt = torch.from_numpy(train_y).long()
    w = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xs @ w + b).argmax(1).numpy() == test_y).mean())


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks=(1, 5)) -> Dict[int, float]:
    """scores, relevant: ``Q x G``; a query hits at k when any relevant item is in its top k."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def hard_negative_correct(rt, hn: Dict[str, Any]) -> np.ndarray:
    """``bool [n]``: for each image of a ``hard_negative_set`` (one negative per caption), does
    its caption score above its hard negative."""
    ie = rt.encode_image(list(hn["images"]))
    pos = (ie * rt.encode_text(hn["captions"])).sum(1)
    neg = (ie * rt.encode_text([row[0] for row in hn["hard_negatives"]])).sum(1)
    return pos > neg


def winoground_scores(s: np.ndarray) -> Dict[str, float]:
    """s: ``P x 2 x 2`` with ``s[p, c, i]`` = score of caption c with image i (c_i true of i_i)."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text": float(text.mean()), "image": float(image.mean()),
            "group": float((text & image).mean())}


def _world(split: str):
    from fmrt.data import ShapesWorld, split_seed

    return ShapesWorld(image_size=64, seed=split_seed(split)), split_seed(split)


def evaluate(model: str, *, backend: str = "torch", n: int = 1000, seed: int = 0,
             probe_train: int = 2000, retrieval_n: int = 500) -> Dict[str, Any]:
    import fmrt
    from fmrt import data as sw

    rt = fmrt.load(model, backend=backend)
    report: Dict[str, Any] = {"model": rt.name, "backend": backend, "n": n}
    templates = list(sw.TEMPLATES)
    test, test_seed = _world("test")
    train, train_seed = _world("train")

    # ---- zero-shot classification (one-object images)
    zs: Dict[str, float] = {}
    for kind in ("color_shape", "shape", "color"):
        images, labels = test.classification_set(n, seed=test_seed + seed, kind=kind)
        names = sw.class_labels(kind)
        zs[f"{kind}_single"] = zero_shot_accuracy(rt, images, labels, names, [SINGLE_TEMPLATE])
        zs[f"{kind}_ensemble"] = zero_shot_accuracy(rt, images, labels, names, templates)
    report["zero_shot"] = zs

    # ---- linear probe (24 classes, features from the train split)
    tr_img, tr_y = train.classification_set(probe_train, seed=train_seed + seed)
    te_img, te_y = test.classification_set(n, seed=test_seed + seed + 1)
    report["linear_probe"] = linear_probe(rt.encode_image(list(tr_img)), tr_y,
                                          rt.encode_image(list(te_img)), te_y,
                                          n_classes=len(sw.class_labels("color_shape")))

    # ---- retrieval (a hit = a caption true of the image)
    ret = test.clip_batch(retrieval_n, rng=np.random.default_rng([test_seed, seed, 7]),
                          return_scenes=True)
    caps = [sw.parse_caption(c) for c in ret["captions"]]
    relevant = np.array([[sw.is_true(sc, c) for c in caps] for sc in ret["scenes"]])
    img_e, txt_e = rt.encode_image(list(ret["images"])), rt.encode_text(ret["captions"])
    i2t, t2i = recall_at_k(img_e @ txt_e.T, relevant), recall_at_k(txt_e @ img_e.T, relevant.T)
    report["retrieval"] = {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5]}

    # ---- compositional: hard negatives (one per caption) and Winoground
    hn = test.hard_negative_set(n, seed=test_seed + seed, negatives_per_caption=1)
    correct = hard_negative_correct(rt, hn)
    kinds = np.asarray(hn["kinds"])
    report["hard_negative_acc"] = float(correct.mean())
    report["hard_negative_acc_by_caption_kind"] = {
        k: float(correct[kinds == k].mean()) for k in sorted(set(hn["kinds"]))}
    wg = test.winoground_set(max(1, n // 2), seed=test_seed + seed)
    e0, e1 = rt.encode_image(list(wg["images0"])), rt.encode_image(list(wg["images1"]))
    c0, c1 = rt.encode_text(wg["captions0"]), rt.encode_text(wg["captions1"])
    s = np.stack([np.stack([(c0 * e0).sum(1), (c0 * e1).sum(1)], 1),
                  np.stack([(c1 * e0).sum(1), (c1 * e1).sum(1)], 1)], 1)
    report["winoground"] = winoground_scores(s)

    report["binding"] = binding_probe(rt, n=min(n, 1000), seed=seed)

    if rt.family == "coca":
        report["captioning"] = caption_metrics(rt, n=min(n, 500), seed=seed)
    return report


def binding_scenes(n: int, seed: int = 0):
    """``(images uint8 [n, 64, 64, 3], meta int [n, 6])``: two-object test-split scenes with
    distinct colours ``c0, c1`` and shapes ``s0, s1`` (vocabulary indices), bound ``c0-s0 +
    c1-s1`` when ``meta[:, 4]`` is 1 and ``c0-s1 + c1-s0`` when 0 (at random);
    ``meta[:, 5]`` is 1 when the ``c0`` object's centre is left of the ``c1`` object's."""
    from fmrt.data import as_rng, render_batch
    from fmrt.data.vocab import COLORS, SHAPES, SIZES

    world, test_seed = _world("test")
    R = np.random.default_rng([test_seed, seed, 0xB1D])
    rr = as_rng(np.random.default_rng([test_seed, seed, 0xB1E]))
    scenes, meta = [], []
    while len(scenes) < n:
        c = R.choice(len(COLORS), 2, replace=False)
        s = R.choice(len(SHAPES), 2, replace=False)
        y = int(R.integers(2))
        sh = (s[0], s[1]) if y else (s[1], s[0])
        attrs = [(SHAPES[sh[i]], COLORS[c[i]], SIZES[R.integers(len(SIZES))]) for i in range(2)]
        sc = world.sample_scene(rr, attributes=attrs)
        if len(sc.objects) != 2:   # the second object did not fit
            continue
        o0 = next(o for o in sc.objects if o.color == COLORS[c[0]])
        o1 = next(o for o in sc.objects if o.color == COLORS[c[1]])
        scenes.append(sc)
        meta.append((c[0], c[1], s[0], s[1], y, int(o0.center[0] < o1.center[0])))
    return render_batch(scenes), np.array(meta, dtype=np.int64).reshape(-1, 6)


def binding_probe(rt, *, n: int = 1000, seed: int = 0, scenes=None) -> Dict[str, float]:
    """Colour-shape binding of a CLIP-family runtime on :func:`binding_scenes`: the share of
    images on which the true binding outscores the swapped one, read three ways.

    * ``clauses``: image . (t("a c0 s0") + t("a c1 s1")) ("an" before "orange") against the swapped pair of
      one-clause captions: does the image embedding bind, as one-clause captions read it?
    * ``caption``: t("a c0 s0 and a c1 s1") against t("a c0 s1 and a c1 s0");
    * ``relation``: the same inside a relation caption whose relation word is true of the scene
      ("... to the left of ...");
    * ``text``: mean cosine of the two-clause caption with its clause sum minus that with the
      swapped clause sum (0 for a bag-of-words text tower).
    A bag-of-words model scores 0.5 on the first three."""
    from fmrt.data.vocab import COLORS, SHAPES, article

    images, meta = scenes if scenes is not None else binding_scenes(n, seed)
    e = rt.encode_image(list(images))
    y = meta[:, 4].astype(bool)

    def phrase(ci, si):
        return f"{article(COLORS[ci])} {COLORS[ci]} {SHAPES[si]}"

    def enc(fmt):
        return rt.encode_text([fmt(*m) for m in meta])

    def wins(a, b):
        return float((((e * a).sum(1) > (e * b).sum(1)) == y).mean())

    a0 = enc(lambda c0, c1, s0, s1, *_: phrase(c0, s0))
    a1 = enc(lambda c0, c1, s0, s1, *_: phrase(c1, s1))
    b0 = enc(lambda c0, c1, s0, s1, *_: phrase(c0, s1))
    b1 = enc(lambda c0, c1, s0, s1, *_: phrase(c1, s0))
    ta = enc(lambda c0, c1, s0, s1, *_: f"{phrase(c0, s0)} and {phrase(c1, s1)}")
    tb = enc(lambda c0, c1, s0, s1, *_: f"{phrase(c0, s1)} and {phrase(c1, s0)}")

    def rel(left):
        return "to the left of" if left else "to the right of"

    ra = enc(lambda c0, c1, s0, s1, _, left: f"{phrase(c0, s0)} {rel(left)} {phrase(c1, s1)}")
    rb = enc(lambda c0, c1, s0, s1, _, left: f"{phrase(c0, s1)} {rel(left)} {phrase(c1, s0)}")

    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    text = float(((ta * unit(a0 + a1)).sum(1) - (ta * unit(b0 + b1)).sum(1)).mean())
    return {"clauses": wins(a0 + a1, b0 + b1), "caption": wins(ta, tb),
            "relation": wins(ra, rb), "text": text}


def caption_metrics(rt, *, n: int, seed: int) -> Dict[str, Any]:
    from fmrt import data as sw

    test, test_seed = _world("test")
    images, _, scenes = test.classification_set(n, seed=test_seed + seed + 2, return_scenes=True)
    caps = rt.generate_caption(list(images))

    def exact(scene, text: str) -> bool:
        # one clause naming exactly the object's shape, color and size, true of the image
        try:
            c = sw.parse_caption(text)
        except sw.CaptionParseError:
            return False
        o, p = scene.objects[0], c.clauses[0].subject
        return (len(c.clauses) == 1 and c.clauses[0].relation is None and sw.is_true(scene, c)
                and (p.shape, p.color, p.size) == (o.shape, o.color, o.size))

    multi = test.clip_batch(n, rng=np.random.default_rng([test_seed, seed, 9]), return_scenes=True)
    caps2 = rt.generate_caption(list(multi["images"]))

    def true(scene, text: str) -> bool:
        try:
            return sw.is_true(scene, text)
        except sw.CaptionParseError:
            return False

    return {"single_object_exact_match": float(np.mean([exact(s, c) for s, c in zip(scenes, caps)])),
            "caption_true_rate": float(np.mean([true(s, c) for s, c in zip(multi["scenes"], caps2)])),
            "examples": caps2[:5]}


def format_report(reports: List[Dict[str, Any]]) -> str:
    """Side-by-side markdown table of ``evaluate`` results."""
    def flat(r: Dict[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in r.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    out[f"{k}.{k2}"] = v2
            elif k not in ("model", "backend", "n"):
                out[k] = v
        return out

    flats = [flat(r) for r in reports]
    keys = [k for k in flats[0] if not isinstance(flats[0][k], list)]
    lines = ["| metric | " + " | ".join(r["model"] for r in reports) + " |",
             "|---|" + "---|" * len(reports)]
    for k in keys:
        vals = [f"{f.get(k, float('nan')):.3f}" if isinstance(f.get(k), float) else str(f.get(k))
                for f in flats]
        lines.append(f"| {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
