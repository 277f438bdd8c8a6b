"""Where does the demo model lose its prompts? Denoising and sampling measured by noise level.

    python -m scripts.diagnose_demo [MODEL] [--every 7]

Every `--every`-th image of the grammar (206 of 1,440 by default) is encoded by the model's VAE; its
latent x0 is noised to x_t = (1 - t) x0 + t noise and
1. denoised in one step (x0_hat = x_t - t v): the share of images whose attributes the oracle reads
   right from x0_hat, and the share it calls clean, per t. This is what the model knows at each
   noise level when it is shown the truth;
2. sampled from t0 to 0 with the model's default steps and guidance, or --steps and --guidance
   (Euler on the pipeline's sigma grid), starting from the truth noised to t0 (t0 = 1 is plain
   generation: nothing of x0 is left). Fidelity (colour and shape) and cleanliness per t0 show at
   which noise level the trajectory loses the prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from mlx_crepulse import Pipeline, sampling  # noqa: E402
from scripts import shapes  # noqa: E402


def oracle(pipe, tokens, rows, cols, truth):
    images = pipe.decode(tokens, rows, cols)
    reads = [shapes.read(im) for im in images]
    return {"attributes": np.mean([all(r[k] == a[k] for k in shapes.ALL_ATTRIBUTES) for r, a in zip(reads, truth)]),
            "fidelity": np.mean([r["colour"] == a["colour"] and r["shape"] == a["shape"] for r, a in zip(reads, truth)]),
            "clean": np.mean([bool(r["clean"]) for r in reads])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="demo")
    p.add_argument("--every", type=int, default=7)
    p.add_argument("--guidance", type=float, default=None, help="true CFG (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    args = p.parse_args(argv)

    pipe = Pipeline.from_pretrained(args.model)
    d, tf, vae = pipe.defaults, pipe.transformer, pipe.vae
    cfg = d.true_cfg if args.guidance is None else args.guidance
    steps = args.steps or d.steps
    truth = shapes.all_attribute_combinations()[::args.every]
    images = np.stack([shapes.render(**a) for a in truth]).astype(np.float32) / 127.5 - 1
    rows, cols = sampling.latent_grid(d.width, d.height, 2 ** (len(vae.config["block_out_channels"]) - 1))
    mean, _ = vae.encode_moments(mx.array(images))
    x0 = sampling.pack((mean - vae.shift_factor) * vae.scaling_factor)
    n = x0.shape[0]
    cond = [pipe.encode(shapes.caption(a["colour"], a["shape"]), d.max_sequence_length) for a in truth]
    txt = mx.concatenate([c[0] for c in cond])
    pooled = mx.concatenate([c[1] for c in cond])
    u_txt, u_pooled = pipe.encode(d.negative_prompt or "", d.max_sequence_length)
    pe = tf.pos_embed(mx.zeros((txt.shape[1], 3)), sampling.image_ids(rows, cols))
    noise = mx.random.normal(x0.shape, key=mx.random.key(12345))

    def velocity(x, t):
        tt = mx.full((n,), t)
        v = tf(x, txt, tf.conditioning(tt, pooled), pe)
        if cfg != 1:
            u = tf(x, u_txt, tf.conditioning(tt, mx.broadcast_to(u_pooled, pooled.shape)), pe)
            v = u + cfg * (v - u)
        return v

    print(f"model {args.model}: {n} images of the grammar, true CFG {cfg:g}, {steps} steps")
    print("1. one-step denoising from the truth noised to t (x0_hat = x_t - t v, conditional, no guidance)")
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        xt = (1 - t) * x0 + t * noise
        tt = mx.full((n,), t)
        x0h = xt - t * tf(xt, txt, tf.conditioning(tt, pooled), pe)
        r = oracle(pipe, x0h, rows, cols, truth)
        print(f"   t {t:.1f}: all attributes right {r['attributes']:6.1%}  clean {r['clean']:6.1%}", flush=True)
    print("2. sampling to 0 from the truth noised to t0 (t0 = 1: ordinary generation)")
    sigmas = sampling.schedule(steps, rows * cols, pipe.scheduler_config)
    for t0 in (0.3, 0.5, 0.7, 0.85, 1.0):
        grid = [t0] + [s for s in sigmas if s < t0 - 1e-6]
        x = (1 - t0) * x0 + t0 * noise
        for a, b in zip(grid[:-1], grid[1:]):
            x = x + (b - a) * velocity(x, a)
            mx.eval(x)
        r = oracle(pipe, x, rows, cols, truth)
        print(f"   t0 {t0:.2f} ({len(grid) - 1:2d} steps): fidelity {r['fidelity']:6.1%}  clean {r['clean']:6.1%}",
              flush=True)


if __name__ == "__main__":
    main()
