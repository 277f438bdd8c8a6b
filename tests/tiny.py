"""Tiny random FLUX pipelines built and written by diffusers and transformers themselves.

These are the references: a folder in the real diffusers layout, written by `save_pretrained`, with
tokenizers trained here. Our loader reads the same folder and must give the same numbers.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from scripts.make_tokenizers import write_tokenizers

SIZE = 32  # pixels; the VAE halves it, 2x2 packing gives 8x8 = 64 image tokens
SEQ = 16  # T5 tokens


def build(folder: Path, guidance_embeds: bool, seed: int = 0, wide: bool = False) -> Path:
    """Write a tiny schnell-like (guidance_embeds=False, unshifted schedule) or dev-like (guidance
    embedding, shifted schedule) pipeline to `folder`, with every weight random and non-zero.

    `wide`: transformer and T5 64 wide (MLP 128 / 256), so that their Linear layers' input widths are
    multiples of the quantization group size (64) and quantizing really changes them."""
    d_model, heads = (64, 4) if wide else (24, 3)  # T5 width and heads (d_kv 8 or 16)
    dim_heads = 4 if wide else 2  # transformer heads of 16: hidden 64 or 32
    folder = Path(folder)
    write_tokenizers(folder, clip_vocab_size=400, t5_vocab_size=400)
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="quick_gelu", eos_token_id=tok.eos_token_id,
                                        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=400, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                                 num_layers=2, num_heads=heads,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=dim_heads,
                                         joint_attention_dim=d_model,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611)
    with torch.no_grad():  # diffusers zero-initialises some projections; make every weight matter
        for model in (transformer, vae):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"), transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "crepulse.json").write_text(json.dumps(dict(width=SIZE, height=SIZE, max_sequence_length=SEQ,
                                                          steps=4, guidance=3.5 if guidance_embeds else None)))
    return folder


def reference(folder: Path) -> FluxPipeline:
    return FluxPipeline.from_pretrained(folder, dtype=torch.float32)
