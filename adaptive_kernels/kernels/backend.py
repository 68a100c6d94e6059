"""What the engine hands the kernels, importable without Triton: the fused :class:`Epilogue` value and the
:class:`KernelSet` (the launchers of every op, as one implementation: the Triton kernels or their pure-torch
references, built by ``kernels.triton_kernels()`` / ``kernels.reference_kernels()``, or ``STRUCTURE_ONLY``, which
lowers a model on the meta device to check its structure where Triton may be missing).

Adding an op: its module (kernel + launcher + ``*_ref``), one field here, and its entry in the two builders.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _no_split(*args, **kwargs) -> int:
    return 1


def _no_workspace(*args, **kwargs) -> int:
    return 0


def _unpacked(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous()


@dataclass(frozen=True, kw_only=True)
class KernelSet:
    """The op launchers, with one signature for every implementation.

    ``prepare_conv_weight`` turns an nn.Conv2d weight (Cout, Cin/g, KH, KW) into what ``conv2d`` takes.
    Split-K (the ``split_k``/``workspace`` arguments of ``conv2d`` and ``linear``; the references take and ignore
    them): ``conv2d_max_split_k(cin, kernel_size, groups)`` and ``linear_max_split_k(k)`` are the largest splits the
    launchers accept, ``conv2d_workspace_numel(m, cout, cin, kernel_size, *, groups, split_k, device)`` and
    ``linear_workspace_numel(m, n, k, *, split_k, device)`` the fp32 scratch they may use; the defaults (1 and 0)
    describe an implementation that never splits.
    """

    name: str
    conv2d: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    gather_rows: Callable[..., torch.Tensor]
    prepare_conv_weight: Callable[[torch.Tensor], torch.Tensor] = _unpacked
    conv2d_max_split_k: Callable[[int, tuple[int, int], int], int] = _no_split
    conv2d_workspace_numel: Callable[..., int] = _no_workspace
    linear_max_split_k: Callable[[int], int] = _no_split
    linear_workspace_numel: Callable[..., int] = _no_workspace


#: the fields of a KernelSet that launch an op (the rest describe how to prepare for them)
OPS = ("conv2d", "linear", "layer_norm", "attention", "gather_rows")


def _not_runnable(*args, **kwargs) -> torch.Tensor:
    raise RuntimeError("this program was lowered only to check that the model lowers; it cannot run")


#: Lowers a model on the meta device without importing any kernel (the engine's fallback checks that a model would
#: lower where Triton may not even be installed).
STRUCTURE_ONLY = KernelSet(name="structure-only", **{op: _not_runnable for op in OPS})
