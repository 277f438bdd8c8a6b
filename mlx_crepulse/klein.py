"""The FLUX.2 [klein] family: loading a `Flux2KleinPipeline` folder, and what its pipeline does differently.

`Pipeline.from_pretrained` sends a folder whose `model_index.json` names `Flux2KleinPipeline` here. A
`KleinPipeline` is a `Pipeline` (the same sampler, hook, diversity methods, callbacks) with FLUX.2's
pieces: one Qwen3 text encoder and its chat template (no pooled vector, no second tokenizer), 4-axis
positions, the empirical-mu schedule of diffusers' `compute_empirical_mu`, and the VAE's BatchNorm
normalisation in place of FLUX.1's scale and shift. Distilled variants run without CFG; base variants
run true CFG against the empty prompt, its two branches repelled as two groups.
"""

from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from . import sampling, weights
from .chat_tokenizer import ChatTokenizer
from .models import qwen3
from .models.autoencoder_flux2 import AutoencoderKLFlux2
from .models.autoencoder_flux2 import sanitize as vae_sanitize
from .models.flux2 import Flux2Transformer, image_ids, text_ids
from .pipeline import VAE_TILE, Defaults, Pipeline, _dtype_of, _saved_bits

CLASS_NAME = "Flux2KleinPipeline"
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")
QUANTIZED = ("transformer", "text_encoder")
# The Hub's [klein] repos (diffusers layout). 4B: Apache-2.0; 9B: FLUX non-commercial licence (gated).
ALIASES = {"klein": "black-forest-labs/FLUX.2-klein-4B", "klein-base": "black-forest-labs/FLUX.2-klein-base-4B",
           "klein-9b": "black-forest-labs/FLUX.2-klein-9B", "klein-9b-base": "black-forest-labs/FLUX.2-klein-base-9B"}
HUB_PATTERNS = ["model_index.json", "crepulse.json"] + [f"{c}/*.json" for c in COMPONENTS] + [
    f"{c}/*.safetensors" for c in ("transformer", "text_encoder", "vae")] + ["tokenizer/*.txt", "tokenizer/*.jinja"]


def is_klein(index: dict) -> bool:
    return index.get("_class_name") == CLASS_NAME


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


