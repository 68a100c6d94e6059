"""Fused Triton kernels that read the skip mask from device memory, each with its pure-torch reference.

One op per module: ``conv2d`` (NHWC implicit GEMM + depthwise) and ``linear`` (GEMM), both ending with the fused
epilogue of ``epilogue.py`` (:class:`Epilogue`: mask-selected scale/shift table rows = folded BN or a bias,
activation, residual, in place, early exit), ``layer_norm`` (skip-aware affine),
``attention`` (SDPA or a Triton flash kernel) and ``gather_rows`` (a fixed row permutation, e.g. Swin's
window order); ``split_k`` holds the split-K reduction (partial sums + fused epilogue) and the split choice that
conv2d and linear share. Mask contract: an int32 tensor on the device, one entry per skippable stage, 1 = run the
skippable sub-path, 0 = skip it (the engine appends the sub-network id for a calibrated model); kernels take it with
an index (-1 = unused) and nothing on the host reads it.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors in Triton's
interpreter (slow; for tests). Importing never queries a GPU; autotuning (and the split-K choice of conv2d and
linear) happens at the first call of each shape, so call every layer once (with the mask all ones: a kernel that
exits early would be tuned on its exit path) before capturing a CUDA graph. ``ADN_KERNEL_AUTOTUNE=0`` (read at
import) replaces autotuning by one default config per kernel (fast start for correctness checks on a GPU).
"""

from ..epilogue import Epilogue
from .attention import attention, attention_ref
from .conv2d import conv2d, conv2d_ref, pack_conv2d_weight
from .gather import gather_rows, gather_rows_ref
from .layer_norm import layer_norm, layer_norm_ref
from .linear import linear, linear_ref

__all__ = [
    "Epilogue",
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
]
