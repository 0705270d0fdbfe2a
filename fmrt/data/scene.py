"""ShapesWorld scenes: geometry, objects, vectorised rendering and ground truth.

Conventions (used by every ground-truth field):

- Images are ``uint8 [H, W, 3]`` (RGB), H == W == ``image_size``.
- Pixel coordinates are pixel *indices*: ``x`` is the column, ``y`` the row, both growing
  right/down from ``(0, 0)`` (the top-left pixel). A point ``(x, y)`` refers to pixel
  ``image[round(y), round(x)]`` (SAM's convention; its prompt encoder adds the +0.5 itself).
- An object's ``center`` is the centroid (mean x, mean y) of its rendered mask pixels, so it
  lies inside the object for every shape; ``points()`` are these centers.
- ``box = (x0, y0, x1, y1)`` is the tight box of the mask, inclusive-exclusive:
  ``mask[y0:y1, x0:x1]`` holds every mask pixel, and ``x1 - x0`` is the width in pixels.
- Each object is drawn from a precomputed boolean *stamp* per (image_size, shape, size), pasted
  with its top-left corner at ``(box[0], box[1])``; render and masks use the same stamps, so the
  masks match the rendered pixels exactly. Objects never overlap and keep >= 1 background pixel
  between their boxes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fmrt.data.vocab import (COLOR_INDEX, COLOR_RGB, COLORS, COLUMNS, RELATIONS, ROWS, SHAPE_INDEX, SHAPES,
                             SIZE_INDEX, SIZES)

#: Nominal half-extent of an object as a fraction of the image size; large is 2x small.
SIZE_FRACTION = {"small": 0.075, "large": 0.15}
#: Minimum number of background pixels between the boxes of two objects.
OBJECT_GAP = 1
#: Placement tries per object before the object is dropped from the scene.
PLACEMENT_TRIES = 60

_COLOR_ARRAY = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# random numbers


class FastRNG:
    """A buffered view of a :class:`numpy.random.Generator` for scalar draws in Python loops.

    numpy scalar draws cost ~1 us each; this draws 256 uniforms at a time. Deterministic given
    the generator's state. Every public function that takes ``rng`` accepts a ``FastRNG``, a
    ``numpy.random.Generator``, an ``int`` seed, or ``None`` (fresh entropy)."""

    __slots__ = ("gen", "_buf", "_i")

    def __init__(self, gen: np.random.Generator):
        self.gen = gen
        self._buf: List[float] = []
        self._i = 0

    def u(self) -> float:
        i = self._i
        if i >= len(self._buf):
            self._buf = self.gen.random(256).tolist()
            i = 0
        self._i = i + 1
        return self._buf[i]

    def randint(self, n: int) -> int:
        """Uniform integer in ``[0, n)``."""
        k = int(self.u() * n)
        return k if k < n else n - 1

    def choice(self, seq: Sequence):
        return seq[self.randint(len(seq))]

    def shuffle(self, lst: list) -> list:
        for i in range(len(lst) - 1, 0, -1):
            j = self.randint(i + 1)
            lst[i], lst[j] = lst[j], lst[i]
        return lst

    def sample(self, seq: Sequence, k: int) -> list:
        lst = list(seq)
        self.shuffle(lst)
        return lst[:k]


def as_rng(rng) -> FastRNG:
    """Coerce ``rng`` (FastRNG | numpy Generator | int seed | None) to a :class:`FastRNG`."""
    if isinstance(rng, FastRNG):
        return rng
    if isinstance(rng, np.random.Generator):
        return FastRNG(rng)
    if rng is None or isinstance(rng, (int, np.integer, list, tuple)):
        return FastRNG(np.random.default_rng(rng))
    raise TypeError(f"expected a numpy Generator, FastRNG, int seed or None, got {type(rng)!r}")


# --------------------------------------------------------------------------------------------
# stamps


@dataclass(frozen=True)
class Stamp:
    """Boolean footprint of one (shape, size) at one image size, cropped to its tight box."""

    mask: np.ndarray  # bool [h, w]
    ys: np.ndarray  # int64 [n] row offsets of the set pixels
    xs: np.ndarray  # int64 [n] column offsets
    flat: np.ndarray  # int64 [n] ys * image_size + xs
    cx: float  # centroid offsets inside the stamp
    cy: float
    radius: float  # nominal half-extent in pixels

    @property
    def h(self) -> int:
        return self.mask.shape[0]

    @property
    def w(self) -> int:
        return self.mask.shape[1]


def _polygon(px: np.ndarray, py: np.ndarray, verts: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        xint = (x2 - x1) * (py - y1) / (y2 - y1) + x1
        inside ^= crosses & (px < xint)
    return inside


def _shape_footprint(shape: str, r: float) -> np.ndarray:
    """Boolean footprint of ``shape`` with nominal half-extent ``r`` on an odd grid centred at
    its middle pixel (left-right symmetric by construction)."""
    R = int(math.ceil(1.4 * r)) + 1
    d = np.arange(-R, R + 1, dtype=np.float64)
    py, px = np.meshgrid(d, d, indexing="ij")
    if shape == "circle":
        m = px * px + py * py <= r * r
    elif shape == "square":
        a = 0.85 * r
        m = (np.abs(px) <= a) & (np.abs(py) <= a)
    elif shape == "triangle":  # equilateral, apex up, centroid at the grid centre
        c = 1.3 * r
        s3 = math.sqrt(3.0) / 2.0
        verts = [(0.0, -c), (c * s3, 0.5 * c), (-c * s3, 0.5 * c)]
        m = _polygon(-np.abs(px), py, verts)
    elif shape == "star":  # five points, one up
        ro, ri = 1.3 * r, 0.65 * r
        verts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = ro if k % 2 == 0 else ri
            verts.append((rad * math.cos(ang), rad * math.sin(ang)))
        m = _polygon(-np.abs(px), py, verts)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


_STAMPS: Dict[int, Dict[Tuple[str, str], Stamp]] = {}


def stamps(image_size: int) -> Dict[Tuple[str, str], Stamp]:
    """The (shape, size) -> :class:`Stamp` table for ``image_size`` (cached)."""
    tab = _STAMPS.get(image_size)
    if tab is not None:
        return tab
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 (shapes are distinct from ~32 up), got {image_size}")
    tab = {}
    for shape in SHAPES:
        for size in SIZES:
            r = SIZE_FRACTION[size] * image_size
            m = _shape_footprint(shape, r)
            rows = np.flatnonzero(m.any(1))
            cols = np.flatnonzero(m.any(0))
            m = np.ascontiguousarray(m[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1])
            ys, xs = np.nonzero(m)
            ys = ys.astype(np.int64)
            xs = xs.astype(np.int64)
            tab[(shape, size)] = Stamp(m, ys, xs, ys * image_size + xs, float(xs.mean()), float(ys.mean()), r)
    _STAMPS[image_size] = tab
    return tab


# --------------------------------------------------------------------------------------------
# objects and scenes


@dataclass
class ShapeObject:
    """One object. ``center`` is the mask centroid ``(x, y)`` (float pixels), ``radius`` the
    nominal half-extent in pixels, ``box`` the tight inclusive-exclusive box
    ``(x0, y0, x1, y1)`` of the mask. ``image_size`` is the size of the image it lives in."""

    shape: str
    color: str
    size: str
    center: Tuple[float, float]
    radius: float
    box: Tuple[int, int, int, int]
    image_size: int

    @property
    def shape_id(self) -> int:
        return SHAPE_INDEX[self.shape]

    @property
    def color_id(self) -> int:
        return COLOR_INDEX[self.color]

    @property
    def size_id(self) -> int:
        return SIZE_INDEX[self.size]

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def rgb(self) -> Tuple[int, int, int]:
        return COLOR_RGB[self.color]

    def stamp(self) -> Stamp:
        return stamps(self.image_size)[(self.shape, self.size)]

    def mask(self, image_size: Optional[int] = None) -> np.ndarray:
        """Instance mask ``bool [H, W]`` (exactly the pixels :meth:`Scene.render` paints)."""
        S = self.image_size if image_size is None else image_size
        if S != self.image_size:
            raise ValueError(f"object lives in a {self.image_size}px image, not {S}px")
        m = np.zeros((S, S), dtype=bool)
        st = self.stamp()
        x0, y0 = self.box[0], self.box[1]
        m[y0: y0 + st.h, x0: x0 + st.w] = st.mask
        return m

    def place(self) -> Tuple[str, str]:
        """(row, column) third of the image holding the center, e.g. ``("top", "left")``."""
        return place_of(self.center, self.image_size)

    def describe(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.color} {self.shape}"


def place_of(center: Tuple[float, float], image_size: int) -> Tuple[str, str]:
    x, y = center
    col = min(2, max(0, int((x + 0.5) * 3.0 / image_size)))
    row = min(2, max(0, int((y + 0.5) * 3.0 / image_size)))
    return ROWS[row], COLUMNS[col]


def make_object(shape: str, color: str, size: str, x0: int, y0: int, image_size: int) -> ShapeObject:
    """Object with its stamp's top-left corner at pixel ``(x0, y0)``."""
    st = stamps(image_size)[(shape, size)]
    return ShapeObject(shape, color, size, (x0 + st.cx, y0 + st.cy), st.radius,
                       (x0, y0, x0 + st.w, y0 + st.h), image_size)