class KleinPipeline(Pipeline):
    def __init__(self, transformer, text_encoder, vae, tokenizer, scheduler_config: dict, defaults: Defaults,
                 source: str = "", quantize=None, reload_encoders=None, distilled: bool = True):
        super().__init__(transformer, text_encoder, None, vae, tokenizer, None, scheduler_config, defaults,
                         source=source, quantize=quantize, reload_encoders=reload_encoders)
        self.distilled = distilled
        self.family = "flux2-klein"

    @classmethod
    def load(cls, folder: Path, index: dict, source: str, quantize: Optional[int] = None,
             low_memory: bool = False) -> "KleinPipeline":
        """Everything cheap is checked first (configs, weight files, tokenizer, scheduler), then the
        components are read, the transformer and Qwen3 quantized while loading when asked."""
        missing = [c for c in COMPONENTS if c not in index or not (folder / c).is_dir()]
        if missing:
            raise weights.WeightsError(f"{folder} is not a complete FLUX.2 [klein] pipeline: missing "
                                       f"{', '.join(missing)}")
        configs = {name: weights.read_json(folder / name / "config.json")
                   for name in ("transformer", "text_encoder", "vae")}
        for name in configs:
            weights.weight_files(folder / name)
        tokenizer = _tokenizer(folder / "tokenizer")
        scheduler = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        extra = weights.read_json(folder / "crepulse.json") if (folder / "crepulse.json").exists() else {}
        layers = tuple(extra.get("text_encoder_out_layers", qwen3.LAYERS))

        def component(name, model, sanitize):
            saved = configs[name].get("quantization")
            bits = quantize if (name in QUANTIZED and not saved) else None
            return weights.load_into(model, folder / name, sanitize, bits, saved)

        def encoders():
            keep = max(layers)
            return component("text_encoder", qwen3.Qwen3Encoder(configs["text_encoder"], layers),
                             lambda w: qwen3.sanitize(w, keep)), None

        transformer = component("transformer", Flux2Transformer(configs["transformer"]), None)
        vae = component("vae", AutoencoderKLFlux2(configs["vae"]), vae_sanitize)
        text_encoder, _ = encoders()
        distilled = bool(index.get("is_distilled", False))
        return cls(transformer, text_encoder, vae, tokenizer, scheduler, defaults_for(folder, distilled, extra),
                   source=str(source), quantize=_saved_bits(transformer.config) or quantize,
                   reload_encoders=encoders if low_memory else None, distilled=distilled)

    def save(self, folder):
        raise NotImplementedError("saving a FLUX.2 [klein] pipeline is not supported yet; load it from its "
                                  "folder or Hub id (with quantize=4 or 8) instead")

    # --- what FLUX.2 does differently --------------------------------------------------------------

    def token_count(self, prompt: str) -> int:
        """Qwen3 tokens of the prompt in its chat template, to warn when it exceeds max_sequence_length."""
        return self.tokenizer.count(prompt)

    def encode(self, prompt: str, max_sequence_length: int):
        """(stacked Qwen3 states (1, L, 3 x hidden), None: FLUX.2 has no pooled vector), cached per prompt."""
        key = (prompt, max_sequence_length)
        if key not in self._prompt_cache:
            if self.text_encoder is None:
                self.text_encoder, _ = self._reload_encoders()
            ids, mask = self.tokenizer.ids(prompt, max_sequence_length)
            txt = self.text_encoder(mx.array(ids), mx.array(mask)).astype(self.dtype)
            mx.eval(txt)
            if len(self._prompt_cache) > 8:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = (txt, None)
            if self._reload_encoders is not None:  # low-memory mode: free the encoder at once
                self.text_encoder = None
        return self._prompt_cache[key]

    def schedule(self, steps: int, image_tokens: int) -> list:
        return schedule(steps, image_tokens, self.scheduler_config)

    def positions(self, text_tokens: int, rows: int, cols: int) -> tuple:
        return self.transformer.pos_embed(text_ids(text_tokens), image_ids(rows, cols))

    def decode(self, tokens: mx.array, rows: int, cols: int) -> np.ndarray:
        """Packed latents -> float32 images (n, H, W, 3) in [0, 1], one image at a time."""
        vae = self.vae
        out = []
        for i in range(tokens.shape[0]):
            z = sampling.unpack(vae.denormalize(tokens[i:i + 1].astype(mx.float32)), rows, cols)
            z = z.astype(_dtype_of(vae))
            img = vae.decode_tiled(z, VAE_TILE) if self.low_memory and max(z.shape[1:3]) > VAE_TILE else vae.decode(z)
            out.append(np.array(mx.clip(img.astype(mx.float32) / 2 + 0.5, 0, 1)))
        return np.concatenate(out, axis=0)

    def encode_image(self, images: np.ndarray) -> mx.array:
        """Float images (n, H, W, 3) in [0, 1] -> packed, normalised latents (the VAE's mean)."""
        vae = self.vae
        z = vae.encode(mx.array(images * 2 - 1).astype(_dtype_of(vae)))
        return vae.normalize(sampling.pack(z.astype(mx.float32)))


def _tokenizer(folder: Path) -> ChatTokenizer:
    try:
        return ChatTokenizer(folder)
    except Exception as e:
        raise weights.WeightsError(f"cannot load the Qwen3 tokenizer in {folder}: {e}; download or convert the "
                                   "model again") from e


# Per-variant defaults. Steps and guidance are the model cards' (distilled: 4 steps, no CFG; base: 50 steps,
# CFG 4 against the empty prompt); the repulsion scale range is transferred from the paper's Flux-dev range
# (see DIVERSITY below and scripts/klein_scale.py), unmeasured on real weights.
VARIANTS = {
    True: dict(steps=4, guidance=None, true_cfg=1.0, width=1024, height=1024, max_sequence_length=512),
    False: dict(steps=50, guidance=None, true_cfg=4.0, width=1024, height=1024, max_sequence_length=512),
}


def defaults_for(folder: Path, distilled: bool, extra: dict) -> Defaults:
    """The variant's defaults, then the folder's crepulse.json over them (as for FLUX.1)."""
    d = dict(VARIANTS[distilled], repulsion_scale_range=DIVERSITY[distilled])
    known = {k: v for k, v in extra.items() if k in Defaults.__dataclass_fields__}
    d = Defaults(**{**d, **known})
    d.repulsion_scale_range = tuple(d.repulsion_scale_range)
    return d


# The repulsion scale range, transferred from Flux-dev's (paper: eta 5e6 to 8e9; this package's FLUX.1 range
# 1e8 to 5e9) by keeping the first repelled block's relative update size |eta dH/dtxt| / |txt| equal; the
# ratio was measured on synthetic full-width activations (scripts/klein_scale.py). Unmeasured on real weights.
DIVERSITY = {True: (1e8, 5e9), False: (1e8, 5e9)}
