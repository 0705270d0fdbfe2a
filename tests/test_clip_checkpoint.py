"""Checkpoint loading: Hugging Face CLIPModel directories (parity with transformers at ViT-B/32
shapes), OpenAI / open_clip state dicts (.pt, wrapped, .safetensors, TorchScript) with shape
inference, fmrt's own directory format, and the errors for bad or mismatched files.

Nothing is downloaded: every checkpoint is written here from randomly initialised weights."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

import fmrt
from fmrt.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, build_clip
from fmrt.models.clip_checkpoint import CheckpointError, read_state_dict
from fmrt.models.clip_configs import CLIP_CONFIGS
from fmrt.registry import UnknownModelError

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers
def hf_config(*, vision_width=768, vision_layers=12, vision_heads=12, patch=32, image=224,
              text_width=512, text_layers=12, text_heads=8, vocab=49408, ctx=77, proj=512,
              act="quick_gelu", eos=49407):
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=text_heads,
                         vocab_size=vocab, max_position_embeddings=ctx, hidden_act=act,
                         eos_token_id=eos, bos_token_id=vocab - 2, projection_dim=proj),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                           patch_size=patch, image_size=image, hidden_act=act,
                           projection_dim=proj),
        projection_dim=proj)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Random init leaves LayerNorms at 1/0 and biases at 0, which would hide a swapped ln_1/ln_2
    or a mis-ordered q/k/v bias: give every parameter its own random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            p.fill_(math.log(50.0))
            continue
        p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def hf_random_model(cfg, seed: int):
    """A transformers CLIPModel with every parameter drawn here: built on the meta device (no
    init cost), LayerNorms around 1/0 with spread, non-zero biases, fan-in scaled weights (O(1)
    activations, so a 1e-4 tolerance is meaningful)."""
    with torch.device("meta"):
        model = transformers.CLIPModel(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for name, p in model.named_parameters():
        if name == "logit_scale":
            p.fill_(math.log(50.0))
        elif id(p) in norms:
            p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=g)
        elif name.endswith("class_embedding"):
            p.normal_(0.0, 0.5, generator=g)
        elif "embedding" in name and p.ndim == 2:  # token / position embeddings
            p.normal_(0.0, 0.02, generator=g)
        else:  # Linear (out, in) and the patch conv (out, 3, k, k)
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    for name, b in model.named_buffers():
        assert name.endswith("position_ids"), name
        b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return model.eval()


def _tensor(out):
    """transformers 5 may return an output object from get_*_features instead of a tensor."""
    if torch.is_tensor(out):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, attr, None)
        if torch.is_tensor(v):
            return v
    raise TypeError(f"cannot find embeddings in {type(out).__name__}")


@torch.no_grad()
def hf_features(model, images, ids):
    return (_tensor(model.get_image_features(pixel_values=images)),
            _tensor(model.get_text_features(input_ids=ids)))


def token_batch(vocab: int, ctx: int, eot: int, lengths=(6, 11), seed: int = 0) -> torch.Tensor:
    """Rows ``[sot, random..., eot, 0, 0, ...]``; the random ids avoid eot."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), ctx, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
        ids[i, 0] = vocab - 2
        ids[i, n - 1] = eot
    return ids


def to_openai(sd):
    """fmrt's state dict uses OpenAI names except for the text tower's ``text.`` prefix."""
    return {(k[len("text."):] if k.startswith("text.") else k): v.detach() for k, v in sd.items()}


def shape_config(cfg: CLIPConfig) -> dict:
    d = cfg.to_dict()
    d.pop("init_logit_scale")  # not stored in state dicts (the checkpoint's logit_scale is)
    return d


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k


@torch.no_grad()
def assert_same_outputs(a, b, images, ids, atol=1e-6):
    for x, y in ((a.encode_image(images), b.encode_image(images)),
                 (a.encode_text(ids), b.encode_text(ids))):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= atol
    assert torch.equal(a.logit_scale, b.logit_scale)


# ----------------------------------------------------------------------------- ViT-B/32 fixtures
@pytest.fixture(scope="module")
def hf_b32(tmp_path_factory):
    model = hf_random_model(hf_config(), seed=1)
    d = tmp_path_factory.mktemp("hf_b32")
    model.save_pretrained(str(d))
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    return model, str(d)


