"""Loads the optional CUDA extension ``adaptive_kernels._C``. Importing never fails: ``HAS_EXT``
says whether it is usable and ``EXT_ERROR`` why not."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

HAS_EXT = False
EXT_ERROR: str | None = None
_C = None

try:
    _C_mod = importlib.import_module("adaptive_kernels._C")
except ImportError as e:
    # setup.py leaves this note when it installed without the extension: the real cause, and its fix.
    _skipped = Path(__file__).with_name("EXT_SKIPPED")
    if _skipped.is_file():
        EXT_ERROR = f"adaptive_kernels._C was not built at install: {_skipped.read_text().strip()}"
    else:
        EXT_ERROR = (
            f"adaptive_kernels._C is not available ({e}); build it with a CUDA toolkit present: "
            "pip install --no-build-isolation -e ."
        )
else:
    built_torch, built_cuda = _C_mod.built_with()
    if built_torch.split("+")[0] != torch.__version__.split("+")[0] or built_cuda != str(torch.version.cuda):
        EXT_ERROR = (
            f"adaptive_kernels._C was built with torch {built_torch} / CUDA {built_cuda} but torch "
            f"{torch.__version__} / CUDA {torch.version.cuda} is running; rebuild it "
            "(pip install --no-build-isolation -e .)"
        )
    else:
        HAS_EXT, _C = True, _C_mod
