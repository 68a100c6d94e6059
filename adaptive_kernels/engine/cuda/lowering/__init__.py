"""Lowering an ADN model to a :class:`~..program.Program` of fused ops (eval-mode semantics: BatchNorm running
statistics, no dropout).

``builder.py`` holds what every family shares (the op builder, BatchNorm folding, the registry); each model family
has one file here, ``<family>.py``, whose ``@register_lowering(ModelClass)`` function lowers it. Family files are
found by listing this package, so a new family is one new file and nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ...._discovery import import_family_files
from ....kernels.backend import KernelSet
from ....models.base import ADNModel
from ..program import LoweringError, NotLoweredError, Program, validate
from .builder import LOWERINGS, Builder, fold_batchnorm, register_lowering

import_family_files(__name__, __path__, shared={"builder"})

__all__ = ["LoweringError", "NotLoweredError", "fold_batchnorm", "lower", "register_lowering"]


@torch.no_grad()
def lower(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    kernels: KernelSet,
    dtype: torch.dtype,
    device: torch.device | str,
    split_k: int | str = "auto",
) -> Program:
    """Lower ``model`` for inputs of shape ``(batch, *input_shape)`` = (N, C, H, W).

    Parameters are folded (per sub-network when ``model.is_calibrated``; the program's mask then has the sub-network
    id slot, ``Program.subnet_id_slot``), cast to ``dtype`` (norm scales/shifts: fp32, or fp64 for an fp64 program),
    moved to ``device`` and prepared for ``kernels``. The result is validated (see ``program.py``).
    ``split_k``: "auto" (each conv and linear kernel decides; see kernels.split_k) or an int >= 1 forcing that split-K
    on every groups=1 conv and every linear, capped at what each one's K loop allows (``kernels.conv2d_max_split_k``,
    ``kernels.linear_max_split_k``; for tests and experiments).
    Raises :class:`LoweringError` (a ValueError) for anything outside the lowered families, or
    :class:`NotLoweredError` for an input size the lowering does not cover (Swin sizes that need padding).
    """
    family = next((f for f in LOWERINGS if isinstance(model, f)), None)
    if family is None:
        names = ", ".join(f.__name__ for f in LOWERINGS)
        kind = "an ADN model" if isinstance(model, ADNModel) else "not an ADN model"
        raise LoweringError(
            f"cannot lower {type(model).__name__} ({kind}): the engine lowers {names} (and "
            f"their subclasses built by adaptive_kernels.create_model)"
        )
    if len(input_shape) != 3 or input_shape[0] != model.in_chans:
        raise LoweringError(
            f"input shape (N, {', '.join(map(str, input_shape))}) does not match the model's "
            f"(N, {model.in_chans}, H, W)"
        )
    if split_k != "auto" and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k={split_k!r}: use 'auto' or an int >= 1")
    # a calibrated model's BN tables are selected by the sub-network id, one mask slot after the stage bits
    subnet_id_slot = model.num_skippable_stages if model.is_calibrated else None
    b = Builder(kernels, dtype, torch.device(device), split_k, subnet_id_slot)
    x = b.value("input", tuple(input_shape))
    out = LOWERINGS[family](b, model, x)
    program = Program(
        b.items,
        x,
        out,
        model.num_skippable_stages,
        kernels,
        dtype,
        type(model).__name__,
        workspace=b.workspace,
        subnet_id_slot=subnet_id_slot,
    )
    stages = [body.stage for body in program.bodies()]
    if sorted(stages) != list(range(model.num_skippable_stages)):
        raise LoweringError(
            f"expected one skippable body per stage 0..{model.num_skippable_stages - 1}, got stages {stages}"
        )
    validate(program)
    return program
