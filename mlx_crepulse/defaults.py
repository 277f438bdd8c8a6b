"""A model's own defaults: what a Recipe's None settings become (`Recipe.resolve`)."""

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

from .recipe import DEFAULT_DIVERSITY
from .repulsion import Repulsion


class DefaultsError(ValueError):
    """A model folder's `crepulse.json` holds a setting that cannot be a default."""


@dataclass(frozen=True)
class Defaults:
    """FLUX.1-schnell's unless a model says otherwise: FLUX.1-dev's when the transformer has a guidance
    embedding, then a folder's `crepulse.json` on top."""
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
    def for_model(cls, guidance_embeds: bool, overrides: Optional[dict] = None) -> "Defaults":
        """`overrides`: the folder's crepulse.json (unknown keys are other tools' and are skipped)."""
        d = cls(steps=20, guidance=3.5, max_sequence_length=512) if guidance_embeds else cls()
        known = {k: v for k, v in (overrides or {}).items() if k in {f.name for f in fields(cls)}}
        if "repulsion_scale_range" in known:
            known["repulsion_scale_range"] = _scale_range(known["repulsion_scale_range"])
        d = replace(d, **known)
        d.check()
        return d

    def check(self):
        for name in ("steps", "width", "height", "max_sequence_length", "repulsion_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DefaultsError(f"crepulse.json: {name} must be a whole number, 1 or more, not {v!r}")
        if isinstance(self.repulsion_steps, bool) or not isinstance(self.repulsion_steps, int) or self.repulsion_steps < 0:
            raise DefaultsError(f"crepulse.json: repulsion_steps must be a whole number, 0 or more, "
                                f"not {self.repulsion_steps!r}")
        for name in ("guidance", "true_cfg"):
            v = getattr(self, name)
            if v is not None and not _finite(v):
                raise DefaultsError(f"crepulse.json: {name} must be a number, not {v!r}")
        if self.true_cfg < 1:
            raise DefaultsError(f"crepulse.json: true_cfg must be 1 (off) or more, not {self.true_cfg!r}")
        if not isinstance(self.negative_prompt, str):
            raise DefaultsError(f"crepulse.json: negative_prompt must be text, not {self.negative_prompt!r}")

    def repulsion_scale(self, diversity: float) -> float:
        """The diversity knob -> a repulsion scale, log scale over `repulsion_scale_range`: 0 its low end,
        0.5 its geometric middle (the recommended scale), 1 its high end; 3 significant digits, as
        recipes record it."""
        lo, hi = self.repulsion_scale_range
        return float(f"{lo * (hi / lo) ** float(diversity):.3g}")

    def repulsion(self, diversity: float = DEFAULT_DIVERSITY, **overrides) -> Repulsion:
        """Contextual repulsion at a diversity, with this model's iterations and repelled steps
        (`overrides`: any other Repulsion field, e.g. blocks or reference)."""
        return Repulsion(**{"scale": self.repulsion_scale(diversity), "iterations": self.repulsion_iterations,
                            "repelled_steps": self.repulsion_steps, **overrides})


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scale_range(v) -> tuple:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_finite(x) and x > 0 for x in v) and v[0] <= v[1]):
        raise DefaultsError(f"crepulse.json: repulsion_scale_range must be [low, high], two positive numbers, "
                            f"not {v!r}")
    return (float(v[0]), float(v[1]))
