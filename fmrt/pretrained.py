"""Weights registry: bundled trained models and fmrt's on-disk model format.

A model directory holds
  * ``config.json``: ``{"family": ..., "config": <architecture>, "preprocess": <PreprocessConfig>,
    "provenance": {"command": ..., "seed": ..., ...}}``
  * ``model.safetensors``: the state dict (bundled weights are stored in float16 to keep the
    package small; they are cast to float32 on load)
  * ``tokenizer.json`` + ``tokenizer_config.json`` (families with a text side)

Bundled models live in ``fmrt/weights/<name>/``; ``list_pretrained()`` lists those present.
``load_pretrained(name_or_dir)`` returns a ``Pretrained`` bundle (model, tokenizer, preprocess).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from fmrt.preprocess import PreprocessConfig

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # Hugging Face's sharded layout
# Shards stay under 3 MiB so every bundled file is well below the repository's 4 MiB file cap
# (CoCa's 2.2M float16 parameters are 4.3 MB in one file).
MAX_SHARD_BYTES = 3 * 1024 * 1024

# family -> callable(config_dict) -> nn.Module (registered by each family's model module)
_BUILDERS: Dict[str, Callable[[Dict[str, Any]], nn.Module]] = {}


class PretrainedError(ValueError):
    """Unknown bundled name, or a model directory that is incomplete or inconsistent."""


def register_family_builder(family: str):
    def deco(fn):
        _BUILDERS[family] = fn
        return fn

    return deco


@dataclass
class Pretrained:
    name: str
    family: str
    model: nn.Module
    preprocess: PreprocessConfig
    tokenizer: Any = None
    config: Dict[str, Any] = field(default_factory=dict)
    path: str = ""


def list_pretrained() -> List[str]:
    if not os.path.isdir(WEIGHTS_DIR):
        return []
    return sorted(d for d in os.listdir(WEIGHTS_DIR)
                  if os.path.isfile(os.path.join(WEIGHTS_DIR, d, CONFIG_FILE)))


def is_pretrained(name: str) -> bool:
    return name in list_pretrained()


def resolve(name_or_dir: str) -> str:
    """Directory of a bundled name or a user path; raises ``PretrainedError`` otherwise."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if is_pretrained(name_or_dir):
        return os.path.join(WEIGHTS_DIR, name_or_dir)
    raise PretrainedError(f"unknown model {name_or_dir!r}: not a bundled model "
                          f"{list_pretrained()} nor a model directory")


def read_config(name_or_dir: str) -> Dict[str, Any]:
    path = resolve(name_or_dir)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return json.load(f)


def build_from_config(family: str, config: Dict[str, Any]) -> nn.Module:
    import fmrt.models  # noqa: F401  (registers every family's builder)

    if family not in _BUILDERS:
        raise PretrainedError(f"no builder for model family {family!r}; known {sorted(_BUILDERS)}")
    return _BUILDERS[family](config)


def weight_files(model_dir: str) -> List[str]:
    """The safetensors files of a model directory: ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``."""
    single = os.path.join(model_dir, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise PretrainedError(f"{model_dir}: missing weight shards {missing}")
        return files
    raise PretrainedError(f"{model_dir}: missing {WEIGHTS_FILE} (or {WEIGHTS_INDEX})")


def read_weights(model_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: Dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        sd.update(load_file(f))
    return sd


def read_tensor(model_dir: str, key: str) -> torch.Tensor:
    """One tensor without loading the rest (e.g. CLIP's ``logit_scale`` for a non-torch
    backend)."""
    from safetensors import safe_open

    for f in weight_files(model_dir):
        with safe_open(f, "pt") as h:
            if key in h.keys():
                return h.get_tensor(key)
    raise PretrainedError(f"{model_dir}: no tensor {key!r}")


def load_pretrained(name_or_dir: str, *, dtype: torch.dtype = torch.float32) -> Pretrained:
    from safetensors.torch import load_file

    path = resolve(name_or_dir)
    cfg = read_config(path)
    family = cfg.get("family")
    model = build_from_config(family, cfg["config"])
    sd = read_weights(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise PretrainedError(f"{path}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    model = model.to(dtype).eval()
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from fmrt.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    name = os.path.basename(os.path.normpath(path))
    return Pretrained(name=name, family=family, model=model, tokenizer=tokenizer,
                      preprocess=PreprocessConfig.from_dict(cfg.get("preprocess", {})), config=cfg,
                      path=path)


def load_pretrained_model(name_or_dir: str) -> nn.Module:
    return load_pretrained(name_or_dir).model


def save_pretrained(directory: str, *, family: str, model: nn.Module, config: Dict[str, Any],
                    preprocess: PreprocessConfig, tokenizer: Any = None,
                    provenance: Optional[Dict[str, Any]] = None, half: bool = False,
                    extra: Optional[Dict[str, Any]] = None,
                    max_shard_bytes: Optional[int] = None) -> str:
    """Write a model directory. ``half=True`` stores floating tensors as float16 (bundles);
    ``extra`` adds family-specific keys to config.json (e.g. ``zero_shot_templates``);
    ``max_shard_bytes`` splits the weights into shards of at most that size (HF layout)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    sd = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous()
          for k, v in model.state_dict().items()}
    for old in [WEIGHTS_FILE, WEIGHTS_INDEX] + [f for f in os.listdir(directory)
                                                if f.startswith("model-") and
                                                f.endswith(".safetensors")]:
        if os.path.isfile(os.path.join(directory, old)):
            os.remove(os.path.join(directory, old))
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and max_shard_bytes and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(sd, os.path.join(directory, WEIGHTS_FILE))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, name))
            weight_map.update({k: name for k in shard})
        with open(os.path.join(directory, WEIGHTS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size()
                                                      for v in sd.values())},
                       "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"family": family, "config": config, "preprocess": preprocess.to_dict(),
                   "provenance": provenance or {}, **(extra or {})}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def bundle(model_dir: str, name: str, *, weights_dir: str = WEIGHTS_DIR) -> str:
    """Copy a trained model directory into the package as ``name`` with float16 weights (the
    bundled models must stay a few MB: 1.5M parameters -> 2.9 MB)."""
    p = load_pretrained(model_dir)
    extra = {k: v for k, v in p.config.items()
             if k not in ("family", "config", "preprocess", "provenance")}
    prov = dict(p.config.get("provenance", {}))
    prov["bundled_from"] = os.path.abspath(model_dir)
    return save_pretrained(os.path.join(weights_dir, name), family=p.family, model=p.model,
                           config=p.config["config"], preprocess=p.preprocess,
                           tokenizer=p.tokenizer, provenance=prov, half=True, extra=extra,
                           max_shard_bytes=MAX_SHARD_BYTES)
