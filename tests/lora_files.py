"""Random FLUX LoRAs made by peft and written by diffusers, and the same LoRAs renamed into kohya's and
BFL's namings by diffusers' own key rules (loaders/lora_conversion_utils.py, read backwards).

A fused BFL projection (qkv, linear1) has one lora_A for all its parts; the separate q, k, v (and mlp)
LoRAs of the diffusers file become one pair of rank 3r (4r) with lora_A stacked and lora_B
block-diagonal, whose product is exactly the parts' products stacked: the same LoRA.
"""

import json
import re
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                       "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
                       "x_embedder", "context_embedder", "linear_1", "linear_2"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make(folder: Path, out: Path, seed: int, rank: int = 4, alpha: float = 8.0, text_encoder: bool = True,
         std: float = 0.1) -> Path:
    """A random LoRA on every Linear of the pipeline's transformer (and CLIP), saved by
    `FluxPipeline.save_lora_weights` with PEFT's config (alpha / rank = 2) in the header."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TRANSFORMER_TARGETS, init_lora_weights=False)
    transformer.add_adapter(config)
    layers = {"transformer_lora_layers": _randomised(transformer, std),
              "transformer_lora_adapter_metadata": config.to_dict()}
    if text_encoder:
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
        clip_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=CLIP_TARGETS, init_lora_weights=False)
        clip = inject_adapter_in_model(clip_config, clip)  # transformers' add_adapter wants peft 0.22
        layers.update(text_encoder_lora_layers=_randomised(clip, std),
                      text_encoder_lora_adapter_metadata=clip_config.to_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out.parent, weight_name=out.name, **layers)
    return out


def _randomised(model, std):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * std)
    return {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}


def alpha_over_rank(path: Path) -> float:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    return meta["transformer.lora_alpha"] / meta["transformer.r"]


# diffusers' module -> BFL's, as _convert_sd_scripts_to_ai_toolkit and _convert_fal_kontext pair them
_SINGLE = [(r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
           (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
           (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0"),
           (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2"),
           (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0"),
           (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2"),
           (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin"),
           (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
           (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2"),
           (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin"),
           (r"time_text_embed\.timestep_embedder\.linear_(\d)", r"time_in.@\1"),
           (r"time_text_embed\.guidance_embedder\.linear_(\d)", r"guidance_in.@\1"),
           (r"time_text_embed\.text_embedder\.linear_(\d)", r"vector_in.@\1"),
           (r"x_embedder", "img_in"), (r"context_embedder", "txt_in"), (r"proj_out", "final_layer.linear"),
           (r"norm_out\.linear", "final_layer.adaLN_modulation.1")]
_FUSED = [("transformer_blocks.{}.attn.", ("to_q", "to_k", "to_v"), "double_blocks.{}.img_attn.qkv"),
          ("transformer_blocks.{}.attn.", ("add_q_proj", "add_k_proj", "add_v_proj"), "double_blocks.{}.txt_attn.qkv"),
          ("single_transformer_blocks.{}.", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
           "single_blocks.{}.linear1")]


def bfl_pairs(diffusers_file: Path, scale: float) -> dict:
    """BFL module -> (A, B * scale), B's rows in BFL's order, from a diffusers LoRA file."""
    sd = load_file(str(diffusers_file))
    pairs = {k[len("transformer."):-len(".lora_A.weight")]: (sd[k], sd[k.replace("lora_A", "lora_B")] * scale)
             for k in sd if k.startswith("transformer.") and ".lora_A." in k}
    out = {}
    blocks = {int(m.group(2)) for k in pairs for m in [re.match(r"(single_)?transformer_blocks\.(\d+)", k)] if m}
    for prefix, parts, bfl in _FUSED:
        for i in sorted(blocks):
            keys = [prefix.format(i) + p for p in parts]
            if all(k in pairs for k in keys):
                As, Bs = zip(*(pairs.pop(k) for k in keys))
                out[bfl.format(i)] = torch.cat(As), torch.block_diag(*Bs)
    for name, (a, b) in pairs.items():
        for pattern, repl in _SINGLE:
            new, n = re.subn(f"^{pattern}$", repl, name)
            if n:
                new = new.replace("@1", "in_layer").replace("@2", "out_layer")
                if new == "final_layer.adaLN_modulation.1":  # diffusers' (scale, shift) -> BFL's (shift, scale)
                    b = torch.cat(b.chunk(2)[::-1])
                out[new] = a, b
                break
        else:
            raise KeyError(name)
    return out


def write_bfl(diffusers_file: Path, out: Path, prefix: str = "diffusion_model.") -> Path:
    """The transformer part of a diffusers LoRA file in BFL / AI-Toolkit naming (lora_A/lora_B, no alpha:
    the file's alpha / rank is folded into lora_B)."""
    pairs = bfl_pairs(diffusers_file, alpha_over_rank(diffusers_file))
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out))
    return out


def write_kohya(diffusers_file: Path, out: Path, alpha_factor: float = 0.5) -> Path:
    """The same LoRA in kohya / sd-scripts naming: `lora_unet_<bfl with _>.lora_down/lora_up.weight` and an
    `.alpha` per module (alpha = alpha_factor * rank, lora_up divided back by it); CLIP as `lora_te1_`."""
    scale = alpha_over_rank(diffusers_file)
    tensors = {}
    for name, (a, b) in bfl_pairs(diffusers_file, scale / alpha_factor).items():
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = a.contiguous()
        tensors[f"{stem}.lora_up.weight"] = b.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha_factor * a.shape[0])
    sd = load_file(str(diffusers_file))
    for k, v in sd.items():
        if k.startswith("text_encoder.") and ".lora_A." in k:
            stem = "lora_te1_" + k[len("text_encoder."):-len(".lora_A.weight")].replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = v
            tensors[f"{stem}.lora_up.weight"] = sd[k.replace("lora_A", "lora_B")] * scale / alpha_factor
            tensors[f"{stem}.alpha"] = torch.tensor(alpha_factor * v.shape[0])
    save_file(tensors, str(out))
    return out


def write_alpha_keys(diffusers_file: Path, out: Path) -> Path:
    """The same file without PEFT's header, with an `.alpha` tensor per module instead (the older
    diffusers / TheLastBen layout diffusers reads as network_alphas)."""
    sd = load_file(str(diffusers_file))
    alpha = alpha_over_rank(diffusers_file)
    for k in [k for k in sd if ".lora_A." in k]:
        sd[k.replace(".lora_A.weight", ".alpha")] = torch.tensor(alpha * sd[k].shape[0])
    save_file(sd, str(out))
    return out
