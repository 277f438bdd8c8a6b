"""A generation's settings: the one owner of everything that fixes a batch.

A `Recipe` is what a user asks for (None: the model's default). `resolve(defaults)` fills the model's
defaults in, once, and the pipeline runs only resolved recipes; the CLI maps its arguments onto a
Recipe, the app's jobs carry one, PNG files and the app's history store `to_dict()`, and `from_dict`
reads every schema this package has written (schema 1: version 0.1.0, migrated here).

Arrays are not part of a recipe: initial noise, a start image, reference signatures and a blend's
recordings are inputs that go beside it (`Pipeline.generate(recipe, latents=..., image=...)`).
"""

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import numpy as np

from .repulsion import CADS, Blend, Method, ParticleGuidance, Repulsion
from .version import __version__

SCHEMA = 2
MAX_SEED = 2**64 - 1  # MLX's random keys take unsigned 64-bit seeds; image i of a batch gets seed + i
RANDOM_SEED = -1  # AUTOMATIC1111's convention: -1 means "pick one"
DEFAULT_DIVERSITY = 0.5  # the diversity knob's default (CLI and app): the recommended range's geometric middle
PARTICLE_PER_DIVERSITY = 1.0  # particle: scale = diversity (the engine normalises the push by the latents' size)
CADS_NOISE_PER_DIVERSITY = 0.5  # cads: noise_scale = diversity * 0.5 (0.25, the CADS default, at 0.5)
METHODS = {"contextual": Repulsion, "particle": ParticleGuidance, "cads": CADS}
# Keys a file adds beside a recipe (a PNG's place in its batch, the app's notes): not settings.
FILE_KEYS = ("index", "image_seed", "batch_size", "app", "version", "schema")
LIMITS = dict(n=(1, 4096), steps=(1, 1000), max_sequence_length=(1, 4096), width=(16, 16384), height=(16, 16384))


class RecipeError(ValueError):
    """A setting that cannot be run: the message names the field and what it takes."""


