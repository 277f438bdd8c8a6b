"""CLIP text encoder (FLUX's `text_encoder`, CLIP ViT-L/14 text tower) in MLX.

Mirrors transformers' `CLIPTextModel` as FLUX's checkpoints name it (`text_model.` prefix; the
transformers>=5 layout without the prefix is accepted by `sanitize`). Causal attention, no padding
mask, pooled output taken at the end-of-text token exactly as transformers picks it.
"""

import mlx.core as mx
import mlx.nn as nn

ACTIVATIONS = {
    "quick_gelu": nn.gelu_fast_approx,  # x * sigmoid(1.702 x), transformers' QuickGELU exactly
    "gelu": nn.gelu,  # erf form
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x):
        B, L, D = x.shape
        heads = lambda t: t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // self.heads) ** -0.5, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.act = ACTIVATIONS[config.get("hidden_act", "quick_gelu")]
        self.fc1 = nn.Linear(config["hidden_size"], config["intermediate_size"])
        self.fc2 = nn.Linear(config["intermediate_size"], config["hidden_size"])

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        dim, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-5)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, config["num_attention_heads"])
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config["num_hidden_layers"])]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.token_embedding = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.position_embedding = nn.Embedding(config["max_position_embeddings"], config["hidden_size"])

    def __call__(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.eos_token_id = config.get("eos_token_id", 49407)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config["hidden_size"], eps=config.get("layer_norm_eps", 1e-5))

    def __call__(self, input_ids):
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        if self.eos_token_id == 2:
            # Legacy configs (FLUX's CLIP-L among them) say eos=2, which is wrong; transformers then
            # takes the highest id in each row, which is the real end-of-text token 49407.
            eos = mx.argmax(input_ids, axis=-1)
        else:
            # First occurrence of eos (padding may repeat it); mx.argmax returns the first maximum.
            eos = mx.argmax((input_ids == self.eos_token_id).astype(mx.int32), axis=-1)
        pooled = mx.take_along_axis(x, eos[:, None, None].astype(mx.int32), axis=1)[:, 0]
        return x, pooled


class CLIPTextModel(nn.Module):
    """`CLIPTextModel(config)(input_ids) -> (last_hidden_state, pooled_output)`."""

    def __init__(self, config: dict):
        super().__init__()
        self.text_model = CLIPTextTransformer(config)
        self.config = dict(config)  # kept for saving; holds no arrays

    def __call__(self, input_ids: mx.array):
        return self.text_model(input_ids)


def sanitize(weights: dict) -> dict:
    """HF CLIPTextModel safetensors -> this model: drop the `position_ids` buffer older files carry,
    and add the `text_model.` prefix that transformers>=5 no longer writes."""
    return {
        (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in weights.items()
        if not k.endswith("embeddings.position_ids")
    }


def unsanitize(weights: dict) -> dict:
    """This model -> HF layout, with the `text_model.` prefix of FLUX's own files (transformers 4
    loads it as is; transformers 5 strips the prefix when loading)."""
    return dict(weights)
