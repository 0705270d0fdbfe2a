"""Label sets: named, versioned zero-shot classifiers stored on disk.

A label set holds, for each CLIP model it was built for, the class embedding matrix ``L x E``
(float32): per class, the mean of the L2-normalised text embeddings of its prompts, normalised
again (CLIP's prompt ensemble, CuPL's description ensemble). The prompts come from templates
(``"a photo of a {}."``), from class descriptions (CuPL), or both (``mode``). Classifying with a
label set costs what zero-shot classification with a cached classifier costs: one image
encoding and an ``N x E @ E x L`` product, no label encoding per request.

On disk (``LabelSetStore``; root ``$FMRT_LABELSET_DIR``, else ``$FMRT_CACHE_DIR/labelsets``,
else ``~/.cache/fmrt/labelsets``)::

    <root>/<name>/v<version>/labelset.json     classes, mode, templates, descriptions,
                                                provenance, models -> {file, embed_dim, n_texts}
    <root>/<name>/v<version>/<model>.npy       L x E float32

Versions are integers from 1; ``save`` without a version writes the next one; ``load`` without a
version reads the newest. Files are written to a temporary directory and renamed into place, so a
reader never sees half a label set.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

MAX_CLASSES = 1000
MAX_TEXTS_PER_CLASS = 256
MODES = ("templates", "descriptions", "both")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_DIR = re.compile(r"^v(\d{1,9})$")


class LabelSetError(ValueError):
    """A bad label-set request (empty/too many classes, model mismatch, bad name...)."""


class LabelSetNotFoundError(LabelSetError):
    """No label set of that name (or version)."""


def default_root() -> str:
    if os.environ.get("FMRT_LABELSET_DIR"):
        return os.environ["FMRT_LABELSET_DIR"]
    cache = os.environ.get("FMRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "fmrt")
    return os.path.join(cache, "labelsets")


def check_name(name: Any, what: str = "label set name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LabelSetError(f"invalid {what} {name!r}: 1-64 characters of letters, digits, "
                            "'_', '.', '-', starting with a letter or digit")
    return name


def check_classes(classes: Any) -> List[str]:
    if not isinstance(classes, (list, tuple)) or not classes:
        raise LabelSetError("classes must be a non-empty list of strings")
    if len(classes) > MAX_CLASSES:
        raise LabelSetError(f"at most {MAX_CLASSES} classes, got {len(classes)}")
    if not all(isinstance(c, str) and c.strip() for c in classes):
        raise LabelSetError("classes must be non-empty strings")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})[:5]
        raise LabelSetError(f"duplicate classes {dup}")
    return list(classes)


def class_texts(classes: Sequence[str], *, mode: str, templates: Optional[Sequence[str]] = None,
                descriptions: Optional[Mapping[str, Sequence[str]]] = None
                ) -> List[List[str]]:
    """The prompts of each class for ``mode``: filled templates, descriptions, or both."""
    from fmrt.data.vocab import apply_template

    if mode not in MODES:
        raise LabelSetError(f"mode must be one of {MODES}, got {mode!r}")
    use_t, use_d = mode in ("templates", "both"), mode in ("descriptions", "both")
    if use_t:
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise LabelSetError("templates must be a non-empty list of strings containing '{}'")
    if use_d:
        if not isinstance(descriptions, Mapping):
            raise LabelSetError(f"mode {mode!r} needs descriptions (class -> list of strings)")
        missing = [c for c in classes if not descriptions.get(c)]
        if missing:
            raise LabelSetError(f"no descriptions for classes {missing[:5]}"
                                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        extra = sorted(set(descriptions) - set(classes))
        if extra:
            raise LabelSetError(f"descriptions for unknown classes {extra[:5]}")
    out: List[List[str]] = []
    for c in classes:
        texts: List[str] = []
        if use_t:
            texts += [apply_template(t, c) for t in templates]
        if use_d:
            ds = descriptions[c]
            if not isinstance(ds, (list, tuple)) or not all(isinstance(d, str) and d.strip()
                                                             for d in ds):
                raise LabelSetError(f"descriptions of {c!r} must be non-empty strings")
            texts += [d.strip() for d in ds]
        if len(texts) > MAX_TEXTS_PER_CLASS:
            raise LabelSetError(f"class {c!r} has {len(texts)} prompts; the limit is "
                                f"{MAX_TEXTS_PER_CLASS}")
        out.append(texts)
    return out


def ensemble(emb: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """``sum(counts) x E`` normalised prompt embeddings -> ``len(counts) x E`` class embeddings
    (mean per class, re-normalised)."""
    emb = np.asarray(emb, dtype=np.float32)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    out = np.stack([seg.mean(axis=0) for seg in np.split(emb, np.cumsum(counts)[:-1])])
    return (out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


@dataclass
class LabelSet:
    name: str
    classes: List[str]
    mode: str
    templates: List[str] = field(default_factory=list)
    descriptions: Dict[str, List[str]] = field(default_factory=dict)
    embeddings: Dict[str, np.ndarray] = field(default_factory=dict)  # model -> L x E
    provenance: Dict[str, Any] = field(default_factory=dict)
    version: Optional[int] = None
    created: float = field(default_factory=time.time)

    def weights(self, model: str) -> np.ndarray:
        if model not in self.embeddings:
            raise LabelSetError(f"label set {self.name!r} (v{self.version}) was built for "
                                f"model(s) {sorted(self.embeddings)}, not {model!r}")
        return self.embeddings[model]

    def meta(self) -> Dict[str, Any]:
        return {"name": self.name, "version": self.version, "classes": list(self.classes),
                "num_classes": len(self.classes), "mode": self.mode,
                "models": {m: {"embed_dim": int(e.shape[1])} for m, e in self.embeddings.items()},
                "created": self.created, "provenance": self.provenance}

    def classify(self, image_emb: np.ndarray, model: str, logit_scale: float) -> np.ndarray:
        """``N x E`` normalised image embeddings -> ``N x L`` probabilities."""
        logits = float(logit_scale) * np.asarray(image_emb, np.float32) @ self.weights(model).T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def build_labelset(name: str, classes: Sequence[str], *, model: str,
                   encode_text: Callable[[List[str]], np.ndarray], mode: str = "templates",
                   templates: Optional[Sequence[str]] = None,
                   descriptions: Optional[Mapping[str, Sequence[str]]] = None,
                   provenance: Optional[Dict[str, Any]] = None,
                   into: Optional[LabelSet] = None) -> LabelSet:
    """Encode every class's prompts with ``encode_text`` (``list[str] -> N x E``) and average.

    ``into``: add this model's embeddings to an existing label set of the same classes."""
    check_name(name)
    classes = check_classes(classes)
    texts = class_texts(classes, mode=mode, templates=templates, descriptions=descriptions)
    flat = [t for ts in texts for t in ts]
    emb = np.asarray(encode_text(flat), dtype=np.float32)
    if emb.shape[0] != len(flat):
        raise LabelSetError(f"encoder returned {emb.shape[0]} embeddings for {len(flat)} texts")
    w = ensemble(emb, [len(ts) for ts in texts])
    if into is not None:
        if into.classes != classes or into.mode != mode:
            raise LabelSetError("into= needs the same classes and mode")
        into.embeddings[model] = w
        return into
    ls = LabelSet(name=name, classes=classes, mode=mode,
                  templates=list(templates or []) if mode != "descriptions" else [],
                  descriptions={c: list(descriptions[c]) for c in classes}
                  if mode != "templates" else {},
                  embeddings={model: w}, provenance=dict(provenance or {}))
    ls.provenance.setdefault("texts_per_class", [len(ts) for ts in texts])
    return ls


