"""Load CLIP checkpoints in every common format into fmrt's ``CLIP``.

Formats (detected, never guessed from the file name alone):
  * fmrt: a directory with ``config.json`` (``"family": "clip"``) and ``model.safetensors``.
  * Hugging Face ``CLIPModel``: a directory with ``config.json`` (``"model_type": "clip"``) and
    ``model.safetensors`` or ``pytorch_model.bin``.
  * OpenAI CLIP: a state dict (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``,
    ``token_embedding.weight``, ``text_projection``, ``logit_scale``, ...), as a plain ``.pt``
    state dict or the TorchScript archive OpenAI distributes.
  * open_clip: the same keys, optionally wrapped in ``{"state_dict": ...}`` with ``module.``
    prefixes (training checkpoints), as ``.pt``/``.bin``/``.safetensors``.

OpenAI/open_clip state dicts carry no activation name: OpenAI weights use QuickGELU (the
default here); open_clip's LAION ViT weights were trained with GELU, pass ``act="gelu"``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

import torch

from fmrt.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, build_clip
from fmrt.registry import get_model_entry, register_checkpoint_loader


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the requested architecture."""


# ----------------------------------------------------------------------------- file reading
def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors``, a pickled state dict (``weights_only``) or a
    TorchScript archive; unwraps ``state_dict``/``model`` wrappers and ``module.`` prefixes."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(path)
        except Exception as e:  # SafetensorError (bad header, truncated file) is no ValueError
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as pickle_err:  # OpenAI ships TorchScript archives
            try:
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            except Exception:
                raise CheckpointError(f"cannot read {path} as a state dict or TorchScript archive: "
                                      f"{pickle_err}") from pickle_err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- OpenAI / open_clip
_OPENAI_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                         "text_projection")


