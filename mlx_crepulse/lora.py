"""LoRAs: read FLUX.1 LoRA files in the three namings people bring, and apply several at once.

Formats (every key rule follows diffusers' own FLUX converters, `loaders/lora_conversion_utils.py`):
- diffusers / PEFT: `transformer.<diffusers module>.lora_A/lora_B.weight` and `text_encoder.<CLIP
  module>...`; alphas from the file's `lora_adapter_metadata` (PEFT's config) or `<module>.alpha` keys.
- kohya / sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up.weight` + `.alpha`
  (scale alpha / rank), `lora_te1_...` for CLIP; ComfyUI's `diffusion_model.<BFL>.lora_down` too.
- BFL / ComfyUI / AI-Toolkit: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A/lora_B.weight`.
A fused BFL projection (`qkv`, the single blocks' `linear1` = q, k, v, mlp) keeps its `lora_A` for
each part and splits `lora_B`'s rows, as diffusers does; `final_layer.adaLN_modulation.1`'s rows swap
halves (BFL's shift, scale against diffusers' scale, shift).

Applying: each targeted Linear (or QuantizedLinear) becomes a subclass of its own class that keeps the
very same parameters and adds x @ A^T @ B^T beside it, the LoRAs of a layer concatenated along the
rank with their scales folded into B. So a 4- or 8-bit base keeps its LoRAs at full precision, the
layer's parameter names do not change (saving writes the base), scale 0 leaves the layer untouched
(bit for bit), and `set_loras` puts the original layer objects back before applying the new set. Fusing
into the weights was measured against this (scripts/benchmark_lora.py, docs/lora-performance.md).
"""

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .weights import _BFL_FUSED, _BFL_RENAMES, WeightsError

DEFAULT_HUB_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
COMPONENTS = ("transformer", "text_encoder")  # what FLUX LoRAs adapt (diffusers' FluxLoraLoaderMixin)


class LoraError(WeightsError):
    """A LoRA file is missing, unreadable, not a LoRA, or does not fit the model. The message names
    the file and the key."""


@dataclass
class LoraFile:
    """One LoRA file read and parsed: its pairs still in the file's naming, mapped onto a model later."""
    path: Path
    source: str  # the reference the user gave: a path or `owner/name:file.safetensors`
    sha256: str
    pairs: dict  # stem -> {"A": (r, in), "B": (out, r), "alpha": float or None}
    metadata: dict  # PEFT configs by component ("transformer", "text_encoder"), from the file header
    ignored: list  # keys of all-zero tensors diffusers drops too (T5, position embedding, diff, diff_b)


# --- finding and reading files ---------------------------------------------------------------------------

def resolve(ref) -> Path:
    """A LoRA file on disk for a local path, `owner/name:file.safetensors` or `owner/name` (its
    pytorch_lora_weights.safetensors), fetched into the Hugging Face cache."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_file():
            raise LoraError(f"LoRA {ref!r} is a folder; pass the .safetensors file inside it")
        return path
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::(.+))?", ref)
    if m is None or (m.group(2) is None and ref.endswith(".safetensors")):
        raise LoraError(f"no LoRA file {ref!r}: pass an existing .safetensors file, or a Hub reference "
                        "owner/name:file.safetensors")
    return _download(m.group(1), m.group(2) or DEFAULT_HUB_FILE)


def _download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        raise LoraError(f"LoRA {repo}:{filename} is not in the Hugging Face cache and the Hub cannot be "
                        f"reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); fetch it "
                        "once online, or pass the file's path") from e
    except EntryNotFoundError as e:
        raise LoraError(f"the Hub repo {repo} has no file {filename!r}; name the LoRA file as "
                        f"{repo}:<file>.safetensors") from e
    except RepositoryNotFoundError as e:
        raise LoraError(f"no repo {repo!r} on the Hugging Face Hub (or it is private or gated)") from e
    except Exception as e:  # network errors of every kind
        raise LoraError(f"could not download LoRA {repo}:{filename}: {e}") from e


_HASHES = {}  # (path, size, mtime) -> hex: changing a LoRA's scale does not hash the file again


def sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _hash(path)
    return _HASHES[key]


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_safetensors(path: Path) -> dict:
    """The header of a safetensors file, after checking that it is one and is complete: a pickle or a
    truncated download is named as such instead of failing somewhere inside a reader."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise LoraError(f"{path} is a pickle (a torch .pt/.ckpt/.bin), which is never loaded: convert it "
                            "to .safetensors")
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 1 or 8 + n > size:
            raise LoraError(f"{path} is not a safetensors file, or is truncated (its header does not fit "
                            f"in its {size} bytes); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoraError(f"{path} has a corrupt safetensors header ({e}); download it again") from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        raise LoraError(f"{path} is truncated: its tensors need {8 + n + max(ends)} bytes, the file has {size}; "
                        "download it again")
    return header.get("__metadata__") or {}


