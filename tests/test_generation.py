"""Generation (fmrt.models.generation): greedy tokens identical to ``transformers``' ``generate``
(batch 1 and batched prompts of different lengths), seeded sampling, top-k / top-p semantics on
hand-made distributions, stop tokens and stop strings, streaming, context limits and bad inputs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import fmrt
from fmrt.models.generation import (filter_logits, generate, sample_next_token, stream,
                                    stream_batch)

transformers = pytest.importorskip("transformers")

VOCAB = 300
EOS = 2
PROMPTS = [[5, 6, 7], list(range(10, 31)), [299, 1, 17, 42, 8], [77]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=2500.0, eos_token_id=EOS, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = str(tmp_path_factory.mktemp("hf_gen"))
    hf.save_pretrained(d)
    return hf, fmrt.create_model(None, checkpoint=d)


def detok(ids):
    """Toy detokenizer: one letter per id."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def _hf_greedy(hf, prompts, n):
    w = max(map(len, prompts))
    ids = torch.tensor([[0] * (w - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0)
    return out[:, w:].tolist()


# ----------------------------------------------------------------------------- parity
def test_greedy_matches_transformers_batch1(pair):
    hf, ours = pair
    for p in PROMPTS[:3]:
        ref = _hf_greedy(hf, [p], 16)[0]
        got = generate(ours, p, max_new_tokens=16, stop_token_ids=[])
        assert got.tokens == ref, p
        assert got.finish_reason == "length" and got.prompt_tokens == len(p)


def test_greedy_matches_transformers_batched_padding(pair):
    hf, ours = pair
    ref = _hf_greedy(hf, PROMPTS, 16)
    got = generate(ours, PROMPTS, max_new_tokens=16, stop_token_ids=[])
    assert [g.tokens for g in got] == ref
    # same as each prompt alone
    assert [generate(ours, p, max_new_tokens=16, stop_token_ids=[]).tokens
            for p in PROMPTS] == ref


def test_eos_stops_like_transformers(pair):
    hf, ours = pair
    p = PROMPTS[1]
    free = generate(ours, p, max_new_tokens=12, stop_token_ids=[]).tokens
    stop_id = free[4]  # make the 5th generated token a stop token
    first = free.index(stop_id)
    got = generate(ours, p, max_new_tokens=12, stop_token_ids=[stop_id])
    assert got.tokens == free[:first] and got.finish_reason == "stop"
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                          eos_token_id=stop_id, pad_token_id=0)[0, len(p):].tolist()
    assert ref[:first + 1] == free[:first] + [stop_id]
    # default stop ids are the model's eos ids (config eos_token_id=2)
    assert ours.config.eos_token_ids == [EOS]


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_with_a_seed(pair):
    _, ours = pair
    kw = dict(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, stop_token_ids=[])
    a = generate(ours, PROMPTS, seed=7, **kw)
    b = generate(ours, PROMPTS, seed=7, **kw)
    c = generate(ours, PROMPTS, seed=8, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    g = torch.Generator().manual_seed(7)
    assert generate(ours, PROMPTS, generator=g, **kw)[0].tokens == a[0].tokens


def test_top_k_and_top_p_on_hand_made_distributions():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]])
    logits = probs.log()
    keep = lambda lg: torch.isfinite(lg).tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [[True, True, False, False, False],
                                                    [False, False, False, True, True]]
    # nucleus: smallest set reaching p, the crossing token included
    assert keep(filter_logits(logits, top_p=0.5))[0] == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_p=0.6))[0] == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.7))[0] == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.71))[0] == [True, True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.01))[1] == [False, False, False, False, True]
    assert all(keep(filter_logits(logits, top_p=1.0))[0])
    both = keep(filter_logits(logits, top_k=3, top_p=0.6))
    assert both == [[True, True, False, False, False], [False, False, False, True, True]]
    # ties with the k-th value survive
    tie = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert keep(filter_logits(tie, top_k=1)) == [[False, True, True, False]]

    g = torch.Generator().manual_seed(0)
    many = logits.repeat(2000, 1)  # 2000 independent draws per distribution in one call
    draws = sample_next_token(many, temperature=1.0, top_k=2, generator=g).view(2000, 2)
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {3, 4}
    frac = (draws[:, 0] == 0).float().mean().item()  # 0.5 / 0.7 after renormalising
    assert abs(frac - 0.5 / 0.7) < 0.04
    nucleus = sample_next_token(many, temperature=1.0, top_p=0.71, generator=g).view(2000, 2)
    assert set(nucleus[:, 0].tolist()) == {0, 1, 2}
    assert sample_next_token(logits, temperature=0.0).tolist() == [0, 4]
    # a small temperature concentrates on the mode
    cold = sample_next_token(logits.repeat(200, 1), temperature=0.05, generator=g).view(200, 2)
    assert cold[:, 0].eq(0).all() and cold[:, 1].eq(4).all()


