"""Transfer the repulsion scale range from FLUX.1-dev to FLUX.2 [klein], measured on synthetic activations.

The principle: a scale means the same thing on two models when the first repelled block's update moves
the text tokens by the same relative amount, |x' - x| / |x| (x: the batch's enriched text tokens, the
package's own `repulsion.ascend`, 50 iterations). The cosine-kernel entropy H is scale-free, so dH/dx
shrinks as 1/|x| and the relative update as 1 / (tokens x width x rms^2): at equal activation rms the
scale transfers with the number of numbers per sample, tokens x width.

Measured here at full width, not on real weights: B = 4 samples of one prompt, each the same (N, D)
standard-normal "prompt" part plus a per-sample part 5% its size (after the first block the samples of one
prompt nearly agree), for FLUX.1-dev's text stream (512 tokens x 3072) and [klein]'s (512 x 3072 for 4B,
512 x 4096 for 9B). The rms of real enriched text tokens differs between the models and is unmeasured, so
the transferred range is a starting point, to be checked on real weights. (On unit-rms activations the
paper's scales saturate the update, |x' - x| ~ |x| at 1e8: real enriched text tokens are larger than that.)

Usage: python -m scripts.klein_scale
"""

import mlx.core as mx

from mlx_crepulse import repulsion

FLUX_DEV = (512, 3072)
SHAPES = {"FLUX.1-dev": FLUX_DEV, "klein 4B": (512, 3072), "klein 9B": (512, 4096)}
FLUX_RANGE = (1e8, 5e9)  # this package's FLUX.1 range (pipeline.Defaults), inside the paper's 5e6 to 8e9
PROBE = 1e3  # small enough that the update is linear in the scale on unit-rms activations (checked: 1e2 to 1e4)


def relative_update(tokens: int, width: int, scale: float = PROBE, batch: int = 4, spread: float = 0.05,
                    seed: int = 0) -> float:
    k1, k2 = mx.random.split(mx.random.key(seed))
    prompt = mx.random.normal((1, 1, tokens, width), key=k1)
    x = prompt + spread * mx.random.normal((1, batch, tokens, width), key=k2)
    moved = repulsion.ascend(x, scale, 50)
    return float(mx.linalg.norm((moved - x).reshape(-1)) / mx.linalg.norm(x.reshape(-1)))


def main():
    ref = relative_update(*FLUX_DEV)
    print(f"relative update per {PROBE:.0e} of scale, and the transferred range (FLUX.1 range {FLUX_RANGE}):")
    for name, shape in SHAPES.items():
        r = relative_update(*shape)
        factor = ref / r
        lo, hi = (float(f"{v * factor:.3g}") for v in FLUX_RANGE)
        print(f"  {name:11s} {shape[0]} x {shape[1]}: {r:.4g}  factor {factor:.3f}  range ({lo:.3g}, {hi:.3g})")


if __name__ == "__main__":
    main()
