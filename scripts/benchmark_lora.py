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
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from mlx_crepulse import cpu, lora, sampling
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


def apply(model, path: Path, scale: float = 1.0) -> tuple:
    """Read, map and wrap as set_loras does. Returns (seconds, the original layers, their wrapped
    versions): the wrapped ones share the originals' weights, so the base and the LoRA can be swapped
    in and out of one model without a second copy of it."""
    start = time.perf_counter()
    layers = lora.linear_layers(model)
    combined = lora.combine([(scale, lora.deltas(lora.read(path), {"transformer": layers}))])
    wrapped = [(p, lora.wrap(layers[p], a, b)) for (_, p), (a, b) in combined.items()]
    model.update_modules(tree_unflatten(wrapped))
    return time.perf_counter() - start, [(p, layers[p]) for p, _ in wrapped], wrapped


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
    if mx.default_device() == mx.cpu:  # as the pipeline runs it there (cpu.py)
        cpu.install()
        return lambda: mx.eval(cpu.forward(model, img, txt, model.conditioning(t, pooled, g), pe))
    return lambda: mx.eval(model(img, txt, model.conditioning(t, pooled, g), pe))


def fresh():
    mx.random.seed(0)
    model = FluxTransformer(BENCH)
    mx.eval(model.parameters())
    return model


def lora_ops_time(model, forward, runs) -> float:
    """The unfused LoRA's own work in one forward, timed alone on inputs of the very shapes the forward
    gives each wrapped layer: the difference of two noisy forward timings cannot resolve a cost this
    small on a shared CPU. Includes the add onto the layer's output (lora.low_rank)."""
    calls, original = [], lora.LoraLinear.__call__

    def recording(self, x):
        calls.append((x.shape, self.lora.a, self.lora.b))
        return original(self, x)
    lora.LoraLinear.__call__ = recording
    try:
        forward()
    finally:
        lora.LoraLinear.__call__ = original
    work = [(mx.random.normal(shape), mx.random.normal(shape[:-1] + (b.shape[0],)), a, b) for shape, a, b in calls]
    mx.eval([w[:2] for w in work])
    return median_time(lambda: mx.eval([lora.low_rank(y, x, lora._Delta(a, b)) for x, y, a, b in work]), runs + 2)


def interleaved(fns: dict, runs: int) -> dict:
    """Median seconds of each forward, the forwards taken in turn so that the machine's load drifts
    over all of them alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def quantized_fusion_loss(rank: int, bits: int, lora_norm: float = 0.05) -> float:
    """Fusing before quantizing: a LoRA update B A (Frobenius norm `lora_norm` x the weight's) on one
    3072 x 3072 layer becomes q(W + BA) - q(W) once quantized; returns |q(W + BA) - q(W) - BA| / |BA|, the
    part of the LoRA's effect that quantization gets wrong. Unfused, the update is exact (0)."""
    mx.random.seed(1)
    w = mx.random.normal((3072, 3072)) * 3072 ** -0.5
    a, b = mx.random.normal((rank, 3072)), mx.random.normal((3072, rank))
    ba = b @ a
    ba = ba * (lora_norm * mx.linalg.norm(w) / mx.linalg.norm(ba))
    fused = w + ba
    def q(x):
        return mx.dequantize(*mx.quantize(x, 64, bits), group_size=64, bits=bits)
    return (mx.linalg.norm(q(fused) - q(w) - ba) / mx.linalg.norm(ba)).item()


def measure(ranks, runs, folder):
    """At most two models in memory at once (the unfused LoRA lives beside the base's own weights)."""
    rows = {}
    base = fresh()
    forward = forward_fn(base, BATCH)
    for rank in ranks:
        path = write_lora(base, rank, folder)
        rows[f"apply rank {rank} (read, map, wrap; once)"], originals, wrapped = apply(base, path)
        rows[f"LoRA ops alone, rank {rank}"] = lora_ops_time(base, forward, runs)
        fused = fresh()
        rows[f"fuse rank {rank} (once)"] = fuse(fused, path)
        times = interleaved({"base": lambda: (base.update_modules(tree_unflatten(originals)), forward()),
                             f"unfused rank {rank}": lambda: (base.update_modules(tree_unflatten(wrapped)), forward()),
                             f"fused rank {rank}": forward_fn(fused, BATCH)}, runs)
        base.update_modules(tree_unflatten(originals))
        del fused
        rows.update({k: v for k, v in times.items() if k != "base"})
        rows[f"base (beside rank {rank})"] = times["base"]
        rows.setdefault("base", times["base"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    report = {"device": str(mx.default_device()), "batch": BATCH, "config": BENCH}
    with tempfile.TemporaryDirectory() as tmp:
        report["float32"] = measure(args.ranks, args.runs, Path(tmp))
    report["fuse then quantize: part of the update lost"] = {
        f"rank {r}, {bits}-bit": quantized_fusion_loss(r, bits) for r in args.ranks for bits in (4, 8)}
    report["full FLUX.1 bytes"] = {"transformer linear weights bf16": weight_bytes(FULL, 2), **{
        f"LoRA rank {r} bf16": lora_bytes(FULL, r, 2) for r in args.ranks}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    for name, rows in report.items():
        if isinstance(rows, dict) and "base" in rows:
            print(f"{name} (batch {BATCH}, seconds per forward = per step):")
            for k, v in rows.items():
                ref = rows[f"base (beside rank {k.split()[-1]})"] if k.startswith(("unfused", "fused")) else rows["base"]
                extra = (f"  {100 * (v / ref - 1):+.1f}% per step (base run beside it: {ref:.3f})"
                         if k.startswith(("unfused", "fused")) else
                         f"  {100 * v / rows['base']:.1f}% of a step" if k.startswith("LoRA ops") else "")
                print(f"  {k:40s} {v:8.3f}{extra}")
    for k, v in report["fuse then quantize: part of the update lost"].items():
        print(f"  fused then quantized, {k}: the LoRA's effect off by {100 * v:.0f}% of its norm")
    for k, v in report["full FLUX.1 bytes"].items():
        print(f"  {k:40s} {v / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()
