"""Flow-matching sampling pieces: the sigma schedule, latent packing, position ids, noise.

The schedule follows diffusers' `FlowMatchEulerDiscreteScheduler` as `FluxPipeline` drives it:
sigmas = linspace(1, 1/n, n), optionally shifted by `mu` (linear in the image-token count), then 0.
"""

import math

import mlx.core as mx
import numpy as np


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def image_seq_mu(image_tokens: int, config: dict) -> float:
    """diffusers' `calculate_shift`: mu linear from base_shift at base_image_seq_len to max_shift at max."""
    x1, x2 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    y1, y2 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (y2 - y1) / (x2 - x1)
    return image_tokens * m + (y1 - m * x1)


def schedule(steps: int, image_tokens: int, config: dict) -> list:
    """Sigmas from 1 to 0 (steps + 1 values) for a scheduler config (scheduler_config.json)."""
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if config.get("use_dynamic_shifting", False):
        sigmas = time_shift(image_seq_mu(image_tokens, config), sigmas)
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [float(s) for s in np.asarray(sigmas, np.float32)] + [0.0]


def image_to_image_start(steps: int, strength: float) -> int:
    """The step image to image starts at: the last int(steps * strength) steps run (diffusers'
    FluxImg2ImgPipeline), so the image is noised to sigma[start] of the schedule."""
    return steps - min(int(steps * strength), steps)


def model_time(sigma: float) -> mx.array:
    """The timestep the transformer sees: diffusers passes (sigma * 1000) / 1000, rounded in float32."""
    return mx.array([sigma], mx.float32) * 1000 / 1000


def latent_grid(width: int, height: int, vae_scale: int) -> tuple:
    """(rows, cols) of 2x2 latent patches for an image size; both sizes must be multiples of 2 * vae_scale."""
    return height // (2 * vae_scale), width // (2 * vae_scale)


def pack(latents: mx.array) -> mx.array:
    """(B, h, w, C) NHWC latents -> (B, h/2 * w/2, C * 4) tokens, channel order (C, 2, 2) as diffusers."""
    B, h, w, C = latents.shape
    x = latents.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens: mx.array, rows: int, cols: int) -> mx.array:
    """Inverse of `pack`: (B, rows * cols, C * 4) -> (B, 2 rows, 2 cols, C)."""
    B, _, D = tokens.shape
    C = D // 4
    x = tokens.reshape(B, rows, cols, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, rows * 2, cols * 2, C)


def image_ids(rows: int, cols: int) -> mx.array:
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return mx.array(ids.reshape(rows * cols, 3))


def noise(seeds: list, tokens: int, channels: int) -> mx.array:
    """Packed initial noise, one independent stream per image seed, so image i of a batch has the same
    noise as the same seed alone."""
    return mx.stack([mx.random.normal((tokens, channels), key=mx.random.key(s)) for s in seeds])


def mix_noise(base, fresh, strength: float):
    """Noise near `base`: sqrt(1 - s^2) base + s fresh keeps unit variance (both are standard normal);
    strength 0 gives base, 1 gives fresh. For "vary subtly / strongly" around a favourite."""
    return (1 - strength ** 2) ** 0.5 * base + strength * fresh
