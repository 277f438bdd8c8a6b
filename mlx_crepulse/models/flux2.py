"""The FLUX.2 MM-DiT ([klein] 4B and 9B) in MLX.

Parameter names mirror diffusers' `Flux2Transformer2DModel`, so its safetensors load with no renaming.
What differs from FLUX.1 (`flux.py`, whose attention, RoPE and CPU paths are reused): no biases anywhere;
one modulation per stream computed once from the timestep and shared by every block (FLUX.1 has one per
block); SwiGLU MLPs; the single blocks' q, k, v and MLP input fused in one projection; RoPE over four
axes (time, row, column, text position) with theta 2000; no pooled text vector.

The sampler sees the same interface as FLUX.1's `FluxTransformer`: `conditioning`, `pos_embed`,
`__call__(img, txt, vec, pe, hook)` with `hook(kind, index, txt, img) -> (txt, img)` after each double
block ("double") and each single block ("single", the joint sequence split at the text length).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import flux
from .config import from_config
from .flux import Hook, apply_rope, gated, rope, timestep_embedding


def _linear(dim_in: int, dim_out: int) -> nn.Linear:
    return nn.Linear(dim_in, dim_out, bias=False)


def modulate(x, shift, scale, eps: float):
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def swiglu(x):
    """diffusers' Flux2SwiGLU: silu of the first half times the second half."""
    a, b = mx.split(x, 2, axis=-1)
    return nn.silu(a) * b


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = _linear(dim_in, dim), _linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    """diffusers' Flux2TimestepGuidanceEmbeddings: timestep (and, for guidance-distilled models, guidance)."""

    def __init__(self, channels: int, dim: int, guidance: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(channels, dim)

    def __call__(self, t, guidance=None, dtype=mx.float32):
        vec = self.timestep_embedder(timestep_embedding(t * 1000, self.channels).astype(dtype))
        if guidance is not None and "guidance_embedder" in self:
            vec = vec + self.guidance_embedder(timestep_embedding(guidance * 1000, self.channels).astype(dtype))
        return vec


class Modulation(nn.Module):
    """diffusers' Flux2Modulation: SiLU, Linear -> `sets` (shift, scale, gate) triples, each (B, 1, dim)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = _linear(dim, 3 * sets * dim)

    def __call__(self, vec):
        return mx.split(self.linear(nn.silu(vec))[:, None, :], 3 * self.sets, axis=-1)


class FeedForward(nn.Module):
    """diffusers' Flux2FeedForward: linear_in to twice the hidden width, SwiGLU, linear_out."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in, self.linear_out = _linear(dim, 2 * hidden), _linear(hidden, dim)

    def __call__(self, x):
        return self.linear_out(swiglu(self.linear_in(x)))


class Heads(nn.Module):
    """Splits projections into heads and RMS-normalises q and k per head."""

    def __init__(self, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)

    def split(self, x):
        B, S, _ = x.shape
        return x.reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def attend(self, q, k, v, pe):
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        o = flux.attention(q, k, v, self.head_dim ** -0.5)  # the kernel slot (cpu.py fills it on the CPU)
        B, _, S, _ = o.shape
        return o.transpose(0, 2, 1, 3).reshape(B, S, -1)


class Attention(Heads):
    """diffusers' Flux2Attention: joint attention of the text (`add_*`) and image streams, text first."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__(heads, head_dim, eps)
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (_linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (_linear(dim, inner) for _ in range(3))
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = [_linear(inner, dim)]
        self.to_add_out = _linear(inner, dim)

    def __call__(self, img, txt, pe):
        q = mx.concatenate([self.norm_added_q(self.split(self.add_q_proj(txt))),
                            self.norm_q(self.split(self.to_q(img)))], axis=2)
        k = mx.concatenate([self.norm_added_k(self.split(self.add_k_proj(txt))),
                            self.norm_k(self.split(self.to_k(img)))], axis=2)
        v = mx.concatenate([self.split(self.add_v_proj(txt)), self.split(self.to_v(img))], axis=2)
        o = self.attend(q, k, v, pe)
        n_txt = txt.shape[1]
        return self.to_out[0](o[:, n_txt:]), self.to_add_out(o[:, :n_txt])


class ParallelSelfAttention(Heads):
    """diffusers' Flux2ParallelSelfAttention: q, k, v and the MLP input in one projection, the attention
    output and the SwiGLU MLP output through one projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__(heads, head_dim, eps)
        self.inner = heads * head_dim
        self.to_qkv_mlp_proj = _linear(dim, 3 * self.inner + 2 * hidden)
        self.to_out = _linear(self.inner + hidden, dim)

    def __call__(self, x, pe):
        h = self.to_qkv_mlp_proj(x)
        n = self.inner
        q, k, v, mlp = h[..., :n], h[..., n:2 * n], h[..., 2 * n:3 * n], h[..., 3 * n:]
        o = self.attend(self.norm_q(self.split(q)), self.norm_k(self.split(k)), self.split(v), pe)
        return self.to_out(mx.concatenate([o, swiglu(mlp)], axis=-1))


class DoubleStreamBlock(nn.Module):
    """diffusers' Flux2TransformerBlock; its modulation comes from outside (shared by all blocks)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Attention(dim, heads, head_dim, eps)
        self.ff, self.ff_context = FeedForward(dim, hidden), FeedForward(dim, hidden)

    def __call__(self, img, txt, mod_img, mod_txt, pe):
        shift, scale, gate, shift2, scale2, gate2 = mod_img
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = mod_txt
        img_attn, txt_attn = self.attn(modulate(img, shift, scale, self.eps),
                                       modulate(txt, c_shift, c_scale, self.eps), pe)
        img = gated(img, gate, img_attn)
        img = gated(img, gate2, self.ff(modulate(img, shift2, scale2, self.eps)))
        txt = gated(txt, c_gate, txt_attn)
        txt = gated(txt, c_gate2, self.ff_context(modulate(txt, c_shift2, c_scale2, self.eps)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """diffusers' Flux2SingleTransformerBlock: the parallel attention + MLP on the joint sequence."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = ParallelSelfAttention(dim, heads, head_dim, hidden, eps)

    def __call__(self, x, mod, pe):
        shift, scale, gate = mod
        return gated(x, gate, self.attn(modulate(x, shift, scale, self.eps), pe))


class NormOut(nn.Module):
    """diffusers' AdaLayerNormContinuous without bias: (scale, shift) from the conditioning, scale first."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = _linear(dim, 2 * dim)

    def __call__(self, x, vec, eps):
        scale, shift = mx.split(self.linear(nn.silu(vec))[:, None, :], 2, axis=-1)
        return modulate(x, shift, scale, eps)


@dataclass(frozen=True)
class Flux2Params:
    """diffusers' Flux2Transformer2DModel config ([klein] 4B: 5 + 20 blocks, 24 heads of 128; 9B: 8 + 24,
    32 heads). The sizes are required: a config lacking one is an error, never another model's size."""
    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    num_single_layers: int
    in_channels: int
    joint_attention_dim: int
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True
    timestep_guidance_channels: int = 256
    out_channels: Optional[int] = None
    patch_size: int = 1

    @classmethod
    def from_config(cls, config: dict) -> "Flux2Params":
        return from_config(cls, config)


