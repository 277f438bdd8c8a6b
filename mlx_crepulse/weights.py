"""Weights: find a model's files (local folder or Hugging Face Hub), read them, map keys, quantize, save.

Everything that touches files lives here; the models in `models/` only take configs and arrays.
Weights are read from safetensors only; a pickle (`.bin`, `.pt`) is never opened.
"""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

PACKAGE_DIR = Path(__file__).parent
DEMO_DIR = PACKAGE_DIR / "demo_model"
ALIASES = {"schnell": "black-forest-labs/FLUX.1-schnell", "dev": "black-forest-labs/FLUX.1-dev",
           # FLUX.2 [klein] (klein.py): 4B Apache-2.0; 9B under the FLUX non-commercial licence (gated)
           "klein": "black-forest-labs/FLUX.2-klein-4B", "klein-base": "black-forest-labs/FLUX.2-klein-base-4B",
           "klein-9b": "black-forest-labs/FLUX.2-klein-9B", "klein-9b-base": "black-forest-labs/FLUX.2-klein-base-9B"}
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler")
QUANTIZED = ("transformer", "text_encoder_2")  # the big ones; CLIP and the VAE stay as they are
GROUP_SIZE = 64
# What a pipeline needs from a Hub repo; FLUX repos also hold BFL single files at their root, skipped.
HUB_PATTERNS = ["model_index.json", "crepulse.json"] + [f"{c}/*.json" for c in COMPONENTS] + [
    f"{c}/*.safetensors" for c in ("transformer", "text_encoder", "text_encoder_2", "vae")
] + ["tokenizer/*.txt", "tokenizer/*.jinja", "tokenizer_2/*.model", "tokenizer_2/*.txt"]  # .jinja: Qwen3's chat template


def is_repo_id(name: str) -> bool:
    """"owner/name", as the Hugging Face Hub spells repository ids."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def network_error(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is the network failing: no connection, a name not found, a timeout.
    Told apart by class names, so it holds whichever HTTP library huggingface_hub runs on (requests, httpx)."""
    while e is not None:
        if {c.__name__ for c in type(e).__mro__} & {"ConnectionError", "TimeoutError", "TransportError", "Timeout"}:
            return True
        e = e.__cause__ or e.__context__
    return False


class WeightsError(Exception):
    """A model's files are missing, unreadable or do not fit its config. The message says what to do
    (in the CLI's words). `kind` tells a program which download failure it is, to say it in its own words:
    "gated" (licence not accepted, or not logged in), "missing" (no such repo), "offline" (the Hub cannot
    be reached and the cache lacks the files), "disk" (the disk filled up); None for everything else."""

    def __init__(self, *args, kind=None):
        super().__init__(*args)
        self.kind = kind


def resolve(source: str, progress: bool = False) -> Path:
    """A model folder on disk for "demo", "schnell", "dev", a Hub repo id or a local folder.

    Hub repos come from the Hugging Face cache (downloading only the files a pipeline needs, unless
    HF_HUB_OFFLINE is set)."""
    if source == "demo":
        if not (DEMO_DIR / "model_index.json").exists():
            raise WeightsError(f"the bundled demo model is missing from {DEMO_DIR}; reinstall mlx-crepulse")
        return DEMO_DIR
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise WeightsError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder "
                               "with model_index.json, transformer/, text_encoder/, ... or a Hub repo id")
        return path
    repo = ALIASES.get(source, source)
    if not is_repo_id(repo):
        raise WeightsError(f"unknown model {source!r}: use demo, {', '.join(ALIASES)}, a Hub repo id (owner/name) "
                           "or an existing folder")
    return Path(download(repo, progress=progress))


def download(repo: str, progress: bool = True) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    offline = hub_offline()
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        return snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except GatedRepoError as e:
        raise WeightsError(f"{repo} is gated: accept its licence on huggingface.co and log in with "
                           "`hf auth login`, then try again", kind="gated") from e
    except RepositoryNotFoundError as e:
        raise WeightsError(f"no model {repo!r} on the Hugging Face Hub (or it is private)", kind="missing") from e
    except LocalEntryNotFoundError as e:
        alias = next((k for k, v in ALIASES.items() if v == repo), repo)
        raise WeightsError(f"{repo} is not in the Hugging Face cache and the Hub cannot be reached "
                           f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); fetch it once "
                           f"online with `python -m mlx_crepulse download {alias}`", kind="offline") from e
    except Exception as e:  # network errors of every kind
        if offline:
            raise WeightsError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                               kind="offline") from e
        kind = "disk" if isinstance(e, OSError) and e.errno == errno.ENOSPC else (
            "offline" if network_error(e) else None)
        raise WeightsError(f"could not download {repo}: {e}", kind=kind) from e


