"""CuPL (Pratt et al. 2023, "What does a platypus look like?"): class descriptions written by a
language model become CLIP zero-shot classifiers.

For each class, each CuPL prompt ("What does a {} look like?", ...) is sent to a text generator
``n`` times; the cleaned answers ("A lorikeet is a small parrot with brightly coloured plumage.")
are encoded by CLIP and averaged into the class embedding (``fmrt.chain.labelsets``), alone or
together with the hand-written templates.

Text sources (one interface, ``describe_class(classname, prompt, sampling) -> [str]``):

* ``OpenAIChatSource(base_url, model)``: any OpenAI-compatible ``/chat/completions`` endpoint
  (``requests``; servers that ignore ``n`` are asked again until ``n`` answers arrive);
* ``ServedLMSource``: fmrt's own served language model (the same protocol against the fmrt
  server; it lands with the VLM issue) and ``CallableSource(fn)`` for any in-process generator;
* ``JsonFileSource(path)``: descriptions written beforehand, ``{class: [str, ...]}`` (or a saved
  ``DescriptionSet``);
* ``ShapesWorldSource``: **the offline stand-in for an LLM.** No language model ships with fmrt's
  offline stack that knows what ShapesWorld objects look like, so this source writes what an LLM
  would answer from the world's own facts (``fmrt.data.vocab``: colours, shapes, sizes, places):
  ``"a red triangle is a flat red shape with three straight sides and three corners."``. Style
  ``"prose"`` writes such LLM-like sentences (many of their words - "flat", "corners" - are
  outside shapes-clip's 86-token vocabulary and reach its text encoder as ``<unk>``);
  ``"vocab"`` writes descriptions made only of ShapesWorld words ("a small red triangle in the
  top left."), i.e. of the variation a class shows in the world; ``"mixed"`` alternates.
  It is deterministic (seeded per class, prompt and sample).

Descriptions are cached on disk (``DescriptionCache``; ``$FMRT_CACHE_DIR/cupl`` or
``~/.cache/fmrt/cupl``), one JSON record per (source, class, prompt, sampling) with that
provenance, so a label set can say exactly which text produced it.

``evaluate_cupl`` measures ShapesWorld zero-shot accuracy with templates vs descriptions vs both,
and ``labelset_cost`` the per-request cost of a stored label set vs re-encoding the labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

#: CuPL's "base" prompts for ImageNet (Pratt et al. 2023, appendix); ``{}`` takes the class
#: name with its article ("an orange star").
CUPL_PROMPTS: tuple = (
    "Describe what a {} looks like",
    "How can you identify a {}?",
    "What does a {} look like?",
    "Describe an image from the internet of a {}",
    "A caption of an image of a {}:",
)
MAX_DESCRIPTION_CHARS = 300


class TextGenerationError(RuntimeError):
    """The text source failed (HTTP error, malformed answer, no descriptions)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings sent to the source and recorded as provenance (CuPL: temperature
    0.99, 50 tokens, ~10 answers per prompt; fewer here by default)."""

    n: int = 3
    temperature: float = 0.99
    max_tokens: int = 50
    seed: Optional[int] = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def format_prompt(prompt: str, classname: str) -> str:
    """``"What does a {} look like?"`` + ``"orange star"`` -> ``"What does an orange star look
    like?"`` (CuPL's prompts say "a(n)"; the article is fixed here)."""
    from fmrt.data.vocab import apply_template

    if "{}" not in prompt:
        raise ValueError(f"prompt {prompt!r} has no '{{}}' placeholder")
    out = apply_template(prompt.replace("A {}", "a {}", 1) if prompt.startswith("A {}")
                         else prompt, classname)
    return out[0].upper() + out[1:] if prompt[:1].isupper() else out


_WS = re.compile(r"\s+")


def clean_description(text: str) -> Optional[str]:
    """One line, no wrapping quotes or list markers, at most ``MAX_DESCRIPTION_CHARS``."""
    if not isinstance(text, str):
        return None
    s = text.strip().split("\n")[0].strip()
    s = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", s)
    s = s.strip().strip("\"'\u201c\u201d").strip()
    s = _WS.sub(" ", s)
    if len(s) > MAX_DESCRIPTION_CHARS:
        cut = s[:MAX_DESCRIPTION_CHARS]
        s = cut[: cut.rfind(" ")] if " " in cut else cut
    return s or None


