"""Served VLM tokens/s: ``POST /v1/chat/completions`` with ``stream: true`` from concurrent
closed-loop clients, generation batching on (``vlm_max_batch_size=8``) versus off (``=1``: the
replica runs one stream at a time), plus one client alone as the unloaded baseline.

Starts one local Ray + Serve instance (``fmrt.serve.launcher``) serving ``--model``; between
configurations the app is redeployed on the same cluster. Each client sends a one-image chat
request with ``max_tokens`` and reads the SSE stream to ``[DONE]`` (the shared closed-loop driver
of ``bench_serve.py``). Reports completion tokens/s (from the streams' ``usage`` chunks), time to
first token, mean requests per generation batch (``GET /v1/vlm/stats``) and the ratios.

The default model is ``shapes-flamingo``'s architecture and tokenizer with random weights (a
512-token context): it never emits a stop token, so every stream is exactly ``--max-tokens``
long and tokens/s measures decoding. ``--model shapes-flamingo`` (or ``shapes-llava``) serves a
trained bundle instead; its short answers make the numbers mostly per-request overhead.

    .venv/bin/python benchmarks/bench_serve_vlm.py
    .venv/bin/python benchmarks/bench_serve_vlm.py --concurrency 8 --max-tokens 64 --json out.json

Clients share the machine with the server; compare the configurations of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for p in (REPO_ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_serve import closed_loop  # noqa: E402  (the closed-loop driver shared by the benches)


def make_random_vlm(directory: str, base: str = "shapes-flamingo", context: int = 512,
                    seed: int = 0) -> str:
    """``base``'s architecture and tokenizer, random weights, ``context`` positions."""
    import torch

    from fmrt.pretrained import build_from_config, load_pretrained, read_config, save_pretrained

    p = load_pretrained(base)
    cfg = read_config(base)
    conf = cfg["config"]
    lm = conf.get("lm") or conf.get("text")
    lm["max_position_embeddings"] = int(context)
    torch.manual_seed(seed)
    model = build_from_config(cfg["family"], conf)
    return save_pretrained(directory, family=cfg["family"], model=model, config=conf,
                           preprocess=p.preprocess, tokenizer=p.tokenizer)


def chat_bodies(n: int, side: int, max_tokens: int) -> List[bytes]:
    from fmrt.serve.http import encode_image

    rng = np.random.default_rng(0)
    qs = ["how many circles are there?", "what color is the square?", "point to the circles",
          "what shape is red?"]
    out = []
    for i in range(n):
        img = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        out.append(json.dumps({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": encode_image(img)}},
                {"type": "text", "text": qs[i % len(qs)]}]}],
            "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}).encode())
    return out


def drive_streams(url: str, bodies: List[bytes], concurrency: int, duration: float,
                  warmup: float) -> Dict[str, Any]:
    """Closed-loop streaming clients; adds completion tokens/s and time-to-first-token."""
    import requests

    lock = threading.Lock()
    per_req: List[tuple] = []  # (t0, t1, completion tokens, ttft)

    def make_sender():
        s = requests.Session()
        headers = {"Content-Type": "application/json"}

        def send(i: int) -> Optional[str]:
            t0 = time.perf_counter()
            r = s.post(url, data=bodies[i % len(bodies)], headers=headers, timeout=120,
                       stream=True)
            if r.status_code != 200:
                return f"{r.status_code} {r.text[:200]}"
            ttft, tokens, buf, done = None, None, b"", False
            for data in r.iter_content(chunk_size=None):
                buf += data
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    ev = ev[len(b"data: "):]
                    if ev == b"[DONE]":
                        done = True
                        continue
                    c = json.loads(ev)
                    if "error" in c:
                        return str(c["error"])[:200]
                    if c.get("usage"):
                        tokens = c["usage"]["completion_tokens"]
                    elif ttft is None and c["choices"] and c["choices"][0]["delta"].get(
                            "content"):
                        ttft = time.perf_counter() - t0
            if not done or tokens is None:
                return "stream ended without [DONE] / usage"
            with lock:
                per_req.append((t0, time.perf_counter(), tokens, ttft))
            return None
        return send

    t_start = time.perf_counter()
    res = closed_loop(make_sender, concurrency, duration, warmup)
    # Served tokens/s: the tokens of every stream that ENDED inside the measured window, whenever
    # it started (closed_loop's requests/s also drops requests that straddle the window's edges,
    # which undercounts configurations whose requests take seconds, e.g. batching off).
    lo, hi = t_start + warmup, t_start + warmup + duration
    ended = [x for x in per_req if lo <= x[1] <= hi]
    toks = np.array([x[2] for x in ended], float)
    ttft = np.array([x[3] for x in ended if x[3] is not None], float) * 1e3
    res["streams_ended"] = len(ended)
    res["tokens_per_request"] = float(toks.mean()) if len(toks) else 0.0
    res["tokens_per_s"] = float(toks.sum()) / duration
    res["ttft_p50_ms"] = float(np.percentile(ttft, 50)) if len(ttft) else float("nan")
    return res


