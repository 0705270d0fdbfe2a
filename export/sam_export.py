"""PyTorch -> ONNX for Segment Anything: the image encoder and the prompt decoder.

    paths = export_sam("shapes-sam", "out/")   # image_encoder, mask_decoder(_lowres)
    onnx_dir = sam_onnx_dir("shapes-sam")        # $FMRT_CACHE_DIR/onnx/<name>-<sha12>/, cached

Graphs, I/O names, dtypes and dynamic axes come from ``export.specs.sam_graphs``:

* ``image_encoder.onnx``: normalised, padded pixels -> image embeddings (dynamic batch).
* ``mask_decoder.onnx``: segment-anything's ONNX decoder contract (``SamOnnxModel`` with
  ``return_single_mask=False``): prompt encoder + mask decoder + the resize of the 4 masks to
  ``orig_im_size``; dynamic prompt batch and point count.
* ``mask_decoder_lowres.onnx``: the same graph cut before the resize (extracted from
  ``mask_decoder.onnx`` with ``onnx.utils.extract_model``, not exported twice). The predictor
  facade runs this one on every backend and resizes on the host with
  ``fmrt.kernels.postprocess_masks``: the full-resolution output is data-dependent in shape
  (TensorRT cannot size it before running) and, for the automatic mask generator, 64 prompts x
  4 masks at 1024^2 would be 1 GiB of logits of which the IoU filter keeps a fraction.

The resize to ``orig_im_size`` has a data-dependent output shape, which ``torch.export`` cannot
trace through ``F.interpolate``; it is one custom op, ``fmrt::sam_masks_to_original`` (eager:
``fmrt.kernels.postprocess_masks``), translated to ONNX ``Resize -> Slice -> Resize`` with the
sizes computed in float32 exactly as ``SamOnnxModel.mask_postprocessing`` does.

A ``manifest.json`` in ``export.onnx_export``'s format (``family: "sam"``) records files, hashes,
the weights' sha256 and the architecture, so the cache is keyed by the weights.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import uuid
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from export.specs import BATCH, SAM_NUM_POINTS, GraphSpec, sam_graphs

DEFAULT_OPSET = 18
SAM_GRAPHS = ("image_encoder", "mask_decoder", "mask_decoder_lowres")
VARIANTS = {"float32": "", "float16": ".fp16"}

_export_count = 0


def export_count() -> int:
    """Graphs exported by ``export_sam`` in this process (tests check cache reuse with it)."""
    return _export_count


# --------------------------------------------------------------------------- resize custom op
def prepadded_size(orig_im_size: Tensor, img_size: int) -> Tensor:
    """``SamOnnxModel.resize_longest_image_size``: (H, W) of the image resized so its longest side
    is ``img_size``, in float32 arithmetic then ``floor(x + 0.5)`` -> int64 ``[2]``."""
    size = orig_im_size.to(torch.float32)
    scale = img_size / torch.max(size)
    return torch.floor(scale * size + 0.5).to(torch.int64)


@torch.library.custom_op("fmrt::sam_masks_to_original", mutates_args=())
def _masks_to_original_op(masks: Tensor, orig_im_size: Tensor, img_size: int) -> Tensor:
    """``[B, M, h, w]`` low-res logits -> ``[B, M, H, W]`` at ``orig_im_size`` (float ``[2]``)."""
    from fmrt.kernels import postprocess_masks

    ih, iw = (int(v) for v in prepadded_size(orig_im_size, img_size).tolist())
    oh, ow = (int(v) for v in orig_im_size.to(torch.int64).tolist())
    return postprocess_masks(masks, (ih, iw), (oh, ow), img_size=int(img_size)).clone()


@_masks_to_original_op.register_fake
def _(masks, orig_im_size, img_size):
    ctx = torch.library.get_ctx()
    h, w = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return masks.new_empty((masks.shape[0], masks.shape[1], h, w))


def masks_to_original(masks: Tensor, orig_im_size: Tensor, img_size: int) -> Tensor:
    """``SamOnnxModel.mask_postprocessing`` as one graph node (see the module doc)."""
    return torch.ops.fmrt.sam_masks_to_original(masks, orig_im_size, int(img_size))


def onnx_translation_table() -> Dict[object, object]:
    """``fmrt::sam_masks_to_original`` as ONNX: Resize to the padded square, Slice to the
    prepadded size, Resize to ``orig_im_size`` (bilinear, half-pixel centres: torch's
    ``align_corners=False``)."""
    from onnxscript import opset18 as op

    INT64, FLOAT = 7, 1

    def sam_masks_to_original(masks, orig_im_size, img_size: int = 1024):
        nc = op.Slice(op.Shape(masks), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
        square = op.Concat(nc, op.Constant(value_ints=[img_size, img_size]), axis=0)
        up = op.Resize(masks, None, None, square, mode="linear",
                       coordinate_transformation_mode="half_pixel")
        size = op.Cast(orig_im_size, to=FLOAT)
        scale = op.Div(op.Constant(value_float=float(img_size)),
                       op.ReduceMax(size, keepdims=1))
        pre = op.Cast(op.Floor(op.Add(op.Mul(scale, size), op.Constant(value_float=0.5))),
                      to=INT64)
        crop = op.Slice(up, op.Constant(value_ints=[0, 0]), pre, op.Constant(value_ints=[2, 3]))
        out_size = op.Concat(nc, op.Cast(orig_im_size, to=INT64), axis=0)
        return op.Resize(crop, None, None, out_size, mode="linear",
                         coordinate_transformation_mode="half_pixel")

    return {torch.ops.fmrt.sam_masks_to_original.default: sam_masks_to_original}


# --------------------------------------------------------------------------- graph modules
class SamImageEncoderGraph(nn.Module):
    """``pixel_values`` [B, 3, S, S] (normalised + padded) -> ``image_embeddings`` [B, C, h, w].
    With a float16 model the pixels are cast on entry and the embeddings back to float32."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.dtype = sam.image_encoder.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.image_encoder(pixel_values.to(self.dtype)).float()


