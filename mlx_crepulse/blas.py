"""Linux only: MLX's wheel bundles a reference BLAS, some 20x slower for float32 matmuls than OpenBLAS.
When a system OpenBLAS is installed (Debian's libopenblas0-pthread), loading it into the global symbol
scope before MLX is imported makes MLX's matmuls bind to it, the same as LD_PRELOAD but without an
environment variable. MLX_CREPULSE_BLAS chooses: a path to a BLAS library, "bundled" to keep MLX's own,
unset for OpenBLAS where found. On macOS MLX uses Accelerate (and Metal) and nothing is done.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

CANDIDATES = [f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0" for arch in ("x86_64", "aarch64")]


def load() -> str:
    """The BLAS MLX will use: a path loaded here, or "bundled"."""
    choice = os.environ.get("MLX_CREPULSE_BLAS", "")
    if not sys.platform.startswith("linux") or choice == "bundled" or "mlx.core" in sys.modules:
        return "bundled"
    paths = [choice] if choice else CANDIDATES + [ctypes.util.find_library("openblas") or ""]
    for path in paths:
        if path and (Path(path).exists() or not path.startswith("/")):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return "bundled"


LOADED = load()
