"""T5 encoder (FLUX's `text_encoder_2`, T5-XXL v1.1) in MLX.

Mirrors transformers' `T5EncoderModel`: parameter names equal the Hugging Face safetensors keys, so
weights load with `model.load_weights(list(sanitize(weights).items()))`. No attention mask: FLUX
runs the encoder on padded ids without one, and so does diffusers' FluxPipeline.
"""

import math

import mlx.core as mx
import mlx.nn as nn

# transformers' ACT2FN names used by T5 configs; "gelu_new" is the tanh approximation.
ACTIVATIONS = {
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def _activation(config: dict):
    """(function, gated) the way T5Config derives them from `feed_forward_proj`."""
    parts = config.get("feed_forward_proj", "relu").split("-")
    gated = config.get("is_gated_act", parts[0] == "gated")
    name = config.get("dense_act_fn") or ("gelu_new" if parts[-1] == "gelu" and gated else parts[-1])
    return ACTIVATIONS[name], gated


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int):
    """transformers' bidirectional `_relative_position_bucket`, operation for operation (the float32
    log and the truncation decide bucket edges, so the order of operations is kept)."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(mx.int32) * num_buckets
    n = mx.abs(relative_position)
    max_exact = num_buckets // 2
    # max(n, 1) only keeps log(0) out; those positions take the exact branch anyway.
    large = mx.log(mx.maximum(n, 1).astype(mx.float32) / max_exact)
    large = max_exact + (large / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(mx.int32)
    large = mx.minimum(large, num_buckets - 1)
    return buckets + mx.where(n < max_exact, n, large)


class T5Attention(nn.Module):
    def __init__(self, config: dict, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads, self.d_kv = config["num_heads"], config["d_kv"]
        inner, d_model = self.num_heads * self.d_kv, config["d_model"]
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        if has_relative_attention_bias:
            self.num_buckets = config.get("relative_attention_num_buckets", 32)
            self.max_distance = config.get("relative_attention_max_distance", 128)
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def position_bias(self, length: int) -> mx.array:
        """(1, heads, L, L) additive bias; only layer 0 owns the table, the rest reuse its output."""
        pos = mx.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        heads = lambda t: t.reshape(B, L, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 folds the 1/sqrt(d) scale into its weights, hence scale 1.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: dict, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        # RMS norm without mean subtraction; mx.fast.rms_norm accumulates in float32 like T5LayerNorm.
        self.layer_norm = nn.RMSNorm(config["d_model"], eps=config.get("layer_norm_epsilon", 1e-6))

    def __call__(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseActDense(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.act, self.gated = _activation(config)
        d_model, d_ff = config["d_model"], config["d_ff"]
        if self.gated:
            self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
            self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        else:
            self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def __call__(self, x):
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = nn.RMSNorm(config["d_model"], eps=config.get("layer_norm_epsilon", 1e-6))

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: dict, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.block = [T5Block(config, i == 0) for i in range(config["num_layers"])]
        self.final_layer_norm = nn.RMSNorm(config["d_model"], eps=config.get("layer_norm_epsilon", 1e-6))

    def __call__(self, x):
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """`T5Encoder(config)(input_ids) -> last_hidden_state` (B, L, d_model)."""

    def __init__(self, config: dict):
        super().__init__()
        self.shared = nn.Embedding(config["vocab_size"], config["d_model"])
        self.config = dict(config)  # kept for saving; holds no arrays
        self.encoder = T5Stack(config)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.encoder(self.shared(input_ids))


def sanitize(weights: dict) -> dict:
    """HF T5EncoderModel safetensors -> this model. `encoder.embed_tokens.weight` is a tied copy of
    `shared.weight` (older transformers write both, newer only `shared`); keep one as `shared`."""
    weights = dict(weights)
    embed = weights.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in weights and embed is not None:
        weights["shared.weight"] = embed
    return weights


def unsanitize(weights: dict) -> dict:
    """This model -> HF layout (identical names and shapes; transformers re-ties embed_tokens)."""
    return dict(weights)
