"""``python -m adaptive_kernels``: the command line (``adaptive_kernels.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
