"""Train the embedded demo model: a small FLUX.1-architecture pipeline for the shapes grammar.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python -m scripts.train_demo --work build/demo_train --install

Everything is deterministic from `--seed` (the skeleton's random init in torch, every batch, every
timestep and every noise drawn from numpy generators keyed by (seed, stage, step)); a run that stops
resumes from its last checkpoint (`--work` keeps them) and ends with the same weights.

Stages, each skipped when its output is already in the work folder:
1. skeleton: tokenizers (scripts/make_tokenizers.py) and a pipeline folder written by diffusers'
   `FluxPipeline.save_pretrained` at the demo's sizes, with torch's random init (torch is used for
   nothing else). Its CLIP and T5 stay as they are (random, frozen): the prompts of the grammar give
   distinct encodings, and the transformer learns to read them.
2. VAE (MLX): reconstruction (L1 + MSE) + a small KL on every image of the grammar (1,440 of them);
   then FLUX's latent normalisation from the latent statistics: shift = mean, scale = 1 / std.
3. transformer (MLX): rectified flow as FLUX trains it (x_t = (1 - t) x0 + t noise, the model predicts
   noise - x0), timesteps uniform on [0, 1] (stratified), each image's caption drawn as the data set
   draws it (an atypical free attribute named 30% of the time: shapes.NAMING_PROBABILITY), the caption
   dropped to "" 15% of the time so true classifier-free guidance works; diffusers' own initialisation,
   AdamW (2e-3) with warmup and cosine decay, gradient clipping, EMA. 4,200 steps at 0.93 steps/s here
   (with the 9 progress checks; the forward split over two streams, one_blas_thread), 75 minutes; the
   VAE takes 11.5, so about 88 in all, inside the 90 the demo is allowed. On captions without naming,
   1,500 steps of the previous recipe (adaLN-Zero, 1e-3) reached 43% prompt fidelity, 2,500 steps of this
   one 85%, 3,500 steps 92%; with naming, 98%. 4,200 steps instead of 3,500 halved the fidelity that
   repulsion costs (the pictures it moves to are the ones the model learns last; README).
   MLX's CPU build computes exp and tanh slowly, so during training only (VAE and transformer), the
   tanh GELU and SiLU run through a rational approximation of tanh accurate to 4e-7, several times
   faster (the shipped model is run by the engine's own activations).
4. write: the trained weights back into the folder with the Hugging Face key names (the loaders'
   `unsanitize`), the loss curve (JSON and PNG) and the log; with --install, the folder is copied to
   mlx_crepulse/demo_model/ with crepulse.json (DEFAULTS below, chosen with scripts/why_demo.py steps).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlx_crepulse import sampling, weights  # noqa: E402
from mlx_crepulse.models import autoencoder, clip, t5  # noqa: E402
from mlx_crepulse import cpu  # noqa: E402
from mlx_crepulse.cpu import one_blas_thread  # noqa: E402
from mlx_crepulse.models.flux import FluxTransformer  # noqa: E402
from scripts import shapes  # noqa: E402

SIZE = shapes.SIZE  # 32 pixels
# T5 tokens: the small unigram T5 tokenizer splits some words into letters ("large" -> la r g e), so the
# longest caption, "a large purple diamond at bottom right on pale blue", takes 20 with </s>
SEQ = 20
LATENT_CHANNELS = 4
VAE_SCALE = 2
ROWS = COLS = SIZE // (2 * VAE_SCALE)  # 8 x 8 = 64 image tokens of 4 x 2 x 2 = 16 channels
PACKED = LATENT_CHANNELS * 4
PACKAGE_DEMO = ROOT / "mlx_crepulse" / "demo_model"
DOCS = ROOT / "docs" / "demo_model"

CONFIG = {
    "transformer": dict(patch_size=1, in_channels=PACKED, num_layers=2, num_single_layers=2, attention_head_dim=32,
                        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                        guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 16),
                layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=SIZE),
    "clip": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64),
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False),
}


def log(msg: str, path: Path | None = None):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------------------------
# 1. skeleton (torch writes the folder; nothing is trained in torch)
# ------------------------------------------------------------------------------------------------

def build_skeleton(folder: Path, seed: int) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from scripts.make_tokenizers import write_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizers(folder, clip_vocab_size=1000, t5_vocab_size=1000)
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    tok2 = AutoTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    torch.manual_seed(seed)
    clip_model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                              **CONFIG["clip"]))
    t5_model = T5EncoderModel(T5Config(vocab_size=len(tok2), **CONFIG["t5"]))
    transformer = FluxTransformer2DModel(**CONFIG["transformer"])
    vae = AutoencoderKL(**CONFIG["vae"], scaling_factor=1.0, shift_factor=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_model, tokenizer=tok,
                        text_encoder_2=t5_model, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_component(folder: Path, name: str):
    cls, sanitize = {"transformer": (FluxTransformer, None),
                     "vae": (autoencoder.AutoencoderKL, autoencoder.sanitize),
                     "text_encoder": (clip.CLIPTextModel, clip.sanitize),
                     "text_encoder_2": (t5.T5Encoder, t5.sanitize)}[name]
    config = weights.read_json(folder / name / "config.json")
    return weights.load_into(cls(config), folder / name, sanitize)


# ------------------------------------------------------------------------------------------------
# data: the grammar is finite, 1,440 images; batches are drawn from its skewed distribution
# ------------------------------------------------------------------------------------------------

def grammar():
    combos = shapes.all_attribute_combinations()
    index = {tuple(a[k] for k in shapes.ALL_ATTRIBUTES): i for i, a in enumerate(combos)}
    images = np.stack([shapes.render(**a) for a in combos])
    return combos, index, images


def to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------
# fast tanh GELU for training (MLX's CPU tanh is slow)
# ------------------------------------------------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)


_tanh = cpu.tanh  # the engine's own rational tanh (Eigen's)


def _gelu_fwd(x):
    return 0.5 * x * (1 + _tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_bwd(x, g):
    th = _tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return g * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x))


_gelu_fwd_c, _gelu_bwd_c = mx.compile(_gelu_fwd), mx.compile(_gelu_bwd)


@mx.custom_function
def fast_gelu_approx(x):
    return _gelu_fwd_c(x)


@fast_gelu_approx.vjp
def _fast_gelu_vjp(x, cotangent, output):
    return _gelu_bwd_c(x, cotangent)


def _silu_fwd(x):
    return x * (0.5 + 0.5 * _tanh(0.5 * x))


def _silu_bwd(x, g):
    s = 0.5 + 0.5 * _tanh(0.5 * x)
    return g * (s + x * s * (1 - s))


_silu_fwd_c, _silu_bwd_c = mx.compile(_silu_fwd), mx.compile(_silu_bwd)


@mx.custom_function
def fast_silu(x):
    return _silu_fwd_c(x)


@fast_silu.vjp
def _fast_silu_vjp(x, cotangent, output):
    return _silu_bwd_c(x, cotangent)


REAL_ACTIVATIONS = {"gelu_approx": nn.gelu_approx, "silu": nn.silu}


@contextmanager
def fast_activations():
    """The engine's models call `mlx.nn.gelu_approx` and `mlx.nn.silu` at run time; while training,
    they run as the rational forms above (same functions to float32 precision, several times faster
    on MLX's CPU build). Leaving the block restores MLX's own."""
    nn.gelu_approx, nn.silu = fast_gelu_approx, fast_silu
    try:
        yield
    finally:
        nn.gelu_approx, nn.silu = REAL_ACTIVATIONS["gelu_approx"], REAL_ACTIVATIONS["silu"]


@contextmanager
def real_activations():
    saved = nn.gelu_approx, nn.silu
    nn.gelu_approx, nn.silu = REAL_ACTIVATIONS["gelu_approx"], REAL_ACTIVATIONS["silu"]
    try:
        yield
    finally:
        nn.gelu_approx, nn.silu = saved


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, arrays: dict, meta: dict):
    tmp = path.with_suffix(".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_checkpoint(path: Path):
    if not path.exists() or not path.with_suffix(".json").exists():
        return None, None
    return mx.load(str(path)), json.loads(path.with_suffix(".json").read_text())


def split_prefix(arrays: dict, prefix: str) -> list:
    return [(k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix)]


def lr_schedule(lr: float, warmup: int, steps: int, final: float = 0.05):
    return optim.join_schedules([optim.linear_schedule(lr * 1e-2, lr, warmup),
                                 optim.cosine_decay(lr, max(steps - warmup, 1), lr * final)], [warmup])


def restore_optimizer(opt, model, arrays):
    opt.init(model.trainable_parameters())
    saved = split_prefix(arrays, "opt.")
    if saved:
        opt.state = tree_unflatten(saved)


# ------------------------------------------------------------------------------------------------
# 2. VAE
# ------------------------------------------------------------------------------------------------

def train_vae(vae, images: np.ndarray, steps: int, seed: int, work: Path, logfile: Path, batch: int = 16,
              lr: float = 2e-3, kl_weight: float = 1e-4):
    ckpt = work / "vae_ckpt.safetensors"
    x_all = to_unit(images)
    opt = optim.AdamW(learning_rate=lr_schedule(lr, 100, steps), betas=[0.9, 0.99], weight_decay=0.0)
    arrays, meta = load_checkpoint(ckpt)
    start, losses = 0, []
    if arrays is not None:
        vae.load_weights(split_prefix(arrays, "model."))
        restore_optimizer(opt, vae, arrays)
        start, losses = meta["step"], meta["losses"]
        log(f"vae: resumed at step {start}", logfile)
    if start >= steps:
        return losses

    def loss_fn(model, x, eps):
        mean, logvar = model.encode_moments(x)
        z = mean + mx.exp(0.5 * logvar) * eps
        r = model.decode(z)
        rec = mx.abs(r - x).mean() + ((r - x) ** 2).mean()
        kl = 0.5 * (mean * mean + mx.exp(logvar) - 1 - logvar).mean()
        return rec + kl_weight * kl, (rec, kl)

    grad_fn = nn.value_and_grad(vae, lambda m, x, e: loss_fn(m, x, e)[0])
    t0, window = time.time(), []
    with fast_activations():
        for step in range(start, steps):
            rng = np.random.default_rng([seed, 1, step])
            idx = rng.choice(len(x_all), batch, replace=False)
            x = mx.array(x_all[idx])
            eps = mx.array(rng.standard_normal((batch, SIZE // VAE_SCALE, SIZE // VAE_SCALE, LATENT_CHANNELS),
                                               dtype=np.float32))
            loss, grads = grad_fn(vae, x, eps)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(vae, grads)
            mx.eval(vae.parameters(), opt.state, loss)
            losses.append(float(loss))
            window.append(float(loss))
            if (step + 1) % 25 == 0 or step + 1 == steps:
                rate = (step + 1 - start) / (time.time() - t0)
                log(f"vae step {step + 1}/{steps} loss {np.mean(window):.5f} ({rate:.2f} steps/s)", logfile)
                window = []
            if (step + 1) % 200 == 0 or step + 1 == steps:
                arrays = {f"model.{k}": v for k, v in tree_flatten(vae.parameters())}
                arrays.update({f"opt.{k}": v for k, v in tree_flatten(opt.state)})
                save_checkpoint(ckpt, arrays, {"step": step + 1, "losses": losses})
    return losses


def encode_all(vae, images: np.ndarray, batch: int = 160):
    means, stds = [], []
    for i in range(0, len(images), batch):
        m, lv = vae.encode_moments(mx.array(to_unit(images[i:i + batch])))
        means.append(np.array(m))
        stds.append(np.array(mx.exp(0.5 * lv)))
    return np.concatenate(means), np.concatenate(stds)


def decode_all(vae, latents: np.ndarray, batch: int = 160) -> np.ndarray:
    out = []
    for i in range(0, len(latents), batch):
        r = vae.decode(mx.array(latents[i:i + batch]))
        out.append(np.array(mx.clip(r / 2 + 0.5, 0, 1)))
    return np.concatenate(out)


def oracle_agreement(images: np.ndarray, combos: list) -> dict:
    """Share of images whose every attribute the oracle reads right, and share read clean."""
    right = clean = 0
    for img, a in zip(images, combos):
        r = shapes.read(img)
        right += all(r[k] == a[k] for k in shapes.ALL_ATTRIBUTES)
        clean += r["clean"]
    return {"attributes_right": right / len(images), "clean": clean / len(images)}


# ------------------------------------------------------------------------------------------------
# 3. transformer
# ------------------------------------------------------------------------------------------------

def encode_prompts(folder: Path, texts: list):
    """(T5 states (P, SEQ, 64), CLIP pooled (P, 64)) exactly as the pipeline encodes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    tok2 = AutoTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    clip_model, t5_model = load_component(folder, "text_encoder"), load_component(folder, "text_encoder_2")
    clip_ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="np").input_ids
    t5_ids = tok2(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np").input_ids
    txt = t5_model(mx.array(t5_ids))
    pooled = clip_model(mx.array(clip_ids))[1]
    mx.eval(txt, pooled)
    return txt, pooled


def adaln_zero(tf):
    """DiT's adaLN-Zero initialisation: every modulation (shift, scale, gate) and the output projection
    start at zero, so each block starts as the identity and the model as v = 0. Same architecture,
    same parameter names; only the starting point differs from diffusers' default init."""
    zero = []
    for name, module in tf.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")) or name == "proj_out":
            zero += [(f"{name}.weight", mx.zeros_like(module.weight)), (f"{name}.bias", mx.zeros_like(module.bias))]
    tf.load_weights(zero, strict=False)
    return len(zero) // 2


def sample_timesteps(rng, batch: int, kind: str) -> np.ndarray:
    """Training timesteps: "uniform" (stratified on [0, 1]), or "mixed": half uniform, half logit-normal
    (SD3's, concentrated on the middle where shapes form) so the ends stay trained."""
    u = (rng.permutation(batch) + rng.random(batch)) / batch
    if kind == "mixed":
        ln = 1 / (1 + np.exp(-rng.standard_normal(batch)))
        u = np.where(np.arange(batch) % 2 == 0, u, ln)
    return u.astype(np.float32)


def train_transformer(tf, packed_mean: np.ndarray, packed_std: np.ndarray, prompt_index: dict,
                      index: dict, txt_all: mx.array, pooled_all: mx.array, steps: int, seed: int, work: Path,
                      logfile: Path, batch: int = 64, lr: float = 2e-3, p_uncond: float = 0.15,
                      ema_decay: float = 0.995, init: str = "diffusers", timesteps: str = "uniform",
                      on_checkpoint=None, checkpoint_every: int = 100, eval_every: int = 500):
    cpu.install()  # the CPU's kernels in the transformer, as the pipeline uses them
    ckpt = work / "transformer_ckpt.safetensors"
    uncond = txt_all.shape[0] - 1  # the last prompt is ""
    pe = tf.pos_embed(mx.zeros((SEQ, 3)), sampling.image_ids(ROWS, COLS))
    opt = optim.AdamW(learning_rate=lr_schedule(lr, 100, steps), betas=[0.9, 0.99], weight_decay=0.01)
    arrays, meta = load_checkpoint(ckpt)
    start, losses, evals = 0, [], []
    if arrays is not None:
        tf.load_weights(split_prefix(arrays, "model."))
        restore_optimizer(opt, tf, arrays)
        ema = dict(split_prefix(arrays, "ema."))
        start, losses, evals = meta["step"], meta["losses"], meta.get("evals", [])
        log(f"transformer: resumed at step {start}", logfile)
    else:
        if init == "zero":
            log(f"transformer: adaLN-Zero init ({adaln_zero(tf)} layers zeroed)", logfile)
        opt.init(tf.trainable_parameters())
        ema = {k: mx.array(v) for k, v in tree_flatten(tf.parameters())}
    mx.eval(tf.parameters(), opt.state)
    if start >= steps:
        return losses, ema, evals

    def loss_fn(model, x0, txt, pooled, t, noise):
        tt = t[:, None, None]
        xt = (1 - tt) * x0 + tt * noise
        v = cpu.forward(model, xt, txt, model.conditioning(t, pooled), pe)
        return ((v - (noise - x0)) ** 2).mean()

    grad_fn = nn.value_and_grad(tf, loss_fn)
    state = [tf.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x0, txt, pooled, t, noise):
        loss, grads = grad_fn(tf, x0, txt, pooled, t, noise)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(tf, grads)
        return loss

    t0, window = time.time(), []
    # one OpenBLAS thread per stream for the whole stage, so the forward's two-stream split stays lazy
    # under mx.grad and mx.compile: 1.28 steps/s against 0.79 with the batch on one stream, measured
    # side by side (75 steps, same losses to 5 digits)
    with fast_activations(), one_blas_thread():
        for step in range(start, steps):
            rng = np.random.default_rng([seed, 2, step])
            attrs, captions = shapes.sample_captions(rng, batch)
            ci = np.array([index[tuple(a[k] for k in shapes.ALL_ATTRIBUTES)] for a in attrs])
            pi = np.where(rng.random(batch) < p_uncond, uncond, [prompt_index[c] for c in captions])
            eps = rng.standard_normal((batch, ROWS * COLS, PACKED), dtype=np.float32)
            x0 = mx.array(packed_mean[ci] + packed_std[ci] * eps)
            t = mx.array(sample_timesteps(rng, batch, timesteps))
            noise = mx.array(rng.standard_normal((batch, ROWS * COLS, PACKED), dtype=np.float32))
            idx = mx.array(pi)
            loss = train_step(x0, txt_all[idx], pooled_all[idx], t, noise)
            d = min(ema_decay, (1 + step) / (10 + step))
            params = dict(tree_flatten(tf.parameters()))
            ema = {k: d * ema[k] + (1 - d) * params[k] for k in ema}
            mx.eval(state, loss, ema)
            losses.append(float(loss))
            window.append(float(loss))
            if (step + 1) % 25 == 0 or step + 1 == steps:
                rate = (step + 1 - start) / (time.time() - t0)
                log(f"transformer step {step + 1}/{steps} loss {np.mean(window):.5f} ({rate:.2f} steps/s, "
                    f"{(steps - step - 1) / max(rate, 1e-9) / 60:.1f} min left)", logfile)
                window = []
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                if on_checkpoint is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                    evals.append({"step": step + 1, **on_checkpoint(step + 1, ema)})
                arrays = {f"model.{k}": v for k, v in tree_flatten(tf.parameters())}
                arrays.update({f"opt.{k}": v for k, v in tree_flatten(opt.state)})
                arrays.update({f"ema.{k}": v for k, v in ema.items()})
                save_checkpoint(ckpt, arrays, {"step": step + 1, "losses": losses, "evals": evals})
    return losses, ema, evals


# ------------------------------------------------------------------------------------------------
# 4. writing
# ------------------------------------------------------------------------------------------------

def plot_curves(curves: dict, path: Path, smooth: int = 25):
    """A log-scale loss plot per curve, side by side, drawn with PIL (no matplotlib here)."""
    from PIL import Image, ImageDraw

    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, ys) in enumerate(curves.items()):
        ys = np.asarray(ys, np.float64)
        if len(ys) >= smooth:
            ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
        ly = np.log10(np.maximum(ys, 1e-8))
        lo, hi = float(ly.min()), float(ly.max())
        hi = hi if hi > lo else lo + 1
        x0, x1, y0, y1 = k * w + pad, (k + 1) * w - 10, 20, h - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        pts = [(x0 + (x1 - x0) * i / max(len(ly) - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
               for i, v in enumerate(ly)]
        draw.line(pts, fill=(30, 70, 220), width=1)
        draw.text((x0 + 5, 4), f"{name} loss (log scale, mean of {smooth})", fill="black")
        draw.text((x0 - 36, y0), f"{10 ** hi:.3g}", fill="black")
        draw.text((x0 - 36, y1 - 10), f"{10 ** lo:.3g}", fill="black")
        draw.text((x0, y1 + 5), "0", fill="black")
        draw.text((x1 - 40, y1 + 5), f"{len(ys) + smooth - 1} steps", fill="black")
    img.save(path)


def write_weights(folder: Path, tf, vae, shift: float, scale: float):
    weights.save_component(tf, tf.config, folder / "transformer")
    config = dict(vae.config, shift_factor=shift, scaling_factor=scale)
    weights.save_component(vae, config, folder / "vae", autoencoder.unsanitize)
    (folder / "crepulse.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")


# The demo's own defaults (crepulse.json), chosen by measuring the trained model on seeds that
# scripts/evaluate.py does not use (800000 on; README, "Results on the demo model"): true CFG 4; repulsion
# in the first 3 of the 12 steps at 3.5e3..1.4e4, so that --diversity 0.5 is 7e3. On 96 batches of those
# seeds it gave +13% Vendi for 1.0 point of fidelity and 1.0 of cleanliness at 3.5e3, +23% for 1.3 and 3.9
# at 7e3, +45% for 5.2 and 16 at 1.4e4. Repelling the first step only (the paper's Flux-dev setting and this
# model's previous default) cost about twice that for the same diversity: 3.5e4 +26% for 3.6
# points and 9.4 of cleanliness. The paper repels 4 of 28 steps on SD3.5-Large, its true-CFG model.
DEFAULTS = {
    "width": SIZE, "height": SIZE, "max_sequence_length": SEQ,
    "steps": 12,
    "guidance": None,  # no guidance embedding: true classifier-free guidance against the empty prompt
    "true_cfg": 4.0,
    "negative_prompt": "",
    "repulsion_scale_range": [3.5e3, 1.4e4],
    "repulsion_iterations": 50,
    "repulsion_steps": 3,
    # the only words its captions use: the CLI and the app name the others when a prompt has them
    "vocabulary": sorted({w for c in shapes.all_captions() for w in c.split()}),
    "example_prompt": "a small red circle at top left on black",
}

SHIPPED = ("model_index.json", "crepulse.json", "scheduler", "tokenizer", "tokenizer_2", "text_encoder",
           "text_encoder_2", "transformer", "vae")


def install(folder: Path, target: Path = PACKAGE_DEMO):
    """Copy the pipeline folder (diffusers layout + crepulse.json, nothing else) into the package."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SHIPPED:
        src = folder / name
        if src.is_dir():
            shutil.copytree(src, target / name)
        else:
            shutil.copy2(src, target / name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return size


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "demo_train", help="work folder (checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=4200, help="transformer steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init", choices=("diffusers", "zero"), default="diffusers",
                   help="transformer init: diffusers' own (default) or adaLN-Zero (higher loss after 300 steps here)")
    p.add_argument("--timesteps", choices=("uniform", "mixed"), default="uniform")
    p.add_argument("--eval-every", type=int, default=500, help="quick fidelity check every N steps (0: never)")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE (to look at its reconstructions)")
    p.add_argument("--install", action="store_true", help="copy the result into mlx_crepulse/demo_model/")
    args = p.parse_args(argv)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "train.log"
    skeleton = work / "skeleton"  # diffusers' random init, never modified
    folder = work / "pipeline"  # the skeleton with the trained weights written into it
    started = time.time()
    log(f"train_demo: seed {args.seed}, work {work}, mlx {mx.__version__}", logfile)

    if not (skeleton / "model_index.json").exists():
        build_skeleton(skeleton, args.seed)
        log("skeleton written by diffusers", logfile)
    if not (folder / "model_index.json").exists():
        shutil.copytree(skeleton, folder)
    mx.random.seed(args.seed)
    combos, index, images = grammar()

    # --- VAE ---
    vae = load_component(skeleton, "vae")
    t = time.time()
    vae_losses = train_vae(vae, images, args.vae_steps, args.seed, work, logfile)
    log(f"vae trained ({time.time() - t:.0f} s this run), final loss {np.mean(vae_losses[-50:]):.5f}", logfile)
    mean, std = encode_all(vae, images)
    shift = float(mean.mean())
    scale = float(1.0 / mean.std())
    recon = decode_all(vae, mean)
    agree = oracle_agreement(recon, combos)
    log(f"vae latents: shift {shift:.4f} scale {scale:.4f}, posterior std {float(std.mean()):.4f}; "
        f"reconstructions: max abs error {np.abs(recon - images / 255.0).max():.3f}, oracle {agree}", logfile)
    shapes.contact_sheet((recon[::23] * 255).round().astype(np.uint8), columns=9).save(work / "vae_recon.png")
    shapes.contact_sheet(images[::23], columns=9).save(work / "vae_truth.png")

    if args.vae_only:
        return

    # --- transformer ---
    prompts = shapes.all_captions()
    txt_all, pooled_all = encode_prompts(skeleton, prompts + [""])
    prompt_index = {p: i for i, p in enumerate(prompts)}
    packed_mean = np.array(sampling.pack((mx.array(mean) - shift) * scale))
    packed_std = np.array(sampling.pack(mx.array(std) * scale))
    tf = load_component(skeleton, "transformer")

    def on_checkpoint(step, ema):
        from scripts import eval_demo
        live = dict(tree_flatten(tf.parameters()))
        tf.load_weights(list(ema.items()))
        write_weights(folder, tf, vae, shift, scale)
        tf.load_weights(list(live.items()))
        with real_activations():
            r = eval_demo.quick(folder)
        log(f"  eval at step {step} (EMA): {json.dumps(r)}", logfile)
        return r

    t = time.time()
    tf_losses, ema, evals = train_transformer(tf, packed_mean, packed_std, prompt_index, index, txt_all, pooled_all,
                                              args.steps, args.seed, work, logfile, batch=args.batch, lr=args.lr,
                                              init=args.init, timesteps=args.timesteps, on_checkpoint=on_checkpoint,
                                              eval_every=args.eval_every)
    log(f"transformer trained ({time.time() - t:.0f} s this run), final loss {np.mean(tf_losses[-100:]):.5f}",
        logfile)
    tf.load_weights(list(ema.items()))
    write_weights(folder, tf, vae, shift, scale)

    (work / "loss.json").write_text(json.dumps({"vae": vae_losses, "transformer": tf_losses, "evals": evals}))
    plot_curves({"VAE": vae_losses, "transformer (flow matching)": tf_losses}, work / "loss.png")
    log(f"done in {time.time() - started:.0f} s this run; folder {folder}", logfile)

    if args.install:
        size = install(folder)
        DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("loss.png", "train.log"):
            shutil.copy2(work / name, DOCS / name)
        log(f"installed into {PACKAGE_DEMO} ({size / 1e6:.2f} MB)", logfile)



if __name__ == "__main__":
    main()
