"""LLaMA decoder (fmrt.models.llama): parity with a randomly initialised
``transformers.LlamaForCausalLM`` loaded through ``create_model(None, checkpoint=dir)`` (plain,
sharded, tied embeddings, GQA, rope_theta / linear / llama3 scaling), fmrt model directories,
registry variants, and the static KV cache (cached decode == full recompute, with padding).

Nothing is downloaded: every checkpoint is written here from random weights."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import fmrt
from fmrt.models.kv_cache import KVCache
from fmrt.models.llama import LlamaConfig, LlamaForCausalLM, build_llama
from fmrt.models.llama_checkpoint import LlamaCheckpointError
from fmrt.pretrained import load_pretrained, save_pretrained
from fmrt.preprocess import PreprocessConfig

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VOCAB = 300


def hf_llama(tmp, *, tie=False, rope_parameters=None, shard=False, **kw):
    """A random HF LlamaForCausalLM saved to ``tmp``; returns (model, dir)."""
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    args.update(kw)
    cfg = transformers.LlamaConfig(**args)
    if rope_parameters is not None:
        cfg.rope_parameters = rope_parameters
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb them so a missed weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp), **({"max_shard_size": "200KB"} if shard else {}))
    return model, str(tmp)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf, d = hf_llama(tmp_path_factory.mktemp("hf_llama"))
    return hf, fmrt.create_model(None, checkpoint=d), d


def _ids(b, n, seed=1):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def test_logits_parity_with_transformers(pair):
    hf, ours, _ = pair
    assert isinstance(ours, LlamaForCausalLM)
    assert ours.config.kv_heads == 2 and ours.config.rope_theta == 5000.0
    x = _ids(2, 23)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert got.shape == (2, 23, VOCAB)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_logits_parity_left_padding(pair):
    hf, ours, _ = pair
    x = _ids(3, 19)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, :18] = 0  # a one-token row
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, attention_mask=mask)  # positions default to cumsum(mask) - 1
    valid = mask.bool()
    assert torch.isfinite(got).all()  # padding queries must not produce NaN
    torch.testing.assert_close(got[valid], ref[valid], atol=ATOL, rtol=0)


def test_sharded_and_tied_checkpoints(tmp_path):
    hf, d = hf_llama(tmp_path / "tied", tie=True, shard=True, num_key_value_heads=4)
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    ours = fmrt.create_model(None, checkpoint=d)
    assert ours.lm_head is None and ours.config.kv_heads == 4
    x = _ids(1, 15)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
])
def test_rope_scaling_parity(tmp_path, rope):
    hf, d = hf_llama(tmp_path, rope_parameters=rope, num_hidden_layers=1)
    ours = fmrt.create_model(None, checkpoint=d)
    assert ours.config.rope_scaling["rope_type"] == rope["rope_type"]
    x = _ids(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


def test_legacy_config_keys_and_unsupported_rope(tmp_path, pair):
    _, _, d = pair
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    # legacy (transformers 4) layout: top-level rope_theta / rope_scaling
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    legacy.update(rope_theta=5000.0, rope_scaling=None)
    from fmrt.models.llama_checkpoint import config_from_hf

    assert config_from_hf(legacy).rope_theta == 5000.0
    bad = dict(legacy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        config_from_hf(bad)
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf(dict(legacy, model_type="mistral"))


def test_checkpoint_errors(tmp_path, pair):
    _, _, d = pair
    empty = tmp_path / "nocfg"
    empty.mkdir()
    with pytest.raises(ValueError):
        fmrt.create_model(None, checkpoint=str(empty), family="llama")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    with open(os.path.join(d, "config.json")) as f:
        (noweights / "config.json").write_text(f.read())
    with pytest.raises(LlamaCheckpointError, match="no model.safetensors"):
        fmrt.create_model(None, checkpoint=str(noweights))
    with pytest.raises(LlamaCheckpointError, match="does not match 'shapes-lm-tiny'"):
        fmrt.create_model("shapes-lm-tiny", checkpoint=d)


def test_fmrt_model_dir_round_trip(tmp_path, pair):
    _, ours, _ = pair
    out = save_pretrained(str(tmp_path / "fmrt_llama"), family="llama", model=ours,
                          config=ours.config.to_dict(), preprocess=PreprocessConfig())
    again = fmrt.create_model(None, checkpoint=out)
    bundle = load_pretrained(out)
    x = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)
        torch.testing.assert_close(bundle.model(x), ours(x), atol=0, rtol=0)


def test_registry_variants():
    names = fmrt.list_models(family="llama")
    assert "shapes-lm-tiny" in names
    m = fmrt.create_model("shapes-lm-tiny")
    c = m.config
    assert (c.vocab_size, c.num_layers, c.num_heads, c.kv_heads) == (128, 4, 4, 2)
    assert 128 <= c.hidden_size <= 192 and c.max_position_embeddings == 256
    assert c.tie_word_embeddings and m.lm_head is None
    assert fmrt.create_model("shapes-lm-tiny", vocab_size=200).config.vocab_size == 200


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decode_equals_full_recompute(pair, padded):
    _, ours, _ = pair
    x = _ids(3, 16, seed=3)
    mask = torch.ones(3, 16, dtype=torch.bool)
    if padded:
        mask[0, :5] = False
        mask[2, :9] = False
    p = 7  # prefill 7 tokens, then one token per step
    cache = ours.new_cache(3, 20)
    with torch.no_grad():
        steps = [ours(x[:, :p], attention_mask=mask[:, :p], cache=cache)]
        for t in range(p, 16):
            steps.append(ours(x[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache))
        full = ours(x, attention_mask=mask)
    got = torch.cat(steps, dim=1)
    assert cache.length == 16 and cache.has_padding == padded
    assert cache.lengths.tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(got[mask], full[mask], atol=1e-5, rtol=0)


def test_cache_math_backend_and_embeds(pair):
    _, ours, _ = pair
    x = _ids(2, 12, seed=4)
    with torch.no_grad():
        ref = ours(x, backend="math")
        emb = ours(inputs_embeds=ours.embed(x))
        cache = ours.new_cache(2, 12)
        a = ours(x[:, :11], cache=cache, backend="math")
        b = ours(x[:, 11:], cache=cache, backend="math")
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-5, rtol=0)


def test_cache_static_buffers_and_errors(pair):
    _, ours, _ = pair
    cache = ours.new_cache(1, 8)
    ptrs = [k.data_ptr() for k in cache.k]
    assert cache.k[0].shape == (1, 2, 8, 24)
    with torch.no_grad():
        ours(_ids(1, 6), cache=cache)
        ours(_ids(1, 1), cache=cache)
        assert [k.data_ptr() for k in cache.k] == ptrs  # written in place, never reallocated
        with pytest.raises(ValueError, match="KV cache full"):
            ours(_ids(1, 2), cache=cache)
        with pytest.raises(ValueError, match="cache batch"):
            ours(_ids(2, 1), cache=ours.new_cache(1, 8))
        with pytest.raises(ValueError):
            ours(torch.zeros(1, 0, dtype=torch.long))
    cache.reset()
    assert cache.length == 0 and int(cache.lengths.sum()) == 0
    with pytest.raises(ValueError):
        KVCache(1, 0, 1, 4, 4)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        LlamaConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig(hidden_size=64, num_heads=4, hidden_act="relu6")
    m = build_llama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2, max_position_embeddings=4))
    with torch.no_grad():  # the rope table grows past max_position_embeddings
        assert m(torch.zeros(1, 9, dtype=torch.long)).shape == (1, 9, 50)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                    reason="torch without the int8 weight-only GEMM")
def test_int8_decode_is_opt_in_and_close(pair):
    _, _, d = pair
    m = fmrt.create_model(None, checkpoint=d)
    keys = set(m.state_dict())
    x = _ids(2, 10, seed=5)
    with torch.no_grad():
        ref = torch.cat([m(x[:, :9], cache=(c := m.new_cache(2, 10))), m(x[:, 9:], cache=c)], 1)
        m.enable_int8_decode()
        assert set(m.state_dict()) == keys  # int8 copies are not weights
        got = torch.cat([m(x[:, :9], cache=(c := m.new_cache(2, 10))), m(x[:, 9:], cache=c)], 1)
        torch.testing.assert_close(got[:, :9], ref[:, :9], atol=ATOL, rtol=0)  # prefill: fp32
        assert (got[:, 9] - ref[:, 9]).abs().max() < 0.05 * ref.abs().max()
        m.enable_int8_decode(False)
        again = torch.cat([m(x[:, :9], cache=(c := m.new_cache(2, 10))), m(x[:, 9:], cache=c)], 1)
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