# ---------------------------------------------------------------------------------- sources
class TextSource:
    """Base class: ``describe_class`` returns cleaned descriptions of one class for one prompt.

    ``prompt_free`` sources (JSON files) ignore the prompt and are asked once per class."""

    kind = "base"
    prompt_free = False

    def provenance(self) -> Dict[str, Any]:
        return {"source": self.kind}

    def generate(self, prompt: str, sampling: Sampling) -> List[str]:
        raise NotImplementedError

    def describe_class(self, classname: str, prompt: Optional[str], sampling: Sampling
                       ) -> List[str]:
        raw = self.generate(format_prompt(prompt, classname), sampling)
        return [c for c in (clean_description(t) for t in raw) if c]


class OpenAIChatSource(TextSource):
    """An OpenAI-compatible chat endpoint: ``POST {base_url}/chat/completions``."""

    kind = "openai-chat"

    def __init__(self, base_url: str, model: str, *, api_key: Optional[str] = None,
                 timeout_s: float = 60.0, system: Optional[str] = None,
                 max_requests: int = 16) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key, self.timeout_s, self.system = api_key, float(timeout_s), system
        self.max_requests = int(max_requests)

    def provenance(self) -> Dict[str, Any]:  # never the API key
        return {"source": self.kind, "base_url": self.base_url, "model": self.model,
                "system": self.system}

    def _request(self, prompt: str, n: int, sampling: Sampling) -> List[str]:
        import requests

        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]
        body: Dict[str, Any] = {"model": self.model, "messages": msgs, "n": n,
                                "temperature": sampling.temperature,
                                "max_tokens": sampling.max_tokens}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = requests.post(self.base_url + "/chat/completions", json=body, headers=headers,
                              timeout=self.timeout_s)
        except requests.RequestException as e:
            raise TextGenerationError(f"{self.base_url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise TextGenerationError(f"{self.base_url}/chat/completions answered "
                                      f"{r.status_code}: {r.text[:300]}")
        try:
            choices = r.json()["choices"]
            return [str(c["message"]["content"] or "") for c in choices]
        except (ValueError, KeyError, TypeError) as e:
            raise TextGenerationError(f"malformed chat completion: {type(e).__name__}: {e}; "
                                      f"body {r.text[:200]!r}") from None

    def generate(self, prompt: str, sampling: Sampling) -> List[str]:
        out: List[str] = []
        for _ in range(self.max_requests):
            got = self._request(prompt, sampling.n - len(out), sampling)
            if not got:
                break
            out.extend(got)
            if len(out) >= sampling.n:
                break
        if not out:
            raise TextGenerationError(f"{self.base_url} returned no completions")
        return out[: sampling.n]


class ServedLMSource(OpenAIChatSource):
    """fmrt's own served language model, through the server's OpenAI-compatible chat route."""

    kind = "fmrt-lm"

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: str = "shapes-lm",
                 **kw) -> None:
        super().__init__(base_url, model, **kw)


class CallableSource(TextSource):
    """``fn(prompt, sampling) -> [str]``: any in-process generator (a local LM, a test stub)."""

    kind = "callable"

    def __init__(self, fn: Callable[[str, Sampling], Sequence[str]], name: str = "callable"
                 ) -> None:
        self.fn, self.name = fn, name

    def provenance(self) -> Dict[str, Any]:
        return {"source": self.kind, "name": self.name}

    def generate(self, prompt: str, sampling: Sampling) -> List[str]:
        out = self.fn(prompt, sampling)
        if isinstance(out, str) or not all(isinstance(t, str) for t in out):
            raise TextGenerationError(f"{self.name} must return a list of strings")
        return list(out)


class JsonFileSource(TextSource):
    """Descriptions from a JSON file: ``{class: [str]}`` or ``{"descriptions": {...}}``."""

    kind = "json"
    prompt_free = True

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        with open(self.path) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("descriptions"), dict):
            data = data["descriptions"]
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()):
            raise ValueError(f"{path}: expected {{class: [description, ...]}}")
        self.data: Dict[str, List[str]] = data
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()

    def provenance(self) -> Dict[str, Any]:
        return {"source": self.kind, "path": self.path, "sha256": self.sha256}

    def describe_class(self, classname, prompt, sampling) -> List[str]:
        if classname not in self.data:
            raise TextGenerationError(f"{self.path} has no descriptions for {classname!r}")
        return [c for c in (clean_description(t) for t in self.data[classname]) if c]


