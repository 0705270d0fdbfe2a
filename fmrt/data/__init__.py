"""ShapesWorld: the project's deterministic synthetic image-text world
(spec: ``/work/shared/spec/shapes-world.md``).

Quick start::

    from fmrt.data import ShapesWorld, is_true
    world = ShapesWorld(image_size=64, seed=0)
    batch = world.clip_batch(256, rng=0)          # images, captions, hard_negatives, kinds
    scene = world.sample_scene()
    img, masks, points, boxes = scene.render(), scene.masks(), scene.points(), scene.boxes()
    cap = world.caption(scene, kind="relation")   # a Caption: a str carrying its structure
    negs = world.hard_negatives(scene, cap, n=3)
    assert is_true(scene, cap) and not any(is_true(scene, n) for n in negs)
    qa = world.questions(scene)                   # [(question, answer), ...]

Coordinates: ``x`` = column, ``y`` = row, pixel indices; boxes are inclusive-exclusive
``(x0, y0, x1, y1)``; points/centers are mask centroids. See :mod:`fmrt.data.scene`.
"""
from fmrt.data.dataset import DEFAULT_SPLIT_SIZES, SPLITS, TASKS, ShapesWorldDataset, collate, item_rng, split_seed
from fmrt.data.language import (
    CAPTION_KINDS,
    HARD_NEGATIVE_KINDS,
    QUESTION_KINDS,
    Caption,
    CaptionParseError,
    Clause,
    Phrase,
    answer,
    caption,
    caption_conjunction,
    caption_count,
    caption_relation,
    caption_single,
    dense_caption,
    format_points,
    hard_negatives,
    is_true,
    parse_caption,
    parse_point_answer,
    parse_points,
    point_answer,
    question_kind,
    questions,
)
from fmrt.data.scene import (
    OBJECT_GAP,
    SIZE_FRACTION,
    FastRNG,
    Scene,
    ShapeObject,
    Stamp,
    as_rng,
    make_object,
    object_at,
    place_of,
    relation_clear,
    relation_holds_objects,
    render_batch,
    stamps,
)
from fmrt.data.vocab import (
    COLOR_INDEX,
    COLOR_RGB,
    COLORS,
    COLUMNS,
    NUMBER_WORDS,
    OPPOSITE_RELATION,
    RELATIONS,
    ROWS,
    SHAPE_INDEX,
    SHAPES,
    SIZE_INDEX,
    SIZES,
    TEMPLATES,
    apply_template,
    article,
    class_labels,
    class_prompts,
    label_index,
    number_word,
    plural,
    tokenize,
    vocabulary,
    with_article,
)
from fmrt.data.world import (
    ShapesWorld,
    classification_set,
    clip_batch,
    default_world,
    hard_negative_set,
    winoground_pair,
    winoground_set,
)

import types as _types

__all__ = sorted(n for n, v in globals().items() if not n.startswith("_") and not isinstance(v, _types.ModuleType))