def read(ref) -> LoraFile:
    """Resolve, hash, read and group one LoRA file; every file-level error is raised here, before any
    model is touched."""
    path = resolve(ref)
    meta = _check_safetensors(path)
    try:
        tensors = mx.load(str(path))
    except Exception as e:
        raise LoraError(f"cannot read LoRA {path}: {e}; the file is corrupt, download it again") from e
    pairs, ignored = _pairs(tensors, path)
    return LoraFile(path, str(ref), sha256(path), pairs, _peft_configs(meta, path), ignored)


def _peft_configs(meta: dict, path: Path) -> dict:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"{path} has unreadable lora_adapter_metadata ({e})") from e
    out = {}
    for key, value in flat.items():  # diffusers writes {"transformer.lora_alpha": 8, ...}
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    for component, config in out.items():
        if config.get("use_dora"):
            raise LoraError(f"{path} is a DoRA ({component}), which is not supported; use a plain LoRA")
    return out


# --- grouping keys into (A, B, alpha) pairs ---------------------------------------------------------------

_KINDS = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B",
          "alpha": "alpha"}
# Tensors of parts no FLUX loader adapts; diffusers drops them (they are inert when all zero).
_INERT = re.compile(r"(text_encoders\.t5xxl\.|lora_te2_|position_embedding|\.diff_b$|\.diff$)")


def _pairs(tensors: dict, path: Path) -> tuple:
    pairs, ignored = {}, []
    for key, w in tensors.items():
        if _INERT.search(key) and not mx.any(w != 0).item():
            ignored.append(key)
            continue
        stem, kind = _split_key(key, path)
        if kind == "alpha":
            w = float(w.reshape(-1)[0].item())
        pairs.setdefault(stem, {})[kind] = w
    if not pairs:
        raise LoraError(f"{path} has no LoRA tensors (no lora_A/lora_B or lora_down/lora_up keys)")
    for stem, p in pairs.items():
        if "A" not in p or "B" not in p:
            have, lack = ("lora_A", "lora_B") if "A" in p else ("lora_B", "lora_A")
            raise LoraError(f"LoRA {path.name}: {stem!r} has {have if p.keys() - {'alpha'} else 'only an alpha'} "
                            f"but no {lack}; the file is incomplete")
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"LoRA {path.name}: {stem!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                            "not a rank-r pair (r, in) and (out, r) of a Linear layer")
        p.setdefault("alpha", None)
    return pairs, ignored


def _split_key(key: str, path: Path) -> tuple:
    for suffix, kind in _KINDS.items():
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], kind
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        raise LoraError(f"LoRA {path.name} is a DoRA ({key!r}), which is not supported; use a plain LoRA")
    if ".lora_B." in key and key.endswith(".bias"):
        raise LoraError(f"LoRA {path.name} has a LoRA bias ({key!r}), which is not supported")
    raise LoraError(f"LoRA {path.name}: tensor {key!r} is not part of a LoRA pair (lora_A/lora_B, "
                    "lora_down/lora_up or alpha); the file is not a FLUX LoRA this loader reads")


# --- mapping a file's names onto our modules ------------------------------------------------------------

# kohya's underscored BFL names -> BFL's dotted ones (then mapped as BFL names are).
_KOHYA = [
    (r"double_blocks_(\d+)_(img|txt)_attn_(qkv|proj)", r"double_blocks.\1.\2_attn.\3"),
    (r"double_blocks_(\d+)_(img|txt)_mlp_(\d+)", r"double_blocks.\1.\2_mlp.\3"),
    (r"double_blocks_(\d+)_(img|txt)_mod_lin", r"double_blocks.\1.\2_mod.lin"),
    (r"single_blocks_(\d+)_(linear1|linear2)", r"single_blocks.\1.\2"),
    (r"single_blocks_(\d+)_modulation_lin", r"single_blocks.\1.modulation.lin"),
    (r"(time_in|vector_in|guidance_in)_(in_layer|out_layer)", r"\1.\2"),
    (r"(img_in|txt_in)", r"\1"),
    (r"final_layer_linear", "final_layer.linear"),
    (r"final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1"),
]
# A file's key prefix -> (component, naming of the rest).
_PREFIXES = [
    ("transformer.", "transformer", "dotted"),
    ("text_encoder.", "text_encoder", "clip"),
    ("model.diffusion_model.", "transformer", "bfl"),
    ("diffusion_model.", "transformer", "bfl"),
    ("base_model.model.", "transformer", "bfl"),  # fal's Kontext trainer
    ("lora_unet_", "transformer", "kohya"),
    ("lora_transformer_", "transformer", "underscored"),
    ("lora_te1_", "text_encoder", "underscored_clip"),
    ("lora_te_", "text_encoder", "underscored_clip"),
    ("text_encoders.clip_l.transformer.", "text_encoder", "clip"),
]