class LabelSetStore:
    """Label sets under ``root`` (default ``default_root()``)."""

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = os.path.abspath(root or default_root())

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def versions(self, name: str) -> List[int]:
        d = self._dir(name)
        if not os.path.isdir(d):
            return []
        return sorted(int(m.group(1)) for m in map(_VERSION_DIR.match, os.listdir(d)) if m)

    def latest(self, name: str) -> Optional[int]:
        v = self.versions(name)
        return v[-1] if v else None

    def names(self) -> List[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root) if _NAME.match(n) and self.versions(n))

    def save(self, ls: LabelSet, version: Optional[int] = None) -> int:
        d = self._dir(ls.name)
        os.makedirs(d, exist_ok=True)
        for _ in range(100):  # another writer may take the same version: retry the next one
            v = version if version is not None else (self.latest(ls.name) or 0) + 1
            final = os.path.join(d, f"v{v}")
            if os.path.exists(final):
                if version is not None:
                    raise LabelSetError(f"label set {ls.name!r} v{v} already exists")
                continue
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=d)
            try:
                models = {}
                for i, (m, e) in enumerate(sorted(ls.embeddings.items())):
                    fname = f"model{i}.npy"
                    np.save(os.path.join(tmp, fname), np.asarray(e, np.float32))
                    models[m] = {"file": fname, "embed_dim": int(e.shape[1])}
                meta = {"format": "fmrt-labelset/1", "name": ls.name, "version": v,
                        "classes": ls.classes, "mode": ls.mode, "templates": ls.templates,
                        "descriptions": ls.descriptions, "provenance": ls.provenance,
                        "created": ls.created, "models": models}
                with open(os.path.join(tmp, "labelset.json"), "w") as f:
                    json.dump(meta, f, indent=1)
                os.rename(tmp, final)  # atomic; fails if another writer took v meanwhile
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if version is not None or not os.path.exists(final):
                    raise
                continue
            ls.version = v
            return v
        raise LabelSetError(f"could not allocate a version for {ls.name!r}")

    def load(self, name: str, version: Optional[int] = None) -> LabelSet:
        v = version if version is not None else self.latest(name)
        if v is None:
            raise LabelSetNotFoundError(f"no label set named {name!r}")
        d = os.path.join(self._dir(name), f"v{int(v)}")
        path = os.path.join(d, "labelset.json")
        if not os.path.isfile(path):
            raise LabelSetNotFoundError(f"label set {name!r} has no version {v}; versions: "
                                        f"{self.versions(name)}")
        with open(path) as f:
            meta = json.load(f)
        emb = {m: np.load(os.path.join(d, info["file"]), allow_pickle=False)
               for m, info in meta["models"].items()}
        return LabelSet(name=meta["name"], classes=meta["classes"], mode=meta["mode"],
                        templates=meta.get("templates", []),
                        descriptions=meta.get("descriptions", {}), embeddings=emb,
                        provenance=meta.get("provenance", {}), version=meta["version"],
                        created=meta.get("created", 0.0))


