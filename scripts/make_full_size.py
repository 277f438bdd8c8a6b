"""Write full-size synthetic FLUX.1 checkpoints: random weights, real shapes, the Hub's exact layout.

    python scripts/make_full_size.py /work/big                  # schnell folder, dev folder, BFL file
    python scripts/make_full_size.py /work/big --parts schnell bfl

- `FLUX.1-schnell/`: every component at its real size, bfloat16, in the layout of the Hub repo
  black-forest-labs/FLUX.1-schnell: the published config.json of each component, the transformer in
  three shards and T5-XXL in two, each with its `*.safetensors.index.json` weight map, CLIP-L and the
  VAE in one file each. 33.7 GB.
- `FLUX.1-dev/`: the dev transformer (guidance embedding) and dev's scheduler (shifted); every other
  component is a symlink into the schnell folder (the Hub's files are the same). 23.8 GB more.
- `flux1-schnell.safetensors`: the BFL single file (fused qkv and linear1, BFL's names). 23.8 GB.

Tensor names and shapes come from diffusers' and transformers' own classes, built on the meta device
from the configs (so no memory), and are split into shards by huggingface_hub's own rule at the
max_shard_size the Hub's files were written with (10 GB for diffusers 0.30, 5 GB for transformers
4.43), tied tensors dropped as transformers' save_pretrained drops them; this gives the Hub's shard
sizes (9.96 + 9.95 + 3.87 GB, 4.99 + 4.53 GB). The BFL names and shapes are written out from BFL's
reference model (flux/src/flux/model.py) and checked against the diffusers parameter count.

Weights: seeded normal numbers of standard deviation 2^round(log2(1/sqrt(fan_in))) (so activations stay
of order one through the 57 blocks), norm scales 1, biases of deviation 1/64. Each tensor is written
8 MB at a time from a 32 MB pool of bfloat16 normals, at a random offset in it (scaling bfloat16 by a
power of two is an exponent shift, exact): nothing larger than 8 MB is ever built, so writing is
disk-bound. Tokenizers are the bundled demo model's (their ids lie within the real vocabularies).
"""

import argparse
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[1] / "mlx_crepulse" / "demo_model"
CHUNK = 1 << 22  # elements per write: 8 MB of bfloat16
POOL = 1 << 24

MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}
TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0", "attention_head_dim": 128,
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
CLIP = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "vocab_size": 49408,
}
T5 = {
    "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 32128,
}
VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
}
DEV_TRANSFORMER = dict(TRANSFORMER, guidance_embeds=True)
DEV_SCHEDULER = dict(SCHEDULER, shift=3.0, use_dynamic_shifting=True)


# --- random bfloat16 tensors, written a chunk at a time --------------------------------------------------

