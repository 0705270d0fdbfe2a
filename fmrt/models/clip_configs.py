"""Named CLIP architectures: the official shapes and small ones sized for ShapesWorld."""
from __future__ import annotations

from fmrt.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, build_clip
from fmrt.pretrained import register_family_builder
from fmrt.registry import register_model

CLIP_CONFIGS = {
    # OpenAI CLIP shapes (heads = width // 64, text width 512/768, context 77, vocab 49408).
    "ViT-B-32": CLIPConfig(embed_dim=512, vision=CLIPVisionConfig(224, 32, 768, 12, 12),
                           text=CLIPTextConfig(width=512, layers=12, heads=8)),
    "ViT-B-16": CLIPConfig(embed_dim=512, vision=CLIPVisionConfig(224, 16, 768, 12, 12),
                           text=CLIPTextConfig(width=512, layers=12, heads=8)),
    "ViT-L-14": CLIPConfig(embed_dim=768, vision=CLIPVisionConfig(224, 14, 1024, 24, 16),
                           text=CLIPTextConfig(width=768, layers=12, heads=12)),
    "ViT-L-14-336": CLIPConfig(embed_dim=768, vision=CLIPVisionConfig(336, 14, 1024, 24, 16),
                               text=CLIPTextConfig(width=768, layers=12, heads=12)),
    # ShapesWorld: 64x64 images, 8x8 patches (64 tokens + CLS); a word-level vocabulary of under
    # 128 ids and captions of at most ~20 words, so context 32 leaves headroom for templates.
    "shapes-vit-tiny": CLIPConfig(
        embed_dim=128, vision=CLIPVisionConfig(64, 8, 128, 4, 4),
        text=CLIPTextConfig(vocab_size=128, context_length=32, width=128, layers=3, heads=4,
                            eot_token_id=2),
        act="gelu"),
}


def _register(name: str) -> None:
    @register_model(name, family="clip", description=f"CLIP {name}")
    def _factory(**overrides):
        cfg = CLIPConfig.from_dict({**CLIP_CONFIGS[name].to_dict(), **overrides})
        return build_clip(cfg)


for _name in CLIP_CONFIGS:
    _register(_name)


@register_family_builder("clip")
def _build_from_dict(config: dict):
    return build_clip(CLIPConfig.from_dict(config))