class SamPromptDecoder(nn.Module):
    """Prompt encoder + mask decoder with segment-anything's ONNX input convention
    (``SamOnnxModel._embed_points`` / ``_embed_masks``), all mask tokens out.

    forward(image_embeddings [1, C, h, w], point_coords [B, N, 2], point_labels [B, N] float,
    mask_input [1, 1, 4h, 4w], has_mask_input [1]) -> (iou_predictions [B, M],
    low_res_masks [B, M, 4h, 4w]).

    Point coordinates are in pixels of the resized input frame; labels -1 (padding: no position,
    the "not a point" embedding), 0 / 1 (negative / positive), 2 / 3 (box corners). The dense
    positional encoding of the image grid is precomputed (a constant of the graph).
    ``decode(..., select=)`` is the eager path of the torch backend: the mask head runs through
    the fused ``fmrt.kernels.decode_masks`` and only the selected masks are computed.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.img_size = int(sam.image_encoder.img_size)
        h, w = sam.prompt_encoder.image_embedding_size
        with torch.no_grad():
            y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
            x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
            grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
            pe = self._fourier(grid).permute(2, 0, 1).unsqueeze(0)   # PromptEncoder.get_dense_pe
        self.register_buffer("image_pe", pe.to(self.dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_encoder.no_mask_embed.weight.dtype

    def _fourier(self, coords: Tensor) -> Tensor:
        """``PositionEmbeddingRandom._pe_encoding`` in float32 whatever the model's dtype (a
        float16 model keeps float32 positions: 1024 px need 11+ mantissa bits), then cast."""
        g = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()
        c = 2 * math.pi * ((2 * coords - 1) @ g)
        return torch.cat([torch.sin(c), torch.cos(c)], dim=-1).to(self.dtype)

    def embed_points(self, point_coords: Tensor, point_labels: Tensor) -> Tensor:
        coords = (point_coords.float() + 0.5) / self.img_size
        emb = self._fourier(coords)
        labels = point_labels.to(self.dtype).unsqueeze(-1)
        emb = emb * (labels != -1).to(emb.dtype)
        emb = emb + self.prompt_encoder.not_a_point_embed.weight * (labels == -1).to(emb.dtype)
        for i in range(self.prompt_encoder.num_point_embeddings):
            emb = emb + self.prompt_encoder.point_embeddings[i].weight * (labels == i).to(emb.dtype)
        return emb

    def embed_masks(self, mask_input: Tensor, has_mask_input: Tensor) -> Tensor:
        has = has_mask_input.to(self.dtype)
        emb = has * self.prompt_encoder.mask_downscaling(mask_input.to(self.dtype))
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return emb + (1 - has) * no_mask

    def forward(self, image_embeddings: Tensor, point_coords: Tensor, point_labels: Tensor,
                mask_input: Tensor, has_mask_input: Tensor) -> Tuple[Tensor, Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(mask_input, has_mask_input)
        low, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings.to(self.dtype), image_pe=self.image_pe,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return iou.float(), low.float()

    @torch.no_grad()
    def decode(self, image_embeddings: Tensor, point_coords: Tensor, point_labels: Tensor,
               mask_input: Optional[Tensor], select: str = "all",
               backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
        """Eager decode: ``mask_input`` None skips the mask downscaler (the no-mask embedding is
        what ``has_mask_input = 0`` selects). Returns (iou [B, M'], low-res logits
        [B, M', 4h, 4w]) for ``select`` in ``fmrt.kernels.decode_masks``' modes; ``backend`` is
        decode_masks' backend, or ``"unfused"`` for the module's own mask head."""
        from fmrt.kernels import decode_masks
        from fmrt.kernels.mask_decode import upscaling_params

        sparse = self.embed_points(point_coords, point_labels)
        if mask_input is None:
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, *image_embeddings.shape[-2:])
        else:
            dense = self.prompt_encoder.mask_downscaling(mask_input.to(self.dtype))
        src, hyper_in, iou = self.mask_decoder._run(image_embeddings.to(self.dtype), self.image_pe,
                                                    sparse, dense)
        if backend == "unfused":  # the module's own upscaling, only the selected masks
            from fmrt.kernels.mask_decode import _select

            hyper, iou_sel, _ = _select(hyper_in, iou, select)
            return iou_sel.float(), self.mask_decoder._upscale_and_project(src, hyper).float()
        out = decode_masks(src, hyper_in, **upscaling_params(self.mask_decoder.output_upscaling),
                           iou_pred=iou, select=select, backend=backend)
        return out.iou_pred.float(), out.masks.float()


class SamOnnxDecoder(nn.Module):
    """segment-anything's ONNX decoder contract: ``SamPromptDecoder`` + the resize of all masks
    to ``orig_im_size``; returns (masks, iou_predictions, low_res_masks)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.decoder = SamPromptDecoder(sam)

    def forward(self, image_embeddings: Tensor, point_coords: Tensor, point_labels: Tensor,
                mask_input: Tensor, has_mask_input: Tensor, orig_im_size: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor]:
        iou, low = self.decoder(image_embeddings, point_coords, point_labels, mask_input,
                                has_mask_input)
        masks = masks_to_original(low, orig_im_size, self.decoder.img_size)
        return masks, iou, low


# --------------------------------------------------------------------------- sources
def graphs_for_sam(model: nn.Module) -> Dict[str, GraphSpec]:
    """``export.specs.sam_graphs`` sized for a ``Sam`` module."""
    pe = model.prompt_encoder
    return sam_graphs(img_size=int(model.image_encoder.img_size), embed_dim=int(pe.embed_dim),
                      embed_size=int(pe.image_embedding_size[0]),
                      num_masks=int(model.mask_decoder.num_mask_tokens))


def graphs_for_config(arch: Dict[str, Any]) -> Dict[str, GraphSpec]:
    """The same from an architecture dict (``SamConfig.to_dict()``), without building the model."""
    from fmrt.models.sam import SamConfig

    cfg = SamConfig.from_dict(arch)
    return sam_graphs(img_size=cfg.encoder.img_size, embed_dim=cfg.prompt_embed_dim,
                      embed_size=cfg.image_embedding_size,
                      num_masks=cfg.decoder.num_multimask_outputs + 1)


class SamSource:
    """A SAM model to export or serve: the module, its architecture dict, the sha256 of its
    weights (the cache key), a name, and the model directory or checkpoint file (if any)."""

    def __init__(self, model: nn.Module, arch: Dict[str, Any], sha: str, name: str,
                 path: str = "") -> None:
        self._model, self.arch, self.sha, self.name, self.path = model, arch, sha, name, path

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = load_sam_module(self.path)
        return self._model


def load_sam_module(path: str) -> nn.Module:
    """A ``Sam`` from a model directory, bundled name or checkpoint file."""
    from fmrt import pretrained
    from fmrt.models.sam import load_sam_checkpoint

    if os.path.isfile(path):
        return load_sam_checkpoint(path)
    return pretrained.load_pretrained(path).model


def resolve_source(src: Any, *, load: bool = True) -> SamSource:
    """A bundled name, a model directory (``family: "sam"``), a segment-anything checkpoint
    file, a ``SamSource`` or a ``Sam`` module (with ``.config``). With ``load=False`` a model
    directory's module is built only when first needed (a cached export needs only the hash)."""
    from export.onnx_export import ExportError, _state_dict_sha256, file_sha256, weights_sha256
    from fmrt import pretrained

    if isinstance(src, SamSource):
        return src
    if isinstance(src, nn.Module):
        cfg = getattr(src, "config", None)
        if cfg is None or not hasattr(src, "prompt_encoder"):
            raise ExportError("a SAM module needs .prompt_encoder and .config (use build_sam / "
                              "fmrt.create_model)")
        return SamSource(src, cfg.to_dict(), _state_dict_sha256(src), "sam")
    if not isinstance(src, (str, os.PathLike)):
        raise ExportError(f"cannot export {type(src).__name__}: expected a bundled name, a model "
                          "directory, a checkpoint file or a Sam module")
    path = os.fspath(src)
    if os.path.isfile(path):
        from fmrt.models.sam import load_sam_checkpoint

        model = load_sam_checkpoint(path)
        name = os.path.splitext(os.path.basename(path))[0]
        return SamSource(model, model.config.to_dict(), file_sha256(path), name, path)
    try:
        model_dir = pretrained.resolve(path)
        cfg = pretrained.read_config(model_dir)
    except pretrained.PretrainedError as e:
        raise ExportError(str(e)) from None
    if cfg.get("family") != "sam":
        raise ExportError(f"{path}: family {cfg.get('family')!r} is not 'sam'")
    src_ = SamSource(None, cfg["config"], weights_sha256(model_dir),  # type: ignore[arg-type]
                     os.path.basename(os.path.normpath(model_dir)), model_dir)
    if load:
        src_.model  # noqa: B018 - build now
    return src_


# --------------------------------------------------------------------------- export
def variant_file(spec: GraphSpec, dtype: str = "float32") -> str:
    from export.onnx_export import ExportError

    if dtype not in VARIANTS:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of {sorted(VARIANTS)}")
    return f"{spec.name}{VARIANTS[dtype]}.onnx"


def _example_inputs(spec: GraphSpec, sizes: Dict[str, int]) -> Tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "point_labels":
            x = torch.randint(-1, 4, shape, generator=g).float()
        elif t.name == "has_mask_input":
            x = torch.ones(shape)
        elif t.name == "orig_im_size":
            x = torch.tensor([37.0, 53.0])
        elif t.name == "point_coords":
            x = torch.rand(shape, generator=g) * 32
        else:
            x = torch.randn(shape, generator=g)
        out.append(x.to(getattr(torch, t.dtype)))
    return tuple(out)


def _export_graph(module: nn.Module, spec: GraphSpec, path: str, *, opset: int) -> None:
    """torch.onnx.export (dynamo) of ``module`` with the spec's names and named dynamic axes."""
    from export.onnx_export import _quiet_exporter

    sizes = {BATCH: 2, SAM_NUM_POINTS: 3}
    example = _example_inputs(spec, sizes)
    dims = {BATCH: torch.export.Dim("batch", min=1, max=1 << 16),
            SAM_NUM_POINTS: torch.export.Dim("num_points", min=1, max=1 << 10)}
    dynamic = {t.name: ({ax: dims[name] for ax, name in t.dynamic_axes().items()} or None)
               for t in spec.inputs}
    with _quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(module.eval(), example, None, dynamo=True,
                                 input_names=list(spec.input_names),
                                 output_names=list(spec.output_names),
                                 dynamic_shapes=dynamic, opset_version=opset, optimize=True,
                                 verbose=False, custom_translation_table=onnx_translation_table())
        prog.save(path)


def _extract_lowres(full_path: str, spec: GraphSpec, path: str) -> None:
    import onnx

    onnx.utils.extract_model(full_path, path, list(spec.input_names), list(spec.output_names),
                             check_model=False)


def export_sam(source: Any, out_dir: str, *, opset: int = DEFAULT_OPSET, dtype: str = "float32",
               graphs: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Export SAM's graphs to ``out_dir`` (created) as ``export.specs.sam_graphs``.

    Args:
        source: bundled name, model directory, checkpoint file, ``SamSource`` or ``Sam`` module.
        out_dir: destination; receives ``<graph>.onnx`` files and (float32) ``manifest.json``.
        opset: ONNX opset (default 18).
        dtype: ``"float32"``, or ``"float16"`` for the ``<graph>.fp16.onnx`` variants (float16
            weights and compute, float32 I/O: TensorRT's strongly typed fp16 builds).
        graphs: a subset of ``SAM_GRAPHS`` (``mask_decoder_lowres`` is cut from
            ``mask_decoder`` when both are exported, else exported on its own).
    Returns:
        ``{graph name: path}``. Each graph is pinned to the spec's I/O and passes
        ``onnx.checker.check_model(full_check=True)``.
    """
    global _export_count
    import onnx

    import fmrt
    from export.onnx_export import (EXPORT_FORMAT, MANIFEST_FILE, ExportError, _finalize_graph,
                                    _json_sha256, file_sha256, graph_code_sha256)

    src = resolve_source(source)
    model = src.model
    model = (copy.deepcopy(model).half() if dtype == "float16" else model.float()).eval()
    specs = graphs_for_sam(model)
    names = list(graphs) if graphs is not None else list(SAM_GRAPHS)
    bad = [g for g in names if g not in specs]
    if bad:
        raise ExportError(f"unknown SAM graphs {bad}; choose from {list(specs)}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"fmrt.weights_sha256": src.sha, "fmrt.version": fmrt.__version__, "fmrt.dtype": dtype}
    paths: Dict[str, str] = {}
    if "image_encoder" in names:
        spec = specs["image_encoder"]
        path = os.path.join(out_dir, variant_file(spec, dtype))
        _export_graph(SamImageEncoderGraph(model), spec, path, opset=opset)
        _finalize_graph(path, spec, {**meta, "fmrt.graph": spec.name})
        paths[spec.name] = path
    if "mask_decoder_lowres" in names and "mask_decoder" not in names:
        # alone (e.g. the fp16 variant for TensorRT): exported directly, no resize to cut
        low = specs["mask_decoder_lowres"]
        lpath = os.path.join(out_dir, variant_file(low, dtype))
        _export_graph(SamPromptDecoder(model), low, lpath, opset=opset)
        _finalize_graph(lpath, low, {**meta, "fmrt.graph": low.name})
        paths[low.name] = lpath
    elif "mask_decoder" in names:
        spec = specs["mask_decoder"]
        path = os.path.join(out_dir, variant_file(spec, dtype))
        _export_graph(SamOnnxDecoder(model), spec, path, opset=opset)
        if "mask_decoder_lowres" in names:
            low = specs["mask_decoder_lowres"]
            lpath = os.path.join(out_dir, variant_file(low, dtype))
            _extract_lowres(path, low, lpath)
            _finalize_graph(lpath, low, {**meta, "fmrt.graph": low.name})
            paths[low.name] = lpath
        _finalize_graph(path, spec, {**meta, "fmrt.graph": spec.name})
        paths[spec.name] = path
    _export_count += len(paths)
    if dtype != "float32":
        return paths
    entries = {g: {"file": os.path.basename(p), "sha256": file_sha256(p),
                   "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                              for t in specs[g].inputs],
                   "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                               for t in specs[g].outputs],
                   "batch_profile": list(specs[g].batch_profile)}
               for g, p in paths.items()}
    old = _read_manifest(out_dir)
    if (old and old.get("weights_sha256") == src.sha  # exporting a subset keeps the others
            and old.get("code_sha256") == graph_code_sha256("sam")):
        entries = {**{g: e for g, e in old.get("graphs", {}).items()
                      if os.path.isfile(os.path.join(out_dir, e["file"]))}, **entries}
    manifest = {"format": EXPORT_FORMAT, "family": "sam", "name": src.name,
                "weights_sha256": src.sha, "config_sha256": _json_sha256(src.arch),
                "code_sha256": graph_code_sha256("sam"), "fmrt_version": fmrt.__version__,
                "torch_version": torch.__version__,
                "onnx_version": onnx.__version__, "opset": opset, "exporter": "dynamo",
                "graphs": entries}
    tmpf = os.path.join(out_dir, f".{MANIFEST_FILE}.{uuid.uuid4().hex}")
    with open(tmpf, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmpf, os.path.join(out_dir, MANIFEST_FILE))
    return paths


def _read_manifest(onnx_dir: str) -> Optional[Dict[str, Any]]:
    from export.onnx_export import read_manifest

    return read_manifest(onnx_dir)


# --------------------------------------------------------------------------- cache
def cache_dir_for(source: Any, cache_root: Optional[str] = None) -> str:
    """``<cache_root>/onnx/<name>-<sha12>/`` for this model's weights."""
    from export.onnx_export import _cache_name, default_cache_root

    src = resolve_source(source, load=False)
    return os.path.join(cache_root or default_cache_root(), "onnx", _cache_name(src.name, src.sha))


def sam_onnx_dir(source: Any, cache_root: Optional[str] = None, *, opset: int = DEFAULT_OPSET,
                 export: bool = True, force: bool = False) -> str:
    """The ONNX directory serving a SAM model: a model directory's own ``onnx/`` folder when its
    manifest matches the weights, else the export cache (exported on first use into a temporary
    sibling folder, then renamed into place so concurrent processes never see a partial export).
    """
    from export.onnx_export import ExportError, manifest_problem, publish_export

    src = resolve_source(source, load=False)
    specs = graphs_for_config(src.arch)
    if src.path and os.path.isdir(src.path):
        bundled = os.path.join(src.path, "onnx")
        if os.path.isdir(bundled) and not force and manifest_problem(
                bundled, weights_sha=src.sha, arch=src.arch, graphs=specs,
                check_code=False) is None:
            return bundled
    target = cache_dir_for(src, cache_root)
    problem = manifest_problem(target, weights_sha=src.sha, arch=src.arch, graphs=specs)
    if problem is None and not force:
        return target
    if not export:
        raise ExportError(f"{src.name}: no ONNX export ({problem})")
    return publish_export(
        target, lambda tmp: export_sam(src, tmp, opset=opset),
        lambda: manifest_problem(target, weights_sha=src.sha, arch=src.arch, graphs=specs) is None,
        force=force)


def ensure_sam_variant(source: Any, onnx_dir: str, graph: str, dtype: str, *,
                       cache_root: Optional[str] = None, opset: int = DEFAULT_OPSET) -> str:
    """Path of ``graph``'s ``dtype`` variant next to the float32 export in ``onnx_dir``,
    exporting it on first use (into the export cache when ``onnx_dir`` is read-only)."""
    src = resolve_source(source, load=False)
    spec = graphs_for_config(src.arch)[graph]
    from export.onnx_export import place_variant

    return place_variant(
        onnx_dir, variant_file(spec, dtype),
        lambda: sam_onnx_dir(src, cache_root, opset=opset),
        lambda tmp: export_sam(src, tmp, opset=opset, dtype=dtype, graphs=[graph])[graph])


def int8_variant(path: str) -> str:
    """``<graph>.int8.onnx`` next to ``path`` (ORT dynamic int8 weights), made on first use.

    ORT's quantizer re-runs ONNX shape inference after raising the opset, and the exported
    decoder's value_info annotations then conflict with it ("Inferred shape and existing shape
    differ"); they are optional, so the decoders are quantised without them.
    """
    from export.quantize import int8_path, quantize_graph

    dst = int8_path(path)
    if os.path.isfile(dst):
        return dst
    if os.path.basename(path).startswith("image_encoder"):
        return quantize_graph(path, dst)
    import onnx

    model = onnx.load(path)
    del model.graph.value_info[:]
    work = tempfile.mkdtemp(prefix=".int8-", dir=os.path.dirname(os.path.abspath(dst)))
    try:
        src = os.path.join(work, os.path.basename(path))
        onnx.save(model, src)
        return quantize_graph(src, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m export.sam_export MODEL [--out DIR] [--fp16] [--int8] [--cache-root DIR]``"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m export.sam_export",
                                description="export a SAM model's encoder and decoder to ONNX")
    p.add_argument("model", help="bundled name, model directory or segment-anything checkpoint")
    p.add_argument("--out", help="output directory (default: the export cache)")
    p.add_argument("--cache-root")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--fp16", action="store_true", help="also write the float16 variants")
    p.add_argument("--int8", action="store_true", help="also write ORT dynamic-int8 graphs")
    args = p.parse_args(argv)
    src = resolve_source(args.model)
    if args.out:
        paths = export_sam(src, args.out, opset=args.opset)
        out = args.out
    else:
        out = sam_onnx_dir(src, args.cache_root, opset=args.opset)
        paths = {g: os.path.join(out, e["file"]) for g, e in _read_manifest(out)["graphs"].items()}
    if args.fp16:
        for g in list(paths):
            paths[f"{g}.fp16"] = ensure_sam_variant(src, out, g, "float16",
                                                    cache_root=args.cache_root, opset=args.opset)
    if args.int8:
        for g in [g for g in list(paths) if "." not in g]:
            paths[f"{g}.int8"] = int8_variant(paths[g])
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
