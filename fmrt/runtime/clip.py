"""``ClipRuntime``: CLIP's numpy-in/numpy-out facade, identical over every backend.

    rt = fmrt.load("shapes-clip", backend="onnxruntime")
    rt.encode_image([img_hxwx3_uint8, ...])   # N x E float32, L2-normalised
    rt.encode_text(["a red circle", ...])     # N x E float32, L2-normalised
    rt.classify(images, ["red circle", "blue square"], templates=None)  # N x L probabilities
    index = rt.index(); index.add(rt.encode_image(gallery)); index.search(rt.encode_text(q), k=5)

Preprocessing and tokenisation run here, in numpy/torch on the CPU; only the two exported
graphs (``export.specs.clip_graphs``) run on the backend.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from export.specs import GraphSpec, clip_graphs
from fmrt import pretrained
from fmrt.data.vocab import apply_template
from fmrt.preprocess import PreprocessConfig, preprocess_images
from fmrt.runtime.base import BackendUnavailableError, Engine, RuntimeLoadError
from fmrt.runtime.index import RetrievalIndex

MAX_LABELS = 1000
MAX_TEXTS = 4096
DEFAULT_TEMPLATES = ("{}",)


class ClassifyInputError(ValueError):
    """Bad labels or templates for zero-shot classification."""


# backend -> callable(model_dir, graphs, **kw) -> {graph name: Engine}
_ENGINE_LOADERS: Dict[str, Callable[..., Dict[str, Engine]]] = {}


def register_engine_loader(backend: str):
    def deco(fn):
        _ENGINE_LOADERS[backend] = fn
        return fn

    return deco


@register_engine_loader("torch")
def _torch_engines(model_dir: str, graphs: Dict[str, GraphSpec], *, device: str = "cpu",
                   **_) -> Dict[str, Engine]:
    model = pretrained.load_pretrained(model_dir).model.to(device).eval()
    img, txt = graphs["image_encoder"], graphs["text_encoder"]

    @torch.inference_mode()
    def run_image(inputs):
        x = torch.from_numpy(inputs[img.input_names[0]]).to(device)
        return {img.output_names[0]: model.encode_image(x, normalize=True).float().cpu().numpy()}

    @torch.inference_mode()
    def run_text(inputs):
        x = torch.from_numpy(inputs[txt.input_names[0]]).to(device)
        return {txt.output_names[0]: model.encode_text(x, normalize=True).float().cpu().numpy()}

    engines = {"image_encoder": run_image, "text_encoder": run_text}
    if hasattr(model, "generate"):  # CoCa: greedy captioning runs in torch on every backend
        engines["captioner"] = model
    return engines


def _engine_loader(backend: str) -> Callable[..., Dict[str, Engine]]:
    if backend not in _ENGINE_LOADERS:
        # Backends register on import; importing lazily keeps onnxruntime/tensorrt optional.
        import importlib

        mod = {"onnxruntime": "fmrt.runtime.onnxruntime_backend",
               "tensorrt": "fmrt.runtime.tensorrt_backend"}.get(backend)
        if mod is None:
            raise RuntimeLoadError(f"unknown backend {backend!r}")
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {e}") from e
    return _ENGINE_LOADERS[backend]


class ClipRuntime:
    def __init__(self, *, name: str, engines: Dict[str, Engine], graphs: Dict[str, GraphSpec],
                 tokenizer, preprocess: PreprocessConfig, logit_scale: float,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, backend: str = "torch",
                 max_batch: int = 64, family: str = "clip") -> None:
        self.name, self.backend, self.family = name, backend, family
        self.engines, self.graphs = engines, graphs
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.logit_scale = float(logit_scale)
        self.templates = tuple(templates)
        self.max_batch = int(max_batch)
        self.embed_dim = int(graphs["image_encoder"].outputs[0].shape[1])
        self._classifiers: "OrderedDict[Tuple, np.ndarray]" = OrderedDict()

    @classmethod
    def load(cls, name_or_path: str, backend: str = "torch", **kwargs) -> "ClipRuntime":
        model_dir = pretrained.resolve(name_or_path)
        cfg = pretrained.read_config(model_dir)
        family = cfg.get("family")
        if family not in ("clip", "coca"):
            raise RuntimeLoadError(f"{name_or_path} is a {family!r} model, not clip/coca")
        arch = cfg["config"]
        graphs = clip_graphs(image_size=arch["vision"]["image_size"],
                             context_length=arch["text"]["context_length"],
                             embed_dim=arch["embed_dim"])
        engines = _engine_loader(backend)(model_dir, graphs, **kwargs)
        if family == "coca" and "captioner" not in engines:
            # The autoregressive decoder is not exported yet; captions run on the torch model.
            engines["captioner"] = _torch_engines(model_dir, graphs)["captioner"]
        log_scale = float(pretrained.read_tensor(model_dir, "logit_scale").float()
                          .clamp(max=np.log(100.0)))
        from fmrt.models.tokenizer import load_tokenizer

        return cls(name=os.path.basename(os.path.normpath(model_dir)), engines=engines,
                   graphs=graphs, tokenizer=load_tokenizer(model_dir),
                   preprocess=pretrained.PreprocessConfig.from_dict(cfg.get("preprocess", {})),
                   logit_scale=float(np.exp(log_scale)),
                   templates=cfg.get("zero_shot_templates", DEFAULT_TEMPLATES), backend=backend,
                   family=family)

    # ------------------------------------------------------------------ encoders
    def _run_batched(self, graph: str, x: np.ndarray) -> np.ndarray:
        spec = self.graphs[graph]
        outs = [self.engines[graph]({spec.input_names[0]: x[i: i + self.max_batch]})
                [spec.output_names[0]] for i in range(0, x.shape[0], self.max_batch)]
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)

    def encode_image(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``images``: list of ``H x W x 3`` uint8 RGB arrays of any size. Returns ``N x E``
        float32, L2-normalised. Raises ``InvalidImageError`` for bad images."""
        pixels = preprocess_images(images, self.preprocess).numpy()
        return self._run_batched("image_encoder", pixels)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """``texts``: list of strings. Returns ``N x E`` float32, L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ClassifyInputError("texts is empty")
        if len(texts) > MAX_TEXTS:
            raise ClassifyInputError(f"at most {MAX_TEXTS} texts per call, got {len(texts)}")
        ids = self.tokenizer(list(texts)).numpy()
        return self._run_batched("text_encoder", ids)

    # ------------------------------------------------------------------ zero-shot
    def text_classifier(self, labels: Sequence[str], templates: Optional[Sequence[str]] = None
                        ) -> np.ndarray:
        """``L x E`` class embeddings: per label, the mean of its normalised template embeddings,
        re-normalised (CLIP's prompt ensemble). Cached per (labels, templates)."""
        templates = tuple(templates) if templates is not None else self.templates
        labels = tuple(labels) if isinstance(labels, (list, tuple)) else labels
        if not isinstance(labels, tuple) or not all(isinstance(s, str) and s for s in labels):
            raise ClassifyInputError("labels must be a non-empty list of non-empty strings")
        if not 1 <= len(labels) <= MAX_LABELS:
            raise ClassifyInputError(f"need 1 to {MAX_LABELS} labels, got {len(labels)}")
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ClassifyInputError("templates must be a non-empty list of strings containing '{}'")
        key = (labels, templates)
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        emb = self.encode_text([apply_template(t, lbl) for lbl in labels for t in templates])
        emb = emb.reshape(len(labels), len(templates), -1).mean(axis=1)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True).clip(min=1e-12)
        self._classifiers[key] = emb
        if len(self._classifiers) > 64:
            self._classifiers.popitem(last=False)
        return emb

    def classify(self, images: Sequence[np.ndarray], labels: Sequence[str],
                 templates: Optional[Sequence[str]] = None) -> np.ndarray:
        """Zero-shot probabilities ``N x L`` (rows sum to 1, columns in ``labels`` order)."""
        w = self.text_classifier(labels, templates)
        logits = self.logit_scale * self.encode_image(images) @ w.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def generate_caption(self, images: Sequence[np.ndarray], max_length: Optional[int] = None
                         ) -> List[str]:
        """CoCa only: greedy captions, one string per image."""
        model = self.engines.get("captioner")
        if model is None:
            raise RuntimeLoadError(f"{self.name} is a {self.family} model; it has no caption decoder")
        pixels = preprocess_images(images, self.preprocess)
        out: List[str] = []
        for i in range(0, pixels.shape[0], self.max_batch):
            ids = model.generate(pixels[i: i + self.max_batch],
                                 sot_token_id=self.tokenizer.sot_token_id,
                                 eot_token_id=self.tokenizer.eot_token_id, max_length=max_length,
                                 vocab_size=self.tokenizer.vocab_size)
            out.extend(self.tokenizer.decode(row) for row in ids.tolist())
        return out

    def index(self, dtype: str = "float32") -> RetrievalIndex:
        """An empty retrieval index sized for this model's embeddings."""
        return RetrievalIndex(self.embed_dim, dtype=dtype)

    def info(self) -> Dict[str, object]:
        return {"name": self.name, "family": self.family, "backend": self.backend,
                "embed_dim": self.embed_dim, "image_size": self.preprocess.image_size,
                "context_length": self.tokenizer.context_length}
