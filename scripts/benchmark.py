"""Time and memory, side by side in one process: this project, diffusers (torch, CPU) and mflux.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python scripts/benchmark.py

The benchmark configuration is FLUX.1 at full width with reduced depth, so it runs on a CPU: hidden 3072,
24 heads, 1 double-stream and 2 single-stream blocks, random weights, float32, a 256x256 image (256 image
tokens), 512 text tokens, guidance embedding on. Each timing is the median of several runs after a
warm-up. mflux runs one image at a time (its transformer has no batched forward), so it runs four times.
Memory figures for full FLUX.1 come from exact weight bytes plus an activation peak measured at full
width and full resolution with reduced depth.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_crepulse import cpu, sampling
from mlx_crepulse.models import flux
from mlx_crepulse.models.flux import FluxTransformer
from mlx_crepulse.repulsion import Repulsion

BENCH = dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56))
FULL = dict(BENCH, num_layers=19, num_single_layers=38)
IMG_TOKENS, TXT_TOKENS, BATCH = 256, 512, 4
# Apple's published GPU FP32 peak (TFLOP/s; Apple's GPUs run bf16 at the same rate) and memory bandwidth
# (GB/s), for the chips Apple gave a TFLOP figure for.
CHIPS = [("M1", 2.6, 68), ("M1 Pro", 5.2, 200), ("M1 Max", 10.4, 400), ("M1 Ultra", 21.0, 800),
         ("M2", 3.6, 100), ("M2 Pro", 6.8, 200), ("M2 Max", 13.6, 400), ("M2 Ultra", 27.2, 800)]


def median_time(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inputs(rng, batch):
    return (rng.standard_normal((batch, IMG_TOKENS, 64)).astype(np.float32),
            rng.standard_normal((1, TXT_TOKENS, 4096)).astype(np.float32),
            rng.standard_normal((1, 768)).astype(np.float32))


def ours(runs):
    model = FluxTransformer(BENCH)
    mx.eval(model.parameters())
    img, txt, pooled = (mx.array(a) for a in inputs(np.random.default_rng(0), BATCH))
    side = int(IMG_TOKENS ** 0.5)
    pe = model.pos_embed(mx.zeros((TXT_TOKENS, 3)), sampling.image_ids(side, side))
    t, g = mx.array([0.8]), mx.array([3.5])

    def forward(hook=None):
        vec = model.conditioning(t, pooled, g)
        mx.eval(cpu.forward(model, img, txt, vec, pe, hook))

    plain = median_time(forward, runs)
    rep = Repulsion(scale=1e8, iterations=50, repelled_steps=1, blocks="all")
    rep.check(BATCH)
    middle = len(model.transformer_blocks) // 2
    repelled = median_time(lambda: forward(rep.hook(0, 1, middle)), runs)
    # the update alone, on activations of the same shapes (1 double block's text, 2 single blocks' joint
    # sequence): the difference of two noisy forward timings cannot resolve a cost this small
    hook = rep.hook(0, 1, middle)
    txt_act = mx.random.normal((BATCH, TXT_TOKENS, 3072))
    img_act = mx.random.normal((BATCH, IMG_TOKENS, 3072))
    mx.eval(txt_act, img_act)
    update = median_time(lambda: mx.eval([hook("double", 0, txt_act, img_act)[0]] +
                                         [hook("single", i, txt_act, img_act)[1] for i in range(2)]), runs + 2)
    return model, plain, repelled, update


def diffusers_time(runs):
    import torch
    from diffusers import FluxTransformer2DModel
    torch.set_num_threads(os.cpu_count())
    cfg = {k: v for k, v in BENCH.items()}
    model = FluxTransformer2DModel(patch_size=1, **cfg).eval()
    img, txt, pooled = (torch.from_numpy(a) for a in inputs(np.random.default_rng(0), BATCH))
    side = int(IMG_TOKENS ** 0.5)
    img_ids = torch.from_numpy(np.array(sampling.image_ids(side, side)))
    txt_ids = torch.zeros(TXT_TOKENS, 3)

    def forward():
        with torch.no_grad():
            model(hidden_states=img, encoder_hidden_states=txt.expand(BATCH, -1, -1),
                  pooled_projections=pooled.expand(BATCH, -1), timestep=torch.full((BATCH,), 0.8),
                  guidance=torch.full((BATCH,), 3.5), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)

    result = median_time(forward, runs)
    del model
    gc.collect()
    return result


def mflux_time(runs):
    from mflux.models.common.config.config import Config
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_transformer.transformer import Transformer
    model = Transformer(ModelConfig.dev(), num_transformer_blocks=1, num_single_transformer_blocks=2)
    mx.eval(model.parameters())
    side = int(IMG_TOKENS ** 0.5) * 16
    config = Config(ModelConfig.dev(), num_inference_steps=4, height=side, width=side, guidance=3.5)
    rng = np.random.default_rng(0)
    img, txt, pooled = (mx.array(a) for a in inputs(rng, 1))

    def four_images():
        for _ in range(BATCH):  # mflux generates one image at a time
            mx.eval(model(t=0, config=config, hidden_states=img, prompt_embeds=txt, pooled_prompt_embeds=pooled))

    result = median_time(four_images, runs)
    del model
    gc.collect()
    return result


def matmul_profile(model, forward_seconds):
    """Time the forward's matrix products alone (same shapes, same MLX), to split the forward's time into
    matmuls and everything else, and compare their speed with numpy's float32 matmul."""
    rows_img, rows_txt = BATCH * IMG_TOKENS, BATCH * TXT_TOKENS
    shapes = []  # (rows, in, out) of every Linear on the token path
    for block in model.transformer_blocks:
        for name, layer in tree_flatten(block.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Linear)):
            if "norm" in name:
                continue  # modulation linears act on one vector, not on tokens
            rows = rows_txt if ("add_" in name or "context" in name or "to_add_out" in name) else rows_img
            shapes.append((rows, layer.weight.shape[1], layer.weight.shape[0]))
    joint = rows_img + rows_txt
    for block in model.single_transformer_blocks:
        for name, layer in tree_flatten(block.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Linear)):
            if "norm" not in name:
                shapes.append((joint, layer.weight.shape[1], layer.weight.shape[0]))
    shapes += [(rows_img, 64, 3072), (TXT_TOKENS, 4096, 3072), (rows_img, 3072, 64)]
    flops = sum(2 * r * i * o for r, i, o in shapes)
    heads, dim = 24, 128
    seq = IMG_TOKENS + TXT_TOKENS
    attn_flops = (1 + 2) * BATCH * heads * 2 * (2 * seq * seq * dim)
    rng = np.random.default_rng(0)
    arrays = {s: (mx.array(rng.standard_normal((s[0], s[1])).astype(np.float32)),
                  mx.array(rng.standard_normal((s[1], s[2])).astype(np.float32))) for s in set(shapes)}
    mx.eval(list(arrays.values()))
    mm = median_time(lambda: mx.eval([arrays[s][0] @ arrays[s][1] for s in shapes]), 3)
    a = rng.standard_normal((2048, 3072)).astype(np.float32)
    b = rng.standard_normal((3072, 3072)).astype(np.float32)
    np_time = median_time(lambda: a @ b, 5)
    return dict(matmul_seconds=mm, matmul_share=mm / forward_seconds, matmul_gflops=flops / mm / 1e9,
                forward_gflops=(flops + attn_flops) / forward_seconds / 1e9,
                numpy_gflops=2 * 2048 * 3072 * 3072 / np_time / 1e9)


