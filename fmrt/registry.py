"""Model registry: named architecture variants for every family.

``register_model(name, family=...)`` decorates a zero-argument-or-kwargs factory that returns
an ``nn.Module``. ``create_model(name, checkpoint=None)`` builds it and, when a checkpoint path is
given, loads it through the family's checkpoint loader (which may infer the architecture from the
checkpoint itself, so ``name`` may be None for self-describing formats).

Weights and their preprocessing live in a separate registry (``fmrt.pretrained``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    factory: Callable[..., nn.Module]
    description: str = ""


_MODELS: Dict[str, ModelEntry] = {}
# family -> callable(path, name=None, **kw) -> nn.Module
_CHECKPOINT_LOADERS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, *, family: str, description: str = ""):
    def deco(fn: Callable[..., nn.Module]):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name=name, family=family, factory=fn, description=description)
        return fn

    return deco


def register_checkpoint_loader(family: str):
    def deco(fn):
        _CHECKPOINT_LOADERS[family] = fn
        return fn

    return deco


# Hugging Face config.json "model_type" -> family whose loader reads such directories
_HF_MODEL_TYPES: Dict[str, str] = {}


def register_hf_model_type(model_type: str, family: str) -> None:
    """Route ``create_model(None, checkpoint=dir)`` for a Hugging Face directory whose
    config.json has this ``model_type`` to ``family``'s checkpoint loader."""
    _HF_MODEL_TYPES[model_type] = family


def _checkpoint_family(checkpoint: str) -> Optional[str]:
    """Family a model directory names in its config.json (fmrt ``family`` or HF ``model_type``)."""
    import json
    import os

    cfg_path = os.path.join(os.fspath(checkpoint), "config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # the family's loader reports unreadable files
    if not isinstance(cfg, dict):
        return None
    if cfg.get("family") in _CHECKPOINT_LOADERS:
        return cfg["family"]
    return _HF_MODEL_TYPES.get(cfg.get("model_type"))


def _ensure_populated() -> None:
    # Importing the model packages runs their @register_model decorators.
    import fmrt.models  # noqa: F401


def list_models(family: Optional[str] = None) -> List[str]:
    """Sorted names of every registered architecture (optionally one family's)."""
    _ensure_populated()
    return sorted(n for n, e in _MODELS.items() if family is None or e.family == family)


def get_model_entry(name: str) -> ModelEntry:
    _ensure_populated()
    try:
        return _MODELS[name]
    except KeyError:
        close = [n for n in _MODELS if name.lower().replace("_", "-") in n.lower().replace("_", "-")]
        hint = f"; did you mean one of {close}?" if close else f"; known: {sorted(_MODELS)}"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def create_model(name: Optional[str] = None, checkpoint: Optional[str] = None, *,
                 family: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build a registered architecture, optionally loading a checkpoint.

    Args:
        name: a name from ``list_models()``, or a bundled pretrained name (``fmrt.pretrained``),
            or None when ``checkpoint`` describes its own architecture.
        checkpoint: path to an OpenAI / open_clip / Hugging Face / fmrt checkpoint.
        family: checkpoint family when ``name`` is None (default ``"clip"``).
    """
    _ensure_populated()
    from fmrt import pretrained

    if name is not None and name not in _MODELS and pretrained.is_pretrained(name):
        if checkpoint is not None:
            raise ValueError(f"{name!r} is a bundled pretrained model; pass checkpoint=None")
        return pretrained.load_pretrained_model(name)
    if checkpoint is None:
        if name is None:
            raise ValueError("create_model needs a model name or a checkpoint path")
        return get_model_entry(name).factory(**kwargs)
    fam = get_model_entry(name).family if name is not None else (
        family or _checkpoint_family(checkpoint) or "clip")
    loader = _CHECKPOINT_LOADERS.get(fam)
    if loader is None:
        raise ValueError(f"no checkpoint loader registered for family {fam!r}")
    return loader(checkpoint, name=name, **kwargs)