class Source:
    """Seeded bfloat16 values for a tensor of a given name and shape, CHUNK elements at a time."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        x = self.rng.standard_normal(POOL + CHUNK, dtype=np.float32)
        x = np.where(np.abs(x) < 1e-6, np.float32(1e-6), x)  # no zeros: an exponent shift must stay a number
        u = x.view(np.uint32)
        self.normal = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        self.pools = {}
        self.ones = np.full(CHUNK, 0x3F80, np.uint16)

    def pool(self, shift: int) -> np.ndarray:
        """The normal pool times 2**shift (bfloat16 exponent bits moved by `shift`)."""
        if shift not in self.pools:
            self.pools[shift] = (self.normal.astype(np.int32) + (shift << 7)).astype(np.uint16)
        return self.pools[shift]

    def chunks(self, name: str, shape: tuple):
        n = int(np.prod(shape))
        if is_norm_scale(name, shape):
            pool = None
        elif len(shape) == 1:
            pool = self.pool(-6)  # biases: deviation 1/64
        else:
            fan_in = int(np.prod(shape[1:]))
            pool = self.pool(int(round(np.log2(1 / np.sqrt(fan_in)))))
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            if pool is None:
                yield self.ones[:size]
            else:
                off = int(self.rng.integers(POOL))
                yield pool[off:off + size]


def is_norm_scale(name: str, shape: tuple) -> bool:
    return len(shape) == 1 and ("norm" in name or name.endswith(".scale") or "layer_norm" in name)


def write_safetensors(path: Path, tensors: dict, source: Source):
    """A bfloat16 safetensors file of `tensors` (name -> shape), streamed: header, then each tensor's
    bytes in chunks. Data in sorted name order, as the safetensors library writes it."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        size = 2 * int(np.prod(tensors[name]))
        header[name] = {"dtype": "BF16", "shape": list(tensors[name]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(tensors):
            for chunk in source.chunks(name, tensors[name]):
                f.write(memoryview(chunk))
    os.replace(tmp, path)
    return offset


# --- names and shapes from the libraries' own classes ---------------------------------------------------

def shapes(component: str, config: dict) -> dict:
    """Name -> shape of what save_pretrained writes for this component (meta device: no memory)."""
    import torch
    with torch.device("meta"):
        if component == "transformer":
            from diffusers import FluxTransformer2DModel
            model = FluxTransformer2DModel.from_config(config)
        elif component == "vae":
            from diffusers import AutoencoderKL
            model = AutoencoderKL.from_config(config)
        elif component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel
            model = CLIPTextModel(CLIPTextConfig(**config))
        else:
            from transformers import T5Config, T5EncoderModel
            model = T5EncoderModel(T5Config(**config))
    tied = set(getattr(model, "_tied_weights_keys", None) or {})  # saved once, under the name it is tied to
    # the Hub's CLIP file was written by transformers 4, whose names carry the `text_model.` that 5 drops
    prefix = "text_model." if component == "text_encoder" else ""
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def write_component(folder: Path, component: str, config: dict, max_shard: str, seed: int):
    """config.json and the weights of one component: shards and an index, or one file."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = shapes(component, config)
    stem = "diffusion_pytorch_model" if component in ("transformer", "vae") else "model"
    meta = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in names.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=max_shard)
    source = Source(seed)
    total = 0
    for filename, keys in split.filename_to_tensors.items():
        total += write_safetensors(folder / filename, {k: names[k] for k in keys}, source)
        print(f"  {folder.name}/{filename}", flush=True)
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_shared(folder: Path):
    """The small things: model_index.json, tokenizers (the demo model's) and the scheduler."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(DEMO / name, folder / name, dirs_exist_ok=True)


def write_scheduler(folder: Path, config: dict):
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- the BFL single file -----------------------------------------------------------------------------------

def bfl_shapes(guidance: bool, hidden=3072, mlp=12288, head=128, double=19, single=38) -> dict:
    """Names and shapes of BFL's Flux model (flux/src/flux/model.py, modules/layers.py): fused qkv in the
    double blocks, fused q, k, v and MLP input in the single blocks' linear1."""
    out = {}

    def linear(name, n_out, n_in):
        out[f"{name}.weight"], out[f"{name}.bias"] = (n_out, n_in), (n_out,)

    linear("img_in", hidden, 64)
    linear("txt_in", hidden, 4096)
    for emb, n_in in [("time_in", 256), ("vector_in", 768)] + ([("guidance_in", 256)] if guidance else []):
        linear(f"{emb}.in_layer", hidden, n_in)
        linear(f"{emb}.out_layer", hidden, hidden)
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linear(f"{p}_mod.lin", 6 * hidden, hidden)
            linear(f"{p}_attn.qkv", 3 * hidden, hidden)
            out[f"{p}_attn.norm.query_norm.scale"] = out[f"{p}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{p}_attn.proj", hidden, hidden)
            linear(f"{p}_mlp.0", mlp, hidden)
            linear(f"{p}_mlp.2", hidden, mlp)
    for i in range(single):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * hidden + mlp, hidden)
        linear(f"{p}.linear2", hidden, hidden + mlp)
        out[f"{p}.norm.query_norm.scale"] = out[f"{p}.norm.key_norm.scale"] = (head,)
        linear(f"{p}.modulation.lin", 3 * hidden, hidden)
    linear("final_layer.linear", 64, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return out


def write_bfl(path: Path, guidance: bool, seed: int):
    names = bfl_shapes(guidance)
    want = sum(int(np.prod(s)) for s in shapes("transformer", DEV_TRANSFORMER if guidance else TRANSFORMER).values())
    got = sum(int(np.prod(s)) for s in names.values())
    assert got == want, f"BFL layout has {got} parameters, diffusers' {want}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, names, Source(seed))


# --- main ------------------------------------------------------------------------------------------------

def make_schnell(out: Path):
    folder = out / "FLUX.1-schnell"
    write_shared(folder)
    write_scheduler(folder, SCHEDULER)
    total = 0
    for seed, (name, config, shard) in enumerate([("transformer", TRANSFORMER, "10GB"),
                                                  ("text_encoder", CLIP, "10GB"),
                                                  ("text_encoder_2", T5, "5GB"), ("vae", VAE, "10GB")]):
        total += write_component(folder / name, name, config, shard, seed)
    return total


def make_dev(out: Path):
    """Dev's transformer and scheduler; every other component links to the schnell folder's."""
    folder, schnell = out / "FLUX.1-dev", out / "FLUX.1-schnell"
    if not (schnell / "model_index.json").exists():
        raise SystemExit(f"the dev folder links to {schnell}: make it first (--parts schnell)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    for name in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..") / schnell.name / name)
    write_scheduler(folder, DEV_SCHEDULER)
    return write_component(folder / "transformer", "transformer", DEV_TRANSFORMER, "10GB", seed=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write (about 81 GB for all three parts)")
    parser.add_argument("--parts", nargs="+", choices=("schnell", "dev", "bfl"), default=["schnell", "dev", "bfl"])
    args = parser.parse_args()
    makers = {"schnell": make_schnell, "dev": make_dev,
              "bfl": lambda out: write_bfl(out / "flux1-schnell.safetensors", guidance=False, seed=20)}
    for part in args.parts:
        t = time.perf_counter()
        size = makers[part](args.out)
        print(f"{part}: {size / 1e9:.2f} GB of weights in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
