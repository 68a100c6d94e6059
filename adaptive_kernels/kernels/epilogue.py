"""The fused epilogue of the GEMM-like kernels: the checks of an :class:`~.backend.Epilogue` (the value, defined in
``backend.py`` without Triton so that the engine's lowering imports where Triton cannot), its kernel arguments, its
torch reference and the ``@triton.jit`` function that applies it to an accumulator tile.

``y = act(acc * scale[row] + shift[row]) (+ residual) (then ReLU if residual_relu)`` where ``scale`` and ``shift``
are per-channel TABLES of R rows (each optional). The row is chosen on the device: ``row = mask[select_index]``
(``select_index = -1``: one row, row 0), and the kernel advances the table pointers by ``row * C``; no host code
reads the mask. The same code path serves every use:

* a plain folded BatchNorm or a linear layer's bias: one row, ``select_index = -1``;
* a skip-aware BatchNorm (a ``_skip`` twin): ``stack([skip_set, normal_set])``, ``select_index = stage``, so the
  stage's mask bit (0 = skipped) picks row 0 (the ``_skip`` norm) or row 1 (the normal one);
* a calibrated model (per-sub-network statistics): 2^S rows, one per sub-network, ``select_index = S``, the mask
  slot after the S stage bits that holds the sub-network id (``models.skip.subnet_index``).

``exit_index >= 0`` and ``mask[exit_index] == 0``: the kernel returns before touching memory (early exit of a
skipped sub-path). ``in_place``: the result is written into ``residual`` (the residual stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import apply_activation
from .backend import Epilogue

#: the epilogue that stores the accumulator as it is (the ops' default)
PLAIN = Epilogue()
#: the constexprs of :func:`fused_epilogue` that switch every step off (a split's partial-sum kernel has none)
NO_EPILOGUE = {
    "HAS_SCALE": False,
    "HAS_SHIFT": False,
    "SELECT_ROW": False,
    "ACT": _common.ACT_NONE,
    "HAS_RES": False,
    "RES_RELU": False,
}


def table_rows(op: str, name: str, table: torch.Tensor | None, channels: int) -> int | None:
    """Rows of a scale/shift table (None when absent): 1-D (C,) or 2-D (R, C), contiguous, float."""
    if table is None:
        return None
    _common.check_float(op, f"epilogue.{name}", table)
    if table.dim() not in (1, 2) or table.shape[-1] != channels:
        raise ValueError(
            f"{op}: epilogue.{name} must be ({channels},) or (rows, {channels}) (one entry per output channel), got "
            f"shape {tuple(table.shape)}"
        )
    if table.dim() == 2 and table.shape[0] < 1:
        raise ValueError(f"{op}: epilogue.{name} has no rows: pass at least one row of {channels} entries")
    if not table.is_contiguous():
        raise ValueError(f"{op}: epilogue.{name} must be contiguous: pass {name}.contiguous()")
    return 1 if table.dim() == 1 else table.shape[0]


def check(
    op: str,
    epilogue: Epilogue,
    *,
    channels: int,
    out_shape: tuple[int, ...],
    dtype: torch.dtype,
    mask: torch.Tensor | None,
    out: torch.Tensor | None,
    activations: tuple[str, ...],
) -> tuple[int, torch.Tensor | None]:
    """Validate ``epilogue`` for an op with ``channels`` output channels and output ``out_shape`` in ``dtype``.
    Returns (activation code, the output tensor to write: ``out``, or the residual when in place, or None)."""
    if not isinstance(epilogue, Epilogue):
        raise TypeError(f"{op}: epilogue must be an Epilogue, got {type(epilogue).__name__}")
    e = epilogue
    rows = {name: table_rows(op, name, t, channels) for name, t in (("scale", e.scale), ("shift", e.shift))}
    given = {name: r for name, r in rows.items() if r is not None}
    if len(set(given.values())) > 1:
        raise ValueError(
            f"{op}: epilogue.scale has {rows['scale']} rows but epilogue.shift has {rows['shift']}: one row index "
            f"selects both, so give them the same rows"
        )
    if e.scale is not None and e.shift is not None and e.scale.dtype != e.shift.dtype:
        raise TypeError(
            f"{op}: epilogue.scale has dtype {e.scale.dtype} but epilogue.shift has {e.shift.dtype}: use one dtype"
        )
    _common.check_mask(op, mask, select_index=e.select_index, exit_index=e.exit_index)
    n_rows = next(iter(given.values()), None)
    if e.select_index >= 0 and n_rows is None:
        raise ValueError(
            f"{op}: epilogue.select_index={e.select_index} selects a row but there is no scale/shift table: pass "
            f"tables, or select_index=-1"
        )
    if e.select_index >= 0 and n_rows < 2:
        raise ValueError(
            f"{op}: epilogue.select_index={e.select_index} selects among rows, but the tables have 1 row: pass "
            f"(rows, {channels}) tables (rows = the values mask[{e.select_index}] takes), or select_index=-1"
        )
    if e.select_index < 0 and n_rows is not None and n_rows > 1:
        raise ValueError(
            f"{op}: the epilogue tables have {n_rows} rows but select_index=-1 can only use row 0: pass the "
            f"mask slot that picks the row as select_index, or one row"
        )
    act = _common.activation_code(op, e.activation, activations)
    if e.residual is None and (e.residual_relu or e.in_place):
        flag = "residual_relu" if e.residual_relu else "in_place"
        hint = " (for a plain ReLU use activation='relu')" if e.residual_relu else ""
        raise ValueError(f"{op}: epilogue.{flag}=True needs epilogue.residual{hint}")
    if e.residual is not None and not isinstance(e.residual, torch.Tensor):
        raise TypeError(f"{op}: epilogue.residual must be a torch.Tensor, got {type(e.residual).__name__}")
    _common.check_output(op, "epilogue.residual", e.residual, out_shape, dtype)
    _common.check_output(op, "out", out, out_shape, dtype)
    if e.in_place:
        if out is not None and out.data_ptr() != e.residual.data_ptr():
            raise ValueError(f"{op}: epilogue.in_place=True writes epilogue.residual: pass out=None (or the residual)")
        out = e.residual
    elif out is not None and e.residual is not None and _common.overlaps(out, e.residual):
        raise ValueError(
            f"{op}: out overlaps epilogue.residual: for an in-place residual update set epilogue.in_place=True, "
            f"else pass disjoint tensors"
        )
    _common.check_exit_out(op, e.exit_index, out)
    return act, out


def kernel_tensors(epilogue: Epilogue, out: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(out, residual, scale, shift, mask), :func:`fused_epilogue`'s pointer order; ``out`` stands in for the absent
    ones (the kernels never dereference them: constexpr-disabled)."""
    return tuple(t if t is not None else out for t in (out, epilogue.residual, epilogue.scale, epilogue.shift, mask))


