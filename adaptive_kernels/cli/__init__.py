"""Adaptive Depth Networks: python -m adaptive_kernels COMMAND (also the adaptive-kernels script).

  demo   train a small ResNet-ADN on Fashion-MNIST within a time budget (default 7 minutes on 2 CPU cores),
         evaluate every sub-network, print the table, save checkpoint, JSON and plot
  train  train any registered model (adn / plain / single mode); multi-GPU: torchrun --nproc_per_node=N -m
         adaptive_kernels train ...
  eval   accuracy, MACs and measured latency of every sub-network of a checkpoint
  calibrate  per-sub-network BatchNorm statistics of a checkpoint (every mixed sub-network usable)
  export ONNX (every sub-network in one graph) or torch.export file, checked against the model
  serve  an SLO-aware HTTP server (Open Inference Protocol): per batch, the most accurate sub-network in time

Run adaptive-kernels COMMAND --help for a command's options.
"""

from __future__ import annotations

import argparse

import torch

from .._ext import EXT_ERROR, HAS_EXT
from .._version import __version__
from . import calibrate, demo, export, serve, train
from . import eval as evaluate
from .checks import ArgumentParser, HelpFormatter, phase_lines, print_error


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaptive-kernels", description=__doc__, formatter_class=HelpFormatter)
    extension = "built" if HAS_EXT else f"not available: {EXT_ERROR}"
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__} (torch {torch.__version__}; CUDA extension {extension})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for command in (demo, train, evaluate, calibrate, export, serve):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m adaptive_kernels`` and the ``adaptive-kernels`` console script."""
    args = build_parser().parse_args(argv)
    if isinstance(args.threads, int):  # "auto" is measured by the command, on its model
        torch.set_num_threads(args.threads)
    try:
        with phase_lines():
            return args.func(args)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:  # CheckpointError is a ValueError; OSError:
        # disk full, ...; FloatingPointError: a training run that diverged
        print_error(e)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