def relation_holds_objects(a: ShapeObject, rel: str, b: ShapeObject, margin: float = 0.25) -> bool:
    """Spec relation between object centers: ``A to the left of B`` iff
    ``b.x - a.x >= margin * B's width``; right likewise; ``above``/``below`` compare y against
    ``margin * B's height``. ``margin=0`` gives the plain (strict) ordering."""
    ax, ay = a.center
    bx, by = b.center
    if rel == "to the left of":
        d, ext = bx - ax, b.box[2] - b.box[0]
    elif rel == "to the right of":
        d, ext = ax - bx, b.box[2] - b.box[0]
    elif rel == "above":
        d, ext = by - ay, b.box[3] - b.box[1]
    elif rel == "below":
        d, ext = ay - by, b.box[3] - b.box[1]
    else:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
    if margin <= 0:
        return d > 0
    return d >= margin * ext


def relation_clear(a: ShapeObject, rel: str, b: ShapeObject) -> bool:
    """The relation holds with the spec margin measured against the largest extent of either
    object (so it holds under every reasonable reading of "a quarter of B's width")."""
    ext = max(a.box[2] - a.box[0], a.box[3] - a.box[1], b.box[2] - b.box[0], b.box[3] - b.box[1])
    ax, ay = a.center
    bx, by = b.center
    if rel == "to the left of":
        d = bx - ax
    elif rel == "to the right of":
        d = ax - bx
    elif rel == "above":
        d = by - ay
    else:
        d = ay - by
    return d >= 0.25 * ext


