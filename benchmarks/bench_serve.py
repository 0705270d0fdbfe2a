"""Throughput and latency of ``POST /v1/embeddings`` with dynamic batching vs without.

Starts one local Ray + Serve instance (``fmrt.serve.launcher``), deploys the app with
``max_batch_size=32`` and then with ``max_batch_size=1`` (same cluster, app redeployed), and drives
each with ``--concurrency`` closed-loop HTTP clients for ``--duration`` seconds per workload:

* ``texts``:  ``{"input": ["<one caption>"]}`` per request
* ``images``: ``{"images": ["<one PNG data URL>"]}`` per request

Reports requests/s, p50/p99 latency, the mean encoder batch (items) seen by the replica, and the
batched/unbatched ratios.

    .venv/bin/python benchmarks/bench_serve.py                      # random shapes-vit-tiny
    .venv/bin/python benchmarks/bench_serve.py --model shapes-clip --backend onnxruntime
    .venv/bin/python benchmarks/bench_serve.py --json results.json

The clients run on the same machine as the server, so on a small machine they compete with it
for CPU; compare the two configurations of one run rather than absolute numbers across machines.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

WORDS = "a photo of red green blue yellow circle square triangle small large".split()


def make_random_model(directory: str, arch: str = "shapes-vit-tiny") -> str:
    """A random-weight CLIP model directory of a registered architecture."""
    import torch

    import fmrt
    from fmrt.models.tokenizer import WordTokenizer
    from fmrt.preprocess import PreprocessConfig
    from fmrt.pretrained import save_pretrained

    torch.manual_seed(0)
    m = fmrt.create_model(arch)
    cfg = m.config
    return save_pretrained(directory, family="clip", model=m, config=cfg.to_dict(),
                           preprocess=PreprocessConfig(cfg.vision.image_size),
                           tokenizer=WordTokenizer.build(
                               WORDS, context_length=cfg.text.context_length))


def payloads(kind: str, n: int, image_side: int) -> List[bytes]:
    from fmrt.serve.http import encode_image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if kind == "texts":
            words = rng.choice(WORDS, size=4)
            body = {"input": [" ".join(words)]}
        else:
            img = rng.integers(0, 256, size=(image_side, image_side, 3), dtype=np.uint8)
            body = {"images": [encode_image(img)]}
        out.append(json.dumps(body).encode())
    return out


def closed_loop(make_sender: Callable[[], Callable[[int], Optional[str]]], concurrency: int,
                duration: float, warmup: float) -> Dict[str, Any]:
    """Closed loop: ``concurrency`` threads each send the next request as soon as one returns.

    ``make_sender()`` runs once per thread (e.g. to open an HTTP session) and returns
    ``send(i)``, which performs request ``i`` and returns None on success or an error string
    (exceptions count as errors too). Only requests that start after ``warmup`` and end within
    the next ``duration`` seconds are counted."""
    lat: List[float] = []
    errors: List[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    t_measure = [0.0, 0.0]

    def worker(k: int) -> None:
        send = make_sender()
        i = k
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= t_measure[1]:
                break
            try:
                err = send(i)
            except Exception as e:  # noqa: BLE001
                err = repr(e)
            t1 = time.perf_counter()
            if t0 >= t_measure[0] and t1 <= t_measure[1]:
                with lock:
                    (errors.append(err) if err else lat.append(t1 - t0))
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,), daemon=True)
               for k in range(concurrency)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    t_measure[0], t_measure[1] = now + warmup, now + warmup + duration
    start.wait()
    for t in threads:
        t.join()
    a = np.array(lat) * 1e3
    return {"requests": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None,
            "rps": len(lat) / duration,
            "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
            "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan"),
            "mean_ms": float(a.mean()) if len(a) else float("nan")}


def drive(url: str, bodies: List[bytes], concurrency: int, duration: float,
          warmup: float) -> Dict[str, Any]:
    """Closed-loop HTTP POSTs of ``bodies`` (round robin) to ``url``; see :func:`closed_loop`."""
    import requests

    def make_sender():
        s = requests.Session()
        headers = {"Content-Type": "application/json"}

        def send(i: int) -> Optional[str]:
            r = s.post(url, data=bodies[i % len(bodies)], headers=headers, timeout=60)
            return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
        return send

    return closed_loop(make_sender, concurrency, duration, warmup)


def encoder_stats(url: str) -> Dict[str, Any]:
    import requests

    info = requests.get(url + "/v1/models", timeout=30).json()["data"][0]["info"]
    return info["batching"]


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bundled name or model dir (default: a random "
                                                  "--arch model directory)")
    ap.add_argument("--arch", default="shapes-vit-tiny", help="architecture of the random model")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--batch-sizes", default="32,1")
    ap.add_argument("--batch-wait", type=float, default=0.005)
    ap.add_argument("--workloads", default="texts,images")
    ap.add_argument("--image-side", type=int, default=None,
                    help="side of the square request images (default: the model's input size)")
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads per replica")
    ap.add_argument("--access-log", action="store_true", help="keep Serve's access log on")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from ray import serve

    from fmrt.serve.app import AppArgs, build_app
    from fmrt.serve.launcher import APP_NAME, free_port, start_serve

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.mkdtemp(prefix="fmrt-bench-")
        model = make_random_model(os.path.join(tmp, f"bench-{args.arch}"), args.arch)
    workloads = [w for w in args.workloads.split(",") if w]
    if args.image_side is None:
        from fmrt.pretrained import read_config

        args.image_side = int(read_config(model)["config"]["vision"]["image_size"])
    bodies = {w: payloads(w, 64, args.image_side) for w in workloads}
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    def app_args(bs: int) -> AppArgs:
        return AppArgs(models=[model], backend=args.backend, max_batch_size=bs,
                       batch_wait_timeout_s=args.batch_wait, num_threads=args.num_threads,
                       access_log=args.access_log)

    results: Dict[str, Any] = {"config": vars(args) | {"model": model}, "runs": {}}
    t0 = time.time()
    session = start_serve(app_args(sizes[0]), port=free_port(),
                          ray_kwargs={"log_to_driver": False})
    print(f"serve up in {time.time() - t0:.1f}s at {session.url}", flush=True)
    try:
        for i, bs in enumerate(sizes):
            if i:
                serve.run(build_app(app_args(bs)), name=APP_NAME, route_prefix="/",
                          blocking=False)
            for w in workloads:
                before = encoder_stats(session.url)
                r = drive(session.url + "/v1/embeddings", bodies[w], args.concurrency,
                          args.duration, args.warmup)
                after = encoder_stats(session.url)
                k = "text" if w == "texts" else "image"
                nb = after[k]["batches"] - before[k]["batches"]
                r["mean_batch_items"] = (after[k]["items"] - before[k]["items"]) / nb if nb else 0
                r["max_batch_items"] = after[k]["max_items"]
                results["runs"][f"{w}/bs{bs}"] = r
                print(f"{w:6s} max_batch_size={bs:<3d} conc={args.concurrency}: "
                      f"{r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                      f"  mean batch {r['mean_batch_items']:.1f}  errors {r['errors']}",
                      flush=True)
    finally:
        session.shutdown()
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[1]
        ratios = {}
        for w in workloads:
            ra, rb = results["runs"][f"{w}/bs{a}"], results["runs"][f"{w}/bs{b}"]
            ratios[w] = {"rps": ra["rps"] / rb["rps"] if rb["rps"] else float("nan"),
                         "p50": ra["p50_ms"] / rb["p50_ms"], "p99": ra["p99_ms"] / rb["p99_ms"]}
            print(f"{w:6s} bs{a}/bs{b}: throughput x{ratios[w]['rps']:.2f}, "
                  f"p50 x{ratios[w]['p50']:.2f}, p99 x{ratios[w]['p99']:.2f}")
        results["ratios"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
