"""ShapesWorld generator tests (fast: a few seconds on CPU).

Set SHAPESWORLD_FUZZ=<n> to run the randomized checks on n scenes instead of the default."""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest

import fmrt.data as D
from fmrt.data import (
    COLOR_RGB,
    COLORS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Scene,
    ShapesWorld,
    ShapesWorldDataset,
    is_true,
    make_object,
    parse_caption,
    tokenize,
    vocabulary,
)

N_FUZZ = int(os.environ.get("SHAPESWORLD_FUZZ", "150"))
VOCAB = set(vocabulary())


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=64, seed=0)


@pytest.fixture(scope="module")
def scenes(world):
    rng = np.random.default_rng(123)
    return [world.sample_scene(rng) for _ in range(N_FUZZ)]


def _tokens_in_vocab(text: str) -> bool:
    return set(tokenize(text)) <= VOCAB


_BAD_ARTICLE = re.compile(r"\ba (?=[aeiou])|\ban (?=[^aeiou\s])")


# ------------------------------------------------------------------------------- vocabulary


def test_constants_and_labels():
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert COLORS == ("red", "green", "blue", "yellow", "purple", "orange")
    assert SIZES == ("small", "large")
    assert NUMBER_WORDS == ("one", "two", "three", "four", "five", "six")
    assert RELATIONS == ("to the left of", "to the right of", "above", "below")
    assert len(TEMPLATES) >= 8 and all("{}" in t for t in TEMPLATES)
    cs = D.class_labels("color_shape")
    assert len(cs) == 24 and len(set(cs)) == 24 and cs[0] == "red circle" and cs[5] == "green square"
    assert D.class_labels("shape") == list(SHAPES) and D.class_labels("color") == list(COLORS)
    for k in ("color_shape", "shape", "color"):
        for i, lab in enumerate(D.class_labels(k)):
            words = lab.split()
            color = words[0] if k != "shape" else "red"
            shape = words[-1] if k != "color" else "star"
            assert D.label_index(k, shape, color) == i
    rgb = np.array([COLOR_RGB[c] for c in COLORS], dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(COLORS)) * 1e9
    assert d.min() > 80  # well separated
    assert (rgb.min(1) < 200).all()  # far from the light backgrounds
    vocab = vocabulary()
    assert vocab == sorted(vocab) and len(set(vocab)) == len(vocab)
    for w in ("an", "circles", "stars", "left", "above", "point", "counting", "?", ".", ",", "7"):
        assert w in VOCAB


def test_article_and_templates():
    assert D.article("orange") == "an" and D.article("red") == "a" and D.article("one") == "a"
    assert D.apply_template("a photo of a {}.", "orange star") == "a photo of an orange star."
    assert D.apply_template("a {} on a plain background.", "orange star") == "an orange star on a plain background."
    assert D.apply_template("a {}.", "red circle") == "a red circle."
    assert D.apply_template("a photo of the {}.", "orange star") == "a photo of the orange star."
    prompts = D.class_prompts("color_shape")
    assert len(prompts) == 24 and all(len(p) == len(TEMPLATES) for p in prompts)
    for row in prompts + D.class_prompts("color") + D.class_prompts("shape"):
        for p in row:
            assert not _BAD_ARTICLE.search(p), p
            assert _tokens_in_vocab(p), p
            parse_caption(p)  # every prompt is a parsable phrase


# ------------------------------------------------------------------------------ rendering


