"""SAM model: parity with the segment-anything package (official key names, random weights),
the ShapesWorld variant's shapes, registry names, checkpoint loading and input validation.

segment-anything's package ``__init__`` imports torchvision (not installed, and not to be):
``_official_modeling()`` loads ``segment_anything/modeling/*.py`` through stub parent packages.
The vit_b encoder at 1024x1024 takes seconds per forward on 2 cores, so each implementation runs
it once per module (module-scoped fixture).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from functools import partial

import pytest
import torch

import fmrt

from tests.helpers import segment_anything_root
from fmrt.models.attention import attention_backend
from fmrt.models.clip_checkpoint import CheckpointError
from fmrt.models.sam import (SAM_CONFIGS, Sam, SamConfig, config_from_state_dict,
                             load_sam_checkpoint)
from fmrt.pretrained import build_from_config

TOL = 1e-4


# ----------------------------------------------------------------------------- official code
def _official_modeling() -> types.ModuleType:
    """``segment_anything.modeling`` without running ``segment_anything/__init__.py``."""
    if "segment_anything.modeling.sam" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    root = segment_anything_root()
    if root is None:
        pytest.skip("segment-anything is not installed")
    for name, path in (("segment_anything", root),
                       ("segment_anything.modeling", os.path.join(root, "modeling"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]  # a package whose __init__ never ran
            sys.modules[name] = pkg
    modeling = sys.modules["segment_anything.modeling"]
    for sub in ("common", "image_encoder", "prompt_encoder", "transformer", "mask_decoder", "sam"):
        setattr(modeling, sub, importlib.import_module(f"segment_anything.modeling.{sub}"))
    return modeling


def _official_sam(cfg: SamConfig):
    """segment-anything's ``_build_sam`` for an fmrt config (the same construction as
    ``build_sam_vit_b`` for ``SAM_CONFIGS['sam_vit_b']``)."""
    m = _official_modeling()
    e, d = cfg.encoder, cfg.decoder
    grid = cfg.image_embedding_size
    sam = m.sam.Sam(
        image_encoder=m.image_encoder.ImageEncoderViT(
            depth=e.depth, embed_dim=e.embed_dim, img_size=e.img_size, mlp_ratio=e.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=e.num_heads,
            patch_size=e.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=list(e.global_attn_indexes), window_size=e.window_size,
            out_chans=cfg.prompt_embed_dim),
        prompt_encoder=m.prompt_encoder.PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(e.img_size, e.img_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=m.mask_decoder.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.transformer.TwoWayTransformer(
                depth=d.transformer_depth, embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=d.transformer_mlp_dim, num_heads=d.transformer_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=d.iou_head_depth,
            iou_head_hidden_dim=d.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give the zero/one-initialised tensors (rel-pos tables, pos_embed, norms, embeddings) random
    values too, so every parameter takes part in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif p.dim() == 1 and ("norm" in name or "neck" in name or "upscaling" in name
                                   or "downscaling" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _prompts(size: int, seed: int):
    """Point, box and mask prompts in the padded frame of a ``size`` input."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(2, 3, 2, generator=g) * (size - 1)
    labels = torch.tensor([[1, 0, 1], [1, 1, -1]])
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.3, 0.1, 0.9, 0.5]]) * size
    grid = size // (16 if size == 1024 else 4)
    mask = torch.randn(2, 1, 4 * grid, 4 * grid, generator=g) * 3
    return pts, labels, boxes, mask


def _official_tokens(ref, *, points=None, boxes=None, masks=None):
    sparse, dense = ref.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return dict(image_pe=ref.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense)


def _check(got, want, what) -> None:
    for g, w, name in zip(got, want, ("mask logits", "iou")):
        assert g.shape == w.shape, (what, name, g.shape, w.shape)
        err = (g - w).abs().max().item()
        assert err < TOL, (what, name, err)


