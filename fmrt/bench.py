"""``fmrt bench``: encoder throughput of one model across backends, measured side by side in one
process and reported as ratios against the first backend (machines are noisy; the ratio of two
medians taken in the same run is the figure worth quoting, not either absolute time)."""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import numpy as np


def _backend_kwargs(spec: str):
    # "onnxruntime-int8" -> ("onnxruntime", {"precision": "int8"})
    name, _, variant = spec.partition("-")
    return name, ({"precision": variant} if variant else {})


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (session creation, allocator, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compare_backends(model: str, *, backends: Sequence[str], batches: Sequence[int],
                     repeats: int = 20, seed: int = 0) -> List[Dict[str, object]]:
    import fmrt

    rng = np.random.default_rng(seed)
    rows: List[Dict[str, object]] = []
    runtimes = {b: fmrt.load(model, backend=_backend_kwargs(b)[0], **_backend_kwargs(b)[1])
                for b in backends}
    size = next(iter(runtimes.values())).preprocess.image_size
    for batch in batches:
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
        texts = [f"a photo of a red circle number {i}" for i in range(batch)]
        base: Dict[str, float] = {}
        for b, rt in runtimes.items():
            for what, fn in (("image", lambda: rt.encode_image(images)),
                             ("text", lambda: rt.encode_text(texts))):
                t = _median_time(fn, repeats)
                base.setdefault(what, t)
                rows.append({"backend": b, "what": what, "batch": batch,
                             "items_per_s": batch / t, "speedup_vs_first": base[what] / t})
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    lines = ["| encoder | batch | backend | items/s | speed-up vs first |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["what"], r["batch"])):
        lines.append(f"| {r['what']} | {r['batch']} | {r['backend']} | {r['items_per_s']:.0f} | "
                     f"{r['speedup_vs_first']:.2f}x |")
    return "\n".join(lines)