@dataclass
class Scene:
    """A ShapesWorld image: size, background RGB and non-overlapping objects."""

    image_size: int
    background: Tuple[int, int, int]
    objects: List[ShapeObject] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.objects)

    def render(self) -> np.ndarray:
        """``uint8 [H, W, 3]``."""
        return render_batch([self])[0]

    def masks(self) -> np.ndarray:
        """Instance masks ``bool [N, H, W]`` in object order, exactly the rendered pixels."""
        S = self.image_size
        out = np.zeros((len(self.objects), S * S), dtype=bool)
        for i, o in enumerate(self.objects):
            out[i, o.box[1] * S + o.box[0] + o.stamp().flat] = True
        return out.reshape(len(self.objects), S, S)

    def label_map(self) -> np.ndarray:
        """``int16 [H, W]``: 0 for background, ``i + 1`` on object ``i``."""
        S = self.image_size
        out = np.zeros(S * S, dtype=np.int16)
        for i, o in enumerate(self.objects):
            out[o.box[1] * S + o.box[0] + o.stamp().flat] = i + 1
        return out.reshape(S, S)

    def points(self) -> np.ndarray:
        """Object centers ``float32 [N, 2]`` as ``(x, y)`` pixels."""
        return np.array([o.center for o in self.objects], dtype=np.float32).reshape(-1, 2)

    def boxes(self) -> np.ndarray:
        """``int64 [N, 4]`` boxes ``(x0, y0, x1, y1)``, inclusive-exclusive."""
        return np.array([o.box for o in self.objects], dtype=np.int64).reshape(-1, 4)

    def relation_holds(self, a_idx: int, rel: str, b_idx: int, margin: float = 0.25) -> bool:
        """Does ``objects[a_idx] rel objects[b_idx]`` hold (spec rule, see
        :func:`relation_holds_objects`)?"""
        return relation_holds_objects(self.objects[a_idx], rel, self.objects[b_idx], margin)

    def count(self, shape: Optional[str] = None, color: Optional[str] = None, size: Optional[str] = None) -> int:
        return sum(1 for o in self.objects
                   if (shape is None or o.shape == shape) and (color is None or o.color == color)
                   and (size is None or o.size == size))

    def ground_truth(self) -> dict:
        """Every ground-truth field as arrays/lists (object order)."""
        objs = self.objects
        return {
            "masks": self.masks(),
            "points": self.points(),
            "boxes": self.boxes(),
            "shapes": [o.shape for o in objs],
            "colors": [o.color for o in objs],
            "sizes": [o.size for o in objs],
            "shape_ids": np.array([o.shape_id for o in objs], dtype=np.int64),
            "color_ids": np.array([o.color_id for o in objs], dtype=np.int64),
            "size_ids": np.array([o.size_id for o in objs], dtype=np.int64),
            "places": [" ".join(o.place()) for o in objs],
            "num_objects": len(objs),
            "background": np.array(self.background, dtype=np.uint8),
        }

    def fits(self, obj: ShapeObject, ignore: Sequence[int] = ()) -> bool:
        """Is ``obj`` inside the image and >= OBJECT_GAP pixels from every other object's box
        (except the objects at indices ``ignore``)?"""
        x0, y0, x1, y1 = obj.box
        S = self.image_size
        if x0 < 0 or y0 < 0 or x1 > S or y1 > S:
            return False
        g = OBJECT_GAP
        for i, o in enumerate(self.objects):
            if i in ignore:
                continue
            bx0, by0, bx1, by1 = o.box
            if x0 < bx1 + g and bx0 < x1 + g and y0 < by1 + g and by0 < y1 + g:
                return False
        return True


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Render scenes of one image size into ``uint8 [B, H, W, 3]`` (vectorised: one fancy-index
    write per (shape, size) stamp for the whole batch)."""
    B = len(scenes)
    if B == 0:
        raise ValueError("render_batch needs at least one scene")
    S = scenes[0].image_size
    tab = stamps(S)
    img = np.empty((B, S * S, 3), dtype=np.uint8)
    bg = np.array([sc.background for sc in scenes], dtype=np.uint8).reshape(B, 3)
    if (bg == bg[:, :1]).all():  # gray backgrounds: one contiguous broadcast (much faster)
        img.reshape(B, S * S * 3)[:] = bg[:, :1]
    else:
        for c in range(3):
            img[:, :, c] = bg[:, c, None]
    groups: Dict[Tuple[str, str], Tuple[list, list]] = {}
    SS = S * S
    for b, sc in enumerate(scenes):
        if sc.image_size != S:
            raise ValueError("render_batch: all scenes must have the same image_size")
        base = b * SS
        for o in sc.objects:
            g = groups.get((o.shape, o.size))
            if g is None:
                g = groups[(o.shape, o.size)] = ([], [])
            g[0].append(base + o.box[1] * S + o.box[0])
            g[1].append(COLOR_INDEX[o.color])
    flat = img.reshape(B * SS, 3)
    for key, (bases, cols) in groups.items():
        idx = np.asarray(bases, dtype=np.int64)[:, None] + tab[key].flat[None, :]
        flat[idx] = _COLOR_ARRAY[np.asarray(cols, dtype=np.int64)][:, None, :]
    return img.reshape(B, S, S, 3)


def place_objects(scene: Scene, specs: Sequence[Tuple[str, str, str]], rng: FastRNG,
                  tries: int = PLACEMENT_TRIES) -> List[int]:
    """Append objects ``(shape, color, size)`` at random non-overlapping positions (rejection
    sampling, ``tries`` per object). Objects that cannot be placed are dropped. Returns the
    indices (into ``specs``) of the placed ones."""
    S = scene.image_size
    tab = stamps(S)
    g = OBJECT_GAP
    placed = []
    boxes = [o.box for o in scene.objects]
    for k, (shape, color, size) in enumerate(specs):
        st = tab[(shape, size)]
        w, h = st.w, st.h
        nx, ny = S - w + 1, S - h + 1
        if nx <= 0 or ny <= 0:
            continue
        for _ in range(tries):
            x0 = min(int(rng.u() * nx), nx - 1)
            y0 = min(int(rng.u() * ny), ny - 1)
            x1, y1 = x0 + w, y0 + h
            ok = True
            for bx0, by0, bx1, by1 in boxes:
                if x0 < bx1 + g and bx0 < x1 + g and y0 < by1 + g and by0 < y1 + g:
                    ok = False
                    break
            if ok:
                scene.objects.append(ShapeObject(shape, color, size, (x0 + st.cx, y0 + st.cy), st.radius,
                                                 (x0, y0, x1, y1), S))
                boxes.append((x0, y0, x1, y1))
                placed.append(k)
                break
    return placed


def object_at(shape: str, color: str, size: str, center: Tuple[float, float], image_size: int) -> ShapeObject:
    """Object whose centroid is as close as the pixel grid allows to ``center``."""
    st = stamps(image_size)[(shape, size)]
    x0 = int(math.floor(center[0] - st.cx + 0.5))
    y0 = int(math.floor(center[1] - st.cy + 0.5))
    return make_object(shape, color, size, x0, y0, image_size)