class Flux2Transformer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        p = self.params = Flux2Params.from_config(config)
        heads, head_dim = p.num_attention_heads, p.attention_head_dim
        dim = self.inner_dim = heads * head_dim
        hidden = int(dim * p.mlp_ratio)
        self.eps, self.theta = float(p.eps), float(p.rope_theta)
        self.axes_dim = list(p.axes_dims_rope)
        self.guidance_embeds = bool(p.guidance_embeds)
        self.time_guidance_embed = TimeGuidanceEmbed(p.timestep_guidance_channels, dim, self.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = _linear(p.in_channels, dim)
        self.context_embedder = _linear(p.joint_attention_dim, dim)
        self.transformer_blocks = [DoubleStreamBlock(dim, heads, head_dim, hidden, self.eps)
                                   for _ in range(p.num_layers)]
        self.single_transformer_blocks = [SingleStreamBlock(dim, heads, head_dim, hidden, self.eps)
                                          for _ in range(p.num_single_layers)]
        self.norm_out = NormOut(dim)
        self.proj_out = _linear(dim, p.patch_size * p.patch_size * (p.out_channels or p.in_channels))

    def pos_embed(self, txt_ids: mx.array, img_ids: mx.array) -> tuple:
        """RoPE for the joint sequence from 4-axis ids (`text_ids`, `image_ids` below)."""
        return rope(mx.concatenate([txt_ids, img_ids], axis=0), self.axes_dim, self.theta)

    def conditioning(self, t: mx.array, pooled=None, guidance: Optional[mx.array] = None) -> mx.array:
        """The timestep (+ guidance) embedding every modulation is computed from; FLUX.2 has no pooled text
        vector, so `pooled` is ignored (it is None)."""
        layer = self.x_embedder  # the compute dtype: the weights' (quantized: the scales')
        dtype = layer.scales.dtype if "scales" in layer else layer.weight.dtype
        return self.time_guidance_embed(t, guidance if self.guidance_embeds else None, dtype)

    def __call__(self, img: mx.array, txt: mx.array, vec: mx.array, pe: tuple,
                 hook: Optional[Hook] = None) -> mx.array:
        """img: packed latents (B, S_img, 128); txt: stacked Qwen3 states (B or 1, S_txt, 3 x hidden);
        vec: `conditioning(...)`; pe: `pos_embed(...)`. Returns the velocity (B, S_img, 128)."""
        img = self.x_embedder(img)
        txt = self.context_embedder(txt)  # one prompt for the batch: embedded once, broadcast in the blocks
        if txt.shape[0] != img.shape[0]:
            txt = mx.broadcast_to(txt, (img.shape[0],) + txt.shape[1:])
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        for i, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, mod_img, mod_txt, pe)
            if hook is not None:
                txt, img = hook("double", i, txt, img)
        n_txt = txt.shape[1]
        x = mx.concatenate([txt, img], axis=1)
        for i, block in enumerate(self.single_transformer_blocks):
            x = block(x, mod_single, pe)
            if hook is not None:
                x = mx.concatenate(hook("single", i, x[:, :n_txt], x[:, n_txt:]), axis=1)
        return self.proj_out(self.norm_out(x[:, n_txt:], vec, self.eps))


def text_ids(length: int) -> mx.array:
    """diffusers' Flux2KleinPipeline._prepare_text_ids: (t, h, w, l) = (0, 0, 0, position)."""
    ids = np.zeros((length, 4), np.float32)
    ids[:, 3] = np.arange(length)
    return mx.array(ids)


def image_ids(rows: int, cols: int) -> mx.array:
    """diffusers' _prepare_latent_ids: (t, h, w, l) = (0, row, column, 0), rows first."""
    ids = np.zeros((rows, cols, 4), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return mx.array(ids.reshape(rows * cols, 4))
