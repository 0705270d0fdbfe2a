"""Model components (one per file) and the registration of every named architecture."""
from fmrt.models import clip_checkpoint, clip_configs, coca  # noqa: F401  (registers models)
from fmrt.models import sam  # noqa: F401  (registers the SAM models and checkpoint loader)
from fmrt.models import llama, llama_checkpoint  # noqa: F401  (LLaMA LMs and HF checkpoint loader)
from fmrt.models import flamingo  # noqa: F401  (Flamingo: perceiver + gated xattn on a frozen LM)
from fmrt.models import llava  # noqa: F401  (LLaVA models and HF checkpoint loader)
from fmrt.models.clip import (CLIP, CLIPConfig, build_clip, clip_contrastive_loss,
                              hard_negative_ranking_loss)
from fmrt.models.coca import CoCa, CoCaConfig, build_coca

__all__ = ["CLIP", "CLIPConfig", "build_clip", "clip_contrastive_loss", "hard_negative_ranking_loss",
           "CoCa", "CoCaConfig", "build_coca"]
