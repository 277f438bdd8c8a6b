"""The FLUX.2 [klein] family: loading a `Flux2KleinPipeline` folder, and what its pipeline does differently.

`ModelFolder.open` sends a folder whose `model_index.json` names `Flux2KleinPipeline` here (a
`KleinFolder`: the same cheap checks before any weights), and `Pipeline.load` sends that on to
`KleinPipeline.load`. A `KleinPipeline` is a `Pipeline` (the same sampler, hook, diversity methods,
recipes, callbacks) with FLUX.2's pieces: one Qwen3 text encoder and its chat template (no pooled vector,
no second tokenizer), 4-axis positions, the empirical-mu schedule of diffusers' `compute_empirical_mu`,
and the VAE's BatchNorm normalisation in place of FLUX.1's scale and shift. Distilled variants run
without CFG; base variants run true CFG against the empty prompt, its two branches repelled as two
groups. Image to image (`generate(image=...)`) is FLUX.1's (the start image noised), not [klein]'s
reference-image editing, which is not ported.
"""

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from . import sampling, weights
from .chat_tokenizer import ChatTokenizer
from .defaults import Defaults, _scale_range
from .model_folder import ModelFolder
from .models import autoencoder, qwen3
from .models.autoencoder_flux2 import AutoencoderKLFlux2
from .models.autoencoder_flux2 import sanitize as vae_sanitize
from .models.config import ConfigError
from .models.flux2 import Flux2Params, Flux2Transformer, image_ids, text_ids
from .pipeline import Pipeline

CLASS_NAME = "Flux2KleinPipeline"  # model_index.json's _class_name (model_folder.py reads it)
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")
QUANTIZED = ("transformer", "text_encoder")