# ---------------------------------------------------------------------------------- ShapesWorld
_SHAPE_FACTS = {
    "circle": ["round", "with no corners", "with one smooth curved edge",
               "with no straight sides", "the same width in every direction"],
    "square": ["with four equal straight sides", "with four right-angled corners",
               "as wide as it is tall", "with straight edges and square corners",
               "a box-like outline"],
    "triangle": ["with three straight sides", "with three corners", "pointed at the top",
                 "wide at the bottom and narrow at the top", "three-sided"],
    "star": ["with five pointed arms", "with five points and ten corners",
             "spiky at its edges", "with points that stick out from its center",
             "shaped like a drawn star"],
}
_COLOR_FACTS = {
    "red": "the color of a ripe tomato", "green": "the color of fresh grass",
    "blue": "the color of a clear sky", "yellow": "the color of a lemon",
    "purple": "the color of a grape", "orange": "the color of an orange fruit",
}
_PROSE = (
    "{a_cls} is a flat {color} shape {fact0}.",
    "{a_cls} looks like a solid {color} {shape} {fact1}, drawn on a light background.",
    "you can identify {a_cls} by its {color} fill, {color_fact}, and its outline {fact0}.",
    "{a_cls} is a simple {size} {shape} shape {fact2}, colored {color}.",
    "an image of {a_cls} shows one {color} {shape} {fact1} on a plain white or gray background.",
    "{a_cls} is {a_color} geometric figure {fact2}.",
)
_PROSE_SHAPE = (
    "a {shape} is a flat shape {fact0}.",
    "a {shape} looks like an outline {fact1}, filled with one solid color.",
    "you can identify a {shape} because it is {fact2}.",
    "an image of a {shape} shows one colored shape {fact0} on a light background.",
)
_PROSE_COLOR = (
    "a {color} shape is filled with solid {color}, {color_fact}.",
    "a {color} object is colored {color} all over, {color_fact}.",
    "you can identify a {color} shape by its bright {color} color.",
    "an image of a {color} shape shows one {color} figure on a light background.",
)


def _in_vocab(cls_words: str) -> List[str]:
    """Sentences made only of ShapesWorld tokens describing how the class appears."""
    from fmrt.data.vocab import COLUMNS, ROWS, SIZES, with_article

    out = []
    for size in SIZES:
        out.append(f"{with_article(size + ' ' + cls_words)}.")
        out.append(f"{with_article(size + ' ' + cls_words)} on a plain background.")
    for row in ROWS:
        for col in COLUMNS:
            place = "center" if (row, col) == ("middle", "center") else f"{row} {col}"
            out.append(f"{with_article(cls_words)} in the {place}.")
    out += [f"there is one {cls_words}.", f"a drawing of {with_article(cls_words)}.",
            f"one {cls_words} on a plain background."]
    return out


class ShapesWorldSource(TextSource):
    """Offline stand-in for an LLM: deterministic descriptions of ShapesWorld classes (``"red
    circle"``, ``"circle"``, ``"red"``) from the world's vocabulary. See the module docstring."""

    kind = "shapesworld"

    def __init__(self, style: str = "prose") -> None:
        if style not in ("prose", "vocab", "mixed"):
            raise ValueError(f"style must be prose, vocab or mixed, got {style!r}")
        self.style = style

    def provenance(self) -> Dict[str, Any]:
        return {"source": self.kind, "style": self.style, "version": 1}

    @staticmethod
    def parse_class(classname: str):
        from fmrt.data.vocab import COLORS, SHAPES

        words = classname.lower().split()
        color = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w.rstrip("s") in SHAPES), None)
        if shape:
            shape = shape.rstrip("s") if shape not in SHAPES else shape
        if color is None and shape is None:
            raise TextGenerationError(f"{classname!r} is not a ShapesWorld class (a colour, a "
                                      "shape or 'colour shape')")
        return color, shape

    def _prose(self, classname: str, rng: random.Random) -> List[str]:
        from fmrt.data.vocab import SIZES, with_article

        color, shape = self.parse_class(classname)
        out = []
        facts = list(_SHAPE_FACTS.get(shape or "", [""]))
        rng.shuffle(facts)
        f = (facts * 3)[:3]
        if color and shape:
            pats = _PROSE
        elif shape:
            pats = _PROSE_SHAPE
        else:
            pats = _PROSE_COLOR
        for p in pats:
            out.append(p.format(a_cls=with_article(classname), color=color, shape=shape,
                                fact0=f[0], fact1=f[1], fact2=f[2],
                                color_fact=_COLOR_FACTS.get(color or "", ""),
                                a_color=with_article(color or "plain"),
                                size=rng.choice(SIZES)))
        return out

    def describe_class(self, classname: str, prompt: Optional[str], sampling: Sampling
                       ) -> List[str]:
        key = f"{classname}|{prompt}|{sampling.seed}|{self.style}"
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        self.parse_class(classname)
        if self.style == "prose":
            pool = self._prose(classname, rng)
        elif self.style == "vocab":
            pool = _in_vocab(classname)
        else:
            pool = self._prose(classname, rng) + _in_vocab(classname)
        # The temperature only sets how spread the picks are; at 0 the first n are taken.
        if sampling.temperature <= 0:
            picks = pool[: sampling.n]
        else:
            picks = rng.sample(pool, min(sampling.n, len(pool)))
        return [clean_description(p) for p in picks]


