"""FLUX.2 [klein] 4B's transformer, this project against diffusers (torch, CPU), in one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m scripts.benchmark_klein

The configuration matches scripts/benchmark.py's FLUX.1 one, so the rows compare: full width (3072, 24
heads of 128, SwiGLU 3x, 7680-wide Qwen3-4B text states) with reduced depth (1 double-stream and 2
single-stream blocks), random weights, float32, a 256x256 image (256 image tokens), 512 text tokens, a
batch of 4. diffusers' model is written with its own save_pretrained and read by our loader, so both run
the same weights; the outputs are compared as well as timed (median of several runs after a warm-up).
Also timed: the same forward with contextual repulsion after every block (the package's update).
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_crepulse import weights
from mlx_crepulse.models import flux2
from mlx_crepulse.repulsion import Repulsion
from scripts.benchmark import median_time

BENCH = dict(in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
IMG_SIDE, TXT_TOKENS, BATCH = 16, 512, 4


def inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((BATCH, IMG_SIDE * IMG_SIDE, 128)).astype(np.float32),
            rng.standard_normal((1, TXT_TOKENS, 7680)).astype(np.float32))


def run(runs: int) -> dict:
    import torch
    from diffusers import Flux2Transformer2DModel
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**BENCH).eval()
    img, txt = inputs()
    tids, iids = flux2.text_ids(TXT_TOKENS), flux2.image_ids(IMG_SIDE, IMG_SIDE)
    t_img, t_txt = torch.from_numpy(img), torch.from_numpy(txt).expand(BATCH, -1, -1)

    def theirs():
        with torch.no_grad():
            return ref(t_img, t_txt, timestep=torch.full((BATCH,), 0.8), img_ids=torch.from_numpy(np.array(iids)),
                       txt_ids=torch.from_numpy(np.array(tids)), return_dict=False)[0]
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        want = theirs().numpy()
        diffusers_s = median_time(theirs, runs)
        del ref
        model = weights.load_into(flux2.Flux2Transformer(weights.read_json(Path(tmp) / "config.json")), Path(tmp))
    x, c = mx.array(img), mx.array(txt)
    pe = model.pos_embed(tids, iids)

    def ours(hook=None):
        out = model(x, c, model.conditioning(mx.array([0.8])), pe, hook)
        mx.eval(out)
        return out
    diff = float(np.abs(np.array(ours()) - want).max())
    ours_s = median_time(ours, runs)
    rep = Repulsion(scale=1e8, iterations=50, steps=1, blocks="all")
    rep.validate(BATCH, model)
    repelled_s = median_time(lambda: ours(rep.hook(0, 1)), runs)
    return dict(config=BENCH, batch=BATCH, image_tokens=IMG_SIDE ** 2, text_tokens=TXT_TOKENS,
                ours_seconds=ours_s, diffusers_seconds=diffusers_s, ours_with_repulsion_seconds=repelled_s,
                max_abs_difference=diff, max_abs_output=float(np.abs(want).max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    print(json.dumps(run(parser.parse_args().runs), indent=2))


if __name__ == "__main__":
    main()
