"""Load LLaMA-format checkpoints into ``fmrt.models.llama.LlamaForCausalLM``.

Formats:
  * Hugging Face ``LlamaForCausalLM`` directory: ``config.json`` (``"model_type": "llama"``) and
    ``model.safetensors`` or shards named by ``model.safetensors.index.json`` (or
    ``pytorch_model.bin``). The architecture is read from ``config.json``: both the legacy
    ``rope_theta`` / ``rope_scaling`` keys and transformers 5's ``rope_parameters``.
  * fmrt's model directory (``"family": "llama"``, written by ``fmrt.pretrained.save_pretrained``).

``create_model(None, checkpoint=dir)`` finds this loader from config.json; ``create_model(
"shapes-lm-tiny", checkpoint=dir)`` also checks the checkpoint matches the named architecture.
``convert_hf_state_dict`` is reusable for models that embed a LLaMA (LLaVA's ``language_model``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

import torch

from fmrt.models.llama import ROPE_TYPES, LlamaConfig, LlamaForCausalLM, build_llama
from fmrt.registry import get_model_entry, register_checkpoint_loader, register_hf_model_type


class LlamaCheckpointError(ValueError):
    """A LLaMA checkpoint that cannot be read or does not match its config."""


def config_from_hf(cfg: Dict[str, Any]) -> LlamaConfig:
    """``LlamaConfig`` from a Hugging Face LLaMA ``config.json`` dict."""
    if cfg.get("model_type", "llama") != "llama":
        raise LlamaCheckpointError(f"config.json model_type is {cfg.get('model_type')!r}, "
                                   "expected 'llama'")
    rp = dict(cfg.get("rope_parameters") or {})
    theta = rp.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or rp or None
    if scaling is not None:
        scaling = dict(scaling)
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise LlamaCheckpointError(f"unsupported rope scaling {kind!r} in config.json "
                                       f"({scaling}); supported: {ROPE_TYPES}")
        if kind == "default":
            scaling = None
    hidden = cfg.get("hidden_size", 4096)
    heads = cfg.get("num_attention_heads", 32)
    try:
        return LlamaConfig(
            vocab_size=cfg.get("vocab_size", 32000), hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 11008),
            num_layers=cfg.get("num_hidden_layers", 32), num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=scaling, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"))
    except ValueError as e:
        raise LlamaCheckpointError(f"unsupported LLaMA config: {e}") from None


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_RENAME = {"self_attn.o_proj": "attn.o_proj", "mlp.down_proj": "mlp.down_proj",
           "input_layernorm": "input_layernorm",
           "post_attention_layernorm": "post_attention_layernorm"}


def convert_hf_state_dict(sd: Dict[str, torch.Tensor], config: LlamaConfig,
                          prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """Hugging Face LLaMA keys -> fmrt keys: q/k/v concatenated into ``attn.qkv``, gate/up into
    ``mlp.gate_up``; ``lm_head.weight`` dropped when embeddings are tied. ``prefix``: the decoder's
    prefix (``model.`` for ``LlamaForCausalLM``); keys outside it other than ``lm_head.weight``
    are rejected."""
    out: Dict[str, torch.Tensor] = {}
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # old transformers saved the (recomputed) rope buffer
        if k == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["lm_head.weight"] = v
            continue
        if not k.startswith(prefix):
            raise LlamaCheckpointError(f"unexpected LLaMA key {k!r}")
        k = k[len(prefix):]
        if k in ("embed_tokens.weight", "norm.weight"):
            out[k] = v
            continue
        m = _LAYER.match(k)
        if m is None:
            raise LlamaCheckpointError(f"unexpected LLaMA key {prefix}{k!r}")
        i, rest = m.group(1), m.group(2)
        name, kind = rest.rsplit(".", 1)
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            parts.setdefault(f"layers.{i}.attn.qkv.{kind}", {})[name[-6]] = v
        elif name in ("mlp.gate_proj", "mlp.up_proj"):
            parts.setdefault(f"layers.{i}.mlp.gate_up.{kind}", {})[name[4]] = v
        elif name in _RENAME:
            out[f"layers.{i}.{_RENAME[name]}.{kind}"] = v
        else:
            raise LlamaCheckpointError(f"unexpected LLaMA key {prefix}{k!r}")
    for k, p in parts.items():
        order = "qkv" if ".qkv." in k else "gu"
        if set(p) != set(order):
            raise LlamaCheckpointError(f"incomplete projections for {k}: have {sorted(p)}")
        out[k] = torch.cat([p[c] for c in order], dim=0)
    return out


def load_state_dict_into(model: LlamaForCausalLM, sd: Dict[str, torch.Tensor], source: str
                         ) -> LlamaForCausalLM:
    from fmrt.models.state_dict import strict_load

    return strict_load(model, sd, source, LlamaCheckpointError)


def _read_hf_weights(path: str) -> Dict[str, torch.Tensor]:
    from fmrt.pretrained import PretrainedError, read_weights

    try:
        return read_weights(path)  # model.safetensors or the sharded index
    except PretrainedError:
        pass
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise LlamaCheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                               "pytorch_model.bin")


def read_model_dir(path: str, *, family: str, model_type: str, config_cls: Any,
                   config_from_hf: Any, convert: Any, error: type) -> tuple:
    """``(config, state_dict)`` of an fmrt ``family`` model directory or a Hugging Face directory
    whose config.json has ``model_type`` (weights renamed by ``convert(sd, config)``); shared by
    the LLaMA and LLaVA loaders. Problems raise ``error`` with the path."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg_path):
        raise error(f"{path}: expected a model directory with config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("family") == family:
        from fmrt.pretrained import PretrainedError, read_weights

        config = config_cls.from_dict(cfg["config"])
        try:
            return config, read_weights(path)
        except PretrainedError as e:
            raise error(str(e)) from None
    if cfg.get("model_type") == model_type:
        config = config_from_hf(cfg)
        return config, convert(_read_hf_weights(path), config)
    raise error(f"{path}: config.json is neither an fmrt {family} nor a Hugging Face "
                f"{model_type} config (model_type={cfg.get('model_type')!r})")


@register_checkpoint_loader("llama")
def load_llama_checkpoint(path: str, name: Optional[str] = None, *,
                          dtype: Optional[torch.dtype] = None, **_: Any) -> LlamaForCausalLM:
    """Load a Hugging Face LLaMA or fmrt ``llama`` model directory (see the module docstring).

    ``name``: a registered ``family="llama"`` architecture the checkpoint must match.
    ``dtype``: parameter dtype (default float32; bf16/fp16 checkpoints are upcast).
    """
    path = os.fspath(path)
    config, sd = read_model_dir(path, family="llama", model_type="llama", config_cls=LlamaConfig,
                                config_from_hf=config_from_hf, convert=convert_hf_state_dict,
                                error=LlamaCheckpointError)
    if name is not None:
        model = get_model_entry(name).factory()
        if model.config.to_dict() != config.to_dict():
            diff = {k: (v, config.to_dict()[k]) for k, v in model.config.to_dict().items()
                    if config.to_dict()[k] != v}
            raise LlamaCheckpointError(f"{path} does not match {name!r}: (registered, "
                                       f"checkpoint) = {diff}")
    else:
        model = build_llama(config)
    model = load_state_dict_into(model, sd, path)
    return model.to(dtype) if dtype is not None else model


register_hf_model_type("llama", "llama")
