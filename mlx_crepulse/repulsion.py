"""Contextual repulsion (Dahary et al. 2026), its baselines, contextual blending and the Vendi score.

The batch's diversity is measured by H, the entropy of the eigenvalues of the normalised cosine kernel
of the samples (log of the Vendi score). Repulsion ascends H with respect to the transformer's
activations after chosen blocks: `x <- x + (scale / iterations) * dH/dx`, `iterations` times.

Every quantity H depends on is a function of the Gram matrix S = X X^T of the flattened samples, and
dH/dX = (G + G^T) X with G = dH/dS. So each ascent step is X <- (I + A) X with a small B x B matrix A:
the iterations run on B x B matrices and touch the (B, N*D) activations only twice (once for S, once
to apply the accumulated B x B transform). That is what makes repulsion nearly free; it is exact, not
an approximation (`ascend_direct` runs the textbook loop and the tests compare the two).
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import mlx.core as mx
import numpy as np

SIGNATURE_DIM = 256


# --- the entropy and its gradient ------------------------------------------------------------------------
# The B x B algebra runs in float64 on the CPU stream: at the first block every sample comes from the same
# prompt, the cosines are all within 1e-6 of 1, and float32 cannot resolve the small eigenvalues that H
# depends on. (MLX's GPU has no float64, and eigh runs on the CPU anyway; on a Mac the default device is
# the GPU, so the stream is named explicitly.)

@mx.custom_function
def kernel_entropy(k: mx.array, eps: mx.array) -> mx.array:
    """sum over groups of -sum(lam * log lam), lam the eigenvalues of k (G, B, B) clamped at eps."""
    lam = mx.maximum(mx.linalg.eigvalsh(k, stream=mx.cpu), eps)
    return -(lam * mx.log(lam)).sum()


@kernel_entropy.vjp
def _kernel_entropy_vjp(primals, cotangent, output):
    # MLX has no derivative for eigh. dH/dK = U diag(-(log lam + 1)) U^T, with zero weight where the
    # eigenvalue was clamped (as torch's autograd through clamp_min gives).
    k, eps = primals
    with mx.stream(mx.cpu):
        lam, u = mx.linalg.eigh(k, stream=mx.cpu)
        w = mx.where(lam >= eps, -(mx.log(mx.maximum(lam, eps)) + 1), 0.0)
        g = (u * w[..., None, :]) @ u.swapaxes(-1, -2)
        return (cotangent * g).astype(k.dtype), mx.zeros_like(eps)


GRAM_CHUNK = 3072  # features per float32 partial product (one token at FLUX width): rounding near 1e-7


def gram(f: mx.array) -> mx.array:
    """The Gram matrix f f^T (G, B, B) of flattened samples f (G, B, F), in float64, accurate even when
    the samples nearly coincide: it is assembled from the mean m and the small deviations d = f - m,
    f f^T = |m|^2 + d m^T + m d^T + d d^T, each product taken at its own scale. The products over F
    (14 million numbers a sample in a joint sequence at 1024 px) are taken in float32 over chunks of
    GRAM_CHUNK features, one batched matmul, and the chunks summed in float64: one float32 dot product
    over all of F drifts by 1e-3 of the sum, and H's gradient with it by 2e-2."""
    G, B, F = f.shape
    k = -(-F // GRAM_CHUNK)
    if k * GRAM_CHUNK != F:
        f = mx.pad(f, [(0, 0), (0, 0), (0, k * GRAM_CHUNK - F)])
    f = f.astype(mx.float32).reshape(G, B, k, GRAM_CHUNK).swapaxes(1, 2)  # (G, k, B, chunk)
    m = f.mean(axis=2, keepdims=True)
    d = f - m
    mt = m.swapaxes(-1, -2)
    # per chunk, all three as matmuls: BLAS's blocked dot products round less than a float32 sum()
    dd, dm, mm = d @ d.swapaxes(-1, -2), (d @ mt)[..., 0], (m @ mt)[..., 0, 0]
    with mx.stream(mx.cpu):
        dd, dm, mm = (a.astype(mx.float64).sum(axis=1) for a in (dd, dm, mm))
        return mm[:, None, None] + dm[..., :, None] + dm[..., None, :] + dd


def cosine_kernel(s: mx.array) -> mx.array:
    """Normalised cosine kernel K / B (trace 1) from a Gram matrix (G, B, B)."""
    with mx.stream(mx.cpu):
        d = mx.rsqrt(mx.diagonal(s, axis1=-2, axis2=-1))
        return s * d[..., :, None] * d[..., None, :] / s.shape[-1]


def entropy_of_gram(s: mx.array, eps: float = 1e-6) -> mx.array:
    with mx.stream(mx.cpu):
        return kernel_entropy(cosine_kernel(s), mx.array(eps, mx.float64))


def entropy(x: mx.array, eps: float = 1e-6) -> mx.array:
    """H of each group's samples (summed over groups): x is (G, B, ...) and each sample is flattened."""
    return entropy_of_gram(gram(x.reshape(*x.shape[:2], -1)), eps).astype(mx.float32)


def vendi_score(features, eps: float = 0.0) -> float:
    """The Vendi score of a set of feature vectors (n, d): exp of the entropy of the eigenvalues of
    the normalised cosine-similarity kernel, as in the vendi-score package."""
    x = np.asarray(features, np.float64)
    if x.ndim == 0 or len(x) == 0 or x[0].size == 0 or not np.isfinite(x).all():
        raise ValueError(f"vendi_score needs one or more finite feature vectors (n, d), not an array of shape {x.shape}")
    x = x.reshape(len(x), -1)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    lam = np.linalg.eigvalsh(x @ x.T / len(x))
    lam = lam[lam > max(eps, 1e-12)]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def ascend(x: mx.array, scale: float, iterations: int, eps: float = 1e-6) -> mx.array:
    """`iterations` steps of x <- x + (scale / iterations) dH/dx, each group (G, B, ...) on its own,
    run in the B x B space of the Gram matrix (see the module docstring). All iterations stay lazy:
    no host round trip until the caller evaluates the result."""
    G, B = x.shape[:2]
    f = x.reshape(G, B, -1).astype(mx.float32)
    s = gram(f)
    step = scale / iterations
    dgram = mx.grad(entropy_of_gram)
    with mx.stream(mx.cpu):
        eye = mx.eye(B, dtype=mx.float64)
        w = mx.broadcast_to(eye, (G, B, B))
        for _ in range(iterations):
            g = dgram(s, eps)
            m = eye + step * (g + g.swapaxes(-1, -2))
            w = m @ w
            s = m @ s @ m.swapaxes(-1, -2)
        # x_new = W x, applied as x + (W - I) x with x = mean + deviations, keeping float32 precision
        delta = (w - eye).astype(mx.float32)
    mean = f.mean(axis=1, keepdims=True)
    update = delta.sum(-1, keepdims=True) * mean + delta @ (f - mean)
    return (f + update).reshape(x.shape).astype(x.dtype)


def ascend_direct(x: mx.array, scale: float, iterations: int, eps: float = 1e-6) -> mx.array:
    """The same update written as the paper states it, on the full activations (for tests)."""
    grad = mx.grad(lambda y: entropy(y, eps))
    for _ in range(iterations):
        x = x + (scale / iterations) * grad(x)
    return x


# --- compact signatures and a reference set --------------------------------------------------------------

def _projection(dim: int) -> Optional[mx.array]:
    if dim <= SIGNATURE_DIM:
        return None
    return mx.random.normal((dim, SIGNATURE_DIM), key=mx.random.key(20260328)) / SIGNATURE_DIM ** 0.5


def signature(txt: mx.array) -> mx.array:
    """A compact contextual signature per sample: the mean enriched text token, randomly projected to
    256 numbers (a fixed projection; cosine similarities are kept, Johnson-Lindenstrauss), float16.
    512 bytes an image at FLUX's width: 1,000 images take 0.5 MB."""
    m = txt.astype(mx.float32).mean(axis=1)
    p = _projection(m.shape[-1])
    return (m if p is None else m @ p).astype(mx.float16)


def reference_entropy(txt: mx.array, reference: mx.array, eps: float) -> mx.array:
    """H of the joint kernel of the batch's signatures and a fixed reference set; only the batch moves."""
    m = txt.astype(mx.float32).mean(axis=1)
    p = _projection(m.shape[-1])
    f = mx.concatenate([m if p is None else m @ p, reference.astype(mx.float32)], axis=0)[None]
    return entropy_of_gram(gram(f), eps).astype(mx.float32)


# --- the methods -------------------------------------------------------------------------------------------

class Method:
    """A way of making a batch diverse. The sampler calls three narrow points; each defaults to nothing."""
    name = ""  # what recipes call it

    def check(self, n: int) -> None:
        """Raise ValueError for settings that cannot run on a batch of n (before any work)."""
        if n < 2:
            raise ValueError(f"{type(self).__name__} needs a batch of at least 2 images to push apart, not n={n}")

    def check_model(self, double_blocks: int, width: int) -> None:
        """Raise ValueError for settings this transformer (its double-block count and width) cannot take."""

    def condition(self, step: int, sigma: float, txt: mx.array, pooled: mx.array, n: int):
        """The text condition for this step: T5 states and pooled vector, batch 1 or n."""
        return txt, pooled

    def hook(self, step: int, groups: int, signature_block: int):
        """The edit between the transformer's blocks at this step (see FluxTransformer), or None."""
        return None

    def velocity(self, step: int, sigma: float, x: mx.array, v: mx.array) -> mx.array:
        return v

    def to_dict(self) -> dict:
        d = {"name": self.name, **{k: v for k, v in asdict(self).items() if k != "reference"}}
        if getattr(self, "reference", None) is not None:
            d["reference_size"] = len(self.reference)
        return d


def _need(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def _number(v, low=0.0) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and \
        math.isfinite(float(v)) and float(v) >= low


def _count(v, low) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low


@dataclass
class Repulsion(Method):
    """Contextual repulsion. `scale` (eta), `iterations` (M) and `repelled_steps` (the first denoising
    steps that repel): None takes the model's defaults when a recipe is resolved (the scale from its
    diversity knob). `blocks`: "double" (text tokens after each double-stream block), "single" (the
    whole sequence after each single-stream block), "all", or a list of double-block indices.
    `tokens="image"` repels the image tokens instead (the paper's ablation). `reference`: signatures
    (R, 256) of images already seen; the batch is also pushed away from the 64 nearest of them."""
    name = "contextual"
    scale: Optional[float] = None
    iterations: Optional[int] = None
    repelled_steps: Optional[int] = None
    blocks: Union[str, list] = "all"
    eps: float = 1e-6
    tokens: str = "text"
    reference: Optional[np.ndarray] = field(default=None, repr=False)
    reference_scale: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.blocks, tuple):
            self.blocks = list(self.blocks)

    def check(self, n):
        super().check(n)
        _need(self.scale is None or _number(self.scale), f"repulsion scale must be a finite number, 0 or more, "
                                                         f"not {self.scale!r}")
        _need(self.iterations is None or _count(self.iterations, 1),
              f"repulsion iterations must be 1 or more, not {self.iterations!r}")
        _need(self.repelled_steps is None or _count(self.repelled_steps, 0),
              f"repelled steps must be 0 or more, not {self.repelled_steps!r}")
        _need(self.tokens in ("text", "image"), f"repulsion tokens must be 'text' or 'image', not {self.tokens!r}")
        _need(_number(self.eps) and self.eps > 0, f"repulsion eps must be a small positive number, not {self.eps!r}")
        _need(self.reference_scale is None or _number(self.reference_scale),
              f"reference scale must be a finite number, 0 or more, not {self.reference_scale!r}")
        named = isinstance(self.blocks, str) and self.blocks in ("double", "single", "all")
        listed = isinstance(self.blocks, list) and self.blocks and all(_count(b, 0) for b in self.blocks)
        _need(named or listed, f"repulsion blocks must be 'double', 'single', 'all' or a list of double-block "
                               f"indices, not {self.blocks!r}")

    def check_model(self, double_blocks, width):
        if isinstance(self.blocks, list):
            bad = [b for b in self.blocks if b >= double_blocks]
            _need(not bad, f"repulsion blocks {bad} out of range: this model has double blocks 0 to "
                           f"{double_blocks - 1}")
        if self.reference is not None:
            ref = np.asarray(self.reference)
            dim = min(width, SIGNATURE_DIM)
            _need(ref.ndim == 2 and ref.shape[1] == dim,
                  f"reference signatures must have shape (R, {dim}) from this model, not {ref.shape}")

    def _active(self, kind, index):
        if kind == "double":
            return self.blocks in ("double", "all") or (isinstance(self.blocks, list) and index in self.blocks)
        return self.blocks in ("single", "all")

    def hook(self, step, groups, signature_block):
        if step >= self.repelled_steps or (self.scale == 0 and self.reference is None):
            return None
        reference = None
        if self.reference is not None and len(self.reference):
            reference = mx.array(np.asarray(self.reference, np.float32))

        def repel(kind, index, txt, img):
            if not self._active(kind, index):
                return txt, img
            if kind == "single":  # the whole joint sequence of each sample
                n_txt = txt.shape[1]
                x = self._ascend(mx.concatenate([txt, img], axis=1), groups)
                return x[:, :n_txt], x[:, n_txt:]
            if self.tokens == "image":
                return txt, self._ascend(img, groups)
            txt = self._ascend(txt, groups)
            if reference is not None and index == signature_block:
                txt = self._away_from(txt, reference, groups)
            return txt, img
        return repel

    def _ascend(self, x, groups):
        if self.scale == 0:
            return x
        B = x.shape[0] // groups
        return ascend(x.reshape(groups, B, *x.shape[1:]), self.scale, self.iterations, self.eps).reshape(x.shape)

    def _away_from(self, txt, reference, groups):
        """Ascend the entropy of the batch together with the nearest reference signatures (first group,
        the conditional branch, only)."""
        B = txt.shape[0] // groups
        head = txt[:B]
        sig = signature(head).astype(mx.float32)
        ref = reference
        if ref.shape[0] > 64:  # the 64 references nearest to this batch matter; the rest barely move H
            unit = lambda a: a * mx.rsqrt((a * a).sum(axis=1, keepdims=True))
            cos = unit(ref) @ unit(sig).T
            ref = ref[mx.argsort(-cos.max(axis=1))[:64]]
        step = (self.reference_scale if self.reference_scale is not None else self.scale) / self.iterations
        grad = mx.grad(lambda y: reference_entropy(y, ref, self.eps))
        for _ in range(self.iterations):
            head = head + step * grad(head)
        return mx.concatenate([head, txt[B:]], axis=0) if groups > 1 else head


@dataclass
class ParticleGuidance(Method):
    """Particle guidance (Corso et al. 2023) on the latents: an RBF kernel with the median bandwidth
    h = median(|x_i - x_j|^2) / log(B - 1); each sample's velocity gets a repulsive term, scaled by the
    noise level, while sigma > `until` (the noisy part of the trajectory). `scale` 1 pushes each sample
    by about its kernel-weighted distance to the others over a unit of sigma (see `rbf_repulsion`)."""
    name = "particle"
    scale: float = 0.5
    until: float = 0.5

    def check(self, n):
        super().check(n)
        _need(_number(self.scale), f"particle guidance scale must be a finite number, 0 or more, not {self.scale!r}")
        _need(_number(self.until) and self.until <= 1, f"particle guidance until must be in [0, 1], not {self.until!r}")

    def velocity(self, step, sigma, x, v):
        if sigma <= self.until or self.scale == 0:
            return v
        return v - self.scale * sigma * rbf_repulsion(x)


def rbf_repulsion(x: mx.array) -> mx.array:
    """The direction that moves each sample away from the others (B, ...): -grad_x_i sum_j k(x_i, x_j)
    for the RBF kernel k = exp(-|x_i - x_j|^2 / h) with the median bandwidth, times h / 2. That factor
    makes it sum_j k_ij (x_i - x_j), in the latents' own units whatever their size, so one scale means
    the same push at every resolution."""
    B = x.shape[0]
    f = x.reshape(B, -1).astype(mx.float32)
    sq = (f * f).sum(-1)
    d2 = mx.maximum(sq[:, None] + sq[None] - 2 * f @ f.T, 0)
    off = mx.sort(d2.reshape(-1)[mx.array(np.flatnonzero(~np.eye(B, dtype=bool)))])
    median = (off[(off.size - 1) // 2] + off[off.size // 2]) / 2
    # log(B - 1) is 0 for a pair; the PG paper's heuristic is for larger batches, so keep it positive
    h = mx.maximum(median, 1e-8) / max(np.log(B - 1), 1.0)
    k = mx.exp(-d2 / h)
    rep = k.sum(1, keepdims=True) * f - k @ f  # sum_j k_ij (x_i - x_j)
    return rep.reshape(x.shape).astype(x.dtype)


@dataclass
class CADS(Method):
    """Condition-annealed sampling (Sadat et al. 2023): noise on the T5 tokens and the pooled vector,
    y' = sqrt(g) y + s sqrt(1 - g) n, g from 0 at sigma >= tau2 to 1 at sigma <= tau1, then rescaled to
    y's mean and std (mixed by psi). One noise per image, fixed for the whole trajectory."""
    name = "cads"
    noise_scale: float = 0.25
    tau1: float = 0.6
    tau2: float = 0.9
    psi: float = 1.0
    seed: int = 0

    def check(self, n):
        super().check(n)
        ok = all(_number(v) for v in (self.noise_scale, self.tau1, self.tau2, self.psi))
        _need(ok and 0 <= self.tau1 <= self.tau2 <= 1 and self.psi <= 1,
              "CADS needs finite noise_scale >= 0, 0 <= tau1 <= tau2 <= 1 and 0 <= psi <= 1")
        _need(_count(self.seed, 0), f"CADS seed must be a whole number, 0 or more, not {self.seed!r}")

    def gamma(self, sigma):
        if sigma <= self.tau1:
            return 1.0
        if sigma >= self.tau2:
            return 0.0
        return (self.tau2 - sigma) / (self.tau2 - self.tau1)

    def condition(self, step, sigma, txt, pooled, n):
        g = self.gamma(sigma)
        if g >= 1 or self.noise_scale == 0:
            return txt, pooled
        k1, k2 = mx.random.split(mx.random.key(self.seed))
        txt = mx.broadcast_to(txt, (n,) + txt.shape[1:])
        txt = self._anneal(txt, g, mx.random.normal(txt.shape, key=k1))
        if pooled is None:  # FLUX.2 has no pooled text vector
            return txt, None
        pooled = mx.broadcast_to(pooled, (n,) + pooled.shape[1:])
        return txt, self._anneal(pooled, g, mx.random.normal(pooled.shape, key=k2))

    def _anneal(self, y, g, noise):
        y32 = y.astype(mx.float32)
        noisy = g ** 0.5 * y32 + self.noise_scale * (1 - g) ** 0.5 * noise
        axes = tuple(range(1, y.ndim))
        mean, std = y32.mean(axes, keepdims=True), mx.sqrt(y32.var(axes, keepdims=True))
        n_mean, n_std = noisy.mean(axes, keepdims=True), mx.sqrt(noisy.var(axes, keepdims=True))
        rescaled = (noisy - n_mean) / n_std * std + mean
        return (self.psi * rescaled + (1 - self.psi) * noisy).astype(y.dtype)


@dataclass
class Recording:
    """What the transformer did to one image of a batch during its first `steps` steps (`Pipeline.record`):
    its enriched text tokens after every double-stream block (the contextual space), and the edit the
    diversity method (or a blend) made to its activations after every block it touched. Arrays are
    (branches, tokens, width): 2 branches with true CFG, else 1. `trajectory`: the recipe's settings that
    fix the steps (`Recipe.trajectory()`), which a blend must share."""
    steps: int
    trajectory: dict
    context: dict = field(default_factory=dict)  # (step, double-block index) -> text tokens
    edits: dict = field(default_factory=dict)  # (step, kind, block index) -> (text edit, image edit), None = none

    def wrap(self, hook, step: int, row: int, n: int):
        """`hook` (the step's edits, or None), recording what it does to row `row` of a batch of n (per
        branch) into this recording."""
        def recording(kind, index, txt, img):
            new_txt, new_img = hook(kind, index, txt, img) if hook is not None else (txt, img)
            pick = lambda a: a.reshape(-1, n, *a.shape[1:])[:, row]
            if kind == "double":
                self.context[(step, index)] = pick(new_txt)
            edit = (None if new_txt is txt else pick(new_txt - txt), None if new_img is img else pick(new_img - img))
            if edit[0] is not None or edit[1] is not None:
                self.edits[(step, kind, index)] = edit
            return new_txt, new_img
        return recording

    def arrays(self) -> list:
        return list(self.context.values()) + [e for pair in self.edits.values() for e in pair if e is not None]


@dataclass
class Blend:
    """Contextual blending (paper section 4) of two recorded images A and B (`Pipeline.record`, from the
    batches they were made in). The batch is [A, B, A, A, ...] by its noise: row 0 A's, row 1 B's, each
    further row j A's with blend weight a_j (rows 0 and 1 weigh 0 and 1). During the first
    `blended_steps` steps every row's enriched text tokens after every double-stream block are replaced by
    (1 - a) ctx_A + a ctx_B, and during all recorded steps it gets (1 - a) edit_A + a edit_B of the
    repulsion A's and B's batches made: so rows 0 and 1 are A and B again, exactly, however their batches
    were repelled, and a below 0 extrapolates away from B, above 1 beyond it. No alphas and 0 blended
    steps: A's edits replayed on new noise (the app's subtle variations)."""
    alphas: list = field(default_factory=lambda: [0.5])
    blended_steps: int = 2
    sources: tuple = field(default=(), repr=False)  # (Recording of A, Recording of B)

    def check(self, n):
        """The settings alone, for a batch of n (a recipe read from a file has no sources yet)."""
        _need(isinstance(self.alphas, (list, tuple)) and all(_number(a, -math.inf) for a in self.alphas),
              f"blend alphas must be a list of numbers, not {self.alphas!r}")
        _need(n == 2 + len(self.alphas), f"a blend batch is [A, B] plus one row per alpha: n must be "
                                         f"{2 + len(self.alphas)}, not {n}")
        bad = [a for a in self.alphas if not -0.5 <= a <= 1.5]
        _need(not bad, f"blend alphas must lie in [-0.5, 1.5], not {bad}")
        _need(_count(self.blended_steps, 0), f"blended steps must be 0 or more, not {self.blended_steps!r}")

    def check_sources(self, trajectory: dict):
        """The recordings of A and B: present, long enough, made with this batch's trajectory."""
        _need(len(self.sources) == 2 and all(isinstance(r, Recording) for r in self.sources),
              "a blend needs the recordings of its two images A and B: Pipeline.record(...)")
        short = [r.steps for r in self.sources if r.steps < self.blended_steps]
        _need(not short, f"the blend's {self.blended_steps} steps need recordings of {self.blended_steps} steps, "
                         f"not {short[0] if short else 0}: record with record_steps={self.blended_steps}")
        for k, was in (kv for r in self.sources for kv in r.trajectory.items()):
            _need(trajectory[k] == was, f"blend sources must be recorded with this call's settings: {k} was "
                                        f"{was!r}, this call has {trajectory[k]!r}")

    @property
    def reach(self) -> int:
        """The steps it acts in: its context swaps and its sources' recorded edits."""
        return max([self.blended_steps] + [r.steps for r in self.sources])

    def hook(self, step, groups=1):
        a_rec, b_rec = self.sources
        if step >= self.reach:
            return None
        a = mx.array([0.0, 1.0] + list(self.alphas), mx.float32)[None, :, None, None]

        def mix(ua, ub, like):  # (branches, T, D) each, None for none -> (branches * n, T, D)
            ua = mx.zeros_like(ub) if ua is None else ua
            ub = mx.zeros_like(ua) if ub is None else ub
            m = (1 - a) * ua[:, None].astype(mx.float32) + a * ub[:, None].astype(mx.float32)
            return m.reshape(-1, *m.shape[2:]).astype(like.dtype)

        def blend(kind, index, txt, img):
            (ea_txt, ea_img), (eb_txt, eb_img) = (r.edits.get((step, kind, index), (None, None))
                                                  for r in self.sources)
            if kind == "double" and step < self.blended_steps:
                txt = mix(a_rec.context[(step, index)], b_rec.context[(step, index)], txt)
            elif ea_txt is not None or eb_txt is not None:
                txt = txt + mix(ea_txt, eb_txt, txt)
            if ea_img is not None or eb_img is not None:
                img = img + mix(ea_img, eb_img, img)
            return txt, img
        return blend

    def to_dict(self):
        return dict(alphas=[float(a) for a in self.alphas], blended_steps=self.blended_steps)