def cached_snapshot(repo: str) -> Path:
    """The folder of `repo` in the Hugging Face cache, without the network (WeightsError if absent)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise WeightsError(f"{repo} is not in the Hugging Face cache") from e


def read_json(path: Path) -> dict:
    if not path.exists():
        raise WeightsError(f"missing file {path}: the model folder is incomplete; download or convert it again")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); download or convert the model again") from e


def weight_files(folder: Path) -> list:
    """The safetensors files of one component: the shards of its index, or its single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{indexes[0]} has no weight_map, so it is not a shard index; download the "
                               "model again")
        shards = sorted(set(weight_map.values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" \
            if pickles else ""
        raise WeightsError(f"no .safetensors weights in {folder}{hint}")
    for f in files:
        if not f.exists():
            raise WeightsError(f"missing weight shard {f}; download the model again")
    return files


def read_safetensors(path: Path) -> dict:
    try:
        return mx.load(str(path))
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}; the file is truncated or corrupt, download it again") from e


# --- BFL single-file transformer checkpoints ------------------------------------------------------------

_BFL_RENAMES = [
    (r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"txt_in", "context_embedder"),
    (r"img_in", "x_embedder"),
    (r"final_layer\.linear", "proj_out"),
    (r"final_layer\.adaLN_modulation\.1", "norm_out.linear"),
    (r"double_blocks\.(\d+)\.img_mod\.lin", r"transformer_blocks.\1.norm1.linear"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.net.2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.net.0.proj"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.net.2"),
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"single_blocks\.(\d+)\.modulation\.lin", r"single_transformer_blocks.\1.norm.linear"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.proj_out"),
]
# Fused tensors, split along the output dimension into diffusers' separate projections.
_BFL_FUSED = [
    (r"double_blocks\.(\d+)\.img_attn\.qkv", "transformer_blocks.{}.attn.", ("to_q", "to_k", "to_v")),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv", "transformer_blocks.{}.attn.", ("add_q_proj", "add_k_proj", "add_v_proj")),
    (r"single_blocks\.(\d+)\.linear1", "single_transformer_blocks.{}.", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
]


def is_bfl(keys) -> bool:
    """Whether tensor names (a dict of weights, or a list of keys) are BFL's, not diffusers'."""
    return any(k.split(".")[0] in ("double_blocks", "single_blocks", "img_in") or k.startswith("model.diffusion_model.")
               for k in keys)


def has_guidance_embedding(keys) -> bool:
    """Whether a transformer's tensor names (BFL's or diffusers') include FLUX.1-dev's guidance embedding."""
    return any(k.removeprefix("model.diffusion_model.").startswith("guidance_in.") or "guidance_embedder" in k
               for k in keys)


def safetensors_header(path: Path) -> dict:
    """A safetensors file's tensor table (name -> dtype, shape, offsets), from its header only (8 bytes of
    length, then JSON), without reading the tensors."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 30:
                raise ValueError("bad header length")
            table = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable .safetensors file ({e}); download it again") from None
    table.pop("__metadata__", None)
    return table


def safetensors_keys(path: Path) -> list:
    return list(safetensors_header(path))


def bfl_to_diffusers(weights: dict) -> dict:
    """Rename a BFL checkpoint (flux1-*.safetensors) to diffusers keys: split fused q,k,v (and the single
    blocks' mlp), and swap the final modulation's (shift, scale) halves into diffusers' (scale, shift)."""
    out = {}
    for key, w in weights.items():
        key = key.removeprefix("model.diffusion_model.")
        stem, _, kind = key.rpartition(".")
        for pattern, prefix, names in _BFL_FUSED:
            m = re.fullmatch(pattern, stem)
            if m:
                dim = w.shape[0] // (len(names) + 3) if len(names) == 4 else w.shape[0] // 3
                sizes = [dim] * 3 + ([w.shape[0] - 3 * dim] if len(names) == 4 else [])
                offsets = [sum(sizes[:i]) for i in range(len(sizes))]
                for name, start, size in zip(names, offsets, sizes):
                    out[f"{prefix.format(m.group(1))}{name}.{kind}"] = w[start:start + size]
                break
        else:
            for pattern, repl in _BFL_RENAMES:
                new, n = re.subn(f"^{pattern}(?=\\.|$)", repl, key)
                if n:
                    key = new
                    break
            else:
                raise WeightsError(f"unexpected tensor {key!r} in a BFL transformer checkpoint")
            if key.startswith("norm_out.linear."):
                shift, scale = mx.split(w, 2, axis=0)
                w = mx.concatenate([scale, shift], axis=0)
            out[key] = w
    return out


# --- loading into a model ----------------------------------------------------------------------------------

def quantize_predicate(group_size: int = GROUP_SIZE):
    """Linear layers whose input width is a multiple of the group size; the rest stay as they are."""
    return lambda path, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size == 0


def load_into(model: nn.Module, folder: Path, sanitize=None, quantize=None, saved_quantization=None):
    """Load a component's weights shard by shard; with `quantize` (bits) each layer is quantized as it is
    read, so peak memory stays near the quantized size plus one layer."""
    files = weight_files(folder)
    if saved_quantization:  # a folder written by `save` after quantizing: build the quantized layers first
        group = saved_quantization["group_size"]
        nn.quantize(model, group, saved_quantization["bits"], class_predicate=quantize_predicate(group))
    expected = dict(tree_flatten(model.parameters()))
    quantized_paths = set()
    if quantize:
        predicate = quantize_predicate()
        quantized_paths = {p for p, m in model.named_modules() if predicate(p, m)}
    seen = set()
    for f in files:
        weights = read_safetensors(f)
        if is_bfl(weights):
            weights = bfl_to_diffusers(weights)
        if sanitize is not None:
            weights = sanitize(weights)
        for key, w in list(weights.items()):
            if key not in expected:
                raise WeightsError(f"{f.name} in {folder} has tensor {key!r} that the model does not use: "
                                   "the weights do not fit this config")
            want = expected.get(key)
            if want is not None and tuple(want.shape) != tuple(w.shape):
                raise WeightsError(f"tensor {key!r} in {f} has shape {tuple(w.shape)}, the config "
                                   f"({folder / 'config.json'}) needs {tuple(want.shape)}")
        model.load_weights(list(weights.items()), strict=False)
        swapped = _quantize_loaded(model, quantized_paths, weights, quantize) if quantize else set()
        seen.update(weights)
        arrived = set(weights)
        del weights  # from here the model holds the only references to this shard's tensors
        # Evaluate only what this shard filled in: the untouched layers still hold lazy random
        # initialisers, which must never be computed (at full size they would take tens of GB). Go layer
        # by layer, so that when quantizing each layer's full-precision tensors are freed as soon as it
        # is quantized: a whole-model file (a 24 GB BFL checkpoint) never sits in memory at once.
        layers = {}
        for k, v in tree_flatten(model.parameters()):
            if k in arrived or k.rpartition(".")[0] in swapped:
                layers.setdefault(k.rpartition(".")[0], []).append(v)
        for params in layers.values():
            mx.eval(params)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{folder} lacks tensor(s) {', '.join(missing[:5])}{more}; the checkpoint is "
                           "incomplete or for another model")
    return model


def _quantize_loaded(model, paths, weights, bits):
    """Swap the Linear layers whose weights just arrived for quantized ones; returns their paths."""
    modules = dict(model.named_modules())
    arrived = {k.rpartition(".")[0] for k in weights if k.endswith(".weight")}
    swaps = [(p, nn.QuantizedLinear.from_linear(modules[p], GROUP_SIZE, bits)) for p in sorted(arrived & paths)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return {p for p, _ in swaps}


# --- saving ------------------------------------------------------------------------------------------------

def save_component(model: nn.Module, config: dict, folder: Path, unsanitize=None, quantization=None):
    """Write config.json and model.safetensors; unquantized weights go back to the Hugging Face layout so
    diffusers and transformers load the folder too."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if unsanitize is not None and not quantization:
        weights = unsanitize(weights)
    config = dict(config)
    if quantization:
        config["quantization"] = quantization
    else:
        config.pop("quantization", None)
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors" if "_class_name" in config
                            else folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def copy_files(src: Path, dst: Path, names):
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        for f in (src / name).glob("*") if (src / name).is_dir() else [src / name]:
            target = dst / name / f.name if (src / name).is_dir() else dst / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
