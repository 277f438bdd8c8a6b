"""A model's folder, opened and checked before any weights are read.

Opening reads what is cheap (every config, the weight files an index lists, the tokenizers, the
scheduler and the model's defaults), so that a recipe can be resolved and checked against the model
(`check`), and bad files found, before the first of many gigabytes is read. `Pipeline.load` takes it
from there; the CLI and the app use the same object, so they check exactly what the pipeline checks.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import footprint, memory, weights
from .defaults import Defaults
from .models.autoencoder import VAEParams
from .models.config import ConfigError
from .models.flux import FluxParams
from .recipe import Recipe, RecipeError
from .tokenizer import Tokenizer

MODELS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@dataclass
class ModelFolder:
    source: str  # as the user named it: "demo", "schnell", a Hub id or a folder
    folder: Path
    configs: dict  # component -> its config.json
    tokenizer: Tokenizer  # CLIP's
    tokenizer_2: Tokenizer  # T5's
    scheduler: dict
    defaults: Defaults
    vocabulary: Optional[tuple] = None  # the only words a small model knows (crepulse.json), if it says
    example_prompt: Optional[str] = None
    _weights: dict = field(default_factory=dict, repr=False, compare=False)  # quantize -> weights' bytes
    family = "flux1"  # the model family; klein.KleinFolder's is "flux2-klein"

    @classmethod
    def open(cls, source: str = "demo", progress: bool = False) -> "ModelFolder":
        folder = weights.resolve(source, progress=progress)
        index = weights.read_json(folder / "model_index.json")
        if index.get("_class_name") == "Flux2KleinPipeline":  # FLUX.2 [klein]: its own components
            from .klein import KleinFolder
            return KleinFolder.open_at(str(source), folder, index)
        missing = [c for c in weights.COMPONENTS if c not in index or not (folder / c).is_dir()]
        if missing:
            raise weights.WeightsError(f"{folder} is not a complete FLUX pipeline: missing {', '.join(missing)}")
        configs = {name: weights.read_json(folder / name / "config.json") for name in MODELS}
        for name, params in (("transformer", FluxParams), ("vae", VAEParams)):
            try:
                params.from_config(configs[name])
            except ConfigError as e:
                raise weights.WeightsError(f"{folder / name / 'config.json'}: {e}; the folder is not a FLUX.1 "
                                           "pipeline, or its config is damaged") from None
        for name in configs:
            weights.weight_files(folder / name)
        tokenizer, tokenizer_2 = (_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2"))
        scheduler = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        extra = weights.read_json(folder / "crepulse.json") if (folder / "crepulse.json").exists() else {}
        vocabulary = extra.get("vocabulary")
        return cls(str(source), folder, configs, tokenizer, tokenizer_2, scheduler, _defaults(folder, configs),
                   tuple(vocabulary) if isinstance(vocabulary, list) else None, extra.get("example_prompt"))

    @property
    def saved_bits(self) -> Optional[int]:
        """The bits of a folder saved already quantized (by `Pipeline.save`), else None."""
        q = self.configs["transformer"].get("quantization")
        return q["bits"] if q else None

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: 2x2 patches of the VAE's latent pixels (16 for FLUX)."""
        return max(16, 2 * 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1))

    def resolve(self, recipe: Recipe, quantize: Optional[int] = None, force: bool = False) -> Recipe:
        """The recipe with this model's defaults, checked against it (and, unless `force`, against this
        machine's memory)."""
        resolved = recipe.resolve(self.defaults, model=self.source, quantize=self.saved_bits or quantize)
        self.check(resolved, force)
        return resolved

    def check(self, recipe: Recipe, force: bool = False):
        """What a resolved recipe asks that this model (or, unless `force`, this machine's memory)
        cannot do: one RecipeError naming it."""
        m = self.size_multiple
        for name in ("width", "height"):
            v = getattr(recipe, name)
            if v % m:
                raise RecipeError(f"{name} {v} must be a multiple of {m} (try {max(m, round(v / m) * m)})")
        p = self.transformer_params
        try:
            if recipe.method is not None:
                recipe.method.check_model(p.num_layers, p.num_attention_heads * p.attention_head_dim)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if not force:
            footprint.check(self.configs, recipe, self.weights_bytes(recipe.quantize),
                            scores_materialised=mx.default_device() == mx.cpu)

    def weights_bytes(self, quantize: Optional[int]) -> int:
        """The weights' bytes once loaded with `quantize`, from the safetensors headers; read once per
        precision, as every generate checks its batch against them."""
        if quantize not in self._weights:
            self._weights[quantize] = memory.weights_bytes(self, quantize)
        return self._weights[quantize]

    @property
    def transformer_params(self):
        return FluxParams.from_config(self.configs["transformer"])

    def unknown_words(self, prompt: str) -> list:
        """The words of a prompt outside the model's vocabulary, for a model that names one (the demo:
        the words of its captions); [] for the others."""
        if not self.vocabulary:
            return []
        words = re.findall(r"[\w'-]+", prompt.lower())
        return [w for w in dict.fromkeys(words) if w not in self.vocabulary]

    @property
    def sequence_tokenizer(self) -> Tokenizer:
        """The tokenizer whose tokens `max_sequence_length` counts: T5's for FLUX.1."""
        return self.tokenizer_2

    def token_overflow(self, recipe: Recipe) -> list:
        """(what, tokens, limit) for the prompt and negative prompt that are longer than the recipe's
        sequence length (the pipeline cuts them, as diffusers does)."""
        out = []
        for what, text in (("prompt", recipe.prompt), ("negative prompt", recipe.negative_prompt)):
            if text:
                count = self.sequence_tokenizer.count(text)
                if count > recipe.max_sequence_length:
                    out.append((what, count, recipe.max_sequence_length))
        return out


def _tokenizer(folder: Path) -> Tokenizer:
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not files:
        raise weights.WeightsError(f"the tokenizer folder {folder} is missing or empty; download or convert the "
                                   "model again")
    try:
        return Tokenizer(folder)
    except Exception as e:  # tokenizers and transformers raise OSError, ValueError, TypeError, Exception...
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "its tokenizer.json is damaged" if "tokenizer.json" in files else "its files are incomplete"
        raise weights.WeightsError(f"cannot load the tokenizer in {folder}: {what} ({cause}); download or "
                                   "convert the model again") from e


def _defaults(folder: Path, configs: dict) -> Defaults:
    extra = folder / "crepulse.json"
    overrides = weights.read_json(extra) if extra.exists() else None
    try:
        return Defaults.for_model(bool(configs["transformer"].get("guidance_embeds")), overrides)
    except ValueError as e:
        raise weights.WeightsError(f"{extra}: {str(e).replace('crepulse.json: ', '')}") from None