# ---------------------------------------------------------------------------------- serving
class ServedLabelSets:
    """One CLIP replica's label sets: created through its batched text encoder, saved to the
    shared store, kept in memory as ``(name, version) -> L x E`` so a classify request does no
    text encoding. A request without a version uses the newest on disk (one ``listdir``)."""

    MAX_IN_MEMORY = 64

    def __init__(self, model: str, root: Optional[str] = None) -> None:
        self.model = model
        self.store = LabelSetStore(root)
        self._mem: "Dict[tuple, LabelSet]" = {}

    def get(self, name: str, version: Optional[int] = None) -> LabelSet:
        check_name(name)
        v = version if version is not None else self.store.latest(name)
        if v is None:
            raise LabelSetNotFoundError(f"no label set named {name!r}")
        key = (name, int(v))
        ls = self._mem.get(key)
        if ls is None:
            ls = self.store.load(name, v)
            self._remember(key, ls)
        ls.weights(self.model)  # LabelSetError: built for another model
        return ls

    def _remember(self, key, ls: LabelSet) -> None:
        self._mem[key] = ls
        while len(self._mem) > self.MAX_IN_MEMORY:
            self._mem.pop(next(iter(self._mem)))

    async def create(self, aencode_text, *, name: str, classes: Sequence[str], mode: str,
                     templates: Optional[Sequence[str]], descriptions, provenance=None
                     ) -> LabelSet:
        """``aencode_text``: ``async list[str] -> N x E`` (the replica's batched encoder)."""
        texts = class_texts(check_classes(classes), mode=mode, templates=templates,
                            descriptions=descriptions)
        flat = [t for ts in texts for t in ts]
        emb = await aencode_text(flat)
        pre = np.asarray(emb, np.float32)
        ls = build_labelset(name, classes, model=self.model, encode_text=lambda _: pre,
                            mode=mode, templates=templates, descriptions=descriptions,
                            provenance=provenance)
        self.store.save(ls)
        self._remember((ls.name, ls.version), ls)
        return ls


