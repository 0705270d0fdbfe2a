"""Served SAM prompt throughput: ``POST /v1/sam/predict`` by ``image_id`` from many concurrent
clients on ONE image, with cross-request batching on (``max_batch_size=32``) versus off
(``max_batch_size=1``). Goal: >= 4x requests/s at 32 clients.

Starts one local Ray + Serve instance (``fmrt.serve.launcher``) serving ``--model`` (default the
bundled ``shapes-sam``), embeds one image (``POST /v1/sam/embed``), then drives ``--concurrency``
closed-loop HTTP clients for ``--duration`` s per configuration, each sending a one-point prompt
(different points, same point count, so the decoder can batch them). Between configurations the
app is redeployed on the same cluster. Reports requests/s, p50/p99 latency, the mean number of
prompts per decoder call (``GET /v1/sam/stats``) and the on/off ratio.

    .venv/bin/python benchmarks/bench_serve_sam.py
    .venv/bin/python benchmarks/bench_serve_sam.py --concurrency 32 --duration 10 --json out.json

Clients share the machine with the server; compare the two configurations of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for p in (REPO_ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_serve import closed_loop, drive  # noqa: E402  (closed-loop drivers shared with bench_serve)


def drive_handle(handle, prompts, iid: str, concurrency: int, duration: float,
                 warmup: float) -> Dict[str, Any]:
    """Closed loop through the ``SamDecoder`` deployment handle (no HTTP proxy, no ingress):
    the decoder stage's own throughput."""
    def send(i: int) -> None:
        handle.predict.remote(prompts[i % len(prompts)], image_id=iid).result()

    return closed_loop(lambda: send, concurrency, duration, warmup)


def decoder_stats(url: str, model: str) -> Dict[str, Any]:
    import requests

    st = requests.get(url + "/v1/sam/stats", timeout=30).json()
    return st["models"][model]["decoder"]["batching"]


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-sam")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per config")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--batch-sizes", default="32,1", help="first = batching on, then off")
    ap.add_argument("--batch-wait", type=float, default=0.01)
    ap.add_argument("--image-side", type=int, default=64)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads per replica")
    ap.add_argument("--paths", default="http,handle",
                    help="http: POST /v1/sam/predict through proxy + ingress; handle: the "
                         "SamDecoder deployment handle directly (the decoder stage alone)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import requests
    from ray import serve

    from fmrt.serve.app import AppArgs, _deployment_name, build_app
    from fmrt.serve.http import encode_image
    from fmrt.serve.launcher import APP_NAME, free_port, start_serve

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(args.image_side, args.image_side, 3), dtype=np.uint8)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    name = os.path.basename(os.path.normpath(args.model))

    def app_args(bs: int) -> AppArgs:
        return AppArgs(models=[args.model], backend=args.backend, max_batch_size=bs,
                       batch_wait_timeout_s=args.batch_wait, num_threads=args.num_threads,
                       access_log=False)

    results: Dict[str, Any] = {"config": vars(args), "runs": {}}
    t0 = time.time()
    session = start_serve(app_args(sizes[0]), port=free_port(),
                          ray_kwargs={"log_to_driver": False})
    print(f"serve up in {time.time() - t0:.1f}s at {session.url}", flush=True)
    try:
        for i, bs in enumerate(sizes):
            if i:
                serve.run(build_app(app_args(bs)), name=APP_NAME, route_prefix="/",
                          blocking=False)
            r = requests.post(session.url + "/v1/sam/embed", json={"image": encode_image(img)},
                              timeout=60)
            r.raise_for_status()
            iid = r.json()["image_id"]
            side = args.image_side
            pts = np.random.default_rng(1).uniform(0, side - 1, size=(64, 2))
            prompts = [{"points": [[float(x), float(y)]], "labels": [1],
                        "multimask_output": True, "return_lowres": False} for x, y in pts]
            bodies = [json.dumps({"image_id": iid, "points": p["points"], "labels": [1]}
                                 ).encode() for p in prompts]
            for path in [p for p in args.paths.split(",") if p]:
                before = decoder_stats(session.url, name)
                if path == "http":
                    res = drive(session.url + "/v1/sam/predict", bodies, args.concurrency,
                                args.duration, args.warmup)
                else:
                    handle = serve.get_deployment_handle(_deployment_name("SamDecoder", name),
                                                         APP_NAME)
                    res = drive_handle(handle, prompts, iid, args.concurrency, args.duration,
                                       args.warmup)
                after = decoder_stats(session.url, name)
                nd = after["decodes"] - before["decodes"]
                res["mean_prompts_per_decode"] = ((after["requests"] - before["requests"]) / nd
                                                  if nd else 0.0)
                res["max_group"] = after["max_group"]
                results["runs"][f"{path}/bs{bs}"] = res
                print(f"{path:6s} max_batch_size={bs:<3d} conc={args.concurrency}: "
                      f"{res['rps']:8.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                      f"p99 {res['p99_ms']:7.1f} ms  prompts/decode "
                      f"{res['mean_prompts_per_decode']:.1f}  errors {res['errors']}",
                      flush=True)
    finally:
        session.shutdown()
    if len(sizes) >= 2:
        results["ratio_rps"] = {}
        for path in [p for p in args.paths.split(",") if p]:
            a = results["runs"][f"{path}/bs{sizes[0]}"]
            b = results["runs"][f"{path}/bs{sizes[1]}"]
            ratio = a["rps"] / b["rps"] if b["rps"] else float("nan")
            results["ratio_rps"][path] = ratio
            print(f"{path:6s} batching on/off (bs{sizes[0]}/bs{sizes[1]}): throughput "
                  f"x{ratio:.2f} (goal >= 4), p50 x{a['p50_ms'] / b['p50_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
