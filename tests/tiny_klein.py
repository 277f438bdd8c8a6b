"""Tiny random FLUX.2 [klein] pipelines built and written by diffusers and transformers themselves.

The folder is what `Flux2KleinPipeline.save_pretrained` writes (model_index.json with is_distilled,
transformer/, text_encoder/ of a `Qwen3ForCausalLM`, vae/ of an `AutoencoderKLFlux2`, tokenizer/,
scheduler/). The tokenizer is built here, as the Hub's is laid out (tokenizer.json, tokenizer_config.json,
chat_template.jinja, written by transformers' Qwen2Tokenizer.save_pretrained): a byte-level BPE with
Qwen2's pre-tokenizer regex, trained with the `tokenizers` library on the captions corpus of
scripts/make_tokenizers.py, with Qwen's special tokens and a chat template whose generation prompt is
Qwen3's (an empty think block when thinking is disabled).
"""

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from scripts.make_tokenizers import corpus

SIZE = 32  # pixels; VAE scale 2, then 2x2 patches: 8x8 = 64 image tokens of 4 x 4 = 16 channels
SEQ = 24  # Qwen3 tokens (the templated prompt is about 20)
LAYERS = (1, 3, 4)  # hidden states stacked; 4 is the last layer, after the final norm
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}")


def write_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(["<think>", "</think>"])
    hf = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token=None, bos_token=None)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def build(folder: Path, distilled: bool = True, seed: int = 0, wide: bool = False) -> Path:
    """Write a tiny [klein] pipeline (distilled, or base: true CFG) to `folder`, every weight non-zero.

    `wide`: transformer and Qwen3 64 wide, so that most Linear layers' input widths are multiples of the
    quantization group size (64) and quantizing really changes them."""
    hidden, heads = (64, 4) if wide else (32, 2)  # Qwen3 width; transformer heads of 16
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=hidden // 4, max_position_embeddings=128, rope_theta=10000.0,
                                        tie_word_embeddings=True, pad_token_id=tok.pad_token_id))
    transformer = Flux2Transformer2DModel(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                          num_attention_heads=heads, joint_attention_dim=3 * hidden,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    with torch.no_grad():  # diffusers zero-initialises some projections; make every weight matter
        for model in (transformer, vae):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        # random weights this small leave the images nearly blind to the text: scale the transformer up
        # (the text's path most, Qwen3's random states being small) so that prompts and repulsion show
        for p in transformer.parameters():
            p.mul_(2.0)
        transformer.context_embedder.weight.mul_(4.0)
        vae.bn.running_mean.copy_(torch.randn(16) * 0.2)
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tok,
                              transformer=transformer, is_distilled=distilled)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "crepulse.json").write_text(json.dumps(dict(
        width=SIZE, height=SIZE, max_sequence_length=SEQ, steps=4, text_encoder_out_layers=list(LAYERS))))
    return folder


def reference(folder: Path) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