@dataclass
class Target:
    """Where one LoRA pair goes: our layers (several when the file's layer is a fused BFL one), each
    taking its consecutive rows of lora_B; `swap`: the rows' two halves swap (final modulation)."""
    component: str
    paths: list
    swap: bool = False


def locate(stem: str, layers: dict) -> Target:
    """Our layer(s) for a pair's stem, or None. `layers`: component -> {path: Linear} of the model."""
    for prefix, component, naming in _PREFIXES:
        if not stem.startswith(prefix):
            continue
        name, ours = stem[len(prefix):], layers.get(component, {})
        if naming == "clip" and not name.startswith("text_model."):
            name = "text_model." + name
        if naming in ("dotted", "clip"):
            return Target(component, [name]) if name in ours else None
        if naming in ("underscored", "underscored_clip"):
            if naming == "underscored_clip" and not name.startswith("text_model_"):
                name = "text_model_" + name
            found = {p.replace(".", "_"): p for p in ours}.get(name)
            return Target(component, [found]) if found else None
        if naming == "kohya":
            bfl = next((re.sub(f"^{p}$", r, name) for p, r in _KOHYA if re.fullmatch(p, name)), None)
            if bfl is None:  # some trainers write diffusers' module names the kohya way
                found = {p.replace(".", "_"): p for p in ours}.get(name)
                return Target(component, [found]) if found else None
            name = bfl
        return _from_bfl(name, ours)
    return None


def _from_bfl(name: str, ours: dict):
    for pattern, prefix, names in _BFL_FUSED:
        m = re.fullmatch(pattern, name)
        if m:
            paths = [prefix.format(m.group(1)) + n for n in names]
            return Target("transformer", paths) if all(p in ours for p in paths) else None
    for pattern, repl in _BFL_RENAMES:
        new, n = re.subn(f"^{pattern}$", repl, name)
        if n:
            return Target("transformer", [new], swap=new == "norm_out.linear") if new in ours else None
    return None


