"""The fused epilogue of the GEMM-like kernels (conv2d, linear, the split-K reduction) as one value.

Defined here, outside ``kernels`` (whose import needs Triton), because the engine's lowering builds epilogues where
Triton may be missing (its structure-only check on the meta device). Checks, kernel arguments, the torch reference
and the ``@triton.jit`` code are in ``kernels/epilogue.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class Epilogue:
    """What a conv2d / linear kernel does to its fp32 accumulator before storing it:
    ``y = act(acc * scale[row] + shift[row]) (+ residual) (then ReLU if residual_relu)``, ``row = mask[select_index]``
    read on the device (see ``kernels/epilogue.py`` for the three uses: one row, a skip-aware norm, a calibrated
    model).

    scale, shift: (R, C) tables (a (C,) vector is one row), float, each optional, on the kernel's device.
    select_index: the mask slot whose value is the row (-1: a single row). activation: "none", "relu", "relu6" or
    "gelu" (each op allows its own subset). residual: output-shaped, added after the activation (then ReLU with
    ``residual_relu``); the lowered program holds a ``Value`` here and binds the tensor when it runs. in_place: write
    the result into ``residual`` (``out`` may then only be the residual itself). exit_index: the mask slot of the
    early exit (-1: never exit).
    """

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    select_index: int = -1
    activation: str = "none"
    residual: Any = None
    residual_relu: bool = False
    in_place: bool = False
    exit_index: int = -1