@pytest.fixture(scope="module")
def b32_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 224, 224, generator=g), token_batch(49408, 77, 49407)


@pytest.fixture(scope="module")
def fmrt_b32(hf_b32):
    return fmrt.create_model(checkpoint=hf_b32[1])


@pytest.fixture(scope="module")
def openai_b32_file(fmrt_b32, tmp_path_factory):
    sd = to_openai(fmrt_b32.state_dict())
    # OpenAI's TorchScript state dict carries these three scalars too
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    path = tmp_path_factory.mktemp("openai_b32") / "ViT-B-32.pt"
    torch.save(sd, str(path))
    return str(path)


# ----------------------------------------------------------------------------- HF parity
def test_hf_b32_config(fmrt_b32):
    c = fmrt_b32.config
    assert c.embed_dim == 512 and c.act == "quick_gelu"
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width, c.vision.layers,
            c.vision.heads, c.vision.mlp_ratio) == (224, 32, 768, 12, 12, 4.0)
    assert (c.text.vocab_size, c.text.context_length, c.text.width, c.text.layers, c.text.heads,
            c.text.mlp_ratio, c.text.eot_token_id) == (49408, 77, 512, 12, 8, 4.0, 49407)
    assert shape_config(c) == shape_config(CLIP_CONFIGS["ViT-B-32"])


def test_hf_b32_parity(hf_b32, fmrt_b32, b32_inputs):
    hf, _ = hf_b32
    images, ids = b32_inputs
    assert (ids == 49407).sum(dim=1).tolist() == [1, 1] and (ids[:, -1] == 0).all()
    hi, ht = hf_features(hf, images, ids)
    with torch.no_grad():
        fi, ft = fmrt_b32.encode_image(images), fmrt_b32.encode_text(ids)
    assert fi.shape == hi.shape == (2, 512) and ft.shape == ht.shape == (2, 512)
    assert (fi - hi).abs().max().item() < ATOL
    assert (ft - ht).abs().max().item() < ATOL
    assert fmrt_b32.logit_scale.item() == pytest.approx(hf.logit_scale.item())
    assert not fmrt_b32.training


def test_hf_b32_param_count(hf_b32, fmrt_b32):
    n_hf = sum(p.numel() for p in hf_b32[0].parameters())
    assert n_hf == pytest.approx(151.3e6, rel=1e-3)
    assert sum(p.numel() for p in fmrt_b32.parameters()) == n_hf


# ----------------------------------------------------------------------------- OpenAI at B/32
# (same config + bit-identical weights = same model: the forward passes are checked on the
# small configs below, which keeps this file fast)
def test_openai_b32_shape_inference(openai_b32_file, fmrt_b32):
    m = fmrt.create_model(checkpoint=openai_b32_file)
    assert shape_config(m.config) == shape_config(fmrt_b32.config)
    assert_same_weights(m, fmrt_b32)
    assert not m.training


def test_openai_b32_named(openai_b32_file, fmrt_b32):
    m = fmrt.create_model("ViT-B-32", checkpoint=openai_b32_file)
    assert shape_config(m.config) == shape_config(fmrt_b32.config)
    assert_same_weights(m, fmrt_b32)


def test_openai_b32_into_b16_is_rejected(openai_b32_file):
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        fmrt.create_model("ViT-B-16", checkpoint=openai_b32_file)
    msg = str(e.value)
    assert "ViT-B-32.pt loaded as 'ViT-B-16'" in msg
    assert "('visual.conv1.weight', (768, 3, 32, 32), (768, 3, 16, 16))" in msg


# ----------------------------------------------------------------------------- small configs
SMALL = CLIPConfig(
    embed_dim=32,
    vision=CLIPVisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
    text=CLIPTextConfig(vocab_size=100, context_length=16, width=64, layers=2, heads=1,
                        eot_token_id=99))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(3)
    return perturb_(build_clip(SMALL), seed=4).eval()


@pytest.fixture(scope="module")
def small_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 32, 32, generator=g), token_batch(100, 16, 99, lengths=(5, 16))


@pytest.fixture()
def openai_sd(small):
    return to_openai(small.state_dict())


def _check_small(path, small, small_inputs, **kw):
    m = fmrt.create_model(checkpoint=str(path), **kw)
    assert shape_config(m.config) == shape_config(SMALL)
    assert_same_outputs(m, small, *small_inputs)
    return m