# ---------------------------------------------------------------------------------- cache
def default_cache_dir() -> str:
    cache = os.environ.get("FMRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "fmrt")
    return os.path.join(cache, "cupl")


class DescriptionCache:
    """One JSON record per (source provenance, class, prompt, sampling)."""

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = os.path.abspath(root or default_cache_dir())
        self.hits = self.misses = 0

    @staticmethod
    def key(provenance: Mapping[str, Any], classname: str, prompt: Optional[str],
            sampling: Sampling) -> str:
        blob = json.dumps({"source": provenance, "class": classname, "prompt": prompt,
                           "sampling": sampling.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + ".json")

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        p = self._path(key)
        if not os.path.isfile(p):
            self.misses += 1
            return None
        try:
            with open(p) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return rec

    def put(self, key: str, record: Dict[str, Any]) -> None:
        p = self._path(key)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, p)


@dataclass
class DescriptionSet:
    """Descriptions per class plus one provenance record per (class, prompt)."""

    descriptions: Dict[str, List[str]]
    records: List[Dict[str, Any]] = field(default_factory=list)

    def provenance(self) -> Dict[str, Any]:
        srcs = {json.dumps(r["source"], sort_keys=True) for r in self.records}
        prompts = sorted({r["prompt"] for r in self.records if r["prompt"]})
        samp = {json.dumps(r["sampling"], sort_keys=True) for r in self.records}
        return {"sources": [json.loads(s) for s in sorted(srcs)], "prompts": prompts,
                "sampling": [json.loads(s) for s in sorted(samp)],
                "records": len(self.records)}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"descriptions": self.descriptions, "records": self.records}, f, indent=1)


def generate_descriptions(classes: Sequence[str], source: TextSource, *,
                          prompts: Sequence[str] = CUPL_PROMPTS,
                          sampling: Sampling = Sampling(),
                          cache: Optional[DescriptionCache] = None) -> DescriptionSet:
    """CuPL step 1: ``sampling.n`` descriptions per (class, prompt), cleaned, de-duplicated."""
    prov = source.provenance()
    out: Dict[str, List[str]] = {}
    records: List[Dict[str, Any]] = []
    for c in classes:
        seen: Dict[str, None] = {}
        for prompt in ([None] if source.prompt_free else list(prompts)):
            key = DescriptionCache.key(prov, c, prompt, sampling)
            rec = cache.get(key) if cache is not None else None
            cached = rec is not None
            if rec is None:
                descs = source.describe_class(c, prompt, sampling)
                rec = {"class": c, "prompt": prompt,
                       "prompt_text": format_prompt(prompt, c) if prompt else None,
                       "source": prov, "sampling": sampling.to_dict(), "descriptions": descs,
                       "created": time.time()}
                if cache is not None:
                    cache.put(key, rec)
            for d in rec["descriptions"]:
                seen.setdefault(d, None)
            records.append({k: rec[k] for k in ("class", "prompt", "source", "sampling")}
                           | {"n": len(rec["descriptions"]), "cached": cached})
        if not seen:
            raise TextGenerationError(f"no descriptions for class {c!r}")
        out[c] = list(seen)
    return DescriptionSet(out, records)


# ---------------------------------------------------------------------------------- evaluation
def _test_set(n: int, kind: str):
    from fmrt.data import ShapesWorld, class_labels, split_seed

    world = ShapesWorld(image_size=64, seed=split_seed("test"))
    images, labels = world.classification_set(n, seed=split_seed("test"), kind=kind)
    return list(images), labels, class_labels(kind)


