"""Per-patch shape probes of CLIP-family image towers (BENCHMARKS.md, LLaVA section 7).

    python benchmarks/probe_clip_towers.py shapes-clip shapes-negclip shapes-coca shapes-llava

For 600 ShapesWorld training scenes (the first 5/6 fit, the rest test), at every tower layer:
a linear probe of the shape of the object covering each 8x8 patch (foreground patches) from
that patch's token, and from the concatenated tokens of its 3x3 neighbourhood. Prints
``L<layer>: <patch>/<neighbourhood>``. Works for CLIP / NegCLIP / CoCa (``visual``) and LLaVA
(``vision_tower``) models.
"""
import os, sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from probe_llava_features import linear_probe
from fmrt import pretrained
from fmrt.data import ShapesWorld, as_rng, render_batch, split_seed
from fmrt.data.vlm_data import patch_labels
from fmrt.data.vocab import COLORS, SHAPES
from fmrt.preprocess import uint8_batch_to_tensor
torch.set_num_threads(2)
N=600
for name in sys.argv[1:]:
    p = pretrained.load_pretrained(name)
    m = p.model.float().eval(); vt = getattr(m, "visual", None) or m.vision_tower
    world = ShapesWorld(image_size=64, seed=split_seed("train"))
    R = as_rng(np.random.default_rng(123))
    scenes = [world.sample_scene(R) for _ in range(N)]
    px = uint8_batch_to_tensor(render_batch(scenes), p.preprocess)
    with torch.no_grad():
        x = vt._embed(px); layers=[x]
        for blk in vt.transformer.resblocks:
            x = blk(x); layers.append(x)
    g=8; n_train=(N*5//6)*g*g
    lab = torch.from_numpy(patch_labels(scenes, g)).reshape(-1); fg = lab > 0
    shape = torch.where(fg, (lab - 1) // len(COLORS) + 1, 0)
    out=[]
    for i,h in enumerate(layers):
        h=h[:, -g*g:]
        # 3x3 neighbourhood concat
        hg=h.reshape(N,g,g,-1).permute(0,3,1,2)
        nb=F.unfold(hg, 3, padding=1).reshape(N, -1, g*g).transpose(1,2)
        out.append(f"L{i}: {linear_probe(h, shape, n_train, 5, fg):.3f}/{linear_probe(nb, shape, n_train, 5, fg):.3f}")
    print(name, " ".join(out), flush=True)
