"""Where does the demo model lose its prompts? Denoising and sampling measured by noise level.

    python -m scripts.diagnose_demo [MODEL] [--every 7]

Every `--every`-th image of the grammar (206 of 1,440 by default) is encoded by the model's VAE; its
latent x0 is noised to x_t = (1 - t) x0 + t noise and
1. denoised in one step (x0_hat = x_t - t v): the share of images whose attributes the oracle reads
   right from x0_hat, and the share it calls clean, per t. This is what the model knows at each
   noise level when it is shown the truth;
2. sampled from t0 to 0 by the pipeline's own image to image (`generate(image=..., strength=...)`,
   the model's default steps and guidance, or --steps and --guidance), starting from the truth noised
   to t0 (t0 = 1 is plain generation: nothing of x0 is left). Fidelity (colour and shape) and
   cleanliness per t0 show at which noise level the trajectory loses the prompt.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from mlx_crepulse import Pipeline, sampling  # noqa: E402
from scripts import shapes  # noqa: E402


def oracle(images, truth):
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
    d, tf = pipe.defaults, pipe.transformer
    cfg = d.true_cfg if args.guidance is None else args.guidance
    steps = args.steps or d.steps
    truth = shapes.all_attribute_combinations()[::args.every]
    pictures = np.stack([shapes.render(**a) for a in truth]).astype(np.float32) / 255
    rows, cols = sampling.latent_grid(d.width, d.height, pipe.vae_scale)
    x0 = pipe.encode_image(pictures)
    n = x0.shape[0]
    cond = [pipe.encode(shapes.caption(a["colour"], a["shape"]), d.max_sequence_length) for a in truth]
    txt = mx.concatenate([c[0] for c in cond])
    pooled = mx.concatenate([c[1] for c in cond])
    pe = tf.pos_embed(mx.zeros((txt.shape[1], 3)), sampling.image_ids(rows, cols))
    noise = mx.random.normal(x0.shape, key=mx.random.key(12345))

    print(f"model {args.model}: {n} images of the grammar, true CFG {cfg:g}, {steps} steps")
    print("1. one-step denoising from the truth noised to t (x0_hat = x_t - t v, conditional, no guidance)")
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        xt = (1 - t) * x0 + t * noise
        tt = mx.full((n,), t)
        x0h = xt - t * tf(xt, txt, tf.conditioning(tt, pooled), pe)
        r = oracle(pipe.decode(x0h, rows, cols), truth)
        print(f"   t {t:.1f}: all attributes right {r['attributes']:6.1%}  clean {r['clean']:6.1%}", flush=True)
    print("2. sampling to 0 from the truth noised to t0 (the pipeline's image to image; t0 = 1: ordinary generation)")
    sigmas = sampling.schedule(steps, rows * cols, pipe.scheduler_config)
    by_caption = collections.defaultdict(list)  # generate() takes one prompt a batch
    for i, a in enumerate(truth):
        by_caption[shapes.caption(a["colour"], a["shape"])].append(i)
    noise = np.array(noise)
    for strength in (0.25, 0.5, 0.75, 0.85, 1.0):
        t0 = sigmas[sampling.image_to_image_start(steps, strength)]  # where generate() starts
        out = np.zeros_like(pictures)
        for prompt, idx in by_caption.items():
            out[idx] = pipe.generate(prompt, n=len(idx), latents=noise[idx], image=pictures[idx], strength=strength,
                                     steps=steps, true_cfg=cfg, output_type="np").images
        r = oracle(out, truth)
        print(f"   t0 {t0:.2f}: fidelity {r['fidelity']:6.1%}  clean {r['clean']:6.1%}", flush=True)

if __name__ == "__main__":
    main()
