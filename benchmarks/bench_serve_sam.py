"""Served SAM prompt throughput: ``POST /v1/sam/predict`` by ``image_id`` from many concurrent
clients on ONE image, with cross-request batching on (``max_batch_size=32``) versus off
(``max_batch_size=1``). Goal: >= 4x requests/s at 32 clients.

Starts one local Ray + Serve instance (``fmrt.serve.launcher``) serving ``--model`` (the bundled
``shapes-sam``, or a registered SAM architecture such as ``sam_vit_b`` with random weights, seed
0, written to a temporary model directory), embeds one image (``POST /v1/sam/embed``), then
drives ``--concurrency`` closed-loop clients for ``--duration`` s per round, each sending a
one-point prompt (different points, same point count, so the decoder can batch them). Rounds
alternate batching on / off ``--rounds`` times on the same deployment (``SamDecoder.configure``;
a decoder without it is redeployed instead), so slow drift of the shared machine's load hits
both; the ratio reported is median(on) / median(off).

Per configuration it also reports where a request's time and CPU go:

* ``cpu_ms``: CPU milliseconds per request of each Ray process (HTTP proxy, ingress, decoder,
  encoder, controller, ...) and of this client process, from ``/proc`` (Linux);
* ``decoder_ms``: per request in the decoder replica: waiting for its batch, the batch's
  encoder lookup, the model call, RLE + response (``GET /v1/sam/stats``);
* ``ingress_ms``: per request in the ingress: body read + parse + validation, the decoder
  call (hop + everything above + reply), building the JSON response.

    .venv/bin/python benchmarks/bench_serve_sam.py --num-threads 1
    .venv/bin/python benchmarks/bench_serve_sam.py --model sam_vit_b --num-threads 1 \\
        --duration 10 --rounds 2
    .venv/bin/python benchmarks/bench_serve_sam.py --paths http,handle --json out.json

Clients share the machine with the server; compare the two configurations of one run. The
default client is one asyncio thread with aiohttp (~1 ms CPU per request; ``--client threads``:
one ``requests`` session per thread, ~2 ms).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for p in (REPO_ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_serve import closed_loop, drive  # noqa: E402  (closed-loop drivers shared with bench_serve)


# ------------------------------------------------------------------------------ clients
def drive_handle(handle, prompts, iid: str, concurrency: int, duration: float,
                 warmup: float) -> Dict[str, Any]:
    """Closed loop through the ``SamDecoder`` deployment handle (no HTTP proxy, no ingress):
    the decoder stage's own throughput."""
    def send(i: int) -> None:
        handle.predict.remote(prompts[i % len(prompts)], image_id=iid).result()

    return closed_loop(lambda: send, concurrency, duration, warmup)


def drive_async(url: str, bodies: List[bytes], concurrency: int, duration: float,
                warmup: float) -> Dict[str, Any]:
    """Closed loop like ``bench_serve.drive`` (``concurrency`` requests always in flight), but
    from one asyncio loop with aiohttp: the client's CPU per request is about a third of one
    ``requests`` session per thread, which matters when client and server share 2 cores.

    Counts every request that completes within the ``duration`` s after ``warmup`` (whenever it
    started): ``bench_serve.closed_loop`` counts only requests that also start in the window,
    which drops the ~``concurrency`` requests in flight at its start and biases req/s low by
    ``concurrency / (req/s * duration)`` (~10% at 60 req/s over 6 s; most of it at sam_vit_b's
    ~4 s latencies)."""
    import aiohttp

    lat: List[float] = []
    errors: List[str] = []

    async def main() -> None:
        conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        headers = {"Content-Type": "application/json"}
        t_start = time.perf_counter() + warmup
        t_end = t_start + duration
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=120)) as s:
            async def worker(k: int) -> None:
                i = k
                while True:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        return
                    try:
                        async with s.post(url, data=bodies[i % len(bodies)],
                                          headers=headers) as r:
                            body = await r.read()
                            err = None if r.status == 200 else f"{r.status} {body[:200]!r}"
                    except Exception as e:  # noqa: BLE001
                        err = repr(e)
                    t1 = time.perf_counter()
                    if t_start <= t1 <= t_end:
                        (errors.append(err) if err else lat.append(t1 - t0))
                    i += concurrency

            await asyncio.gather(*(worker(k) for k in range(concurrency)))

    asyncio.run(main())
    a = np.array(lat) * 1e3
    return {"requests": len(lat), "errors": len(errors),
            "first_error": errors[0] if errors else None, "rps": len(lat) / duration,
            "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
            "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan"),
            "mean_ms": float(a.mean()) if len(a) else float("nan")}


