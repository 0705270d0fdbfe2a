"""LLaVA: a CLIP vision tower, a projector and a LLaMA-family LM.

``pixel_values B x 3 x S x S`` -> CLIP ViT -> hidden states of ``vision_feature_layer`` (-2, the
penultimate block's output, no ``ln_post``) -> drop the class token (``"default"`` strategy;
``"full"`` keeps it) -> projector (``linear``, or LLaVA-1.5's ``mlp2x_gelu``: Linear-GELU-Linear)
-> one LM embedding per patch. The prompt holds one ``image_token_id`` per patch (as Hugging
Face's processor expands ``<image>``); those positions' text embeddings are replaced, in order,
by the image features (``masked_scatter``, several images per batch row allowed), and the LM runs
on the spliced embeddings.

Numerically the same model as ``transformers.LlavaForConditionalGeneration`` (with a CLIP vision
tower and a LLaMA text model); ``load_llava_checkpoint`` reads its directories, whatever key
layout the transformers version saved:
  * ``language_model.model.*`` / ``language_model.lm_head.weight`` / ``vision_tower.*`` /
    ``multi_modal_projector.*`` (what transformers 4.4x and 5.x ``save_pretrained`` write),
  * ``model.language_model.*`` / ``lm_head.weight`` / ``model.vision_tower.*`` /
    ``model.multi_modal_projector.*`` (transformers 4.5x),
  with or without ``vision_model.`` inside the vision tower.

fmrt extension: ``LlavaConfig.image_pos_embed = "learned"`` adds a trainable
``image_seq_length x hidden`` position embedding (state-dict key ``image_pos_embed``) to the
projected features inside ``image_features`` (so exports of ``image_features`` include it); the
default ``"none"`` is exactly Hugging Face's LLaVA. Likewise ``image_feature_norm = "rms"``
(state-dict key ``image_norm.weight``) normalises the projected features to about text scale.

fmrt's own state dict: ``vision_tower.*`` (``VisionTransformer`` minus ``proj``/``ln_post``
usage), ``projector.{linear_1,linear_2}.*``, ``language_model.*`` (``LlamaForCausalLM``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.clip import CLIPVisionConfig
from fmrt.models.config import ConfigMixin
from fmrt.models.llama import LlamaConfig, LlamaForCausalLM
from fmrt.models.vision_transformer import VisionTransformer

PROJECTORS = ("linear", "mlp2x_gelu")
SELECT_STRATEGIES = ("default", "full")
IMAGE_POS_EMBEDS = ("none", "learned")
IMAGE_FEATURE_NORMS = ("none", "rms")
_PROJ_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
              "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "relu": F.relu,
              "silu": F.silu}


class LlavaCheckpointError(ValueError):
    """A LLaVA checkpoint that cannot be read or does not match its config."""


@dataclass
class LlavaConfig(ConfigMixin):
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    vision_act: str = "quick_gelu"          # the CLIP tower's activation (fmrt names)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    projector: str = "mlp2x_gelu"           # linear | mlp2x_gelu
    projector_act: str = "gelu"
    projector_bias: bool = True
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    # fmrt extension (not in Hugging Face's LLaVA): "learned" adds a trainable position embedding
    # (image_seq_length x LM hidden) to the projected image features, so each image token says
    # which patch it is without relying on the tower keeping CLIP's input position embedding
    # through its blocks. "none" (default) is exactly HF LLaVA.
    image_pos_embed: str = "none"
    # fmrt extension: "rms" puts an RMSNorm (learned gain, initialised to image_norm_init) on
    # the projector output, before the optional position embedding, so image tokens enter the
    # LM residual stream at about text-embedding scale (trained shapes-llava text embeddings
    # have norm ~1.2; without it the projected features grew from norm ~1 to ~56 in stage 2).
    # "none" (default) is exactly HF LLaVA.
    image_feature_norm: str = "none"
    image_norm_init: float = 0.1   # per-channel gain: output norm ~0.1*sqrt(hidden) (1.26 at 160)

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; expected one of {PROJECTORS}")
        if self.projector_act not in _PROJ_ACTS:
            raise ValueError(f"unsupported projector activation {self.projector_act!r}")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of "
                             f"{SELECT_STRATEGIES}, got {self.vision_feature_select_strategy!r}")
        if self.image_pos_embed not in IMAGE_POS_EMBEDS:
            raise ValueError(f"image_pos_embed must be one of {IMAGE_POS_EMBEDS}, got "
                             f"{self.image_pos_embed!r}")
        if self.image_feature_norm not in IMAGE_FEATURE_NORMS:
            raise ValueError(f"image_feature_norm must be one of {IMAGE_FEATURE_NORMS}, got "
                             f"{self.image_feature_norm!r}")
        n = self.vision.layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} outside the "
                             f"{n + 1} hidden states of a {n}-layer tower")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside the LM vocabulary "
                             f"({self.text.vocab_size})")

    @property
    def grid(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def image_seq_length(self) -> int:
        """Image placeholder tokens (= LM positions) per image."""
        return self.grid ** 2 + (1 if self.vision_feature_select_strategy == "full" else 0)


class LlavaProjector(nn.Module):
    """``linear_1`` (vision width -> LM width) [-> act -> ``linear_2`` (LM -> LM)]."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        vw, tw = config.vision.width, config.text.hidden_size
        self.linear_1 = nn.Linear(vw, tw, bias=config.projector_bias)
        self.mlp = config.projector == "mlp2x_gelu"
        if self.mlp:
            self.linear_2 = nn.Linear(tw, tw, bias=config.projector_bias)
            self.act = _PROJ_ACTS[config.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return self.linear_2(self.act(x)) if self.mlp else x


class LlavaForConditionalGeneration(nn.Module):
    """Images + token ids (with image placeholders) -> next-token logits.

    ``forward(input_ids, pixel_values=None, attention_mask=None, cache=None, logits_to_keep=0)``;
    ``embed(input_ids, pixel_values)`` gives the spliced ``inputs_embeds`` alone (for
    ``fmrt.models.generation`` on ``language_model``); ``generate(...)`` wraps that.
    """

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        v = config.vision
        self.vision_tower = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size,
                                              width=v.width, layers=v.layers, heads=v.heads,
                                              output_dim=1, mlp_ratio=v.mlp_ratio,
                                              act=config.vision_act)
        # LLaVA reads a hidden state before ln_post and never uses the CLIP projection; the
        # blocks after the feature layer never run (see image_features).
        del self.vision_tower.proj
        self.projector = LlavaProjector(config)
        if config.image_pos_embed == "learned":
            self.add_image_pos_embed()
        if config.image_feature_norm == "rms":
            self.add_image_feature_norm()
        self.language_model = LlamaForCausalLM(config.text)

    def add_image_pos_embed(self, std: float = 0.02) -> None:
        """Create the learned image position embedding (``image_pos_embed="learned"``; also
        for continuing a model trained without one, with ``std=0``: zeros, so the outputs are
        unchanged). Default std 0.02: the LM's embedding init scale (fmrt.models.llama)."""
        c = self.config
        c.image_pos_embed = "learned"
        self.image_pos_embed = nn.Parameter(
            std * torch.randn(c.image_seq_length, c.text.hidden_size))

    def add_image_feature_norm(self) -> None:
        """Create the RMSNorm on the projected image features (``image_feature_norm="rms"``),
        gain ``image_norm_init``."""
        from fmrt.models.llama import RMSNorm

        c = self.config
        c.image_feature_norm = "rms"
        self.image_norm = RMSNorm(c.text.hidden_size, eps=c.text.rms_norm_eps)
        with torch.no_grad():
            self.image_norm.weight.fill_(c.image_norm_init)

    # -- image side -----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def vision_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected hidden state of the vision tower ``B x (1 + g*g) x W`` (class token
        first). Runs only the blocks up to ``vision_feature_layer`` (-2 skips the last one)."""
        vt = self.vision_tower
        n = len(vt.transformer.resblocks)
        upto = self.config.vision_feature_layer % (n + 1)  # hidden[i] = output of i blocks
        x = vt._embed(pixel_values)
        for blk in vt.transformer.resblocks[:upto]:
            x = blk(x)
        return x

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features ``B x image_seq_length x hidden`` (LM embedding space)."""
        return self.project_hidden(self.vision_hidden(pixel_values))

    def project_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``vision_hidden`` output ``B x (1 + g*g) x W`` -> projected features
        ``B x image_seq_length x hidden`` (token selection, projector, optional RMSNorm,
        optional position embedding); ``image_features`` = ``project_hidden(vision_hidden(pixel_values))``."""
        h = hidden
        if self.config.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        f = self.projector(h.to(self.projector.linear_1.weight.dtype))
        if self.config.image_feature_norm == "rms":
            f = self.image_norm(f)
        if self.config.image_pos_embed == "learned":
            f = f + self.image_pos_embed.to(f.dtype)
        return f

    # -- text side ------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings ``B x n x hidden`` with the image placeholders (``image_token_id``,
        ``image_seq_length`` per image, images in row-major order over the batch) replaced by
        the features of ``pixel_values`` (``I x 3 x S x S``) or precomputed ``image_features``
        (``I x image_seq_length x hidden``). Raises ValueError when the counts disagree."""
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is None and image_features is None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            return x
        feats = image_features if image_features is not None else self.image_features(pixel_values)
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(mask.sum())} image tokens in input_ids but {feats.shape[0]} "
                             f"image(s) x {feats.shape[1]} features")
        return x.masked_scatter(mask[..., None], feats.to(x.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, *,
                attention_mask: Optional[torch.Tensor] = None, cache=None,
                logits_to_keep: int = 0, image_features: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        """Logits ``B x n x vocab``. ``input_ids``: ``B x n`` with ``image_seq_length``
        placeholders per image; ``pixel_values``: ``I x 3 x S x S`` normalised images;
        ``position_ids`` / ``segment_ids``: packed independent turns (training; see
        ``LlamaForCausalLM.forward``)."""
        x = self.embed(input_ids, pixel_values, image_features)
        return self.language_model(inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                                   logits_to_keep=logits_to_keep, position_ids=position_ids,
                                   segment_ids=segment_ids, backend=backend)

    def expand_image_tokens(self, ids: Sequence[int]) -> List[int]:
        """Repeat every single ``image_token_id`` of a prompt ``image_seq_length`` times (what
        Hugging Face's LLaVA processor does to ``<image>``)."""
        out: List[int] = []
        for t in ids:
            out.extend([t] * self.config.image_seq_length if t == self.config.image_token_id
                       else [t])
        return out

    def generate(self, input_ids: Sequence[Sequence[int]], pixel_values: Optional[torch.Tensor]
                 = None, **kw):
        """Batched generation (``fmrt.models.generation.generate`` keyword arguments) for
        prompts of already expanded ids (any lengths; left-padded here)."""
        from fmrt.models.generation import GenerationRun

        prompts = [list(p) for p in input_ids]
        width = max(len(p) for p in prompts)
        pad = self.config.text.pad_token_id or 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = True
        dev = self.projector.linear_1.weight.device
        with torch.inference_mode():
            emb = self.embed(ids.to(dev), None if pixel_values is None else pixel_values.to(dev))
        run = GenerationRun(self.language_model, None, inputs_embeds=emb, attention_mask=mask, **kw)
        for _ in run:
            pass
        return run.results


def build_llava(config: LlavaConfig) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(config)


# ----------------------------------------------------------------------------- runtime
class LlavaRunner:
    """Text in, text (and points) out for a trained ShapesWorld LLaVA (``fmrt.pretrained``
    model directory or bundled name): images of any size are squashed to the tower's input
    size; pointing answers come back in pixels of each original image.

    ``generate(images, prompt, max_new_tokens=64, temperature=0.0, stop=None)`` -> text;
    ``point(image, phrase)`` -> ``{"text", "points": [(x, y)], "count"}``.
    """

    def __init__(self, name_or_dir: str) -> None:
        from fmrt.pretrained import load_pretrained

        p = load_pretrained(name_or_dir)
        if p.family != "llava":
            raise ValueError(f"{name_or_dir} is a {p.family!r} model, not llava")
        self.model, self.tokenizer, self.preprocess = p.model.eval(), p.tokenizer, p.preprocess

    def _run(self, images, prompt: str, **kw) -> str:
        from fmrt.data.vlm_data import decode_answer, prompt_ids
        from fmrt.preprocess import preprocess_images

        images = list(images)
        px = preprocess_images(images, self.preprocess)
        ids = prompt_ids(self.tokenizer, prompt, self.model.config.image_seq_length,
                         images=len(images))
        kw.setdefault("stop_token_ids", [self.tokenizer.eot_token_id])
        if kw.get("stop_strings"):
            kw["detokenize"] = lambda t: decode_answer(self.tokenizer, t)
        res = self.model.generate([ids], px, **kw)[0]
        return decode_answer(self.tokenizer, res.tokens)

    def generate(self, images, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 stop=None) -> str:
        """Answer ``prompt`` about ``images`` (HxWx3 uint8 arrays); point tags are rewritten
        into the first image's pixel frame."""
        from fmrt.data.vlm_data import rescale_point_text

        images = list(images)
        text = self._run(images, prompt, max_new_tokens=max_new_tokens,
                         temperature=temperature, stop_strings=stop)
        s = self.model.image_size
        h, w = images[0].shape[:2]
        return rescale_point_text(text, (s, s), (w, h)) if (h, w) != (s, s) else text

    def point(self, image, phrase: str, max_new_tokens: int = 100) -> Dict[str, Any]:
        """``point to the {phrase}`` (e.g. ``"red circles"``): points (x, y) in ``image``'s
        pixels and the stated count (None if the answer has none)."""
        from fmrt.data import parse_point_answer

        text = self.generate([image], f"point to the {phrase}", max_new_tokens=max_new_tokens)
        pts, n = parse_point_answer(text)
        return {"text": text, "points": [tuple(map(float, p)) for p in pts], "count": n}


# ----------------------------------------------------------------------------- HF loading
_VISION_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(cfg: Dict[str, Any]) -> LlavaConfig:
    """``LlavaConfig`` from a Hugging Face ``llava`` config.json dict (CLIP vision, LLaMA text)."""
    from fmrt.models.llama_checkpoint import config_from_hf as llama_config_from_hf

    if cfg.get("model_type") != "llava":
        raise LlavaCheckpointError(f"config.json model_type is {cfg.get('model_type')!r}, "
                                   "expected 'llava'")
    vc, tc = dict(cfg.get("vision_config") or {}), dict(cfg.get("text_config") or {})
    if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise LlavaCheckpointError(f"unsupported LLaVA vision tower {vc.get('model_type')!r} "
                                   "(only CLIP)")
    tc.setdefault("model_type", "llama")
    if tc["model_type"] != "llama":
        raise LlavaCheckpointError(f"unsupported LLaVA text model {tc['model_type']!r} "
                                   "(only LLaMA)")
    if "tie_word_embeddings" in cfg:
        tc["tie_word_embeddings"] = bool(cfg["tie_word_embeddings"]) or bool(
            tc.get("tie_word_embeddings", False))
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise LlavaCheckpointError(f"vision_feature_layer {layer!r}: only a single layer is "
                                   "supported")
    act = _VISION_ACTS.get(vc.get("hidden_act", "quick_gelu"))
    if act is None:
        raise LlavaCheckpointError(f"unsupported vision activation {vc.get('hidden_act')!r}")
    if abs(vc.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
        raise LlavaCheckpointError("only CLIP towers with layer_norm_eps 1e-5 are supported")
    width = vc.get("hidden_size", 1024)
    vision = CLIPVisionConfig(image_size=vc.get("image_size", 336),
                              patch_size=vc.get("patch_size", 14), width=width,
                              layers=vc.get("num_hidden_layers", 24),
                              heads=vc.get("num_attention_heads", 16),
                              mlp_ratio=vc.get("intermediate_size", 4096) / width)
    try:
        return LlavaConfig(
            vision=vision, vision_act=act, text=llama_config_from_hf(tc),
            projector="mlp2x_gelu", projector_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"))
    except ValueError as e:
        raise LlavaCheckpointError(f"unsupported LLaVA config: {e}") from None


def _canonical_hf_key(k: str) -> Tuple[str, str]:
    """(part, rest): part in vision | projector | lm; rest relative to that part (LM keys in
    ``LlamaForCausalLM`` form: ``model.*`` / ``lm_head.weight``)."""
    for pre in ("model.vision_tower.", "vision_tower."):
        if k.startswith(pre):
            rest = k[len(pre):]
            return "vision", rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
    for pre in ("model.multi_modal_projector.", "multi_modal_projector."):
        if k.startswith(pre):
            return "projector", k[len(pre):]
    if k.startswith("model.language_model."):
        return "lm", "model." + k[len("model.language_model."):]
    if k.startswith("language_model.model."):
        return "lm", k[len("language_model."):]
    if k in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm", "lm_head.weight"
    if k.startswith("language_model."):  # a bare LlamaModel saved under language_model.
        return "lm", "model." + k[len("language_model."):]
    raise LlavaCheckpointError(f"unexpected LLaVA key {k!r}")


def convert_hf_state_dict(sd: Dict[str, torch.Tensor], config: LlavaConfig
                          ) -> Dict[str, torch.Tensor]:
    """Hugging Face LLaVA keys (any layout, see the module docstring) -> fmrt keys."""
    from fmrt.models.clip_checkpoint import convert_hf_state_dict as clip_convert
    from fmrt.models.llama_checkpoint import convert_hf_state_dict as llama_convert

    parts: Dict[str, Dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "lm": {}}
    for k, v in sd.items():
        part, rest = _canonical_hf_key(k)
        parts[part][rest] = v
    out: Dict[str, torch.Tensor] = {}
    vis = clip_convert({"vision_model." + k: v for k, v in parts["vision"].items()})
    for k, v in vis.items():
        if k.startswith("visual."):
            out["vision_tower." + k[len("visual."):]] = v
    for k, v in parts["projector"].items():
        out["projector." + k] = v
    for k, v in llama_convert(parts["lm"], config.text).items():
        out["language_model." + k] = v
    return out


def _load_into(model: LlavaForConditionalGeneration, sd: Dict[str, torch.Tensor], source: str
               ) -> LlavaForConditionalGeneration:
    own = model.state_dict()
    # ln_post is unused by LLaVA (features come before it) but kept for a CLIP-shaped tower
    for k in ("vision_tower.ln_post.weight", "vision_tower.ln_post.bias"):
        if k not in sd:
            sd[k] = own[k]
    from fmrt.models.state_dict import strict_load

    return strict_load(model, sd, source, LlavaCheckpointError)


def load_llava_checkpoint(path: str, name: Optional[str] = None, *,
                          dtype: Optional[torch.dtype] = None, **_: Any
                          ) -> LlavaForConditionalGeneration:
    """Load a Hugging Face ``LlavaForConditionalGeneration`` directory or an fmrt ``llava``
    model directory. ``name``: a registered llava architecture the checkpoint must match."""
    from fmrt.models.llama_checkpoint import read_model_dir

    path = os.fspath(path)
    config, sd = read_model_dir(path, family="llava", model_type="llava", config_cls=LlavaConfig,
                                config_from_hf=config_from_hf, convert=convert_hf_state_dict,
                                error=LlavaCheckpointError)
    if name is not None:
        from fmrt.registry import get_model_entry

        model = get_model_entry(name).factory()
        if model.config.to_dict() != config.to_dict():
            raise LlavaCheckpointError(f"{path} does not match the registered {name!r}")
    else:
        model = build_llava(config)
    model = _load_into(model, sd, path)
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------- registry
from fmrt.pretrained import register_family_builder  # noqa: E402
from fmrt.registry import (register_checkpoint_loader, register_hf_model_type,  # noqa: E402
                           register_model)

register_checkpoint_loader("llava")(load_llava_checkpoint)
register_hf_model_type("llava", "llava")


def shapes_llava_config(**overrides: Any) -> LlavaConfig:
    """ShapesWorld LLaVA: ``shapes-clip``'s tower (64 px, patch 8, width 128, 4 layers, GELU;
    64 image tokens), LLaVA-1.5 MLP projector, ``shapes-lm-tiny`` (vocabulary 128; the word
    tokenizer of ``fmrt.data.vlm_data`` puts ``<image>`` at id 86)."""
    from fmrt.models.llama import LLAMA_CONFIGS, shapes_vocab_size

    text = dict(LLAMA_CONFIGS["shapes-lm-tiny"], vocab_size=shapes_vocab_size())
    text.update(overrides.pop("text", {}))
    d: Dict[str, Any] = dict(
        vision=dict(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_ratio=4.0),
        vision_act="gelu", text=text, projector="mlp2x_gelu", image_token_id=86)
    d.update(overrides)
    return LlavaConfig.from_dict(d)


@register_model("shapes-llava-tiny", family="llava",
                description="ShapesWorld LLaVA: shapes-clip tower + MLP projector + shapes-lm-tiny")
def _shapes_llava_tiny(**overrides):
    return build_llava(shapes_llava_config(**overrides))


@register_family_builder("llava")
def _build_from_dict(config: dict) -> LlavaForConditionalGeneration:
    return build_llava(LlavaConfig.from_dict(config))
