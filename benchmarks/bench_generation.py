"""LM generation: fmrt (static KV cache, one-token decode steps) vs ``transformers`` ``generate``
on the same weights and prompts (pytest-benchmark).

Run: ``FMRT_BENCH_THREADS=1 pytest benchmarks/bench_generation.py --benchmark-only``.

Both sides load one randomly initialised ``LlamaForCausalLM`` (saved with ``save_pretrained``,
read back by ``fmrt.create_model(None, checkpoint=dir)``), float32, greedy, no early stop. Each
group times a full generation of ``NEW`` tokens and a 1-token generation (= time to first token:
prefill + one sampling step); decode tokens/s = ``B * (NEW - 1) / (t_NEW - t_1)`` from the best
round of each. A "benchmark summary" section prints both sides and the ratios. ``fmrt-int8`` is
the same fmrt model with ``enable_int8_decode()`` (weight-only int8 in decode steps; not
bit-comparable with float32, reported beside the float32 figures).

Models: ``bench`` (hidden 512, 8 layers, GQA 8/4, vocab 32000, ~40M parameters; prompt 128) at
batch 1 and 8, and ``tiny`` (the shapes-lm-tiny size: hidden 160, 4 layers, GQA 4/2, vocab 128;
prompt 32) at batch 1, where per-step framework overhead rather than GEMV bandwidth dominates.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import fmrt  # noqa: E402
from fmrt.models.generation import generate  # noqa: E402

THREADS = int(os.environ.get("FMRT_BENCH_THREADS", "0") or 0)
if THREADS:
    torch.set_num_threads(THREADS)

NEW = 64
MODELS = {
    "bench": dict(cfg=dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
                  prompt=128, batches=(1, 8)),
    "tiny": dict(cfg=dict(vocab_size=128, hidden_size=160, intermediate_size=432,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True),
                 prompt=32, batches=(1,)),
}
CASES = [(m, b) for m, spec in MODELS.items() for b in spec["batches"]]

_RESULTS: dict = {}   # (model, batch) -> {(impl, n_new): best seconds}
_LOADED: dict = {}


def _models(name):
    if name not in _LOADED:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(max_position_embeddings=1024, eos_token_id=2,
                                       pad_token_id=0, **MODELS[name]["cfg"])
        hf = transformers.LlamaForCausalLM(cfg).eval()
        d = tempfile.mkdtemp(prefix=f"fmrt-bench-llama-{name}-")
        hf.save_pretrained(d)
        ours = fmrt.create_model(None, checkpoint=d)
        ours8 = fmrt.create_model(None, checkpoint=d).enable_int8_decode()
        _LOADED[name] = (hf, ours, ours8)
    return _LOADED[name]


@pytest.fixture(scope="module", autouse=True)
def _ratio_report(bench_summary):
    yield
    rows = []
    for (name, b), r in sorted(_RESULTS.items()):
        if len(r) < 6:
            continue
        spec = MODELS[name]
        impls = ("fmrt", "fmrt-int8", "hf")
        dec = {i: b * (NEW - 1) / (r[(i, NEW)] - r[(i, 1)]) for i in impls}
        ttft = {i: r[(i, 1)] for i in impls}
        rows.append(f"{name:>6} {spec['prompt']:>6} {b:>3} {ttft['fmrt'] * 1e3:>10.1f} "
                    f"{ttft['hf'] * 1e3:>9.1f} {ttft['hf'] / ttft['fmrt']:>10.2f}x "
                    f"{dec['fmrt']:>11.1f} {dec['hf']:>9.1f} {dec['fmrt'] / dec['hf']:>12.2f}x "
                    f"{dec['fmrt-int8']:>11.1f} {dec['fmrt-int8'] / dec['hf']:>11.2f}x")
    if rows:
        bench_summary.append(f"LM generation, greedy, {NEW} new tokens, threads="
                             f"{THREADS or torch.get_num_threads()}, transformers "
                             f"{transformers.__version__}; best round of each; float32 unless "
                             f"int8 (fmrt enable_int8_decode: int8 weights in decode steps)")
        bench_summary.append(f"{'model':>6} {'prompt':>6} {'B':>3} {'fmrt TTFT':>10} "
                             f"{'hf TTFT':>9} {'TTFT ratio':>11} {'fmrt tok/s':>11} "
                             f"{'hf tok/s':>9} {'decode ratio':>13} {'int8 tok/s':>11} "
                             f"{'int8 ratio':>11}")
        bench_summary.extend(rows)


@pytest.mark.parametrize("n_new", [1, NEW])
@pytest.mark.parametrize("impl", ["fmrt", "fmrt-int8", "hf"])
@pytest.mark.parametrize("model,batch", CASES)
def test_generate(benchmark, model, batch, impl, n_new):
    hf, ours, ours8 = _models(model)
    prompt = torch.randint(3, MODELS[model]["cfg"]["vocab_size"], (batch, MODELS[model]["prompt"]),
                           generator=torch.Generator().manual_seed(0))
    benchmark.group = f"generate {model} B={batch} new={n_new}"
    if impl.startswith("fmrt"):
        lm = ours8 if impl == "fmrt-int8" else ours

        def run():
            out = generate(lm, prompt, max_new_tokens=n_new, stop_token_ids=[])
            return [g.tokens for g in out]
    else:
        mask = torch.ones_like(prompt)

        def run():
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=mask, do_sample=False,
                                  max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
            return out[:, prompt.shape[1]:].tolist()

    rounds = 3 if (model == "tiny" or batch == 1) else 2
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    assert len(out) == batch and all(len(t) == n_new for t in out)
    _RESULTS.setdefault((model, batch), {})[(impl, n_new)] = benchmark.stats.stats.min