def evaluate_cupl(model: str = "shapes-clip", *, n: int = 1200, kind: str = "color_shape",
                  backend: str = "torch", source: Optional[TextSource] = None,
                  sampling: Sampling = Sampling(n=3), templates: Optional[Sequence[str]] = None,
                  styles: Sequence[str] = ("prose", "vocab"), rt=None) -> Dict[str, Any]:
    """ShapesWorld zero-shot top-1 (test split, one object per image) with label sets built
    from templates, descriptions, and both. With ``source=None`` the ShapesWorld offline source
    is evaluated in each of ``styles``."""
    import fmrt
    from fmrt.chain.labelsets import build_labelset
    from fmrt.data import TEMPLATES

    rt = rt or fmrt.load(model, backend=backend)
    images, labels, classes = _test_set(n, kind)
    img = rt.encode_image(images)
    memo: Dict[str, np.ndarray] = {}

    def encode(texts: List[str]) -> np.ndarray:  # each distinct prompt is encoded once
        new = [t for t in dict.fromkeys(texts) if t not in memo]
        if new:
            memo.update(zip(new, rt.encode_text(new)))
        return np.stack([memo[t] for t in texts])

    templates = list(templates or TEMPLATES)

    def acc(ls) -> float:
        p = ls.classify(img, rt.name, rt.logit_scale)
        # Accuracy saturates on one-object images; the probability of the true class and the
        # cosine margin (true class - best other) still tell the label sets apart.
        sims = img @ ls.weights(rt.name).T
        true = sims[np.arange(len(labels)), labels]
        sims[np.arange(len(labels)), labels] = -np.inf
        margins.append(float((true - sims.max(1)).mean()))
        probs.append(float(p[np.arange(len(labels)), labels].mean()))
        return float((p.argmax(1) == labels).mean())

    margins: List[float] = []
    probs: List[float] = []

    res: Dict[str, Any] = {"model": rt.name, "n": n, "kind": kind, "classes": len(classes),
                           "templates": len(templates)}

    def record(tag: str, ls) -> None:
        res[f"{tag}_acc"] = acc(ls)
        res[f"{tag}_p_true"], res[f"{tag}_margin"] = probs[-1], margins[-1]

    record("templates", build_labelset("t", classes, model=rt.name, encode_text=encode,
                                       mode="templates", templates=templates))
    record("single_template", build_labelset("t1", classes, model=rt.name,
                                             encode_text=encode, mode="templates",
                                             templates=["a photo of a {}."]))
    sources = {s: ShapesWorldSource(s) for s in styles} if source is None else {
        source.kind: source}
    for tag, src in sources.items():
        ds = generate_descriptions(classes, src, sampling=sampling)
        per_class = float(np.mean([len(v) for v in ds.descriptions.values()]))
        for mode in ("descriptions", "both"):
            ls = build_labelset("d", classes, model=rt.name, encode_text=encode,
                                mode=mode, templates=templates, descriptions=ds.descriptions)
            record(f"{tag}_{mode}", ls)
        res[f"{tag}_descriptions_per_class"] = per_class
    return res


def labelset_cost(model: str = "shapes-clip", *, n_images: int = 8, repeats: int = 20,
                  templates: Optional[Sequence[str]] = None, backend: str = "torch",
                  rt=None) -> Dict[str, Any]:
    """Per-request latency of classifying ``n_images`` over the 24 ShapesWorld classes: a
    stored label set (image encoding + one matmul) vs re-encoding every label x template per
    request (what a client pays when it sends ``labels`` and the cache misses)."""
    import fmrt
    from fmrt.chain.labelsets import build_labelset
    from fmrt.data import TEMPLATES

    rt = rt or fmrt.load(model, backend=backend)
    images, _, classes = _test_set(n_images, "color_shape")
    templates = list(templates or TEMPLATES)
    ls = build_labelset("cost", classes, model=rt.name, encode_text=rt.encode_text,
                        mode="templates", templates=templates)

    def reencode():
        rt._classifiers.clear()  # force the label encoding every request
        return rt.classify(images, classes, templates)

    def with_labelset():
        return ls.classify(rt.encode_image(images), rt.name, rt.logit_scale)

    np.testing.assert_allclose(reencode(), with_labelset(), atol=1e-4)
    out: Dict[str, Any] = {"model": rt.name, "n_images": n_images, "classes": len(classes),
                           "texts_encoded_per_request": len(classes) * len(templates)}
    for name, fn in (("reencode", reencode), ("labelset", with_labelset)):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[f"{name}_ms"] = float(np.median(ts) * 1e3)
    out["speedup"] = out["reencode_ms"] / out["labelset_ms"]
    return out


__all__ = ["CUPL_PROMPTS", "Sampling", "TextSource", "OpenAIChatSource", "ServedLMSource",
           "CallableSource", "JsonFileSource", "ShapesWorldSource", "DescriptionCache",
           "DescriptionSet", "generate_descriptions", "format_prompt", "clean_description",
           "TextGenerationError", "evaluate_cupl", "labelset_cost"]