def is_openai_state_dict(sd: Dict[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in sd and ("token_embedding.weight" in sd
                                            or "text.token_embedding.weight" in sd)


def config_from_openai_state_dict(sd: Dict[str, torch.Tensor], act: str = "quick_gelu") -> CLIPConfig:
    """Infer a ViT CLIP config from OpenAI key shapes (as OpenAI's ``build_model`` does; heads are
    width // 64 by that convention)."""
    if "visual.attnpool.c_proj.weight" in sd or "visual.layer1.0.conv1.weight" in sd:
        raise CheckpointError("ModifiedResNet (RN50...) CLIP image towers are not supported; "
                              "use a ViT checkpoint")
    p = "text." if "text.token_embedding.weight" in sd else ""
    vw = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vlayers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    vmlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vw
    vocab, tw = sd[p + "token_embedding.weight"].shape
    ctx = sd[p + "positional_embedding"].shape[0]
    tlayers = len({k.split(".")[2 + (1 if p else 0)] for k in sd
                   if k.startswith(p + "transformer.resblocks.")})
    tmlp = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw
    embed = sd[p + "text_projection"].shape[1]
    return CLIPConfig(
        embed_dim=embed,
        vision=CLIPVisionConfig(image_size=patch * grid, patch_size=patch, width=vw,
                                layers=vlayers, heads=max(1, vw // 64), mlp_ratio=vmlp),
        text=CLIPTextConfig(vocab_size=vocab, context_length=ctx, width=tw, layers=tlayers,
                            heads=max(1, tw // 64), mlp_ratio=tmlp, eot_token_id=vocab - 1),
        act=act)


def convert_openai_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k in ("input_resolution", "context_length", "vocab_size") or k.endswith("attn_mask"):
            continue
        if k.startswith(_OPENAI_TEXT_PREFIXES):
            k = "text." + k
        out[k] = v
    return out


# ----------------------------------------------------------------------------- Hugging Face
def config_from_hf(cfg: Dict[str, Any]) -> CLIPConfig:
    vc, tc = cfg.get("vision_config", {}), cfg.get("text_config", {})
    vact, tact = vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")
    if vact != tact:
        raise CheckpointError(f"towers use different activations ({vact} vs {tact})")
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh"}.get(vact)
    if act is None:
        raise CheckpointError(f"unsupported activation {vact!r}")
    vw, tw = vc.get("hidden_size", 768), tc.get("hidden_size", 512)
    vocab = tc.get("vocab_size", 49408)
    eos = tc.get("eos_token_id", 49407)
    # transformers pools at argmax(input_ids) when eos_token_id == 2 (legacy configs whose real
    # eot is the largest id, 49407); otherwise at the first eos token.
    eot = vocab - 1 if eos == 2 else eos
    return CLIPConfig(
        embed_dim=cfg.get("projection_dim", 512),
        vision=CLIPVisionConfig(image_size=vc.get("image_size", 224),
                                patch_size=vc.get("patch_size", 32), width=vw,
                                layers=vc.get("num_hidden_layers", 12),
                                heads=vc.get("num_attention_heads", 12),
                                mlp_ratio=vc.get("intermediate_size", 3072) / vw),
        text=CLIPTextConfig(vocab_size=vocab, context_length=tc.get("max_position_embeddings", 77),
                            width=tw, layers=tc.get("num_hidden_layers", 12),
                            heads=tc.get("num_attention_heads", 8),
                            mlp_ratio=tc.get("intermediate_size", 2048) / tw, eot_token_id=eot),
        act=act, init_logit_scale=cfg.get("logit_scale_init_value", 2.6592))


_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def convert_hf_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    fixed = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
        "text_model.final_layer_norm.weight": "text.ln_final.weight",
        "text_model.final_layer_norm.bias": "text.ln_final.bias",
        "logit_scale": "logit_scale",
    }
    block = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in fixed:
            out[fixed[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "text_projection.weight":
            out["text.text_projection"] = v.t().contiguous()
        elif (m := block.match(k)):
            tower = "visual" if m.group(1) == "vision" else "text"
            prefix = f"{tower}.transformer.resblocks.{m.group(2)}."
            name, kind = m.group(3), m.group(4)
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{kind}", {})[name[10]] = v
            elif name in _HF_BLOCK:
                out[f"{prefix}{_HF_BLOCK[name]}.{kind}"] = v
            else:
                raise CheckpointError(f"unexpected Hugging Face CLIP key {k!r}")
        else:
            raise CheckpointError(f"unexpected Hugging Face CLIP key {k!r}")
    for k, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"incomplete q/k/v projections for {k}")
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------- entry point
def _load_into(model: CLIP, sd: Dict[str, torch.Tensor], source: str) -> CLIP:
    from fmrt.models.state_dict import strict_load

    return strict_load(model, sd, source, CheckpointError)


def _hf_weights(path: str) -> Dict[str, torch.Tensor]:
    for fname in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, fname)
        if os.path.isfile(f):
            return read_state_dict(f)
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")


@register_checkpoint_loader("clip")
def load_clip_checkpoint(path: str, name: Optional[str] = None, *, act: Optional[str] = None,
                         **_: Any) -> CLIP:
    """Load a CLIP checkpoint of any supported format (see the module docstring).

    ``name`` (a registered CLIP config) fixes the architecture; otherwise it is read from the
    checkpoint's config or inferred from tensor shapes.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{path}: directory has no config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if cfg.get("family") == "clip":  # fmrt's own format
            config = CLIPConfig.from_dict(cfg["config"] if "config" in cfg else cfg)
            from fmrt.pretrained import PretrainedError, read_weights

            try:
                sd = read_weights(path)
            except PretrainedError as e:
                raise CheckpointError(str(e)) from None
            return _load_into(build_clip(config), sd, path)
        if cfg.get("model_type") == "clip":
            config = config_from_hf(cfg)
            return _load_into(build_clip(config), convert_hf_state_dict(_hf_weights(path)), path)
        raise CheckpointError(f"{path}: config.json is neither an fmrt CLIP nor a HF CLIPModel config")
    sd = read_state_dict(path)
    if any(k.startswith("vision_model.") for k in sd):
        raise CheckpointError(f"{path}: Hugging Face CLIP weights need their config.json; "
                              "pass the model directory instead of the weights file")
    if not is_openai_state_dict(sd):
        raise CheckpointError(f"{path}: not an OpenAI/open_clip CLIP state dict "
                              "(no visual.conv1.weight / token_embedding.weight)")
    if name is not None:
        model = get_model_entry(name).factory(**({"act": act} if act else {}))
    else:
        model = build_clip(config_from_openai_state_dict(sd, act=act or "quick_gelu"))
    return _load_into(model, convert_openai_state_dict(sd), path if name is None
                      else f"{path} loaded as {name!r}")