# ------------------------------------------------------------------------------ CPU accounting
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU seconds of this machine's Ray processes, grouped by role (``ray::ServeReplica:app:
    SamDecoder-x`` -> ``SamDecoder-x``; ``ray::ProxyActor``; gcs_server; raylet ...), plus this
    process (the client). A process keeps the role of its title when first seen (titles change
    with the running method). Linux only; elsewhere empty."""

    def __init__(self) -> None:
        self.roles: Dict[int, str] = {}
        self.enabled = os.path.isdir("/proc/self")

    def _scan(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in self.roles:
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            m = re.match(r"ray::(\S+)", cmd)
            exe = os.path.basename(cmd.split(" ")[0]) if cmd else ""
            if m:
                role = m.group(1).split(".")[0]
                role = re.sub(r"^ServeReplica:[^:]*:", "", role)
            elif exe in ("gcs_server", "raylet"):
                role = exe
            else:
                continue
            self.roles[int(d)] = role

    def snapshot(self) -> Dict[str, float]:
        if not self.enabled:
            return {}
        self._scan()
        out: Dict[str, float] = {}
        for pid, role in self.roles.items():
            t = _proc_cpu_s(pid)
            if t is not None:
                out[role] = out.get(role, 0.0) + t
        out["client"] = _proc_cpu_s(os.getpid()) or 0.0
        return out

    @staticmethod
    def per_request(a: Dict[str, float], b: Dict[str, float], n: int) -> Dict[str, float]:
        d = {k: (b[k] - a.get(k, 0.0)) * 1e3 / max(n, 1) for k in b}
        d = {k: round(v, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        d["total"] = round(sum(d.values()), 2)
        return d


# ------------------------------------------------------------------------------ server side
def stats(url: str, model: str) -> Dict[str, Any]:
    import requests

    st = requests.get(url + "/v1/sam/stats", timeout=60).json()
    return {"decoder": st["models"][model]["decoder"], "ingress": st.get("ingress", {})}


def _delta_ms(a: Dict[str, Any], b: Dict[str, Any], count: str) -> Dict[str, float]:
    """Per-request means over the requests between two ``ms_per_request`` snapshots."""
    if "ms_per_request" not in b:
        return {}
    na, nb = a.get(count, 0), b.get(count, 0)
    n = nb - na
    if n <= 0:
        return {}
    return {k: round((v * nb - a["ms_per_request"].get(k, 0.0) * na) / n, 2)
            for k, v in b["ms_per_request"].items()}


def make_random_sam(arch: str, directory: str) -> str:
    """A model directory holding ``arch`` (registered SAM architecture) with random weights,
    seed 0."""
    import torch

    import fmrt
    from fmrt.pretrained import PreprocessConfig, save_pretrained

    torch.manual_seed(0)
    m = fmrt.create_model(arch).float().eval()
    return save_pretrained(directory, family="sam", model=m, config=m.config.to_dict(),
                           preprocess=PreprocessConfig(image_size=int(m.image_encoder.img_size)))


def resolve_model(model: str, tmp: Callable[[], str]) -> str:
    """A bundled name or model directory as is; a registered architecture name -> a random
    weight model directory under ``tmp()``."""
    from fmrt import pretrained

    if os.path.isdir(model) or model in pretrained.list_pretrained():
        return model
    return make_random_sam(model, os.path.join(tmp(), model))


# ------------------------------------------------------------------------------ main
def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-sam",
                    help="bundled name, model dir, or SAM architecture (random weights)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per round")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    ap.add_argument("--batch-sizes", default="32,1", help="first = batching on, then off")
    ap.add_argument("--batch-wait", type=float, default=0.01)
    ap.add_argument("--image-size", default=None,
                    help="HxW of the one image (default 64x64 for shapes-sam, else 480x640)")
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--client", choices=["aiohttp", "threads"], default="aiohttp")
    ap.add_argument("--paths", default="http",
                    help="http: POST /v1/sam/predict through proxy + ingress; handle: the "
                         "SamDecoder deployment handle directly (the decoder stage alone)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import requests
    from ray import serve

    from fmrt.serve.app import AppArgs, _deployment_name, build_app
    from fmrt.serve.http import encode_image
    from fmrt.serve.launcher import APP_NAME, free_port, start_serve

    if args.client == "aiohttp":
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            print("aiohttp not installed: --client threads", flush=True)
            args.client = "threads"
    tmpdirs: List[str] = []

    def tmp() -> str:
        tmpdirs.append(tempfile.mkdtemp(prefix="fmrt-bench-sam-"))
        return tmpdirs[-1]

    model = resolve_model(args.model, tmp)
    name = os.path.basename(os.path.normpath(model))
    if args.image_size is None:
        args.image_size = "64x64" if args.model == "shapes-sam" else "480x640"
    h, w = (int(v) for v in args.image_size.lower().split("x"))
    img = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    paths = [p for p in args.paths.split(",") if p]

    def app_args(bs: int) -> AppArgs:
        return AppArgs(models=[model], backend=args.backend, max_batch_size=bs,
                       batch_wait_timeout_s=args.batch_wait, num_threads=args.num_threads,
                       access_log=False)

    results: Dict[str, Any] = {"config": {**vars(args), "model_dir": model}, "rounds": [],
                               "runs": {}}
    meter = CpuMeter()
    t0 = time.time()
    session = start_serve(app_args(sizes[0]), port=free_port(),
                          ray_kwargs={"log_to_driver": False})
    print(f"serve up in {time.time() - t0:.1f}s at {session.url}", flush=True)
    try:
        t0 = time.time()
        r = requests.post(session.url + "/v1/sam/embed", json={"image": encode_image(img)},
                          timeout=600)
        r.raise_for_status()
        iid = r.json()["image_id"]
        print(f"embedded {w}x{h} image in {time.time() - t0:.1f}s", flush=True)
        pts = np.random.default_rng(1).uniform(0, min(h, w) - 1, size=(64, 2))
        prompts = [{"points": [[float(x), float(y)]], "labels": [1],
                    "multimask_output": True, "return_lowres": False} for x, y in pts]
        bodies = [json.dumps({"image_id": iid, "points": p["points"], "labels": [1]}).encode()
                  for p in prompts]
        dec_name = _deployment_name("SamDecoder", name)
        handle = serve.get_deployment_handle(dec_name, APP_NAME)
        try:
            handle.configure.remote().result(timeout_s=60)
            switch = "configure"
        except Exception:  # an older decoder: redeploy per configuration
            switch = "redeploy"
        current = sizes[0]

        def set_bs(bs: int) -> None:
            nonlocal current, handle
            if bs == current:
                return
            if switch == "configure":
                handle.configure.remote(bs).result(timeout_s=60)
            else:
                serve.run(build_app(app_args(bs)), name=APP_NAME, route_prefix="/",
                          blocking=False)
                handle = serve.get_deployment_handle(dec_name, APP_NAME)
                requests.post(session.url + "/v1/sam/embed",
                              json={"image": encode_image(img)}, timeout=600).raise_for_status()
            current = bs

        for rnd in range(args.rounds):
            order = sizes if rnd % 2 == 0 else sizes[::-1]  # on,off,off,on,...: no order bias
            for bs in order:
                set_bs(bs)
                for path in paths:
                    s0, c0 = stats(session.url, name), meter.snapshot()
                    if path == "http":
                        drv = drive_async if args.client == "aiohttp" else drive
                        res = drv(session.url + "/v1/sam/predict", bodies, args.concurrency,
                                  args.duration, args.warmup)
                    else:
                        res = drive_handle(handle, prompts, iid, args.concurrency,
                                           args.duration, args.warmup)
                    c1, s1 = meter.snapshot(), stats(session.url, name)
                    b0, b1 = s0["decoder"]["batching"], s1["decoder"]["batching"]
                    nd = b1["decodes"] - b0["decodes"]
                    # CPU between the two snapshots / the requests the decoder served in between
                    # (every request of the run, warmup and tail included)
                    n_win = b1["requests"] - b0["requests"]
                    res.update({
                        "path": path, "max_batch_size": bs, "round": rnd,
                        "mean_prompts_per_decode": ((b1["requests"] - b0["requests"]) / nd
                                                    if nd else 0.0),
                        "cpu_ms": CpuMeter.per_request(c0, c1, int(n_win)),
                        "decoder_ms": _delta_ms(b0, b1, "requests"),
                        "ingress_ms": (_delta_ms(s0["ingress"].get("predict", {}),
                                                 s1["ingress"].get("predict", {}), "requests")
                                       if path == "http" else {})})
                    results["rounds"].append(res)
                    print(f"round {rnd} {path:6s} max_batch_size={bs:<3d} "
                          f"conc={args.concurrency}: {res['rps']:8.1f} req/s  p50 "
                          f"{res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                          f"prompts/decode {res['mean_prompts_per_decode']:.1f}  "
                          f"errors {res['errors']}", flush=True)
                    print(f"    CPU ms/request: {res['cpu_ms']}\n    decoder ms/request: "
                          f"{res['decoder_ms']}  ingress ms/request: {res['ingress_ms']}",
                          flush=True)
    finally:
        session.shutdown()
        for d in tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
    results["ratio_rps"] = {}
    for path in paths:
        med = {}
        for bs in sizes:
            rs = [r for r in results["rounds"] if r["path"] == path and r["max_batch_size"] == bs]
            med[bs] = {"rps": statistics.median(r["rps"] for r in rs),
                       "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                       "prompts_per_decode": statistics.median(r["mean_prompts_per_decode"]
                                                               for r in rs),
                       "cpu_ms_total": statistics.median(r["cpu_ms"].get("total", float("nan"))
                                                         for r in rs),
                       "rps_rounds": [round(r["rps"], 1) for r in rs]}
            results["runs"][f"{path}/bs{bs}"] = med[bs]
        if len(sizes) >= 2:
            a, b = med[sizes[0]], med[sizes[1]]
            ratio = a["rps"] / b["rps"] if b["rps"] else float("nan")
            results["ratio_rps"][path] = ratio
            print(f"{path:6s} {name}: batching on {a['rps']:.1f} req/s (rounds "
                  f"{a['rps_rounds']}, {a['prompts_per_decode']:.1f} prompts/decode, "
                  f"{a['cpu_ms_total']:.1f} CPU ms/request) vs off {b['rps']:.1f} req/s "
                  f"(rounds {b['rps_rounds']}, {b['cpu_ms_total']:.1f} CPU ms/request): "
                  f"x{ratio:.2f} (goal >= 4), p50 x{a['p50_ms'] / b['p50_ms']:.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