def test_openai_pt(openai_sd, small, small_inputs, tmp_path):
    torch.save(openai_sd, tmp_path / "m.pt")
    m = _check_small(tmp_path / "m.pt", small, small_inputs)
    assert m.config.text.eot_token_id == 99  # OpenAI convention: eot is the last id
    assert_same_weights(m, small)


def test_openai_fp16_is_cast_to_float32(openai_sd, small, small_inputs, tmp_path):
    torch.save({k: v.half() for k, v in openai_sd.items()}, tmp_path / "half.pt")
    m = fmrt.create_model(checkpoint=str(tmp_path / "half.pt"))
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(m.visual.proj, small.visual.proj.half().float())


def test_open_clip_training_checkpoint(openai_sd, small, small_inputs, tmp_path):
    ckpt = {"epoch": 7, "name": "run",
            "state_dict": {"module." + k: v for k, v in openai_sd.items()}}
    torch.save(ckpt, tmp_path / "epoch_7.pt")
    _check_small(tmp_path / "epoch_7.pt", small, small_inputs)
    torch.save(openai_sd, tmp_path / "open_clip_pytorch_model.bin")
    _check_small(tmp_path / "open_clip_pytorch_model.bin", small, small_inputs)


def test_openai_safetensors(openai_sd, small, small_inputs, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in openai_sd.items()}, str(tmp_path / "m.safetensors"))
    _check_small(tmp_path / "m.safetensors", small, small_inputs)


def test_custom_text_layout(small, small_inputs, tmp_path):
    # open_clip's CustomTextCLIP keeps the text tower under "text." (fmrt's own naming)
    torch.save(small.state_dict(), tmp_path / "custom.pt")
    _check_small(tmp_path / "custom.pt", small, small_inputs)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_torchscript_archive(openai_sd, small, small_inputs, tmp_path):
    # OpenAI distributes TorchScript archives; build one whose state dict has OpenAI's keys
    root = _Holder()
    sd = dict(openai_sd, input_resolution=torch.tensor(32), context_length=torch.tensor(16),
              vocab_size=torch.tensor(100))
    for key, v in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, _Holder())
            mod = getattr(mod, p)
        if v.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(v))
        else:
            mod.register_buffer(leaf, v)
    torch.jit.script(root).save(str(tmp_path / "ViT-tiny.pt"))
    _check_small(tmp_path / "ViT-tiny.pt", small, small_inputs)


def test_named_small_architecture(tmp_path):
    """A registered name fixes what shapes cannot tell: activation, heads, eot id."""
    torch.manual_seed(6)
    tiny = perturb_(fmrt.create_model("shapes-vit-tiny"), seed=7).eval()
    torch.save(to_openai(tiny.state_dict()), tmp_path / "tiny.pt")
    m = fmrt.create_model("shapes-vit-tiny", checkpoint=str(tmp_path / "tiny.pt"))
    assert m.config.act == "gelu" and m.config.text.eot_token_id == 2
    assert m.config.vision.heads == 4
    images = torch.randn(2, 3, 64, 64)
    ids = token_batch(128, 32, 2, lengths=(4, 9))
    assert_same_outputs(m, tiny, images, ids)


def test_fmrt_directory(small, small_inputs, tmp_path):
    from fmrt.pretrained import save_pretrained
    from fmrt.preprocess import PreprocessConfig

    save_pretrained(str(tmp_path), family="clip", model=small, config=SMALL.to_dict(),
                    preprocess=PreprocessConfig(image_size=32))
    m = fmrt.create_model(checkpoint=str(tmp_path))
    assert m.config == SMALL
    assert_same_outputs(m, small, *small_inputs)


# ----------------------------------------------------------------------------- HF small variants
def _small_hf(seed, **kw):
    cfg = hf_config(vision_width=64, vision_layers=2, vision_heads=2, patch=8, image=32,
                    text_width=64, text_layers=2, text_heads=4, vocab=100, ctx=16, proj=32, **kw)
    return hf_random_model(cfg, seed)


def _hf_parity(hf, model, eot):
    images = torch.randn(2, 3, 32, 32)
    ids = token_batch(100, 16, eot, lengths=(5, 12))
    hi, ht = hf_features(hf, images, ids)
    with torch.no_grad():
        assert (model.encode_image(images) - hi).abs().max().item() < ATOL
        assert (model.encode_text(ids) - ht).abs().max().item() < ATOL


