"""The Qwen3 text encoder of FLUX.2 [klein], as diffusers' `Flux2KleinPipeline` uses it.

A compact Qwen3 decoder (parameter names equal transformers' `Qwen3ForCausalLM` keys) run as an encoder:
the prompt's tokens with a causal + padding mask, returning the hidden states after chosen layers.
mlx-lm has a well-kept Qwen3 (`mlx_lm.models.qwen3`), but it gives neither intermediate hidden states nor
a padding mask (its mask is causal only, for unpadded generation), so its forward could not be used, and
importing any part of mlx-lm imports its package, which brings in transformers and torch (1.5 s here; this
package keeps them out of generation). The layers are few and plain, so they are written here, as mlx-lm
writes them, and tested against transformers.

diffusers takes `output_hidden_states[k]` for k in (9, 18, 27): index 0 is the embedding, index k the
output of layer k - 1, and the last index (k = num_hidden_layers) has the final RMSNorm applied. So only
the first max(k) layers are built and loaded (27 of Qwen3-4B's 36), and no LM head.
"""

from dataclasses import MISSING, dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError

LAYERS = (9, 18, 27)  # diffusers' text_encoder_out_layers default for [klein]


@dataclass(frozen=True)
class Qwen3Params:
    """What the encoder needs of transformers' Qwen3Config; its other keys (token ids, generation and
    training settings) are not the encoder's business and are skipped."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @classmethod
    def from_config(cls, config: dict) -> "Qwen3Params":
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in config]
        if missing:
            raise ConfigError(f"Qwen3 config lacks {', '.join(missing)}")
        if config.get("attention_bias") or config.get("hidden_act", "silu") != "silu":
            raise ConfigError("unsupported Qwen3 config: attention biases or an activation other than silu")
        # rope_theta sits at the top (transformers 4) or under rope_parameters (5); only plain RoPE is Qwen3's
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"unsupported Qwen3 rope_type {kind!r}: only plain RoPE is implemented")
        theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
        known = {f.name for f in fields(cls)} - {"rope_theta"}
        return cls(**{k: v for k, v in config.items() if k in known}, rope_theta=float(theta))


class Attention(nn.Module):
    def __init__(self, p: Qwen3Params):
        super().__init__()
        dim, self.heads, self.kv_heads = p.hidden_size, p.num_attention_heads, p.num_key_value_heads
        self.head_dim = p.head_dim or dim // self.heads
        self.theta = p.rope_theta
        eps = p.rms_norm_eps
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=eps), nn.RMSNorm(self.head_dim, eps=eps)

    def __call__(self, x, mask):
        B, L, _ = x.shape

        def heads(y, n, norm=None):
            y = y.reshape(B, L, n, self.head_dim)
            return (norm(y) if norm is not None else y).transpose(0, 2, 1, 3)
        q = heads(self.q_proj(x), self.heads, self.q_norm)
        k = heads(self.k_proj(x), self.kv_heads, self.k_norm)
        v = heads(self.v_proj(x), self.kv_heads)
        # transformers' rotate_half RoPE is MLX's non-traditional one
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.theta, scale=1.0, offset=0)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, p: Qwen3Params):
        super().__init__()
        dim, eps = p.hidden_size, p.rms_norm_eps
        self.self_attn = Attention(p)
        self.mlp = MLP(dim, p.intermediate_size)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x, mask):
        h = x + self.self_attn(self.input_layernorm(x), mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, p: Qwen3Params, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(p.vocab_size, p.hidden_size)
        self.layers = [DecoderLayer(p) for _ in range(layers)]
        self.norm = nn.RMSNorm(p.hidden_size, eps=p.rms_norm_eps)


class Qwen3Encoder(nn.Module):
    def __init__(self, config: dict, layers=LAYERS):
        super().__init__()
        self.config = dict(config)
        p = self.params = Qwen3Params.from_config(config)
        total = p.num_hidden_layers
        self.out_layers = tuple(layers)
        if not self.out_layers or min(self.out_layers) < 0 or max(self.out_layers) > total:
            raise ValueError(f"hidden-state layers {self.out_layers} are outside this Qwen3's 0..{total}")
        self.final_norm = max(self.out_layers) == total  # hidden_states[total] is after the final norm
        self.model = Qwen3Model(p, max(self.out_layers))

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        """ids, mask: (B, L) token ids and 1/0 attention mask -> (B, L, len(layers) * hidden), the chosen
        layers' states side by side per token (diffusers' stack, permute and reshape)."""
        h = self.model.embed_tokens(ids)
        L = ids.shape[1]
        causal = mx.arange(L)[:, None] >= mx.arange(L)[None, :]
        # a query sees earlier keys that are not padding (transformers' causal + padding mask)
        attend = causal[None, None] & (mask[:, None, None, :] > 0)
        states = [h]
        for layer in self.model.layers:
            h = layer(h, attend)
            states.append(h)
        if self.final_norm:
            states[-1] = self.model.norm(states[-1])
        return mx.concatenate([states[k] for k in self.out_layers], axis=-1)


def sanitize(weights: dict, keep: int = max(LAYERS)) -> dict:
    """transformers' Qwen3ForCausalLM keys -> this encoder: drop the LM head and the layers from `keep` on
    (their outputs are not used)."""
    out = {}
    for key, w in weights.items():
        if key.startswith("lm_head."):
            continue
        parts = key.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= keep:
            continue
        out[key] = w
    return out
