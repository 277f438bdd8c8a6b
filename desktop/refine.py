"""Refining a favourite: each action turns images from the history into a `Job` for the engine.

- vary subtly / strongly: a new batch whose noises are the favourite's noise mixed with new noise
  (`mix_noise`), repelled among themselves (subtly: each also given the push the favourite got in its batch);
- explore new directions: a new batch of the same prompt, repelled from every image already seen for
  this prompt (their contextual signatures as the reference set);
- blend: two favourites of one prompt mixed in the contextual space, alpha in [-0.5, 1.5];
  (vary and blend record their favourites from the batches they were made in: `Pipeline.record`)
- upscale: the favourite regenerated at twice the size from its own image (image to image);
- run again: a stored recipe, exactly, from the history's settings and inputs;
- twin: a batch again with the same seeds and diversity off, to see what diversity did.
"""

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image as PILImage

from mlx_crepulse import Blend, Recipe, Repulsion, random_seed

from .worker import Job, Mix

# What a new batch takes over from the batch it refines; seeds, n, method and inputs are its own.
SETTINGS = ("prompt", "steps", "guidance", "true_cfg", "negative_prompt", "width", "height", "max_sequence_length",
            "model", "quantize")


@dataclass(frozen=True)
class Variation:
    kind: str
    mix: float  # how much new noise: 0 = the favourite's own, 1 = all new
    diversity: float  # repulsion among the new images, on the model's range
    # give each new image the push the favourite got from its batch's repulsion (its recorded edits): what
    # keeps a repelled favourite's subtle variations near it (scripts/why_demo.py favourites: 58% keep its
    # free attributes instead of 20%); strong ones gain little from it (30% instead of 24%) and lose more
    # cleanliness, and are meant to move away anyway
    replay: bool = False


SUBTLE = Variation("vary-subtle", mix=0.3, diversity=0.0, replay=True)
STRONG = Variation("vary-strong", mix=0.65, diversity=0.5)
EXPLORE_DIVERSITY = 0.5  # when the diversity control is off, explore still pushes this hard
BLEND_STEPS = 2
UPSCALE_STRENGTH = 0.5
UPSCALE_MAX_SIDE = 2048  # FLUX.1 is trained up to about 2 megapixels
ALPHA_RANGE = (-0.5, 1.5)


new_seed = random_seed


def from_recipe(recipe: dict, n: int, seed: int, diversity=None, method=None, blend=None, strength=None,
                width=None, height=None, low_memory=False, **job) -> Job:
    """A job with a stored batch's model, generation settings (prompt, steps, size, guidance...) and
    LoRAs, its own seeds, diversity and blend, and the job's inputs and notes (`job`: Job fields)."""
    settings = {k: recipe.get(k) for k in SETTINGS}
    settings.update({k: v for k, v in (("width", width), ("height", height)) if v is not None})
    new = Recipe(**settings, n=n, seed=seed, diversity=diversity, method=method, blend=blend, strength=strength)
    return Job(new, low_memory=low_memory, loras=list(recipe.get("loras") or []), **job)


def noise_of(history, image):
    """A favourite's initial noise: stored (a refined batch) or its seed."""
    batch = history.batch(image.batch_id)
    if batch.has_inputs:
        latents = history.inputs(batch.id).get("latents")
        if latents is not None:
            return np.asarray(latents[image.index], np.float32)
    return int(image.seed)


def vary(history, image, variation: Variation, n: int, seed: int = None, low_memory=False) -> Job:
    """New images near the favourite: its noise mixed with new noise, repelled among themselves; with
    `variation.replay`, each given the push the favourite got from its own batch's repulsion (its recorded
    edits replayed: a blend of the favourite with itself that swaps no contexts), without which a favourite
    that repulsion moved has variations near its plain-seed twin instead."""
    batch = history.batch(image.batch_id)
    n = max(2, n)
    seed = new_seed(n) if seed is None else seed
    base = noise_of(history, image)
    replay, note = {}, dict(mix=variation.mix)
    if variation.replay and _blendable(batch) is not None:  # an upscale has no noise-only batch to replay
        replay = dict(blend=Blend([0.0] * (n - 2), blended_steps=0), sources=blend_sources(history, image.id, image.id))
        note.update(a=image.id, b=image.id)  # where `rerun` finds the favourite again
    return from_recipe(batch.recipe, kind=variation.kind, n=n, seed=seed, low_memory=low_memory,
                       noise=[Mix(base, seed + i, variation.mix) for i in range(n)],
                       diversity=variation.diversity, method=Repulsion(), parent_image=image.id, **replay,
                       labels=[f"variation {i + 1}" for i in range(n)], note=note)


def explore(history, batch, n: int, diversity, seed: int = None, low_memory=False) -> Job:
    """A new batch of `batch`'s prompt and model, pushed away from every image seen for that prompt."""
    n = max(2, n)
    reference = history.signatures(batch.prompt, batch.model)
    return from_recipe(batch.recipe, kind="explore", n=n, seed=new_seed(n) if seed is None else seed,
                       low_memory=low_memory, reference=reference,
                       diversity=EXPLORE_DIVERSITY if not diversity else diversity,
                       note=dict(reference_size=0 if reference is None else len(reference)))


def _blendable(batch) -> tuple:
    """What two images must share to be blended (None: not blendable: an upscale starts from a picture,
    not from noise alone, so there is no batch to record it from)."""
    r = batch.recipe
    if r.get("strength") is not None:
        return None
    return (batch.model,) + tuple(r.get(k) for k in ("prompt", "width", "height", "steps", "guidance", "true_cfg",
                                                     "negative_prompt", "max_sequence_length"))


