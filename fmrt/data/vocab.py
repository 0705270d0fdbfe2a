"""ShapesWorld vocabulary: attribute values, number words, relations, templates and colours.

Everything here is fixed by ``/work/shared/spec/shapes-world.md`` (the words) or by the project
(the RGB values, the prompt templates). Nothing in this module draws random numbers.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: Tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: Tuple[str, ...] = ("small", "large")
NUMBER_WORDS: Tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
RELATIONS: Tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

#: Opposite of each relation ("A rel B" <=> "B opposite A").
OPPOSITE_RELATION: Dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}

#: Well separated, saturated RGB values (min pairwise L2 distance ~100, far from the light
#: gray/white backgrounds, which are >= 225 in every channel).
COLOR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
}

#: CLIP-style prompt templates; ``{}`` takes a class label such as ``"red circle"``.
#: Fill them with :func:`apply_template`, which fixes the article (``an orange star``).
TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
    "a rendering of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a simple drawing of a {}.",
    "a synthetic image of a {}.",
    "a photo of the {}.",
    "a {}.",
)

#: Dense-caption places: the image is cut into thirds along x and y; a place is (row, column).
ROWS: Tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: Tuple[str, ...] = ("left", "center", "right")

SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
SIZE_INDEX = {s: i for i, s in enumerate(SIZES)}
NUMBER_INDEX = {w: i + 1 for i, w in enumerate(NUMBER_WORDS)}  # "one" -> 1
PLURAL = {s: s + "s" for s in SHAPES}
PLURAL["shape"] = "shapes"
SINGULAR = {v: k for k, v in PLURAL.items()}

_VOWEL_SOUND_EXCEPTIONS_A = {"one", "once", "unit", "unicorn", "user", "useful"}  # vowel letter, "a"


def article(word: str) -> str:
    """``"an"`` before a vowel sound, ``"a"`` otherwise (``article("orange") == "an"``)."""
    w = word.lower()
    if w in _VOWEL_SOUND_EXCEPTIONS_A:
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    """``"orange star"`` -> ``"an orange star"``."""
    return f"{article(phrase.split()[0])} {phrase}"


def plural(noun: str) -> str:
    """``"circle"`` -> ``"circles"``; also ``"shape"`` -> ``"shapes"``."""
    return PLURAL.get(noun, noun + "s")


def number_word(n: int) -> str:
    """1 -> ``"one"`` ... 6 -> ``"six"``."""
    if not 1 <= n <= len(NUMBER_WORDS):
        raise ValueError(f"no number word for {n} (ShapesWorld counts are 1..6)")
    return NUMBER_WORDS[n - 1]


def apply_template(template: str, label: str) -> str:
    """Fill a prompt template, fixing the article: ``("a photo of a {}.", "orange star")`` ->
    ``"a photo of an orange star."``."""
    art = article(label.split()[0])
    if "a {}" in template:
        i = template.index("a {}")
        if i == 0 or template[i - 1] == " ":
            return template[:i] + art + " " + label + template[i + 4:]
    return template.replace("{}", label)


def class_labels(kind: str) -> List[str]:
    """Class names in a fixed order.

    - ``"color_shape"``: 24 labels, colour-major: ``red circle, red square, red triangle,
      red star, green circle, ...`` (index = color_index * 4 + shape_index)
    - ``"shape"``: ``circle, square, triangle, star``
    - ``"color"``: ``red, green, blue, yellow, purple, orange``
    """
    if kind == "color_shape":
        return [f"{c} {s}" for c in COLORS for s in SHAPES]
    if kind == "shape":
        return list(SHAPES)
    if kind == "color":
        return list(COLORS)
    raise ValueError(f"unknown class-label kind {kind!r}; expected color_shape, shape or color")


def class_prompts(kind: str, templates: Sequence[str] = TEMPLATES) -> List[List[str]]:
    """Zero-shot prompts per class: ``[class][template]``. Colour classes are phrased as
    ``"red shape"`` so that every prompt is a grammatical (and :func:`is_true`-parsable) phrase."""
    labels = class_labels(kind)
    if kind == "color":
        labels = [f"{c} shape" for c in labels]
    return [[apply_template(t, lab) for t in templates] for lab in labels]


def label_index(kind: str, shape: str, color: str) -> int:
    """Class index of an object with ``shape``/``color`` under ``kind``."""
    if kind == "color_shape":
        return COLOR_INDEX[color] * len(SHAPES) + SHAPE_INDEX[shape]
    if kind == "shape":
        return SHAPE_INDEX[shape]
    if kind == "color":
        return COLOR_INDEX[color]
    raise ValueError(f"unknown class-label kind {kind!r}")


_TOKEN_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def tokenize(text: str) -> List[str]:
    """Lower-case and split into words, single digits and single punctuation characters.

    ``'<point x="12" y="40"> counting'`` -> ``['<', 'point', 'x', '=', '"', '1', '2', '"', ...]``.
    Every token of every ShapesWorld text is in :func:`vocabulary`.
    """
    return _TOKEN_RE.findall(text.lower())


# Fixed strings whose tokens make up the vocabulary (beyond the attribute words).
_FIXED_TEXTS = (
    "a an the and shape shapes",
    "in the top middle bottom left center right",
    "how many are there ?",
    "what color is",
    "is there",
    "what shape is",
    'point to the <point x="0123456789" y="0"> counting shows a total of .',
    "describe the image",
    "yes no",
    ", .",
)


def vocabulary() -> List[str]:
    """Sorted list of every token (as produced by :func:`tokenize`) that can appear in any
    ShapesWorld caption, hard negative, dense caption, template, question or answer: words,
    the digits ``0``-``9`` (point coordinates and totals) and punctuation
    (``. , ? < > = "``)."""
    words = set(SHAPES) | set(PLURAL.values()) | set(COLORS) | set(SIZES) | set(NUMBER_WORDS)
    words |= set(ROWS) | set(COLUMNS)
    for r in RELATIONS:
        words |= set(tokenize(r))
    for t in TEMPLATES:
        words |= set(tokenize(t.replace("{}", " ")))
    for t in _FIXED_TEXTS:
        words |= set(tokenize(t))
    return sorted(words)
