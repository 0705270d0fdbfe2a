"""CLIP's ViT image tower (OpenAI layout): patchify conv -> [CLS] + patches + pos -> ln_pre ->
pre-LN transformer -> ln_post on the class token -> linear projection."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from fmrt.models.transformer import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, mlp_ratio: float = 4.0, act: str = "quick_gelu") -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.output_dim = output_dim
        self.grid_size = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                                       act=act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images Bx3x{self.image_size}x{self.image_size}, "
                             f"got {tuple(x.shape)}")
        x = self.conv1(x.to(self.conv1.weight.dtype))          # B x W x g x g
        x = x.flatten(2).transpose(1, 2)                        # B x g*g x W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward_tokens(self, x: torch.Tensor, *, layer: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token features for decoders (CoCa) and VLM projectors (LLaVA).

        Args:
            x: normalised images ``B x 3 x S x S`` float.
            layer: None for the final block's output after ``ln_post``; an int selects the output
                of that block (``-2`` is LLaVA's penultimate layer), without ``ln_post``.
        Returns:
            (pooled ``B x W`` class token after ln_post, tokens ``B x (1 + g*g) x W``).
        """
        x = self._embed(x)
        if layer is None:
            x = self.transformer(x)
            x = self.ln_post(x)
            return x[:, 0], x
        _, hidden = self.transformer(x, return_hidden=True)
        tokens = hidden[layer]
        return self.ln_post(hidden[-1][:, 0]), tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised images ``B x 3 x S x S`` (float). Returns embeddings ``B x output_dim``."""
        x = self._embed(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj
