"""CLIP model behaviour: attention backends, causal masking, eot pooling, logit-scale clamp, the
contrastive loss against a float64 reference, gradients, and the model registry."""
from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import fmrt
from fmrt.models.attention import (BACKENDS, attention, attention_backend,
                                   get_attention_backend, set_attention_backend)
from fmrt.models.clip import (LOGIT_SCALE_MAX, CLIPConfig, CLIPTextConfig, CLIPVisionConfig,
                              build_clip, clip_contrastive_loss)
from fmrt.registry import UnknownModelError

SMALL = CLIPConfig(
    embed_dim=32,
    vision=CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
    text=CLIPTextConfig(vocab_size=100, context_length=16, width=64, layers=2, heads=4,
                        eot_token_id=99))
EOT = 99


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_clip(SMALL)
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def make_ids(rows):
    """rows: lists of ids; right-padded with 0 to the context length."""
    out = torch.zeros(len(rows), 16, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


@pytest.fixture(scope="module")
def ids():
    return make_ids([[98, 5, 6, 7, EOT], [98, 11, 12, 13, 14, 15, 16, 17, EOT],
                     [98] + list(range(20, 34)) + [EOT]])


# ----------------------------------------------------------------------------- attention
def test_backend_flag():
    assert get_attention_backend() in BACKENDS
    prev = get_attention_backend()
    with attention_backend("math"):
        assert get_attention_backend() == "math"
    assert get_attention_backend() == prev
    with pytest.raises(ValueError):
        set_attention_backend("flash9000")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError):
        attention(q, q, q, backend="flash9000")


@pytest.mark.parametrize("lq,lk", [(7, 7), (3, 7), (1, 5)])
def test_attention_backends_agree(lq, lk):
    g = torch.Generator().manual_seed(lq * 10 + lk)
    q = torch.randn(2, 3, lq, 8, generator=g)
    k, v = torch.randn(2, 3, lk, 8, generator=g), torch.randn(2, 3, lk, 8, generator=g)
    pad = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    pad[1, ..., -1] = False  # key padding on the second sample (no row is fully masked)
    additive = torch.zeros(2, 1, lq, lk).masked_fill(~pad, float("-inf"))
    for kw in ({}, {"is_causal": True}, {"attn_mask": pad}, {"attn_mask": additive},
               {"attn_mask": pad, "is_causal": True}, {"attn_mask": additive, "is_causal": True}):
        mask = kw.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            mask = mask.double()
        expected = attention(q.double(), k.double(), v.double(), backend="math",
                             attn_mask=mask, is_causal=kw.get("is_causal", False))
        for backend in BACKENDS:
            out = attention(q, k, v, backend=backend, **kw)
            assert out.shape == (2, 3, lq, 8) and out.dtype == torch.float32
            assert (out.double() - expected).abs().max().item() < 1e-5, (backend, kw)


def test_causal_is_bottom_right_aligned():
    # the last Lq queries against Lk keys: query i sees keys <= i + Lk - Lq (decoding with a cache)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    full = attention(q, k, v, is_causal=True, backend="math")
    for backend in BACKENDS:
        tail = attention(q[:, :, 4:], k, v, is_causal=True, backend=backend)
        assert torch.allclose(tail, full[:, :, 4:], atol=1e-6), backend


@pytest.mark.parametrize("tower", ["image", "text"])
def test_model_backends_agree(model, images, ids, tower):
    outs = {}
    for backend in BACKENDS:
        with attention_backend(backend), torch.no_grad():
            if tower == "image":
                outs[backend] = (model.encode_image(images), model.visual.forward_tokens(images)[1])
            else:
                outs[backend] = (model.encode_text(ids), model.text.forward_tokens(ids))
    for a, b in zip(outs["sdpa"], outs["math"]):
        assert (a - b).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- text tower
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_masking(model, backend):
    base = make_ids([[98] + list(range(1, 15)) + [EOT]])
    with attention_backend(backend), torch.no_grad():
        h0 = model.text.forward_tokens(base)
        for i in (0, 4, 10, 14):
            changed = base.clone()
            changed[0, i + 1:] = (changed[0, i + 1:] + 37) % 98
            h1 = model.text.forward_tokens(changed)
            assert (h1[0, : i + 1] - h0[0, : i + 1]).abs().max().item() < 1e-6
            assert (h1[0, i + 1:] - h0[0, i + 1:]).abs().max().item() > 1e-3


def test_vision_is_not_causal(model, images):
    changed = images.clone()
    changed[:, :, -8:, -8:] += 1.0  # only the last patch
    with torch.no_grad():
        a, b = model.encode_image(images), model.encode_image(changed)
    assert (a - b).abs().max().item() > 1e-3


def test_eot_pooling_picks_first_eot(model):
    ids = make_ids([[98, 5, 6, EOT, 7, 8, EOT], [98, 5, 6, 7, 8, 9], [98, EOT]])
    with torch.no_grad():
        tokens = model.text.forward_tokens(ids)
        feats = model.encode_text(ids)
    assert model.text.eot_positions(ids).tolist() == [3, 15, 1]  # no eot: last position
    for row, pos in enumerate([3, 15, 1]):
        expected = tokens[row, pos] @ model.text.text_projection
        assert torch.allclose(feats[row], expected, atol=1e-6)
    # what follows the first eot (padding with 0 or with eot, more text) never matters
    same = make_ids([[98, 5, 6, EOT] + [EOT] * 12])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(same)[0], feats[0], atol=1e-6)


def test_eot_need_not_be_largest_id(model):
    # the ShapesWorld vocabulary has eot = 2; pooling is by id, not OpenAI's argmax trick
    m = build_clip(dataclasses.replace(SMALL, text=CLIPTextConfig(
        vocab_size=100, context_length=16, width=64, layers=1, heads=4, eot_token_id=2)))
    ids = make_ids([[1, 50, 60, 2, 0, 0]])
    assert m.text.eot_positions(ids).tolist() == [3]


def test_input_validation(model):
    with pytest.raises(ValueError):
        model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError):
        model.encode_text(torch.zeros(1, 17, dtype=torch.long))


def test_vision_forward_tokens(model, images):
    with torch.no_grad():
        pooled, tokens = model.visual.forward_tokens(images)
        assert tokens.shape == (3, 1 + 16, 64)
        assert torch.allclose(pooled @ model.visual.proj, model.encode_image(images), atol=1e-6)
        pooled2, penultimate = model.visual.forward_tokens(images, layer=-2)
        assert torch.allclose(pooled2, pooled, atol=1e-6) and penultimate.shape == tokens.shape
        assert not torch.allclose(penultimate, tokens)


# ----------------------------------------------------------------------------- CLIP head
def test_forward_normalised(model, images, ids):
    with torch.no_grad():
        img, txt, scale = model(images, ids)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.ndim == 0 and scale.item() == pytest.approx(math.exp(model.logit_scale.item()))


def test_logit_scale_clamp():
    m = build_clip(SMALL)
    assert LOGIT_SCALE_MAX == pytest.approx(math.log(100))
    assert m.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.scale().item() == pytest.approx(100.0, rel=1e-6)
    assert m(torch.randn(1, 3, 32, 32), make_ids([[98, EOT]]))[2].item() == pytest.approx(100.0)
    with torch.no_grad():
        m.logit_scale.fill_(1.0)
    assert m.scale().item() == pytest.approx(math.e, rel=1e-6)


def reference_loss(img, txt, scale, hard=None):
    """Symmetric cross-entropy in float64, written out with log-sum-exp."""
    img, txt, scale = img.double(), txt.double(), float(scale)
    b = img.shape[0]
    cols = txt if hard is None else torch.cat([txt, hard.double()])
    logits = scale * img @ cols.t()
    i2t = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(b)) / b
    t2i_logits = logits[:, :b].t()
    t2i = sum(torch.logsumexp(t2i_logits[i], 0) - t2i_logits[i, i] for i in range(b)) / b
    return 0.5 * (i2t + t2i)


def test_contrastive_loss_reference():
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    loss = clip_contrastive_loss(img, txt, scale)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(reference_loss(img, txt, scale).item(), rel=1e-5)
    # perfectly matched pairs at a high scale give a near-zero loss; symmetric in its inputs
    assert clip_contrastive_loss(img, img, torch.tensor(100.0)).item() < 1e-3
    assert clip_contrastive_loss(txt, img, scale).item() == pytest.approx(loss.item(), rel=1e-6)


def test_contrastive_loss_hard_negatives():
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    hard = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    loss = clip_contrastive_loss(img, txt, scale, hard_negative_features=hard)
    assert loss.item() == pytest.approx(reference_loss(img, txt, scale, hard).item(), rel=1e-5)
    assert loss.item() > clip_contrastive_loss(img, txt, scale).item()
    # extra columns only in image->text: the text->image half is the plain one
    i2t_plain = F.cross_entropy(scale * img @ txt.t(), torch.arange(4))
    t2i = F.cross_entropy(scale * txt @ img.t(), torch.arange(4))
    i2t_hard = F.cross_entropy(scale * img @ torch.cat([txt, hard]).t(), torch.arange(4))
    assert loss.item() == pytest.approx(0.5 * (i2t_hard + t2i).item(), rel=1e-6)
    assert loss.item() != pytest.approx(0.5 * (i2t_plain + t2i).item(), rel=1e-6)


def test_gradients_flow(images):
    torch.manual_seed(6)
    m = build_clip(SMALL).train()
    ids = make_ids([[98, 5, 6, 7, EOT], [98, 11, 12, 13, 14, 15, 16, 17, EOT], [98, 3, EOT]])
    img, txt, scale = m(images, ids)
    loss = clip_contrastive_loss(img, txt, scale)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name in ("logit_scale", "visual.conv1.weight", "visual.class_embedding", "visual.proj",
                 "text.token_embedding.weight", "text.positional_embedding",
                 "text.text_projection", "visual.transformer.resblocks.0.attn.in_proj_weight",
                 "text.transformer.resblocks.0.mlp.c_fc.weight", "text.ln_final.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum().item() > 0, name
    # positions after the first eot never receive gradient (causal mask + eot pooling)
    pos_grad = m.text.positional_embedding.grad
    assert pos_grad[:9].abs().sum(dim=1).min() > 0
    assert pos_grad[9:].abs().sum() == 0
    assert m.text.token_embedding.weight.grad[0].abs().sum() == 0  # the padding id


# ----------------------------------------------------------------------------- registry
def test_list_models():
    names = fmrt.list_models()
    assert names == sorted(names)
    for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "shapes-vit-tiny"):
        assert n in names and n in fmrt.list_models("clip")
    assert fmrt.list_models("no-such-family") == []


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="unknown model 'nope'") as e:
        fmrt.create_model("nope")
    assert "known:" in str(e.value) and "ViT-B-32" in str(e.value)
    with pytest.raises(UnknownModelError, match="did you mean") as e:
        fmrt.create_model("vit-b-32")
    assert "ViT-B-32" in str(e.value)
    assert isinstance(e.value, KeyError)
    with pytest.raises(ValueError):
        fmrt.create_model()


def test_create_small_named():
    m = fmrt.create_model("shapes-vit-tiny")
    assert m.config.act == "gelu" and m.config.text.eot_token_id == 2
    assert m.image_size == 64 and m.context_length == 32 and m.embed_dim == 128
    m2 = fmrt.create_model("shapes-vit-tiny", embed_dim=64)  # overrides reach the config
    assert m2.embed_dim == 64


def test_param_counts_match_transformers():
    transformers = pytest.importorskip("transformers")

    def hf(vw, vl, vh, patch, tw, th, proj):
        cfg = transformers.CLIPConfig(
            text_config=dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=12,
                             num_attention_heads=th, hidden_act="quick_gelu"),
            vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                               num_attention_heads=vh, patch_size=patch, image_size=224,
                               hidden_act="quick_gelu"),
            projection_dim=proj)
        with torch.device("meta"):
            return sum(p.numel() for p in transformers.CLIPModel(cfg).parameters())

    expected = {"ViT-B-32": hf(768, 12, 12, 32, 512, 8, 512),
                "ViT-B-16": hf(768, 12, 12, 16, 512, 8, 512),
                "ViT-L-14": hf(1024, 24, 16, 14, 768, 12, 768)}
    assert expected["ViT-B-32"] == 151_277_313  # openai/clip-vit-base-patch32: ~151.3M
    for name, n in expected.items():
        with torch.device("meta"):
            m = fmrt.create_model(name)
        assert sum(p.numel() for p in m.parameters()) == n, name
