"""Linear layer (GEMM) with a fused epilogue: ``y = act(x @ weight.T + bias) (+ residual)``, fp32 accumulation.

``out`` may be the residual tensor (in-place update of a transformer's residual stream), and
``mask[exit_index] == 0`` makes the kernel return before touching memory (early exit of a skipped
sub-path). The weight stays in nn.Linear's (N, K) layout: the kernel reads (BK, BN) tiles of its
transpose through strides, which Hopper's tensor cores take without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import dot_precision, fused_epilogue

_ACTIVATIONS = ("none", "gelu", "relu")


def _configs() -> list[triton.Config]:
    shapes = [  # BM, BN, BK, warps, stages: Hopper (228 KB shared memory per SM); the first is the default
        (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 3),
        (16, 32, 256, 4, 3),
    ]
    tuned = [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes]
    return _common.choose_configs(triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1), tuned)


def _prune_configs(configs, nargs, **kwargs):
    return _common.prune_tiles(configs, BM=nargs["M"], BN=nargs["N"])


@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["out_ptr"],  # tuning runs the kernel repeatedly; out may alias residual (in place)
    cache_results=True,
)
@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    res_ptr,
    mask_ptr,
    exit_index,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    HAS_EXIT: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]) (+ res[m, n]); x rows strided by stride_xm,
    w rows by stride_wn (unit stride along k); out and res: (M, N) row-major."""
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    GROUP_M: tl.constexpr = 8  # row tiles that share weight tiles while they are in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    # bias is the epilogue's shift; no scale and no mask-selected set for a linear layer
    fused_epilogue(
        acc,
        rm,
        rn,
        M,
        N,
        out_ptr,
        res_ptr,
        bias_ptr,
        bias_ptr,
        bias_ptr,
        bias_ptr,
        mask_ptr,
        0,
        False,
        HAS_BIAS,
        False,
        ACT,
        HAS_RES,
        False,
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    exit_index: int = -1,
) -> torch.Tensor:
    """Fused linear layer: ``y = act(x @ weight.T + bias) (+ residual)``.

    x: (M, K) or (..., K), fp16/bf16/fp32; weight: (N, K) (nn.Linear layout), x's dtype; bias: (N,) any float
    dtype. Returns y: (..., N) in x's dtype (``out`` when given). activation: "none", "gelu" (erf form) or
    "relu". residual: (..., N) like y; ``out`` may be the residual tensor itself (in place).
    ``exit_index >= 0`` and ``mask[exit_index] == 0``: the kernel returns at once and ``out`` keeps its content
    (``out`` is then required). The first call for a new shape autotunes (on a GPU): do it before graph capture.
    """
    op = "linear"
    _common.check_float(op, "x", x)
    _common.check_float(op, "weight", weight, (x.dtype,))
    x2 = _common.rows_2d(op, x, "K")
    m, k = x2.shape
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(
            f"{op}: weight must be (N, K={k}) with unit stride along K (nn.Linear layout), got shape "
            f"{tuple(weight.shape)} strides {weight.stride()}: pass weight.contiguous()"
        )
    n = weight.shape[0]
    out_shape = (*x.shape[:-1], n)
    _common.check_vector(op, "bias", bias, n)
    act = _common.activation_code(op, activation, _ACTIVATIONS)
    _common.check_mask(op, mask, exit_index=exit_index)
    _common.check_output(op, "residual", residual, out_shape, x.dtype)
    _common.check_output(op, "out", out, out_shape, x.dtype)
    _common.check_exit_out(op, exit_index, out)
    _common.check_device(op, "linear_ref", x=x, weight=weight, bias=bias, residual=residual, out=out, mask=mask)
    if out is not None:
        if _common.overlaps(out, x) or _common.overlaps(out, weight):
            raise ValueError(
                f"{op}: out overlaps x or weight: tiles of the inputs are read after other tiles of the "
                f"output are written; use another output buffer"
            )
        if residual is not None and _common.overlaps(out, residual) and out.data_ptr() != residual.data_ptr():
            raise ValueError(f"{op}: out partially overlaps residual: pass the same tensor (in place) or disjoint ones")
    else:
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{op}: K = 0 (empty reduction) is not supported")

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    dummy = out  # stands in for absent pointers; the kernel never dereferences them (constexpr-disabled)
    _linear_kernel[grid](
        x2,
        weight,
        bias if bias is not None else dummy,
        out,
        residual if residual is not None else dummy,
        mask if mask is not None else dummy,
        max(exit_index, 0),
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        HAS_BIAS=bias is not None,
        HAS_EXIT=exit_index >= 0,
        ACT=act,
        HAS_RES=residual is not None,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return out


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    exit_index: int = -1,
) -> torch.Tensor:
    """Pure-torch reference of :func:`linear` (same arguments). Every step runs in x's dtype (parameters are
    cast to it). Reads the mask with ``.item()`` (a host sync; reference only)."""
    if exit_index >= 0 and int(mask[exit_index].item()) == 0:
        _common.check_exit_out("linear_ref", exit_index, out)
        return out
    dt = x.dtype
    y = x @ weight.to(dt).t()
    if bias is not None:
        y = y + bias.to(dt)
    y = _common.activation_ref(y, activation)
    if residual is not None:
        y = y + residual.to(dt)
    if out is not None:
        return out.copy_(y)
    return y
