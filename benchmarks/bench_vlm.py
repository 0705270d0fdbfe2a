"""VLM generation: fmrt's facade (torch and onnxruntime backends) vs ``transformers``'
``LlavaForConditionalGeneration.generate`` on the same weights, images and prompts.

Run: ``python benchmarks/bench_vlm.py [--threads 1] [--new 32] [--models bench,tiny]``
(a script, not a pytest-benchmark module: each side is timed with the same best-of-N loop).

Both sides load one randomly initialised transformers LLaVA saved with ``save_pretrained``; fmrt
reads the same directory (``fmrt.load(dir)``, plus the ShapesWorld word tokenizer saved there;
the onnxruntime backend exports its graphs on first use). Greedy, float32, no early stop (stop
ids are cleared on the fmrt rows; transformers gets ``min_new_tokens``). Each configuration
times a 1-token generation (time to first token: image preprocessing + vision tower + prefill +
the first sampling step) and an ``NEW``-token one; decode tokens/s = ``B * (NEW - 1) /
(t_NEW - t_1)`` from the best of ``--rounds`` runs of each, the implementations interleaved
within each round (a shared host's load swings then hit all of them alike). The prompt is one 64 x 64 image
(64 image tokens) plus a ~60-token question, ``B`` copies of it per batch.

Models (the LM of ``bench_generation.py``'s configurations, on a 2-layer 64 px CLIP tower):
  * ``bench``: LM hidden 512, 8 layers, GQA 8/4, vocabulary 32000 (~40M parameters);
  * ``tiny``: the ShapesWorld size (hidden 160, 4 layers, GQA 4/2, vocabulary 128).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LMS = {
    "bench": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
    "tiny": dict(vocab_size=128, hidden_size=160, intermediate_size=432, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
IMAGE_TOKEN = 100   # below both vocabularies and above the ShapesWorld word ids (0-87)
QUESTION = ("how many red circles are there in the picture and what color is the large "
            "square to the left of the small blue triangle ? describe the image .") * 2


def build(name: str, root: str) -> str:
    import transformers

    from fmrt.data.vlm_data import build_vlm_tokenizer

    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512,
                                       num_hidden_layers=2, num_attention_heads=4, image_size=64,
                                       patch_size=8)
    tc = transformers.LlamaConfig(max_position_embeddings=512, eos_token_id=2, pad_token_id=0,
                                  **LMS[name])
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                                   image_seq_length=64, vision_feature_layer=-2)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    d = os.path.join(root, f"llava-{name}")
    hf.save_pretrained(d)
    build_vlm_tokenizer().save(d)
    return d


def fmrt_runner(vlm, images: List[np.ndarray], batch: int, n_new: int):
    from fmrt.runtime.vlm import VlmRequest

    def run():
        reqs = [VlmRequest(images=images, prompt=QUESTION, max_new_tokens=n_new)
                for _ in range(batch)]
        r = vlm.start_batch(reqs)
        for row in r.rows:
            row.stop_ids = set()   # timing: always NEW tokens
        res = r.run()
        assert all(x.completion_tokens == n_new for x in res)

    return run


def hf_runner(hf, vlm, images, batch: int, n_new: int):
    from fmrt.preprocess import preprocess_images
    from fmrt.runtime.vlm import VlmRequest

    req = VlmRequest(images=images, prompt=QUESTION)
    vlm.validate(req)   # the same prompt ids as fmrt (image placeholders expanded)

    def run():
        # the same host-side preprocessing as fmrt's, inside the timed region
        px = preprocess_images(images * batch, vlm.preprocess)
        ids = torch.tensor([req._prepared.ids] * batch)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                              do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                              pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == n_new

    return run


def best_interleaved(runners: Dict[str, object], rounds: int) -> Dict[str, float]:
    """Best time of each runner over ``rounds`` rounds, the runners interleaved within a round
    (on a shared host, load swings then hit every implementation alike)."""
    for fn in runners.values():
        fn()   # warm-up
    best = {k: float("inf") for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--models", default="bench,tiny")
    p.add_argument("--batches", default="1,8")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    own_cache = None
    if not os.environ.get("FMRT_CACHE_DIR"):   # the ORT exports go to a throwaway cache
        own_cache = os.environ["FMRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fmrt-bench-vlm-")
    import transformers

    import fmrt

    root = tempfile.mkdtemp(prefix="fmrt-bench-vlm-models-")
    img = np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    print(f"VLM generation, greedy, {args.new} new tokens, threads={args.threads}, transformers "
          f"{transformers.__version__}, torch {torch.__version__}; best of {args.rounds}")
    header = (f"{'model':>6} {'B':>3} {'impl':>12} {'TTFT ms':>9} {'tok/s':>8} "
              f"{'TTFT vs hf':>10} {'tok/s vs hf':>11}")
    rows = []
    for name in args.models.split(","):
        d = build(name, root)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(d).eval()
        impls = {"fmrt-torch": fmrt.load(d),
                 "fmrt-ort": fmrt.load(d, backend="onnxruntime", intra_op_threads=args.threads)}
        for b in (int(x) for x in args.batches.split(",")):
            runners = {}
            for n in (1, args.new):
                for impl, vlm in impls.items():
                    runners[(impl, n)] = fmrt_runner(vlm, [img], b, n)
                runners[("hf", n)] = hf_runner(hf, impls["fmrt-torch"], [img], b, n)
            t = best_interleaved(runners, args.rounds)
            res: Dict[str, tuple] = {}
            for impl in list(impls) + ["hf"]:
                t1, tn = t[(impl, 1)], t[(impl, args.new)]
                res[impl] = (t1, b * (args.new - 1) / (tn - t1))
            for impl, (ttft, tps) in res.items():
                rows.append(f"{name:>6} {b:>3} {impl:>12} {ttft * 1e3:>9.1f} {tps:>8.1f} "
                            f"{res['hf'][0] / ttft:>9.2f}x {tps / res['hf'][1]:>10.2f}x")
                print(rows[-1], flush=True)
    print(header)
    print("\n".join(rows))
    shutil.rmtree(root, ignore_errors=True)
    if own_cache:
        shutil.rmtree(own_cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
