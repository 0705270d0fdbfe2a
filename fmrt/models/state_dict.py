"""Strict state-dict loading shared by every checkpoint loader (CLIP, SAM, LLaMA, LLaVA)."""
from __future__ import annotations

from typing import Mapping, Type

import torch
from torch import nn


def check_state_dict(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str,
                     error: Type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``source`` unless ``sd`` has exactly ``own``'s keys and shapes."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise error(f"{source}: state dict does not match the architecture; "
                    f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                    f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise error(f"{source}: shape mismatch (key, checkpoint, model): {bad[:5]}")


def strict_load(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str,
                error: Type[Exception] = ValueError) -> nn.Module:
    """Check ``sd`` against ``model`` (see :func:`check_state_dict`), copy it in, cast to each
    parameter's dtype, and return the model in eval mode."""
    own = model.state_dict()
    check_state_dict(own, sd, source, error)
    model.load_state_dict({k: sd[k].to(v.dtype) for k, v in own.items()})
    return model.eval()