@dataclass(frozen=True)
class Recipe:
    """What fixes a batch of images. None means the model's default (see `Defaults`).

    `method` is the diversity method: a `Repulsion`, `ParticleGuidance` or `CADS` object (a Repulsion's
    None fields are the model's), one of the names "contextual", "particle", "cads", "none", or None.
    `diversity` (0..1) is the knob that sets the method's strength on the model's range; with no method
    it means contextual repulsion, and a batch of one image is then left plain. `seed` -1 or None: random
    (resolve picks one). `strength`: image to image (with `generate(image=...)`)."""
    prompt: str
    n: int = 4
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    true_cfg: Optional[float] = None
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    max_sequence_length: Optional[int] = None
    diversity: Optional[float] = None
    method: Union[Method, str, None] = None
    blend: Optional[Blend] = field(default=None, compare=False)
    strength: Optional[float] = None
    model: str = "demo"
    quantize: Optional[int] = None
    # The LoRAs a pipeline applies ({"file", "scale", "sha256", "source"}, ...: `Pipeline.loras`), filled
    # in by `Pipeline.resolve`; a file's are checked against the LoRA files with `lora.verify`.
    loras: tuple = field(default=(), hash=False)

    def __post_init__(self):
        for name, value in _checked(self).items():
            object.__setattr__(self, name, value)

    # --- filling in a model's defaults ----------------------------------------------------------------

    def resolve(self, defaults, model: Optional[str] = None, quantize: Optional[int] = None) -> "Recipe":
        """Every None filled from the model's `defaults`, the seed picked, the method built: what runs."""
        d = defaults
        true_cfg = d.true_cfg if self.true_cfg is None else self.true_cfg
        negative = d.negative_prompt if self.negative_prompt is None else self.negative_prompt
        seed = self.seed if self.seed not in (None, RANDOM_SEED) else random_seed(self.n)
        resolved = replace(
            self, seed=seed, steps=d.steps if self.steps is None else self.steps,
            guidance=d.guidance if self.guidance is None else self.guidance, true_cfg=true_cfg,
            negative_prompt=negative if true_cfg > 1 else None,
            width=d.width if self.width is None else self.width,
            height=d.height if self.height is None else self.height,
            max_sequence_length=d.max_sequence_length if self.max_sequence_length is None else self.max_sequence_length,
            model=model if model is not None else self.model,
            quantize=quantize if model is not None else self.quantize)
        return replace(resolved, method=resolved._method(d))

    def _method(self, d):
        m, knob = self.method, self.diversity
        level = DEFAULT_DIVERSITY if knob is None else knob
        if m is None:  # the knob alone: contextual repulsion, when there is something to push apart
            if not knob or self.n < 2:
                return None
            m = "contextual"
        if m == "none" or (isinstance(m, str) and level == 0):  # diversity 0: plain seeds, whatever the method
            return None
        if m == "contextual":
            m = Repulsion()
        elif m == "particle":
            return ParticleGuidance(scale=float(f"{level * PARTICLE_PER_DIVERSITY:.3g}"))
        elif m == "cads":
            return CADS(noise_scale=round(level * CADS_NOISE_PER_DIVERSITY, 4), seed=self.seed)
        if isinstance(m, Repulsion):
            m = replace(m, scale=d.repulsion_scale(level) if m.scale is None else m.scale,
                        iterations=d.repulsion_iterations if m.iterations is None else m.iterations,
                        repelled_steps=d.repulsion_steps if m.repelled_steps is None else m.repelled_steps)
        _check_method(m, self.n)
        return m

    @property
    def resolved(self) -> bool:
        return self.seed is not None and self.seed != RANDOM_SEED and None not in (
            self.steps, self.true_cfg, self.width, self.height, self.max_sequence_length)

    def trajectory(self) -> dict:
        """The settings that fix what happens inside the transformer at each step: what the batches
        a blend mixes must share."""
        return {k: getattr(self, k) for k in ("prompt", "steps", "guidance", "width", "height",
                                              "max_sequence_length", "true_cfg", "negative_prompt", "strength",
                                              "loras")}

    # --- files -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-able recipe (schema 2) that PNG files and the history store."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["method"] = method_to_dict(self.method)
        d["blend"] = self.blend.to_dict() if self.blend is not None else None
        return dict(schema=SCHEMA, **d, version=__version__)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recipe from `to_dict()`, or from a file of an earlier version (migrated). Keys a file adds
        beside the recipe (`FILE_KEYS`) are ignored; any other unknown key, a wrong type or a value out
        of range is a RecipeError naming it."""
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a JSON object, not {type(d).__name__}")
        d = migrate(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - set(FILE_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe setting(s) {', '.join(unknown)}: the file was made by another "
                              "version of mlx-crepulse")
        if not isinstance(d.get("prompt"), str):
            raise RecipeError(f"the recipe's prompt must be text, not {d.get('prompt')!r}")
        kw = {k: v for k, v in d.items() if k in fields}
        kw["method"] = method_from_dict(kw.get("method"))
        blend = kw.get("blend")
        if blend is not None:
            if not isinstance(blend, dict) or set(blend) - {"alphas", "blended_steps"}:
                raise RecipeError(f"the recipe's blend must be {{alphas, blended_steps}}, not {blend!r}")
            kw["blend"] = Blend(**blend)
        return cls(**kw)


def random_seed(n: int = 1) -> int:
    """A random batch seed, as users type them (below 2**31), leaving room for the n image seeds."""
    return random.SystemRandom().randrange(2**31 - 1 - n)


# --- methods <-> dicts ------------------------------------------------------------------------------------

def method_to_dict(m) -> Optional[dict]:
    if m is None or isinstance(m, str):
        return m
    return m.to_dict()


def method_from_dict(d) -> Union[Method, str, None]:
    """A diversity method from its `to_dict()`; None and names stay as they are."""
    if d is None or isinstance(d, str):
        return d
    if not isinstance(d, dict):
        raise RecipeError(f"the recipe's method must be an object or a name, not {d!r}")
    if not all(isinstance(k, str) for k in d):
        raise RecipeError(f"the recipe's method has a setting that is not named: {d!r}")
    d = dict(d)
    name = d.pop("name", None)
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise RecipeError(f"unknown diversity method {name!r} (known: {', '.join(METHODS)})")
    if d.pop("reference_size", None):
        raise RecipeError("this batch was pushed away from reference images whose signatures are not stored "
                          "in the file, so it cannot be made again from the file alone")
    known = {f.name for f in dataclasses.fields(cls)} - {"reference"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RecipeError(f"unknown {name} setting(s) {', '.join(unknown)}: the file was made by another "
                          "version of mlx-crepulse")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"the recipe's {name} settings: {e}") from None


def migrate(d: dict) -> dict:
    """A schema-2 recipe dict from any schema this package has written. Schema 1 (0.1.0) called the
    method `repulsion` (by class name) and both a repulsion's and a blend's step counts `steps`."""
    schema = d.get("schema", 1)
    if schema == SCHEMA:
        return dict(d)
    if schema != 1:
        raise RecipeError(f"recipe schema {schema!r} is newer than this mlx-crepulse reads ({SCHEMA}): upgrade it")
    d = dict(d)
    if "repulsion" in d:
        method = d.pop("repulsion")
        if isinstance(method, dict):
            method = dict(method)
            names = {"Repulsion": "contextual", "ParticleGuidance": "particle", "CADS": "cads"}
            method["name"] = names.get(method.pop("method", None), method.get("name"))
            if method["name"] == "contextual" and "steps" in method:
                method["repelled_steps"] = method.pop("steps")
        d["method"] = method
    if isinstance(d.get("blend"), dict):
        blend = dict(d["blend"])
        if "steps" in blend:
            blend["blended_steps"] = blend.pop("steps")
        d["blend"] = blend
    d["schema"] = SCHEMA
    return d


# --- validation -------------------------------------------------------------------------------------------

def _checked(r: Recipe) -> dict:
    """The recipe's values, normalised (numpy numbers -> Python's), or a RecipeError for the first bad one."""
    out = {}
    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise RecipeError("the prompt is empty: describe the image to generate" if isinstance(r.prompt, str)
                          else f"the prompt must be text, not {type(r.prompt).__name__} {r.prompt!r}")
    for name in ("n", "seed", "steps", "width", "height", "max_sequence_length", "quantize"):
        out[name] = _integer(name, getattr(r, name))
    for name in ("guidance", "true_cfg", "diversity", "strength"):
        out[name] = _number(name, getattr(r, name))
    for name, (lo, hi) in LIMITS.items():
        v = out[name]
        if v is not None and not lo <= v <= hi:
            raise RecipeError(f"{name} must be {lo} to {hi}, not {v}" + (" (None: the model's size)" if
                                                                          name in ("width", "height") else ""))
    if out["n"] is None:
        raise RecipeError("n (the number of images) must be 1 or more")
    seed = out["seed"]
    if seed is not None and seed != RANDOM_SEED and not 0 <= seed <= MAX_SEED - out["n"] + 1:
        raise RecipeError(f"seed must be -1 (random) or 0 to {MAX_SEED - out['n'] + 1} for {out['n']} "
                          f"image(s), not {seed}")
    if out["true_cfg"] is not None and out["true_cfg"] < 1:
        raise RecipeError(f"true_cfg must be 1 (off) or more, not {out['true_cfg']}")
    if out["diversity"] is not None and not 0 <= out["diversity"] <= 1:
        raise RecipeError(f"diversity must be between 0 and 1, not {out['diversity']}")
    if out["strength"] is not None and not 0 < out["strength"] <= 1:
        raise RecipeError(f"strength must be in (0, 1], not {out['strength']}")
    if out["quantize"] not in (None, 4, 8):
        raise RecipeError(f"quantize must be 4 or 8 (bits), or None, not {out['quantize']}")
    if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
        raise RecipeError(f"negative_prompt must be text, not {r.negative_prompt!r}")
    if not isinstance(r.model, str) or not r.model:
        raise RecipeError(f"model must name a model (demo, schnell, dev, a Hub id or a folder), not {r.model!r}")
    out["loras"] = _loras(r.loras)
    _check_method(r.method, out["n"])
    if r.blend is not None:
        if not isinstance(r.blend, Blend):
            raise RecipeError(f"blend must be a Blend, not {type(r.blend).__name__}")
        try:
            r.blend.check(out["n"])
        except ValueError as e:
            raise RecipeError(str(e)) from None
    return out


def _check_method(m, n):
    if m is None or isinstance(m, str):
        if m is not None and m != "none" and m not in METHODS:
            raise RecipeError(f"method must be one of none, {', '.join(METHODS)}, or a method object, not {m!r}")
        if m in METHODS and n < 2:
            raise RecipeError(f"{m} diversity needs a batch of at least 2 images to push apart, not n={n}")
        return
    if not isinstance(m, Method):
        raise RecipeError(f"method must be Repulsion, ParticleGuidance, CADS, a method name or None, "
                          f"not {type(m).__name__} {m!r}")
    try:
        m.check(n)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def _loras(v) -> tuple:
    keys = {"file", "scale", "sha256", "source"}
    if not isinstance(v, (list, tuple)):
        raise RecipeError(f"loras must be a list of {{file, scale, sha256, source}}, not {v!r}")
    out = []
    for item in v:
        if not isinstance(item, dict) or set(item) != keys or not all(
                isinstance(item[k], str) for k in ("file", "sha256", "source")) or \
                not re.fullmatch(r"[0-9a-f]{64}", item["sha256"]):
            raise RecipeError(f"each of the recipe's loras is {{file, scale, sha256 (64 hex digits), source}}, "
                              f"not {item!r}")
        out.append(dict(item, scale=_number("a LoRA's scale", item["scale"])))
    return tuple(out)


def _integer(name, v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise RecipeError(f"{name} must be a whole number, not {type(v).__name__} {v!r}")
    return int(v)


def _number(name, v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise RecipeError(f"{name} must be a number, not {type(v).__name__} {v!r}")
    if not math.isfinite(float(v)):
        raise RecipeError(f"{name} must be a finite number, not {v}")
    return float(v)
