"""GPU timing of ``fmrt.kernels.gated_cross_attention`` (Triton core) vs the dense-mask formulation.

``run(rows)`` appends one dict per case::

    {"op", "shape", "baseline", "baseline_ms", "ours_ms", "speedup", "max_abs_err"}

Shape of issue #3's goal: T=2,048 text tokens, width 1,024, 4 images x 64 latents (d_media 1,024),
open_flamingo's 8 heads x 64; batch 1 and 8; bf16 and fp32. ``<image>`` tokens at 0, 512, 1024, 1536
(every token sees an image, so no rows are trivially skipped). The baseline is open_flamingo's
MaskedCrossAttention + tanh gate in the same dtype (T x 256 dense scores, -finfo.max fill, row-max
subtraction, softmax, index-0 zeroing). Cases:

* ``gated_xattn_fwd`` / ``gated_xattn_fwdbwd``: the whole block (LayerNorm, projections, attention,
  gate), forward and forward + backward to every input and weight.
* ``gated_xattn_core_fwd``: the attention core alone on the same q / kv (our Triton kernel vs the
  dense masked softmax attention), to separate the kernel from the cuBLAS projections both share.

``max_abs_err``: ours vs a float64 dense reference on the same (rounded) inputs; for fwdbwd the
largest error over the output and every gradient, each relative to max(1, |reference|).

Run: ``python benchmarks/gpu/bench_gated_xattn.py`` (needs CUDA and Triton).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import time_ms  # noqa: E402  (shared CUDA-event timer)

T, D, T_IMG, N_LAT, D_MEDIA, HEADS, DH = 2048, 1024, 4, 64, 1024, 8, 64
IMAGE_POSITIONS = (0, 512, 1024, 1536)
NAMES = ("x", "media", "alpha", "ln_weight", "ln_bias", "to_q", "to_kv", "to_out")


def _inputs(b: int, dtype, device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inner = HEADS * DH
    p = {"x": torch.randn(b, T, D, generator=g), "media": torch.randn(b, T_IMG, N_LAT, D_MEDIA, generator=g),
         "alpha": torch.tensor([0.5]), "ln_weight": torch.ones(D), "ln_bias": torch.zeros(D),
         "to_q": torch.randn(inner, D, generator=g) / D ** 0.5,
         "to_kv": torch.randn(2 * inner, D_MEDIA, generator=g) / D_MEDIA ** 0.5,
         "to_out": torch.randn(D, inner, generator=g) / inner ** 0.5}
    return {k: v.to(device, dtype) for k, v in p.items()}


def _locations(b: int, device) -> torch.Tensor:
    locs = torch.zeros(b, T, dtype=torch.bool, device=device)
    locs[:, list(IMAGE_POSITIONS)] = True
    return locs


def _dense_mask(locs, n_img, n_lat):
    text_time = locs.cumsum(-1)
    media_time = torch.arange(n_img, device=locs.device) + 1
    mask = torch.eq(text_time[:, None, :, None], media_time.repeat_interleave(n_lat)[None, None, None, :])
    return mask, text_time


def _dense_core(q, k, v, locs):
    """open_flamingo's masked attention on [B, H, T, dh] q and [B, H, T_img*n, dh] k / v."""
    mask, text_time = _dense_mask(locs, T_IMG, N_LAT)
    sim = (q * DH ** -0.5) @ k.transpose(-1, -2)
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    return attn @ v


def _dense_block(p, locs):
    x, media = p["x"], p["media"]
    b = x.shape[0]
    inner = HEADS * DH
    q = F.layer_norm(x, (D,), p["ln_weight"], p["ln_bias"]) @ p["to_q"].T
    k, v = (media.reshape(b, T_IMG * N_LAT, D_MEDIA) @ p["to_kv"].T).chunk(2, dim=-1)
    q, k, v = (z.reshape(b, z.shape[1], HEADS, DH).transpose(1, 2) for z in (q, k, v))
    o = _dense_core(q, k, v, locs).transpose(1, 2).reshape(b, T, inner)
    return x + p["alpha"].tanh() * (o @ p["to_out"].T)


def _ours_block(p, locs):
    from fmrt.kernels.gated_xattn import gated_cross_attention

    return gated_cross_attention(p["x"], p["media"], locs, p["alpha"], ln_weight=p["ln_weight"],
                                 ln_bias=p["ln_bias"], to_q=p["to_q"], to_kv=p["to_kv"],
                                 to_out=p["to_out"], heads=HEADS, backend="triton")



