"""A cheap preview: the VAE's latent image mapped to RGB by one fixed linear map, instead of a decode.

Each pixel of a VAE latent image stands for a (scale x scale) patch of the picture, and the mean colour
of that patch is close to an affine function of the pixel's latent channels (the "latent to RGB
factors" other tools ship per VAE). Rather than ship factors for every VAE, the map is fitted by least
squares on the pairs the pipeline makes anyway: every decode gives latents and the image they decode
to. The fit keeps running sums (the normal equations), so each decode refines it at no cost worth
counting, and after the first decode of a session it is ready: previews then cost one small matmul per
image instead of a full decode. docs/performance.md measures both at 1024 x 1024
(scripts/preview_cost.py).
"""

import numpy as np

RIDGE = 1e-3  # relative to the mean of the Gram matrix's diagonal: keeps dead channels from blowing up


class LatentRGB:
    """An affine map from a VAE's latent channels to RGB, fitted on (latent image, decoded image) pairs."""

    def __init__(self, channels: int):
        self.channels = channels
        self._gram = np.zeros((channels + 1, channels + 1))  # sum of [z 1]^T [z 1]
        self._cross = np.zeros((channels + 1, 3))  # sum of [z 1]^T rgb
        self.samples = 0
        self._map = None

    @property
    def ready(self) -> bool:
        """Whether enough pairs were seen to fix every coefficient (ten latent pixels per unknown)."""
        return self.samples >= 10 * (self.channels + 1)

    def add(self, latents: np.ndarray, images: np.ndarray):
        """Accumulate pairs: latents (n, h, w, C) and the images they decode to (n, H, W, 3) in [0, 1],
        H and W a whole multiple of h and w (each latent pixel is compared with the mean of its patch)."""
        z = np.asarray(latents, np.float64)
        n, h, w, c = z.shape
        img = np.asarray(images, np.float64)
        sy, sx = img.shape[1] // h, img.shape[2] // w
        if c != self.channels or img.shape[:1] != (n,) or img.shape[1:] != (h * sy, w * sx, 3) or not sy or not sx:
            raise ValueError(f"latents {z.shape} and images {img.shape} do not pair up for {self.channels} channels")
        patches = img.reshape(n, h, sy, w, sx, 3).mean(axis=(2, 4)).reshape(-1, 3)
        zz = np.concatenate([z.reshape(-1, c), np.ones((n * h * w, 1))], axis=1)
        self._gram += zz.T @ zz
        self._cross += zz.T @ patches
        self.samples += n * h * w
        self._map = None

    @property
    def weights(self) -> np.ndarray:
        """(C + 1, 3): the channels' RGB factors, then the bias (ridge regression on the pairs so far)."""
        if self._map is None:
            if not self.samples:
                raise ValueError("the latent-to-RGB map has seen no images yet")
            ridge = RIDGE * np.trace(self._gram) / len(self._gram) * np.eye(len(self._gram))
            ridge[-1, -1] = 0.0  # the bias is not shrunk
            self._map = np.linalg.solve(self._gram + ridge, self._cross)
        return self._map

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """Latent images (n, h, w, C) -> preview images (n, h, w, 3), float32 in [0, 1]."""
        z = np.asarray(latents, np.float32)
        m = self.weights.astype(np.float32)
        return np.clip(z @ m[:-1] + m[-1], 0.0, 1.0)
