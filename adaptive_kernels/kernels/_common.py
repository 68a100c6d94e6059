"""Shared pieces of the kernels: the interpreter switch, input checks and activation codes (the fused epilogue
every GEMM-like kernel ends with is in ``epilogue.py``).

``INTERPRET`` is read from ``TRITON_INTERPRET`` once, at import, because Triton decides at definition
time whether ``@triton.jit`` builds a compiled kernel or an interpreter object; the autotune config
lists are chosen from it at the same time (one config under the interpreter, where there is no GPU
timer). Nothing here queries a GPU.

Every ``@triton.autotune`` passes ``cache_results=True``: the timings land in Triton's cache directory
(``TRITON_CACHE_DIR``, default ~/.triton/cache), so only the first process on a machine tunes a shape (an engine
build of ResNet-50 tunes a few hundred configs); later builds read the winner from disk.
"""

from __future__ import annotations

import os
import warnings

import numpy
import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None. Triton < 3.8 converts a
    one-element array to an int in ``range(...)`` over a runtime bound, which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars", deep inside a kernel)."""

    def major_minor(version: str) -> tuple[int, int]:
        parts = (version.split("+")[0].split(".") + ["0"])[:2]
        return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]

    if major_minor(triton_version) < (3, 8) and major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails on NumPy {numpy_version} inside "
            f"kernels with runtime loop bounds: install 'numpy<2.4' or triton>=3.8 (compiled GPU kernels are fine)"
        )
    return None


if INTERPRET and (_problem := interpreter_numpy_problem(triton.__version__, numpy.__version__)):
    warnings.warn(_problem, stacklevel=2)
# ADN_KERNEL_AUTOTUNE=0: one fixed config per kernel on the GPU instead of autotuning, so a run that only
# checks correctness (GPU tests) compiles one variant per shape class instead of a dozen.
AUTOTUNE: bool = os.environ.get("ADN_KERNEL_AUTOTUNE", "1") != "0"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Activation codes shared by the kernels (a tl.constexpr argument ACT).
ACT_NONE, ACT_RELU, ACT_RELU6, ACT_GELU = 0, 1, 2, 3
ACTIVATIONS = {"none": ACT_NONE, "relu": ACT_RELU, "relu6": ACT_RELU6, "gelu": ACT_GELU}


def choose_configs(interpreter: triton.Config, tuned: list[triton.Config]) -> list[triton.Config]:
    """A kernel's autotune configs, decided at import: the interpreter's single config under TRITON_INTERPRET=1
    (no GPU timer there), else the Hopper list, or only its first entry (the default) with ADN_KERNEL_AUTOTUNE=0."""
    if INTERPRET:
        return [interpreter]
    return tuned if AUTOTUNE else tuned[:1]


def prune_tiles(configs: list[triton.Config], **sizes: int) -> list[triton.Config]:
    """An autotuner's ``early_config_prune``: drop configs whose tile (``configs[i].kwargs[name]``) is much larger
    than the problem size given for it (they only waste tuning time); keep at least one.
    ``prune_tiles(configs, BM=M, BN=N)``: tiles up to next_pow2(size), and at least 16, stay."""
    caps = {name: max(16, triton.next_power_of_2(size)) for name, size in sizes.items()}
    kept = [c for c in configs if all(c.kwargs[name] <= cap for name, cap in caps.items())]
    return kept or configs[-1:]


def rows_2d(op: str, x: torch.Tensor, last: str) -> torch.Tensor:
    """x: (..., L) -> a (M, L) view with unit stride along L (2-D inputs may have any row stride); ``last``
    names the last dim in the error messages ("K", "C")."""
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (M, {last}) or (..., {last}), got shape {tuple(x.shape)}")
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    if not x.is_contiguous():
        raise ValueError(
            f"{op}: x of shape {tuple(x.shape)} must be contiguous (or 2-D with unit stride along {last}): "
            f"pass x.contiguous()"
        )
    return x.view(-1, x.shape[-1])


