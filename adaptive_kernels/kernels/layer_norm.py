"""LayerNorm over the last dimension with skip-aware affine parameters.

``mask[norm_index]`` picks the (weight, bias) set on the device: the normal set when 1, the ``_skip``
set when 0 (skip-aware LayerNorm of ViT/Swin ADNs). ``mask[exit_index] == 0`` makes the kernel return
before touching memory. Statistics are computed in fp32 from the whole row held in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


def _configs() -> list[triton.Config]:
    # Rows per program come from the row length (launcher); only the warp count is tuned. The first is the default.
    tuned = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 2, 8, 16)]
    return _common.choose_configs(triton.Config({}, num_warps=4, num_stages=1), tuned)


@triton.autotune(configs=_configs(), key=["M", "C"], restore_value=["out_ptr"], cache_results=True)
@triton.jit
def _layer_norm_kernel(
    x_ptr,
    out_ptr,
    w_ptr,
    b_ptr,
    w_skip_ptr,
    b_skip_ptr,
    mask_ptr,
    norm_index,
    exit_index,
    M,
    C,
    stride_xm,
    eps,
    SELECT_NORM: tl.constexpr,
    HAS_EXIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    """out[m, :] = (x[m, :] - mean) / sqrt(var + eps) * w + b, var biased; x rows strided by stride_xm,
    out: (M, C) row-major (may be x itself: each program reads its rows before writing them)."""
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    if SELECT_NORM:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + norm_index) == 0:
            w_ptr = w_skip_ptr
            b_ptr = b_skip_ptr
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ok = (rows < M)[:, None] & c_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + rows64 * C + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    weight_skip: torch.Tensor | None = None,
    bias_skip: torch.Tensor | None = None,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    norm_index: int = -1,
    exit_index: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim. x: (M, C) or (..., C), fp16/bf16/fp32; weight, bias (and the _skip set): (C,)
    any float dtype (the _skip set in the same dtype). Returns (..., C) in x's dtype (``out`` when given; it
    may be x itself). ``norm_index >= 0``: ``mask[norm_index] == 0`` uses (weight_skip, bias_skip).
    ``exit_index >= 0`` and ``mask[exit_index] == 0``: returns at once, ``out`` (required) keeps its content.
    """
    op = "layer_norm"
    _common.check_float(op, "x", x)
    x2 = _common.rows_2d(op, x, "C")
    m, c = x2.shape
    if weight is None or bias is None:
        raise ValueError(f"{op}: weight and bias are required (for a LayerNorm without affine pass ones and zeros)")
    _common.check_vector(op, "weight", weight, c)
    _common.check_vector(op, "bias", bias, c)
    _common.check_mask(op, mask, norm_index=norm_index, exit_index=exit_index)
    select = norm_index >= 0
    if select and (weight_skip is None or bias_skip is None):
        raise ValueError(
            f"{op}: norm_index={norm_index} selects between two parameter sets: pass weight_skip and bias_skip"
        )
    if not select and (weight_skip is not None or bias_skip is not None):
        raise ValueError(f"{op}: weight_skip/bias_skip are only used with norm_index >= 0 (and a mask)")
    _common.check_vector(op, "weight_skip", weight_skip, c, like=weight)
    _common.check_vector(op, "bias_skip", bias_skip, c, like=bias)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps={eps!r} must be a non-negative number")
    _common.check_output(op, "out", out, tuple(x.shape), x.dtype)
    _common.check_exit_out(op, exit_index, out)
    _common.check_device(
        op,
        "layer_norm_ref",
        x=x,
        weight=weight,
        bias=bias,
        weight_skip=weight_skip,
        bias_skip=bias_skip,
        mask=mask,
        out=out,
    )
    if out is not None:
        if _common.overlaps(out, x) and (out.data_ptr() != x.data_ptr() or x2.stride(0) != c):
            raise ValueError(f"{op}: out partially overlaps x: pass x itself (in place) or a disjoint tensor")
    else:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    block_c = _common.next_pow2(c)
    if block_c > 16384:
        raise ValueError(f"{op}: C={c} is larger than this kernel's one-row-in-registers limit of 16384")

    # ~8K fp32 values per program: enough rows per program for small C, one row's registers for large C
    rows = max(1, min(16, 8192 // block_c))

    def grid(meta):
        return (triton.cdiv(m, rows),)

    _layer_norm_kernel[grid](
        x2,
        out,
        weight,
        bias,
        weight_skip if select else weight,
        bias_skip if select else bias,
        mask if mask is not None else out,
        max(norm_index, 0),
        max(exit_index, 0),
        m,
        c,
        x2.stride(0),
        float(eps),
        SELECT_NORM=select,
        HAS_EXIT=exit_index >= 0,
        BLOCK_C=block_c,
        ROWS=rows,
    )
    return out


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    weight_skip: torch.Tensor | None = None,
    bias_skip: torch.Tensor | None = None,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    norm_index: int = -1,
    exit_index: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`layer_norm` (same arguments), computed in x's dtype
    (torch's layer_norm; parameters cast to it). Reads the mask with ``.item()`` (reference only)."""
    if exit_index >= 0 and int(mask[exit_index].item()) == 0:
        _common.check_exit_out("layer_norm_ref", exit_index, out)
        return out
    if norm_index >= 0 and int(mask[norm_index].item()) == 0:
        weight, bias = weight_skip, bias_skip
    dt = x.dtype
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight.to(dt), bias.to(dt), eps)
    if out is not None:
        return out.copy_(y)
    return y
