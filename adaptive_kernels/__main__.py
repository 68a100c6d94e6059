"""``python -m adaptive_kernels`` and the ``adaptive-kernels`` console script: the command line
(``adaptive_kernels.cli``)."""

import signal
import sys

from .cli import main as run_command


def main() -> int:
    """Run the command, then leave Ctrl-C to nothing while the process exits: after a server stops, torch's and ONNX
    Runtime's exit hooks take ~2 s, and a second Ctrl-C meanwhile printed a traceback from one of them."""
    status = run_command()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


if __name__ == "__main__":
    sys.exit(main())
