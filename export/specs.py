"""The one definition of every exported graph: file name, input/output names, dtypes, shapes
with their dynamic axes, and TensorRT optimisation-profile ranges. The exporter writes graphs
from these specs and every runtime loader feeds/reads tensors by these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple, Union

import numpy as np

Dim = Union[int, str]  # str = a named dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: Tuple[Dim, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def dynamic_axes(self) -> Dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    # (min, opt, max) of the batch axis for TensorRT profiles; ORT accepts any batch.
    batch_profile: Tuple[int, int, int] = (1, 8, 64)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def validate_inputs(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The feed dict every backend runs: each input present, cast to its dtype, contiguous,
        static dims and a common batch size checked (KeyError / ValueError otherwise)."""
        feed: Dict[str, np.ndarray] = {}
        batch = None
        for t in self.inputs:
            if t.name not in inputs:
                raise KeyError(f"{self.name}: missing input {t.name!r}; got {sorted(inputs)}")
            x = np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype)
            if x.ndim != len(t.shape) or any(not isinstance(s, str) and d != s
                                             for d, s in zip(x.shape, t.shape)):
                raise ValueError(f"{self.name}: {t.name} has shape {x.shape}, expected {t.shape}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"{self.name}: inputs disagree on the batch size")
            batch = x.shape[0]
            feed[t.name] = x
        return feed

    def concrete_shape(self, spec: TensorSpec, batch: int) -> Tuple[int, ...]:
        return tuple(batch if d == "batch" else d for d in spec.shape)  # type: ignore[misc]


BATCH = "batch"


def clip_graphs(*, image_size: int, context_length: int, embed_dim: int) -> Dict[str, GraphSpec]:
    """CLIP's two towers. Outputs are L2-normalised embeddings (normalisation is inside the
    graph so every backend returns identical features)."""
    return {
        "image_encoder": GraphSpec(
            "image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, image_size, image_size)),),
            outputs=(TensorSpec("image_embeds", "float32", (BATCH, embed_dim)),)),
        "text_encoder": GraphSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", (BATCH, context_length)),),
            outputs=(TensorSpec("text_embeds", "float32", (BATCH, embed_dim)),)),
    }


@dataclass(frozen=True)
class MultiAxisGraphSpec(GraphSpec):
    """A graph whose inputs do not share one leading batch axis (SAM's prompt decoder: one image
    embedding ``[1, C, h, w]`` for ``batch`` prompts of ``num_points`` points each).

    Every named axis must take one value across all inputs that carry it. ``axis_profiles``
    gives the TensorRT (min, opt, max) of the named axes other than ``batch``;
    ``concrete_shape(t, b)`` with ``b`` = the min / opt / max of ``batch_profile`` gives those
    axes their min / opt / max (``export.tensorrt_build`` builds one profile from these three
    calls, so keep the ``batch_profile`` values distinct).
    """

    axis_profiles: Tuple[Tuple[str, Tuple[int, int, int]], ...] = ()

    def axis_profile(self, axis: str) -> Tuple[int, int, int]:
        if axis == BATCH:
            return self.batch_profile
        for name, prof in self.axis_profiles:
            if name == axis:
                return prof
        raise KeyError(f"{self.name}: no profile for axis {axis!r}")

    def validate_inputs(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        feed: Dict[str, np.ndarray] = {}
        seen: Dict[str, Tuple[int, str]] = {}
        for t in self.inputs:
            if t.name not in inputs:
                raise KeyError(f"{self.name}: missing input {t.name!r}; got {sorted(inputs)}")
            x = np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype)
            if x.ndim != len(t.shape) or any(not isinstance(s, str) and d != s
                                             for d, s in zip(x.shape, t.shape)):
                raise ValueError(f"{self.name}: {t.name} has shape {x.shape}, expected {t.shape}")
            for d, s in zip(x.shape, t.shape):
                if isinstance(s, str):
                    if s in seen and seen[s][0] != d:
                        raise ValueError(f"{self.name}: axis {s!r} is {seen[s][0]} in "
                                         f"{seen[s][1]} but {d} in {t.name}")
                    seen.setdefault(s, (d, t.name))
            feed[t.name] = x
        return feed

    def concrete_shape(self, spec: TensorSpec, batch: int) -> Tuple[int, ...]:
        pos = self.batch_profile.index(batch) if batch in self.batch_profile else 1
        out = []
        for d in spec.shape:
            if d == BATCH:
                out.append(batch)
            elif isinstance(d, str):
                out.append(self.axis_profile(d)[pos])
            else:
                out.append(d)
        return tuple(out)


