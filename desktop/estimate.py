"""How long a batch will take, said before it starts: this model's measured speed in the history,
scaled to the new batch's work.

A batch's time (steps and decodes, as `Result.seconds` measures it: not loading, not reading the
prompt) grows with the steps run, the images, the passes a step makes (two with true CFG) and the
tokens of the joint sequence (16x16 image pixels each, plus the text). Its speed is seconds per unit of
that work; the estimate is the median speed of the latest batches of the same model and precision,
preferring those that were repelled as this one will be or not (repulsion's gradient costs extra
steps' worth), times the new work.
"""

from statistics import median
from typing import Optional

PIXELS_PER_TOKEN = 16 * 16  # FLUX.1 and FLUX.2: an 8x VAE, then 2x2 patches
RECENT = 5  # batches whose speed counts


def work(recipe: dict) -> float:
    """Units of work of a resolved recipe (as the history stores it)."""
    strength = recipe.get("strength")
    steps = recipe["steps"] * (strength if strength else 1.0)  # image to image runs the last steps only
    passes = 2 if (recipe.get("true_cfg") or 1) > 1 else 1
    tokens = recipe["width"] * recipe["height"] / PIXELS_PER_TOKEN + (recipe.get("max_sequence_length") or 0)
    return max(steps, 1) * recipe["n"] * passes * tokens


def _repelled(recipe: dict) -> bool:
    return recipe.get("method") is not None


def seconds(wanted: dict, past: list) -> Optional[float]:
    """Estimated seconds for `wanted` (a recipe dict: settings left at None take the latest past batch's,
    as the model's defaults fill them), from `past` (history Batches, newest first, of any model); None
    when this model and precision have no measured batch yet."""
    same = [b for b in past if b.recipe.get("model") == wanted.get("model") and b.kind != "blend"
            and b.recipe.get("quantize") == wanted.get("quantize") and b.seconds > 0]
    if not same:
        return None
    like = [b for b in same if _repelled(b.recipe) == _repelled(wanted)] or same
    speed = median(b.seconds / work(b.recipe) for b in like[:RECENT])
    filled = dict(wanted)
    for k in ("steps", "width", "height", "max_sequence_length", "true_cfg"):
        if filled.get(k) is None:
            filled[k] = same[0].recipe.get(k)
    return speed * work(filled)


def describe(estimate: Optional[float], loading: bool) -> str:
    """The estimate as the form shows it."""
    if estimate is None:
        return "Time: known after the first batch with this model"
    if estimate < 1:
        text = "Under a second"
    elif estimate < 90:
        text = f"About {estimate:.0f} s"
    else:
        text = f"About {estimate / 60:.0f} min"
    return text + (", plus loading the model" if loading else "")
