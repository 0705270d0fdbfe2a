"""Small layers shared by SAM's components (same parameter names as segment-anything)."""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

_WORKSPACES = threading.local()


def workspace(key: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A reusable ``shape`` buffer (``like``'s dtype and device), one per ``key`` and thread,
    for inference-only intermediates that die inside one call (the AMG mask head's 4 MB GELU
    input on shapes-sam). Why: a fresh multi-MB tensor is a fresh mmap, and first-touch page
    faults made the mask head's bias copy + GELU cost ~3.7 ms per 16-prompt chunk inside the
    generator against ~1.1 ms on warm memory. The caller must be done with the buffer before
    the next call with the same key on the same thread."""
    n = 1
    for d in shape:
        n *= int(d)
    cache = getattr(_WORKSPACES, "bufs", None)
    if cache is None:
        cache = _WORKSPACES.bufs = {}
    # a buffer made under torch.inference_mode is an inference tensor, which may not be written
    # outside inference mode (and a normal one is fine inside it): one buffer per mode
    k = (key, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = cache.get(k)
    if buf is None or buf.numel() < n:
        buf = cache[k] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(*shape)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``B x C x H x W`` tensor (ConvNeXt style).

    segment-anything computes it by hand (mean, biased variance, ``eps=1e-6``); this does the same
    arithmetic so the official weights reproduce the official outputs to float32 rounding.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``; ``act`` is ``"gelu"`` (image encoder) or ``"relu"`` (two-way
    transformer)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: str = "gelu") -> None:
        super().__init__()
        if act not in ("gelu", "relu"):
            raise ValueError(f"unknown activation {act!r}; expected 'gelu' or 'relu'")
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's hypernetwork MLPs and IoU
    head; parameters ``layers.{i}.weight/bias`` as in segment-anything)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
