"""The FLUX VAE (diffusers `AutoencoderKL`) in MLX, NHWC.

Parameter names equal diffusers' safetensors keys; `sanitize` only turns conv weights from torch's
OIHW into MLX's OHWI. `encode` takes images in [-1, 1] and returns the latent mean (or a sample for
given noise); `decode` takes raw latents: scaling and shifting are the pipeline's business, it
reads them from `scaling_factor` and `shift_factor`.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, from_config

EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet_eps and conv_norm_out eps to 1e-6


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS, pytorch_compatible=True)


class ResnetBlock2D(nn.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x):
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class Attention(nn.Module):
    """diffusers' Attention as the VAE mid block builds it: group norm, one head over all channels
    (attention_head_dim defaults to the channel count), residual, rescale factor 1."""

    def __init__(self, groups: int, channels: int):
        super().__init__()
        self.group_norm = group_norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]  # to_out.1 is dropout in diffusers

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        out = mx.fast.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h), scale=C**-0.5)
        return x + self.to_out[0](out).reshape(B, H, W, C)


class UNetMidBlock2D(nn.Module):
    def __init__(self, groups: int, channels: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(groups, channels, channels) for _ in range(2)]
        self.attentions = [Attention(groups, channels)] if add_attention else []

    def __call__(self, x):
        x = self.resnets[0](x)
        for i, resnet in enumerate(self.resnets[1:]):
            x = resnet(self.attentions[i](x) if self.attentions else x)
        return x


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x):
        # diffusers pads right and bottom only, then convolves with padding 0.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)  # nearest 2x
        return self.conv(x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int, layers: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(groups, c, out_channels) for c in [in_channels] + [out_channels] * (layers - 1)]
        if downsample:
            self.downsamplers = [Downsample2D(out_channels)]

    def __call__(self, x):
        for layer in self.resnets + self.get("downsamplers", []):
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int, layers: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(groups, c, out_channels) for c in [in_channels] + [out_channels] * (layers - 1)]
        if upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x):
        for layer in self.resnets + self.get("upsamplers", []):
            x = layer(x)
        return x


@dataclass(frozen=True)
class VAEParams:
    """diffusers' AutoencoderKL config. `scaling_factor` has no default: FLUX's (0.3611) and Stable
    Diffusion's (0.18215) differ, and a wrong one gives washed-out or burnt images, not an error."""
    block_out_channels: tuple
    layers_per_block: int
    latent_channels: int
    scaling_factor: float
    shift_factor: Optional[float] = None
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_config(cls, config: dict) -> "VAEParams":
        p = from_config(cls, config, ignored=("sample_size", "force_upcast", "latents_mean", "latents_std"))
        types = set(p.down_block_types) | set(p.up_block_types)
        if p.act_fn != "silu" or not types <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ConfigError(f"unsupported AutoencoderKL: act_fn {p.act_fn}, blocks {sorted(types)}")
        return p


class Encoder(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        ch, n, groups = p.block_out_channels, p.layers_per_block, p.norm_num_groups
        self.conv_in = nn.Conv2d(p.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(groups, ch[max(i - 1, 0)], ch[i], n, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = UNetMidBlock2D(groups, ch[-1], p.mid_block_add_attention)
        self.conv_norm_out = group_norm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * p.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        ch = list(p.block_out_channels)[::-1]  # deepest first, as diffusers builds the decoder
        n, groups = p.layers_per_block, p.norm_num_groups
        self.conv_in = nn.Conv2d(p.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(groups, ch[0], p.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(groups, ch[max(i - 1, 0)], ch[i], n + 1, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = group_norm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], p.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        p = self.params = VAEParams.from_config(config)
        self.config = dict(config)  # kept for saving; holds no arrays
        self.scaling_factor = float(p.scaling_factor)
        self.shift_factor = float(p.shift_factor or 0.0)
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)
        latent = p.latent_channels
        if p.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if p.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode_moments(self, x: mx.array):
        """NHWC images in [-1, 1] -> (mean, logvar) of the latent Gaussian, logvar clamped as diffusers does."""
        h = self.encoder(x)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def encode(self, x: mx.array, noise: mx.array | None = None) -> mx.array:
        """Latent mean, or mean + std * noise when noise (shaped like the mean) is given."""
        mean, logvar = self.encode_moments(x)
        return mean if noise is None else mean + mx.exp(0.5 * logvar) * noise

    def decode(self, z: mx.array) -> mx.array:
        """Raw (unscaled, unshifted) NHWC latents -> NHWC images, roughly in [-1, 1]."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_tiled(self, z: mx.array, tile: int = 32, overlap: float = 0.25) -> mx.array:
        """`decode` in overlapping tiles of `tile` latent pixels, blended linearly where they overlap, as
        diffusers' `AutoencoderKL.tiled_decode`: memory stays that of one tile whatever the image size
        (the low-memory mode's decode; seams are blended, the mid-block attention sees one tile)."""
        scale = 2 ** (len(self.config["block_out_channels"]) - 1)
        stride, extent = int(tile * (1 - overlap)), int(tile * scale * overlap)
        keep = tile * scale - extent
        rows = []
        for i in range(0, z.shape[1], stride):
            row = []
            for j in range(0, z.shape[2], stride):
                t = self.decode(z[:, i:i + tile, j:j + tile])
                if rows:  # blend the tile above into this one's top edge
                    t = _blend(rows[-1][len(row)], t, extent, axis=1)
                if row:  # and the tile on the left into its left edge
                    t = _blend(row[-1], t, extent, axis=2)
                mx.eval(t)
                row.append(t)
            rows.append(row)
        return mx.concatenate([mx.concatenate([t[:, :keep, :keep] for t in r], axis=2) for r in rows], axis=1)


def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """b with its first `extent` rows (axis 1) or columns (axis 2) faded in from a's last ones."""
    n = min(a.shape[axis], b.shape[axis], extent)
    if n == 0:
        return b
    w = (mx.arange(n, dtype=mx.float32) / n).reshape([-1 if d == axis else 1 for d in range(4)]).astype(b.dtype)
    head = [slice(None)] * 4
    tail = list(head)
    head[axis], tail[axis] = slice(0, n), slice(a.shape[axis] - n, a.shape[axis])
    mixed = a[tuple(tail)] * (1 - w) + b[tuple(head)] * w
    rest = [slice(None)] * 4
    rest[axis] = slice(n, None)
    return mx.concatenate([mixed, b[tuple(rest)]], axis=axis)


def sanitize(weights: dict) -> dict:
    """diffusers safetensors -> this model: conv kernels OIHW -> OHWI."""
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}


def unsanitize(weights: dict) -> dict:
    """This model -> diffusers layout: conv kernels OHWI -> OIHW."""
    return {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in weights.items()}