SAM_NUM_POINTS = "num_points"
# TensorRT profiles of SAM's prompt decoder: up to 64 prompts per call (the automatic mask
# generator's default points_per_batch), optimised for 16; up to 16 points per prompt, optimised
# for 2 (one click + the padding point, the generator's case).
SAM_PROMPT_PROFILE = (1, 16, 64)
SAM_POINTS_PROFILE = (1, 2, 16)


def sam_graphs(*, img_size: int, embed_dim: int, embed_size: int, num_masks: int = 4
               ) -> Dict[str, GraphSpec]:
    """Segment Anything's graphs.

    * ``image_encoder``: ``pixel_values`` ``[batch, 3, S, S]`` (resized so the longest side is
      ``S = img_size``, normalised with the model's pixel mean/std, zero-padded right/bottom) ->
      ``image_embeddings`` ``[batch, C, h, h]``.
    * ``mask_decoder``: segment-anything's ONNX decoder contract (``SamOnnxModel``, all
      ``num_masks`` = 4 masks, index 0 the single-mask output): ``image_embeddings``
      ``[1, C, h, h]``, ``point_coords`` ``[batch, num_points, 2]`` (x, y in pixels of the
      resized input frame), ``point_labels`` ``[batch, num_points]`` (float: -1 padding, 0 negative,
      1 positive, 2 / 3 box top-left / bottom-right), ``mask_input`` ``[1, 1, 4h, 4h]`` low-res
      logits, ``has_mask_input`` ``[1]`` (0 or 1), ``orig_im_size`` ``[2]`` (H, W as floats) ->
      ``masks`` ``[batch, 4, H, W]`` logits at the original size, ``iou_predictions``
      ``[batch, 4]``, ``low_res_masks`` ``[batch, 4, 4h, 4h]``. segment-anything fixes
      ``batch`` = 1; here a batch of prompts (same point count) shares the image embedding.
    * ``mask_decoder_lowres``: the same graph without ``orig_im_size`` / ``masks`` (what the
      predictor runs on every backend; the resize to the original size is done on the host).
    """
    h, m = embed_size, 4 * embed_size
    enc = GraphSpec(
        "image_encoder",
        inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, img_size, img_size)),),
        outputs=(TensorSpec("image_embeddings", "float32", (BATCH, embed_dim, h, h)),),
        batch_profile=(1, 1, 4))
    prompts = (TensorSpec("image_embeddings", "float32", (1, embed_dim, h, h)),
               TensorSpec("point_coords", "float32", (BATCH, SAM_NUM_POINTS, 2)),
               TensorSpec("point_labels", "float32", (BATCH, SAM_NUM_POINTS)),
               TensorSpec("mask_input", "float32", (1, 1, m, m)),
               TensorSpec("has_mask_input", "float32", (1,)))
    iou = TensorSpec("iou_predictions", "float32", (BATCH, num_masks))
    low = TensorSpec("low_res_masks", "float32", (BATCH, num_masks, m, m))
    axes = ((SAM_NUM_POINTS, SAM_POINTS_PROFILE),)
    dec = MultiAxisGraphSpec(
        "mask_decoder",
        inputs=prompts + (TensorSpec("orig_im_size", "float32", (2,)),),
        outputs=(TensorSpec("masks", "float32", (BATCH, num_masks, "orig_height", "orig_width")),
                 iou, low),
        batch_profile=SAM_PROMPT_PROFILE, axis_profiles=axes)
    low_dec = MultiAxisGraphSpec("mask_decoder_lowres", inputs=prompts, outputs=(iou, low),
                                 batch_profile=SAM_PROMPT_PROFILE, axis_profiles=axes)
    return {"image_encoder": enc, "mask_decoder": dec, "mask_decoder_lowres": low_dec}


# ----------------------------------------------------------------------------- VLMs
VLM_SEQ, VLM_PAST, VLM_TOTAL, VLM_MEDIA = "seq", "past", "total", "num_media"
# TensorRT profiles of the VLM graphs: batch up to 16 rows (the serving batch), optimised for 4;
# prompt / past lengths up to the LM context, optimised for 128 (a 64-token ShapesWorld image
# plus a question); up to 8 images per row, optimised for 2. ORT takes any size.
VLM_BATCH_PROFILE = (1, 4, 16)
VLM_IMAGE_BATCH_PROFILE = (1, 4, 32)