def test_hf_pytorch_model_bin(tmp_path):
    hf = _small_hf(10, eos=99)
    hf.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    m = fmrt.create_model(checkpoint=str(tmp_path))
    assert m.config.text.heads == 4 and m.config.vision.heads == 2  # read, not width // 64
    _hf_parity(hf, m, eot=99)


def test_hf_legacy_eos_and_gelu(tmp_path):
    # Legacy configs say eos_token_id=2 and transformers pools at argmax(input_ids), i.e. at the
    # largest id, which is eot; fmrt maps that to eot = vocab - 1. Also a GELU model.
    hf = _small_hf(12, eos=2, act="gelu")
    hf.save_pretrained(str(tmp_path))
    m = fmrt.create_model(checkpoint=str(tmp_path))
    assert m.config.text.eot_token_id == 99 and m.config.act == "gelu"
    _hf_parity(hf, m, eot=99)


def test_hf_logits(tmp_path):
    hf = _small_hf(14, eos=99)
    hf.save_pretrained(str(tmp_path))
    m = fmrt.create_model(checkpoint=str(tmp_path))
    images, ids = torch.randn(3, 3, 32, 32), token_batch(100, 16, 99, lengths=(3, 7))
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=images)
        img, txt, scale = m(images, ids)
    assert ((scale * img @ txt.t()) - out.logits_per_image).abs().max().item() < ATOL
    # token features for VLM projectors: LLaVA takes hidden_states[-2] of the vision tower
    with torch.no_grad():
        hidden = hf.vision_model(pixel_values=images, output_hidden_states=True).hidden_states
        _, tokens = m.visual.forward_tokens(images, layer=-2)
    assert len(hidden) == m.config.vision.layers + 1
    assert (tokens - hidden[-2]).abs().max().item() < ATOL


# ----------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        fmrt.create_model(checkpoint=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.bin", "garbage.safetensors"])
def test_unreadable_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        fmrt.create_model(checkpoint=str(tmp_path / name))


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        fmrt.create_model(checkpoint=str(tmp_path / "list.pt"))


def test_not_a_clip_state_dict(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an OpenAI/open_clip CLIP state dict"):
        fmrt.create_model(checkpoint=str(tmp_path / "other.pt"))


def test_missing_and_unexpected_keys(openai_sd, tmp_path):
    sd = dict(openai_sd)
    del sd["ln_final.weight"]
    sd["visual.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing") as e:
        fmrt.create_model(checkpoint=str(tmp_path / "broken.pt"))
    assert "text.ln_final.weight" in str(e.value) and "visual.extra" in str(e.value)


def test_small_file_into_registered_architecture(openai_sd, tmp_path):
    torch.save(openai_sd, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="'shapes-vit-tiny'.*does not match the architecture"):
        fmrt.create_model("shapes-vit-tiny", checkpoint=str(tmp_path / "small.pt"))
    with pytest.raises(UnknownModelError, match="unknown model"):
        fmrt.create_model("nope", checkpoint=str(tmp_path / "small.pt"))


def test_resnet_tower_rejected(openai_sd, tmp_path):
    sd = dict(openai_sd)
    sd["visual.layer1.0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "rn.pt")
    with pytest.raises(CheckpointError, match="ModifiedResNet"):
        fmrt.create_model(checkpoint=str(tmp_path / "rn.pt"))


def test_hf_weights_without_config(tmp_path):
    hf = _small_hf(16, eos=99)
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="config.json"):
        fmrt.create_model(checkpoint=str(tmp_path / "hf" / "model.safetensors"))
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        fmrt.create_model(checkpoint=str(tmp_path / "hf"))


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        fmrt.create_model(checkpoint=str(tmp_path / "empty"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="neither"):
        fmrt.create_model(checkpoint=str(tmp_path / "bert"))


def test_read_state_dict_unwraps(openai_sd, tmp_path):
    torch.save({"model": {"module." + k: v for k, v in openai_sd.items()}}, tmp_path / "w.pt")
    sd = read_state_dict(str(tmp_path / "w.pt"))
    assert set(sd) == set(openai_sd)