def weight_bytes():
    """Exact bytes of full FLUX.1's transformer weights per precision (shapes only; nothing is computed)."""
    model = FluxTransformer(FULL)
    out = {}
    params = tree_flatten(model.parameters())
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.shape[1] % 64 == 0}
    total = sum(v.size for _, v in params)
    out["params"] = total
    out["float32"] = 4 * total
    out["bf16"] = 2 * total
    for bits in (8, 4):
        b = 0
        for name, v in params:
            layer, _, kind = name.rpartition(".")
            if kind == "weight" and layer in linears:
                b += v.size * bits // 8 + 2 * 2 * v.size // 64  # packed weights + bf16 scale and bias per group
            else:
                b += 2 * v.size
        out[f"{bits}bit"] = b
    return out


def step_cost(txt_tokens: int = 256, side: int = 1024) -> tuple:
    """FLOPs and weight bytes (bf16) of one transformer step of full FLUX.1 for one image, counted from
    the model's own layer shapes: every Linear on the token path plus attention (QK^T and AV)."""
    model = FluxTransformer(FULL)
    img = (side // 16) ** 2
    flops = 0
    for block in model.transformer_blocks:
        for name, layer in tree_flatten(block.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Linear)):
            if "norm" not in name:
                text = "add_" in name or "context" in name
                flops += 2 * (txt_tokens if text else img) * layer.weight.size
    for block in model.single_transformer_blocks:
        for name, layer in tree_flatten(block.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Linear)):
            if "norm" not in name:
                flops += 2 * (txt_tokens + img) * layer.weight.size
    seq = img + txt_tokens
    flops += (len(model.transformer_blocks) + len(model.single_transformer_blocks)) * 4 * seq * seq * 3072
    return flops, 2 * sum(v.size for _, v in tree_flatten(model.parameters()))