def vlm_graphs(*, family: str, image_size: int, hidden_size: int, vocab_size: int,
               num_layers: int, kv_heads: int, head_dim: int, context_length: int,
               image_seq_length: int = 0, num_latents: int = 0, vision_width: int = 0,
               max_images: int = 8) -> Dict[str, GraphSpec]:
    """A VLM's three graphs (``export.vlm_export``; ``fmrt.runtime.vlm`` feeds them).

    * ``vision`` (LLaVA): ``pixel_values`` ``[batch, 3, S, S]`` (one row per image, normalised)
      -> ``image_features`` ``[batch, image_seq_length, hidden]`` (tower + projector: the LM
      embeddings that replace the image placeholders).
    * ``resampler`` (Flamingo): ``pixel_values`` ``[batch, num_media, 3, S, S]`` -> ``media``
      ``[batch, num_media, num_latents, vision_width]`` (vision encoder + perceiver).
    * ``lm_prefill``: the left-padded prompt -> ``logits`` ``[batch, vocab]`` of the last
      position and ``present.{i}.key|value`` ``[batch, kv_heads, seq, head_dim]``. Inputs:
      LLaVA ``inputs_embeds`` ``[batch, seq, hidden]``; Flamingo ``input_ids`` ``[batch, seq]``
      plus ``media`` and ``media_locations`` ``[batch, seq]`` (1 at ``<image>`` tokens). Both
      take ``attention_mask`` ``[batch, seq]`` (int64, 0 = left padding; rotary positions count
      real tokens only).
    * ``lm_decode``: one token per row: ``input_ids`` ``[batch, 1]``, ``position_ids``
      ``[batch, 1]`` (real tokens before it), ``past_mask`` ``[batch, past]`` (int64, 0 = padding
      slot), ``past.{i}.key|value`` ``[batch, kv_heads, past, head_dim]`` (Flamingo also
      ``media`` and ``media_index`` ``[batch, 1]``: the number of ``<image>`` tokens up to and
      including this one) -> ``logits`` ``[batch, vocab]`` and ``present.{i}.key|value``
      ``[batch, kv_heads, total = past + 1, head_dim]``.
    """
    if family not in ("llava", "flamingo"):
        raise ValueError(f"no VLM graphs for family {family!r}")
    ctx = int(context_length)
    opt = min(128, ctx)
    axes = ((VLM_SEQ, (1, opt, ctx)), (VLM_PAST, (1, opt, ctx - 1)),
            (VLM_MEDIA, (1, min(2, max_images), max_images)))
    logits = TensorSpec("logits", "float32", (BATCH, vocab_size))

    def kv(prefix: str, axis: str):
        shape = (BATCH, kv_heads, axis, head_dim)
        return tuple(TensorSpec(f"{prefix}.{i}.{kind}", "float32", shape)
                     for i in range(num_layers) for kind in ("key", "value"))

    mask = TensorSpec("attention_mask", "int64", (BATCH, VLM_SEQ))
    step_in = (TensorSpec("input_ids", "int64", (BATCH, 1)),
               TensorSpec("position_ids", "int64", (BATCH, 1)),
               TensorSpec("past_mask", "int64", (BATCH, VLM_PAST)))
    graphs: Dict[str, GraphSpec] = {}
    if family == "llava":
        graphs["vision"] = GraphSpec(
            "vision",
            inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, image_size, image_size)),),
            outputs=(TensorSpec("image_features", "float32",
                                (BATCH, image_seq_length, hidden_size)),),
            batch_profile=VLM_IMAGE_BATCH_PROFILE)
        pre_in = (TensorSpec("inputs_embeds", "float32", (BATCH, VLM_SEQ, hidden_size)), mask)
        media_pre = media_dec = ()
    else:
        media = TensorSpec("media", "float32", (BATCH, VLM_MEDIA, num_latents, vision_width))
        graphs["resampler"] = MultiAxisGraphSpec(
            "resampler",
            inputs=(TensorSpec("pixel_values", "float32",
                               (BATCH, VLM_MEDIA, 3, image_size, image_size)),),
            outputs=(media,), batch_profile=VLM_BATCH_PROFILE, axis_profiles=axes)
        pre_in = (TensorSpec("input_ids", "int64", (BATCH, VLM_SEQ)), mask)
        media_pre = (media, TensorSpec("media_locations", "int64", (BATCH, VLM_SEQ)))
        media_dec = (media, TensorSpec("media_index", "int64", (BATCH, 1)))
    graphs["lm_prefill"] = MultiAxisGraphSpec(
        "lm_prefill", inputs=pre_in + media_pre, outputs=(logits,) + kv("present", VLM_SEQ),
        batch_profile=VLM_BATCH_PROFILE, axis_profiles=axes)
    graphs["lm_decode"] = MultiAxisGraphSpec(
        "lm_decode", inputs=step_in + media_dec + kv("past", VLM_PAST),
        outputs=(logits,) + kv("present", VLM_TOTAL),
        batch_profile=VLM_BATCH_PROFILE, axis_profiles=axes)
    return graphs
