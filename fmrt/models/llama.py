"""Decoder-only language model of the LLaMA family.

Pre-norm blocks: ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``; rotary position
embeddings (Hugging Face's "rotate half" layout, ``rope_theta`` base, optional ``linear`` /
``llama3`` frequency scaling); grouped-query attention (``num_kv_heads`` divides ``num_heads``);
optionally tied input/output embeddings. Numerically the same model as
``transformers.LlamaForCausalLM`` (see ``fmrt.models.llama_checkpoint`` for loading its weights).

CPU-oriented choices (decode at batch 1 is dominated by per-op overhead, not FLOPs):
  * q/k/v are one ``Linear`` (``attn.qkv``) and gate/up one ``Linear`` (``mlp.gate_up``): 4 GEMMs
    per layer instead of 7.
  * rotary cos/sin tables are precomputed up to ``max_position_embeddings`` (grown on demand);
    while all rows share positions, a step slices them instead of gathering.
  * the KV cache is static (``fmrt.models.kv_cache.KVCache``); a one-token decode step folds the
    query heads of each KV group into the query-length axis (``B x n_kv x G x Dh`` against
    ``B x n_kv x L x Dh``), so grouped-query attention needs no ``repeat_kv`` copy of the cache.
  * ``logits_to_keep=1`` runs the vocabulary projection on the last position only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.attention import attention
from fmrt.models.config import ConfigMixin
from fmrt.models.kv_cache import KVCache

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig(ConfigMixin):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None   # None = num_heads (plain multi-head attention)
    head_dim: Optional[int] = None       # None = hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None or {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, List[int], None] = 2
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}; give head_dim explicitly")
        if self.dim_head % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.dim_head}")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of "
                             f"{sorted(_ACTS)}")
        rope_type = (self.rope_scaling or {}).get("rope_type",
                                                  (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {rope_type!r} (rope_scaling="
                             f"{self.rope_scaling}); supported: {ROPE_TYPES}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def eos_token_ids(self) -> List[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


_ACTS = {"silu": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 for lower-precision inputs
    (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies ``head_dim / 2`` (float32), Hugging Face's formulas incl. scaling."""
    dim = config.dim_head
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables ``max_pos x head_dim`` (float32 math, cast to the model dtype;
    the same ``position * inv_freq`` products Hugging Face computes per call)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._build(config.max_position_embeddings)

    def _build(self, n: int, dtype: Optional[torch.dtype] = None) -> None:
        t = torch.arange(n, dtype=torch.int64, device=self.inv_freq.device).float()
        freqs = t[:, None] * self.inv_freq[None, :].float()
        emb = torch.cat([freqs, freqs], dim=-1)
        dtype = dtype or getattr(self, "cos", emb).dtype
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def tables(self, positions: Union[int, torch.Tensor], n: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin broadcastable to ``B x H x n x Dh``: ``1 x 1 x n x Dh`` for a shared int
        offset (a view), ``B x 1 x n x Dh`` for per-row ``B x n`` positions."""
        if isinstance(positions, int):
            need = positions + n
        else:
            need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]))  # amortised growth past the table
        if isinstance(positions, int):
            return (self.cos[positions:positions + n][None, None],
                    self.sin[positions:positions + n][None, None])
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x``: ``B x H x n x Dh``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, rot, sin)


# Rows (batch x tokens) up to which a linear with int8 decode weights takes the int8 path; the
# int8 GEMV kernel reads 4x fewer weight bytes than float32 (a 512 x 32000 head: 3.4 ms vs 10-14 ms
# at 1 thread), larger inputs (prefill) are compute-bound and keep the float32 weights.
INT8_MAX_ROWS = 16


def _linear(x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
    q8 = mod.__dict__.get("_int8")
    if q8 is not None and x.numel() // x.shape[-1] <= INT8_MAX_ROWS:
        q, scale = q8
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(scale.dtype), q, scale)
        y = y.to(x.dtype).view(*x.shape[:-1], q.shape[0])
        return y if mod.bias is None else y + mod.bias
    return F.linear(x, mod.weight, mod.bias)


def quantize_weight_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``(q N x K int8, scale N bfloat16)``, ``w ~= q * scale``."""
    scale = (w.detach().float().abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.dim_head
        self.groups = self.heads // self.kv_heads
        self.qkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                             bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size,
                                bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[KVCache] = None, layer: int = 0, start: int = 0,
                key_mask: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        """x: ``B x n x C``; key_mask: ``B x (start + n)`` bool valid keys (None = all);
        mask: ``B x n x n`` bool (True = attend), replaces the causal / key mask (no cache)."""
        b, n, _ = x.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        qkv = _linear(x, self.qkv)
        qkv = qkv.view(b, n, h + 2 * hk, d).transpose(1, 2)  # B x (H+2Hk) x n x Dh
        # rotate q and k heads together: 4 ops per layer instead of 8 (op overhead, not FLOPs,
        # is what a batch-1 decode step spends its time on)
        q, k = apply_rotary(qkv[:, :h + hk], cos, sin).split([h, hk], dim=1)
        v = qkv[:, h + hk:]
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        lk = k.shape[2]
        if n == 1:
            # Decode: the G query heads sharing a KV head become G "query positions" of that
            # head (query head i uses KV head i // G, HF's repeat_kv order). One query sees every
            # cached key, so no causal mask; padding only needs the per-row key mask.
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = attention(q.reshape(b, hk, h // hk, d), k, v, attn_mask=mask, backend=backend)
            return _linear(out.reshape(b, 1, h * d), self.o_proj)
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        if mask is not None:
            out = attention(q, k, v, attn_mask=mask[:, None], backend=backend)
        elif key_mask is None:
            out = attention(q, k, v, is_causal=True, backend=backend)
        else:
            # causal (bottom-right: new token t sits at slot lk - n + t) & valid keys; a padding
            # query would see no key at all (NaN softmax, and NaN values leak through 0 * NaN),
            # so every query also sees its own slot.
            qi = torch.arange(lk - n, lk, device=x.device)[:, None]
            kj = torch.arange(lk, device=x.device)[None, :]
            mask = ((kj <= qi)[None] & key_mask[:, None, :]) | (kj == qi)[None]
            out = attention(q, k, v, attn_mask=mask[:, None], backend=backend)
        return _linear(out.transpose(1, 2).reshape(b, n, h * d), self.o_proj)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.inter = config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * self.inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.inter, config.hidden_size, bias=config.mlp_bias)
        self.act = _ACTS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on the parameters skips nn.Module.__call__ (hooks machinery, ~10% of a tiny
        # model's decode step)
        gate, up = _linear(x, self.gate_up).split(self.inter, dim=-1)
        return _linear(self.act(gate).mul_(up), self.down_proj)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **kw) -> torch.Tensor:
        x = x + self.attn.forward(self.input_layernorm.forward(x), cos, sin, **kw)
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class LlamaForCausalLM(nn.Module):
    """Token ids (or embeddings) -> next-token logits, with an optional static KV cache.

    State dict: ``embed_tokens.weight``, ``layers.N.{input_layernorm, attn.qkv, attn.o_proj,
    post_attention_layernorm, mlp.gate_up, mlp.down_proj}``, ``norm.weight`` and ``lm_head.weight``
    (absent when ``tie_word_embeddings``; the head then reuses ``embed_tokens.weight``).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaBlock(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Hugging Face's LLaMA init: normal(0, 0.02) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def resize_token_embeddings(self, vocab_size: int, std: float = 0.02) -> None:
        """Grow the vocabulary to ``vocab_size`` (e.g. for added tokens): existing rows are
        kept, new rows drawn from normal(0, ``std``) (the init scale); ``config.vocab_size``
        follows. Shrinking is refused (ids in use would dangle)."""
        old = self.embed_tokens.weight
        n, d = old.shape
        if vocab_size < n:
            raise ValueError(f"cannot shrink the vocabulary from {n} to {vocab_size}")
        if vocab_size == n:
            return

        def grown(w: torch.Tensor) -> torch.Tensor:
            new = torch.empty(vocab_size, d, dtype=w.dtype, device=w.device)
            nn.init.normal_(new, std=std)
            new[:n] = w.detach()
            return new

        self.embed_tokens = nn.Embedding(vocab_size, d, _weight=grown(old),
                                         device=old.device, dtype=old.dtype)
        if self.lm_head is not None:
            head = nn.Linear(d, vocab_size, bias=False, device=old.device, dtype=old.dtype)
            with torch.no_grad():
                head.weight.copy_(grown(self.lm_head.weight))
            self.lm_head = head
        self.__dict__.pop("_tied_head_ref", None)   # int8 decode copies refer to the old table
        self.config.vocab_size = vocab_size

    def enable_int8_decode(self, enable: bool = True) -> "LlamaForCausalLM":
        """Opt-in weight-only int8 for small inputs (decode steps, <= ``INT8_MAX_ROWS`` rows):
        every projection and the vocabulary head keep a per-row int8 copy of their weights
        (+25% memory) used with bfloat16 activations; prefill stays float32. Changes numerics
        (logits within ~1e-2 of float32 for random weights), so it is off by default and
        parity tests run without it. Needs ``torch.ops.aten._weight_int8pack_mm`` (CPU)."""
        mods = [m for blk in self.layers for m in (blk.attn.qkv, blk.attn.o_proj,
                                                   blk.mlp.gate_up, blk.mlp.down_proj)]
        head = self.lm_head
        if head is None:  # tied: an unregistered Linear sharing the embedding (not in state_dict)
            head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
            head.weight = self.embed_tokens.weight
            self.__dict__["_tied_head_ref"] = head
        mods.append(head)
        for m in mods:
            # the CPU kernel crashes for in_features that are not a multiple of 16 (e.g. 200,
            # torch 2.13): such layers keep their float32 weights
            if enable and m.in_features % 16 == 0:
                m.__dict__["_int8"] = quantize_weight_int8(m.weight)
            else:
                m.__dict__.pop("_int8", None)
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def new_cache(self, batch_size: int, max_len: int, **kw) -> KVCache:
        return KVCache.for_model(self, batch_size, max_len, **kw)

    def forward(self, input_ids: Optional[torch.Tensor] = None, *,
                inputs_embeds: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, logits_to_keep: int = 0,
                return_hidden: bool = False, backend: Optional[str] = None) -> torch.Tensor:
        """Logits ``B x n x vocab`` (float, the model dtype).

        Args:
            input_ids: ``B x n`` long; or ``inputs_embeds``: ``B x n x hidden`` (e.g. text
                embeddings with image features spliced in).
            attention_mask: ``B x n``, 1 for real tokens, 0 for (left) padding. Positions then
                count real tokens only (``cumsum(mask) - 1``, what Hugging Face's ``generate``
                uses), unless ``position_ids`` is given.
            position_ids: ``B x n`` explicit rotary positions (without a cache only).
            segment_ids: ``B x n`` long, training only (no cache, no attention_mask): several
                independent continuations of one shared prefix packed in a row. Segment 0 is
                the prefix; a token of segment s > 0 attends causally to segment 0 and to
                earlier tokens of segment s only (negative ids: padding, which sees the prefix
                and earlier padding). Pair it with ``position_ids`` restarting each segment
                where the prefix ends, and every segment is scored exactly as if it alone
                followed the prefix (``fmrt.data.vlm_data.encode_independent_turns``).
            cache: a ``KVCache``; the ``n`` tokens are appended after the cached ones.
            logits_to_keep: >0 computes logits for the last that many positions only.
            return_hidden: return the final normed hidden states ``B x n x hidden`` instead.
            backend: attention backend (``fmrt.models.attention``), None = global default.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        if n == 0:
            raise ValueError("forward needs at least one token")
        if cache is not None:
            if position_ids is not None:
                raise ValueError("position_ids cannot be combined with a cache (positions are "
                                 "tracked per row by the cache)")
            if cache.batch_size != b:
                raise ValueError(f"cache batch {cache.batch_size} != input batch {b}")
            start, positions, key_mask = cache.reserve(n, attention_mask)
        else:
            start, key_mask = 0, None
            positions: Union[int, torch.Tensor] = 0
            if attention_mask is not None:
                m = attention_mask.to(device=x.device, dtype=torch.bool)
                if not bool(m.all()):
                    key_mask = m
                    positions = (m.long().cumsum(1) - 1).clamp_min_(0)
            if position_ids is not None:
                positions = position_ids.to(device=x.device, dtype=torch.long)
        seg_mask = None
        if segment_ids is not None:
            if cache is not None or key_mask is not None:
                raise ValueError("segment_ids cannot be combined with a cache or padding mask")
            seg = segment_ids.to(device=x.device, dtype=torch.long)
            if seg.shape != (b, n):
                raise ValueError(f"segment_ids shape {tuple(seg.shape)} != {(b, n)}")
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            seg_mask = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
        cos, sin = self.rotary.tables(positions, n)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, blk in enumerate(self.layers):
            x = blk.forward(x, cos, sin, cache=cache, layer=i, start=start, key_mask=key_mask,
                            mask=seg_mask, backend=backend)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        if return_hidden:
            return x
        head = self.lm_head if self.lm_head is not None else self.__dict__.get("_tied_head_ref")
        if head is not None and "_int8" in head.__dict__:
            return _linear(x, head)
        return F.linear(x, self.output_weight)


def build_llama(config: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- registry
from fmrt.pretrained import register_family_builder  # noqa: E402
from fmrt.registry import register_model  # noqa: E402


def shapes_vocab_size() -> int:
    """Size of the ShapesWorld word tokenizer (specials + digits + words: 86) plus at least 16
    free ids (added tokens such as an image placeholder), rounded up to a multiple of 32: 128."""
    from fmrt.data.vocab import vocabulary
    from fmrt.models.tokenizer import WORD_SPECIALS

    n = len(set(list(WORD_SPECIALS) + [str(d) for d in range(10)] + vocabulary()))
    return -(-(n + 16) // 32) * 32


LLAMA_CONFIGS: Dict[str, Dict[str, Any]] = {
    # Language model of the ShapesWorld VLMs: 4 layers, GQA 4/2, tied embeddings; special ids
    # of the ShapesWorld word tokenizer (<pad> 0, <sot> 1, <eot> 2).
    "shapes-lm-tiny": dict(hidden_size=160, intermediate_size=432, num_layers=4, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Benchmark size (hidden 512, 8 layers, 32k vocabulary, ~40M parameters).
    "llama-bench-40m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                            num_layers=8, num_heads=8, num_kv_heads=4,
                            max_position_embeddings=2048),
}


def _register(name: str) -> None:
    @register_model(name, family="llama", description=f"LLaMA-style decoder {name}")
    def _factory(**overrides):
        cfg = dict(LLAMA_CONFIGS[name])
        if "vocab_size" not in cfg and "vocab_size" not in overrides:
            cfg["vocab_size"] = shapes_vocab_size()
        return build_llama(LlamaConfig.from_dict({**cfg, **overrides}))


for _name in LLAMA_CONFIGS:
    _register(_name)


@register_family_builder("llama")
def _build_from_dict(config: dict) -> LlamaForCausalLM:
    return build_llama(LlamaConfig.from_dict(config))