def activation_peak(batch: int = 1):
    """Peak memory of a forward at full width and 1024x1024 (4096 image tokens + 512 text tokens) with one
    block of each kind, minus its weights: the activation peak, which does not grow with depth (blocks
    run one after the other). float32 on the CPU; bf16 halves it."""
    model = FluxTransformer(dict(BENCH, num_single_layers=1))
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rng = np.random.default_rng(0)
    img = mx.array(rng.standard_normal((batch, 4096, 64)).astype(np.float32))
    txt = mx.array(rng.standard_normal((1, TXT_TOKENS, 4096)).astype(np.float32))
    pooled = mx.array(rng.standard_normal((1, 768)).astype(np.float32))
    pe = model.pos_embed(mx.zeros((TXT_TOKENS, 3)), sampling.image_ids(64, 64))
    mx.eval(pe)
    # Measure the path a Mac runs: MLX's fused attention (the engine's CPU-only written-out softmax
    # holds its scores two or three times over). On the CPU the fused call still materialises the
    # (heads, S, S) scores once; Metal's kernel never does, so they are reported apart.
    cpu_attention, flux.attention = flux.attention, (
        lambda q, k, v, scale: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
    try:
        mx.reset_peak_memory()
        vec = model.conditioning(mx.array([0.5]), pooled, mx.array([3.5]))
        mx.eval(model(img, txt, vec, pe))
        peak = mx.get_peak_memory() - weights
    finally:
        flux.attention = cpu_attention
    scores = batch * 24 * (4096 + TXT_TOKENS) ** 2 * 4
    return peak, scores


FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def vae_decode_peak(side: int = 512) -> float:
    """Peak bytes above the weights of FLUX.1's VAE decoding one image at `side` px, float32 on the CPU."""
    from mlx_crepulse.models.autoencoder import AutoencoderKL
    vae = AutoencoderKL(FLUX_VAE)
    mx.eval(vae.parameters())
    z = mx.random.normal((1, side // 8, side // 8, 16))
    mx.eval(z)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(vae.decode(z))
    return mx.get_peak_memory() - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    cpu.install()  # as the pipeline does on the CPU

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}")
    model, ours_plain, ours_rep, update = ours(args.runs)
    profile = matmul_profile(model, ours_plain)
    del model
    gc.collect()
    mflux = mflux_time(args.runs)
    diff = diffusers_time(args.runs)
    rows = [("mlx-crepulse, batch of 4", ours_plain), ("diffusers (torch CPU), batch of 4", diff),
            ("mflux, 4 x batch of 1", mflux)]
    print("\nOne transformer forward, per image (full width, 1 double + 2 single blocks, 256 px, float32)")
    print(f"{'':38s} {'s/image':>8s} {'vs ours':>8s}")
    for name, t in rows:
        print(f"{name:38s} {t / BATCH:8.3f} {t / ours_plain:8.2f}x")
    print(f"ours / mflux = {ours_plain / mflux:.2f}   ours / diffusers = {ours_plain / diff:.2f}")
    print(f"\nmatmuls: {profile['matmul_share']:.0%} of our forward, {profile['matmul_gflops']:.0f} GFLOP/s "
          f"(numpy float32 matmul: {profile['numpy_gflops']:.0f} GFLOP/s); whole forward "
          f"{profile['forward_gflops']:.0f} GFLOP/s of useful work")
    print(f"\nRepulsion (50 iterations, blocks 'all', batch of 4): the update alone takes {update:.3f} s, "
          f"{update / ours_plain:.1%} of a step ({ours_plain:.2f} s); a whole repelled step measured "
          f"{ours_rep:.2f} s ({ours_rep / ours_plain - 1:+.1%}: the hook needs the whole batch at every block, so "
          f"a repelled step also forgoes the CPU's two-stream split)")
    extra = max(update, ours_rep - ours_plain)  # the larger, so the overhead is not flattered by noise
    for name, steps in (("Flux-dev settings: 20 steps, repulsion in the first", 20),
                        ("schnell settings: 4 steps, repulsion in the first", 4)):
        print(f"  {name}: +{extra / (steps * ours_plain):.2%} of a whole generation")
    results = dict(ours=ours_plain, ours_repulsion=ours_rep, repulsion_update=update, diffusers=diff, mflux=mflux, **profile)
    if not args.skip_memory:
        w = weight_bytes()
        print(f"\nFull FLUX.1 transformer weights ({w['params'] / 1e9:.2f} B parameters):")
        for k in ("float32", "bf16", "8bit", "4bit"):
            print(f"  {k:8s} {w[k] / 2**30:6.2f} GiB  ({w[k] / w['bf16']:.2f}x bf16)")
        peak, scores = activation_peak(1)
        act_bf16 = (peak - scores) / 2 * BATCH
        print(f"Activation peak at 1024x1024, batch 1, float32, CPU: {peak / 2**30:.2f} GiB "
              f"(of which {scores / 2**30:.2f} GiB attention scores that Metal's fused attention never holds)")
        clip_bf16 = 123_060_480 * 2  # CLIP-L's text model in bf16; T5 is freed in the low-memory mode
        # the low-memory mode decodes in tiles of 32 latent pixels (256 px): the VAE's peak is one tile's
        vae_tile = vae_decode_peak(256) / 2
        total = w["4bit"] + clip_bf16 + max(act_bf16, vae_tile)
        print(f"VAE decode, one 256x256 tile (the low-memory mode's tiled decode): "
              f"{2 * vae_tile / 2**30:.2f} GiB float32 on the CPU (measured) -> {vae_tile / 2**30:.2f} GiB bf16")
        print(f"FLUX.1-schnell, 4 bits, batch of 4, 1024x1024, low-memory mode (T5 freed after encoding, tiled "
              f"VAE): {w['4bit'] / 2**30:.2f} GiB weights + CLIP {clip_bf16 / 2**30:.2f} GiB + the larger of the "
              f"transformer's activations ({act_bf16 / 2**30:.2f} GiB, bf16, batch of 4) and the VAE tile "
              f"({vae_tile / 2**30:.2f} GiB), which never coexist = {total / 2**30:.2f} GiB peak")
        results.update(weights=w, activation_peak_cpu=peak, schnell_4bit_peak=total)
    flops, wbytes = step_cost()
    mflux_m4max = 7.5  # s per step, FLUX.1-schnell bf16 1024x1024, mflux's published figure on an M4 Max
    print(f"\nThe Mac on paper: one schnell step at 1024x1024 is {flops / 1e12:.1f} TFLOP per image and reads "
          f"{wbytes / 2**30:.1f} GiB of bf16 weights (once per batch). mflux's 7.5 s/step on an M4 Max is "
          f"{flops / mflux_m4max / 1e12:.1f} TFLOP/s achieved. Apple's published GPU figures give these lower "
          f"bounds per image and step (compute: FLOPs / peak; weights: bytes / bandwidth, shared by a batch):")
    for chip, tflops, gbs in CHIPS:
        print(f"  {chip:9s} {tflops:5.1f} TFLOP/s {gbs:4d} GB/s: compute {flops / (tflops * 1e12):5.1f} s, "
              f"weights {wbytes / (gbs * 1e9):4.2f} s")
    print("  Compute-bound everywhere: a step costs FLOPs, which batching does not reduce per image. On Metal our "
          "forward is mflux's math through the same MLX kernels (fused attention, MLX's GELU; the CPU-only "
          "speed-ups above do not apply), so expect mflux's per-image time there.")
    results.update(step_tflop=flops / 1e12)
    print("\n" + json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=None))


if __name__ == "__main__":
    main()