def io_dims(layer) -> tuple:
    """(in, out) of a Linear or QuantizedLinear (whose weight is packed along the input)."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.shape[1] * layer.group_size, layer.weight.shape[0]
    return layer.weight.shape[1], layer.weight.shape[0]


def _network_alphas(lora: LoraFile) -> dict:
    """component -> the most common alpha key of a diffusers-format file: diffusers' network_alphas give
    it to a module that has none."""
    out = {}
    for component in COMPONENTS:
        alphas = [p["alpha"] for s, p in lora.pairs.items() if p["alpha"] is not None and s.startswith(component + ".")]
        if alphas:
            out[component] = max(set(alphas), key=alphas.count)
    return out


def _alpha_scale(lora: LoraFile, stem: str, component: str, rank: int, network: dict) -> float:
    """alpha / rank as the LoRA was trained with: the file's alpha key (kohya, older diffusers files),
    else PEFT's config in the header (lora_alpha, alpha_pattern, use_rslora), else 1 (alpha = rank)."""
    alpha = lora.pairs[stem]["alpha"]
    config = lora.metadata.get(component, {})
    if alpha is None and not _kohya_like(stem):
        if component in network:
            alpha = network[component]
        elif config.get("lora_alpha") is not None:
            alpha = config["lora_alpha"]
            module = stem.split(".", 1)[1]
            for pattern, value in (config.get("alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's get_pattern_key
                    alpha = value
                    break
    if alpha is None:
        return 1.0
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _kohya_like(stem: str) -> bool:
    return not stem.startswith(("transformer.", "text_encoder."))


def deltas(lora: LoraFile, layers: dict) -> dict:
    """(component, path) -> [(A, B * alpha/rank)] for every pair of one file, each checked against our
    layers: a pair that matches no layer or does not fit one is an error naming the key and the file."""
    out, unmatched, network = {}, [], _network_alphas(lora)
    for stem, p in lora.pairs.items():
        target = locate(stem, layers)
        if target is None:
            unmatched.append(stem)
            continue
        a, b = p["A"], p["B"]
        b = b * _alpha_scale(lora, stem, target.component, a.shape[0], network)
        parts = [layers[target.component][path] for path in target.paths]
        dims = [io_dims(layer) for layer in parts]
        if any(d[0] != a.shape[1] for d in dims) or sum(d[1] for d in dims) != b.shape[0]:
            want = f"({sum(d[1] for d in dims)}, r) and (r, {dims[0][0]})"
            raise LoraError(f"LoRA {lora.path.name}: {stem!r} has lora_B {tuple(b.shape)} and lora_A "
                            f"{tuple(a.shape)}, but {'+'.join(target.paths)} needs {want}: the LoRA is for "
                            "another model (or another FLUX size)")
        if target.swap:  # BFL's (shift, scale) -> diffusers' (scale, shift), as the base weights are
            b = mx.concatenate(mx.split(b, 2, axis=0)[::-1], axis=0)
        start = 0
        for path, (_, rows) in zip(target.paths, dims):
            out.setdefault((target.component, path), []).append((a, b[start:start + rows]))
            start += rows
    if unmatched:
        n = len(lora.pairs)
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise LoraError(f"LoRA {lora.path.name}: {len(unmatched)} of {n} layers match no layer of this model, "
                        f"first {unmatched[0]!r}{more}; it is not a FLUX.1 LoRA, or for a model of other depth")
    return out


# --- the layers -----------------------------------------------------------------------------------------

class _Delta:
    """The low-rank update of one layer, held outside MLX's parameter tree so that the layer's keys (and
    what `save` writes) stay the base's."""

    def __init__(self, a, b):
        self.a, self.b = a, b


def low_rank(y, x, delta: _Delta):
    """y + (x A^T) B^T, the add done by the second matmul itself (addmm): a third less time than a
    separate add over the layer's output, measured on the CPU at FLUX's width."""
    return mx.addmm(y, x @ delta.a.T, delta.b.T)


class LoraLinear(nn.Linear):
    """nn.Linear's parameters, plus x A^T B^T (the scaled LoRAs of this layer, concatenated by rank)."""

    def __call__(self, x):
        return low_rank(super().__call__(x), x, self.lora)


class LoraQuantizedLinear(nn.QuantizedLinear):
    """A 4- or 8-bit layer with its LoRAs beside it at full precision: nothing of them is quantized."""

    def __call__(self, x):
        return low_rank(super().__call__(x), x, self.lora)


def wrap(layer, a: mx.array, b: mx.array):
    """A layer of LoRA class sharing `layer`'s very parameters (nothing copied), with a, b in its dtype."""
    cls = LoraQuantizedLinear if isinstance(layer, nn.QuantizedLinear) else LoraLinear
    dtype = (layer.scales if isinstance(layer, nn.QuantizedLinear) else layer.weight).dtype
    new = cls.__new__(cls)
    dict.update(new, layer)
    new.__dict__.update(layer.__dict__, _no_grad=set(layer._no_grad))
    new.lora = _Delta(a.astype(dtype), b.astype(dtype))
    mx.eval(new.lora.a, new.lora.b)
    return new


def linear_layers(model) -> dict:
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}


def combine(per_file: list) -> dict:
    """[(scale, deltas(...))] -> (component, path) -> (A, B): one pair per layer, the files' ranks
    concatenated and each file's scale folded into its B. A file at scale 0 contributes nothing."""
    merged = {}
    for scale, d in per_file:
        if scale == 0:
            continue
        for key, pairs in d.items():
            merged.setdefault(key, []).extend((a, b * scale) for a, b in pairs)
    return {key: (mx.concatenate([a for a, _ in pairs]), mx.concatenate([b for _, b in pairs], axis=1))
            for key, pairs in merged.items()}


def parse_arg(text: str) -> tuple:
    """`--lora PATH[:SCALE]` -> (reference, scale): the last `:NUMBER` is the scale (default 1), so a Hub
    reference keeps its own colon: `owner/name:file.safetensors:0.8`."""
    ref, sep, tail = str(text).rpartition(":")
    if sep:
        try:
            return ref, float(tail)
        except ValueError:
            pass
    if not text:
        raise ValueError("--lora needs a file or Hub reference, optionally with :SCALE")
    return str(text), 1.0


# --- on a pipeline --------------------------------------------------------------------------------------

def read_all(loras) -> list:
    """[(LoraFile, scale)] for what `from_pretrained(loras=...)` or `set_loras` take: a path or Hub
    reference, a (reference, scale) pair, or a recorded dict {"source", "scale", "sha256"} (whose
    file must still have that SHA-256). Every file is read and checked here, before any model work."""
    out = []
    for item in loras or []:
        if isinstance(item, dict):
            if "source" not in item and "file" not in item:
                raise ValueError(f"a recorded LoRA needs a 'source' (its path or Hub reference), not {item!r}")
            ref, scale = item.get("source") or item["file"], item.get("scale", 1.0)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            ref, scale = item
        elif isinstance(item, (str, os.PathLike)):
            ref, scale = item, 1.0
        else:
            raise ValueError(f"a LoRA is a path or Hub reference, or (reference, scale), not {item!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"the scale of LoRA {ref!r} must be a finite number, not {scale!r}")
        f = ref if isinstance(ref, LoraFile) else read(ref)
        want = item.get("sha256") if isinstance(item, dict) else None
        if want and want != f.sha256:
            raise LoraError(f"LoRA {f.source!r} ({f.path}) has changed since it was recorded: SHA-256 "
                            f"{f.sha256[:12]}..., the recipe has {want[:12]}...; put the recorded file back")
        out.append((f, float(scale)))
    return out


def verify(records: list) -> list:
    """Check recorded LoRAs ({"file", "scale", "sha256", "source"}) against the files their sources
    name now: a missing or changed file is one LoraError. Returns [(LoraFile, scale)] for `set_loras`."""
    for r in records:
        if not isinstance(r, dict) or not r.get("sha256"):
            raise ValueError(f"a recorded LoRA is a dict with 'source', 'scale' and 'sha256', not {r!r}")
    try:
        return read_all(records)
    except LoraError as e:
        raise LoraError(f"a LoRA this image was made with cannot be used: {e}") from e


def recorded(pipe) -> list:
    """What a recipe records of the pipeline's LoRAs, in their order."""
    state = getattr(pipe, "_lora_state", None)
    files = state["files"] if state else []
    return [dict(file=f.path.name, scale=s, sha256=f.sha256, source=f.source) for f, s in files]


def set_loras(pipe, loras) -> None:
    """Replace the pipeline's LoRAs by `loras` (see read_all; [] removes them all). Everything is
    checked against the base layers before any layer changes; the base comes back exactly."""
    files = read_all(loras)
    state = _state(pipe)
    models = {c: _model(pipe, c, files) for c in COMPONENTS}
    layers = {c: _base_layers(state, c, m) for c, m in models.items() if m is not None}
    combined = combine([(s, deltas(f, layers)) for f, s in files])
    for c, m in models.items():
        if m is not None:
            _restore(state, c, m)
    # The files' tensors are not kept (set_loras reads files again); CLIP's pairs are, for low-memory
    # mode's copies of CLIP read later. The transformer's live only in its wrapped layers.
    state["files"] = [(dataclasses.replace(f, pairs={}), s) for f, s in files]
    state["combined"] = combined
    for c, m in models.items():
        if m is not None:
            _apply(state, c, m)
    state["combined"] = {k: v for k, v in combined.items() if k[0] == "text_encoder"}
    pipe._prompt_cache.clear()  # the text encoder's LoRAs change what a prompt encodes to


def _state(pipe) -> dict:
    state = getattr(pipe, "_lora_state", None)
    if state is None:
        state = pipe._lora_state = {"files": [], "combined": {}, "bases": {}}
        reload = getattr(pipe, "_reload_encoders", None)
        if reload is not None:  # low-memory mode: encoders read again later get the LoRAs too
            def reload_with_loras():
                clip_model, t5_model = reload()
                _apply(state, "text_encoder", clip_model)
                return clip_model, t5_model
            pipe._reload_encoders = reload_with_loras
    return state


def _model(pipe, component, files):
    model = getattr(pipe, component)
    if model is None and component == "text_encoder" and any(s.startswith(("text_encoder", "lora_te"))
                                                              for f, _ in files for s in f.pairs):
        pipe.text_encoder, pipe.text_encoder_2 = pipe._reload_encoders()  # freed in low-memory mode
        model = pipe.text_encoder
    return model


def _base_layers(state, component, model) -> dict:
    bases = state["bases"]
    return {p: bases[(component, p)][1] if bases.get((component, p), (None,))[0] is model else m
            for p, m in linear_layers(model).items()}


def _restore(state, component, model):
    back = [(p, layer) for (c, p), (owner, layer) in state["bases"].items() if c == component and owner is model]
    if back:
        model.update_modules(tree_unflatten(back))
    state["bases"] = {k: v for k, v in state["bases"].items() if k[0] != component}


def _apply(state, component, model):
    layers = linear_layers(model)
    swaps = []
    for (c, path), (a, b) in state["combined"].items():
        if c == component:
            state["bases"][(c, path)] = (model, layers[path])
            swaps.append((path, wrap(layers[path], a, b)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
