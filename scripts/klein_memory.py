"""Weight memory of each FLUX.2 [klein] variant, unquantized (bf16) and at 8 and 4 bits, computed from the
full-size modules built lazily (nothing is allocated): what the CLI's and app's model lists can show. And
the transformer's work per step per image at 1024 px against FLUX.1's, on paper: 2 FLOPs per weight of
every Linear a token passes through, plus 2 x 2 S^2 D for attention's two products in each block.

The configs are the Hub repos' (4B: 24 heads x 128, 5 + 20 blocks, Qwen3-4B; 9B: 32 heads x 128, 8 + 24
blocks, Qwen3-8B); Qwen3 is built up to the last layer the pipeline reads (27 of 36), without LM head.
Quantization as `weights.load_into` does it: Linear layers whose input width is a multiple of 64, groups of
64 with bf16 scales and biases; embeddings, norms and the VAE stay bf16. Activations come on top (at
1024 px and 4 images, a few hundred MB in the transformer).

Usage: python -m scripts.klein_memory
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_crepulse import weights
from mlx_crepulse.models import qwen3
from mlx_crepulse.models.autoencoder_flux2 import AutoencoderKLFlux2
from mlx_crepulse.models.flux2 import Flux2Transformer

QWEN = {"4B": dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32),
        "9B": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32)}
TRANSFORMER = {"4B": dict(num_attention_heads=24, num_layers=5, num_single_layers=20, joint_attention_dim=7680),
               "9B": dict(num_attention_heads=32, num_layers=8, num_single_layers=24, joint_attention_dim=12288)}
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=32, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def gigabytes(model, bits=None) -> float:
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, weights.GROUP_SIZE, bits, class_predicate=weights.quantize_predicate())
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def models(size):
    tf = dict(attention_head_dim=128, in_channels=128, mlp_ratio=3.0, guidance_embeds=False, **TRANSFORMER[size])
    te = dict(num_hidden_layers=36, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
              rope_theta=1e6, **QWEN[size])
    return (lambda: Flux2Transformer(tf)), (lambda: qwen3.Qwen3Encoder(te)), (lambda: AutoencoderKLFlux2(VAE))


def step_tflops(tf, text_tokens=512, image_tokens=4096) -> float:
    """One transformer forward for one image at 1024 px (4096 image tokens, 512 text tokens)."""
    S = text_tokens + image_tokens
    dim = tf.config["num_attention_heads"] * tf.config["attention_head_dim"]
    blocks = len(tf.transformer_blocks) + len(tf.single_transformer_blocks)
    def per_token(block):  # FLUX.1's per-block modulation acts on the conditioning vector, not on tokens
        return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and not n.startswith("norm")]
    macs = 0
    for block in tf.transformer_blocks:  # image tokens through the image stream, text through the text one
        for name, m in per_token(block):
            text = name.startswith(("attn.add_", "attn.to_add_out", "ff_context"))
            macs += m.weight.size * (text_tokens if text else image_tokens)
    for block in tf.single_transformer_blocks:
        macs += sum(m.weight.size for _, m in per_token(block)) * S
    macs += blocks * 2 * S * S * dim
    return 2 * macs / 1e12


def flux1_dev():
    from mlx_crepulse.models.flux import FluxTransformer
    return FluxTransformer(dict(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38,
                                guidance_embeds=True))


def main():
    ref = step_tflops(flux1_dev())
    print(f"transformer TFLOPs per step per image at 1024 px (512 text tokens): FLUX.1-dev {ref:.1f}")
    for size in ("4B", "9B"):
        t = step_tflops(models(size)[0]())
        print(f"  klein {size}: {t:.1f} ({t / ref:.2f} x FLUX.1; base variants run it twice per step for CFG)")

    print("variant   bits  transformer  Qwen3 (27 layers)  VAE   total GB")
    for size, names in (("4B", "klein, klein-base"), ("9B", "klein-9b, klein-9b-base")):
        tf, te, vae = models(size)
        for bits in (None, 8, 4):
            parts = [gigabytes(tf(), bits), gigabytes(te(), bits), gigabytes(vae())]
            print(f"{size}  {bits or 16:>4}  {parts[0]:11.2f}  {parts[1]:17.2f}  {parts[2]:4.2f}  {sum(parts):8.2f}"
                  f"   ({names})")


if __name__ == "__main__":
    main()
