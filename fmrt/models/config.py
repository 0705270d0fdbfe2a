"""Dataclass configs that round-trip through the JSON of a model directory."""
from __future__ import annotations

import typing
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Dict


class ConfigMixin:
    """``to_dict()`` / ``from_dict()`` for (nested) dataclass configs. ``from_dict`` rebuilds
    nested dataclass fields from their dicts and ignores the model-directory keys ``family`` and
    ``arch``."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        d = {k: v for k, v in d.items() if k not in ("family", "arch")}
        hints = typing.get_type_hints(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            t = hints[f.name]
            if is_dataclass(t) and isinstance(d.get(f.name), dict):
                sub = d[f.name]
                d[f.name] = t.from_dict(sub) if issubclass(t, ConfigMixin) else t(**sub)
        return cls(**d)
