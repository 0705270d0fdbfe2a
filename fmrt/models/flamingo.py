"""Flamingo: a frozen vision encoder, a Perceiver resampler and tanh-gated cross-attention dense
blocks inserted into a frozen decoder-only LM (open_flamingo layout).

    images B x T_img x 3 x S x S --vision_encoder (frozen CLIP ViT, forward_tokens)--> B*T_img x v x W
        --perceiver (PerceiverResampler)--> media B x T_img x num_latents x W
    text ids B x L with <image> / <|endofchunk|> tokens --lang_encoder (LlamaForCausalLM whose
        decoder layers are wrapped in FlamingoLayer)--> logits B x L x vocab

``FlamingoLayer`` (open_flamingo's name) holds ``gated_cross_attn_layer`` (a
``fmrt.kernels.gated_xattn.GatedCrossAttentionBlock``, only on every
``cross_attn_every_n_layers``-th layer, else None) and ``decoder_layer`` (the LM's own
``LlamaBlock``, untouched): ``x -> decoder_layer(gated_xattn(x, media))``. The LM file is not
forked: its ``layers`` ModuleList entries are replaced by these wrappers, whose ``forward`` has the
decoder layer's signature, so ``LlamaForCausalLM.forward`` (rotary, KV cache, padding masks,
``logits_to_keep``) runs unchanged. Gates start at 0 (``tanh(0) = 0``), so a fresh Flamingo
returns the frozen LM's logits bit for bit.

Media masking (Flamingo): a text token's image index is the number of ``<image>`` tokens up to and
including it; it attends to that image's latents only (``only_attend_immediate_media=True``) or to
images 1..index; tokens before the first ``<image>`` see no image and get exactly zero from the
cross-attention branch.

KV-cache decoding: the media stay fixed for the whole generation (encoded once); the number of
``<image>`` tokens already consumed per row is kept on the cache (``cache.media_count``) and
handed to the cross-attention as a prefix of ``media_count`` "seen" flags in front of the new
tokens (dummy zero rows, dropped afterwards), so a one-token decode step gets the same image index
as it would in a full recompute.

Trainable parameters: the resampler and the cross-attention blocks only (``trainable_names``);
the vision encoder and every LM parameter have ``requires_grad=False``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from fmrt.kernels.gated_xattn import GatedCrossAttentionBlock
from fmrt.models.config import ConfigMixin
from fmrt.models.llama import LlamaConfig, LlamaForCausalLM
from fmrt.models.perceiver import PerceiverResampler
from fmrt.models.vision_transformer import VisionTransformer

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"


def _shapes_vision() -> Dict[str, Any]:
    # the bundled shapes-clip vision tower (fmrt/weights/shapes-clip/config.json)
    return dict(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_ratio=4.0,
                output_dim=128, act="gelu")


def _shapes_lm() -> Dict[str, Any]:
    from fmrt.models.llama import LLAMA_CONFIGS, shapes_vocab_size

    return dict(LLAMA_CONFIGS["shapes-lm-tiny"], vocab_size=shapes_vocab_size())


@dataclass
class FlamingoConfig(ConfigMixin):
    vision: Dict[str, Any] = field(default_factory=_shapes_vision)   # VisionTransformer kwargs
    lm: Dict[str, Any] = field(default_factory=_shapes_lm)           # LlamaConfig dict
    media_token_id: int = 90          # id of <image> in the tokenizer
    eoc_token_id: int = 91            # id of <|endofchunk|>
    cross_attn_every_n_layers: int = 1
    vision_layer: Optional[int] = None  # None: final tokens after ln_post; int: that block's output
    perceiver_depth: int = 2
    perceiver_heads: int = 4
    perceiver_dim_head: int = 32
    perceiver_ff_mult: int = 2
    num_latents: int = 8
    max_num_media: Optional[int] = None
    xattn_heads: int = 4
    xattn_dim_head: int = 32
    xattn_ff_mult: int = 2
    only_attend_immediate_media: bool = True

    def __post_init__(self) -> None:
        if self.cross_attn_every_n_layers < 1:
            raise ValueError("cross_attn_every_n_layers must be >= 1")


class FlamingoLayer(nn.Module):
    """open_flamingo's wrapper: optional gated cross-attention, then the LM's decoder layer."""

    def __init__(self, gated_cross_attn_layer: Optional[GatedCrossAttentionBlock],
                 decoder_layer: nn.Module) -> None:
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self._media: Optional[torch.Tensor] = None
        self._locations: Optional[torch.Tensor] = None
        self._prefix = 0

    def condition(self, media: Optional[torch.Tensor], locations: Optional[torch.Tensor],
                  prefix: int = 0) -> None:
        """media ``B x T_img x n x W``; locations bool ``B x (prefix + L)`` (the first ``prefix``
        columns carry images consumed by earlier calls)."""
        self._media, self._locations, self._prefix = media, locations, prefix

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **kw) -> torch.Tensor:
        if self.gated_cross_attn_layer is not None and self._media is not None:
            p = self._prefix
            if p:
                # prefix rows only carry the image count into the cumulative index; their output
                # is dropped (a few rows of LayerNorm / attention per call)
                xe = torch.cat([x.new_zeros(x.shape[0], p, x.shape[2]), x], dim=1)
                x = self.gated_cross_attn_layer(xe, self._media.to(x.dtype), self._locations)[:, p:]
            else:
                x = self.gated_cross_attn_layer(x, self._media.to(x.dtype), self._locations)
        return self.decoder_layer.forward(x, cos, sin, **kw)


class Flamingo(nn.Module):
    """Frozen vision encoder -> Perceiver resampler -> gated cross-attention in a frozen LM.

    State dict: ``vision_encoder.*`` (CLIP ``VisionTransformer``), ``perceiver.*``
    (open_flamingo ``PerceiverResampler``), ``lang_encoder.embed_tokens / norm / layers.N.
    decoder_layer.* / layers.N.gated_cross_attn_layer.*``.
    """

    def __init__(self, config: FlamingoConfig, *, lm: Optional[LlamaForCausalLM] = None,
                 vision_encoder: Optional[VisionTransformer] = None) -> None:
        super().__init__()
        self.config = config
        self.vision_encoder = vision_encoder or VisionTransformer(**config.vision)
        self.lang_encoder = lm or LlamaForCausalLM(LlamaConfig.from_dict(config.lm))
        lm_cfg = self.lang_encoder.config
        if lm is not None:  # the config records the LM actually used
            config.lm = lm_cfg.to_dict()
        for tid, name in ((config.media_token_id, "media_token_id"),
                          (config.eoc_token_id, "eoc_token_id")):
            if not 0 <= tid < lm_cfg.vocab_size:
                raise ValueError(f"{name}={tid} outside the LM vocabulary ({lm_cfg.vocab_size})")
        width = self.vision_encoder.width
        self.perceiver = PerceiverResampler(
            dim=width, depth=config.perceiver_depth, dim_head=config.perceiver_dim_head,
            heads=config.perceiver_heads, num_latents=config.num_latents,
            max_num_media=config.max_num_media, ff_mult=config.perceiver_ff_mult)
        # freeze everything that came from pre-training before adding the new blocks
        self.vision_encoder.requires_grad_(False)
        self.lang_encoder.requires_grad_(False)
        n = config.cross_attn_every_n_layers
        wrapped = []
        for i, blk in enumerate(self.lang_encoder.layers):
            x = None
            if (i + 1) % n == 0:  # open_flamingo: layers n-1, 2n-1, ...
                x = GatedCrossAttentionBlock(
                    dim=lm_cfg.hidden_size, dim_visual=width, dim_head=config.xattn_dim_head,
                    heads=config.xattn_heads, ff_mult=config.xattn_ff_mult,
                    only_attend_immediate_media=config.only_attend_immediate_media)
            wrapped.append(FlamingoLayer(x, blk))
        self.lang_encoder.layers = nn.ModuleList(wrapped)

    # ------------------------------------------------------------------ parameters
    @property
    def media_token_id(self) -> int:
        return self.config.media_token_id

    @property
    def eoc_token_id(self) -> int:
        return self.config.eoc_token_id

    @property
    def xattn_layers(self) -> List[GatedCrossAttentionBlock]:
        return [l.gated_cross_attn_layer for l in self.lang_encoder.layers
                if l.gated_cross_attn_layer is not None]

    def trainable_names(self) -> List[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def lm_state_dict(self) -> Dict[str, torch.Tensor]:
        """The frozen LM's weights under ``LlamaForCausalLM``'s own names."""
        out = {}
        for k, v in self.lang_encoder.state_dict().items():
            if ".gated_cross_attn_layer." in k:
                continue
            out[k.replace(".decoder_layer.", ".")] = v
        return out

    def load_lm_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        """Load ``LlamaForCausalLM`` weights (its own names) into the wrapped LM."""
        mapped = {}
        for k, v in sd.items():
            parts = k.split(".")
            if parts[0] == "layers":
                k = ".".join(parts[:2] + ["decoder_layer"] + parts[2:])
            mapped[k] = v
        missing, unexpected = self.lang_encoder.load_state_dict(mapped, strict=False)
        missing = [m for m in missing if ".gated_cross_attn_layer." not in m]
        if missing or unexpected:
            raise ValueError(f"LM weights do not fit: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    # ------------------------------------------------------------------ vision
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``B x T_img x 3 x S x S`` -> media ``B x T_img x n_latents x W``."""
        if images.dim() != 5:
            raise ValueError(f"images must be B x T_img x 3 x S x S, got {tuple(images.shape)}")
        b, t = images.shape[:2]
        frozen = not any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            _, tokens = self.vision_encoder.forward_tokens(images.flatten(0, 1),
                                                           layer=self.config.vision_layer)
        tokens = tokens.reshape(b, t, tokens.shape[1], tokens.shape[2])
        return self.perceiver(tokens)

    # ------------------------------------------------------------------ language
    def _condition(self, input_ids: torch.Tensor, media: Optional[torch.Tensor],
                   cache) -> Optional[torch.Tensor]:
        """Set every layer's media; returns the per-row <image> counts of this call."""
        locs = input_ids == self.config.media_token_id
        if media is None:
            for layer in self.lang_encoder.layers:
                layer.condition(None, None)
            return None
        if media.dim() != 4 or media.shape[0] != input_ids.shape[0]:
            raise ValueError(f"media must be B={input_ids.shape[0]} x T_img x n x W, got "
                             f"{tuple(media.shape)}")
        prefix = 0
        if cache is not None:
            prior = getattr(cache, "media_count", None)
            if prior is None or cache.length == 0:
                prior = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
                cache.media_count = prior
            prefix = int(prior.max()) if prior.numel() else 0
            if prefix:
                seen = torch.arange(prefix, device=locs.device)[None, :] < prior[:, None]
                locs = torch.cat([seen, locs], dim=1)
        for layer in self.lang_encoder.layers:
            layer.condition(media, locs, prefix)
        return (input_ids == self.config.media_token_id).sum(1)

    def forward(self, input_ids: torch.Tensor, *, images: Optional[torch.Tensor] = None,
                media: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cache=None,
                logits_to_keep: int = 0, return_hidden: bool = False,
                backend: Optional[str] = None) -> torch.Tensor:
        """Logits ``B x L x vocab``.

        Args:
            input_ids: ``B x L`` long, with ``<image>`` tokens where images go.
            images: normalised ``B x T_img x 3 x S x S`` (encoded here), or
            media: already resampled ``B x T_img x n_latents x W`` (e.g. fixed during decoding).
                Neither: the plain LM.
            attention_mask / cache / logits_to_keep / return_hidden / backend: as
                ``LlamaForCausalLM.forward`` (``backend`` is the LM attention backend). With a
                cache, ``cache.media_count`` tracks the <image> tokens already consumed.
        """
        if images is not None and media is not None:
            raise ValueError("pass images or media, not both")
        if images is not None:
            media = self.encode_images(images)
        counts = self._condition(input_ids, media, cache)
        try:
            out = self.lang_encoder(input_ids, attention_mask=attention_mask, cache=cache,
                                    logits_to_keep=logits_to_keep, return_hidden=return_hidden,
                                    backend=backend)
        finally:
            for layer in self.lang_encoder.layers:
                layer.condition(None, None)
        if cache is not None and counts is not None:
            cache.media_count = cache.media_count + counts
        return out

    def new_cache(self, batch_size: int, max_len: int, **kw):
        cache = self.lang_encoder.new_cache(batch_size, max_len, **kw)
        cache.media_count = torch.zeros(batch_size, dtype=torch.long, device=cache.valid.device)
        return cache

    # ------------------------------------------------------------------ generation
    def generate(self, images: torch.Tensor, prompts, *, max_new_tokens: int = 16,
                 stop_token_ids: Optional[Sequence[int]] = None, **kw):
        """Greedy / sampled generation with the media fixed for every decode step.

        images: normalised ``B x T_img x 3 x S x S`` (rows with fewer images: pad with anything;
        a row never attends past its own <image> count). prompts: one id list (B = 1) or B of
        them (left-padded together). Stops at ``<|endofchunk|>`` and the LM's eos ids by
        default. Other keyword arguments: ``fmrt.models.generation.generate``.
        """
        from fmrt.models.generation import generate

        with torch.inference_mode():
            media = self.encode_images(images)
        bound = _MediaBound(self, media)
        if stop_token_ids is None:
            stop_token_ids = list(self.lang_encoder.config.eos_token_ids) + [self.eoc_token_id]
        return generate(bound, prompts, max_new_tokens=max_new_tokens,
                        stop_token_ids=stop_token_ids, **kw)


