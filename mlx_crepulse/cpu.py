"""The CPU's own kernels and threads: what makes MLX's CPU build fast enough to develop and test on.

MLX's CPU build computes tanh and exp far slower than a multiply and runs every elementwise op on one
thread. `install()` puts compiled rational forms of GELU's tanh and of softmax's exp into the two kernel
slots of `models/flux.py` (within 2e-6 of the plain ones), and `forward` runs the two halves of a batch
on two CPU streams when no hook needs the whole batch at each block. The pipeline applies both when
its default device is the CPU; on a Mac's GPU the models run as written. docs/performance.md has the
measurements.
"""

import contextlib
import ctypes
import functools
import math
import threading

import mlx.core as mx

from .models import flux

# Eigen's rational approximation of tanh (as XLA uses on CPUs), within 5e-7 of tanh in float32.
TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
          1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
TANH_CLAMP = 7.90531110763549805


def tanh(x):
    """Eigen's float tanh: odd rational in x, clamped where float32's tanh is +-1."""
    x = mx.clip(x, -TANH_CLAMP, TANH_CLAMP)
    x2 = x * x
    p, q = TANH_P[0], TANH_Q[0]
    for c in TANH_P[1:]:
        p = p * x2 + c
    for c in TANH_Q[1:]:
        q = q * x2 + c
    return x * p / q


@mx.compile
def gelu_tanh(x):
    """diffusers' GELU(approximate="tanh") with the rational tanh, in one compiled pass."""
    return 0.5 * x * (1 + tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


@mx.compile
def exp_nonpositive(x):
    """exp(x) for x <= 0: exp(x / 256) from its Taylor series, squared 8 times (relative error below
    3e-5; for softmax weights only)."""
    y = mx.maximum(x, -87.0) * (1 / 256)
    p = 1 + y * (1 + y * (1 / 2 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y * (1 / 720 + y / 5040))))))
    for _ in range(8):
        p = p * p
    return p


@mx.compile
def _softmax_numerator(s, s_max, scale):
    return exp_nonpositive((s - s_max) * scale)


def attention(q, k, v, scale: float):
    """Softmax attention written out: on the CPU MLX's fused attention falls back to matmul, exp and
    matmul anyway, and its exp is the slow part."""
    s = q @ k.swapaxes(-1, -2)
    p = _softmax_numerator(s, s.max(axis=-1, keepdims=True), mx.array(scale, s.dtype))
    return (p @ v) / p.sum(axis=-1, keepdims=True)


def install():
    """The CPU kernels in the transformer's kernel slots (idempotent)."""
    flux.gelu_tanh, flux.attention = gelu_tanh, attention


def uninstall():
    flux.gelu_tanh, flux.attention = flux.plain_gelu_tanh, flux.plain_attention


def forward(model, img, txt, vec, pe, hook=None):
    """`model(img, txt, vec, pe, hook)`, with the two halves of the batch side by side on two CPU
    streams when no hook needs the whole batch: the same numbers (each image is computed alone either
    way), in less time, because MLX's CPU build runs each stream on its own thread."""
    if hook is not None or img.shape[0] < 2:
        return model(img, txt, vec, pe, hook)
    half = (img.shape[0] + 1) // 2
    streams = (mx.default_stream(mx.cpu), _second_stream())
    outs = []
    for part, stream in zip((slice(0, half), slice(half, None)), streams):
        with mx.stream(stream):
            outs.append(model(img[part], txt if txt.shape[0] == 1 else txt[part],
                              vec if vec.shape[0] == 1 else vec[part], pe))
    out = mx.concatenate(outs)
    blas = openblas_threads()
    if blas is not None and blas[1]() > 1:
        # With OpenBLAS (preloaded on Linux) each stream's matmuls would start a pool of threads as
        # large as the machine, spinning against the other stream: one BLAS thread per stream is faster.
        # The count is read when a matmul runs, so the forward is evaluated now, under it; a caller that
        # holds one_blas_thread() already (training, under mx.grad and mx.compile) keeps it lazy.
        with one_blas_thread():
            mx.eval(out)
    return out


_THREAD = threading.local()


def _second_stream():
    """MLX's streams belong to the thread that made them (the app runs the engine on a worker thread)."""
    if getattr(_THREAD, "cpu_stream", None) is None:
        _THREAD.cpu_stream = mx.new_stream(mx.cpu)
    return _THREAD.cpu_stream


@functools.lru_cache(maxsize=None)
def openblas_threads():
    """(set, get) of OpenBLAS's thread count when MLX's CPU matmuls run on it, else None (macOS's
    Accelerate, the MLX wheel's own BLAS)."""
    try:
        lib = ctypes.CDLL(None)
        return lib.openblas_set_num_threads, lib.openblas_get_num_threads
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def one_blas_thread():
    """OpenBLAS at one thread inside the block (the count put back after); does nothing where MLX's
    matmuls do not run on OpenBLAS."""
    blas = openblas_threads()
    if blas is None:
        yield
        return
    set_threads, get_threads = blas
    threads = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(threads)