def test_top_k_1_equals_greedy(pair):
    _, ours = pair
    greedy = generate(ours, PROMPTS[:2], max_new_tokens=10, stop_token_ids=[])
    k1 = generate(ours, PROMPTS[:2], max_new_tokens=10, temperature=0.8, top_k=1, seed=3,
                  stop_token_ids=[])
    assert [g.tokens for g in k1] == [g.tokens for g in greedy]


# ----------------------------------------------------------------------------- stop strings
def test_stop_strings_cut_text_and_tokens(pair):
    _, ours = pair
    p = PROMPTS[0]
    free = generate(ours, p, max_new_tokens=20, stop_token_ids=[], detokenize=detok)
    assert free.text == detok(free.tokens) and free.finish_reason == "length"
    stop = free.text[6:8]  # two letters from generated tokens 6 and 7
    cut = free.text.find(stop)
    got = generate(ours, p, max_new_tokens=20, stop_token_ids=[], stop_strings=[stop, "zzzzzz"],
                   detokenize=detok)
    assert got.text == free.text[:cut] and stop not in got.text
    assert got.tokens == free.tokens[:cut] and got.finish_reason == "stop"
    # a stop string is a plain string too
    assert generate(ours, p, max_new_tokens=20, stop_token_ids=[], stop_strings=stop,
                    detokenize=detok).text == got.text


def test_stop_strings_per_row_in_a_batch(pair):
    _, ours = pair
    free = generate(ours, PROMPTS, max_new_tokens=16, stop_token_ids=[], detokenize=detok)
    stop = free[2].text[3:6]
    got = generate(ours, PROMPTS, max_new_tokens=16, stop_token_ids=[], stop_strings=[stop],
                   detokenize=detok)
    for f, g in zip(free, got):
        i = f.text.find(stop)
        assert g.text == (f.text if i < 0 else f.text[:i])
        assert g.finish_reason == ("length" if i < 0 else "stop")


# ----------------------------------------------------------------------------- streaming
def test_stream_yields_the_same_tokens(pair):
    _, ours = pair
    for p in PROMPTS[:2]:
        ref = generate(ours, p, max_new_tokens=15, stop_token_ids=[])
        assert list(stream(ours, p, max_new_tokens=15, stop_token_ids=[])) == ref.tokens
    kw = dict(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=11, stop_token_ids=[])
    assert list(stream(ours, PROMPTS[2], **kw)) == generate(ours, PROMPTS[2], **kw).tokens


def test_stream_text_pieces_hold_back_stop_strings(pair):
    _, ours = pair
    p = PROMPTS[1]
    free = generate(ours, p, max_new_tokens=20, stop_token_ids=[], detokenize=detok)
    stop = free.text[9:12]
    ref = generate(ours, p, max_new_tokens=20, stop_token_ids=[], stop_strings=[stop],
                   detokenize=detok)
    pieces = list(stream(ours, p, max_new_tokens=20, stop_token_ids=[], stop_strings=[stop],
                         detokenize=detok))
    assert all(isinstance(s, str) and s for s in pieces)
    assert "".join(pieces) == ref.text
    assert len(pieces) > 1  # streamed, not delivered at the end


def test_stream_batch(pair):
    _, ours = pair
    run = stream_batch(ours, PROMPTS, max_new_tokens=8, stop_token_ids=[])
    steps = list(run)
    assert len(steps) == 8 and all(len(s) == len(PROMPTS) for s in steps)
    ref = generate(ours, PROMPTS, max_new_tokens=8, stop_token_ids=[])
    for r, g in enumerate(ref):
        assert [s[r] for s in steps] == g.tokens
    assert [g.tokens for g in run.results] == [g.tokens for g in ref]


# ----------------------------------------------------------------------------- limits, inputs
def test_inputs_embeds_and_context_limit(pair):
    _, ours = pair
    p = PROMPTS[1]
    ref = generate(ours, p, max_new_tokens=10, stop_token_ids=[])
    emb = ours.embed(torch.tensor([p]))
    got = generate(ours, None, inputs_embeds=emb, max_new_tokens=10, stop_token_ids=[])
    assert got[0].tokens == ref.tokens
    short = generate(ours, p, max_new_tokens=10, stop_token_ids=[], max_len=len(p) + 4)
    assert short.tokens == ref.tokens[:4] and short.finish_reason == "length"
    one = generate(ours, p, max_new_tokens=1, stop_token_ids=[])
    assert one.tokens == ref.tokens[:1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=list(range(1, 65))), "leaves no room"),
    (dict(prompt=list(range(1, 40)), max_len=20), "leaves no room"),
    (dict(prompt=[]), "empty prompt"),
    (dict(prompt=[[1, 2], []]), "empty prompt"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_strings=["x"]), "detokenize"),
    (dict(prompt=[1, VOCAB]), r"\[0, 300\)"),
])
def test_bad_inputs_raise(pair, kwargs, match):
    _, ours = pair
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", [1, 2, 3])
    with pytest.raises(ValueError, match=match):
        generate(ours, prompt, **kwargs)


def test_stream_rejects_a_batch(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="stream_batch"):
        next(stream(ours, PROMPTS[:2]))
