"""Prompt -> batch of images: text encoding, the batched flow-matching sampler, VAE decoding.

The n images of a call go through the transformer as one batch, which is what lets repulsion compare
them inside the forward pass. A diversity method (contextual repulsion or a baseline, `repulsion.py`)
acts through three narrow points of the sampler: the text condition (CADS), a hook between the
transformer's blocks (repulsion, blending), and the velocity (particle guidance).
"""

import functools
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import cpu, lora, memory, sampling, weights
from .models import autoencoder, clip, t5
from .models.flux import FluxTransformer
from .model_folder import ModelFolder
from .preview import LatentRGB
from .recipe import Recipe, RecipeError
from .repulsion import Recording, Repulsion, signature

VAE_TILE = 32  # latent pixels (256 image pixels for FLUX) per tile in the low-memory mode's decode


class Cancelled(Exception):
    """Raised by `generate` when its callback asked to stop; nothing half-done is returned."""


class NotFinite(ValueError):
    """A step produced NaN or infinite values; the message names the likely cause."""


@dataclass
class Progress:
    """What a callback sees after each step. `preview()` decodes the current prediction of the clean
    images (one VAE decode each, so call it when it pays); `preview(quick=True)` maps it to RGB with the
    pipeline's fitted latent-to-RGB map instead (`preview.py`), at the latent image's resolution, once
    `quick_ready` (after the pipeline's first decode)."""
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

    @property
    def quick_ready(self) -> bool:
        return self._pipe.preview_map.ready

    def preview(self, quick: bool = False) -> np.ndarray:
        if quick and self.quick_ready:
            return self._pipe.quick_preview(self._x0, *self._grid)
        return self._pipe.decode(self._x0, *self._grid)


@dataclass
class Result:
    images: list
    seeds: list
    noise: np.ndarray  # the initial packed noise of each image, (n, tokens, channels)
    signatures: np.ndarray  # one compact contextual signature per image (float16), see repulsion.signature
    recipe: Recipe  # resolved: everything needed to run the call again (with the same inputs)
    seconds: float = 0.0


@dataclass
class Run:
    """What a call needs before its first step (`Pipeline._begin`)."""
    recipe: Recipe
    x: mx.array  # the latents to start from
    noise: mx.array  # the initial noise
    sigmas: list
    txt: mx.array
    pooled: mx.array
    neg: Optional[tuple]  # the negative prompt's encodings, with true CFG
    rows: int
    cols: int

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


