"""ShapesWorld instruction data for the vision-language models (LLaVA).

Vocabulary: the ShapesWorld ``WordTokenizer`` (``<pad> <sot> <eot> <unk>``, digits ``0``-``9``,
every ShapesWorld word and punctuation mark: ids 0-85) plus two added special tokens:
``<image>`` (86, the image placeholder, expanded by the model into one token per patch) and
``<sep>`` (87, ends the user turn). Points are plain text, ``<point x="12" y="40">`` tokenises as
``< point x = " 1 2 " y = " 4 0 " >`` (digits one by one), so any pixel coordinate needs only the
ten digit tokens, and ``fmrt.data.parse_point_answer`` reads a generated answer back. With
coordinate tokens (``build_vlm_tokenizer(coord_tokens=64)``, the bundled ``shapes-llava``) each
value is one token instead, ``x = " <loc12> "`` (``encode_text``), and decodes to the same text.

Prompt format (one user turn, then the answer)::

    <sot> <image> {question} <sep> {answer} <eot>

The question is empty for stage-1 captions (``<sot> <image> <sep> a red circle ...``). The loss
covers the answer tokens and ``<eot>`` only (``labels`` is ``IGNORE`` elsewhere).

Coordinates: the model sees images at ``model_size`` (64) and answers in that frame; for an
original image of another size ``rescale_points`` maps the parsed points back (pixel centres:
``x' = (x + 0.5) * W / 64 - 0.5``), and ``rescale_point_text`` rewrites the tags.

Tasks (``stage``):
  * 1: captions (``fmrt.data.caption``, every caption kind) - projector alignment.
  * 2: a mix of questions (counting, colour, existence, relation), pointing and dense
    descriptions, plus some captions (``STAGE2_MIX``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_TOKEN = "<image>"
SEP_TOKEN = "<sep>"
VLM_SPECIALS = (IMAGE_TOKEN, SEP_TOKEN)
IGNORE = -100

#: Sampling weights of the stage-2 tasks (question kinds of ``fmrt.data.questions`` plus
#: ``caption``). Counting and pointing carry the hardest targets and the longest answers.
STAGE2_MIX: Dict[str, float] = {
    "count": 0.20, "count_all": 0.10, "what_color": 0.08, "exists": 0.08, "what_shape": 0.12,
    "point": 0.27, "describe": 0.10, "caption": 0.05,
}
#: Question kinds scored by QA exact match (short answers); counting = ``count`` + ``count_all``.
QA_KINDS = ("count", "count_all", "what_color", "exists", "what_shape")
COUNT_KINDS = ("count", "count_all")


def coord_token(v: int) -> str:
    """The coordinate token of pixel value ``v`` (``<loc12>``)."""
    return f"<loc{int(v)}>"


def build_vlm_tokenizer(context_length: int = 256, coord_tokens: int = 0):
    """The ShapesWorld word tokenizer plus ``<image>`` (id 86) and ``<sep>`` (id 87), and with
    ``coord_tokens = N > 0`` the coordinate tokens ``<loc0>`` .. ``<loc{N-1}>`` (ids 88 ..):
    a point's pixel value is then one token (``x="<loc12>"``; decoded back to ``x="12"``), so
    a coordinate is one N-way read-out instead of two dependent digit choices (Kosmos-2's
    location tokens, PaliGemma's ``<locNNNN>``). N = the model's input size (64) covers every
    pixel of its frame."""
    from fmrt.data.vocab import vocabulary
    from fmrt.models.tokenizer import WordTokenizer

    tok = WordTokenizer.build(vocabulary(), context_length=context_length)
    tok._tk.add_special_tokens(list(VLM_SPECIALS) + [coord_token(v)
                                                     for v in range(int(coord_tokens))])
    return tok


def coord_token_ids(tok) -> List[int]:
    """Ids of ``<loc0>``, ``<loc1>``, ... in ``tok`` (empty: digits are spelled out)."""
    cached = getattr(tok, "_fmrt_coord_ids", None)
    if cached is None:
        cached = []
        while (i := tok.token_to_id(coord_token(len(cached)))) is not None:
            cached.append(i)
        tok._fmrt_coord_ids = cached
    return cached


_COORD_ATTR = re.compile(r'\b([xy])\s*=\s*"(-?[0-9]+(?:\.[0-9]*)?)"')


def encode_text(tok, text: str) -> List[int]:
    """Token ids of ``text`` (no ``<sot>``/``<eot>``). With coordinate tokens, the values of
    ``x="..."`` / ``y="..."`` attributes become one ``<locN>`` token each (rounded, clamped
    to ``0 .. N-1``: points are written in the model's input frame)."""
    n = len(coord_token_ids(tok))
    if n:
        def sub(m):
            v = min(max(int(np.floor(float(m.group(2)) + 0.5)), 0), n - 1)
            return f'{m.group(1)}="{coord_token(v)}"'
        text = _COORD_ATTR.sub(sub, text)
    return tok._tk.encode(text, add_special_tokens=False).ids


def special_ids(tok) -> Tuple[int, int]:
    """(image_token_id, sep_token_id) of a VLM tokenizer."""
    img, sep = tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(SEP_TOKEN)
    if img is None or sep is None:
        raise ValueError("tokenizer lacks the <image>/<sep> tokens (use build_vlm_tokenizer)")
    return img, sep


def prompt_ids(tok, question: str, image_seq_length: int, images: int = 1) -> List[int]:
    """``<sot> <image>*image_seq_length {question} <sep>``: an expanded prompt (``images``
    placeholders runs, all before the question)."""
    img, sep = special_ids(tok)
    return ([tok.sot_token_id] + [img] * (image_seq_length * images) + encode_text(tok, question)
            + [sep])


def encode_example(tok, question: str, answer: str, image_seq_length: int
                   ) -> Tuple[List[int], List[int]]:
    """(input ids, labels): the prompt, the answer and ``<eot>``; labels are ``IGNORE`` on the
    prompt (the loss covers the answer only)."""
    p = prompt_ids(tok, question, image_seq_length)
    a = encode_text(tok, answer) + [tok.eot_token_id]
    return p + a, [IGNORE] * len(p) + a


def decode_answer(tok, ids: Sequence[int]) -> str:
    return tok.decode([i for i in ids if i not in special_ids(tok)])


# ----------------------------------------------------------------------------- coordinates
def rescale_points(points: np.ndarray, from_size: Tuple[int, int], to_size: Tuple[int, int]
                   ) -> np.ndarray:
    """Map ``K x 2`` (x, y) pixel coordinates between image sizes ``(W, H)`` (pixel centres
    stay centres: ``x' = (x + 0.5) * W' / W - 0.5``)."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return np.stack([(pts[:, 0] + 0.5) * sx - 0.5, (pts[:, 1] + 0.5) * sy - 0.5], axis=1
                    ) if len(pts) else pts


_TAG = re.compile(r'<point\s+x\s*=\s*"(-?[0-9.]+)"\s+y\s*=\s*"(-?[0-9.]+)"\s*/?>')


def rescale_point_text(text: str, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> str:
    """Rewrite every ``<point x=".." y="..">`` tag of ``text`` into ``to_size`` pixels."""
    def sub(m):
        (x, y), = rescale_points(np.array([[float(m.group(1)), float(m.group(2))]]),
                                 from_size, to_size)
        return f'<point x="{int(np.floor(x + 0.5))}" y="{int(np.floor(y + 0.5))}">'

    return _TAG.sub(sub, text)


# ----------------------------------------------------------------------------- training data
LONG_KINDS = ("point", "describe")


def _pick_tasks(R, scene, stage: int, mix: Dict[str, float], turns: int
                ) -> List[Tuple[str, str, str]]:
    """Up to ``turns`` distinct (kind, question, answer) for one scene, drawn by ``mix`` weight
    without replacement; at most one long answer (pointing / description) per scene, which keeps
    padded batches short."""
    from fmrt.data import language as L

    if stage == 1:
        return [("caption", "", str(L.caption(scene, R))) for _ in range(turns)]
    qa = {L.question_kind(q): (q, a) for q, a in L.questions(scene, R)}
    kinds = [k for k in mix if k == "caption" or k in qa]
    out: List[Tuple[str, str, str]] = []
    while kinds and len(out) < turns:
        w = np.array([mix[k] for k in kinds], dtype=np.float64)
        j = min(int(np.searchsorted(np.cumsum(w), R.u() * w.sum(), side="right")), len(kinds) - 1)
        k = kinds.pop(j)
        out.append(("caption", "", str(L.caption(scene, R))) if k == "caption" else (k,) + qa[k])
        if k in LONG_KINDS:
            kinds = [x for x in kinds if x not in LONG_KINDS]
    return out


def encode_conversation(tok, turns: Sequence[Tuple[str, str]], image_seq_length: int
                        ) -> Tuple[List[int], List[int]]:
    """Several (question, answer) turns about one image in one sequence: the first turn is
    exactly ``encode_example``'s (the inference format), later ones follow as
    ``{question} <sep> {answer} <eot>``. Labels cover every answer and its ``<eot>``. (The
    same tokens as ``encode_independent_turns``, read as one causal sequence.)"""
    return encode_independent_turns(tok, turns, image_seq_length)[:2]


def encode_independent_turns(tok, turns: Sequence[Tuple[str, str]], image_seq_length: int
                             ) -> Tuple[List[int], List[int], List[int], List[int]]:
    """Several (question, answer) turns about one image packed as independent continuations
    of one shared ``<sot> <image>*`` prefix: (ids, labels, segment ids, position ids) for
    ``LlamaForCausalLM.forward(segment_ids=, position_ids=)``. Each turn is
    ``{question} <sep> {answer} <eot>`` with positions restarting where the prefix ends and
    attention to the prefix and itself only, so every turn is trained exactly in the
    single-question inference format of ``prompt_ids``.

    Why: in a plain multi-turn sequence (``encode_conversation``) a short question often
    follows a description, a caption or a pointing answer that already names the objects
    (with the description-heavy stage-2 mix, 58-74% of the count / colour / existence / shape
    questions did), so much of their loss can be paid from the text instead of the image,
    while evaluation asks each question alone."""
    ids, labels = encode_example(tok, turns[0][0], turns[0][1], image_seq_length)
    prefix = 1 + image_seq_length
    segs = [0] * prefix + [1] * (len(ids) - prefix)
    pos = list(range(len(ids)))
    _, sep = special_ids(tok)
    for j, (q, a) in enumerate(turns[1:], start=2):
        p = encode_text(tok, q) + [sep]
        ans = encode_text(tok, a) + [tok.eot_token_id]
        ids += p + ans
        labels += [IGNORE] * len(p) + ans
        segs += [j] * (len(p) + len(ans))
        pos += range(prefix, prefix + len(p) + len(ans))
    return ids, labels, segs, pos


def patch_labels(scenes, grid: int) -> np.ndarray:
    """``int64 [B, grid*grid]`` (row-major patches): ``1 + shape * len(COLORS) + colour`` of the
    object covering most of each patch (at least an eighth of its pixels), 0 for background.
    Targets of the optional dense auxiliary loss of LLaVA training (``dense_aux_weight``)."""
    from fmrt.data.vocab import COLOR_INDEX, COLORS, SHAPE_INDEX

    out = np.zeros((len(scenes), grid * grid), dtype=np.int64)
    for b, sc in enumerate(scenes):
        S = sc.image_size
        p = S // grid
        lm = sc.label_map()[:grid * p, :grid * p].astype(np.int64)
        blocks = lm.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
        n = len(sc.objects)
        counts = np.zeros((grid * grid, n + 1), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(grid * grid), p * p), blocks.reshape(-1)), 1)
        counts[:, 0] = 0
        j = counts.argmax(1)
        cls = np.array([0] + [1 + SHAPE_INDEX[o.shape] * len(COLORS) + COLOR_INDEX[o.color]
                              for o in sc.objects], dtype=np.int64)
        out[b] = np.where(counts[np.arange(grid * grid), j] * 8 >= p * p, cls[j], 0)
    return out


class InstructionStream:
    """Training batches, deterministic in ``(seed, step)``: ``{"images": uint8 B x S x S x 3,
    "input_ids": long B x n, "labels": long B x n (IGNORE outside answers), "kinds": [B][turns]}``,
    right-padded with ``<pad>`` to the longest row. ``turns`` question-answer turns per image
    share one sequence (``encode_conversation``): the 64 image tokens are paid once for several
    answers."""

    def __init__(self, tok, *, stage: int, batch_size: int, image_size: int = 64,
                 image_seq_length: int = 64, seed: int = 0,
                 mix: Optional[Dict[str, float]] = None, turns: int = 1,
                 patch_grid: int = 0, independent_turns: bool = False) -> None:
        from fmrt.data import ShapesWorld, split_seed

        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.tok, self.stage, self.batch_size = tok, stage, batch_size
        self.image_seq_length = image_seq_length
        self.world = ShapesWorld(image_size=image_size, seed=split_seed("train"))
        self.base_seed = split_seed("train")
        self.seed = seed
        self.mix = dict(mix or STAGE2_MIX)
        self.turns = int(turns)
        self.patch_grid = int(patch_grid)   # > 0: also return patch_labels (grid x grid)
        # True: turns packed by encode_independent_turns; batches gain segment_ids and
        # position_ids (padding: segment -1, position 0)
        self.independent_turns = bool(independent_turns)

    def __call__(self, step: int) -> Dict[str, Any]:
        import torch

        from fmrt.data import as_rng, render_batch

        R = as_rng(np.random.default_rng([self.base_seed, 0x11A7A, self.stage, self.seed, step]))
        scenes, rows, kinds = [], [], []
        for _ in range(self.batch_size):
            sc = self.world.sample_scene(R)
            tasks = _pick_tasks(R, sc, self.stage, self.mix, self.turns)
            scenes.append(sc)
            # the same tokens either way; segment / position ids are used only when the
            # turns are independent (encode_conversation reads them as one causal sequence)
            rows.append(encode_independent_turns(self.tok, [(q, a) for _, q, a in tasks],
                                                 self.image_seq_length))
            kinds.append([k for k, _, _ in tasks])
        n = max(len(r[0]) for r in rows)
        fills = {"input_ids": self.tok.pad_token_id, "labels": IGNORE}
        if self.independent_turns:
            fills.update(segment_ids=-1, position_ids=0)
        out = {"images": render_batch(scenes), "kinds": kinds}
        for j, (key, fill) in enumerate(fills.items()):
            t = torch.full((len(rows), n), fill, dtype=torch.long)
            for i, r in enumerate(rows):
                t[i, :len(r[j])] = torch.tensor(r[j])
            out[key] = t
        if self.patch_grid:
            out["patch_labels"] = torch.from_numpy(patch_labels(scenes, self.patch_grid))
        return out


# ----------------------------------------------------------------------------- evaluation data
def eval_examples(n_images: int, *, split: str = "test", image_size: int = 64, seed: int = 0
                  ) -> List[Dict[str, Any]]:
    """Held-out examples: for each of ``n_images`` scenes of ``split``, every question
    ``fmrt.data.questions`` asks of it. Items: ``image``, ``scene``, ``question``, ``answer``,
    ``kind``, ``index`` (the scene)."""
    from fmrt.data import ShapesWorldDataset
    from fmrt.data import language as L

    ds = ShapesWorldDataset(split, n_images, image_size=image_size, seed=seed)
    out = []
    for i in range(n_images):
        it = ds[i]
        for q, a in it["questions"]:
            out.append({"image": it["image"], "scene": it["scene"], "question": q, "answer": a,
                        "kind": L.question_kind(q), "index": i})
    return out


def point_hits(scene, question: str, points: np.ndarray) -> Tuple[int, int]:
    """(points inside an object matching the pointing question, points) for ``points`` in the
    scene's pixel frame."""
    from fmrt.data import language as L

    m = re.fullmatch(r"point to (?:all )?the " + L._A + L._SH + r"s\.?", question.strip())
    if m is None:
        raise ValueError(f"not a pointing question: {question!r}")
    phrase = L.Phrase(L._norm_shape(m.group(3)), m.group(2), m.group(1))
    masks = [o.mask() for o in scene.objects if phrase.matches(o)]
    size = scene.image_size
    hits = 0
    for x, y in np.asarray(points).reshape(-1, 2):
        xi, yi = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if 0 <= xi < size and 0 <= yi < size and any(mk[yi, xi] for mk in masks):
            hits += 1
    return hits, len(np.asarray(points).reshape(-1, 2))
