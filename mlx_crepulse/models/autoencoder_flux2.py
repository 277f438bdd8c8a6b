"""The FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) in MLX, NHWC.

Its encoder and decoder are FLUX.1's (`autoencoder.py`, with 32 latent channels; the decoder's widths may
differ: `decoder_block_out_channels`). What is new sits between the VAE and the transformer: latents are
patched 2x2 into 128 channels (the same (C, 2, 2) order as FLUX.1's token packing) and normalised by a
BatchNorm's running statistics (`bn.running_mean`, `bn.running_var`, no affine) instead of FLUX.1's scale
and shift. `normalize` and `denormalize` act on packed tokens, whose channels are exactly the BatchNorm's.
"""

import math
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from .autoencoder import AutoencoderKL, Decoder, VAEParams
from .config import ConfigError
from .autoencoder import sanitize as _sanitize


class BatchNormStats(nn.Module):
    """The running statistics of diffusers' BatchNorm2d(affine=False); used only to (de)normalise."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def std(self):
        return mx.sqrt(self.running_var + self.eps)


FLUX2_KEYS = ("decoder_block_out_channels", "batch_norm_eps", "batch_norm_momentum", "patch_size")


def shared_config(config: dict) -> dict:
    """The part of an AutoencoderKLFlux2 config that is FLUX.1's AutoencoderKL's (checked by its VAEParams);
    FLUX.2 normalises by the BatchNorm, so its scale is 1."""
    patch = tuple(config.get("patch_size", (2, 2)))
    if patch != (2, 2):
        raise ConfigError(f"unsupported AutoencoderKLFlux2 patch_size {patch}: the transformer's tokens are 2x2")
    return {**{k: v for k, v in config.items() if k not in FLUX2_KEYS}, "scaling_factor": 1.0}


class AutoencoderKLFlux2(AutoencoderKL):
    @staticmethod
    def check_config(config: dict):
        """A ConfigError naming what this config lacks or has too much, before anything is built."""
        VAEParams.from_config(shared_config(config))

    def __init__(self, config: dict):
        super().__init__(shared_config(config))
        self.config = dict(config)  # kept for saving, as diffusers wrote it
        patch = (2, 2)
        if config.get("decoder_block_out_channels"):
            self.decoder = Decoder(replace(self.params, block_out_channels=tuple(config["decoder_block_out_channels"])))
        channels = math.prod(patch) * self.params.latent_channels
        self.bn = BatchNormStats(channels, float(config.get("batch_norm_eps", 1e-4)))

    def normalize(self, tokens: mx.array) -> mx.array:
        """Packed raw latents (B, S, 4 C) -> what the transformer sees (diffusers' _encode_vae_image)."""
        return (tokens - self.bn.running_mean) / self.bn.std()

    def denormalize(self, tokens: mx.array) -> mx.array:
        """The transformer's packed latents -> packed raw latents for `decode` (diffusers' __call__ end)."""
        return tokens * self.bn.std() + self.bn.running_mean


def sanitize(weights: dict) -> dict:
    """diffusers safetensors -> this model: conv kernels to OHWI; BatchNorm's step counter dropped."""
    return _sanitize({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")})