class _MediaBound:
    """A Flamingo with its media fixed, shaped like a decoder-only LM for
    ``fmrt.models.generation`` (config, parameters, new_cache, __call__)."""

    def __init__(self, model: Flamingo, media: torch.Tensor) -> None:
        self.model, self.media = model, media
        self.config = model.lang_encoder.config

    def parameters(self):
        return self.model.parameters()

    def new_cache(self, batch_size: int, max_len: int, **kw):
        if batch_size != self.media.shape[0]:
            raise ValueError(f"{batch_size} prompts for {self.media.shape[0]} rows of images")
        return self.model.new_cache(batch_size, max_len, **kw)

    def __call__(self, input_ids=None, *, inputs_embeds=None, **kw):
        if inputs_embeds is not None:
            raise ValueError("Flamingo generation takes token ids (its <image> tokens place the "
                             "media), not inputs_embeds")
        return self.model(input_ids, media=self.media, **kw)


def pad_image_lists(image_lists: Sequence[Sequence[np.ndarray]], preprocess) -> torch.Tensor:
    """Per-row lists of uint8 ``H x W x 3`` images (any sizes, any counts >= 1) ->
    ``B x T_max x 3 x S x S`` normalised; missing images are zeros (never attended)."""
    from fmrt.preprocess import preprocess_images

    if not image_lists or any(len(r) == 0 for r in image_lists):
        raise ValueError("every row needs at least one image")
    t = max(len(r) for r in image_lists)
    rows = []
    for r in image_lists:
        x = preprocess_images(list(r), preprocess)
        if x.shape[0] < t:
            x = torch.cat([x, x.new_zeros((t - x.shape[0],) + tuple(x.shape[1:]))])
        rows.append(x)
    return torch.stack(rows)


def build_flamingo(config: Union[FlamingoConfig, Dict[str, Any]]) -> Flamingo:
    if isinstance(config, dict):
        config = FlamingoConfig.from_dict(config)
    return Flamingo(config)


# ----------------------------------------------------------------------------- registry
from fmrt.pretrained import register_family_builder  # noqa: E402
from fmrt.registry import register_model  # noqa: E402


@register_model("shapes-flamingo-tiny", family="flamingo",
                description="Flamingo on the shapes-clip vision tower and shapes-lm-tiny")
def _shapes_flamingo_tiny(**overrides):
    return build_flamingo(FlamingoConfig.from_dict(overrides))


@register_family_builder("flamingo")
def _build_from_dict(config: dict) -> Flamingo:
    return build_flamingo(config)