def empirical_mu(image_tokens: int, steps: int) -> float:
    """diffusers' compute_empirical_mu (pipeline_flux2_klein.py): a fit in image tokens and step count."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_tokens > 4300:
        return float(a2 * image_tokens + b2)
    m_200, m_10 = a2 * image_tokens + b2, a1 * image_tokens + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + (m_200 - 200.0 * a))


def schedule(steps: int, image_tokens: int, config: dict) -> list:
    """Sigmas (steps + 1 values) as FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n),
    mu=empirical_mu) makes them for this scheduler config."""
    unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                               "invert_sigmas", "use_flow_sigmas") if config.get(k)]
    if unsupported:
        raise weights.WeightsError(f"the scheduler config sets {', '.join(unsupported)}, which this port does not "
                                   "implement; use the model's own scheduler_config.json")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if config.get("use_dynamic_shifting", False):
        mu = empirical_mu(image_tokens, steps)
        if config.get("time_shift_type", "exponential") == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1))
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [float(s) for s in np.asarray(sigmas, np.float32)] + [0.0]


@dataclass
class KleinFolder(ModelFolder):
    """An opened [klein] folder: one tokenizer (Qwen3's, with its chat template) and no tokenizer_2."""
    layers: tuple = qwen3.LAYERS  # the Qwen3 hidden states stacked (crepulse.json text_encoder_out_layers)
    distilled: bool = True
    variant: str = "klein"
    family = "flux2-klein"

    @classmethod
    def open_at(cls, source: str, folder: Path, index: dict) -> "KleinFolder":
        """What is cheap, read and checked before any weights: the components, every config, the weight
        files, the tokenizer, the scheduler, crepulse.json."""
        missing = [c for c in COMPONENTS if c not in index or not (folder / c).is_dir()]
        if missing:
            raise weights.WeightsError(f"{folder} is not a complete FLUX.2 [klein] pipeline: missing "
                                       f"{', '.join(missing)}")
        configs = {name: weights.read_json(folder / name / "config.json")
                   for name in ("transformer", "text_encoder", "vae")}
        for name, check in (("transformer", Flux2Params.from_config), ("text_encoder", qwen3.Qwen3Params.from_config),
                            ("vae", AutoencoderKLFlux2.check_config)):
            try:
                check(configs[name])
            except ConfigError as e:
                raise weights.WeightsError(f"{folder / name / 'config.json'}: {e}; the folder is not a FLUX.2 "
                                           "[klein] pipeline, or its config is damaged") from None
        for name in configs:
            weights.weight_files(folder / name)
        extra = weights.read_json(folder / "crepulse.json") if (folder / "crepulse.json").exists() else {}
        layers = tuple(extra.get("text_encoder_out_layers", qwen3.LAYERS))
        total = configs["text_encoder"]["num_hidden_layers"]
        if not layers or not all(isinstance(k, int) and 0 <= k <= total for k in layers):
            raise weights.WeightsError(f"{folder / 'crepulse.json'}: text_encoder_out_layers {list(layers)} must be "
                                       f"layer numbers 0 to {total} of the text encoder")
        distilled = bool(index.get("is_distilled", False))
        name = variant(distilled, configs["transformer"])
        try:
            defaults = defaults_for(name, extra)
        except ValueError as e:
            raise weights.WeightsError(f"{folder / 'crepulse.json'}: {str(e).replace('crepulse.json: ', '')}") from None
        return cls(source, folder, configs, _tokenizer(folder / "tokenizer"), None,
                   weights.read_json(folder / "scheduler" / "scheduler_config.json"), defaults,
                   layers=layers, distilled=distilled, variant=name)

    @property
    def transformer_params(self):
        return Flux2Params.from_config(self.configs["transformer"])

    @property
    def sequence_tokenizer(self):
        """Qwen3's, which counts the prompt in its chat template."""
        return self.tokenizer


class KleinPipeline(Pipeline):
    def __init__(self, files: KleinFolder, transformer, text_encoder, vae, quantize=None, reload_encoders=None):
        super().__init__(files, transformer, text_encoder, None, vae, quantize=quantize,
                         reload_encoders=reload_encoders)
        self.distilled, self.variant, self.family = files.distilled, files.variant, files.family

    @classmethod
    def load(cls, files: KleinFolder, quantize: Optional[int] = None, low_memory: bool = False) -> "KleinPipeline":
        """Read the weights of an opened [klein] folder, the transformer and Qwen3 quantized while loading
        when asked (to 4 or 8 bits)."""
        def component(name, model, sanitize):
            saved = files.configs[name].get("quantization")
            bits = quantize if (name in QUANTIZED and not saved) else None
            return weights.load_into(model, files.folder / name, sanitize, bits, saved)

        def encoders():
            keep = max(files.layers)
            return component("text_encoder", qwen3.Qwen3Encoder(files.configs["text_encoder"], files.layers),
                             lambda w: qwen3.sanitize(w, keep)), None

        transformer = component("transformer", Flux2Transformer(files.configs["transformer"]), None)
        vae = component("vae", AutoencoderKLFlux2(files.configs["vae"]), vae_sanitize)
        text_encoder, _ = encoders()
        return cls(files, transformer, text_encoder, vae, quantize=files.saved_bits or quantize,
                   reload_encoders=encoders if low_memory else None)

    def save(self, folder):
        """Write a folder in the diffusers layout that loads again as it is (already quantized, if it is).
        Qwen3 is written as loaded: only the layers the pipeline reads (a folder for this package, which
        transformers would not load as a language model)."""
        folder = Path(folder)
        src = self.files.folder
        q = {"bits": self.quantize, "group_size": weights.GROUP_SIZE} if self.quantize else None
        if self.text_encoder is None:
            self.text_encoder, _ = self._reload_encoders()
        parts = [("transformer", self.transformer, None, q), ("text_encoder", self.text_encoder, None, q),
                 ("vae", self.vae, autoencoder.unsanitize, None)]
        for name, model, unsanitize, quant in parts:
            weights.save_component(model, model.config, folder / name, unsanitize, quant)
        weights.copy_files(src, folder, ["model_index.json", "tokenizer", "scheduler"] +
                           (["crepulse.json"] if (src / "crepulse.json").exists() else []))

    # --- what FLUX.2 does differently --------------------------------------------------------------

    def _encode(self, prompt: str, max_sequence_length: int):
        """(stacked Qwen3 states (1, L, 3 x hidden), None: FLUX.2 has no pooled vector)."""
        ids, mask = self.tokenizer.ids(prompt, max_sequence_length)
        return self.text_encoder(mx.array(ids), mx.array(mask)).astype(self.dtype), None

    def schedule(self, steps: int, image_tokens: int) -> list:
        return schedule(steps, image_tokens, self.scheduler_config)

    def positions(self, text_tokens: int, rows: int, cols: int) -> tuple:
        return self.transformer.pos_embed(text_ids(text_tokens), image_ids(rows, cols))

    def _to_vae(self, tokens: mx.array, rows: int, cols: int) -> mx.array:
        """FLUX.2's VAE normalises its latents with batch-norm statistics, in the packed layout."""
        return sampling.unpack(self.vae.denormalize(tokens.astype(mx.float32)), rows, cols)

    def _from_vae(self, z: mx.array) -> mx.array:
        return self.vae.normalize(sampling.pack(z))


def _tokenizer(folder: Path) -> ChatTokenizer:
    try:
        return ChatTokenizer(folder)
    except Exception as e:
        raise weights.WeightsError(f"cannot load the Qwen3 tokenizer in {folder}: {e}; download or convert the "
                                   "model again") from e


# Per-variant defaults, by the aliases' names. Steps and CFG are the model cards': distilled 4 steps without
# CFG, base 50 steps with CFG 4 against the empty prompt; 1024 px; Qwen3 512 tokens. The repulsion scale range
# is this package's FLUX.1 range (1e8, 5e9) transferred by equal relative update of the first repelled block
# at full width (scripts/klein_scale.py: factor 1.00 for 4B's 512 x 3072 text stream, 1.33 for 9B's
# 512 x 4096), measured on synthetic activations and unmeasured on real weights. Repelled steps: 1 for the
# distilled models (the paper's tau for Flux-dev and SD3.5-Turbo), 7 of 50 for base (SD3.5-Large's 4 of 28,
# the paper's true-CFG model, at the same fraction of the trajectory); 50 iterations (the paper's M for Flux-dev).
_DISTILLED = dict(steps=4, guidance=None, true_cfg=1.0, width=1024, height=1024, max_sequence_length=512,
                  repulsion_iterations=50, repulsion_steps=1)
_BASE = dict(_DISTILLED, steps=50, true_cfg=4.0, repulsion_steps=7)
VARIANTS = {
    "klein": dict(_DISTILLED, repulsion_scale_range=(1e8, 5e9)),
    "klein-base": dict(_BASE, repulsion_scale_range=(1e8, 5e9)),
    "klein-9b": dict(_DISTILLED, repulsion_scale_range=(1.33e8, 6.67e9)),
    "klein-9b-base": dict(_BASE, repulsion_scale_range=(1.33e8, 6.67e9)),
}


def variant(distilled: bool, transformer_config: dict) -> str:
    """The alias name of a folder's variant: 9B's transformer is 4096 wide (32 heads), 4B's 3072."""
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return ("klein-9b" if width >= 4096 else "klein") + ("" if distilled else "-base")


def defaults_for(name: str, extra: dict) -> Defaults:
    """The variant's defaults, then the folder's crepulse.json over them (as for FLUX.1; checked the same)."""
    known = {k: v for k, v in extra.items() if k in {f.name for f in fields(Defaults)}}
    if "repulsion_scale_range" in known:
        known["repulsion_scale_range"] = _scale_range(known["repulsion_scale_range"])
    d = replace(Defaults(**VARIANTS[name]), **known)
    d.check()
    return d