def parse_create_request(body: Mapping[str, Any], *, max_text_chars: int = 4096,
                         default_templates: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Validate a ``POST /v1/labelsets`` body (without ``model``) into ``ServedLabelSets.create``
    keyword arguments. Descriptions are given inline (``descriptions: {class: [str]}``) or
    generated by the offline ShapesWorld source (``description_source: "shapesworld"``,
    ``description_style``, ``samples_per_prompt``). Raises ``LabelSetError``."""
    name = check_name(body.get("name"))
    classes = check_classes(body.get("classes"))
    for c in classes:
        if len(c) > max_text_chars:
            raise LabelSetError(f"class name of {len(c)} characters; the limit is "
                                f"{max_text_chars}")
    descriptions = body.get("descriptions")
    source = body.get("description_source")
    mode = body.get("mode")
    if mode is None:
        mode = "both" if (descriptions is not None or source is not None) else "templates"
    if mode not in MODES:
        raise LabelSetError(f"mode must be one of {MODES}, got {mode!r}")
    templates = body.get("templates")
    if templates is None and mode != "descriptions" and default_templates is not None:
        templates = list(default_templates)  # else the serving model's own templates
    if templates is not None:
        if not isinstance(templates, list) or not templates or len(templates) > 64 or not all(
                isinstance(t, str) and "{}" in t and len(t) <= max_text_chars
                for t in templates):
            raise LabelSetError("templates must be a list of 1 to 64 strings containing '{}'")
    provenance: Dict[str, Any] = {}
    if descriptions is not None and source is not None:
        raise LabelSetError("give either 'descriptions' or 'description_source', not both")
    if mode != "templates" and descriptions is None and source is None:
        raise LabelSetError(f"mode {mode!r} needs 'descriptions' or 'description_source'")
    if descriptions is not None:
        if not isinstance(descriptions, dict):
            raise LabelSetError("descriptions must be an object {class: [description, ...]}")
        for c, ds in descriptions.items():
            if not isinstance(ds, list) or not ds or not all(
                    isinstance(d, str) and d.strip() and len(d) <= max_text_chars for d in ds):
                raise LabelSetError(f"descriptions[{c!r}] must be a non-empty list of "
                                    "non-empty strings")
        provenance["descriptions"] = {"source": "inline"}
    elif source is not None:
        if source != "shapesworld":
            raise LabelSetError(f"unknown description_source {source!r}; the server generates "
                                "with 'shapesworld' (send other descriptions inline)")
        from fmrt.chain.cupl import (Sampling, ShapesWorldSource, TextGenerationError,
                                     generate_descriptions)

        style = body.get("description_style", "prose")
        n = body.get("samples_per_prompt", 3)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 20:
            raise LabelSetError("samples_per_prompt must be an integer in [1, 20]")
        try:
            ds = generate_descriptions(classes, ShapesWorldSource(style), sampling=Sampling(n=n))
        except (TextGenerationError, ValueError) as e:
            raise LabelSetError(str(e)) from None
        descriptions = ds.descriptions
        provenance["descriptions"] = ds.provenance()
    if mode == "templates":
        descriptions = None
    return {"name": name, "classes": classes, "mode": mode,
            "templates": templates if mode != "descriptions" else None,
            "descriptions": descriptions, "provenance": provenance}


__all__ = ["ServedLabelSets", "parse_create_request", "LabelSet", "LabelSetStore",
           "LabelSetError", "LabelSetNotFoundError",
           "build_labelset", "class_texts", "ensemble", "check_classes", "check_name",
           "default_root", "MAX_CLASSES", "MODES"]
