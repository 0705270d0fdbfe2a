"""Model components (one per file) and the registration of every named architecture."""
from fmrt.models import clip_checkpoint, clip_configs  # noqa: F401  (registers models/loaders)
from fmrt.models.clip import CLIP, CLIPConfig, build_clip, clip_contrastive_loss

__all__ = ["CLIP", "CLIPConfig", "build_clip", "clip_contrastive_loss"]
