"""Load Segment Anything checkpoints into fmrt's ``Sam``.

Accepted:
  * an official segment-anything checkpoint (``sam_vit_b_01ec64.pth`` ...): a pickled state dict
    whose keys are the ones of segment-anything's ``Sam`` (``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``); fmrt's modules use the same names, so no key is
    renamed. ``.safetensors`` files with those keys, and ``{"state_dict"/"model": ...}`` wrappers
    or ``module.`` prefixes, work too;
  * the same state dict already in memory (a ``dict`` of tensors);
  * an fmrt model directory (``config.json`` with ``"family": "sam"`` + ``model.safetensors``).

With ``name`` (``sam_vit_b`` ...) the architecture is the registered one and the weights must match
it exactly. Without it the architecture is read off the tensor shapes (the decoder's head count is
not visible in any shape: 8, as in every official model, unless ``transformer_heads`` is given).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Union

import torch

from fmrt.models.clip_checkpoint import CheckpointError, read_state_dict
from fmrt.models.sam.sam import Sam, SamConfig, SamDecoderConfig, SamEncoderConfig, build_sam
from fmrt.registry import get_model_entry, register_checkpoint_loader

StateDict = Dict[str, torch.Tensor]
_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _unwrap(sd: Mapping[str, Any]) -> StateDict:
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def is_sam_state_dict(sd: Mapping[str, Any]) -> bool:
    return "image_encoder.patch_embed.proj.weight" in sd and \
        "mask_decoder.iou_token.weight" in sd


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def config_from_state_dict(sd: Mapping[str, torch.Tensor], *,
                           transformer_heads: int = 8) -> SamConfig:
    """Infer the architecture of a segment-anything state dict from its tensor shapes."""
    if not is_sam_state_dict(sd):
        raise CheckpointError("not a Segment Anything state dict (no image_encoder.patch_embed / "
                              "mask_decoder.iou_token keys)")
    e = "image_encoder."
    embed_dim, in_chans, patch, _ = sd[e + "patch_embed.proj.weight"].shape
    depth = _count(sd, e + "blocks.")
    use_rel_pos = e + "blocks.0.attn.rel_pos_h" in sd
    rel_len = [sd[f"{e}blocks.{i}.attn.rel_pos_h"].shape[0] if use_rel_pos else 0
               for i in range(depth)]
    if e + "pos_embed" in sd:
        grid = sd[e + "pos_embed"].shape[1]
    elif use_rel_pos:
        grid = (max(rel_len) + 1) // 2
    else:
        raise CheckpointError("cannot infer the input size: no pos_embed and no rel_pos tables")
    if use_rel_pos:
        head_dim = sd[e + "blocks.0.attn.rel_pos_h"].shape[1]
        global_idx = tuple(i for i, n in enumerate(rel_len) if n == 2 * grid - 1)
        windowed = [n for n in rel_len if n != 2 * grid - 1]
        window = (windowed[0] + 1) // 2 if windowed else 14
    else:
        # Without the tables neither the head count nor the windows are visible; these are the
        # ViT-B defaults.
        head_dim, global_idx, window = 64, (), 0
    mlp_dim = sd[e + "blocks.0.mlp.lin1.weight"].shape[0]
    d = "mask_decoder."
    prompt_dim = sd[e + "neck.0.weight"].shape[0]
    internal = sd[d + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
    return SamConfig(
        encoder=SamEncoderConfig(
            img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=embed_dim // head_dim, mlp_ratio=mlp_dim / embed_dim,
            qkv_bias=e + "blocks.0.attn.qkv.bias" in sd, use_abs_pos=e + "pos_embed" in sd,
            use_rel_pos=use_rel_pos, window_size=window, global_attn_indexes=global_idx),
        decoder=SamDecoderConfig(
            num_multimask_outputs=sd[d + "mask_tokens.weight"].shape[0] - 1,
            transformer_depth=_count(sd, d + "transformer.layers."),
            transformer_heads=transformer_heads,
            transformer_mlp_dim=sd[d + "transformer.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample_rate=prompt_dim // internal,
            iou_head_depth=_count(sd, d + "iou_prediction_head.layers."),
            iou_head_hidden_dim=sd[d + "iou_prediction_head.layers.0.weight"].shape[0]),
        prompt_embed_dim=prompt_dim,
        mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0])


def load_state_dict_into(model: Sam, sd: Mapping[str, torch.Tensor], source: str) -> Sam:
    """Strictly load ``sd`` (segment-anything key names) into ``model``; CheckpointError on any
    missing / unexpected key or shape mismatch."""
    from fmrt.models.state_dict import check_state_dict

    own = model.state_dict()
    check_state_dict(own, sd, source, CheckpointError)
    if any(t.is_meta for t in own.values()):
        # built by _build_empty: allocate (uninitialised) storage, then copy the weights in
        model.to_empty(device="cpu")
        _reset_pixel_stats(model)
    model.load_state_dict({k: sd[k].to(v.dtype) for k, v in own.items()})
    return model.eval()


def _reset_pixel_stats(model: Sam) -> None:
    cfg = model.config or SamConfig()
    model.pixel_mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(-1, 1, 1)
    model.pixel_std = torch.tensor(cfg.pixel_std, dtype=torch.float32).view(-1, 1, 1)


def _build_empty(factory) -> Sam:
    """Construct on the meta device: no time spent on a random init the checkpoint overwrites
    (``sam_vit_h`` has 636M parameters; its init alone takes seconds)."""
    with torch.device("meta"):
        return factory()


@register_checkpoint_loader("sam")
def load_sam_checkpoint(checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
                        name: Optional[str] = None, *, transformer_heads: int = 8,
                        **overrides: Any) -> Sam:
    """Build a ``Sam`` and load weights (see the module docstring for the accepted inputs).

    Args:
        checkpoint: path to a ``.pth``/``.pt``/``.safetensors`` state dict, an fmrt model
            directory, or an in-memory state dict.
        name: a registered SAM architecture (``list_models("sam")``); None infers it.
        transformer_heads: decoder heads when inferring (not visible in the shapes).
        overrides: config overrides passed to the registered factory (with ``name``).
    """
    if isinstance(checkpoint, Mapping):
        sd, source = _unwrap(checkpoint), "state dict"
    else:
        path = os.fspath(checkpoint)
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                raise CheckpointError(f"{path}: directory has no config.json")
            with open(cfg_path) as f:
                family = json.load(f).get("family")
            if family != "sam":
                raise CheckpointError(f"{path}: config.json is for family {family!r}, not 'sam'")
            from fmrt.pretrained import load_pretrained

            model = load_pretrained(path).model
            if name is not None and isinstance(model, Sam) and model.config is not None:
                entry = get_model_entry(name)
                want = _build_empty(lambda: entry.factory(**overrides)).config
                if want is not None and want.to_dict() != model.config.to_dict():
                    raise CheckpointError(f"{path} holds a different architecture than {name!r}")
            return model  # type: ignore[return-value]
        sd, source = read_state_dict(path), path
    if not is_sam_state_dict(sd):
        raise CheckpointError(f"{source}: not a Segment Anything state dict (no "
                              "image_encoder.patch_embed.proj.weight / mask_decoder.iou_token.weight)")
    if name is not None:
        entry = get_model_entry(name)
        if entry.family != "sam":
            raise CheckpointError(f"{name!r} is a {entry.family!r} model, not a SAM architecture")
        model = _build_empty(lambda: entry.factory(**overrides))
        source = f"{source} loaded as {name!r}"
    else:
        cfg = config_from_state_dict(sd, transformer_heads=transformer_heads)
        model = _build_empty(lambda: build_sam(cfg))
    return load_state_dict_into(model, sd, source)
