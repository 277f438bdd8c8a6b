"""Prompt -> batch of images: text encoding, the batched flow-matching sampler, VAE decoding.

The n images of a call go through the transformer as one batch, which is what lets repulsion compare
them inside the forward pass. A diversity method (contextual repulsion or a baseline, `repulsion.py`)
acts through three narrow points of the sampler: the text condition (CADS), a hook between the
transformer's blocks (repulsion, blending), and the velocity (particle guidance).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import memory, sampling, weights
from .models import autoencoder, clip, t5
from .models.flux import FluxTransformer
from .repulsion import Blend, Method, Recording, Repulsion, signature
from .tokenizer import Tokenizer

__version__ = "0.1.0"


VAE_TILE = 32  # latent pixels (256 image pixels for FLUX) per tile in the low-memory mode's decode


DEFAULT_DIVERSITY = 0.5  # the diversity knob's default (CLI and app): the recommended range's geometric middle


class Cancelled(Exception):
    """Raised by `generate` when its callback asked to stop; nothing half-done is returned."""


@dataclass
class Defaults:
    """A model's own defaults; a folder's `crepulse.json` overrides the ones FLUX.1's configs imply."""
    steps: int = 4
    guidance: Optional[float] = None  # the embedded guidance of dev-like models
    true_cfg: float = 1.0
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 256
    repulsion_scale_range: tuple = (1e8, 5e9)  # what the 0..1 diversity knob maps onto (log scale)
    repulsion_iterations: int = 50
    repulsion_steps: int = 1

    @classmethod
    def for_model(cls, folder: Path, transformer_config: dict) -> "Defaults":
        if transformer_config.get("guidance_embeds"):  # FLUX.1-dev: the paper's settings
            d = cls(steps=20, guidance=3.5, max_sequence_length=512)
        else:  # FLUX.1-schnell
            d = cls()
        extra = folder / "crepulse.json"
        if extra.exists():
            known = {k: v for k, v in weights.read_json(extra).items() if k in cls.__dataclass_fields__}
            d = cls(**{**d.__dict__, **known})
        d.repulsion_scale_range = tuple(d.repulsion_scale_range)
        return d

    def repulsion_scale(self, diversity: float) -> float:
        """The diversity knob -> a repulsion scale, log scale over `repulsion_scale_range`: 0 its low end,
        0.5 its geometric middle (the recommended scale), 1 its high end, past 1 extrapolated; 3 significant
        digits, as recipes record it."""
        lo, hi = self.repulsion_scale_range
        return float(f"{lo * (hi / lo) ** float(diversity):.3g}")

    def repulsion(self, diversity: float = DEFAULT_DIVERSITY, **overrides) -> Repulsion:
        """Contextual repulsion at a diversity, with this model's iterations and repelled steps
        (`overrides`: any other Repulsion field, e.g. blocks or reference)."""
        return Repulsion(**{"scale": self.repulsion_scale(diversity), "iterations": self.repulsion_iterations,
                            "steps": self.repulsion_steps, **overrides})


@dataclass
class Progress:
    """What a callback sees after each step. `preview()` decodes the current prediction of the clean
    image (one VAE decode, so call it when it pays)."""
    step: int
    steps: int
    elapsed: float
    n: int
    _pipe: "Pipeline" = field(repr=False)
    _x0: mx.array = field(repr=False)
    _grid: tuple = field(repr=False)

    @property
    def eta(self) -> float:
        return self.elapsed / self.step * (self.steps - self.step) if self.step else 0.0

    def preview(self) -> np.ndarray:
        return self._pipe.decode(self._x0, *self._grid)


@dataclass
class Result:
    images: list
    seeds: list
    noise: np.ndarray  # the initial packed noise of each image, (n, tokens, channels)
    signatures: np.ndarray  # one compact contextual signature per image (float16), see repulsion.signature
    settings: dict  # everything needed to run the call again
    seconds: float = 0.0