def _time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    return time_ms(fn, warmup, iters)


def _fwd_bwd(block, p, locs, grad):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    out = block(leaves, locs)
    grads = torch.autograd.grad(out, [leaves[k] for k in NAMES], grad)
    return [out.detach()] + list(grads)


def _rel_err(got, ref) -> float:
    return max((a.double() - r).abs().max().item() / max(1.0, r.abs().max().item()) for a, r in zip(got, ref))


def run(rows: List[dict], device: str = "cuda", batches=(1, 8)) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_gated_xattn needs a CUDA device")
    from fmrt.kernels import gated_xattn_triton as K
    from fmrt.kernels.gated_xattn import media_token_index

    dev = torch.device(device)
    for b in batches:
        locs = _locations(b, dev)
        p64 = _inputs(b, torch.float64, dev)
        grad64 = torch.randn(b, T, D, generator=torch.Generator().manual_seed(1)).to(dev, torch.float64)
        for dtype in (torch.bfloat16, torch.float32):
            tag = f"B={b} T={T} d={D} {T_IMG}x{N_LAT} h={HEADS}x{DH} {str(dtype).replace('torch.', '')}"
            p = {k: v.to(dtype) for k, v in p64.items()}
            p_round = {k: v.double() for k, v in p.items()}  # the reference sees the rounded inputs
            grad = grad64.to(dtype)

            # --- whole block, forward
            with torch.no_grad():
                ref = _dense_block(p_round, locs)
                err = (_ours_block(p, locs).double() - ref).abs().max().item()
                base_ms = _time_ms(lambda: _dense_block(p, locs))
                ours_ms = _time_ms(lambda: _ours_block(p, locs))
            rows.append({"op": "gated_xattn_fwd", "shape": tag, "baseline": "open_flamingo dense mask",
                         "baseline_ms": base_ms, "ours_ms": ours_ms, "speedup": base_ms / ours_ms,
                         "max_abs_err": err})

            # --- whole block, forward + backward (every gradient)
            ref_all = _fwd_bwd(_dense_block, p_round, locs, grad.double())
            err = _rel_err(_fwd_bwd(_ours_block, p, locs, grad), ref_all)
            base_ms = _time_ms(lambda: _fwd_bwd(_dense_block, p, locs, grad), iters=10)
            ours_ms = _time_ms(lambda: _fwd_bwd(_ours_block, p, locs, grad), iters=10)
            rows.append({"op": "gated_xattn_fwdbwd", "shape": tag, "baseline": "open_flamingo dense mask",
                         "baseline_ms": base_ms, "ours_ms": ours_ms, "speedup": base_ms / ours_ms,
                         "max_abs_err": err})

            # --- attention core only, same q / kv
            with torch.no_grad():
                inner = HEADS * DH
                xn = F.layer_norm(p["x"], (D,), p["ln_weight"], p["ln_bias"])
                q = xn @ p["to_q"].T
                kv = p["media"].reshape(b, T_IMG * N_LAT, D_MEDIA) @ p["to_kv"].T
                idx = media_token_index(locs).to(torch.int32)
                qh = q.view(b, T, HEADS, DH).transpose(1, 2)
                kh, vh = (z.reshape(b, -1, HEADS, DH).transpose(1, 2) for z in kv.chunk(2, dim=-1))

                def ours_core():
                    return K.attention_forward(q, kv, idx, heads=HEADS, n_latents=N_LAT,
                                               n_images=T_IMG, immediate=True)[0]

                ref = _dense_core(qh.double(), kh.double(), vh.double(), locs)
                ref = ref.transpose(1, 2).reshape(b, T, inner)
                err = (ours_core().double() - ref).abs().max().item()
                base_ms = _time_ms(lambda: _dense_core(qh, kh, vh, locs))
                ours_ms = _time_ms(ours_core)
            rows.append({"op": "gated_xattn_core_fwd", "shape": tag, "baseline": "dense masked attention",
                         "baseline_ms": base_ms, "ours_ms": ours_ms, "speedup": base_ms / ours_ms,
                         "max_abs_err": err})


if __name__ == "__main__":
    out: List[dict] = []
    run(out)
    cols = ["op", "shape", "baseline", "baseline_ms", "ours_ms", "speedup", "max_abs_err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in out:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
