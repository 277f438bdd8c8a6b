"""`python -m mlx_crepulse` and the `mlx-crepulse` script; the command line lives in `cli.py`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
