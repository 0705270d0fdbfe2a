"""Preallocated (static) key/value cache for decoder-only LMs.

Layout: per layer ``k``/``v`` tensors of ``B x n_kv_heads x max_len x head_dim``, allocated once.
Every row of a batch writes its ``t``-th token of a forward call to the same *slot*
(``length + t``), so one in-place ``copy_`` per layer and step writes the whole batch and the
keys seen by a step are the view ``k[:, :, :length]`` (no ``torch.cat``, no per-step growth).

Prompts of different lengths are left-padded: padding slots are marked invalid in ``valid``
(``B x max_len`` bool) and masked out of attention; ``next_pos`` (``B``) holds each row's
number of real tokens so far, which is the rotary position of its next token (Hugging Face's
``cumsum(attention_mask) - 1`` convention, so a padded row gets the same positions as the same
prompt alone). While no slot was ever padding (batch 1, or equal lengths) attention runs without
a mask and positions are the shared slot index, the fast path of batch-1 decoding.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch


class KVCache:
    """Static KV cache. ``k[l]``, ``v[l]``: ``B x n_kv_heads x max_len x head_dim``."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device, None] = None) -> None:
        if min(num_layers, batch_size, num_kv_heads, max_len, head_dim) < 1:
            raise ValueError("KVCache sizes must be positive, got layers=%d batch=%d kv_heads=%d "
                             "max_len=%d head_dim=%d" % (num_layers, batch_size, num_kv_heads,
                                                         max_len, head_dim))
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device)
                                      for _ in range(num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device)
                                      for _ in range(num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0          # slots used (shared by every row)
        self.has_padding = False  # any invalid slot below ``length``
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, *, dtype: Optional[torch.dtype] = None,
                  device=None) -> "KVCache":
        """A cache shaped for ``model`` (anything with ``config.num_layers``, ``num_kv_heads``,
        ``head_dim``), in the dtype/device of its parameters unless given."""
        c = model.config
        p = next(model.parameters())
        return cls(c.num_layers, batch_size, c.kv_heads, max_len, c.dim_head,
                   dtype=dtype or p.dtype, device=device or p.device)

    @property
    def lengths(self) -> torch.Tensor:
        """``B`` real tokens held per row (padding excluded)."""
        return self.next_pos

    def reset(self) -> None:
        """Forget every token (the buffers are kept and overwritten by the next writes)."""
        self.valid.zero_()
        self.next_pos.zero_()
        self.length = 0
        self.has_padding = False

    def reserve(self, n: int, attention_mask: Optional[torch.Tensor] = None
                ) -> Tuple[int, Union[int, torch.Tensor], Optional[torch.Tensor]]:
        """Claim the next ``n`` slots for a forward call of ``n`` tokens per row.

        Args:
            attention_mask: ``B x n`` (1/True = real token, 0 = left padding) or None (all real).
        Returns:
            ``(start, positions, key_mask)``: the first slot; the rotary positions (an int offset
            shared by every row on the fast path, else ``B x n`` long); and the ``B x
            (start + n)`` bool mask of valid key slots (None while there is no padding).
        """
        start = self.length
        if n < 1:
            raise ValueError("reserve needs at least one token")
        if start + n > self.max_len:
            raise ValueError(f"KV cache full: {start} + {n} tokens > max_len {self.max_len}")
        end = start + n
        if attention_mask is not None:
            m = attention_mask.to(device=self.valid.device, dtype=torch.bool)
            if m.shape != (self.batch_size, n):
                raise ValueError(f"attention_mask must be {self.batch_size} x {n}, got "
                                 f"{tuple(m.shape)}")
            if not bool(m.all()):
                self.has_padding = True
        else:
            m = None
        if not self.has_padding:
            self.valid[:, start:end] = True
            self.next_pos += n
            self.length = end
            return start, start, None
        if m is None:
            m = torch.ones(self.batch_size, n, dtype=torch.bool, device=self.valid.device)
        self.valid[:, start:end] = m
        # position of each token = real tokens before it in its row; padding gets position 0
        # (it is never attended to, the value only has to index the rotary table).
        pos = self.next_pos[:, None] + m.long().cumsum(1) - 1
        pos = pos.clamp_min_(0)
        self.next_pos += m.long().sum(1)
        self.length = end
        return start, pos, self.valid[:, :end]

    def keys_values(self, layer: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views ``B x n_kv_heads x end x head_dim`` of the first ``end`` slots of a layer."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copy ``k``/``v`` (``B x n_kv_heads x n x head_dim``) into slots ``start..start+n`` in
        place; returns the views of all slots up to ``start + n``."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end].copy_(k)
        self.v[layer][:, :, start:end].copy_(v)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
