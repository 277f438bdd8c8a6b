"""Repulsion's gradient of H against an independent float64 closed form, at FLUX.1's real sizes.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python scripts/repulsion_precision.py

Two sizes, batch of 4: the text stream (512 tokens x 3072) and a single block's joint sequence at
1024x1024 (4096 image + 512 text tokens x 3072 = 14.2 million numbers a sample). The samples are
x_i = sqrt(c) a + sqrt(1 - c) n_i (a, n_i standard normal, plus a common offset as activations have),
so every pair has cosine about c; c from 0.5 to 0.99999, and c = 0 (nearly orthogonal samples).

The project's gradient is read from `ascend` with one iteration, which is exactly x + scale * dH/dx;
the scale is chosen so the step is 10% of x, so float32 rounding of x + step costs about 1e-6 of it.
The reference is numpy float64 throughout, written from the definitions (not from the project's code):
S = X X^T, K = D^-1/2 S D^-1/2 / B, H = -sum lam log lam, dH/dK = U diag(-(log lam + 1)) U^T,
the chain rule through the normalisation to dH/dS, and dH/dX = (dH/dS + dH/dS^T) X.
It also times the update (50 iterations, as the pipeline runs it) with the former float32 Gram matrix
and the current one, in one process.
"""

import argparse
import time

import mlx.core as mx
import numpy as np

from mlx_crepulse import repulsion

COSINES = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999)
SIZES = {"text 512 x 3072": (512, 3072), "joint 4608 x 3072": (4608, 3072)}


def reference_gradient(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """dH/dX in float64 for samples x (B, ...), H the entropy of the normalised cosine kernel."""
    B = x.shape[0]
    f = np.asarray(x, np.float64).reshape(B, -1)
    s = f @ f.T
    n = np.sqrt(np.diag(s))
    k = s / np.outer(n, n) / B
    lam, u = np.linalg.eigh(k)
    w = np.where(lam >= eps, -(np.log(np.maximum(lam, eps)) + 1), 0.0)
    gk = (u * w) @ u.T  # dH/dK, symmetric
    # K_ij = S_ij / (B n_i n_j), n_i = sqrt(S_ii): the direct term, and the diagonal's through n
    gs = gk / np.outer(n, n) / B
    gs[np.diag_indices(B)] -= (gk * k).sum(axis=1) / np.diag(s)
    return ((gs + gs.T) @ f).reshape(x.shape)


def samples(rng, shape, cosine, batch=4) -> np.ndarray:
    tokens, width = shape
    a = rng.standard_normal((1, tokens, width), dtype=np.float32)
    n = rng.standard_normal((batch, tokens, width), dtype=np.float32)
    offset = rng.standard_normal((1, 1, width), dtype=np.float32)  # per-channel means, as activations have
    x = np.sqrt(cosine) * (a + offset) + np.sqrt(1 - cosine) * n
    return x.astype(np.float32)


def project_gradient(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """dH/dx from one iteration of `ascend` (exactly x + scale dH/dx), read back in float64."""
    scale = 0.1 * np.linalg.norm(x) / np.linalg.norm(ref)
    y = repulsion.ascend(mx.array(x)[None], float(scale), 1)[0]
    return (np.array(y, np.float64) - x) / scale


def relative_error(x: np.ndarray) -> float:
    ref = reference_gradient(x)
    ours = project_gradient(x, ref)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def gram_float32(f: mx.array) -> mx.array:
    """The former Gram matrix (before chunked float64 accumulation), kept to measure against."""
    f = f.astype(mx.float32)
    m = f.mean(axis=1, keepdims=True)
    d = f - m
    dd, dm, mm = d @ d.swapaxes(-1, -2), (d @ m.swapaxes(-1, -2))[..., 0], (m * m).sum(-1)
    with mx.stream(mx.cpu):
        dd, dm, mm = dd.astype(mx.float64), dm.astype(mx.float64), mm.astype(mx.float64)
        return mm[..., None] + dm[..., :, None] + dm[..., None, :] + dd


def update_time(x: mx.array, runs: int) -> float:
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        mx.eval(repulsion.ascend(x, 1e8, 50))
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def benchmark_update_time(runs: int) -> float:
    """scripts/benchmark.py's measurement of the update: Repulsion's hook on 1 double block's text (512
    tokens) and 2 single blocks' joint sequence (512 + 256 tokens), 50 iterations, batch of 4."""
    from scripts.benchmark import BATCH, IMG_TOKENS, TXT_TOKENS
    rep = repulsion.Repulsion(scale=1e8, iterations=50, repelled_steps=1, blocks="all")
    hook = rep.hook(0, 1, 0)
    txt, img = mx.random.normal((BATCH, TXT_TOKENS, 3072)), mx.random.normal((BATCH, IMG_TOKENS, 3072))
    mx.eval(txt, img)
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        mx.eval([hook("double", 0, txt, img)[0]] + [hook("single", i, txt, img)[1] for i in range(2)])
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    current = repulsion.gram
    rng = np.random.default_rng(0)
    print("relative error of dH/dx against float64 (batch of 4)")
    print(f"{'cosine':>8s}  " + "  ".join(f"{name + ' ' + which:>34s}" for name in SIZES
                                          for which in ("float32 Gram", "current")))
    for c in COSINES:
        row = []
        for shape in SIZES.values():
            x = samples(rng, shape, c)
            for gram in (gram_float32, current):
                repulsion.gram = gram
                row.append(relative_error(x))
            repulsion.gram = current
        print(f"{c:8.5f}  " + "  ".join(f"{e:34.2e}" for e in row), flush=True)
    print(f"\nthe update, 50 iterations, batch of 4, median of {args.runs} (s)")
    for name, shape in SIZES.items():
        x = mx.array(samples(rng, shape, 0.99))[None]
        mx.eval(x)
        times = []
        for gram in (gram_float32, current):
            repulsion.gram = gram
            times.append(update_time(x, args.runs))
        repulsion.gram = current
        print(f"  {name}: float32 Gram {times[0]:.3f}, current {times[1]:.3f}", flush=True)
    times = []
    for gram in (gram_float32, current):
        repulsion.gram = gram
        times.append(benchmark_update_time(args.runs + 2))
    repulsion.gram = current
    print(f"  scripts/benchmark.py's update (1 double + 2 single blocks, 256 px): float32 Gram {times[0]:.3f}, "
          f"current {times[1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
