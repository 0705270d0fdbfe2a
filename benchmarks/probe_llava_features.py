"""Linear probes of what a LLaVA model's image tokens carry (BENCHMARKS.md, LLaVA section).

    python benchmarks/probe_llava_features.py shapes-llava [--scenes 600] [--threads 2]

For ShapesWorld training scenes (fixed seed; the first 5/6 fit the probe, the rest test it):
  * per layer of the vision tower (input embedding, every block, ln_post): the (shape, colour)
    of the object covering each 8x8 patch (patches with >= 8 object pixels), foreground only;
  * the patch index (row, column) from the selected vision hidden state and from the projected
    image features the LM actually reads (``model.image_features``).
A linear classifier on per-dimension standardised features, Adam, 300 full-batch epochs.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def linear_probe(X: torch.Tensor, y: torch.Tensor, n_train: int, ncls: int,
                 select: torch.Tensor = None, epochs: int = 300) -> float:
    X = X.reshape(-1, X.shape[-1]).float()
    mu, sd = X[:n_train].mean(0), X[:n_train].std(0) + 1e-4
    X = (X - mu) / sd
    lin = torch.nn.Linear(X.shape[1], ncls)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(lin(X[:n_train]), y[:n_train]).backward()
        opt.step()
    with torch.no_grad():
        pred = lin(X[n_train:]).argmax(-1)
    ok = pred == y[n_train:]
    if select is not None:
        ok = ok[select[n_train:]]
    return float(ok.float().mean())


def main(argv=None) -> int:
    from fmrt import pretrained
    from fmrt.data import ShapesWorld, as_rng, render_batch, split_seed
    from fmrt.data.vlm_data import patch_labels
    from fmrt.data.vocab import COLORS, SHAPES
    from fmrt.preprocess import uint8_batch_to_tensor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="shapes-llava")
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    p = pretrained.load_pretrained(a.model)
    m, pre = p.model.float().eval(), p.preprocess
    g = m.config.grid
    world = ShapesWorld(image_size=m.image_size, seed=split_seed("train"))
    R = as_rng(np.random.default_rng(123))
    scenes = [world.sample_scene(R) for _ in range(a.scenes)]
    px = uint8_batch_to_tensor(render_batch(scenes), pre)
    vt = m.vision_tower
    with torch.no_grad():
        x = vt._embed(px)
        layers = [x]
        for blk in vt.transformer.resblocks:
            x = blk(x)
            layers.append(x)
        layers.append(vt.ln_post(x))
        feats = m.image_features(px)
        hidden = m.vision_hidden(px)
    n_train = (a.scenes * 5 // 6) * g * g
    lab = torch.from_numpy(patch_labels(scenes, g)).reshape(-1)
    fg = lab > 0
    shape = torch.where(fg, (lab - 1) // len(COLORS) + 1, 0)
    colour = torch.where(fg, (lab - 1) % len(COLORS) + 1, 0)
    print(f"{a.model}: projected feature norm {float(feats.norm(dim=-1).mean()):.2f}")
    print("| tower layer | shape (fg patches) | colour (fg patches) |\n|---|---|---|")
    for i, h in enumerate(layers):
        name = "ln_post" if i == len(layers) - 1 else ("embedding" if i == 0 else f"block {i}")
        h = h[:, 1:]
        print(f"| {name} | {linear_probe(h, shape, n_train, 1 + len(SHAPES), fg):.3f} | "
              f"{linear_probe(h, colour, n_train, 1 + len(COLORS), fg):.3f} |")
    idx = torch.arange(g * g).repeat(a.scenes)
    print("| features | patch index |\n|---|---|")
    for name, h in (("selected vision hidden state", hidden[:, -g * g:]),
                    ("projected image features", feats[:, -g * g:])):
        acc = linear_probe(h, idx, n_train, g * g)
        print(f"| {name} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