def blend_candidates(history, image) -> list:
    """Starred images that can be blended with `image`: same prompt, model, size and sampling settings."""
    key = _blendable(history.batch(image.batch_id))
    return [other for other in history.starred() if key is not None and other.id != image.id
            and _blendable(history.batch(other.batch_id)) == key]


def blend(history, a, b, alphas, low_memory=False) -> Job:
    """Batch [A, B, A per alpha]: A's and B's noise, then A's once per alpha, all steered by A and B
    recorded in the batches they were made in (refine's `rerun` of each): rows A and B come out as the
    favourites themselves, each further row with its enriched text tokens moved toward B's by alpha during
    the first steps."""
    alphas = [float(x) for x in alphas]
    bad = [x for x in alphas if not ALPHA_RANGE[0] <= x <= ALPHA_RANGE[1]]
    if bad:
        raise ValueError(f"blend alpha must lie in [{ALPHA_RANGE[0]}, {ALPHA_RANGE[1]}], not {bad}")
    batch = history.batch(a.batch_id)
    if _blendable(batch) is None or _blendable(history.batch(b.batch_id)) is None:
        raise ValueError("an upscaled image cannot be blended: blend the favourites it was upscaled from")
    na, nb = noise_of(history, a), noise_of(history, b)
    return from_recipe(batch.recipe, kind="blend", n=2 + len(alphas), seed=int(a.seed), low_memory=low_memory,
                       noise=[na, nb] + [na] * len(alphas), blend=Blend(alphas, blended_steps=BLEND_STEPS),
                       sources=blend_sources(history, a.id, b.id),
                       parent_image=a.id, labels=["A", "B"] + [f"\u03b1 = {x:.2f}" for x in alphas],
                       note=dict(a=a.id, b=b.id, alphas=alphas))


def blend_sources(history, a_id: int, b_id: int) -> list:
    """A and B as (the job that makes the batch each came from, its index); one job for one batch."""
    jobs, out = {}, []
    for image_id in (a_id, b_id):
        im = history.image(image_id)
        if im is None:
            raise ValueError("a favourite this batch was made from has been deleted, so it cannot be made again")
        if im.batch_id not in jobs:
            jobs[im.batch_id] = rerun(history, history.batch(im.batch_id))
        out.append((jobs[im.batch_id], im.index))
    return out


def upscaled_pixels(path, width: int, height: int) -> np.ndarray:
    """The favourite's PNG resized (Lanczos) to width x height, uint8 (1, H, W, 3)."""
    with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB").resize((width, height), PILImage.Resampling.LANCZOS),
                          np.uint8)[None]


def upscale(history, image, factor: int = 2, strength: float = UPSCALE_STRENGTH, low_memory=False) -> Job:
    """Twice the size (at most UPSCALE_MAX_SIDE on the long side, in multiples of 16), from itself."""
    batch = history.batch(image.batch_id)
    f = min(factor, UPSCALE_MAX_SIDE / max(image.width, image.height))
    w, h = (max(16, int(v * f) // 16 * 16) for v in (image.width, image.height))
    if w <= image.width and h <= image.height:
        raise ValueError(f"this image ({image.width} x {image.height}) is already as large as upscaling goes "
                         f"({UPSCALE_MAX_SIDE} pixels on the long side)")
    return from_recipe(batch.recipe, kind="upscale", n=1, seed=int(image.seed), low_memory=low_memory,
                       width=w, height=h, image=upscaled_pixels(image.path, w, h), strength=strength,
                       parent_image=image.id, note=dict(factor=factor))


def rerun(history, batch, low_memory=False) -> Job:
    """A stored batch's recipe, exactly: its settings, diversity method, blend, noise, reference, image."""
    stored = {k: v for k, v in batch.recipe.items() if k != "app"}
    if isinstance(stored.get("method"), dict):  # the reference set is in the batch's inputs, not the recipe
        stored["method"] = {k: v for k, v in stored["method"].items() if k != "reference_size"}
    inputs = history.inputs(batch.id)
    latents = inputs.get("latents")
    labels = [im.label for im in batch.images] if any(im.label for im in batch.images) else None
    # a blend's or a variation's favourites, recorded again from their own batches
    sources = blend_sources(history, batch.note["a"], batch.note["b"]) if stored.get("blend") else None
    recipe = Recipe.from_dict(stored)
    return Job(recipe, kind="rerun", low_memory=low_memory, reference=inputs.get("reference"), loras=list(recipe.loras),
               sources=sources, noise=list(latents) if latents is not None else None, image=inputs.get("image"),
               parent_image=batch.note.get("parent_image"), labels=labels, note=dict(of_batch=batch.id))


def twin(history, batch, low_memory=False) -> Job:
    """The batch again with the same seeds and noise but no diversity method: what diversity did, seen
    side by side. A blend, a variation or an upscale has no plain twin (their noise or edits are theirs)."""
    if batch.kind not in ("generate", "explore", "rerun", "twin") or batch.recipe.get("blend"):
        raise ValueError("a plain twin needs a batch made from seeds: this one was varied, blended or upscaled")
    job = rerun(history, batch, low_memory)
    job.recipe = replace(job.recipe, method=None, diversity=None)
    job.kind, job.reference, job.note = "twin", None, dict(twin_of=batch.id)
    return job