def _compare_decoders(ours: Sam, ref, emb: torch.Tensor, size: int, *, full: bool) -> None:
    """Point, box, point+box and mask prompts. ``full`` also goes through ``Sam.decode`` with
    both ``multimask_output`` values; otherwise (the 1024 models, ~6 GFLOP per prompt and
    decoder) all 4 masks come from one ``predict_masks`` call per implementation."""
    pts, labels, boxes, mask = _prompts(size, seed=1)
    b = 2 if full else 1  # prompt batch of the box / mask cases
    cases = {
        "points": dict(points=(pts, labels)),
        "box": dict(boxes=boxes[:b]),
        "points+box": dict(points=(pts[:b, :1], labels[:b, :1]), boxes=boxes[:b]),
        "point+mask": dict(points=(pts[:b, :1], labels[:b, :1]), masks=mask[:b]),
    }
    if full:
        cases["box+mask"] = dict(boxes=boxes, masks=mask)
    for what, case in cases.items():
        toks = _official_tokens(ref, **case)
        pc, pl = case.get("points", (None, None))
        mine = dict(point_coords=pc, point_labels=pl, boxes=case.get("boxes"),
                    masks=case.get("masks"))
        sparse, dense = ours.prompt_encoder(**mine)
        assert torch.equal(sparse, toks["sparse_prompt_embeddings"]), what
        if not full:
            want = ref.mask_decoder.predict_masks(image_embeddings=emb, **toks)
            got = ours.mask_decoder.predict_masks(image_embeddings=emb, image_pe=toks["image_pe"],
                                                  sparse_prompt_embeddings=sparse,
                                                  dense_prompt_embeddings=dense)
            _check(got, want, what)
            continue
        for multimask in (True, False):
            want = ref.mask_decoder(image_embeddings=emb, multimask_output=multimask, **toks)
            got = ours.decode(emb, point_coords=pc, point_labels=pl, boxes=case.get("boxes"),
                              mask_input=case.get("masks"), multimask_output=multimask)
            _check(got, want, (what, multimask))


# ----------------------------------------------------------------------------- vit_b parity
@pytest.fixture(scope="module")
def vit_b_pair(tmp_path_factory):
    """(official model, fmrt model loaded from its saved checkpoint, image, both embeddings)."""
    torch.manual_seed(0)
    ref = _official_sam(SAM_CONFIGS["sam_vit_b"])
    _randomize(ref, seed=0)
    path = str(tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth")
    torch.save(ref.state_dict(), path)
    ours = fmrt.create_model("sam_vit_b", checkpoint=path)
    # an image smaller than the input frame exercises the padding (and the windows' padding: the
    # 64x64 grid is padded to 70x70 for 14x14 windows)
    img = torch.rand(1, 3, 1024, 768, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        x_ref = ref.preprocess(img[0])[None]
        want = ref.image_encoder(x_ref)
        got = ours.encode_image(img)
    return ref, ours, path, img, x_ref, want, got


def test_vit_b_checkpoint_keys_and_config(vit_b_pair):
    ref, ours, path, *_ = vit_b_pair
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert config_from_state_dict(ref.state_dict()).to_dict() == SAM_CONFIGS["sam_vit_b"].to_dict()
    assert isinstance(ours, Sam) and not ours.training


def test_vit_b_preprocess_and_image_embeddings(vit_b_pair):
    _, ours, _, img, x_ref, want, got = vit_b_pair
    assert torch.equal(ours.preprocess(img), x_ref)
    assert got.shape == (1, 256, 64, 64)
    assert (got - want).abs().max().item() < TOL


@torch.no_grad()
def test_vit_b_decoder_points_boxes_masks(vit_b_pair):
    ref, ours, _, _, _, want, _ = vit_b_pair
    # the official embedding feeds both decoders: the decoder comparison stays independent of the
    # encoder's rounding
    _compare_decoders(ours, ref, want, 1024, full=False)


@torch.no_grad()
def test_vit_b_postprocess_masks(vit_b_pair):
    ref, ours, *_ = vit_b_pair
    low = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    want = ref.postprocess_masks(low, input_size=(1024, 768), original_size=(600, 450))
    got = ours.postprocess_masks(low, input_size=(1024, 768), original_size=(600, 450))
    assert got.shape == (1, 3, 600, 450) and torch.equal(got, want)


def test_load_in_memory_state_dict_and_inferred_arch(vit_b_pair):
    ref, ours, path, *_ = vit_b_pair
    sd = ref.state_dict()
    m = load_sam_checkpoint({"model": sd}, name="sam_vit_b")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), sd.values()))
    inferred = fmrt.create_model(None, checkpoint=path, family="sam")
    assert inferred.config.to_dict() == SAM_CONFIGS["sam_vit_b"].to_dict()


def test_checkpoint_mismatch_raises(vit_b_pair):
    ref, *_ = vit_b_pair
    with pytest.raises(CheckpointError, match="shape mismatch|does not match"):
        load_sam_checkpoint(ref.state_dict(), name="sam_vit_l")
    with pytest.raises(CheckpointError, match="not a Segment Anything"):
        load_sam_checkpoint({"visual.conv1.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- tiny variant
@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    cfg = SAM_CONFIGS["shapes-sam-tiny"]
    ref = _official_sam(cfg)
    _randomize(ref, seed=1)
    ours = load_sam_checkpoint(ref.state_dict(), name="shapes-sam-tiny")
    return ref, ours


@torch.no_grad()
def test_tiny_parity_with_official_modules(tiny_pair):
    ref, ours = tiny_pair
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    want = ref.image_encoder(torch.stack([ref.preprocess(i) for i in img]))
    got = ours.encode_image(img)
    assert got.shape == (2, 128, 16, 16)
    assert (got - want).abs().max().item() < TOL
    _compare_decoders(ours, ref, want[:1], 64, full=True)


@torch.no_grad()
def test_tiny_math_backend_matches_sdpa(tiny_pair):
    _, ours = tiny_pair
    img = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 255
    pts, labels, boxes, _ = _prompts(64, seed=2)
    a = ours(img, point_coords=pts[:1], point_labels=labels[:1], boxes=boxes[:1])
    with attention_backend("math"):
        b = ours(img, point_coords=pts[:1], point_labels=labels[:1], boxes=boxes[:1])
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() < TOL


def test_tiny_shapes_and_training_step():
    torch.manual_seed(0)
    m = fmrt.create_model("shapes-sam-tiny")
    assert m.image_encoder.img_size == 64 and m.prompt_encoder.mask_input_size == (64, 64)
    m.train()
    img = torch.rand(4, 3, 64, 64) * 255
    pts, labels = torch.rand(4, 2, 2) * 63, torch.ones(4, 2, dtype=torch.long)
    low, iou = m(img, point_coords=pts, point_labels=labels)  # one prompt set per image
    assert low.shape == (4, 3, 64, 64) and iou.shape == (4, 3)
    (low.mean() + iou.mean()).backward()
    # every parameter is in the graph except the mask-prompt path (no mask prompt given)
    no_grad = {".".join(n.split(".")[:2]) for n, p in m.named_parameters() if p.grad is None}
    assert no_grad == {"prompt_encoder.mask_downscaling"}
    m.eval()
    with torch.no_grad():
        emb = m.encode_image(img[:1])
        assert emb.shape == (1, 128, 16, 16)
        # one image, many prompts (the predictor's case); a box prompt; single-mask output
        low, iou = m.decode(emb, point_coords=torch.rand(5, 1, 2) * 63,
                            point_labels=torch.ones(5, 1), multimask_output=False)
        assert low.shape == (5, 1, 64, 64) and iou.shape == (5, 1)
        low, iou = m.decode(emb, boxes=torch.tensor([[4.0, 4, 40, 30]]),
                            mask_input=torch.zeros(1, 1, 64, 64))
        assert low.shape == (1, 3, 64, 64)
        up = m.postprocess_masks(low, input_size=(64, 48), original_size=(100, 75))
        assert up.shape == (1, 3, 100, 75)
        # a box given as two corner points labelled 2 and 3 (segment-anything's ONNX decoder
        # contract) embeds exactly like the box itself
        box = torch.tensor([[4.0, 4, 40, 30]])
        as_box, _ = m.prompt_encoder(boxes=box)
        as_points, _ = m.prompt_encoder(point_coords=box.view(1, 2, 2),
                                        point_labels=torch.tensor([[2.0, 3.0]]))
        assert torch.equal(as_points[:, :2], as_box)


# ----------------------------------------------------------------------------- factored tokens
def _factored_vs_official(ours: Sam, ref, emb: torch.Tensor, size: int, n: int, seed: int):
    """The automatic generator's decoder path (B single-point prompts on one image, image
    tokens kept factored, mask head from the factored tokens via ``upscale_tokens``) against
    segment-anything's ``predict_masks``."""
    from fmrt.models.sam.two_way_transformer import FactoredImageTokens

    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 1, 2, generator=g) * (size - 1)
    labels = torch.ones(n, 1)
    toks = _official_tokens(ref, points=(pts, labels))
    want_masks, want_iou = ref.mask_decoder.predict_masks(image_embeddings=emb, **toks)
    md = ours.mask_decoder
    sparse, dense = ours.prompt_encoder(point_coords=pts, point_labels=labels)
    assert torch.equal(sparse, toks["sparse_prompt_embeddings"])
    keys, hyper_in, iou = md._run_tokens(emb, toks["image_pe"], sparse, dense[:1], factored=True)
    assert isinstance(keys, FactoredImageTokens) and keys.shape == (n,) + keys.base.shape
    assert (iou - want_iou).abs().max().item() < TOL
    hw = tuple(emb.shape[-2:])
    rows = torch.tensor([n - 1, 0])
    masks = md.upscale_tokens(keys.select(rows), hyper_in[rows], hw)
    assert (masks - want_masks[rows]).abs().max().item() < TOL
    # inference (no grad): the head's big intermediate lives in a reused workspace buffer; the
    # same numbers, and a later call does not change an earlier call's result
    with torch.inference_mode():
        first = md.upscale_tokens(keys.select(rows), hyper_in[rows], hw)
        kept = first.clone()
        md.upscale_tokens(keys.select(rows[:1]), hyper_in[rows[:1]] * 2, hw)
    assert torch.equal(first, kept) and torch.allclose(first, masks.detach(), atol=1e-6)
    with torch.no_grad():   # after inference mode: its buffer is not reused here
        assert torch.allclose(md.upscale_tokens(keys.select(rows), hyper_in[rows], hw), first,
                              atol=1e-6)
    # the same tokens formed explicitly, through the tensor and the convolution heads
    dense_keys = keys.materialize(rows)
    assert (md.upscale_tokens(dense_keys, hyper_in[rows], hw) - masks).abs().max().item() < TOL
    src = dense_keys.transpose(1, 2).reshape(2, -1, *hw)
    conv = md._upscale_and_project(src, hyper_in[rows])
    assert (conv - want_masks[rows]).abs().max().item() < TOL
    # unfactored keys of the plain path (eval, factored=False) are the materialised ones
    plain, _, plain_iou = md._run_tokens(emb, toks["image_pe"], sparse, dense[:1])
    plain = plain.expand(n, -1, -1) if plain.shape[0] == 1 else plain
    assert (plain[rows] - dense_keys).abs().max().item() < TOL
    assert (plain_iou - iou).abs().max().item() < TOL


@torch.no_grad()
def test_tiny_factored_decoder_matches_official(tiny_pair):
    ref, ours = tiny_pair
    emb = torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(4))
    _factored_vs_official(ours, ref, emb, 64, n=6, seed=5)


@torch.no_grad()
def test_vit_b_factored_decoder_matches_official(vit_b_pair):
    ref, ours, *_, want, _got = vit_b_pair
    _factored_vs_official(ours, ref, want, 1024, n=3, seed=6)


@torch.no_grad()
def test_factoring_applies_only_where_it_pays(tiny_pair):
    _, ours = tiny_pair
    tr = ours.mask_decoder.transformer
    emb, pe = torch.zeros(1, 128, 16, 16), torch.zeros(1, 128, 16, 16)
    assert tr.can_factor(emb, pe, torch.zeros(4, 7, 128))
    assert not tr.can_factor(emb, pe, torch.zeros(1, 7, 128))             # one prompt
    assert not tr.can_factor(emb.expand(4, -1, -1, -1), pe, torch.zeros(4, 7, 128))
    # K = depth (H T + 1) rows per prompt must stay <= C: 2 (4 T + 1) <= 128 up to T = 15
    assert tr.can_factor(emb, pe, torch.zeros(4, 15, 128))
    assert not tr.can_factor(emb, pe, torch.zeros(4, 16, 128))
    tr.train()
    try:
        assert not tr.can_factor(emb, pe, torch.zeros(4, 7, 128))
        # training: factored=True is ignored, the image tokens come back as a tensor
        _, keys = tr(torch.randn(1, 128, 16, 16), pe, torch.randn(4, 7, 128), factored=True)
        assert isinstance(keys, torch.Tensor) and keys.shape == (4, 256, 128)
    finally:
        tr.eval()


@torch.no_grad()
def test_final_tokens_keep_the_first_rows(tiny_pair):
    """``final_tokens`` runs the final attention for the output tokens only; those rows equal
    the full run's (plain and factored paths)."""
    _, ours = tiny_pair
    tr = ours.mask_decoder.transformer
    g = torch.Generator().manual_seed(7)
    emb, pe = torch.randn(1, 128, 16, 16, generator=g), torch.randn(1, 128, 16, 16, generator=g)
    tokens = torch.randn(3, 7, 128, generator=g)
    full, keys = tr(emb.expand(3, -1, -1, -1), pe, tokens)
    part, keys5 = tr(emb.expand(3, -1, -1, -1), pe, tokens, final_tokens=5)
    assert part.shape == (3, 5, 128) and torch.equal(keys, keys5)
    assert (part - full[:, :5]).abs().max().item() < 1e-6
    fac, z = tr(emb, pe, tokens, factored=True, final_tokens=5)
    assert (fac - full[:, :5]).abs().max().item() < TOL
    assert (z.materialize() - keys).abs().max().item() < TOL
    assert (z.materialize(torch.tensor([2])) - keys[2:]).abs().max().item() < TOL
    # listed tokens (the generator's IoU token + 3 multimask tokens)
    picked, _ = tr(emb, pe, tokens, factored=True, final_tokens=[0, 2, 3, 4])
    assert (picked - full[:, [0, 2, 3, 4]]).abs().max().item() < TOL
    # the mask decoder's multimask_only: 3 hypernetwork outputs, the same IoU predictions
    md = ours.mask_decoder
    sparse = torch.randn(3, 2, 128, generator=g)
    dense = torch.randn(1, 128, 16, 16, generator=g)
    _, hyper, iou = md._run_tokens(emb, pe, sparse, dense, factored=True)
    _, hyper3, iou3 = md._run_tokens(emb, pe, sparse, dense, factored=True, multimask_only=True)
    assert hyper.shape == (3, 4, 16) and hyper3.shape == (3, 3, 16) and iou3.shape == (3, 4)
    assert (hyper3 - hyper[:, 1:]).abs().max().item() < 1e-6
    assert (iou3 - iou).abs().max().item() < 1e-6


# ----------------------------------------------------------------------------- validation
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = fmrt.create_model("shapes-sam-tiny")
    with torch.no_grad():
        emb = m.encode_image(torch.rand(1, 3, 64, 64) * 255)
    return m, emb