class Pipeline:
    def __init__(self, transformer, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2,
                 scheduler_config: dict, defaults: Defaults, source: str = "", quantize=None,
                 reload_encoders: Optional[Callable] = None):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config, self.defaults = scheduler_config, defaults
        self.source, self.quantize = source, quantize
        self.vae_scale = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.dtype = _dtype_of(transformer)  # compute dtype: the weights' (quantized: the scales')
        self._reload_encoders = reload_encoders  # set in low-memory mode: encoders are freed after use
        self.low_memory = reload_encoders is not None
        self._prompt_cache = {}

    # --- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str = "demo", quantize: Optional[int] = None, low_memory: bool = False,
                        progress: bool = False, force: bool = False) -> "Pipeline":
        """Load "demo", "schnell", "dev", a Hub repo id or a diffusers-layout folder; quantize the
        transformer and T5 to 4 or 8 bits while loading. With `low_memory`, T5 and CLIP are freed once
        a prompt is encoded and read again for the next new prompt. Refuses (memory.NotEnoughMemory) when
        the machine's memory cannot hold it, before reading the weights, unless `force`."""
        if quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be None, 4 or 8 (bits), not {quantize!r}")
        folder = weights.resolve(source, progress=progress)
        index = weights.read_json(folder / "model_index.json")
        missing = [c for c in weights.COMPONENTS if c not in index or not (folder / c).is_dir()]
        if missing:
            raise weights.WeightsError(f"{folder} is not a complete FLUX pipeline: missing {', '.join(missing)}")
        # Everything cheap is checked before the first of many gigabytes is read: every config, every
        # weight file an index lists, the tokenizers and the scheduler.
        configs = {name: weights.read_json(folder / name / "config.json")
                   for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
        for name in configs:
            weights.weight_files(folder / name)
        tokenizer, tokenizer_2 = (_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2"))
        scheduler = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        memory.check(folder, quantize, low_memory, force)

        def component(name, model_cls, sanitize):
            config = configs[name]
            saved = config.get("quantization")
            bits = quantize if (name in weights.QUANTIZED and not saved) else None
            return weights.load_into(model_cls(config), folder / name, sanitize, bits, saved)

        def encoders():
            return (component("text_encoder", clip.CLIPTextModel, clip.sanitize),
                    component("text_encoder_2", t5.T5Encoder, t5.sanitize))

        transformer = component("transformer", FluxTransformer, None)
        vae = component("vae", autoencoder.AutoencoderKL, autoencoder.sanitize)
        clip_model, t5_model = encoders()
        defaults = Defaults.for_model(folder, transformer.config)
        return cls(transformer, clip_model, t5_model, vae, tokenizer, tokenizer_2, scheduler, defaults,
                   source=str(source), quantize=_saved_bits(transformer.config) or quantize,
                   reload_encoders=encoders if low_memory else None)

    def save(self, folder):
        """Write a folder in the diffusers layout that loads again as it is (already quantized, if it is)."""
        folder = Path(folder)
        src = weights.resolve(self.source)
        bits = self.quantize
        q = {"bits": bits, "group_size": weights.GROUP_SIZE} if bits else None
        if self.text_encoder is None:
            self.text_encoder, self.text_encoder_2 = self._reload_encoders()
        parts = [("transformer", self.transformer, None, q),
                 ("text_encoder", self.text_encoder, clip.unsanitize, None),
                 ("text_encoder_2", self.text_encoder_2, t5.unsanitize, q),
                 ("vae", self.vae, autoencoder.unsanitize, None)]
        for name, model, unsanitize, quant in parts:
            weights.save_component(model, model.config, folder / name, unsanitize, quant)
        weights.copy_files(src, folder, ["model_index.json", "tokenizer", "tokenizer_2", "scheduler"] +
                           (["crepulse.json"] if (src / "crepulse.json").exists() else []))
        for name in ("tokenizer", "tokenizer_2"):  # a tokenizer.json makes later loads skip transformers
            if not (folder / name / "tokenizer.json").exists():
                from transformers import AutoTokenizer
                AutoTokenizer.from_pretrained(str(folder / name)).save_pretrained(str(folder / name))

    # --- properties users need -----------------------------------------------------------------------

    @property
    def has_guidance_embedding(self) -> bool:
        return self.transformer.guidance_embeds

    def noise(self, seeds: list, width: Optional[int] = None, height: Optional[int] = None) -> np.ndarray:
        """The initial packed noise generate() uses for these per-image seeds, (n, tokens, channels)."""
        rows, cols = sampling.latent_grid(width or self.defaults.width, height or self.defaults.height, self.vae_scale)
        return np.array(sampling.noise(seeds, rows * cols, self.latent_channels))

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.get("in_channels", 64)

    def size_multiple(self) -> int:
        return max(16, 2 * self.vae_scale)

    def token_count(self, prompt: str) -> int:
        """T5 tokens in a prompt (without truncation), to warn when it exceeds max_sequence_length."""
        return self.tokenizer_2.count(prompt)

    # --- the work --------------------------------------------------------------------------------------

    def encode(self, prompt: str, max_sequence_length: int):
        """(T5 states (1, L, D), CLIP pooled (1, P)) for a prompt, cached per prompt."""
        key = (prompt, max_sequence_length)
        if key not in self._prompt_cache:
            if self.text_encoder is None:
                self.text_encoder, self.text_encoder_2 = self._reload_encoders()
            clip_ids = self.tokenizer.ids(prompt, self.tokenizer.model_max_length)
            t5_ids = self.tokenizer_2.ids(prompt, max_sequence_length)
            txt = self.text_encoder_2(mx.array(t5_ids)).astype(self.dtype)
            pooled = self.text_encoder(mx.array(clip_ids))[1].astype(self.dtype)
            mx.eval(txt, pooled)
            if len(self._prompt_cache) > 8:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = (txt, pooled)
            if self._reload_encoders is not None:  # low-memory mode: free the encoders at once
                self.text_encoder = self.text_encoder_2 = None
        return self._prompt_cache[key]

    def decode(self, tokens: mx.array, rows: int, cols: int) -> np.ndarray:
        """Packed latents -> float32 images (n, H, W, 3) in [0, 1], one image at a time to cap memory."""
        vae = self.vae
        out = []
        for i in range(tokens.shape[0]):
            z = sampling.unpack(tokens[i:i + 1], rows, cols)
            z = z / vae.scaling_factor + vae.shift_factor
            z = z.astype(_dtype_of(vae))
            # the low-memory mode decodes in tiles, so the VAE's peak is one tile's, not the image's
            img = vae.decode_tiled(z, VAE_TILE) if self.low_memory and max(z.shape[1:3]) > VAE_TILE else vae.decode(z)
            out.append(np.array(mx.clip(img.astype(mx.float32) / 2 + 0.5, 0, 1)))
        return np.concatenate(out, axis=0)

    def encode_image(self, images: np.ndarray) -> mx.array:
        """Float images (n, H, W, 3) in [0, 1] -> packed, scaled latents (the VAE's mean)."""
        vae = self.vae
        z = vae.encode(mx.array(images * 2 - 1).astype(_dtype_of(vae)))
        return sampling.pack((z.astype(mx.float32) - vae.shift_factor) * vae.scaling_factor)

    def generate(self, prompt: str, n: int = 4, seed: Optional[int] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, width: Optional[int] = None, height: Optional[int] = None,
                 max_sequence_length: Optional[int] = None, repulsion: Optional[Method] = None,
                 latents=None, output_type: str = "pil", callback: Optional[Callable] = None,
                 negative_prompt: Optional[str] = None, true_cfg: Optional[float] = None,
                 blend: Optional[Blend] = None, image=None, strength: float = 0.6) -> Result:
        """Generate n images of one prompt together. `repulsion` is a diversity method (`Repulsion`,
        `ParticleGuidance`, `CADS`) or None for plain seeds. `latents`: initial packed noise (n, tokens,
        channels). `image` + `strength`: start from these images (n, H, W, 3 in [0, 1]) noised to
        `strength` (image to image, as diffusers' FluxImg2ImgPipeline). `blend`: a `Blend` of two images
        recorded with `record`. `callback(progress)` runs after each step; returning False cancels (raises
        `Cancelled`)."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', not {output_type!r}")
        run = self._begin(prompt, n, seed, steps, guidance, width, height, max_sequence_length, repulsion,
                          latents, negative_prompt, true_cfg, image, strength, blend)
        started = time.perf_counter()
        sig = x = None
        for i, x, x0, sig in self.sample(run.x, run.txt, run.pooled, run.neg, run.sigmas, run.guidance,
                                         run.true_cfg, run.rows, run.cols, repulsion, blend):
            if callback is not None:
                p = Progress(i + 1, len(run.sigmas) - 1, time.perf_counter() - started, n, self, x0,
                             (run.rows, run.cols))
                if callback(p) is False:
                    raise Cancelled()
        pixels = self.decode(x, run.rows, run.cols)
        settings = dict(run.settings, n=n, seed=run.seed,
                        repulsion=repulsion.to_dict() if repulsion is not None else None,
                        blend=blend.to_dict() if blend is not None else None,
                        model=self.source, quantize=self.quantize, version=__version__)
        images = _to_pil(pixels) if output_type == "pil" else pixels
        return Result(images, run.seeds, np.array(run.noise), np.array(sig) if sig is not None else None, settings,
                      time.perf_counter() - started)

    def record(self, prompt: str, rows: list, record_steps: int = 2, callback: Optional[Callable] = None,
               **kw) -> list:
        """What the transformer does to images `rows` of the batch `generate(prompt, **kw)` makes, during
        its first `record_steps` steps (at least as many as the batch is repelled): a `Recording` per row,
        the sources of a `Blend` (a blend batch can be recorded too: its own blend is replayed). Runs only
        those steps; decodes nothing. `callback(progress)` as for `generate`."""
        n = kw.get("n", 4)
        bad = [r for r in rows if not (isinstance(r, int) and 0 <= r < n)]
        if bad or not rows:
            raise ValueError(f"rows to record must be image indices 0 to {n - 1} of the batch, not {bad or rows}")
        method = kw.get("repulsion")
        if method is not None and not isinstance(method, Repulsion):
            raise ValueError(f"{type(method).__name__} acts outside the transformer's blocks, so its images "
                             "cannot be recorded for blending; only contextual repulsion or plain seeds can")
        run = self._begin(prompt, **{"n": n, **kw})
        blend = kw.get("blend")  # what the batch's own edits reach, so that they are all recorded
        reach = max(method.steps if method is not None else 0, blend.reach if blend is not None else 0)
        steps = min(max(record_steps, reach), len(run.sigmas) - 1)
        recordings = [Recording(steps, run.settings) for _ in rows]
        if steps == 0:  # nothing to replay: a batch nothing edited, and no contexts asked for
            return recordings
        record = list(zip(recordings, rows))
        started = time.perf_counter()
        for i, x, x0, _ in self.sample(run.x, run.txt, run.pooled, run.neg, run.sigmas, run.guidance,
                                       run.true_cfg, run.rows, run.cols, method, blend, record):
            mx.eval([a for rec in recordings for a in rec.arrays()])
            if callback is not None:
                p = Progress(i + 1, steps, time.perf_counter() - started, n, self, x0, (run.rows, run.cols))
                if callback(p) is False:
                    raise Cancelled()
            if i + 1 >= steps:
                break
        return recordings

    def _begin(self, prompt, n=4, seed=None, steps=None, guidance=None, width=None, height=None,
               max_sequence_length=None, repulsion=None, latents=None, negative_prompt=None, true_cfg=None,
               image=None, strength=0.6, blend=None):
        """Everything a call needs before its first step: checked settings, initial noise, schedule and
        text encodings. `settings` are the ones that fix what happens inside the transformer."""
        d = self.defaults
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        width, height = width or d.width, height or d.height
        max_sequence_length = max_sequence_length or d.max_sequence_length
        true_cfg = d.true_cfg if true_cfg is None else true_cfg
        negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
        self._check(prompt, n, steps, width, height, true_cfg, strength)
        if repulsion is not None:
            repulsion.validate(n, self.transformer)
        settings = dict(prompt=prompt, steps=steps, guidance=guidance, width=width, height=height,
                        max_sequence_length=max_sequence_length, true_cfg=true_cfg,
                        negative_prompt=negative_prompt if true_cfg > 1 else None,
                        strength=strength if image is not None else None)
        if blend is not None:
            blend.validate(n, settings)
        rows, cols = sampling.latent_grid(width, height, self.vae_scale)
        channels = self.latent_channels
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        seeds = [seed + i for i in range(n)]
        if latents is None:
            noise = sampling.noise(seeds, rows * cols, channels)
        else:
            noise = mx.array(np.asarray(latents, np.float32))
            if noise.shape != (n, rows * cols, channels):
                raise ValueError(f"latents must have shape {(n, rows * cols, channels)} for n={n} at "
                                 f"{width}x{height}, not {tuple(noise.shape)}")
        sigmas = sampling.schedule(steps, rows * cols, self.scheduler_config)
        x = noise
        if image is not None:  # image to image: skip the noisiest steps, start from the noised image
            sigmas = sigmas[sampling.image_to_image_start(steps, strength):]
            x = sigmas[0] * noise + (1 - sigmas[0]) * self.encode_image(np.asarray(image, np.float32))
        txt, pooled = self.encode(prompt, max_sequence_length)
        neg = self.encode(negative_prompt, max_sequence_length) if true_cfg > 1 else None
        return SimpleNamespace(x=x, noise=noise, seed=seed, seeds=seeds, sigmas=sigmas, txt=txt, pooled=pooled,
                               neg=neg, guidance=guidance, true_cfg=true_cfg, rows=rows, cols=cols, settings=settings)

    def sample(self, x, txt, pooled, neg, sigmas, guidance, true_cfg, rows, cols, method=None, blend=None,
               record=None):
        """The Euler flow-matching loop; yields (step, latents, predicted clean latents, signatures)
        after each step. With true CFG the conditional and unconditional branches run as one batch of
        2n, and repulsion treats them as two groups. `record`: (Recording, row) pairs to fill."""
        n = x.shape[0]
        tf = self.transformer
        groups = 2 if neg is not None else 1
        txt_ids = mx.zeros((txt.shape[1], 3))
        pe = tf.pos_embed(txt_ids, sampling.image_ids(rows, cols))
        g = None if guidance is None or not tf.guidance_embeds else mx.array([guidance], mx.float32)
        signatures = []
        sig_block = len(tf.transformer_blocks) // 2
        for i in range(len(sigmas) - 1):
            sigma, t = sigmas[i], sampling.model_time(sigmas[i])
            c_txt, c_pooled = txt, pooled  # batch 1: the transformer broadcasts one prompt to the batch
            if method is not None:
                c_txt, c_pooled = method.condition(i, sigma, txt, pooled, n)
            vec = tf.conditioning(t, c_pooled, g)
            x_in = x.astype(self.dtype)
            if neg is not None:
                u_txt, u_pooled = neg
                shape = (n,) + txt.shape[1:]
                c_txt = mx.concatenate([mx.broadcast_to(c_txt, shape), mx.broadcast_to(u_txt, shape)], axis=0)
                u_vec = tf.conditioning(t, u_pooled, g)
                vec = mx.concatenate([mx.broadcast_to(vec, (n, vec.shape[-1])),
                                      mx.broadcast_to(u_vec, (n, vec.shape[-1]))], axis=0)
                x_in = mx.concatenate([x_in, x_in], axis=0)
            edit = _chain([h for h in (method.hook(i, groups) if method is not None else None,
                                       blend.hook(i, groups) if blend is not None else None) if h is not None])
            for rec, row in record or ():  # each recorder sees the activations before and after the edits
                if i < rec.steps:
                    edit = rec.wrap(edit, i, row, n)
            hooks = [edit] if edit is not None else []
            if i == 0:  # record each image's contextual signature once, after any update at that block
                hooks.append(_capture(sig_block, n, signatures))
            v = tf(x_in, c_txt, vec, pe, _chain(hooks)).astype(mx.float32)
            if neg is not None:
                v = v[n:] + true_cfg * (v[:n] - v[n:])
            if method is not None:
                v = method.velocity(i, sigma, x, v)
            x0 = x - sigma * v
            x = x + (sigmas[i + 1] - sigma) * v
            mx.eval(x)
            yield i, x, x0, signatures[0] if signatures else None

    def _check(self, prompt, n, steps, width, height, true_cfg, strength):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: describe the image to generate")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of images) must be 1 or more, not {n!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be 1 or more, not {steps!r}")
        m = self.size_multiple()
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v < m or v % m:
                raise ValueError(f"{name} {v!r} must be a positive multiple of {m}")
        if true_cfg < 1:
            raise ValueError(f"true_cfg must be 1 (off) or more, not {true_cfg}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], not {strength}")


def _tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer(folder)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for missing files
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise weights.WeightsError(f"cannot load the tokenizer in {folder}: its files are missing or unreadable; "
                                   f"download or convert the model again (transformers says: {cause})") from e


def _capture(block: int, n: int, out: list):
    def hook(kind, index, txt, img):
        if kind == "double" and index == block:
            out.append(signature(txt[:n]))
        return txt, img
    return hook


def _chain(hooks):
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def chained(kind, index, txt, img):
        for h in hooks:
            txt, img = h(kind, index, txt, img)
        return txt, img
    return chained


def _dtype_of(model):
    from mlx.utils import tree_flatten
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def _saved_bits(config):
    q = config.get("quantization")
    return q["bits"] if q else None


def _to_pil(pixels: np.ndarray) -> list:
    from PIL import Image
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
