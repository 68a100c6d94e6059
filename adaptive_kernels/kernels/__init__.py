"""Fused Triton kernels that read the skip mask from device memory, each with its pure-torch reference.

One op per module: ``conv2d`` (NHWC implicit GEMM + depthwise) and ``linear`` (GEMM), both ending with the fused
epilogue of ``epilogue.py`` (:class:`Epilogue`: mask-selected scale/shift table rows = folded BN or a bias,
activation, residual, in place, early exit), ``layer_norm`` (skip-aware affine),
``attention`` (SDPA or a Triton flash kernel) and ``gather_rows`` (a fixed row permutation, e.g. Swin's
window order); ``split_k`` holds the split-K reduction (partial sums + fused epilogue) and the split choice that
conv2d and linear share; ``backend`` the :class:`Epilogue` value and the :class:`KernelSet` the engine runs programs
with (importable without Triton), built here: ``triton_kernels()`` and ``reference_kernels()``. Mask contract (``models.skip.skip_to_mask``): an int32 tensor on the device, one entry
per skippable stage, 1 = run the skippable sub-path, 0 = skip it (the engine appends the sub-network id for a
calibrated model); kernels take it with an index (-1 = unused) and nothing on the host reads it.

Where Triton cannot be imported (``HAS_TRITON`` False) only ``backend`` is loaded: the models, the export, the CPU
engine and the engine's structure check work without it. Set ``TRITON_INTERPRET=1`` before importing this package
to run the kernels on CPU tensors in Triton's interpreter (slow; for tests). Nothing queries a GPU at import; autotuning (and the split-K choice of
conv2d and linear) happens at the first call of each shape, so call every layer once (with the mask all ones: a
kernel that exits early would be tuned on its exit path) before capturing a CUDA graph. ``ADN_KERNEL_AUTOTUNE=0``
(read at import) replaces autotuning by one default config per kernel (fast start for correctness checks on a GPU).
"""

from __future__ import annotations

import functools
import importlib.util

from .backend import Epilogue, KernelSet

#: whether Triton can be imported here (without it only ``backend`` is usable: the engine's structure check)
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from .attention import attention, attention_ref
    from .conv2d import conv2d, conv2d_ref, pack_conv2d_weight
    from .gather import gather_rows, gather_rows_ref
    from .layer_norm import layer_norm, layer_norm_ref
    from .linear import linear, linear_ref


@functools.cache
def triton_kernels() -> KernelSet:
    """The fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from .conv2d import conv2d_workspace_numel, max_split_k
    from .linear import linear_max_split_k, linear_workspace_numel

    return KernelSet(
        name="triton",
        conv2d=conv2d,
        linear=linear,
        layer_norm=layer_norm,
        attention=attention,
        gather_rows=gather_rows,
        prepare_conv_weight=pack_conv2d_weight,
        conv2d_max_split_k=max_split_k,
        conv2d_workspace_numel=conv2d_workspace_numel,
        linear_max_split_k=linear_max_split_k,
        linear_workspace_numel=linear_workspace_numel,
    )


@functools.cache
def reference_kernels() -> KernelSet:
    """The kernels' pure-torch references (any device; they read the mask with ``.item()``)."""
    return KernelSet(
        name="reference",
        conv2d=conv2d_ref,
        linear=linear_ref,
        layer_norm=layer_norm_ref,
        attention=attention_ref,
        gather_rows=gather_rows_ref,
    )


__all__ = [
    "HAS_TRITON",
    "Epilogue",
    "KernelSet",
    "attention",
    "attention_ref",
    "conv2d",
    "conv2d_ref",
    "gather_rows",
    "gather_rows_ref",
    "layer_norm",
    "layer_norm_ref",
    "linear",
    "linear_ref",
    "pack_conv2d_weight",
    "reference_kernels",
    "triton_kernels",
]
