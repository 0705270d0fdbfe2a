"""Flamingo: Perceiver resampler, gated cross-attention in a frozen LLaMA, media masking,
KV-cache generation, trainable-parameter set, interleaved ShapesWorld episodes, training
smoke run and the bundled shapes-flamingo few-shot figures."""
import copy
import os

import numpy as np
import pytest
import torch

from fmrt.data import flamingo_data as FD
from fmrt.models.flamingo import Flamingo, FlamingoConfig, pad_image_lists
from fmrt.models.llama import LlamaConfig, LlamaForCausalLM
from fmrt.models.perceiver import PerceiverResampler

IMG, EOC = 90, 91

TINY_VISION = dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                   output_dim=32, act="gelu")
TINY_LM = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
               num_kv_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny(immediate=True, every=1, seed=0):
    torch.manual_seed(seed)
    cfg = FlamingoConfig(vision=dict(TINY_VISION), lm=dict(TINY_LM), media_token_id=IMG,
                         eoc_token_id=EOC, cross_attn_every_n_layers=every, perceiver_depth=1,
                         perceiver_heads=2, perceiver_dim_head=8, num_latents=4, xattn_heads=2,
                         xattn_dim_head=8, only_attend_immediate_media=immediate)
    lm = LlamaForCausalLM(LlamaConfig.from_dict(TINY_LM)).eval()
    ref = copy.deepcopy(lm)
    return Flamingo(cfg, lm=lm).eval(), ref