@pytest.mark.parametrize("kwargs, match", [
    (dict(point_coords=torch.rand(2, 3), point_labels=torch.ones(2, 3)), "B x N x 2"),
    (dict(point_coords=torch.rand(2, 3, 3), point_labels=torch.ones(2, 3)), "B x N x 2"),
    (dict(point_coords=torch.rand(2, 3, 2), point_labels=torch.ones(2, 4)), "match point_coords"),
    (dict(point_coords=torch.rand(2, 3, 2), point_labels=torch.ones(3, 3)), "match point_coords"),
    (dict(point_coords=torch.rand(2, 3, 2)), "together"),
    (dict(point_coords=torch.rand(1, 1, 2), point_labels=torch.tensor([[5]])), "-1..3"),
    (dict(point_coords=torch.rand(1, 1, 2), point_labels=torch.tensor([[0.5]])), "whole"),
    (dict(boxes=torch.rand(2, 2, 2)), "B x 4"),
    (dict(point_coords=torch.rand(2, 1, 2), point_labels=torch.ones(2, 1), boxes=torch.rand(3, 4)),
     "batch sizes differ"),
    (dict(mask_input=torch.rand(1, 1, 32, 32)), "1 x 64 x 64"),
])
def test_bad_prompts_raise(tiny, kwargs, match):
    m, emb = tiny
    with pytest.raises(ValueError, match=match):
        m.decode(emb, **kwargs)


def test_bad_images_and_embeddings_raise(tiny):
    m, emb = tiny
    with pytest.raises(ValueError, match="H, W <= 64"):
        m.encode_image(torch.rand(1, 3, 65, 64))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        m.encode_image(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="image embeddings"):
        m.decode(torch.rand(1, 64, 16, 16), point_coords=torch.rand(1, 1, 2),
                 point_labels=torch.ones(1, 1))
    with pytest.raises(ValueError, match="must be 1"):
        m.decode(emb.expand(3, -1, -1, -1), point_coords=torch.rand(2, 1, 2),
                 point_labels=torch.ones(2, 1))


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_official_shapes():
    names = fmrt.list_models("sam")
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "shapes-sam-tiny"} <= set(names)
    assert set(names) <= set(fmrt.list_models())
    expect = {"sam_vit_b": (768, 12, 12, (2, 5, 8, 11)), "sam_vit_l": (1024, 24, 16, (5, 11, 17, 23)),
              "sam_vit_h": (1280, 32, 16, (7, 15, 23, 31))}
    for name, (dim, depth, heads, glob) in expect.items():
        e = SAM_CONFIGS[name].encoder
        assert (e.embed_dim, e.depth, e.num_heads, e.global_attn_indexes) == (dim, depth, heads, glob)
        assert (e.img_size, e.patch_size, e.window_size) == (1024, 16, 14)
        assert SAM_CONFIGS[name].prompt_embed_dim == 256 and SAM_CONFIGS[name].mask_in_chans == 16
        assert SAM_CONFIGS[name].image_embedding_size == 64


def test_family_builder_and_model_dir_round_trip(tmp_path, tiny):
    from fmrt.preprocess import PreprocessConfig
    from fmrt.pretrained import save_pretrained

    m, _ = tiny
    cfg = SamConfig.from_dict(m.config.to_dict())
    assert cfg.to_dict() == SAM_CONFIGS["shapes-sam-tiny"].to_dict()
    assert isinstance(build_from_config("sam", cfg.to_dict()), Sam)
    d = save_pretrained(str(tmp_path / "shapes-sam"), family="sam", model=m, config=cfg.to_dict(),
                        preprocess=PreprocessConfig(image_size=64))
    back = fmrt.create_model(None, checkpoint=d, family="sam")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                 m.state_dict().values()))
    assert fmrt.create_model("shapes-sam-tiny", checkpoint=d).config.to_dict() == cfg.to_dict()
