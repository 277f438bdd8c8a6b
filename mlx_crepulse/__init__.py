"""mlx-crepulse: FLUX in MLX with contextual repulsion, for varied batches of images on Apple Silicon."""

from . import blas  # noqa: F401 - first: on Linux it must run before MLX is imported

from .defaults import Defaults, DefaultsError
from .footprint import physical_memory
from .pipeline import Cancelled, NotFinite, Pipeline, Progress, Result
from .recipe import DEFAULT_DIVERSITY, RANDOM_SEED, Recipe, RecipeError, random_seed
from .recipe import migrate as migrate_recipe
from .repulsion import CADS, Blend, ParticleGuidance, Recording, Repulsion, signature, vendi_score
from .sampling import mix_noise
from .version import __version__
from .weights import WeightsError

__all__ = ["Pipeline", "Recipe", "Repulsion", "ParticleGuidance", "CADS", "Blend", "Recording", "Result",
           "Progress", "Defaults", "Cancelled", "NotFinite", "RecipeError", "DefaultsError", "WeightsError", "vendi_score",
           "signature", "mix_noise", "physical_memory", "random_seed", "migrate_recipe", "DEFAULT_DIVERSITY", "RANDOM_SEED", "__version__"]
