"""What a preview costs at 1024 x 1024: a full VAE decode against the quick latent-to-RGB map (preview.py).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python scripts/preview_cost.py [--size 1024] [--repeat 3]
    python scripts/preview_cost.py --demo     # the bundled demo: a preview's decode next to a step

Builds FLUX.1's VAE and FLUX.2's ([klein]) at their real shapes with random weights (the cost of a decode
does not depend on the weights' values), decodes one latent image of the size, and times the quick
map on the same latents. Also counts each decode's work on paper (multiply-adds of every convolution,
linear layer and attention product, times two), so the ratio can be read for a Mac too: next to one
transformer step at 1024 px (69.5 TFLOP per image for FLUX.1, docs/performance.md). Prints one line
per VAE.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_crepulse.models.autoencoder import AutoencoderKL
from mlx_crepulse.models.autoencoder_flux2 import AutoencoderKLFlux2
from mlx_crepulse.preview import LatentRGB

COMMON = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, in_channels=3,
              out_channels=3, act_fn="silu", mid_block_add_attention=True, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, use_post_quant_conv=False, use_quant_conv=False)
VAES = {"FLUX.1": (AutoencoderKL, dict(COMMON, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)),
        "FLUX.2": (AutoencoderKLFlux2, dict(COMMON, latent_channels=32, use_post_quant_conv=True,
                                            use_quant_conv=True))}


def decoder_flops(vae, z) -> float:
    """Two times the multiply-adds of one decode of z, counted while running it once."""
    total = [0.0]
    conv_call, linear_call, sdpa = nn.Conv2d.__call__, nn.Linear.__call__, mx.fast.scaled_dot_product_attention

    def conv(self, x):
        y = conv_call(self, x)
        o, kh, kw, i = self.weight.shape
        total[0] += 2.0 * y.shape[0] * y.shape[1] * y.shape[2] * o * kh * kw * i
        return y

    def linear(self, x):
        total[0] += 2.0 * x.size * self.weight.shape[0]
        return linear_call(self, x)

    def attention(q, k, v, **kw):
        total[0] += 2.0 * 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]  # QK^T and PV
        return sdpa(q, k, v, **kw)
    nn.Conv2d.__call__, nn.Linear.__call__, mx.fast.scaled_dot_product_attention = conv, linear, attention
    try:
        mx.eval(vae.decode(z))
    finally:
        nn.Conv2d.__call__, nn.Linear.__call__, mx.fast.scaled_dot_product_attention = conv_call, linear_call, sdpa
    return total[0]


def best_of(repeat, fn, first=None) -> float:
    """The best wall time of `repeat` runs of fn (the first of them `first`, when given)."""
    times = []
    for k in range(repeat):
        t0 = time.perf_counter()
        (first if k == 0 and first else fn)()
        times.append(time.perf_counter() - t0)
    return min(times)


def demo():
    """The demo model's previews as the app meets them: the median decode and step of a 6-step batch."""
    from mlx_crepulse import Pipeline, Recipe
    pipe = Pipeline.from_pretrained("demo")
    for n in (2, 4):
        times = []

        def callback(p):
            t0 = time.perf_counter()
            p.preview()
            times.append((p.elapsed / p.step, time.perf_counter() - t0))
            return True
        pipe.generate(Recipe(prompt="a red circle", n=n, seed=1, steps=6), callback=callback)
        step, decode = np.median(times[1:], axis=0)  # the first step also compiles
        print(f"demo, batch of {n}: a preview's decode {decode * 1e3:.1f} ms, a step {step * 1e3:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--repeat", type=int, default=3, help="decodes timed; the best is reported")
    ap.add_argument("--demo", action="store_true", help="time the bundled demo's previews instead")
    args = ap.parse_args()
    if args.demo:
        return demo()
    side = args.size // 8
    for name, (cls, config) in VAES.items():
        vae = cls(config)
        mx.eval(vae.parameters())
        c = config["latent_channels"]
        z = mx.random.normal((1, side, side, c))
        flops = []  # counted during the first timed decode (counting reads shapes only)
        decode = best_of(args.repeat, lambda: mx.eval(vae.decode(z)), lambda: flops.append(decoder_flops(vae, z)))
        fit = LatentRGB(c)
        fit.add(np.array(z), np.random.default_rng(0).uniform(size=(1, args.size, args.size, 3)))
        quick = best_of(20, lambda: fit(np.array(z)))  # with the copy out of MLX, as the pipeline does it
        print(f"{name} VAE ({c} latent channels), one {args.size}x{args.size} image, float32 on this CPU: "
              f"decode {decode:.2f} s ({flops[0] / 1e12:.2f} TFLOP), quick map {quick * 1e3:.2f} ms "
              f"({2 * side * side * (c + 1) * 3 / 1e6:.1f} MFLOP)", flush=True)


if __name__ == "__main__":
    main()