def vlm_stats(url: str, model: str) -> Dict[str, Any]:
    import requests

    st = requests.get(url + "/v1/vlm/stats", timeout=30).json()
    return st["models"][model]["batching"]


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bundled name or model dir (default: random "
                                                  "weights of shapes-flamingo's architecture)")
    ap.add_argument("--backend", default=None, help="torch | onnxruntime | tensorrt; default: "
                                                    "the app's (onnxruntime when importable)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds per config")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=8, help="vlm_max_batch_size when on")
    ap.add_argument("--batch-wait", type=float, default=0.05)
    ap.add_argument("--image-side", type=int, default=64)
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from ray import serve

    from fmrt.serve.app import AppArgs, build_app
    from fmrt.serve.launcher import APP_NAME, free_port, start_serve

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.mkdtemp(prefix="fmrt-bench-vlm-")
        model = make_random_vlm(os.path.join(tmp, "random-flamingo"))
    name = os.path.basename(os.path.normpath(model))
    bodies = chat_bodies(32, args.image_side, args.max_tokens)

    def app_args(bs: int) -> AppArgs:
        return AppArgs(models=[model], backend=args.backend, vlm_max_batch_size=bs,
                       vlm_batch_wait_timeout_s=args.batch_wait, num_threads=args.num_threads,
                       access_log=False)

    configs = [("batched", args.batch_size, args.concurrency),
               ("unbatched", 1, args.concurrency),
               ("single-client", args.batch_size, 1)]
    results: Dict[str, Any] = {"config": vars(args) | {"model": model}, "runs": {}}
    t0 = time.time()
    session = start_serve(app_args(configs[0][1]), port=free_port(),
                          ray_kwargs={"log_to_driver": False})
    print(f"serve up in {time.time() - t0:.1f}s at {session.url}", flush=True)
    try:
        deployed = configs[0][1]
        for label, bs, conc in configs:
            if bs != deployed:
                serve.run(build_app(app_args(bs)), name=APP_NAME, route_prefix="/",
                          blocking=False)
                deployed = bs
            before = vlm_stats(session.url, name)
            r = drive_streams(session.url + "/v1/chat/completions", bodies, conc,
                              args.duration, args.warmup)
            after = vlm_stats(session.url, name)
            nb = after["batches"] - before["batches"]
            r["mean_batch"] = (after["requests"] - before["requests"]) / nb if nb else 0.0
            r["max_batch"] = after["max_batch"]
            r["vlm_max_batch_size"], r["concurrency"] = bs, conc
            results["runs"][label] = r
            print(f"{label:13s} max_batch={bs:<2d} conc={conc:<2d}: {r['tokens_per_s']:8.1f} "
                  f"tok/s  {r['streams_ended']:4d} streams  {r['tokens_per_request']:5.1f} tok/req"
                  f"  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  p50 {r['p50_ms']:7.1f} ms  "
                  f"mean batch {r['mean_batch']:.1f}  errors {r['errors']}", flush=True)
    finally:
        session.shutdown()
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    runs = results["runs"]
    b = runs["batched"]["tokens_per_s"]
    ratios = {"batched_vs_unbatched": b / runs["unbatched"]["tokens_per_s"]
              if runs["unbatched"]["tokens_per_s"] else float("nan"),
              "batched_vs_single_client": b / runs["single-client"]["tokens_per_s"]
              if runs["single-client"]["tokens_per_s"] else float("nan")}
    results["ratios"] = ratios
    print(f"tokens/s at {args.concurrency} streams: batching on/off x"
          f"{ratios['batched_vs_unbatched']:.2f}; vs one stream alone x"
          f"{ratios['batched_vs_single_client']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
