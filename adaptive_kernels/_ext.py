"""Loads the optional CUDA extension ``adaptive_kernels._C``. Importing never fails: ``HAS_EXT``
says whether it is usable and ``EXT_ERROR`` why not."""

from __future__ import annotations

import torch

HAS_EXT = False
EXT_ERROR: str | None = None
_C = None

try:
    from . import _C as _C_mod  # type: ignore[attr-defined]
except ImportError as e:
    EXT_ERROR = f"adaptive_kernels._C is not built ({e}); reinstall with a CUDA toolkit present"
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
