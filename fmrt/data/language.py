"""ShapesWorld language: caption grammar (build, print, parse, evaluate), caption and
hard-negative generators, dense captions, and the question/answer set.

Caption grammar (``/work/shared/spec/shapes-world.md``; lower case, no trailing period)::

    caption  := clause ( ("," | "and" | ", and") clause )*
    clause   := phrase [ relation phrase ]
    phrase   := det [size] [color] noun [place]          (size/color in either order)
    det      := "a" | "an" | "the" | one..six | digit
    noun     := circle | square | triangle | star | shape   (+ "s" for plurals)
    relation := "to the left of" | "to the right of" | "above" | "below"
                (also accepted: "left of", "right of", "on the left of", "on the right of")
    place    := ("in" | "at" | "on") "the" (row [col] | col)   row: top|middle|bottom,
                col: left|center|right  ("in the center" = middle center)

A caption may also be wrapped in a prompt template (``"a photo of a red circle."``) or start
with ``"there is"``/``"there are"``; :func:`parse_caption` strips those.

Semantics (:func:`is_true`): a phrase matches the objects having every attribute it names
(``shape``, the generic noun, matches any shape). ``a``/``an`` needs >= 1 match, ``the``
exactly 1, a number word exactly that many. A clause without a relation holds when its phrase
does. ``A rel B`` holds when both phrases hold and, for some (every, if B has a number) matching
b, some (every, if A has a number) matching a != b satisfies the relation by the spec rule
(centers differ by >= ``margin`` x B's width, or height for above/below). A caption holds when
every clause does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from fmrt.data.scene import FastRNG, Scene, ShapeObject, as_rng, place_of, relation_clear, relation_holds_objects
from fmrt.data.vocab import (
    COLORS,
    COLUMNS,
    NUMBER_INDEX,
    NUMBER_WORDS,
    OPPOSITE_RELATION,
    RELATIONS,
    ROWS,
    SHAPES,
    SINGULAR,
    SIZES,
    TEMPLATES,
    article,
    plural,
)

CAPTION_KINDS = ("single", "relation", "conjunction", "count")
#: Default mix of caption kinds drawn by :func:`caption` when ``kind`` is None.
CAPTION_KIND_WEIGHTS = {"single": 0.20, "relation": 0.35, "conjunction": 0.25, "count": 0.20}
QUESTION_KINDS = ("count", "count_all", "what_color", "exists", "what_shape", "point", "describe")

_SHAPE_SET = frozenset(SHAPES)
_COLOR_SET = frozenset(COLORS)
_SIZE_SET = frozenset(SIZES)
_PLACE_WORDS = frozenset(ROWS) | frozenset(COLUMNS)


class CaptionParseError(ValueError):
    """The text is not a caption of the ShapesWorld grammar."""


# --------------------------------------------------------------------------------------------
# structure


@dataclass(frozen=True)
class Phrase:
    """An object phrase. ``shape=None`` is the generic noun ``shape``. ``count=None`` is the
    indefinite article (``a``/``an``: at least one); an int is an exact count (number word);
    ``definite`` is ``the`` (exactly one). ``place`` is ``(row, col)``, either may be None."""

    shape: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None
    count: Optional[int] = None
    definite: bool = False
    place: Optional[Tuple[Optional[str], Optional[str]]] = None

    @property
    def text(self) -> str:
        words = []
        if self.size is not None:
            words.append(self.size)
        if self.color is not None:
            words.append(self.color)
        noun = self.shape if self.shape is not None else "shape"
        if self.count is not None:
            det = NUMBER_WORDS[self.count - 1] if 1 <= self.count <= 6 else str(self.count)
            if self.count != 1:
                noun = plural(noun)
        elif self.definite:
            det = "the"
        else:
            det = article(words[0] if words else noun)
        words.append(noun)
        s = det + " " + " ".join(words)
        if self.place is not None:
            s += " " + place_text(self.place)
        return s

    def matches(self, o: ShapeObject) -> bool:
        if self.shape is not None and o.shape != self.shape:
            return False
        if self.color is not None and o.color != self.color:
            return False
        if self.size is not None and o.size != self.size:
            return False
        if self.place is not None:
            row, col = place_of(o.center, o.image_size)
            if (self.place[0] is not None and self.place[0] != row) or (
                    self.place[1] is not None and self.place[1] != col):
                return False
        return True

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Clause:
    """``subject`` alone, or ``subject relation object``."""

    subject: Phrase
    relation: Optional[str] = None
    object: Optional[Phrase] = None

    @property
    def text(self) -> str:
        if self.relation is None:
            return self.subject.text
        return f"{self.subject.text} {self.relation} {self.object.text}"

    @property
    def phrases(self) -> Tuple[Phrase, ...]:
        return (self.subject,) if self.relation is None else (self.subject, self.object)


def _join_clauses(texts: Sequence[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    return ", ".join(texts[:-1]) + " and " + texts[-1]


def _infer_kind(clauses: Sequence[Clause]) -> str:
    if any(p.place is not None for c in clauses for p in c.phrases):
        return "dense"
    if len(clauses) > 1:
        return "conjunction"
    c = clauses[0]
    if c.relation is not None:
        return "relation"
    return "count" if c.subject.count is not None else "single"


class Caption(str):
    """A caption: a ``str`` (its text) that also carries its parsed structure.

    ``clauses`` is a tuple of :class:`Clause`; ``kind`` one of ``single``, ``relation``,
    ``conjunction``, ``count``, ``dense``. Build from text with :func:`parse_caption`."""

    def __new__(cls, clauses: Iterable[Clause], kind: Optional[str] = None):
        clauses = tuple(clauses)
        if not clauses:
            raise ValueError("a caption needs at least one clause")
        self = super().__new__(cls, _join_clauses([c.text for c in clauses]))
        self.clauses = clauses
        self.kind = kind or _infer_kind(clauses)
        return self

    def __getnewargs__(self):
        return (self.clauses, self.kind)

    @property
    def text(self) -> str:
        return str.__str__(self)

    @property
    def phrases(self) -> List[Phrase]:
        return [p for c in self.clauses for p in c.phrases]

    def __repr__(self) -> str:
        return f"Caption({str.__repr__(self)}, kind={self.kind!r})"


def place_text(place: Tuple[Optional[str], Optional[str]]) -> str:
    row, col = place
    if row == "middle" and col == "center":
        return "in the center"
    if row is not None and col is not None:
        return f"in the {row} {col}"
    if row is not None:
        return f"at the {row}" if row != "middle" else "in the middle"
    if col is not None:
        return f"on the {col}" if col != "center" else "in the center"
    raise ValueError("empty place")


# --------------------------------------------------------------------------------------------
# parsing

_CTOK_RE = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
_REL_FORMS = (
    (("to", "the", "left", "of"), "to the left of"),
    (("to", "the", "right", "of"), "to the right of"),
    (("on", "the", "left", "of"), "to the left of"),
    (("on", "the", "right", "of"), "to the right of"),
    (("left", "of"), "to the left of"),
    (("right", "of"), "to the right of"),
    (("above",), "above"),
    (("below",), "below"),
)


def _template_parts() -> List[Tuple[List[str], List[str]]]:
    parts = []
    for t in TEMPLATES:
        pre, suf = t.split("{}")
        pt = _CTOK_RE.findall(pre.lower())
        if pt and pt[-1] in ("a", "an"):
            pt = pt[:-1]  # the article belongs to the filled-in phrase
        st = [s for s in _CTOK_RE.findall(suf.lower()) if s not in (".",)]
        if pt or st:
            parts.append((pt, st))
    # longest first, so "a simple drawing of" wins over shorter prefixes
    parts.sort(key=lambda p: -(len(p[0]) + len(p[1])))
    return parts


_TEMPLATE_PARTS = _template_parts()


def _parse_rel(toks: List[str], pos: int) -> Tuple[Optional[str], int]:
    for form, rel in _REL_FORMS:
        k = len(form)
        if tuple(toks[pos: pos + k]) == form:
            return rel, pos + k
    return None, pos


def _place_from_words(words: List[str]) -> Tuple[Optional[str], Optional[str]]:
    row = col = None
    for w in words:
        if w in ROWS and row is None:
            row = w
        elif w in COLUMNS and col is None:
            col = w
        else:
            raise CaptionParseError(f"bad place {' '.join(words)!r}")
    if words == ["center"]:
        row = "middle"
    return row, col


def _parse_phrase(toks: List[str], pos: int) -> Tuple[Phrase, int]:
    n = len(toks)
    if pos >= n:
        raise CaptionParseError("expected an object phrase, got the end of the caption")
    det = toks[pos]
    count = None
    definite = False
    if det in ("a", "an"):
        pass
    elif det == "the":
        definite = True
    elif det in NUMBER_INDEX:
        count = NUMBER_INDEX[det]
    elif det.isdigit():
        count = int(det)
    else:
        raise CaptionParseError(f"expected a determiner (a/an/the/number), got {det!r}")
    pos += 1
    size = color = None
    while pos < n:
        t = toks[pos]
        if t in _SIZE_SET and size is None:
            size = t
        elif t in _COLOR_SET and color is None:
            color = t
        else:
            break
        pos += 1
    noun = toks[pos] if pos < n else None
    if noun in _SHAPE_SET:
        shape = noun
    elif noun == "shape":
        shape = None
    elif noun in SINGULAR:
        s = SINGULAR[noun]
        shape = None if s == "shape" else s
    else:
        raise CaptionParseError(f"expected a shape noun, got {noun!r}")
    pos += 1
    place = None
    if pos + 1 < n and toks[pos] in ("in", "at", "on") and toks[pos + 1] == "the":
        j = pos + 2
        words = []
        while j < n and toks[j] in _PLACE_WORDS and len(words) < 2:
            words.append(toks[j])
            j += 1
        if words and not (j < n and toks[j] == "of"):
            place = _place_from_words(words)
            pos = j
    return Phrase(shape, color, size, count, definite, place), pos


def _parse_tokens(toks: List[str]) -> Caption:
    if not toks:
        raise CaptionParseError("empty caption")
    clauses = []
    pos = 0
    n = len(toks)
    while True:
        subj, pos = _parse_phrase(toks, pos)
        rel, p2 = _parse_rel(toks, pos)
        if rel is not None:
            obj, pos = _parse_phrase(toks, p2)
            clauses.append(Clause(subj, rel, obj))
        else:
            clauses.append(Clause(subj))
        if pos == n:
            break
        sep = False
        if toks[pos] == ",":
            pos += 1
            sep = True
        if pos < n and toks[pos] == "and":
            pos += 1
            sep = True
        if not sep:
            raise CaptionParseError(f"unexpected {' '.join(toks[pos:])!r}")
    return Caption(clauses)


def parse_caption(text: str) -> Caption:
    """Parse ``text`` (any caption of the spec grammar, optionally inside a prompt template or
    after "there is/are"; case and a trailing period are ignored) into a :class:`Caption`."""
    if isinstance(text, Caption):
        return text
    toks = _CTOK_RE.findall(text.lower())
    while toks and toks[-1] in (".", "!"):
        toks.pop()
    try:
        return _parse_tokens(toks)
    except CaptionParseError as e:
        err = e
    candidates = []
    if toks[:2] in (["there", "is"], ["there", "are"]):
        candidates.append(toks[2:])
    for pre, suf in _TEMPLATE_PARTS:
        if toks[: len(pre)] == pre and (not suf or toks[len(toks) - len(suf):] == suf):
            inner = toks[len(pre): len(toks) - len(suf)]
            if inner:
                candidates.append(inner)
    for c in candidates:
        try:
            return _parse_tokens(c)
        except CaptionParseError:
            pass
    raise CaptionParseError(f"{text!r}: {err}")


# --------------------------------------------------------------------------------------------
# evaluation


def _matching(objs: Sequence[ShapeObject], p: Phrase) -> List[int]:
    return [i for i, o in enumerate(objs) if p.matches(o)]


def _phrase_holds(m: List[int], p: Phrase) -> bool:
    if p.count is not None:
        return len(m) == p.count
    if p.definite:
        return len(m) == 1
    return len(m) >= 1


def _clause_holds(objs: Sequence[ShapeObject], c: Clause, margin: float) -> bool:
    a = _matching(objs, c.subject)
    if not _phrase_holds(a, c.subject):
        return False
    if c.relation is None:
        return True
    b = _matching(objs, c.object)
    if not _phrase_holds(b, c.object):
        return False
    all_a = c.subject.count is not None
    all_b = c.object.count is not None
    rel = c.relation

    def ok(j: int) -> bool:
        vals = [relation_holds_objects(objs[i], rel, objs[j], margin) for i in a if i != j]
        if not vals:
            return False
        return all(vals) if all_a else any(vals)

    return all(ok(j) for j in b) if all_b else any(ok(j) for j in b)


def is_true(scene: Scene, caption: Union[str, Caption], margin: float = 0.25) -> bool:
    """Is ``caption`` (text or :class:`Caption`) true of ``scene``? ``margin`` is the spec's
    relation margin (a quarter of B's width); ``margin=0`` judges relations by plain center
    order. Raises :class:`CaptionParseError` for text outside the grammar."""
    cap = caption if isinstance(caption, Caption) else parse_caption(caption)
    objs = scene.objects
    for c in cap.clauses:
        if not _clause_holds(objs, c, margin):
            return False
    return True


# --------------------------------------------------------------------------------------------
# caption generators (each returns only true captions; None where the kind is impossible)


def _count_phrase(objs, **attrs) -> int:
    p = Phrase(**attrs)
    return sum(1 for o in objs if p.matches(o))


def _unique_phrase(objs: Sequence[ShapeObject], i: int, R: FastRNG) -> Optional[Phrase]:
    """A random indefinite phrase that matches ``objs[i]`` and no other object."""
    o = objs[i]
    order = [("color", "shape"), ("size", "color", "shape")]
    u = R.u()
    if u < 0.2:
        order.insert(0, ("shape",))
    elif u < 0.35:
        order.insert(0, ("size", "shape"))
    for attrs in order:
        p = Phrase(shape=o.shape, color=o.color if "color" in attrs else None,
                   size=o.size if "size" in attrs else None)
        if sum(1 for q in objs if p.matches(q)) == 1:
            return p
    return None


def caption_single(scene: Scene, R: FastRNG) -> Optional[Caption]:
    """``a [size] [color] shape`` naming one object of the scene."""
    if not scene.objects:
        return None
    o = R.choice(scene.objects)
    color = o.color if R.u() < 0.9 else None
    size = o.size if R.u() < 0.5 else None
    return Caption((Clause(Phrase(o.shape, color, size)),), "single")


def caption_count(scene: Scene, R: FastRNG) -> Optional[Caption]:
    """``[number] [size] [color] shapes`` with the exact count."""
    objs = scene.objects
    if not objs:
        return None
    o = R.choice(objs)
    u = R.u()
    if u < 0.6:
        p = Phrase(o.shape, o.color)
    elif u < 0.75:
        p = Phrase(o.shape)
    elif u < 0.9:
        p = Phrase(o.shape, o.color, o.size)
    else:
        p = Phrase(None, o.color)
    n = sum(1 for q in objs if p.matches(q))
    return Caption((Clause(replace(p, count=n)),), "count")


def caption_relation(scene: Scene, R: FastRNG) -> Optional[Caption]:
    """``A rel B`` where A and B each name exactly one object and the relation holds clearly
    (center difference >= a quarter of the larger extent of either object)."""
    objs = scene.objects
    N = len(objs)
    if N < 2:
        return None
    pairs = [(i, j) for i in range(N) for j in range(N) if i != j]
    R.shuffle(pairs)
    for i, j in pairs:
        a, b = objs[i], objs[j]
        rels = [r for r in RELATIONS if relation_clear(a, r, b)]
        if not rels:
            continue
        pa = _unique_phrase(objs, i, R)
        if pa is None:
            continue
        pb = _unique_phrase(objs, j, R)
        if pb is None:
            continue
        return Caption((Clause(pa, R.choice(rels), pb),), "relation")
    return None


def caption_conjunction(scene: Scene, R: FastRNG) -> Optional[Caption]:
    """``a red circle and a blue square`` (two, sometimes three, distinct objects)."""
    objs = scene.objects
    N = len(objs)
    if N < 2:
        return None
    k = 3 if N >= 3 and R.u() < 0.2 else 2
    for _ in range(4):
        idx = R.sample(range(N), k)
        use_size = R.u() < 0.3
        phrases = [Phrase(objs[i].shape, objs[i].color, objs[i].size if use_size else None) for i in idx]
        texts = {p.text for p in phrases}
        if len(texts) == k:
            return Caption(tuple(Clause(p) for p in phrases), "conjunction")
    return None


_GENERATORS = {
    "single": caption_single,
    "relation": caption_relation,
    "conjunction": caption_conjunction,
    "count": caption_count,
}
_FALLBACK = {
    "relation": ("relation", "conjunction", "single"),
    "conjunction": ("conjunction", "single"),
    "single": ("single",),
    "count": ("count",),
}


def caption(scene: Scene, rng=None, kind: Optional[str] = None) -> Caption:
    """A random true caption of ``scene``. ``kind`` in ``single``, ``relation``,
    ``conjunction``, ``count`` (ValueError where the scene cannot have one, e.g. a relation in a
    one-object scene); ``None`` draws a kind (``CAPTION_KIND_WEIGHTS``) and falls back
    relation -> conjunction -> single where needed."""
    R = as_rng(rng)
    if kind is not None:
        if kind == "dense":
            return dense_caption(scene)
        gen = _GENERATORS.get(kind)
        if gen is None:
            raise ValueError(f"unknown caption kind {kind!r}; expected one of {CAPTION_KINDS}")
        c = gen(scene, R)
        if c is None:
            raise ValueError(f"scene with {len(scene.objects)} objects has no true {kind} caption")
        return c
    u = R.u()
    acc = 0.0
    chosen = "single"
    for k, w in CAPTION_KIND_WEIGHTS.items():
        acc += w
        if u < acc:
            chosen = k
            break
    for k in _FALLBACK[chosen]:
        c = _GENERATORS[k](scene, R)
        if c is not None:
            return c
    raise ValueError("empty scene has no caption")


def dense_caption(scene: Scene) -> Caption:
    """Names every object with its size, color and place, in reading order:
    ``a large red circle in the top left, a small blue square in the center and ...``."""
    objs = scene.objects
    if not objs:
        raise ValueError("empty scene")
    keyed = []
    for o in objs:
        row, col = o.place()
        keyed.append(((ROWS.index(row), COLUMNS.index(col), o.center[1], o.center[0]), o, (row, col)))
    keyed.sort(key=lambda t: t[0])
    return Caption(tuple(Clause(Phrase(o.shape, o.color, o.size, place=pl)) for _, o, pl in keyed), "dense")


# --------------------------------------------------------------------------------------------
# hard negatives


def _replace_phrase(cap: Caption, edits: dict) -> Caption:
    """``edits``: {(clause_idx, role): Phrase} with role 0 = subject, 1 = object."""
    out = []
    for ci, c in enumerate(cap.clauses):
        s = edits.get((ci, 0), c.subject)
        o = edits.get((ci, 1), c.object)
        out.append(Clause(s, c.relation, o))
    return Caption(out, cap.kind)


def _phrase_slots(cap: Caption) -> List[Tuple[Tuple[int, int], Phrase]]:
    slots = []
    for ci, c in enumerate(cap.clauses):
        slots.append(((ci, 0), c.subject))
        if c.relation is not None:
            slots.append(((ci, 1), c.object))
    return slots


# Candidates are cheap tuples ``(builder, *args)``; ``builder(cap, *args)`` makes the Caption.


def _build_swap(cap, kx, px, ky, py, attr):
    vx, vy = getattr(px, attr), getattr(py, attr)
    return _replace_phrase(cap, {kx: replace(px, **{attr: vy}), ky: replace(py, **{attr: vx})})


def _build_set(cap, key, p, attr, value):
    return _replace_phrase(cap, {key: replace(p, **{attr: value})})


def _build_clause(cap, ci, clause):
    cl = list(cap.clauses)
    cl[ci] = clause
    return Caption(cl, cap.kind)


def _neg_swap_attributes(cap: Caption):
    slots = _phrase_slots(cap)
    out = []
    for x in range(len(slots)):
        for y in range(x + 1, len(slots)):
            (kx, px), (ky, py) = slots[x], slots[y]
            for attr in ("color", "size", "shape"):
                vx, vy = getattr(px, attr), getattr(py, attr)
                if vx is not None and vy is not None and vx != vy:
                    out.append((_build_swap, kx, px, ky, py, attr))
    return out


def _neg_swap_relation_order(cap: Caption):
    return [(_build_clause, ci, Clause(c.object, c.relation, c.subject))
            for ci, c in enumerate(cap.clauses) if c.relation is not None]


def _neg_replace_relation(cap: Caption):
    return [(_build_clause, ci, Clause(c.subject, r, c.object))
            for ci, c in enumerate(cap.clauses) if c.relation is not None
            for r in RELATIONS if r != c.relation]


def _neg_replace_attribute(cap: Caption):
    out = []
    for key, p in _phrase_slots(cap):
        for attr, values in (("color", COLORS), ("size", SIZES), ("shape", SHAPES)):
            v = getattr(p, attr)
            if v is not None:
                out.extend((_build_set, key, p, attr, w) for w in values if w != v)
    return out


def _neg_replace_count(cap: Caption):
    out = []
    for key, p in _phrase_slots(cap):
        if p.count is not None:
            out.extend((_build_set, key, p, "count", k) for k in range(1, len(NUMBER_WORDS) + 1) if k != p.count)
    return out


#: Hard-negative kinds: name -> candidate enumerator.
HARD_NEGATIVE_KINDS = {
    "swap_attributes": _neg_swap_attributes,
    "swap_relation_order": _neg_swap_relation_order,
    "replace_relation": _neg_replace_relation,
    "replace_attribute": _neg_replace_attribute,
    "replace_count": _neg_replace_count,
}


def hard_negatives(scene: Scene, caption: Union[str, Caption], rng=None, n: int = 1,
                   kinds: Optional[Sequence[str]] = None) -> List[Caption]:
    """Up to ``n`` distinct hard negatives of ``caption`` for ``scene``: attribute swaps between
    phrases, relation-order swaps, and replacement of one attribute, shape, relation or count
    (``kinds`` restricts to some of :data:`HARD_NEGATIVE_KINDS`). Each is verified false of the
    scene even with the relation margin at zero (so false under any reading of the relation
    rule). Kinds are taken round-robin in random order, candidates at random within a kind;
    fewer than ``n`` are returned when no more exist."""
    cap = caption if isinstance(caption, Caption) else parse_caption(caption)
    R = as_rng(rng)
    names = kinds if kinds is not None else HARD_NEGATIVE_KINDS
    pools = []
    for name in names:
        cands = HARD_NEGATIVE_KINDS[name](cap)
        if cands:
            pools.append(cands)
    if len(pools) > 1:
        R.shuffle(pools)
    seen = {cap.text}
    out: List[Caption] = []
    objs = scene.objects
    while pools and len(out) < n:
        for pool in list(pools):
            found = False
            while pool:  # draw without replacement
                j = R.randint(len(pool))
                pool[j], pool[-1] = pool[-1], pool[j]
                item = pool.pop()
                c = item[0](cap, *item[1:])
                if c.text in seen:
                    continue
                seen.add(c.text)
                if not all(_clause_holds(objs, cl, 0.0) for cl in c.clauses):
                    out.append(c)
                    found = True
                    break
            if not found:
                pools.remove(pool)
            if len(out) >= n:
                break
    return out


# --------------------------------------------------------------------------------------------
# questions and answers


def format_points(points: Sequence[Tuple[float, float]]) -> str:
    """Molmo-style ``<point x="12" y="40">`` tags (rounded to int pixels), space separated."""
    return " ".join(f'<point x="{int(np.floor(x + 0.5))}" y="{int(np.floor(y + 0.5))}">' for x, y in points)


_POINT_RE = re.compile(r'<point\s+x\s*=\s*"(-?[0-9.]+)"\s+y\s*=\s*"(-?[0-9.]+)"\s*/?>')
_TOTAL_RE = re.compile(r"shows a total of (\d+|[a-z]+)")


def parse_points(text: str) -> np.ndarray:
    """All ``<point x=".." y="..">`` tags in ``text`` as ``float32 [K, 2]`` (x, y)."""
    pts = [(float(a), float(b)) for a, b in _POINT_RE.findall(text)]
    return np.array(pts, dtype=np.float32).reshape(-1, 2)


def parse_point_answer(text: str) -> Tuple[np.ndarray, Optional[int]]:
    """``(points [K, 2], total or None)`` from a pointing answer."""
    m = _TOTAL_RE.search(text.lower())
    total = None
    if m:
        t = m.group(1)
        total = int(t) if t.isdigit() else NUMBER_INDEX.get(t)
    return parse_points(text), total


def _noun_phrase(shape: Optional[str], color: Optional[str], size: Optional[str], plural_: bool) -> str:
    noun = shape or "shape"
    if plural_:
        noun = plural(noun)
    return " ".join(w for w in (size, color, noun) if w)


def point_answer(scene: Scene, shape: Optional[str], color: Optional[str] = None, size: Optional[str] = None) -> str:
    """Answer to ``point to the [size] [color] [shape]s``: one point per matching object (reading
    order), then ``counting the ... shows a total of n.``"""
    p = Phrase(shape, color, size)
    pts = [o.center for o in scene.objects if p.matches(o)]
    pts.sort(key=lambda c: (int(np.floor(c[1] + 0.5)), int(np.floor(c[0] + 0.5))))
    tail = f"counting the {_noun_phrase(shape, color, size, True)} shows a total of {len(pts)}."
    return (format_points(pts) + " " + tail) if pts else tail


_A = r"(?:(small|large) )?(?:(red|green|blue|yellow|purple|orange) )?"
_SH = r"(circle|square|triangle|star|shape)"
_REL = r"(to the left of|to the right of|left of|right of|above|below)"
_Q_PATTERNS = (
    ("count_all", re.compile(r"how many shapes are there\??")),
    ("count", re.compile(rf"how many {_A}{_SH}s are there\??")),
    ("what_color", re.compile(r"what colou?r is the (?:(small|large) )?" + _SH + r"\??")),
    ("exists", re.compile(rf"is there an? {_A}{_SH}\??")),
    ("what_shape", re.compile(rf"what shape is {_REL} the {_A}{_SH}\??")),
    ("point", re.compile(rf"point to (?:all )?the {_A}{_SH}s\.?")),
    ("describe", re.compile(r"describe the image\.?")),
)


def question_kind(question: str) -> str:
    q = " ".join(question.lower().split())
    for kind, pat in _Q_PATTERNS:
        if pat.fullmatch(q):
            return kind
    raise ValueError(f"not a ShapesWorld question: {question!r}")


def _norm_shape(s: Optional[str]) -> Optional[str]:
    return None if s in (None, "shape") else s


def _rel_candidates(objs, ref: int, rel: str, margin: float) -> List[int]:
    return [i for i in range(len(objs)) if i != ref and relation_holds_objects(objs[i], rel, objs[ref], margin)]


def answer(scene: Scene, question: str) -> str:
    """The ground-truth answer to any spec question (see module docs / :data:`QUESTION_KINDS`).
    Raises ValueError for a question outside the grammar, or one without a unique answer
    (``what color is the circle?`` with two circles)."""
    q = " ".join(question.lower().split())
    objs = scene.objects
    for kind, pat in _Q_PATTERNS:
        m = pat.fullmatch(q)
        if not m:
            continue
        if kind == "count_all":
            return NUMBER_WORDS[len(objs) - 1]
        if kind == "count":
            n = _count_phrase(objs, shape=_norm_shape(m.group(3)), color=m.group(2), size=m.group(1))
            if not 1 <= n <= len(NUMBER_WORDS):
                raise ValueError(f"{question!r}: count {n} has no number word")
            return NUMBER_WORDS[n - 1]
        if kind == "what_color":
            p = Phrase(_norm_shape(m.group(2)), None, m.group(1))
            ms = [o for o in objs if p.matches(o)]
            if len(ms) != 1:
                raise ValueError(f"{question!r}: {len(ms)} matching objects, need exactly one")
            return ms[0].color
        if kind == "exists":
            n = _count_phrase(objs, shape=_norm_shape(m.group(3)), color=m.group(2), size=m.group(1))
            return "yes" if n > 0 else "no"
        if kind == "what_shape":
            rel = m.group(1)
            rel = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
            p = Phrase(_norm_shape(m.group(4)), m.group(3), m.group(2))
            refs = [i for i, o in enumerate(objs) if p.matches(o)]
            if len(refs) != 1:
                raise ValueError(f"{question!r}: {len(refs)} reference objects, need exactly one")
            cands = _rel_candidates(objs, refs[0], rel, 0.25)
            shapes = {objs[i].shape for i in cands}
            if len(shapes) != 1:
                raise ValueError(f"{question!r}: {len(shapes)} candidate shapes, need exactly one")
            return shapes.pop()
        if kind == "point":
            return point_answer(scene, _norm_shape(m.group(3)), m.group(2), m.group(1))
        if kind == "describe":
            return dense_caption(scene).text
    raise ValueError(f"not a ShapesWorld question: {question!r}")


def questions(scene: Scene, rng=None) -> List[Tuple[str, str]]:
    """One (question, answer) per question kind the scene supports, in the order of
    :data:`QUESTION_KINDS`: ``how many [color] [shape]s are there?``, ``how many shapes are
    there?``, ``what color is the [shape]?`` (only for a shape present exactly once), ``is there
    a [color] [shape]?`` (yes/no, balanced), ``what shape is [relation] the [color] [shape]?``
    (only where unambiguous: a unique reference, every candidate clearly in relation and of one
    shape), ``point to the [color] [shape]s`` (a combination that is present 85% of the time;
    otherwise absent, total 0) and ``describe the image``."""
    R = as_rng(rng)
    objs = scene.objects
    if not objs:
        raise ValueError("empty scene")
    out = []
    o = R.choice(objs)
    out.append(f"how many {o.color} {plural(o.shape)} are there?")
    out.append("how many shapes are there?")
    singles = [s for s in SHAPES if sum(1 for q in objs if q.shape == s) == 1]
    if singles:
        out.append(f"what color is the {R.choice(singles)}?")
    present = {(q.color, q.shape) for q in objs}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if R.u() < 0.5 or not absent:
        o2 = R.choice(objs)
        c, s = o2.color, o2.shape
    else:
        c, s = R.choice(absent)
    out.append(f"is there {article(c)} {c} {s}?")
    q = _what_shape_question(scene, R)
    if q is not None:
        out.append(q)
    if R.u() < 0.85 or not absent:
        o2 = R.choice(objs)
        c, s = o2.color, o2.shape
    else:
        c, s = R.choice(absent)
    out.append(f"point to the {c} {plural(s)}")
    out.append("describe the image")
    return [(q, answer(scene, q)) for q in out]


def _what_shape_question(scene: Scene, R: FastRNG) -> Optional[str]:
    objs = scene.objects
    refs = [i for i, o in enumerate(objs) if sum(1 for q in objs if q.color == o.color and q.shape == o.shape) == 1]
    if not refs:
        return None
    R.shuffle(refs)
    rels = list(RELATIONS)
    R.shuffle(rels)
    if R.u() < 0.5:  # the spec's own form, "to the left of", half the time when possible
        rels.remove("to the left of")
        rels.insert(0, "to the left of")
    for rel in rels:
        for ref in refs:
            loose = _rel_candidates(objs, ref, rel, 0.0)
            if not loose:
                continue
            clear = [i for i in loose if relation_clear(objs[i], rel, objs[ref])]
            if len(clear) != len(loose) or len({objs[i].shape for i in loose}) != 1:
                continue
            r = objs[ref]
            return f"what shape is {rel} the {r.color} {r.shape}?"
    return None
