"""Linear layer (GEMM) with a fused epilogue: ``y = act(x @ weight.T * scale[row] + shift[row]) (+ residual)``, fp32
accumulation; the epilogue is an :class:`~.epilogue.Epilogue`, a linear layer's bias is its ``shift``.

The result may update the residual in place (a transformer's residual stream), and ``mask[exit_index] == 0`` makes
the kernel return before touching memory (early exit of a skipped sub-path). The weight stays in nn.Linear's (N, K) layout: the kernel reads (BK, BN) tiles of its
transpose through strides, which Hopper's tensor cores take without a copy.

Split-K (shared with ``conv2d``, see ``split_k.py``): a GEMM with few output tiles (ViT-B/16 at batch 1: fc2 has
M=197 tokens, N=768, K=3072, a few dozen tiles for 132 SMs) can cut its K loop into ``split_k`` shares whose fp32
partial sums go to a workspace; ``split_k.reduce_partials`` then adds them and applies the same epilogue. ``split_k="auto"`` never splits under the interpreter; on a GPU it splits only
shapes with few ``TILE`` output tiles (``split_k.choose_split_k``) and picks the split by timing once per shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from . import epilogue as _epilogue
from . import split_k as _split
from ._common import dot_precision
from .backend import Epilogue
from .epilogue import PLAIN, fused_epilogue

_ACTIVATIONS = ("none", "gelu", "relu")


#: (BM, BN) of the default config (the first of ``_configs``): what launches untuned, and the tile the split-K
#: heuristic counts output tiles with
TILE = (64, 128)


def _configs() -> list[triton.Config]:
    # 128x256 and 256x128 with 8 warps are left out: with GELU + residual they spilled 968 and 952 B (spill stores +
    # loads, ptxas 12.9 from triton 3.8 for sm_90a; 44-76 B reported with triton 3.6)
    shapes = [  # BM, BN, BK, warps, stages: Hopper (228 KB shared memory per SM); the first is the default
        (*TILE, 64, 4, 4),
        (128, 128, 64, 8, 3),
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
    key=["M", "N", "K", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["out_ptr"],  # tuning runs the kernel repeatedly; out may alias residual (in place)
    cache_results=True,
)
@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    scale_ptr,
    shift_ptr,
    mask_ptr,
    ws_ptr,
    select_index,
    exit_index,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    SPLIT_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SELECT_ROW: tl.constexpr,
    HAS_EXIT: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """out[m, n] = epilogue(sum_k x[m, k] * w[n, k]) (``fused_epilogue``; a bias is the shift); x rows strided by
    stride_xm, w rows by stride_wn (unit stride along k); out and res: (M, N) row-major.
    SPLIT_K > 1: grid axis 1 is the split s, which sums K iterations [s*T // SPLIT_K, (s+1)*T // SPLIT_K) of the T
    iterations and stores the fp32 partial to ws[s, m, n] (ws: (SPLIT_K, M, N)); no epilogue here."""
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
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        split = tl.program_id(1)
        k_iters = tl.cdiv(K, BK)
        k_lo = (split * k_iters // SPLIT_K) * BK
        k_hi = ((split + 1) * k_iters // SPLIT_K) * BK
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if SPLIT_K == 1:
        fused_epilogue(
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
            HAS_SCALE,
            HAS_SHIFT,
            SELECT_ROW,
            ACT,
            HAS_RES,
            RES_RELU,
        )
    else:
        # every split stores its whole tile (zeros when it got no K iterations): the reduction needs no init
        ws_rows = split.to(tl.int64) * M + rm
        tl.store(ws_ptr + ws_rows[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def linear_max_split_k(k: int) -> int:
    """The largest ``split_k`` :func:`linear` accepts for ``k`` input features: the number of 64-wide steps of its K
    loop, ``ceil(K / 64)`` (at least 1)."""
    return _split.num_k_steps(k)


def linear_workspace_numel(m: int, n: int, k: int, *, split_k: int | str = "auto", device: torch.device | str) -> int:
    """fp32 elements of split-K workspace that ``linear(..., split_k=split_k)`` may use for ``m`` rows (all leading
    dims of x together), ``n`` outputs and ``k`` inputs on ``device`` (0: it never splits). For "auto" this is the
    largest candidate split times ``m * n``, whatever the measurement picks. A caller that must not allocate during
    the call (a CUDA-graph body) preallocates this much and passes it as ``workspace``."""
    k_steps = linear_max_split_k(k)
    split = _split.check_split_k("linear_workspace_numel", split_k, k_steps, "linear_max_split_k(K)")
    return _split.workspace_numel(split, m, n, k_steps, device, TILE)


def _split_key(m: int, k: int, n: int, x: torch.Tensor) -> tuple:
    return ("linear", m, k, n, x.dtype, x.device)


def linear_auto_split_k(x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """The split ``linear(x, weight, ..., split_k="auto")`` launches (only the shapes, dtype and device matter), or
    None while the first call of this shape on the GPU still has to measure it. For benchmarks and logs."""
    k, n = x.shape[-1], weight.shape[0]
    m = x.numel() // k if k else 0
    return _split.auto_split(_split_key(m, k, n, x), m, n, linear_max_split_k(k), x.device, TILE)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    epilogue: Epilogue = PLAIN,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | str = "auto",
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused linear layer: ``y = act(x @ weight.T * scale[row] + shift[row]) (+ residual)`` (then ReLU).

    x: (M, K) or (..., K), fp16/bf16/fp32; weight: (N, K) (nn.Linear layout), x's dtype. Returns y: (..., N) in x's
    dtype (``out``, or the residual when ``epilogue.in_place``). epilogue: :class:`~.epilogue.Epilogue`; a bias is
    its ``shift`` ((N,), any float dtype), tables of (R, N) rows are selected by ``mask[epilogue.select_index]``;
    activation "none", "gelu" (erf form) or "relu"; residual (..., N) like y; early exit on
    ``mask[epilogue.exit_index] == 0``: the kernel returns at once and ``out`` keeps its content (``out``, or
    in_place, is then required). The first call for a new shape autotunes (on a GPU): do it before graph capture.

    split_k: an int in ``[1, linear_max_split_k(K)]`` splits the K loop into that many shares (partial sums in
    ``workspace``, then a reduce kernel with the epilogue). "auto": 1 under the interpreter; on a GPU, for shapes
    with few output tiles (``split_k.choose_split_k``), the fastest of the candidate splits, timed at the first
    call of the shape and cached (the heuristic's split with ADN_KERNEL_AUTOTUNE=0, or inside a CUDA graph capture,
    where nothing may be timed). workspace: fp32, contiguous, on x's device, >= split * M * N elements
    (:func:`linear_workspace_numel`, M = all rows of x); only used when the call splits, its content is not read
    before being written. Without it a split call allocates one: a CUDA-graph body must pass a preallocated one.
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
    act, out = _epilogue.check(
        op, epilogue, channels=n, out_shape=out_shape, dtype=x.dtype, mask=mask, out=out, activations=_ACTIVATIONS
    )
    k_steps = linear_max_split_k(k)
    forced_split = _split.check_split_k(op, split_k, k_steps, "linear_max_split_k(K)")
    residual = epilogue.residual
    _split.check_workspace(
        op, workspace, x=x, weight=weight, scale=epilogue.scale, shift=epilogue.shift, out=out, residual=residual
    )
    _common.check_device(
        op,
        "linear_ref",
        x=x,
        weight=weight,
        scale=epilogue.scale,
        shift=epilogue.shift,
        residual=residual,
        out=out,
        mask=mask,
        workspace=workspace,
    )
    if out is not None:
        if _common.overlaps(out, x) or _common.overlaps(out, weight):
            raise ValueError(
                f"{op}: out overlaps x or weight: tiles of the inputs are read after other tiles of the "
                f"output are written; use another output buffer"
            )
    else:
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{op}: K = 0 (empty reduction) is not supported")
    switches = _epilogue.kernel_switches(epilogue, act)
    indices = _epilogue.kernel_indices(epilogue)

    def launch(split: int, out_t: torch.Tensor, ws: torch.Tensor | None, use_exit: bool) -> None:
        has_exit = use_exit and epilogue.exit_index >= 0
        ptrs = _epilogue.kernel_tensors(epilogue, out_t, mask)

        def grid(meta):
            return triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), split

        _linear_kernel[grid](
            x2,
            weight,
            *ptrs,
            ws if split > 1 else out_t,
            *indices,
            m,
            n,
            k,
            x2.stride(0),
            weight.stride(0),
            SPLIT_K=split,
            HAS_EXIT=has_exit,
            DOT_PRECISION=dot_precision(x.dtype),
            # a split's partial kernel has no epilogue: one compiled variant per shape, whatever the epilogue
            **(switches if split == 1 else _epilogue.NO_EPILOGUE),
        )
        if split > 1:
            _split.reduce_partials(ws, split, m, n, ptrs, *indices, has_exit=has_exit, switches=switches)

    _split.run(
        op, forced_split, _split_key(m, k, n, x), m, n, k_steps, launch, out, workspace, "linear_workspace_numel", TILE
    )
    return out


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    epilogue: Epilogue = PLAIN,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | str = "auto",
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`linear` (same arguments). Every step runs in x's dtype (parameters are
    cast to it). Reads the mask with ``.item()`` (a host sync; reference only). ``split_k`` and ``workspace`` are
    accepted and ignored (split-K only changes how the kernel sums K), so both implementations share one signature.
    """
    if epilogue.in_place:
        out = epilogue.residual
    if _epilogue.skipped_ref("linear_ref", epilogue, mask, out):
        return out
    y = _epilogue.apply_ref("linear_ref", epilogue, x @ weight.to(x.dtype).t(), mask)
    if out is not None:
        return out.copy_(y)
    return y
