"""The ShapesWorld generator: scene sampling, winoground pairs and the batch APIs used by
training and evaluation. Deterministic: the same seed (or generator state) gives the same
output, on every machine (numpy's PCG64 + pure-Python geometry)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fmrt.data import language as L
from fmrt.data.language import Caption, Clause, Phrase
from fmrt.data.scene import (FastRNG, Scene, ShapeObject, as_rng, object_at, place_objects, relation_clear,
                             render_batch, stamps)
from fmrt.data.vocab import COLORS, RELATIONS, SHAPES, SIZES, class_labels, label_index

#: Background gray levels (all channels equal): uniform in [BACKGROUND_MIN, 255].
BACKGROUND_MIN = 225


class ShapesWorld:
    """Seeded ShapesWorld generator.

    ``image_size``: square image side (>= 16). ``seed``: seeds the generator's own stream, used
    by every method called with ``rng=None``; pass ``rng`` (numpy Generator, :class:`FastRNG` or
    int seed) for an explicit stream. ``min_objects``/``max_objects``: object count range (the
    count is drawn uniformly; an object that cannot be placed without overlap after a bounded
    number of tries is dropped). ``cluster_prob``: probability that a scene draws its objects
    from 1-3 (color, shape) types, so that counts above one are common.
    """

    def __init__(self, image_size: int = 64, seed: int = 0, min_objects: int = 1, max_objects: int = 6,
                 cluster_prob: float = 0.5):
        if not 1 <= min_objects <= max_objects <= 6:
            raise ValueError("need 1 <= min_objects <= max_objects <= 6")
        self.image_size = int(image_size)
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.cluster_prob = cluster_prob
        self.rng = FastRNG(np.random.default_rng(seed))
        stamps(self.image_size)  # validate + warm the cache

    def _r(self, rng) -> FastRNG:
        return self.rng if rng is None else as_rng(rng)

    # ---------------------------------------------------------------------------------- scenes

    def sample_attributes(self, rng, n: int) -> List[Tuple[str, str, str]]:
        """``n`` random ``(shape, color, size)`` triples."""
        R = self._r(rng)
        if n >= 2 and R.u() < self.cluster_prob:
            k = 1 + R.randint(min(3, n - 1))
            types = [(R.choice(SHAPES), R.choice(COLORS)) for _ in range(k)]
            out = []
            for _ in range(n):
                s, c = R.choice(types)
                out.append((s, c, R.choice(SIZES)))
            return out
        return [(R.choice(SHAPES), R.choice(COLORS), R.choice(SIZES)) for _ in range(n)]

    def empty_scene(self, rng=None) -> Scene:
        R = self._r(rng)
        g = BACKGROUND_MIN + R.randint(256 - BACKGROUND_MIN)
        return Scene(self.image_size, (g, g, g), [])

    def sample_scene(self, rng=None, num_objects: Optional[int] = None,
                     attributes: Optional[Sequence[Tuple[str, str, str]]] = None) -> Scene:
        """A random scene. ``num_objects`` fixes the (attempted) object count; ``attributes``
        fixes the objects' ``(shape, color, size)``. Large objects are placed first; objects are
        then shuffled into random order."""
        R = self._r(rng)
        scene = self.empty_scene(R)
        if attributes is None:
            n = num_objects if num_objects is not None else self.min_objects + R.randint(
                self.max_objects - self.min_objects + 1)
            attributes = self.sample_attributes(R, n)
        specs = sorted(attributes, key=lambda t: t[2] != "large")
        place_objects(scene, specs, R)
        if len(scene.objects) > 1:
            R.shuffle(scene.objects)
        return scene

    def single_object_scene(self, rng=None, shape: Optional[str] = None, color: Optional[str] = None,
                            size: Optional[str] = None) -> Scene:
        """A scene with exactly one object (unspecified attributes drawn at random)."""
        R = self._r(rng)
        scene = self.empty_scene(R)
        spec = (shape or R.choice(SHAPES), color or R.choice(COLORS), size or R.choice(SIZES))
        if not place_objects(scene, [spec], R):
            raise RuntimeError("could not place a single object")  # impossible for image_size >= 16
        return scene

    def render(self, scenes: Sequence[Scene]) -> np.ndarray:
        """``uint8 [B, H, W, 3]``."""
        return render_batch(scenes)

    # -------------------------------------------------------------------------------- language

    def caption(self, scene: Scene, rng=None, kind: Optional[str] = None) -> Caption:
        return L.caption(scene, self._r(rng), kind)

    def dense_caption(self, scene: Scene) -> Caption:
        return L.dense_caption(scene)

    def hard_negatives(self, scene: Scene, caption, rng=None, n: int = 1) -> List[Caption]:
        return L.hard_negatives(scene, caption, self._r(rng), n)

    def is_true(self, scene: Scene, caption, margin: float = 0.25) -> bool:
        return L.is_true(scene, caption, margin)

    def questions(self, scene: Scene, rng=None) -> List[Tuple[str, str]]:
        return L.questions(scene, self._r(rng))

    def answer(self, scene: Scene, question: str) -> str:
        return L.answer(scene, question)

    def caption_with_negatives(self, scene: Scene, rng=None, n: int = 1, kind: Optional[str] = None,
                               tries: int = 6) -> Tuple[Caption, List[Caption]]:
        """A true caption with exactly ``n`` hard negatives; draws new captions (then count
        captions, whose number alone gives 5 negatives) until enough negatives exist. Raises
        ValueError if the scene cannot give ``n``."""
        R = self._r(rng)
        for t in range(tries):
            k = kind if kind is not None else ("count" if t == tries - 1 else None)
            cap = L.caption(scene, R, k)
            negs = L.hard_negatives(scene, cap, R, n)
            if len(negs) == n:
                return cap, negs
        raise ValueError(f"no caption with {n} hard negatives for this scene")

    # ------------------------------------------------------------------------------ winoground

    def winoground_scenes(self, rng=None, kind: Optional[str] = None, tries: int = 200):
        """``(scene0, scene1, cap0, cap1)``: the captions hold the same words in a different
        order; ``cap0`` is true of ``scene0`` only and ``cap1`` of ``scene1`` only (both checked,
        falsity even with relation margin 0). ``kind``: ``relation`` (swap the objects around a
        relation), ``color`` (swap colors between two shapes) or ``size`` (swap sizes)."""
        R = self._r(rng)
        k = kind if kind is not None else R.choice(("relation", "color", "size"))
        for _ in range(tries):
            res = self._winoground_try(R, k)
            if res is not None:
                return res
        raise RuntimeError("could not build a winoground pair")

    def winoground_pair(self, rng=None, kind: Optional[str] = None):
        """``(img0, img1, cap0, cap1)``: two ``uint8 [H, W, 3]`` images and two captions
        (see :meth:`winoground_scenes`)."""
        s0, s1, c0, c1 = self.winoground_scenes(rng, kind)
        imgs = render_batch([s0, s1])
        return imgs[0], imgs[1], c0, c1

    def _winoground_try(self, R: FastRNG, kind: str):
        S = self.image_size
        cA, cB = R.sample(COLORS, 2)
        if kind == "color":
            sA, sB = R.sample(SHAPES, 2)
        else:
            sA, sB = R.choice(SHAPES), R.choice(SHAPES)
        if kind == "size":
            zA, zB = R.sample(SIZES, 2)
        else:
            zA, zB = R.choice(SIZES), R.choice(SIZES)
        s0 = self.empty_scene(R)
        if len(place_objects(s0, [(sA, cA, zA), (sB, cB, zB)], R)) != 2:
            return None
        A, B = s0.objects
        with_size = kind == "size" or R.u() < 0.3
        pA = Phrase(sA, cA, zA if with_size else None)
        pB = Phrase(sB, cB, zB if with_size else None)
        if kind == "relation":
            rels = [r for r in RELATIONS if relation_clear(A, r, B)]
            if not rels:
                return None
            rel = R.choice(rels)
            A1 = object_at(sA, cA, zA, B.center, S)
            B1 = object_at(sB, cB, zB, A.center, S)
            c0 = Caption((Clause(pA, rel, pB),), "relation")
            c1 = Caption((Clause(pB, rel, pA),), "relation")
        elif kind == "color":
            A1 = ShapeObject(sA, cB, zA, A.center, A.radius, A.box, S)
            B1 = ShapeObject(sB, cA, zB, B.center, B.radius, B.box, S)
            c0 = Caption((Clause(pA), Clause(pB)), "conjunction")
            c1 = Caption((Clause(Phrase(sA, cB, pA.size)), Clause(Phrase(sB, cA, pB.size))), "conjunction")
        elif kind == "size":
            A1 = object_at(sA, cA, zB, A.center, S)
            B1 = object_at(sB, cB, zA, B.center, S)
            c0 = Caption((Clause(pA), Clause(pB)), "conjunction")
            c1 = Caption((Clause(Phrase(sA, cA, zB)), Clause(Phrase(sB, cB, zA))), "conjunction")
        else:
            raise ValueError(f"unknown winoground kind {kind!r}; expected relation, color or size")
        s1 = Scene(S, s0.background, [])
        if not s1.fits(A1):
            return None
        s1.objects.append(A1)
        if not s1.fits(B1):
            return None
        s1.objects.append(B1)
        # distractors whose (color, shape) appears in neither caption, at the same place in both
        banned = {(cA, sA), (cB, sB), (cA, sB), (cB, sA)}
        for _ in range(R.randint(3)):
            for _t in range(20):
                s, c = R.choice(SHAPES), R.choice(COLORS)
                if (c, s) not in banned:
                    break
            else:
                continue
            z = R.choice(SIZES)
            if place_objects(s0, [(s, c, z)], R, tries=20):
                o = s0.objects[-1]
                if s1.fits(o):
                    s1.objects.append(o)
                else:
                    s0.objects.pop()
        if not (L.is_true(s0, c0) and L.is_true(s1, c1)
                and not L.is_true(s1, c0, margin=0.0) and not L.is_true(s0, c1, margin=0.0)):
            return None
        if sorted(c0.split()) != sorted(c1.split()) or c0 == c1:
            return None
        return s0, s1, c0, c1

    # ------------------------------------------------------------------------------ batch APIs

    def clip_batch(self, batch_size: int, rng=None, return_scenes: bool = False) -> Dict[str, object]:
        """Image-text batch for CLIP/NegCLIP/CoCa: ``images uint8 [B, H, W, 3]``,
        ``captions`` (B true captions, kinds mixed), ``hard_negatives`` (one per caption, false of
        its image), ``kinds`` (caption kinds); ``scenes`` when ``return_scenes``."""
        R = self._r(rng)
        scenes, caps, negs = [], [], []
        for _ in range(batch_size):
            sc = self.sample_scene(R)
            cap, neg = self.caption_with_negatives(sc, R, 1)
            scenes.append(sc)
            caps.append(cap)
            negs.append(neg[0])
        out = {
            "images": render_batch(scenes),
            "captions": [str(c) for c in caps],
            "hard_negatives": [str(c) for c in negs],
            "kinds": [c.kind for c in caps],
        }
        if return_scenes:
            out["scenes"] = scenes
        return out

    def classification_set(self, n: int, seed: int = 0, kind: str = "color_shape",
                           return_scenes: bool = False):
        """``(images uint8 [n, H, W, 3], labels int64 [n])``: one object per image; labels index
        :func:`class_labels(kind)` and are balanced (each class ``n // K`` or ``n // K + 1``
        times, in random order). With ``return_scenes`` also the scenes."""
        R = as_rng(np.random.default_rng([int(seed), 0xC1A55]))
        K = len(class_labels(kind))
        labels = list(range(K)) * (n // K) + R.sample(range(K), n % K)
        R.shuffle(labels)
        scenes = []
        for lab in labels:
            if kind == "color_shape":
                sc = self.single_object_scene(R, shape=SHAPES[lab % len(SHAPES)], color=COLORS[lab // len(SHAPES)])
            elif kind == "shape":
                sc = self.single_object_scene(R, shape=SHAPES[lab])
            else:
                sc = self.single_object_scene(R, color=COLORS[lab])
            o = sc.objects[0]
            assert label_index(kind, o.shape, o.color) == lab
            scenes.append(sc)
        images = render_batch(scenes) if scenes else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        labels_arr = np.asarray(labels, dtype=np.int64)
        if return_scenes:
            return images, labels_arr, scenes
        return images, labels_arr

    def winoground_set(self, n: int, seed: int = 0, kind: Optional[str] = None) -> Dict[str, object]:
        """``n`` winoground pairs: ``images0``, ``images1`` (``uint8 [n, H, W, 3]``),
        ``captions0``, ``captions1``, ``kinds``, ``scenes0``, ``scenes1``. ``captions0[i]`` is true
        of ``images0[i]`` only, ``captions1[i]`` of ``images1[i]`` only. Kinds cycle
        relation, color, size unless ``kind`` is given."""
        R = as_rng(np.random.default_rng([int(seed), 0x3170]))
        kinds = ("relation", "color", "size")
        s0s, s1s, c0s, c1s, ks = [], [], [], [], []
        for i in range(n):
            k = kind if kind is not None else kinds[i % 3]
            s0, s1, c0, c1 = self.winoground_scenes(R, k)
            s0s.append(s0)
            s1s.append(s1)
            c0s.append(str(c0))
            c1s.append(str(c1))
            ks.append(k)
        empty = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return {
            "images0": render_batch(s0s) if n else empty,
            "images1": render_batch(s1s) if n else empty,
            "captions0": c0s,
            "captions1": c1s,
            "kinds": ks,
            "scenes0": s0s,
            "scenes1": s1s,
        }

    def hard_negative_set(self, n: int, seed: int = 0, negatives_per_caption: int = 3,
                          kind: Optional[str] = None) -> Dict[str, object]:
        """ARO/SugarCrepe-style evaluation set: ``images uint8 [n, H, W, 3]``, ``captions``,
        ``hard_negatives`` (``n`` lists of exactly ``negatives_per_caption`` false captions),
        ``kinds``, ``scenes``."""
        R = as_rng(np.random.default_rng([int(seed), 0x4E6]))
        scenes, caps, negs = [], [], []
        attempts = 0
        while len(scenes) < n:
            attempts += 1
            if attempts > 20 * n + 100:
                raise ValueError(f"could not find captions with {negatives_per_caption} hard negatives")
            sc = self.sample_scene(R)
            try:
                cap, ng = self.caption_with_negatives(sc, R, negatives_per_caption, kind=kind)
            except ValueError:
                continue
            scenes.append(sc)
            caps.append(cap)
            negs.append([str(c) for c in ng])
        return {
            "images": render_batch(scenes) if n else np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
            "captions": [str(c) for c in caps],
            "hard_negatives": negs,
            "kinds": [c.kind for c in caps],
            "scenes": scenes,
        }


# ------------------------------------------------------------------------ module-level helpers

_WORLDS: Dict[int, ShapesWorld] = {}


def default_world(image_size: int = 64) -> ShapesWorld:
    """A shared ``ShapesWorld(image_size)`` (for the module-level helpers; pass explicit rngs)."""
    w = _WORLDS.get(image_size)
    if w is None:
        w = _WORLDS[image_size] = ShapesWorld(image_size)
    return w


def clip_batch(batch_size: int, rng=None, image_size: int = 64, return_scenes: bool = False):
    """:meth:`ShapesWorld.clip_batch` on a default world (``rng``: seed or Generator)."""
    return default_world(image_size).clip_batch(batch_size, as_rng(rng), return_scenes)


def classification_set(n: int, seed: int = 0, kind: str = "color_shape", image_size: int = 64,
                       return_scenes: bool = False):
    return default_world(image_size).classification_set(n, seed, kind, return_scenes)


def winoground_set(n: int, seed: int = 0, image_size: int = 64, kind: Optional[str] = None):
    return default_world(image_size).winoground_set(n, seed, kind)


def hard_negative_set(n: int, seed: int = 0, negatives_per_caption: int = 3, image_size: int = 64,
                      kind: Optional[str] = None):
    return default_world(image_size).hard_negative_set(n, seed, negatives_per_caption, kind)


def winoground_pair(rng=None, image_size: int = 64, kind: Optional[str] = None):
    return default_world(image_size).winoground_pair(as_rng(rng), kind)
