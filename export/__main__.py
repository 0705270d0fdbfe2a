"""Command line for the export pipeline.

    python -m export onnx MODEL [--out DIR] [--int8] [--fp16] [--torchscript]
        (SAM models and segment-anything checkpoints go to ``export.sam_export``)
    python -m export tensorrt MODEL [--precision fp16|fp32] [--cache-root DIR]

``MODEL`` is a bundled name (``shapes-clip``) or a model directory. Without ``--out`` the graphs
go to the export cache (``$FMRT_CACHE_DIR/onnx/<name>-<sha12>/``). int8 TensorRT engines need
calibration data and are built through the Python API (``fmrt.load(..., backend="tensorrt",
precision="int8", calibration_data=...)``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _is_sam(model: str) -> bool:
    """A segment-anything checkpoint file, or a bundled name / model dir of family "sam"."""
    from fmrt import pretrained

    if os.path.isfile(model):
        return True
    try:
        return pretrained.read_config(pretrained.resolve(model)).get("family") == "sam"
    except Exception:  # noqa: BLE001 - unknown names are reported by the CLIP path below
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("onnx", help="export the image/text towers to ONNX")
    o.add_argument("model")
    o.add_argument("--out", help="output directory (default: the export cache)")
    o.add_argument("--cache-root",
                   help="fmrt cache root (default $FMRT_CACHE_DIR or ~/.cache/fmrt)")
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--torchscript", action="store_true", help="use the TorchScript exporter")
    o.add_argument("--int8", action="store_true", help="also write ORT dynamic-int8 graphs")
    o.add_argument("--fp16", action="store_true", help="also write the float16 variants")
    t = sub.add_parser("tensorrt", help="build (or find cached) TensorRT engines")
    t.add_argument("model")
    t.add_argument("--precision", choices=("fp32", "fp16"), default="fp16")
    t.add_argument("--cache-root")
    t.add_argument("--workspace-gb", type=float, default=4.0)
    t.add_argument("--rebuild", action="store_true")
    args = p.parse_args(argv)

    from export import onnx_export
    from fmrt import pretrained

    t0 = time.perf_counter()
    if args.cmd == "onnx" and _is_sam(args.model):
        # SAM has its own graphs (encoder + prompt decoder); same options, same output format
        from export import sam_export

        fwd = [args.model, "--opset", str(args.opset)]
        for flag, value in (("--out", args.out), ("--cache-root", args.cache_root)):
            if value:
                fwd += [flag, value]
        fwd += [f for f, on in (("--fp16", args.fp16), ("--int8", args.int8)) if on]
        return sam_export.main(fwd)
    if args.cmd == "onnx":
        from export import vlm_export

        if vlm_export.is_vlm(args.model):  # LLaVA / Flamingo: vision + LM prefill/decode graphs
            fwd = [args.model, "--opset", str(args.opset)]
            for flag, value in (("--out", args.out), ("--cache-root", args.cache_root)):
                if value:
                    fwd += [flag, value]
            return vlm_export.main(fwd)
        model_dir = pretrained.resolve(args.model)
        if args.out:
            paths = onnx_export.export_clip(model_dir, args.out, opset=args.opset,
                                            dynamo=not args.torchscript)
            out = args.out
        else:
            out = onnx_export.export_model_dir(model_dir, args.cache_root, opset=args.opset,
                                               dynamo=not args.torchscript)
            paths = {g: os.path.join(out, e["file"])
                     for g, e in onnx_export.read_manifest(out)["graphs"].items()}
        if args.fp16:
            for g in list(paths):
                paths[f"{g}.fp16"] = onnx_export.ensure_variant(
                    model_dir, out, g, "float16", cache_root=args.cache_root, opset=args.opset,
                    dynamo=not args.torchscript)
        if args.int8:
            from export.quantize import quantize_dir

            for g, path in quantize_dir(out).items():
                paths[f"{g}.int8"] = path
        print(json.dumps({"dir": out, "graphs": paths,
                          "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        return 0

    from fmrt.runtime.base import BackendUnavailableError, RuntimeLoadError

    from export import vlm_export

    if vlm_export.is_vlm(args.model):  # VLM engines (vision + LM prefill/decode) are fp32 only
        from fmrt.runtime.vlm import VlmModel

        try:
            vlm = VlmModel.load(args.model, backend="tensorrt", precision="fp32",
                                cache_root=args.cache_root, workspace_gb=args.workspace_gb,
                                rebuild=args.rebuild)
        except (BackendUnavailableError, RuntimeLoadError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"engines": {g: getattr(e, "path", "")
                                      for g, e in vlm._lm.engines.items()},
                          "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        return 0
    try:
        from fmrt.runtime.clip import ClipRuntime

        rt = ClipRuntime.load(args.model, backend="tensorrt", precision=args.precision,
                              cache_root=args.cache_root, workspace_gb=args.workspace_gb,
                              rebuild=args.rebuild)
    except BackendUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"engines": {g: getattr(e, "path", "") for g, e in rt.engines.items()},
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
