"""The Qwen3 text encoder of FLUX.2 [klein], as diffusers' `Flux2KleinPipeline` uses it.

The layers are mlx-lm's own Qwen3 (`mlx_lm.models.qwen3`: a maintained implementation whose parameter
names equal transformers' `Qwen3ForCausalLM` keys under `model.`); only the forward loop is ours, because
the pipeline needs what mlx-lm's model does not give: the hidden states after chosen layers (not the last
one), and a padding mask (mlx-lm's mask is causal only, for unpadded generation).

diffusers takes `output_hidden_states[k]` for k in (9, 18, 27): index 0 is the embedding, index k the
output of layer k - 1, and the last index (k = num_hidden_layers) has the final RMSNorm applied. So only
the first max(k) layers are built and loaded (27 of Qwen3-4B's 36), and no LM head.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3

LAYERS = (9, 18, 27)  # diffusers' text_encoder_out_layers default for [klein]


class Qwen3Encoder(nn.Module):
    def __init__(self, config: dict, layers=LAYERS):
        super().__init__()
        self.config = dict(config)
        total = config["num_hidden_layers"]
        self.out_layers = tuple(layers)
        if not self.out_layers or min(self.out_layers) < 0 or max(self.out_layers) > total:
            raise ValueError(f"hidden-state layers {self.out_layers} are outside this Qwen3's 0..{total}")
        self.final_norm = max(self.out_layers) == total  # hidden_states[total] is after the final norm
        args = qwen3.ModelArgs.from_dict({**config, "num_hidden_layers": max(self.out_layers)})
        self.model = qwen3.Qwen3Model(args)

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
