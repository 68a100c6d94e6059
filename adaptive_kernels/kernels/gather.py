"""Row gather: ``out[b, r, :] = x[b, index[r], :]`` — a fixed permutation (or selection) of tokens.

The engine's Swin lowering moves tokens into (shifted) window order and back with it, and assembles patch
merging's 2x2 neighbourhoods; the index is one (R,) vector shared by every batch entry, built at lowering
time. ``mask[exit_index] == 0`` makes the kernel return before touching memory (early exit inside a
skippable sub-path), so the gather can run inside a CUDA-graph body without allocating anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

_INDEX_DTYPES = (torch.int32, torch.int64)


def _configs() -> list[triton.Config]:
    # A copy: tiles come from the row length (launcher); only the warp count is tuned. The first is the default.
    tuned = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 2, 8)]
    return _common.choose_configs(triton.Config({}, num_warps=4, num_stages=1), tuned)


@triton.autotune(configs=_configs(), key=["R", "C"], cache_results=True)
@triton.jit
def _gather_rows_kernel(
    x_ptr,
    index_ptr,
    out_ptr,
    mask_ptr,
    exit_index,
    S,
    R,
    C,
    ROWS_TOTAL,
    HAS_EXIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    """out[b * R + r, c] = x[b * S + index[r], c] for the ROWS_TOTAL = B * R output rows; x: (B * S, C) and
    out: (B * R, C) row-major. A program copies ROWS rows by BLOCK_C columns."""
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < ROWS_TOTAL
    src = tl.load(index_ptr + rows % R, mask=row_ok, other=0).to(tl.int64) + (rows // R).to(tl.int64) * S
    ok = row_ok[:, None] & (cols < C)[None, :]
    values = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=ok)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], values, mask=ok)


def _check(
    op: str,
    x: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    exit_index: int,
    out: torch.Tensor | None,
    dtypes: tuple[torch.dtype, ...],
) -> tuple[int, ...]:
    """Validate the arguments of gather_rows (shared with the reference); returns the output shape (B, R, C)."""
    _common.check_float(op, "x", x, dtypes)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, S, C) (batch, rows, features), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous: pass x.contiguous()")
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{op}: index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: index has dtype {index.dtype}; use torch.int32 or torch.int64 (.int())")
    if index.dim() != 1 or not index.is_contiguous():
        raise ValueError(f"{op}: index must be a contiguous 1-D tensor (one source row per output row)")
    _common.check_mask(op, mask, exit_index=exit_index)
    shape = (x.shape[0], index.shape[0], x.shape[2])
    _common.check_output(op, "out", out, shape, x.dtype)
    _common.check_exit_out(op, exit_index, out)
    return shape


def gather_rows(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    exit_index: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather rows: x: (B, S, C) contiguous, fp16/bf16/fp32; index: (R,) int32/int64 with values in [0, S) -> out:
    (B, R, C) in x's dtype with ``out[b, r] = x[b, index[r]]`` (``out`` when given: contiguous, not overlapping x).

    The index values are NOT checked here: that would read them on the host, a sync that a CUDA-graph capture
    forbids (the engine checks its indices once, when it lowers a model; :func:`gather_rows_ref` checks them).
    ``exit_index >= 0`` and ``mask[exit_index] == 0``: returns at once and ``out`` (required) keeps its content.
    """
    op = "gather_rows"
    shape = _check(op, x, index, mask, exit_index, out, _common.FLOAT_DTYPES)
    _common.check_device(op, "gather_rows_ref", x=x, index=index, mask=mask, out=out)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    elif _common.overlaps(out, x):
        raise ValueError(f"{op}: out overlaps x: a gather cannot run in place, use another output buffer")
    b, r, c = shape
    total = b * r
    if total == 0 or c == 0:
        return out
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x has no rows (S = 0) to gather from")
    if total >= 2**31:
        raise ValueError(f"{op}: B * R = {total} output rows exceed the kernel's int32 row counter; split the batch")
    block_c = min(_common.next_pow2(c), 1024)
    rows = max(1, min(64, 4096 // block_c))  # ~4K elements per program

    def grid(meta):
        return triton.cdiv(total, rows), triton.cdiv(c, block_c)

    _gather_rows_kernel[grid](
        x,
        index,
        out,
        mask if mask is not None else index,
        max(exit_index, 0),
        x.shape[1],
        r,
        c,
        total,
        HAS_EXIT=exit_index >= 0,
        BLOCK_C=block_c,
        ROWS=rows,
    )
    return out


def gather_rows_ref(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    exit_index: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`gather_rows` (same arguments, float64 too; any device; torch checks the
    index values). Reads the mask with ``.item()`` (a host sync; reference only)."""
    op = "gather_rows_ref"
    _check(op, x, index, mask, exit_index, out, (*_common.FLOAT_DTYPES, torch.float64))
    if exit_index >= 0 and int(mask[exit_index].item()) == 0:
        return out
    y = torch.index_select(x, 1, index)
    if out is not None:
        return out.copy_(y)
    return y
