"""What a LoRA costs per step, unfused (beside each layer, as mlx_crepulse.lora applies it) and fused into
the weights, on a float32 and a 4-bit base.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python scripts/benchmark_lora.py

The configuration is scripts/benchmark.py's: FLUX.1 at full width with reduced depth (hidden 3072, 24
heads, 1 double-stream and 2 single-stream blocks, 256 image and 512 text tokens, a batch of 4, guidance
embedding on), random weights. The LoRA is a random diffusers-format file on every Linear layer of the
transformer (what AI-Toolkit and most FLUX trainers adapt), read and mapped by mlx_crepulse.lora itself.
Each timing is the median of several forwards after a warm-up. Per-block costs are the same at full
depth, so the relative cost per step carries over to FLUX.1's 19 + 38 blocks; the byte counts are given
for full FLUX.1 (from the layer shapes).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_crepulse import lora, sampling
from mlx_crepulse.models.flux import FluxTransformer
from scripts.benchmark import BATCH, BENCH, FULL, IMG_TOKENS, TXT_TOKENS, inputs, median_time


def write_lora(model, rank: int, folder: Path) -> Path:
    """A random rank-`rank` LoRA on every Linear of `model`, in diffusers' naming (alpha = rank)."""
    tensors = {}
    for path, layer in lora.linear_layers(model).items():
        d_in, d_out = lora.io_dims(layer)
        tensors[f"transformer.{path}.lora_A.weight"] = mx.random.normal((rank, d_in)) * d_in ** -0.5
        tensors[f"transformer.{path}.lora_B.weight"] = mx.random.normal((d_out, rank)) * 0.01
    out = folder / f"rank{rank}.safetensors"
    mx.save_safetensors(str(out), tensors)
    return out


def apply(model, path: Path, scale: float = 1.0) -> float:
    """Read, map and wrap as set_loras does; returns the seconds it took."""
    start = time.perf_counter()
    layers = lora.linear_layers(model)
    combined = lora.combine([(scale, lora.deltas(lora.read(path), {"transformer": layers}))])
    model.update_modules(tree_unflatten([(p, lora.wrap(layers[p], a, b)) for (_, p), (a, b) in combined.items()]))
    return time.perf_counter() - start


def fuse(model, path: Path, scale: float = 1.0) -> float:
    """W + scale B A into each float layer's weight (what fusing costs once; restoring would need a copy
    of every fused weight, or reading the base again)."""
    start = time.perf_counter()
    layers = lora.linear_layers(model)
    combined = lora.combine([(scale, lora.deltas(lora.read(path), {"transformer": layers}))])
    for (_, p), (a, b) in combined.items():
        layers[p].weight = layers[p].weight + b @ a
    mx.eval(model.parameters())
    return time.perf_counter() - start


def lora_bytes(config: dict, rank: int, itemsize: int) -> int:
    model = FluxTransformer(config)  # lazy: never evaluated, only its shapes are read
    return sum(rank * sum(lora.io_dims(m)) * itemsize for m in lora.linear_layers(model).values())


def weight_bytes(config: dict, itemsize: int) -> int:
    model = FluxTransformer(config)
    return sum(m.weight.size * itemsize for m in lora.linear_layers(model).values())


def forward_fn(model, batch):
    img, txt, pooled = (mx.array(a) for a in inputs(np.random.default_rng(0), batch))
    side = int(IMG_TOKENS ** 0.5)
    pe = model.pos_embed(mx.zeros((TXT_TOKENS, 3)), sampling.image_ids(side, side))
    t, g = mx.array([0.8]), mx.array([3.5])
    return lambda: mx.eval(model(img, txt, model.conditioning(t, pooled, g), pe))


def fresh(bits=None):
    mx.random.seed(0)
    model = FluxTransformer(BENCH)
    if bits:
        nn.quantize(model, 64, bits, class_predicate=lambda p, m: isinstance(m, nn.Linear) and
                    m.weight.shape[-1] % 64 == 0)
    mx.eval(model.parameters())
    return model


def measure(ranks, runs, bits, batch, folder):
    rows = {}
    base = fresh(bits)
    rows["base"] = median_time(forward_fn(base, batch), runs)
    for rank in ranks:
        path = write_lora(base, rank, folder)
        model = fresh(bits)
        seconds = apply(model, path)
        rows[f"unfused rank {rank}"] = median_time(forward_fn(model, batch), runs)
        rows[f"apply rank {rank} (read, map, wrap; once)"] = seconds
        if not bits:
            model = fresh()
            rows[f"fuse rank {rank} (once)"] = fuse(model, path)
            rows[f"fused rank {rank}"] = median_time(forward_fn(model, batch), runs)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bits", type=int, default=0, help="also time a 4- or 8-bit base (slow on a CPU)")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    report = {"device": str(mx.default_device()), "batch": BATCH, "config": BENCH}
    with tempfile.TemporaryDirectory() as tmp:
        report["float32"] = measure(args.ranks, args.runs, None, BATCH, Path(tmp))
        if args.bits:
            report[f"{args.bits}-bit"] = measure(args.ranks, args.runs, args.bits, BATCH, Path(tmp))
    report["full FLUX.1 bytes"] = {"transformer linear weights bf16": weight_bytes(FULL, 2), **{
        f"LoRA rank {r} bf16": lora_bytes(FULL, r, 2) for r in args.ranks}}
    for name, rows in report.items():
        if isinstance(rows, dict) and "base" in rows:
            print(f"{name} (batch {BATCH}, seconds per forward = per step):")
            for k, v in rows.items():
                extra = f"  {100 * (v / rows['base'] - 1):+.1f}% per step" if k.startswith(("unfused", "fused")) else ""
                print(f"  {k:40s} {v:8.3f}{extra}")
    for k, v in report["full FLUX.1 bytes"].items():
        print(f"  {k:40s} {v / 2**30:8.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
