"""What a generation needs beyond the weights, estimated before any work: the peak memory of a step.

A denoising step's peak is the attention of the joint sequence where the backend materialises its
scores (the CPU: about three float32 arrays of batch x heads x S x S alive at once, S the text plus image
tokens; Metal's fused attention works in tiles and keeps none) and the hidden states of the batch
(about forty arrays of batch x S x width). The batch is 2n with true CFG. The VAE decodes one image at
a time; its peak is a few full-resolution feature maps and, where the VAE's middle block attends, its
scores over the latent pixels. docs/performance.md compares the estimate with measured peaks.
"""

import os
import subprocess
import sys
from dataclasses import replace

from .recipe import RecipeError

GiB = 1 << 30
SCORE_COPIES = 3  # score arrays alive at once in the CPU's attention (scores, exp numerators, one in flight)
HIDDEN_COPIES = 40  # hidden-state-sized arrays alive in a step (residuals, q, k, v, the MLP's 4x-wide input, edits)
FEATURE_COPIES = 6  # full-resolution feature maps alive in a VAE up-block


class TooLarge(RecipeError):
    """The generation asked for cannot fit in this machine's memory; the message says what would."""


def physical_memory() -> int:
    """Bytes of memory of this machine (hw.memsize on macOS, the physical pages elsewhere)."""
    if sys.platform == "darwin":
        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=True).stdout)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def step_bytes(configs: dict, recipe, scores_materialised: bool) -> int:
    """Peak bytes of one denoising step of a resolved recipe beyond the weights."""
    tf, vae = configs["transformer"], configs["vae"]
    scale = 2 ** len(vae["block_out_channels"])  # image pixels per token side: the VAE's, then 2x2 patches
    tokens = (recipe.width // scale) * (recipe.height // scale) + recipe.max_sequence_length
    batch = recipe.n * (2 if recipe.true_cfg > 1 else 1)
    width = tf["num_attention_heads"] * tf["attention_head_dim"]
    hidden = HIDDEN_COPIES * batch * tokens * width * 4
    scores = SCORE_COPIES * batch * tf["num_attention_heads"] * tokens * tokens * 4 if scores_materialised else 0
    return hidden + scores


def decode_bytes(configs: dict, recipe) -> int:
    """Peak bytes of decoding one image (the VAE decodes a batch one image at a time)."""
    vae = configs["vae"]
    pixels = recipe.width * recipe.height
    maps = FEATURE_COPIES * vae["block_out_channels"][0] * pixels * 4
    latent_pixels = pixels // 4 ** (len(vae["block_out_channels"]) - 1)
    attention = 2 * latent_pixels ** 2 * 4 if vae.get("mid_block_add_attention", True) else 0
    return maps + attention


def peak_bytes(configs: dict, recipe, scores_materialised: bool) -> int:
    return max(step_bytes(configs, recipe, scores_materialised), decode_bytes(configs, recipe))


def check(configs: dict, recipe, weights_bytes: int, scores_materialised: bool, available=None):
    """Raise TooLarge when the recipe's peak does not fit beside the weights in this machine's memory,
    naming the numbers and the largest size (and batch) that would fit."""
    total = physical_memory() if available is None else available
    room = total - weights_bytes - max(2 * GiB, total // 8)  # the system keeps its share
    need = peak_bytes(configs, recipe, scores_materialised)
    if need <= room:
        return
    fits = _largest_fitting(configs, recipe, room, scores_materialised)
    hint = (f"the largest that fits is {fits.width}x{fits.height} with n={fits.n}" if fits is not None else
            "nothing this size fits; use a smaller model or quantize it")
    raise TooLarge(f"{recipe.width}x{recipe.height} with n={recipe.n} needs about {need / GiB:.1f} GiB for a step "
                   f"beside {weights_bytes / GiB:.1f} GiB of weights, and this machine has {total / GiB:.0f} GiB: "
                   f"{hint} (or pass --force / force=True to try anyway)")


def _largest_fitting(configs, recipe, room, scores_materialised):
    """The same aspect at the largest multiple of 16 that fits with this n, else the largest n at the
    model's size; None when neither fits."""
    aspect = recipe.height / recipe.width
    for width in range(recipe.width - 16, 15, -16):
        height = max(16, int(round(width * aspect / 16)) * 16)
        smaller = replace(recipe, width=width, height=height)
        if peak_bytes(configs, smaller, scores_materialised) <= room:
            return smaller
    for n in range(recipe.n - 1, 0, -1):
        fewer = replace(recipe, n=n, method=None, blend=None)
        if peak_bytes(configs, fewer, scores_materialised) <= room:
            return fewer
    return None