def activation_code(op: str, activation: str, allowed: tuple[str, ...]) -> int:
    """Map an activation name to its kernel code, or raise a ValueError that lists the allowed names."""
    if activation not in allowed:
        raise ValueError(
            f"{op}: activation={activation!r} is not supported: use one of {', '.join(map(repr, allowed))}"
        )
    return ACTIVATIONS[activation]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs would otherwise run as TF32 on the GPU (~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_device(op: str, ref_name: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors must share one device; CPU tensors only run under TRITON_INTERPRET=1."""
    given = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in given.items()}
    first = next(iter(devices.values()))
    others = {k: d for k, d in devices.items() if d != first}
    if others:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}: move them with .to(device)")
    if first.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{op}: tensors are on {first}, but the Triton kernels need a CUDA device: move them to the GPU with "
            f".cuda(), use {ref_name} (pure torch) on the CPU, or set TRITON_INTERPRET=1 before importing "
            f"adaptive_kernels.kernels to run the kernels in Triton's (slow) interpreter"
        )
    return first


def check_float(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {names} (convert with .to(dtype))")


def check_vector(op: str, name: str, t: torch.Tensor | None, length: int, like: torch.Tensor | None = None) -> None:
    """A per-channel parameter: 1-D, ``length`` entries, contiguous, float; same dtype as ``like`` when given."""
    if t is None:
        return
    check_float(op, name, t)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape ({length},) (one entry per channel), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous: pass {name}.contiguous()")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype} but its counterpart has {like.dtype}: both sets of a mask-selected "
            f"parameter must share one dtype"
        )


def check_mask(op: str, mask: torch.Tensor | None, **indices: int) -> None:
    """The skip mask: int32, 1-D, long enough for every index that is used (index -1 = unused)."""
    for name, index in indices.items():
        if not isinstance(index, int) or index < -1:
            raise ValueError(f"{op}: {name}={index!r} must be an int >= 0, or -1 for unused")
    used = {k: i for k, i in indices.items() if i >= 0}
    if mask is None:
        if used:
            names = ", ".join(f"{k}={i}" for k, i in used.items())
            raise ValueError(f"{op}: {names} given without mask: pass mask (int32, one entry per skippable stage)")
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.int32:
        raise TypeError(f"{op}: mask has dtype {mask.dtype}, expected torch.int32 (1 = run, 0 = skip): use .int()")
    if mask.dim() != 1 or not mask.is_contiguous():
        raise ValueError(
            f"{op}: mask must be a contiguous 1-D tensor (one entry per skippable stage), got shape {tuple(mask.shape)}"
        )
    for name, index in used.items():
        if index >= mask.shape[0]:
            raise ValueError(
                f"{op}: {name}={index} but mask has only {mask.shape[0]} entries: use an index below "
                f"{mask.shape[0]} or a longer mask"
            )


def check_output(op: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """An output-shaped tensor (``out`` or ``residual``): exact shape, dtype, contiguous."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have the output's shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but the output is {dtype}: use .to({dtype})")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (row-major): pass {name}.contiguous()")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory ranges intersect (conservative: compares the spanned byte ranges)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def check_exit_out(op: str, exit_index: int, out: torch.Tensor | None) -> None:
    if exit_index >= 0 and out is None:
        raise ValueError(
            f"{op}: exit_index={exit_index} needs out=: when the stage is skipped the kernel writes nothing, so the "
            f"result must be a tensor you own (the one that keeps its content)"
        )


def activation_ref(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The activations of the kernels, in torch (for the references)."""
    if activation == "relu":
        return torch.relu(y)
    if activation == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation != "none":
        raise ValueError(f"unknown activation {activation!r}: use 'none', 'relu', 'relu6' or 'gelu'")
    return y


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """x: fp32 tile. ACT: 0 none, 1 relu, 2 relu6, 3 gelu (erf form, as torch's default)."""
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif ACT == 3:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x