class Pipeline:
    def __init__(self, files: ModelFolder, transformer, text_encoder, text_encoder_2, vae, quantize=None,
                 reload_encoders: Optional[Callable] = None):
        self.files = files
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = files.tokenizer, files.tokenizer_2
        self.scheduler_config, self.defaults = files.scheduler, files.defaults
        self.source, self.quantize = files.source, quantize
        self.vae_scale = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.dtype = _dtype_of(transformer)  # compute dtype: the weights' (quantized: the scales')
        self._reload_encoders = reload_encoders  # set in low-memory mode: encoders are freed after use
        self.low_memory = reload_encoders is not None
        self._prompt_cache = {}
        self.preview_map = LatentRGB(vae.config["latent_channels"])  # fitted on every decode
        self._forward = transformer
        if mx.default_device() == mx.cpu:  # the CPU's own kernels and two streams (cpu.py)
            cpu.install()
            self._forward = functools.partial(cpu.forward, transformer)

    # --- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str = "demo", quantize: Optional[int] = None, low_memory: bool = False,
                        progress: bool = False, force: bool = False, loras=None) -> "Pipeline":
        """Load "demo", "schnell", "dev", a Hub repo id or a diffusers-layout folder; quantize the
        transformer and T5 to 4 or 8 bits while loading. With `low_memory`, T5 and CLIP are freed once
        a prompt is encoded and read again for the next new prompt. Refuses (memory.NotEnoughMemory) when
        the machine's memory cannot hold it, before reading the weights, unless `force`. `loras`:
        [(path or Hub reference `owner/name:file.safetensors`, scale), ...] or a recipe's recorded LoRAs
        (see `lora.read_all`)."""
        if quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be None, 4 or 8 (bits), not {quantize!r}")
        files = ModelFolder.open(source, progress=progress)
        memory.check_files(files, quantize, low_memory, force)
        lora_files = lora.read_all(loras)  # every LoRA file checked before the weights are read
        pipe = cls.load(files, quantize, low_memory)
        if lora_files:
            pipe.set_loras(lora_files)
        return pipe

    def set_loras(self, loras):
        """Replace the LoRAs (as `from_pretrained`'s `loras`; [] for none); the base comes back exactly."""
        lora.set_loras(self, loras)

    @property
    def loras(self) -> list:
        """The LoRAs applied, in order: [{"file", "scale", "sha256", "source"}], as a recipe records them."""
        return lora.recorded(self)

    @classmethod
    def load(cls, files: ModelFolder, quantize: Optional[int] = None, low_memory: bool = False) -> "Pipeline":
        """Read the weights of an opened model folder (see `from_pretrained`)."""
        if files.family != "flux1":  # FLUX.2 [klein] (klein.py): its own components
            from .klein import KleinPipeline
            return KleinPipeline.load(files, quantize, low_memory)

        def component(name, model_cls, sanitize):
            config = files.configs[name]
            saved = config.get("quantization")
            bits = quantize if (name in weights.QUANTIZED and not saved) else None
            return weights.load_into(model_cls(config), files.folder / name, sanitize, bits, saved)

        def encoders():
            return (component("text_encoder", clip.CLIPTextModel, clip.sanitize),
                    component("text_encoder_2", t5.T5Encoder, t5.sanitize))

        transformer = component("transformer", FluxTransformer, None)
        vae = component("vae", autoencoder.AutoencoderKL, autoencoder.sanitize)
        clip_model, t5_model = encoders()
        return cls(files, transformer, clip_model, t5_model, vae, quantize=files.saved_bits or quantize,
                   reload_encoders=encoders if low_memory else None)

    def save(self, folder):
        """Write a folder in the diffusers layout that loads again as it is (already quantized, if it is)."""
        folder = Path(folder)
        src = self.files.folder
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
        return self.transformer.params.in_channels

    def size_multiple(self) -> int:
        return self.files.size_multiple

    def token_count(self, prompt: str) -> int:
        """Tokens of a prompt as `max_sequence_length` counts them (without truncation)."""
        return self.files.sequence_tokenizer.count(prompt)

    # --- the work --------------------------------------------------------------------------------------

    def encode(self, prompt: str, max_sequence_length: int):
        """The text condition of a prompt (`_encode`), cached per prompt; in low-memory mode the text
        encoders are freed once it is computed and read again for the next new prompt."""
        key = (prompt, max_sequence_length)
        if key not in self._prompt_cache:
            if self.text_encoder is None:
                self.text_encoder, self.text_encoder_2 = self._reload_encoders()
            condition = self._encode(prompt, max_sequence_length)
            mx.eval([c for c in condition if c is not None])
            if len(self._prompt_cache) > 8:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = condition
            if self._reload_encoders is not None:  # low-memory mode: free the encoders at once
                self.text_encoder = self.text_encoder_2 = None
        return self._prompt_cache[key]

    def _encode(self, prompt: str, max_sequence_length: int):
        """(T5 states (1, L, D), CLIP pooled (1, P))."""
        clip_ids = self.tokenizer.ids(prompt, self.tokenizer.model_max_length)
        t5_ids = self.tokenizer_2.ids(prompt, max_sequence_length)
        txt = self.text_encoder_2(mx.array(t5_ids)).astype(self.dtype)
        return txt, self.text_encoder(mx.array(clip_ids))[1].astype(self.dtype)

    def decode(self, tokens: mx.array, rows: int, cols: int) -> np.ndarray:
        """Packed latents -> float32 images (n, H, W, 3) in [0, 1], one image at a time to cap memory."""
        vae = self.vae
        out = []
        for i in range(tokens.shape[0]):
            z = self._to_vae(tokens[i:i + 1], rows, cols).astype(_dtype_of(vae))
            # the low-memory mode decodes in tiles, so the VAE's peak is one tile's, not the image's
            img = vae.decode_tiled(z, VAE_TILE) if self.low_memory and max(z.shape[1:3]) > VAE_TILE else vae.decode(z)
            out.append(np.array(mx.clip(img.astype(mx.float32) / 2 + 0.5, 0, 1)))
            self.preview_map.add(np.array(z.astype(mx.float32)), out[-1])
        return np.concatenate(out, axis=0)

    def quick_preview(self, tokens: mx.array, rows: int, cols: int) -> np.ndarray:
        """Packed latents -> rough float32 images (n, H / scale, W / scale, 3) by the fitted latent-to-RGB map."""
        return self.preview_map(np.array(self._to_vae(tokens, rows, cols).astype(mx.float32)))

    def encode_image(self, images: np.ndarray) -> mx.array:
        """Float images (n, H, W, 3) in [0, 1] -> packed latents as the sampler sees them (the VAE's mean)."""
        z = self.vae.encode(mx.array(images * 2 - 1).astype(_dtype_of(self.vae)))
        return self._from_vae(z.astype(mx.float32))

    def _to_vae(self, tokens: mx.array, rows: int, cols: int) -> mx.array:
        """The sampler's packed latents -> the VAE's latent image: FLUX.1 scales and shifts them."""
        return sampling.unpack(tokens, rows, cols) / self.vae.scaling_factor + self.vae.shift_factor

    def _from_vae(self, z: mx.array) -> mx.array:
        return sampling.pack((z - self.vae.shift_factor) * self.vae.scaling_factor)

    def resolve(self, recipe=None, force: bool = False, **settings) -> Recipe:
        """A Recipe (or a prompt, or settings alone) with this model's defaults filled in and checked
        against this model and, unless `force`, this machine's memory: what `generate` runs. Keyword
        settings replace the recipe's."""
        if "repulsion" in settings:  # the 0.1 name of the method parameter
            warnings.warn("generate(repulsion=...) is now generate(method=...)", DeprecationWarning, stacklevel=3)
            settings["method"] = settings.pop("repulsion")
        if isinstance(recipe, Recipe):
            recipe = replace(recipe, **settings) if settings else recipe
        elif isinstance(recipe, str) or recipe is None:
            recipe = Recipe(**({"prompt": recipe} if recipe is not None else {}), **settings)
        else:
            raise RecipeError(f"generate takes a Recipe or a prompt, not {type(recipe).__name__}")
        return replace(self.files.resolve(recipe, self.quantize, force), loras=tuple(self.loras))  # what is applied

    def generate(self, recipe=None, callback: Optional[Callable] = None, latents=None, image=None,
                 output_type: str = "pil", force: bool = False, **settings) -> Result:
        """Generate a batch of images of one prompt together: `generate(Recipe(...))`, or
        `generate("a prompt", n=4, method=Repulsion(...), ...)` with any Recipe field as a keyword.
        `latents`: the initial packed noise (n, tokens, channels) instead of the seeds'. `image`: start
        from these images (n, H, W, 3 in [0, 1]) noised to the recipe's `strength` (image to image, as
        diffusers' FluxImg2ImgPipeline). A recipe's `blend` needs its sources recorded with `record`.
        `callback(progress)` runs after each step; returning False cancels (raises `Cancelled`). A batch
        that would not fit in this machine's memory is refused (`footprint.TooLarge`) unless `force`."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', not {output_type!r}")
        run = self._begin(self.resolve(recipe, force, **settings), latents, image)
        started = time.perf_counter()
        x, sig = run.x, None
        for i, x, x0, sig in self._steps(run, callback, run.steps, started):
            pass
        pixels = self.decode(x, run.rows, run.cols)
        images = _to_pil(pixels) if output_type == "pil" else pixels
        seeds = [run.recipe.seed + i for i in range(run.recipe.n)]
        return Result(images, seeds, np.array(run.noise), np.array(sig) if sig is not None else None, run.recipe,
                      time.perf_counter() - started)

    def record(self, recipe, rows: list, record_steps: int = 2, callback: Optional[Callable] = None,
               latents=None, image=None, force: bool = False, **settings) -> list:
        """What the transformer does to images `rows` of the batch `generate(recipe, ...)` makes, during
        its first `record_steps` steps (at least as many as the batch is repelled): a `Recording` per row,
        the sources of a `Blend` (a blend batch can be recorded too: its own blend is replayed). Runs only
        those steps; decodes nothing. `callback(progress)` as for `generate`."""
        recipe = self.resolve(recipe, force, **settings)
        n, method, blend = recipe.n, recipe.method, recipe.blend
        bad = [r for r in rows if not (isinstance(r, int) and 0 <= r < n)]
        if bad or not rows:
            raise RecipeError(f"rows to record must be image indices 0 to {n - 1} of the batch, not {bad or rows}")
        if method is not None and not isinstance(method, Repulsion):
            raise RecipeError(f"{type(method).__name__} acts outside the transformer's blocks, so its images "
                              "cannot be recorded for blending; only contextual repulsion or plain seeds can")
        run = self._begin(recipe, latents, image)
        reach = max(method.repelled_steps if method is not None else 0, blend.reach if blend is not None else 0)
        steps = min(max(record_steps, reach), run.steps)
        recordings = [Recording(steps, recipe.trajectory()) for _ in rows]
        if steps == 0:  # nothing to replay: a batch nothing edited, and no contexts asked for
            return recordings
        record = list(zip(recordings, rows))
        for i, *_ in self._steps(run, callback, steps, time.perf_counter(), record):
            if i + 1 >= steps:
                break
        return recordings

    def _steps(self, run, callback, steps, started, record=None):
        """The sampler's steps with the callback's progress and cancelling."""
        for i, x, x0, sig in self.sample(run, record):
            if not mx.all(mx.isfinite(x)).item():
                raise NotFinite(f"step {i + 1} of {run.steps} produced NaN or infinite values: {self._cause(run)}")
            if record:
                mx.eval([a for rec, _ in record for a in rec.arrays()])
            if callback is not None:
                p = Progress(i + 1, steps, time.perf_counter() - started, run.recipe.n, self, x0, (run.rows, run.cols))
                if callback(p) is False:
                    raise Cancelled()
            yield i, x, x0, sig

    def _cause(self, run: Run) -> str:
        method, (lo, hi) = run.recipe.method, self.defaults.repulsion_scale_range
        if isinstance(method, Repulsion) and method.scale > 100 * hi:
            return (f"the repulsion scale {method.scale:g} is far above this model's range ({lo:g} to {hi:g}); "
                    "use --diversity, or a scale in that range")
        return "the model's weights may be damaged (download or convert it again)"

    def _begin(self, recipe: Recipe, latents=None, image=None) -> Run:
        """Everything a resolved recipe needs before its first step: inputs checked, initial noise,
        schedule and text encodings."""
        n = recipe.n
        if recipe.blend is not None:
            try:
                recipe.blend.check_sources(recipe.trajectory())
            except ValueError as e:
                raise RecipeError(str(e)) from None
        rows, cols = sampling.latent_grid(recipe.width, recipe.height, self.vae_scale)
        channels = self.latent_channels
        if latents is None:
            noise = sampling.noise([recipe.seed + i for i in range(n)], rows * cols, channels)
        else:
            noise = mx.array(np.asarray(latents, np.float32))
            if not np.isfinite(np.asarray(latents, np.float32)).all():
                raise RecipeError("latents hold NaN or infinite values")
            if noise.shape != (n, rows * cols, channels):
                raise RecipeError(f"latents must have shape {(n, rows * cols, channels)} for n={n} at "
                                  f"{recipe.width}x{recipe.height}, not {tuple(noise.shape)}")
        sigmas = self.schedule(recipe.steps, rows * cols)
        x = noise
        if (image is None) != (recipe.strength is None):
            raise RecipeError("image to image needs both an image and a strength (in (0, 1]), or neither")
        if image is not None:  # image to image: skip the noisiest steps, start from the noised image
            image = np.asarray(image, np.float32)
            want = (n, recipe.height, recipe.width, 3)
            if image.shape != want:
                raise RecipeError(f"the start image must be {want} (n, height, width, RGB), not {image.shape}")
            if not np.isfinite(image).all():
                raise RecipeError("the start image holds NaN or infinite values")
            sigmas = sigmas[sampling.image_to_image_start(recipe.steps, recipe.strength):]
            x = sigmas[0] * noise + (1 - sigmas[0]) * self.encode_image(image)
        txt, pooled = self.encode(recipe.prompt, recipe.max_sequence_length)
        neg = self.encode(recipe.negative_prompt, recipe.max_sequence_length) if recipe.true_cfg > 1 else None
        return Run(recipe, x, noise, sigmas, txt, pooled, neg, rows, cols)

    def sample(self, run: Run, record=None):
        """The Euler flow-matching loop; yields (step, latents, predicted clean latents, signatures)
        after each step. With true CFG the conditional and unconditional branches run as one batch of
        2n, and repulsion treats them as two groups. `record`: (Recording, row) pairs to fill."""
        r, x, sigmas, txt, pooled, neg = run.recipe, run.x, run.sigmas, run.txt, run.pooled, run.neg
        n, method, blend = r.n, r.method, r.blend
        tf = self.transformer
        groups = 2 if neg is not None else 1
        pe = self.positions(txt.shape[1], run.rows, run.cols)
        g = None if r.guidance is None or not tf.guidance_embeds else mx.array([r.guidance], mx.float32)
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
                c_txt, vec = self._with_negative(c_txt, vec, neg, n, t, g)
                x_in = mx.concatenate([x_in, x_in], axis=0)
            edit = _chain([h for h in (method.hook(i, groups, sig_block) if method is not None else None,
                                       blend.hook(i, groups) if blend is not None else None) if h is not None])
            for rec, row in record or ():  # each recorder sees the activations before and after the edits
                if i < rec.steps:
                    edit = rec.wrap(edit, i, row, n)
            hooks = [edit] if edit is not None else []
            if i == 0:  # record each image's contextual signature once, after any update at that block
                hooks.append(_capture(sig_block, n, signatures))
            v = self._forward(x_in, c_txt, vec, pe, _chain(hooks)).astype(mx.float32)
            if neg is not None:
                v = v[n:] + r.true_cfg * (v[:n] - v[n:])
            if method is not None:
                v = method.velocity(i, sigma, x, v)
            x0 = x - sigma * v
            x = x + (sigmas[i + 1] - sigma) * v
            mx.eval(x)
            yield i, x, x0, signatures[0] if signatures else None

    def schedule(self, steps: int, image_tokens: int) -> list:
        """The sigmas of a call (steps + 1 values); a model family may schedule otherwise."""
        return sampling.schedule(steps, image_tokens, self.scheduler_config)

    def positions(self, text_tokens: int, rows: int, cols: int) -> tuple:
        """RoPE of the joint sequence (text first); FLUX.1's text positions are all zero."""
        return self.transformer.pos_embed(mx.zeros((text_tokens, 3)), sampling.image_ids(rows, cols))

    def _with_negative(self, c_txt, vec, neg, n, t, g):
        """The conditional and unconditional branches' text and conditioning vectors as one batch of 2n."""
        u_txt, u_pooled = neg
        shape = (n,) + c_txt.shape[1:]
        c_txt = mx.concatenate([mx.broadcast_to(c_txt, shape), mx.broadcast_to(u_txt, shape)], axis=0)
        u_vec = self.transformer.conditioning(t, u_pooled, g)
        vec = mx.concatenate([mx.broadcast_to(vec, (n, vec.shape[-1])),
                              mx.broadcast_to(u_vec, (n, vec.shape[-1]))], axis=0)
        return c_txt, vec


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


def _to_pil(pixels: np.ndarray) -> list:
    from PIL import Image
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
