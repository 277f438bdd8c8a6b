"""mlx-crepulse: FLUX.1 in MLX with contextual repulsion, for varied batches of images on Apple Silicon."""

from .pipeline import Cancelled, Defaults, Pipeline, Progress, Result, __version__
from .repulsion import CADS, Blend, ParticleGuidance, Repulsion, signature, vendi_score
from .sampling import mix_noise
from .weights import WeightsError

__all__ = ["Pipeline", "Repulsion", "ParticleGuidance", "CADS", "Blend", "Result", "Progress", "Defaults",
           "Cancelled", "WeightsError", "vendi_score", "signature", "mix_noise", "__version__"]