def test_determinism(world):
    a = ShapesWorld(64, seed=7).clip_batch(16, rng=5)
    b = ShapesWorld(64, seed=7).clip_batch(16, rng=5)
    c = ShapesWorld(64, seed=7).clip_batch(16, rng=6)
    assert np.array_equal(a["images"], b["images"])
    assert a["captions"] == b["captions"] and a["hard_negatives"] == b["hard_negatives"]
    assert not np.array_equal(a["images"], c["images"])
    # the world's own stream (rng=None) is seeded too
    w1, w2 = ShapesWorld(64, seed=3), ShapesWorld(64, seed=3)
    s1, s2 = w1.sample_scene(), w2.sample_scene()
    assert s1 == s2 and w1.questions(s1) == w2.questions(s2)
    assert np.array_equal(w1.classification_set(10, seed=1)[0], w2.classification_set(10, seed=1)[0])
    d1 = ShapesWorldDataset("val", 5)[3]
    d2 = ShapesWorldDataset("val", 5)[3]
    assert np.array_equal(d1["image"], d2["image"]) and d1["caption"] == d2["caption"]
    assert d1["questions"] == d2["questions"]


@pytest.mark.parametrize("image_size", [64, 32, 96])
def test_masks_match_render(image_size):
    world = ShapesWorld(image_size, seed=1)
    rng = np.random.default_rng(0)
    scs = [world.sample_scene(rng) for _ in range(max(20, N_FUZZ // 3))]
    imgs = world.render(scs)
    assert imgs.shape == (len(scs), image_size, image_size, 3) and imgs.dtype == np.uint8
    counts = [len(s) for s in scs]
    assert min(counts) >= 1 and max(counts) <= 6
    for sc, img in zip(scs, imgs):
        assert np.array_equal(sc.render(), img)
        m = sc.masks()
        assert m.shape == (len(sc), image_size, image_size) and m.dtype == bool
        assert (m.sum(0) <= 1).all(), "masks overlap"
        bg = ~m.any(0)
        assert (img[bg] == np.array(sc.background, np.uint8)).all()
        assert min(sc.background) >= 225
        for o, om in zip(sc.objects, m):
            assert om.sum() > 10
            assert (img[om] == np.array(COLOR_RGB[o.color], np.uint8)).all()
            assert np.array_equal(om, o.mask(image_size))
        lm = sc.label_map()
        assert np.array_equal(lm > 0, m.any(0))


def test_boxes_points_consistent(scenes):
    for sc in scenes:
        m = sc.masks()
        boxes, pts = sc.boxes(), sc.points()
        S = sc.image_size
        assert boxes.shape == (len(sc), 4) and pts.shape == (len(sc), 2)
        for i, (o, om) in enumerate(zip(sc.objects, m)):
            ys, xs = np.nonzero(om)
            x0, y0, x1, y1 = boxes[i]
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight, incl-excl
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
            np.testing.assert_allclose(pts[i], (xs.mean(), ys.mean()), atol=1e-4)
            px, py = (int(np.floor(v + 0.5)) for v in o.center)
            assert om[py, px], "rounded point must hit the object"
        # a gap of background between boxes
        for i in range(len(sc)):
            for j in range(i + 1, len(sc)):
                a, b = boxes[i], boxes[j]
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]  # >= 1 px apart


def test_sizes_and_stamps():
    st = D.stamps(64)
    for s in SHAPES:
        small, large = st[(s, "small")], st[(s, "large")]
        assert 1.7 < large.w / small.w < 2.4 and 1.7 < large.h / small.h < 2.4
        assert np.array_equal(small.mask, small.mask[:, ::-1])  # left-right symmetric
    cls = ShapesWorld(64).classification_set(48, seed=0, kind="color_shape", return_scenes=True)
    assert all(len(s) == 1 for s in cls[2])


# ------------------------------------------------------------------------------- captions


def test_captions_true_roundtrip_and_negatives(world, scenes):
    rng = np.random.default_rng(1)
    kinds_seen = set()
    for sc in scenes:
        for kind in (None, "single", "relation", "conjunction", "count"):
            try:
                cap = world.caption(sc, rng, kind)
            except ValueError:
                assert kind in ("relation", "conjunction")
                continue
            kinds_seen.add(cap.kind)
            text = str(cap)
            assert text == text.lower() and not text.endswith(".")
            assert is_true(sc, cap) and is_true(sc, text), text
            assert is_true(sc, text + ".") and is_true(sc, text.upper())
            parsed = parse_caption(text)
            assert parsed.clauses == cap.clauses and parsed.kind == cap.kind
            assert _tokens_in_vocab(text) and not _BAD_ARTICLE.search(text), text
            negs = world.hard_negatives(sc, cap, rng, 4)
            assert len({str(n) for n in negs}) == len(negs)
            for n in negs:
                assert str(n) != text
                assert not is_true(sc, n) and not is_true(sc, str(n)) and not is_true(sc, n, margin=0.0), (text, n)
                assert _tokens_in_vocab(str(n)) and not _BAD_ARTICLE.search(str(n)), n
                assert parse_caption(str(n)).clauses == n.clauses
        dense = world.dense_caption(sc)
        assert is_true(sc, dense) and is_true(sc, str(dense)) and _tokens_in_vocab(str(dense))
        assert len(dense.clauses) == len(sc)
        assert all(p.size and p.color and p.shape and p.place for p in dense.phrases)
    assert kinds_seen == {"single", "relation", "conjunction", "count"}


def test_negative_kinds():
    w = ShapesWorld(64)
    sc = Scene(64, (255, 255, 255), [
        make_object("circle", "red", "small", 2, 20, 64),
        make_object("square", "blue", "small", 40, 20, 64),
    ])
    cap = parse_caption("a red circle to the left of a blue square")
    negs = {str(n) for n in w.hard_negatives(sc, cap, 0, 100)}
    assert "a blue square to the left of a red circle" in negs  # relation-order swap
    assert "a blue circle to the left of a red square" in negs  # attribute swap
    assert "a red circle to the right of a blue square" in negs  # relation replaced
    assert "a red star to the left of a blue square" in negs  # shape replaced
    assert "a red circle above a blue square" in negs  # false: same height
    assert "a red circle to the left of a green square" in negs
    conj = w.hard_negatives(sc, "a red circle and a blue square", 0, 100)
    assert "a blue circle and a red square" in conj
    count = w.hard_negatives(sc, "one red circle", 0, 100)
    assert {"two red circles", "six red circles", "one red square"} <= set(count)


def test_relation_rule():
    S = 64
    b = make_object("square", "blue", "small", 30, 30, S)  # width 9 -> margin 2.25
    for dx, expect in ((-3, True), (-2, False), (0, False)):
        a = make_object("circle", "red", "small", 30 + dx, 50, S)
        sc = Scene(S, (255, 255, 255), [a, b])
        assert sc.relation_holds(0, "to the left of", 1) == expect, dx
        assert is_true(sc, "a red circle to the left of a blue square") == expect
        assert is_true(sc, "a red circle below a blue square")
        assert not is_true(sc, "a red circle above a blue square")
    # generated relation captions: unique phrases, relation holds by a clear margin
    w = ShapesWorld(64, seed=5)
    rng = np.random.default_rng(2)
    n = 0
    for _ in range(max(40, N_FUZZ)):
        sc = w.sample_scene(rng)
        try:
            cap = w.caption(sc, rng, "relation")
        except ValueError:
            continue
        n += 1
        (cl,) = cap.clauses
        ia = [i for i, o in enumerate(sc.objects) if cl.subject.matches(o)]
        ib = [i for i, o in enumerate(sc.objects) if cl.object.matches(o)]
        assert len(ia) == 1 and len(ib) == 1
        A, B = sc.objects[ia[0]], sc.objects[ib[0]]
        dx, dy = B.center[0] - A.center[0], B.center[1] - A.center[1]
        need = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[cl.relation]
        assert need >= 0.25 * max(A.width, A.height, B.width, B.height)
    assert n > 10


def test_is_true_hand_built_scene():
    S = 64
    sc = Scene(S, (240, 240, 240), [
        make_object("circle", "red", "large", 2, 2, S),  # top left
        make_object("circle", "red", "small", 2, 50, S),  # bottom left
        make_object("square", "blue", "small", 45, 4, S),  # top right
        make_object("star", "orange", "large", 40, 40, S),  # bottom right
        make_object("triangle", "green", "small", 27, 27, S),  # center
    ])
    true = [
        "two red circles", "a large red circle", "a red circle", "a circle", "a small red circle",
        "an orange star", "a large orange star", "one orange star", "one blue square", "five shapes",
        "two circles", "one large red circle", "a red circle to the left of a blue square",
        "a large red circle to the left of a blue square", "a blue square above an orange star",
        "an orange star below a blue square", "an orange star to the right of a small red circle",
        "a red circle and a blue square", "a green triangle and an orange star and a red circle",
        "a red circle, a green triangle and a blue square", "A Red Circle.",
        "a photo of a red circle.", "a drawing of an orange star.", "a green triangle on a plain background.",
        "a photo of the blue square.", "a red circle above a red circle", "two red circles to the left of a blue square",
        "a green triangle in the center", "a large red circle in the top left", "there is a green triangle",
        "a red circle left of a blue square", "three small shapes", "the orange star",
        "a large red circle in the top left, a small blue square in the top right and a small green triangle in the center",
    ]
    false = [
        "three red circles", "one red circle", "a blue circle", "a large blue square", "a small orange star",
        "a purple star", "a red star", "four shapes", "a blue square to the left of a red circle",
        "a blue square below an orange star", "a red circle and a blue circle", "a blue circle and a red square",
        "a photo of a purple circle.", "the red circle", "two red circles to the right of a blue square",
        "a green triangle in the top left", "an orange star above a green triangle", "two small shapes",
        "a red circle to the right of a blue square and a green triangle",
    ]
    for t in true:
        assert is_true(sc, t), t
    for t in false:
        assert not is_true(sc, t), t
    for bad in ("a red", "red circle", "a red circle next to a square", "two reds", ""):
        with pytest.raises(D.CaptionParseError):
            is_true(sc, bad)


def test_article_rule(world, scenes):
    p = D.Phrase("star", "orange")
    assert p.text == "an orange star"
    assert D.Phrase("star", "orange", "large").text == "a large orange star"
    assert D.Phrase("circle", "red", count=2).text == "two red circles"
    assert D.Phrase("circle", count=1).text == "one circle"
    rng = np.random.default_rng(9)
    texts = []
    for sc in scenes[:50]:
        texts.append(str(world.caption(sc, rng)))
        texts.extend(a for q, a in world.questions(sc, rng))
        texts.extend(q for q, a in world.questions(sc, rng))
    for t in texts:
        assert not _BAD_ARTICLE.search(t), t


# ------------------------------------------------------------------------------- winoground


def test_winoground(world):
    rng = np.random.default_rng(4)
    for kind in ("relation", "color", "size", None):
        for _ in range(5):
            s0, s1, c0, c1 = world.winoground_scenes(rng, kind)
            assert sorted(c0.split()) == sorted(c1.split()) and c0 != c1
            assert is_true(s0, c0) and not is_true(s1, c0)
            assert is_true(s1, c1) and not is_true(s0, c1)
    img0, img1, c0, c1 = world.winoground_pair(np.random.default_rng(0))
    assert img0.shape == img1.shape == (64, 64, 3) and not np.array_equal(img0, img1)
    ws = world.winoground_set(9, seed=1)
    assert ws["images0"].shape == (9, 64, 64, 3)
    assert set(ws["kinds"]) == {"relation", "color", "size"}
    for s0, s1, c0, c1 in zip(ws["scenes0"], ws["scenes1"], ws["captions0"], ws["captions1"]):
        assert is_true(s0, c0) and is_true(s1, c1) and not is_true(s0, c1) and not is_true(s1, c0)


# -------------------------------------------------------------------------------- questions


def _word_count(n):
    return NUMBER_WORDS[n - 1]


def test_questions(world, scenes):
    rng = np.random.default_rng(3)
    seen = set()
    for sc in scenes:
        objs = sc.objects
        qa = world.questions(sc, rng)
        kinds = [D.question_kind(q) for q, _ in qa]
        assert len(set(kinds)) == len(kinds)
        for must in ("count", "count_all", "exists", "point", "describe"):
            assert must in kinds
        shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
        if any(v == 1 for v in shape_counts.values()):
            assert "what_color" in kinds
        for q, a in qa:
            kind = D.question_kind(q)
            seen.add(kind)
            assert _tokens_in_vocab(q) and _tokens_in_vocab(a), (q, a)
            if kind == "count_all":
                assert a == _word_count(len(objs))
            elif kind == "count":
                c, s = re.fullmatch(r"how many (\w+) (\w+)s are there\?", q).groups()
                assert a == _word_count(sum(o.color == c and o.shape == s for o in objs))
            elif kind == "what_color":
                (s,) = re.fullmatch(r"what color is the (\w+)\?", q).groups()
                ms = [o for o in objs if o.shape == s]
                assert len(ms) == 1 and a == ms[0].color
            elif kind == "exists":
                c, s = re.fullmatch(r"is there an? (\w+) (\w+)\?", q).groups()
                assert a == ("yes" if any(o.color == c and o.shape == s for o in objs) else "no")
            elif kind == "what_shape":
                rel, c, s = re.fullmatch(r"what shape is (.+) the (\w+) (\w+)\?", q).groups()
                (ref,) = [i for i, o in enumerate(objs) if o.color == c and o.shape == s]
                cands = [i for i in range(len(objs)) if i != ref and sc.relation_holds(i, rel, ref)]
                loose = [i for i in range(len(objs)) if i != ref and sc.relation_holds(i, rel, ref, margin=0)]
                assert cands and cands == loose and {objs[i].shape for i in cands} == {a}
            elif kind == "point":
                c, s = re.fullmatch(r"point to the (\w+) (\w+)s", q).groups()
                pts, total = D.parse_point_answer(a)
                ms = [o for o in objs if o.color == c and o.shape == s]
                assert total == len(ms) == len(pts)
                assert a.endswith(f"counting the {c} {s}s shows a total of {len(ms)}.")
                exp = sorted((int(np.floor(o.center[0] + 0.5)), int(np.floor(o.center[1] + 0.5))) for o in ms)
                assert sorted(map(tuple, pts.astype(int).tolist())) == exp
                if ms:
                    assert re.match(r'^(<point x="\d+" y="\d+"> )+counting', a)
            elif kind == "describe":
                assert a == str(world.dense_caption(sc)) and is_true(sc, a)
    assert seen == set(D.QUESTION_KINDS)


def test_answer_forms():
    S = 64
    sc = Scene(S, (255, 255, 255), [
        make_object("circle", "red", "small", 2, 2, S),
        make_object("circle", "red", "large", 2, 40, S),
        make_object("square", "blue", "small", 45, 30, S),
    ])
    assert D.answer(sc, "how many red circles are there?") == "two"
    assert D.answer(sc, "how many shapes are there?") == "three"
    assert D.answer(sc, "what color is the square?") == "blue"
    assert D.answer(sc, "is there an orange star?") == "no"
    assert D.answer(sc, "is there a blue square?") == "yes"
    assert D.answer(sc, "what shape is to the left of the blue square?") == "circle"
    a = D.answer(sc, "point to the red circles")
    assert a == '<point x="6" y="6"> <point x="11" y="49"> counting the red circles shows a total of 2.'
    assert D.answer(sc, "point to the green stars") == "counting the green stars shows a total of 0."
    with pytest.raises(ValueError):
        D.answer(sc, "what color is the circle?")  # two circles
    with pytest.raises(ValueError):
        D.answer(sc, "what is the meaning of life?")


# ---------------------------------------------------------------------------- batches / splits


def test_clip_batch(world):
    b = world.clip_batch(32, rng=0)
    assert b["images"].shape == (32, 64, 64, 3) and b["images"].dtype == np.uint8
    assert len(b["captions"]) == len(b["hard_negatives"]) == 32
    b = world.clip_batch(24, rng=1, return_scenes=True)
    for sc, img, c, n in zip(b["scenes"], b["images"], b["captions"], b["hard_negatives"]):
        assert type(c) is str and type(n) is str
        assert is_true(sc, c) and not is_true(sc, n) and np.array_equal(sc.render(), img)
    m = D.clip_batch(4, rng=0)
    assert m["images"].shape == (4, 64, 64, 3)


@pytest.mark.parametrize("kind,k", [("color_shape", 24), ("shape", 4), ("color", 6)])
def test_classification_set(kind, k):
    imgs, labels, scs = ShapesWorld(64).classification_set(3 * k + 1, seed=2, kind=kind, return_scenes=True)
    assert imgs.shape == (3 * k + 1, 64, 64, 3) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=k).min() >= 3
    names = D.class_labels(kind)
    for lab, sc in zip(labels, scs):
        (o,) = sc.objects
        assert D.label_index(kind, o.shape, o.color) == lab
        assert is_true(sc, D.class_prompts(kind)[lab][0])


def test_hard_negative_set():
    hs = ShapesWorld(64).hard_negative_set(12, seed=0, negatives_per_caption=3)
    assert hs["images"].shape == (12, 64, 64, 3)
    for sc, c, negs in zip(hs["scenes"], hs["captions"], hs["hard_negatives"]):
        assert len(negs) == 3 and len(set(negs)) == 3
        assert is_true(sc, c) and not any(is_true(sc, n) for n in negs)


def test_splits_disjoint_and_dataset():
    seeds = {D.split_seed(s) for s in ("train", "val", "test")}
    assert len(seeds) == 3
    with pytest.raises(ValueError):
        D.split_seed("dev")
    hashes = {}
    for split in ("train", "val", "test"):
        ds = ShapesWorldDataset(split, 40)
        hashes[split] = {ds[i]["image"].tobytes() for i in range(len(ds))}
        assert len(hashes[split]) == 40
    assert not hashes["train"] & hashes["val"] and not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    ds = ShapesWorldDataset("test", 10)
    it = ds[4]
    assert np.array_equal(it["image"], ds[4]["image"]) and np.array_equal(it["image"], ds[-6]["image"])
    for key in ("image", "caption", "hard_negative", "masks", "points", "boxes", "shapes", "colors",
                "sizes", "questions", "dense_caption", "scene"):
        assert key in it
    sc = it["scene"]
    assert is_true(sc, it["caption"]) and not is_true(sc, it["hard_negative"])
    assert np.array_equal(it["masks"], sc.masks()) and it["masks"].shape[0] == len(it["shapes"])
    cls = ShapesWorldDataset("train", 8, task="color_shape")
    for i in range(8):
        x = cls[i]
        assert x["num_objects"] == 1 and D.class_labels("color_shape")[x["label"]] == f"{x['colors'][0]} {x['shapes'][0]}"
    batch = D.collate([ds[i] for i in range(3)])
    assert tuple(batch["image"].shape) == (3, 64, 64, 3) and len(batch["masks"]) == 3
    wg = ShapesWorldDataset("val", 3, task="winoground")[1]
    assert is_true(wg["scene0"], wg["caption0"]) and not is_true(wg["scene0"], wg["caption1"])
    with pytest.raises(IndexError):
        ds[10]


def test_caption_pickles():
    cap = parse_caption("an orange star to the left of two red circles")
    cap2 = pickle.loads(pickle.dumps(cap))
    assert cap2 == cap and cap2.clauses == cap.clauses and cap2.kind == "relation"
    assert str(cap) == "an orange star to the left of two red circles"
