"""CLIP's causal text tower (OpenAI layout): token + positional embeddings -> causal pre-LN
transformer -> ln_final -> features at the end-of-text token -> linear projection."""
from __future__ import annotations

import torch
import torch.nn as nn

from fmrt.models.transformer import LayerNorm, Transformer


class TextTransformer(nn.Module):
    def __init__(self, *, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 output_dim: int, eot_token_id: int, mlp_ratio: float = 4.0,
                 act: str = "quick_gelu") -> None:
        super().__init__()
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.output_dim = output_dim
        self.eot_token_id = eot_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                                       act=act)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def eot_positions(self, text: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token per row (OpenAI's argmax trick generalised to any
        vocabulary where eot is not the largest id). Rows without eot pool the last position."""
        is_eot = text == self.eot_token_id
        pos = is_eot.int().argmax(dim=-1)
        return torch.where(is_eot.any(dim=-1), pos, torch.full_like(pos, text.shape[-1] - 1))

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """text: ``B x L`` int64 token ids (L <= context_length). Returns ``B x L x W`` after
        ln_final."""
        if text.ndim != 2 or text.shape[1] > self.context_length:
            raise ValueError(f"expected token ids BxL with L <= {self.context_length}, "
                             f"got {tuple(text.shape)}")
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.transformer(x, is_causal=True)
        return self.ln_final(x)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """text: ``B x L`` int64 token ids. Returns embeddings ``B x output_dim``."""
        x = self.forward_tokens(text)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(text)]
        return pooled @ self.text_projection