def kernel_indices(epilogue: Epilogue) -> tuple[int, int]:
    """(select_index, exit_index) for the kernels, unused ones as 0."""
    return max(epilogue.select_index, 0), max(epilogue.exit_index, 0)


def kernel_switches(epilogue: Epilogue, act: int) -> dict[str, bool | int]:
    """The constexpr switches of :func:`fused_epilogue` for ``epilogue`` (``act``: its activation code)."""
    return {
        "HAS_SCALE": epilogue.scale is not None,
        "HAS_SHIFT": epilogue.shift is not None,
        "SELECT_ROW": epilogue.select_index >= 0,
        "ACT": act,
        "HAS_RES": epilogue.residual is not None,
        "RES_RELU": bool(epilogue.residual_relu),
    }


def apply_ref(op: str, epilogue: Epilogue, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The epilogue in torch on ``y: (..., C)`` (channels last), in y's dtype; the references' one definition.
    Reads the row with ``.item()`` (a host sync; reference only) and checks it is in the tables."""
    e, dt = epilogue, y.dtype
    row = 0
    if e.select_index >= 0:
        row = int(mask[e.select_index].item())
        rows = next(t.shape[0] if t.dim() == 2 else 1 for t in (e.scale, e.shift) if t is not None)
        if not 0 <= row < rows:
            raise ValueError(
                f"{op}: mask[{e.select_index}] = {row} selects a row outside the {rows} rows of the epilogue tables: "
                f"write a value in [0, {rows}) there"
            )
    for t, add in ((e.scale, False), (e.shift, True)):
        if t is not None:
            r = (t if t.dim() == 2 else t[None])[row].to(dt)
            y = y + r if add else y * r
    y = _common.activation_ref(y, e.activation)
    if e.residual is not None:
        y = y + e.residual.to(dt)
        if e.residual_relu:
            y = torch.relu(y)
    return y


def skipped_ref(op: str, epilogue: Epilogue, mask: torch.Tensor | None, out: torch.Tensor | None) -> bool:
    """Whether the early exit fires in a reference (``out`` is then what it returns, untouched)."""
    if epilogue.exit_index >= 0 and int(mask[epilogue.exit_index].item()) == 0:
        _common.check_exit_out(op, epilogue.exit_index, out)
        return True
    return False


@triton.jit
def fused_epilogue(
    acc,
    rm,
    rn,
    M,
    N,
    out_ptr,
    res_ptr,
    scale_ptr,
    shift_ptr,
    mask_ptr,
    select_index,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SELECT_ROW: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_RELU: tl.constexpr,
):
    """Finish a (BM, BN) fp32 tile of a row-major (M, N) output and store it:
    y = act(acc * scale[row, n] + shift[row, n]) (+ res[m, n]) (then ReLU if RES_RELU), scale and shift (R, N)
    row-major, row = mask[select_index] with SELECT_ROW, else 0.
    out may alias res: each element is read and written by the same program, read first."""
    n_ok = rn < N
    if SELECT_ROW:
        row = tl.load(mask_ptr + select_index).to(tl.int64)
        scale_ptr += row * N
        shift_ptr += row * N
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACT)
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    ok = (rm < M)[:, None] & n_ok[None, :]
    if HAS_RES:
        acc = acc + tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if RES_RELU:
            acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
