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

import mlx.core as mx
import mlx.nn as nn

LAYERS = (9, 18, 27)  # diffusers' text_encoder_out_layers default for [klein]


def _rope_theta(config: dict) -> float:
    """rope_theta, top level (transformers 4) or under rope_parameters (5); only plain RoPE is supported."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"unsupported Qwen3 rope_type {kind!r}: only plain RoPE (Qwen3's) is implemented")
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


class Attention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        dim, self.heads, self.kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or dim // self.heads
        self.theta = _rope_theta(config)
        eps = config.get("rms_norm_eps", 1e-6)
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
    def __init__(self, config: dict):
        super().__init__()
        dim, eps = config["hidden_size"], config.get("rms_norm_eps", 1e-6)
        self.self_attn = Attention(config)
        self.mlp = MLP(dim, config["intermediate_size"])
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x, mask):
        h = x + self.self_attn(self.input_layernorm(x), mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, config: dict, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = [DecoderLayer(config) for _ in range(layers)]
        self.norm = nn.RMSNorm(config["hidden_size"], eps=config.get("rms_norm_eps", 1e-6))


class Qwen3Encoder(nn.Module):
    def __init__(self, config: dict, layers=LAYERS):
        super().__init__()
        self.config = dict(config)
        total = config["num_hidden_layers"]
        self.out_layers = tuple(layers)
        if not self.out_layers or min(self.out_layers) < 0 or max(self.out_layers) > total:
            raise ValueError(f"hidden-state layers {self.out_layers} are outside this Qwen3's 0..{total}")
        self.final_norm = max(self.out_layers) == total  # hidden_states[total] is after the final norm
        self.model = Qwen3Model(config, max(self.out_layers))

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
