"""Named SAM architectures: the three official segment-anything shapes and a small one sized for
ShapesWorld."""
from __future__ import annotations

from typing import Dict

from fmrt.models.sam.sam import Sam, SamConfig, SamDecoderConfig, SamEncoderConfig, build_sam
from fmrt.pretrained import register_family_builder
from fmrt.registry import register_model


def _official(embed_dim: int, depth: int, heads: int, global_idx) -> SamConfig:
    # segment-anything's _build_sam: 1024 input, 16 px patches (64x64 embedding), window 14,
    # 256-d neck/prompts/decoder, 16 mask-prompt channels, decoder 2 blocks x 8 heads, MLP 2048.
    return SamConfig(encoder=SamEncoderConfig(img_size=1024, patch_size=16, embed_dim=embed_dim,
                                              depth=depth, num_heads=heads, window_size=14,
                                              global_attn_indexes=tuple(global_idx)),
                     decoder=SamDecoderConfig(), prompt_embed_dim=256, mask_in_chans=16)


SAM_CONFIGS: Dict[str, SamConfig] = {
    "sam_vit_b": _official(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": _official(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": _official(1280, 32, 16, (7, 15, 23, 31)),
    # ShapesWorld scenes are 64x64. Input 64 with 4 px patches gives a 16x16 embedding, and the
    # decoder's 4x upscaling then predicts 64x64 masks: the native resolution, so thin shapes and
    # small objects (~6 px) keep their edges (8 px patches would give 32x32 masks, and a 128 input
    # with 8 px patches costs the same 256 tokens while only upsampling the 64 px scene). Encoder
    # 128 wide x 4 blocks (windows of 4x4 tokens in blocks 0 and 2, global attention in 1 and 3),
    # decoder 128 wide with 4 heads and MLP 512: ~1.9M parameters, ~0.5 GFLOP per image forward,
    # so a batch of 16 trains at roughly a step per second on 2 CPU cores (~1000 steps in 15 min).
    "shapes-sam-tiny": SamConfig(
        encoder=SamEncoderConfig(img_size=64, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                                 window_size=4, global_attn_indexes=(1, 3)),
        decoder=SamDecoderConfig(transformer_depth=2, transformer_heads=4, transformer_mlp_dim=512,
                                 iou_head_hidden_dim=128),
        prompt_embed_dim=128, mask_in_chans=16),
}


def _register(name: str) -> None:
    @register_model(name, family="sam", description=f"Segment Anything {name}")
    def _factory(**overrides) -> Sam:
        return build_sam(SamConfig.from_dict({**SAM_CONFIGS[name].to_dict(), **overrides}))


for _name in SAM_CONFIGS:
    _register(_name)


@register_family_builder("sam")
def _build_from_dict(config: dict) -> Sam:
    return build_sam(SamConfig.from_dict(config))
