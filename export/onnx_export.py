"""PyTorch -> ONNX for CLIP's two towers, and the on-disk ONNX cache every runtime loader uses.

    paths = export_clip("shapes-clip", "out/")   # {"image_encoder": "out/image_encoder.onnx", ...}
    onnx_dir = export_model_dir("shapes-clip")   # $FMRT_CACHE_DIR/onnx/<name>-<sha12>/, cached

Graph names, I/O names, dtypes and the dynamic batch axis come from ``export.specs.clip_graphs``.
Each graph ends in the L2 normalisation, so every backend returns identical, normalised features.
A ``manifest.json`` beside the graphs records the graph files and their sha256, the sha256 of the
source weights (``model.safetensors``), the fmrt/torch versions, the opset and the exporter.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export based, the default since torch
2.9) with a named dynamic batch dimension; ``dynamo=False`` selects the TorchScript exporter with
``dynamic_axes`` (also the automatic fallback when the dynamo exporter raises).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from export.specs import GraphSpec, clip_graphs

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# Families whose image/text towers export as CLIP's two graphs (CoCa's captioner is not exported).
FAMILIES = ("clip", "coca")
# Bump when the exported graphs change in a way that invalidates cached exports.
EXPORT_FORMAT = 1
DEFAULT_OPSET = 18
# Above this many parameter bytes a graph is written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_export_count = 0
_count_lock = threading.Lock()


class ExportError(RuntimeError):
    """A model that could not be exported, or an exported graph that fails validation."""


def export_count() -> int:
    """How many graphs ``export_clip`` has exported in this process (tests use it to prove that
    the cache was reused)."""
    return _export_count


# --------------------------------------------------------------------------- cache + hashing
def default_cache_root() -> str:
    """fmrt's cache root: ``$FMRT_CACHE_DIR`` or ``~/.cache/fmrt``. ONNX exports live under
    ``<root>/onnx/``, TensorRT engines under ``<root>/tensorrt/``."""
    env = os.environ.get("FMRT_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fmrt")


_sha_memo: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file, memoised per (path, size, mtime) for this process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _sha_memo[key] = h.hexdigest()
    return _sha_memo[key]


def _state_dict_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def weights_sha256(model_dir: str) -> str:
    from fmrt import pretrained

    try:
        files = pretrained.weight_files(model_dir)
    except pretrained.PretrainedError as e:
        raise ExportError(str(e)) from None
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


# --------------------------------------------------------------------------- export wrappers
class ImageEncoder(nn.Module):
    """``pixel_values`` (B x 3 x S x S float32) -> L2-normalised ``image_embeds`` (B x E).

    Runs the model's own ``encode_image`` (CLIP: class token; CoCa: attentional pooling). With a
    float16 model (the ``.fp16.onnx`` variant for TensorRT's strongly typed builds) the graph
    casts the pixels to float16 on entry and normalises in float32, so its I/O stays the spec's
    float32; fmrt's LayerNorm already computes its statistics in float32.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dtype = model.visual.conv1.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = self.model.encode_image(pixel_values.to(self.dtype), normalize=False)
        return F.normalize(f.float(), dim=-1)


class TextEncoder(nn.Module):
    """``input_ids`` (B x L int64) -> L2-normalised ``text_embeds`` (B x E).

    Same function as ``TextTransformer.forward`` (features at the first end-of-text token, the
    last position when a row has none), written with export-friendly float ops: the ids are cast
    to int32 (TensorRT-native), and the pooled row is selected by a one-hot mask built from a
    score with a *unique* maximum (``is_eot * (L - pos)`` plus 0.5 at the last position), then a
    masked sum. This avoids ArgMax ties on 0/1 vectors (whose tie-breaking is backend-defined) and
    int64 reductions/GatherND, and is exact (one non-zero term per row).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text = clip.text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(torch.int32)
        x = self.text.forward_tokens(ids)                               # B x L x W
        length = ids.shape[1]
        pos = torch.arange(length, device=x.device, dtype=torch.float32)
        is_eot = (ids == self.text.eot_token_id).float()
        score = is_eot * (length - pos) + (pos == length - 1).float() * 0.5
        onehot = (score == score.amax(dim=-1, keepdim=True)).to(x.dtype)  # B x L, one 1 per row
        pooled = (x * onehot.unsqueeze(-1)).sum(dim=1)
        return F.normalize((pooled @ self.text.text_projection).float(), dim=-1)


# --------------------------------------------------------------------------- source resolution
def _resolve_source(src: Any) -> Tuple[nn.Module, Dict[str, Any], str, str, str]:
    """-> (model, architecture config dict, weights sha256, name, family)."""
    from fmrt import pretrained

    if isinstance(src, (str, os.PathLike)):
        model_dir = pretrained.resolve(os.fspath(src))
        p = pretrained.load_pretrained(model_dir)
        if p.family not in FAMILIES:
            raise ExportError(f"{src}: family {p.family!r} has no exporter (only {FAMILIES})")
        return (p.model, p.config["config"], weights_sha256(model_dir),
                os.path.basename(os.path.normpath(model_dir)), p.family)
    if isinstance(src, pretrained.Pretrained):
        if src.family not in FAMILIES:
            raise ExportError(f"{src.name}: family {src.family!r} has no exporter (only "
                              f"{FAMILIES})")
        sha = (weights_sha256(src.path) if src.path and os.path.isdir(src.path)
               else _state_dict_sha256(src.model))
        return src.model, src.config["config"], sha, src.name, src.family
    if isinstance(src, nn.Module) and hasattr(src, "visual") and hasattr(src, "text"):
        cfg = src.config.to_dict() if getattr(src, "config", None) is not None else None
        if cfg is None:
            raise ExportError("a CLIP module without .config cannot be exported (specs need it)")
        family = "coca" if hasattr(src, "generate") else "clip"
        return src, cfg, _state_dict_sha256(src), family, family
    raise ExportError(f"cannot export {type(src).__name__}: expected a bundled name, a model "
                      "directory, a fmrt.pretrained.Pretrained or a CLIP module")


def graphs_for_config(arch: Dict[str, Any]) -> Dict[str, GraphSpec]:
    return clip_graphs(image_size=arch["vision"]["image_size"],
                       context_length=arch["text"]["context_length"],
                       embed_dim=arch["embed_dim"])


# --------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter (progress lines, torchvision-missing warnings)."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript",
             "torch.export", "torch._export"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_one(module: nn.Module, spec: GraphSpec, path: str, *, opset: int, dynamo: bool,
                example_batch: int = 2) -> str:
    """Export one wrapper module to ``path``; returns the exporter actually used."""
    inp = spec.inputs[0]
    shape = spec.concrete_shape(inp, example_batch)
    if inp.np_dtype.kind == "f":
        example = torch.randn(*shape, dtype=getattr(torch, inp.dtype))
    else:
        example = torch.zeros(*shape, dtype=getattr(torch, inp.dtype))
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > EXTERNAL_DATA_THRESHOLD
    module = module.eval()
    if dynamo:
        try:
            dyn = {inp.name: {ax: torch.export.Dim(name, min=1, max=1 << 16)
                              for ax, name in inp.dynamic_axes().items()}}
            with _quiet_exporter(), torch.no_grad():
                prog = torch.onnx.export(module, (example,), None, dynamo=True,
                                         input_names=list(spec.input_names),
                                         output_names=list(spec.output_names),
                                         dynamic_shapes=dyn, opset_version=opset,
                                         optimize=True, verbose=False)
                prog.save(path, external_data=external)
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure falls back to TorchScript
            log.warning("dynamo ONNX export of %s failed (%s: %s); using the TorchScript exporter",
                        spec.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    axes = {t.name: t.dynamic_axes() for t in spec.inputs + spec.outputs}
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, (example,), path, dynamo=False,
                          input_names=list(spec.input_names), output_names=list(spec.output_names),
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    return "torchscript"


def _finalize_graph(path: str, spec: GraphSpec, meta: Dict[str, str]) -> None:
    """Pin I/O shapes to the spec (named batch axis, static other dims), add metadata, save
    (single file unless the weights need external data) and run the ONNX checker."""
    import onnx

    model = onnx.load(path, load_external_data=True)
    io = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        if t.name not in io:
            raise ExportError(f"{spec.name}: exported graph lacks {t.name!r}; has {sorted(io)}")
        want = onnx.helper.np_dtype_to_tensor_dtype(t.np_dtype)
        tt = io[t.name].type.tensor_type
        if tt.elem_type != want:
            raise ExportError(f"{spec.name}: {t.name} has ONNX dtype {tt.elem_type}, want {want}")
        dims = tt.shape.dim
        if len(dims) != len(t.shape):
            raise ExportError(f"{spec.name}: {t.name} has rank {len(dims)}, want {len(t.shape)}")
        for d, s in zip(dims, t.shape):
            if isinstance(s, str):
                d.Clear()
                d.dim_param = s
            else:
                if d.HasField("dim_value") and d.dim_value != s:
                    raise ExportError(f"{spec.name}: {t.name} dims {dims} do not match {t.shape}")
                d.dim_value = s
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=str(v))
    model.doc_string = f"fmrt {spec.name}"
    size = model.ByteSize()
    for f in os.listdir(os.path.dirname(path)):  # drop stale external-data files of this graph
        if f.startswith(os.path.basename(path)) and f != os.path.basename(path):
            os.remove(os.path.join(os.path.dirname(path), f))
    if size < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path)
        onnx.checker.check_model(model, full_check=True)
    else:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
        onnx.checker.check_model(path, full_check=True)


VARIANTS = {"float32": "", "float16": ".fp16"}  # dtype -> file-name infix


def variant_file(spec: GraphSpec, dtype: str = "float32") -> str:
    """``image_encoder.onnx`` (float32) or ``image_encoder.fp16.onnx`` (float16 weights/compute,
    float32 I/O: the input of TensorRT's strongly typed fp16 builds)."""
    if dtype not in VARIANTS:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of {sorted(VARIANTS)}")
    return f"{spec.name}{VARIANTS[dtype]}.onnx"


def export_clip(model_dir_or_pretrained: Union[str, Any], out_dir: str, *,
                opset: int = DEFAULT_OPSET, dynamo: bool = True, dtype: str = "float32",
                graphs: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Export CLIP's image and text towers to ``out_dir`` (created) as ``export.specs`` graphs.

    Args:
        model_dir_or_pretrained: bundled name, model directory, ``fmrt.pretrained.Pretrained``
            or a CLIP module (with ``.config``).
        out_dir: destination; receives ``image_encoder.onnx``, ``text_encoder.onnx`` and
            ``manifest.json``.
        opset: ONNX opset (default 18).
        dynamo: use the torch.export-based exporter (default); False (or a dynamo failure) uses
            the TorchScript exporter.
        dtype: ``"float32"`` (default), or ``"float16"`` for the ``<graph>.fp16.onnx`` variants
            (same I/O; no manifest is written for them).
        graphs: a subset of graph names (default both).
    Returns:
        ``{graph name: path}``.
    """
    global _export_count
    import onnx

    import fmrt

    model, arch, sha, name, family = _resolve_source(model_dir_or_pretrained)
    if dtype == "float16":
        model = copy.deepcopy(model).half().eval()
    else:
        model = model.float().eval()
    specs = graphs_for_config(arch)
    names = list(graphs) if graphs is not None else list(specs)
    os.makedirs(out_dir, exist_ok=True)
    wrappers = {"image_encoder": ImageEncoder, "text_encoder": TextEncoder}
    entries: Dict[str, Any] = {}
    paths: Dict[str, str] = {}
    exporters = set()
    for gname in names:
        spec = specs[gname]
        path = os.path.join(out_dir, variant_file(spec, dtype))
        exporters.add(_export_one(wrappers[gname](model), spec, path, opset=opset,
                                  dynamo=dynamo))
        _finalize_graph(path, spec, {"fmrt.graph": gname, "fmrt.weights_sha256": sha,
                                     "fmrt.version": fmrt.__version__, "fmrt.dtype": dtype})
        with _count_lock:
            _export_count += 1
        paths[gname] = path
        entries[gname] = {
            "file": os.path.basename(path), "sha256": file_sha256(path),
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                       for t in spec.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                        for t in spec.outputs],
            "batch_profile": list(spec.batch_profile)}
    if dtype != "float32":
        return paths
    manifest = {"format": EXPORT_FORMAT, "family": family, "name": name,
                "weights_sha256": sha, "config_sha256": _json_sha256(arch),
                "code_sha256": graph_code_sha256(family),
                "fmrt_version": fmrt.__version__, "torch_version": torch.__version__,
                "onnx_version": onnx.__version__, "opset": opset,
                "exporter": "+".join(sorted(exporters)), "graphs": entries}
    tmp = os.path.join(out_dir, f".{MANIFEST_FILE}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, MANIFEST_FILE))
    return paths


def ensure_variant(model_dir: str, onnx_dir: str, graph: str, dtype: str, *,
                   cache_root: Optional[str] = None, opset: int = DEFAULT_OPSET,
                   dynamo: bool = True) -> str:
    """Path of ``graph``'s ``dtype`` variant next to the float32 export in ``onnx_dir``,
    exporting it on first use (into a temporary folder, then renamed into place). When
    ``onnx_dir`` is read-only (e.g. a bundled model's ``onnx/``) the export cache is used."""
    from fmrt import pretrained

    model_dir = pretrained.resolve(model_dir)
    spec = graphs_for_config(pretrained.read_config(model_dir)["config"])[graph]
    return place_variant(
        onnx_dir, variant_file(spec, dtype),
        lambda: export_model_dir(model_dir, cache_root, opset=opset),
        lambda tmp: export_clip(model_dir, tmp, opset=opset, dtype=dtype, graphs=[graph],
                                dynamo=dynamo)[graph])


def place_variant(onnx_dir: str, fname: str, writable_dir: Callable[[], str],
                  export_into: Callable[[str], str]) -> str:
    """``onnx_dir/fname`` if it exists; else the same file in ``writable_dir()`` (the export
    cache) when ``onnx_dir`` is read-only (e.g. a bundled model's ``onnx/``); else export it
    with ``export_into(tmp_dir) -> path`` into a temporary sibling folder and rename it into
    place, so concurrent processes never see a partial file."""
    path = os.path.join(onnx_dir, fname)
    if os.path.isfile(path):
        return path
    if not os.access(onnx_dir, os.W_OK):
        onnx_dir = writable_dir()
        path = os.path.join(onnx_dir, fname)
        if os.path.isfile(path):
            return path
    tmp = tempfile.mkdtemp(prefix=f".{fname}.tmp-", dir=onnx_dir)
    try:
        out = export_into(tmp)
        extra = [f for f in os.listdir(tmp) if f != fname]
        if extra:  # external data: keep the folder layout simple by refusing
            raise ExportError(f"{fname}: variants with external data are not supported")
        os.replace(out, path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- manifests + cache
def read_manifest(onnx_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(onnx_dir, MANIFEST_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# The source files that shape each family's traced graphs. Manifests record their sha256
# (``code_sha256``) so a cached export written by older model or exporter code is re-exported
# instead of silently serving the old graph: when the SAM decoder gained its folded fast path,
# ``~/.cache/fmrt`` (keyed by weights only) kept serving the previous decoder graph.
_GRAPH_SOURCES: Dict[str, Tuple[str, ...]] = {
    "clip": ("fmrt.models.clip", "fmrt.models.coca", "fmrt.models.vision_transformer",
             "fmrt.models.text_transformer", "fmrt.models.transformer", "fmrt.models.attention"),
    "sam": ("fmrt.models.sam.common", "fmrt.models.sam.image_encoder",
            "fmrt.models.sam.prompt_encoder", "fmrt.models.sam.two_way_transformer",
            "fmrt.models.sam.mask_decoder", "fmrt.models.sam.sam", "export.sam_export"),
    "vlm": ("fmrt.models.llava", "fmrt.models.llama", "fmrt.models.flamingo",
            "fmrt.models.perceiver", "fmrt.models.kv_cache", "fmrt.kernels.gated_xattn",
            "fmrt.models.vision_transformer", "fmrt.models.transformer", "fmrt.models.attention",
            "export.vlm_export"),
}
_SOURCE_FAMILY = {"sam": "sam", "llava": "vlm", "flamingo": "vlm"}  # everything else: CLIP-like
_code_memo: Dict[str, str] = {}


def graph_code_sha256(family: Optional[str]) -> str:
    """sha256 over the source text of the modules that trace ``family``'s graphs (plus the
    shared exporter and specs), memoised per process."""
    key = _SOURCE_FAMILY.get(str(family), "clip")
    if key not in _code_memo:
        import importlib.util

        h = hashlib.sha256()
        for mod in _GRAPH_SOURCES[key] + ("export.onnx_export", "export.specs"):
            spec = importlib.util.find_spec(mod)
            if spec is None or not spec.origin or not os.path.isfile(spec.origin):
                raise ExportError(f"cannot locate the source of {mod} to fingerprint the export")
            h.update(mod.encode())
            with open(spec.origin, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        _code_memo[key] = h.hexdigest()
    return _code_memo[key]


def manifest_problem(onnx_dir: str, *, weights_sha: Optional[str] = None,
                     arch: Optional[Dict[str, Any]] = None,
                     graphs: Optional[Dict[str, GraphSpec]] = None,
                     check_code: bool = True) -> Optional[str]:
    """Why ``onnx_dir`` cannot serve these weights (None when it can).

    ``check_code``: also require the manifest's ``code_sha256`` to match today's model and
    exporter source (the export cache); a model directory's own shipped ``onnx/`` folder passes
    False: it is valid for its weights whatever code later loads it."""
    m = read_manifest(onnx_dir)
    if m is None:
        return f"no readable {MANIFEST_FILE} in {onnx_dir}"
    if m.get("format") != EXPORT_FORMAT:
        return f"export format {m.get('format')} != {EXPORT_FORMAT}"
    if weights_sha is not None and m.get("weights_sha256") != weights_sha:
        return "exported from different weights (sha256 mismatch)"
    if arch is not None and m.get("config_sha256") != _json_sha256(arch):
        return "exported from a different architecture config"
    if check_code and m.get("code_sha256") != graph_code_sha256(m.get("family")):
        return "exported by different model/exporter code (code_sha256 mismatch)"
    names = graphs.keys() if graphs is not None else m.get("graphs", {}).keys()
    for g in names:
        e = m.get("graphs", {}).get(g)
        if e is None:
            return f"manifest lacks graph {g!r}"
        if not os.path.isfile(os.path.join(onnx_dir, e["file"])):
            return f"missing {e['file']}"
    return None


def _cache_name(name: str, sha: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
    return f"{safe}-{sha[:12]}"


def cache_dir_for(name_or_dir: str, cache_root: Optional[str] = None) -> str:
    """Where ``export_model_dir`` keeps this model's graphs (whether or not exported yet)."""
    from fmrt import pretrained

    model_dir = pretrained.resolve(name_or_dir)
    name = os.path.basename(os.path.normpath(model_dir))
    root = os.path.join(cache_root or default_cache_root(), "onnx")
    return os.path.join(root, _cache_name(name, weights_sha256(model_dir)))


def export_model_dir(name_or_dir: str, cache_root: Optional[str] = None, *,
                     opset: int = DEFAULT_OPSET, dynamo: bool = True, force: bool = False) -> str:
    """Export a bundled model or model directory once and return the cached ONNX directory.

    The directory is ``<cache_root>/onnx/<name>-<sha12>/`` where ``cache_root`` defaults to
    ``$FMRT_CACHE_DIR`` or ``~/.cache/fmrt`` and ``sha12`` is the start of the weights' sha256.
    A valid existing export (manifest matching the weights and config) is reused; otherwise the
    graphs are exported into a temporary sibling directory that is renamed into place, so
    concurrent processes never see a half-written export (the first rename wins; the others
    discard their copy).
    """
    from fmrt import pretrained

    model_dir = pretrained.resolve(name_or_dir)
    arch = pretrained.read_config(model_dir)["config"]
    sha = weights_sha256(model_dir)
    target = cache_dir_for(model_dir, cache_root)
    graphs = graphs_for_config(arch)
    if not force and manifest_problem(target, weights_sha=sha, arch=arch, graphs=graphs) is None:
        return target
    return publish_export(
        target, lambda tmp: export_clip(model_dir, tmp, opset=opset, dynamo=dynamo),
        lambda: manifest_problem(target, weights_sha=sha, arch=arch, graphs=graphs) is None,
        force=force)


def publish_export(target: str, write: Callable[[str], Any], is_valid: Callable[[], bool], *,
                   force: bool = False) -> str:
    """Run ``write(tmp)`` into a temporary sibling of ``target`` and rename it into place, so
    concurrent processes never see a half-written export. If another process got there first
    with a valid export (``is_valid()``) its copy is kept and ours discarded; a stale or broken
    one (or any existing one when ``force``) is moved aside and replaced."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        write(tmp)
        for _ in range(3):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if not os.path.exists(target):
                    raise
                if not force and is_valid():
                    return target  # another process won the race with a valid export
                stale = f"{target}.stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(target, stale)
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
                force = False
        raise ExportError(f"could not move the export into {target}")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def find_onnx_dir(model_dir: str, cache_root: Optional[str] = None, *, export: bool = True
                  ) -> str:
    """The ONNX directory serving ``model_dir``: its own ``onnx/`` subfolder when that holds a
    manifest matching the weights, else the export cache (exporting when ``export``)."""
    from fmrt import pretrained

    model_dir = pretrained.resolve(model_dir)
    arch = pretrained.read_config(model_dir)["config"]
    sha = weights_sha256(model_dir)
    bundled = os.path.join(model_dir, "onnx")
    if os.path.isdir(bundled) and manifest_problem(bundled, weights_sha=sha, arch=arch,
                                                   graphs=graphs_for_config(arch),
                                                   check_code=False) is None:
        return bundled
    if not export:
        target = cache_dir_for(model_dir, cache_root)
        problem = manifest_problem(target, weights_sha=sha, arch=arch)
        if problem:
            raise ExportError(f"{model_dir}: no ONNX export ({problem})")
        return target
    return export_model_dir(model_dir, cache_root)
