"""Time every fused op's GPU path against its baseline and print one table (see run_all.sh).

Each ``benchmarks/gpu/bench_<op>.py`` defines ``run(rows)`` appending dicts with keys
op, shape, baseline, baseline_ms, ours_ms, speedup, max_abs_err. A module that fails is
reported in the table instead of stopping the others.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--only", default=None, help="comma-separated module stems (bench_contrastive,...)")
    args = ap.parse_args(argv)
    rows: list = []
    only = set(args.only.split(",")) if args.only else None
    for path in sorted(HERE.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        t0 = time.perf_counter()
        try:
            _load(path).run(rows)
        except Exception as e:  # noqa: BLE001 - keep timing the other ops
            traceback.print_exc()
            rows.append({"op": path.stem, "shape": "-", "baseline": f"FAILED: {type(e).__name__}: {e}"[:80],
                         "baseline_ms": float("nan"), "ours_ms": float("nan"), "speedup": float("nan"),
                         "max_abs_err": float("nan")})
        print(f"[{path.stem}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    cols = ["op", "shape", "baseline", "baseline_ms", "ours_ms", "speedup", "max_abs_err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
