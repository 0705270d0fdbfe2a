"""GPU timing of ``fmrt.kernels.decode_masks`` (Triton) vs the unfused torch module path.

``run(rows)`` appends one dict per case::

    {"op", "shape", "baseline", "baseline_ms", "ours_ms", "speedup", "max_abs_err"}

Cases at SAM size (image embedding 256 x 64 x 64, C1=64, C2=32, M=4 mask tokens): B=1 all masks,
B=1 best-of-3, B=64 multimask (an automatic-mask-generator batch), in fp32 and fp16/bf16. The
baseline is segment-anything's ``output_upscaling`` written with the same torch ops
(ConvTranspose2d, LayerNorm2d, GELU) + the hypernetwork matmul in the same dtype (for "best" it
computes all masks then selects, as SAM does). ``max_abs_err`` is ours vs a float64 reference
on the same inputs. Also prints the peak extra CUDA memory of each side.

Run: ``python -m benchmarks.gpu.bench_mask_decode`` (needs CUDA and Triton).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import time_ms  # noqa: E402  (shared CUDA-event timer)


def _unfused(src, hyper, p, iou, select):
    x = F.conv_transpose2d(src, p["conv1_weight"], p["conv1_bias"], stride=2)
    u = x.mean(1, keepdim=True)                       # segment_anything LayerNorm2d
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + p["ln_eps"])
    x = F.gelu(p["ln_weight"][:, None, None] * x + p["ln_bias"][:, None, None])
    x = F.gelu(F.conv_transpose2d(x, p["conv2_weight"], p["conv2_bias"], stride=2))
    b, c, h, w = x.shape
    masks = (hyper @ x.view(b, c, h * w)).view(b, -1, h, w)
    if select == "multimask":
        return masks[:, 1:]
    if select == "best":
        k = iou[:, 1:].argmax(1) + 1
        return masks[torch.arange(b, device=masks.device), k][:, None]
    return masks



def _time_ms(fn, warmup: int = 5, iters: int = 30) -> float:
    return time_ms(fn, warmup, iters)


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(rows: List[dict]) -> None:
    from fmrt.kernels.mask_decode import decode_masks, decode_masks_reference

    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/gpu/bench_mask_decode.py needs a CUDA device")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    C, C1, C2, M, hw = 256, 64, 32, 4, 64
    p64 = {"conv1_weight": torch.randn(C, C1, 2, 2, generator=g, dtype=torch.float64) / math.sqrt(C),
           "conv1_bias": 0.1 * torch.randn(C1, generator=g, dtype=torch.float64),
           "ln_weight": 1 + 0.2 * torch.randn(C1, generator=g, dtype=torch.float64),
           "ln_bias": 0.2 * torch.randn(C1, generator=g, dtype=torch.float64),
           "conv2_weight": torch.randn(C1, C2, 2, 2, generator=g, dtype=torch.float64) / math.sqrt(C1),
           "conv2_bias": 0.1 * torch.randn(C2, generator=g, dtype=torch.float64)}
    cases = [(1, "all"), (1, "best"), (64, "multimask")]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, select in cases:
            src64 = torch.randn(B, C, hw, hw, generator=g, dtype=torch.float64)
            hyp64 = torch.randn(B, M, C2, generator=g, dtype=torch.float64)
            iou = torch.rand(B, M, generator=g).to(dev)
            src, hyp = src64.to(dev, dtype), hyp64.to(dev, dtype)
            p = {k: v.to(dev, dtype) for k, v in p64.items()}
            p["ln_eps"] = 1e-6
            # reference on the same rounded inputs, in float64 on the GPU
            ref = decode_masks_reference(src.double(), hyp.double(), iou_pred=iou.double(), select=select,
                                         **{k: (v.double() if torch.is_tensor(v) else v) for k, v in p.items()}).masks

            def ours():
                return decode_masks(src, hyp, **p, iou_pred=iou, select=select, backend="triton").masks

            def base():
                return _unfused(src, hyp, p, iou, select)

            with torch.no_grad():
                err = (ours().double() - ref).abs().max().item()
                base_err = (base().double() - ref).abs().max().item()
                t_ours, t_base = _time_ms(ours), _time_ms(base)
                m_ours, m_base = _peak_mib(ours), _peak_mib(base)
            rows.append({"op": f"decode_masks[{select}]",
                         "shape": f"B={B} {C}x{hw}x{hw}->{M}x{4 * hw}x{4 * hw} {str(dtype).replace('torch.', '')}",
                         "baseline": "torch unfused (ConvTranspose2d+LayerNorm2d+GELU+matmul)",
                         "baseline_ms": round(t_base, 4), "ours_ms": round(t_ours, 4),
                         "speedup": round(t_base / t_ours, 3), "max_abs_err": err,
                         "baseline_max_abs_err": base_err,
                         "peak_mib_baseline": round(m_base, 2), "peak_mib_ours": round(m_ours, 2)})
            del src, hyp, ref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    out: List[dict] = []
    run(out)
    keys = ["op", "shape", "baseline_ms", "ours_ms", "speedup", "max_abs_err", "baseline_max_abs_err",
            "peak_mib_baseline", "peak_mib_ours"]
    print(" | ".join(keys))
    for r in out:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys))
