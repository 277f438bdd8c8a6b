"""The memory estimate of a step (mlx_crepulse/footprint.py) against MLX's measured peak, on the demo.

    python scripts/footprint_check.py [--sizes 64 128 256] [--n 4]

Each size runs one step of a batch of n in this process (CPU: the attention scores are materialised),
from a reset peak; prints predicted and measured MiB beyond the weights.
"""

import argparse

import mlx.core as mx

from mlx_crepulse import Pipeline, footprint


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args()
    pipe = Pipeline.from_pretrained("demo")
    pipe.generate("a red circle", n=2, steps=1, seed=0)  # warm: encoders run, caches filled
    print(f"{'size':>6} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}")
    for size in args.sizes:
        recipe = pipe.resolve("a red circle", n=args.n, seed=1, steps=1, width=size, height=size, force=True)
        predicted = footprint.peak_bytes(pipe.files.configs, recipe, mx.default_device() == mx.cpu)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        pipe.generate(recipe, force=True)
        measured = mx.get_peak_memory() - base
        print(f"{size:>6} {predicted / 2**20:>14.0f} {measured / 2**20:>13.0f} {measured / predicted:>6.2f}")


if __name__ == "__main__":
    main()