def open_gates(model, value=0.7, seed=1):
    """Non-zero gates and random (non-degenerate) cross-attention weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.xattn_layers:
            blk.attn_gate.fill_(value)
            blk.ff_gate.fill_(value)
            for n, p in blk.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def images(b, t, seed=0, size=32):
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- resampler
def test_resampler_output_shape_independent_of_input_size():
    torch.manual_seed(0)
    r = PerceiverResampler(dim=32, depth=2, dim_head=8, heads=2, num_latents=5, ff_mult=2)
    for v in (1, 17, 65, 257):
        assert r(torch.randn(2, 3, v, 32)).shape == (2, 3, 5, 32)
    assert r(torch.randn(1, 2, 4, 9, 32)).shape == (1, 2, 5, 32)  # frames are folded in
    keys = set(r.state_dict())
    assert {"latents", "norm.weight", "layers.0.0.norm_media.weight", "layers.0.0.to_q.weight",
            "layers.0.0.to_kv.weight", "layers.0.0.to_out.weight", "layers.1.1.0.weight",
            "layers.1.1.1.weight", "layers.1.1.3.weight"} <= keys  # open_flamingo names
    with pytest.raises(ValueError):
        r(torch.randn(2, 3, 7, 31))


def test_media_shape_fixed_for_any_image_size():
    model, _ = tiny()
    from fmrt.preprocess import PreprocessConfig

    pp = PreprocessConfig(image_size=32, resize_mode="squash")
    rng = np.random.default_rng(0)
    for hw in ((32, 32), (17, 90), (200, 64)):
        ims = [[rng.integers(0, 255, hw + (3,), dtype=np.uint8) for _ in range(2)]]
        with torch.no_grad():
            assert model.encode_images(pad_image_lists(ims, pp)).shape == (1, 2, 4, 32)


# ----------------------------------------------------------------------------- gates / masking
def test_zero_gates_equal_frozen_lm_exactly():
    model, ref = tiny(every=1)
    ids = torch.tensor([[1, 5, IMG, 20, 21, EOC, IMG, 30, 31, 32], [1, IMG, 7, 8, 9, 10, EOC, 4, 5, 6]])
    with torch.no_grad():
        a = model(ids, images=images(2, 2))
        b = ref(ids)
    assert torch.equal(a, b)
    for blk in model.xattn_layers:  # Flamingo's tanh gates start at exactly zero
        assert blk.attn_gate.item() == 0.0 and blk.ff_gate.item() == 0.0
    # and the LM weights are recoverable under their own names
    sd = model.lm_state_dict()
    assert set(sd) == set(ref.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


def test_media_masking_immediate():
    model, ref = tiny(every=1)
    open_gates(model)
    ids = torch.tensor([[1, 5, 6, IMG, 20, 21, EOC, IMG, 30, 31, 32]])
    im = images(1, 2)
    im2 = im.clone()
    im2[:, 1] = images(1, 1, seed=5)[:, 0]
    im1 = im.clone()
    im1[:, 0] = images(1, 1, seed=6)[:, 0]
    with torch.no_grad():
        base, lm = model(ids, images=im), ref(ids)
        ch2, ch1 = model(ids, images=im2), model(ids, images=im1)
    first, second = 3, 7
    # text before the first image is unaffected by any image (the gated FFN still acts on it,
    # as in Flamingo, so it differs from the bare LM unless ff_gate is 0)
    im_all = images(1, 2, seed=11)
    with torch.no_grad():
        other = model(ids, images=im_all)
    assert torch.equal(base[:, :first], other[:, :first])
    assert (base[:, first:] - other[:, first:]).abs().amax(-1).min() > 1e-4
    with torch.no_grad():
        for blk in model.xattn_layers:
            blk.ff_gate.zero_()
        no_ff = model(ids, images=im)
    # ... and with the FFN gate closed its cross-attention output is exactly zero: the LM's logits
    assert torch.equal(no_ff[:, :first], lm[:, :first])
    assert not torch.allclose(no_ff[:, first:], lm[:, first:])
    # image 2 only reaches tokens from its <image> token on
    assert torch.equal(base[:, :second], ch2[:, :second])
    assert (base[:, second:] - ch2[:, second:]).abs().amax(-1).min() > 1e-4
    # image 1 reaches the tokens between the two <image> tokens
    assert (base[:, first:second] - ch1[:, first:second]).abs().amax(-1).min() > 1e-4


def test_media_masking_all_previous_mode():
    model, ref = tiny(immediate=False, every=2)
    assert len(model.xattn_layers) == 1  # every 2nd of 2 layers
    open_gates(model)
    ids = torch.tensor([[1, 5, IMG, 20, 21, EOC, IMG, 30, 31]])
    im = images(1, 2)
    im2 = im.clone()
    im2[:, 1] = images(1, 1, seed=9)[:, 0]
    with torch.no_grad():
        a, b = model(ids, images=im), model(ids, images=im2)
        c = model(ids, images=images(1, 2, seed=12))
    assert torch.equal(a[:, :2], c[:, :2])
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


# ----------------------------------------------------------------------------- generation
def test_kv_cache_generation_equals_full_recompute():
    model, _ = tiny(every=1)
    open_gates(model, 0.9)
    prompts = [[1, IMG, 20, 21, EOC, IMG, 30], [1, 40, IMG, 50]]  # 2 and 1 images, left-padded
    im = images(2, 2, seed=3)
    gens = model.generate(im, prompts, max_new_tokens=6, stop_token_ids=[])
    for r, (p, g) in enumerate(zip(prompts, gens)):
        assert len(g.tokens) == 6
        seq = p + g.tokens
        with torch.no_grad():
            full = model(torch.tensor([seq]), images=im[r:r + 1])
        assert full[0, len(p) - 1:-1].argmax(-1).tolist() == g.tokens
    # logits: cached prefill + one-token decode steps vs one full forward
    seq = torch.tensor([prompts[0] + gens[0].tokens])
    with torch.no_grad():
        media = model.encode_images(im[:1])
        cache = model.new_cache(1, 32)
        steps = [model(seq[:, :5], media=media, cache=cache)]
        for t in range(5, seq.shape[1]):
            steps.append(model(seq[:, t:t + 1], media=media, cache=cache))
        full = model(seq, media=media)
    assert int(cache.media_count[0]) == 2
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- training
def test_only_resampler_and_xattn_are_trainable():
    model, _ = tiny(every=1)
    names = model.trainable_names()
    assert names and all(n.startswith("perceiver.") or ".gated_cross_attn_layer." in n
                         for n in names)
    assert any(n.startswith("perceiver.") for n in names)
    assert sum(".gated_cross_attn_layer." in n for n in names) > 0
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    frozen_lm = [p for n, p in model.lang_encoder.named_parameters()
                 if ".gated_cross_attn_layer." not in n]
    assert frozen_lm and not any(p.requires_grad for p in frozen_lm)
    model.train()
    ids = torch.tensor([[1, IMG, 20, 21, EOC, IMG, 30, 31]])
    model(ids, images=images(1, 2)).logsumexp(-1).sum().backward()
    # gates at zero: the gates themselves get a gradient (Flamingo's zero-init still learns)
    assert all(b.attn_gate.grad.abs().item() > 0 for b in model.xattn_layers)
    assert all(p.grad is None for p in frozen_lm)


def test_episodes_tokenizer_and_labels():
    tok = FD.build_tokenizer()
    assert FD.special_ids(tok) == (IMG, EOC)  # = FlamingoConfig defaults
    assert tok.vocab_size <= 128
    for task in FD.TASKS:
        ep = FD.sample_episode("test", task, 7, 3)
        ep2 = FD.sample_episode("test", task, 7, 5)
        assert [c.answer for c in ep] == [c.answer for c in ep2[:3]]  # paired shot counts
        assert np.array_equal(ep[0].image, ep2[0].image)
        ids, labels = FD.encode_episode(tok, ep)
        assert ids.count(IMG) == 3 and ids.count(EOC) == 3 and max(ids) < 128
        tgt = [i for i, l in zip(ids, labels) if l != FD.IGNORE]
        assert tok.decode([t for t in tgt if t != EOC]).split() == " ".join(
            c.answer for c in ep).split()
        q, _ = FD.encode_episode(tok, ep, query=True)
        assert q[-1] != EOC and q.count(IMG) == 3


def test_train_smoke(tmp_path):
    from fmrt.pretrained import load_pretrained
    from fmrt.train.flamingo import FlamingoTrainConfig, train

    cfg = FlamingoTrainConfig(out_dir=str(tmp_path / "run"), lm_steps=2, lm_batch_size=4,
                              steps=2, batch_size=2, warmup=1, eval_n=2, threads=1,
                              ckpt_every=1)
    out = train(cfg)
    p = load_pretrained(out)
    assert p.family == "flamingo" and isinstance(p.model, Flamingo)
    fs = p.config["provenance"]["few_shot"]
    assert set(fs["accuracy"]) == {"0", "2", "4"}


BUNDLE = os.path.join(os.path.dirname(__file__), "..", "fmrt", "weights", "shapes-flamingo")


@pytest.mark.skipif(not os.path.isdir(BUNDLE), reason="shapes-flamingo is not bundled")
def test_bundled_four_shot_beats_zero_shot():
    from fmrt.pretrained import load_pretrained
    from fmrt.train.flamingo import few_shot_eval

    p = load_pretrained("shapes-flamingo")
    r = few_shot_eval(p.model, p.tokenizer, p.preprocess, shots=(0, 4), n=20,
                      tasks=FD.IMPLICIT_TASKS)
    assert r["accuracy"][4] > r["accuracy"][0]
