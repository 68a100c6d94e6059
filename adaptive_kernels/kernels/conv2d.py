"""2-D convolution on NHWC tensors with a fused, skip-mask-aware epilogue.

Two convolution kernels: an implicit GEMM for groups=1 (M = N*HO*WO output pixels, N = Cout, K = KH*KW*Cin,
fp32 accumulation) and a direct kernel for depthwise convolutions (groups = Cin = Cout). Both end with
the same epilogue (:class:`~.epilogue.Epilogue`): ``y = act(acc * scale[row] + shift[row]) (+ residual) (then
ReLU)``, where the row of the folded-BatchNorm tables is chosen on the device by ``mask[select_index]`` (a stage's
bit for a skip-aware BN, the sub-network id for a calibrated model), and ``mask[exit_index] == 0`` makes the kernel
return before touching memory (early exit of a skipped sub-path). No host code reads the mask.

Weights are packed once (``pack_conv2d_weight``) to ``(KH*KW*Cin/groups, Cout)``, row
``(kh*KW + kw)*Cin/groups + c``: for each tap, the channels of one input pixel are contiguous in x (NHWC)
and the output channels are contiguous in the packed weight, so both GEMM operands load coalesced.

Split-K (groups=1 only; shared with ``linear``, see ``split_k.py``): a layer with few output tiles (ResNet-50 at
batch 1: layer4's 3x3 has M=49 output pixels, K=4608) would leave most SMs idle, so the K loop can be cut into
``split_k`` contiguous shares. Split s of a tile writes its fp32 partial sum to ``workspace[s, m, co]`` (no atomics),
then ``split_k.reduce_partials`` adds the partials and applies the same fused epilogue. Both kernels read the
early-exit bit first. ``split_k="auto"`` never splits under the interpreter; on a GPU it splits only shapes whose
count of ``GEMM_TILE`` tiles is well below the SM count (:func:`.split_k.choose_split_k`) and picks the split among
``split_k.SPLIT_K_CHOICES`` by timing each once per shape (or takes the heuristic with ``ADN_KERNEL_AUTOTUNE=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from . import epilogue as _epilogue
from . import split_k as _split
from ._common import dot_precision
from .backend import Epilogue
from .epilogue import PLAIN, fused_epilogue

_ACTIVATIONS = ("none", "relu", "relu6")

# Flattened-K gather (im2col order) instead of per-tap channel blocks: for the 3-channel stem or
# patch-embedding convs a channel block of >= 16 would be mostly padding.
_FLAT_K_MAX_CIN = 8


#: (BM, BN) of the GEMM's default config (the first of ``_gemm_configs``): what launches untuned, and the tile the
#: split-K heuristic counts output tiles with
GEMM_TILE = (128, 64)


def _gemm_configs() -> list[triton.Config]:
    # 128x256 and 256x128 with 8 warps are left out: with the full epilogue they spilled 704 and 432 B (spill stores
    # + loads, ptxas 12.9 from triton 3.8 for sm_90a)
    shapes = [  # BM, BN, BK, warps, stages: Hopper (228 KB shared memory per SM); the first is the default
        (*GEMM_TILE, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (32, 64, 64, 4, 4),
        (16, 64, 64, 4, 4),
        (32, 32, 64, 4, 4),
        (16, 32, 128, 4, 3),
        (16, 128, 64, 4, 4),
    ]
    tuned = [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes]
    return _common.choose_configs(triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1), tuned)


def _prune_gemm_configs(configs, nargs, **kwargs):
    return _common.prune_tiles(configs, BM=nargs["M"], BN=nargs["COUT"])


@triton.autotune(
    configs=_gemm_configs(),
    key=["M", "COUT", "CIN", "KH", "KW", "SH", "SW", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
    restore_value=["out_ptr"],  # tuning runs the kernel repeatedly; out may alias residual (in place)
    cache_results=True,
)
@triton.jit
def _conv2d_kernel(
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
    H,
    W,
    CIN,
    HO,
    WO,
    COUT,
    M,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FLAT_K: tl.constexpr,
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
    """out[m, co] = epilogue(sum_{kh, kw, c} x[n, ho*SH - PH + kh, wo*SW - PW + kw, c] * w[(kh*KW + kw)*CIN + c, co])
    with m = (n*HO + ho)*WO + wo; x: (N, H, W, CIN), out and res: (M, COUT), all row-major.
    SPLIT_K > 1: grid axis 1 is the split s, which sums K iterations [s*T // SPLIT_K, (s+1)*T // SPLIT_K) of the T
    iterations and stores the fp32 partial to ws[s, m, co] (ws: (SPLIT_K, M, COUT)); no epilogue here."""
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    # Grouped tile order: GROUP_M row tiles share their weight tiles while they are in L2.
    GROUP_M: tl.constexpr = 8
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(COUT, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < COUT
    img = rm // (HO * WO)
    pix = rm % (HO * WO)
    hi0 = (pix // WO) * SH - PH
    wi0 = (pix % WO) * SW - PW
    img_base = img.to(tl.int64) * H * W * CIN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FLAT_K:
        k_total = KH * KW * CIN
        k_iters = tl.cdiv(k_total, BK)
    else:
        c_blocks = tl.cdiv(CIN, BK)
        k_iters = KH * KW * c_blocks
    if SPLIT_K == 1:
        t_lo = 0
        t_hi = k_iters
    else:
        split = tl.program_id(1)
        t_lo = split * k_iters // SPLIT_K
        t_hi = (split + 1) * k_iters // SPLIT_K
    if FLAT_K:
        for k0 in range(t_lo * BK, t_hi * BK, BK):
            rk = k0 + tl.arange(0, BK)
            c = rk % CIN
            tap = rk // CIN
            hi = hi0[:, None] + (tap // KW)[None, :]
            wi = wi0[:, None] + (tap % KW)[None, :]
            a_ok = m_ok[:, None] & (rk < k_total)[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load(x_ptr + img_base[:, None] + (hi * W + wi) * CIN + c[None, :], mask=a_ok, other=0.0)
            b = tl.load(
                w_ptr + rk[:, None] * COUT + rn[None, :], mask=(rk < k_total)[:, None] & n_ok[None, :], other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        # One flat loop over (tap, channel block) so the compiler pipelines across taps too.
        for t in range(t_lo, t_hi):
            tap = t // c_blocks
            c0 = (t % c_blocks) * BK
            hi = hi0 + tap // KW
            wi = wi0 + tap % KW
            row_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            rk = c0 + tl.arange(0, BK)
            k_ok = rk < CIN
            a_rows = img_base + (hi * W + wi) * CIN
            a = tl.load(x_ptr + a_rows[:, None] + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(
                w_ptr + (tap * CIN + rk)[:, None] * COUT + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if SPLIT_K == 1:
        fused_epilogue(
            acc,
            rm,
            rn,
            M,
            COUT,
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
        tl.store(ws_ptr + ws_rows[:, None] * COUT + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def _depthwise_configs() -> list[triton.Config]:
    shapes = [(32, 64, 4), (16, 64, 2), (64, 64, 4), (16, 128, 4), (32, 128, 4), (64, 32, 4), (128, 32, 4), (8, 256, 4)]
    tuned = [triton.Config({"BM": m, "BC": c}, num_warps=w, num_stages=2) for m, c, w in shapes]
    return _common.choose_configs(triton.Config({"BM": 32, "BC": 32}, num_warps=4, num_stages=1), tuned)


def _prune_depthwise_configs(configs, nargs, **kwargs):
    return _common.prune_tiles(configs, BC=nargs["C"])


@triton.autotune(
    configs=_depthwise_configs(),
    key=["M", "C", "KH", "KW", "SH", "SW"],
    prune_configs_by={"early_config_prune": _prune_depthwise_configs},
    restore_value=["out_ptr"],
    cache_results=True,
)
@triton.jit
def _depthwise_conv2d_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    scale_ptr,
    shift_ptr,
    mask_ptr,
    select_index,
    exit_index,
    H,
    W,
    C,
    HO,
    WO,
    M,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SELECT_ROW: tl.constexpr,
    HAS_EXIT: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_RELU: tl.constexpr,
    BM: tl.constexpr,
    BC: tl.constexpr,
):
    """out[m, c] = epilogue(sum_{kh, kw} x[n, ho*SH - PH + kh, wo*SW - PW + kw, c] * w[kh*KW + kw, c]);
    x: (N, H, W, C), w: (KH*KW, C), out and res: (M, C), all row-major."""
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    m_ok = rm < M
    c_ok = rc < C
    img = rm // (HO * WO)
    pix = rm % (HO * WO)
    hi0 = (pix // WO) * SH - PH
    wi0 = (pix % WO) * SW - PW
    img_base = img.to(tl.int64) * H * W * C
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            hi = hi0 + kh
            wi = wi0 + kw
            row_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load(
                x_ptr + (img_base + (hi * W + wi) * C)[:, None] + rc[None, :],
                mask=row_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            wt = tl.load(w_ptr + (kh * KW + kw) * C + rc, mask=c_ok, other=0.0)
            acc += a.to(tl.float32) * wt.to(tl.float32)[None, :]
    fused_epilogue(
        acc,
        rm,
        rc,
        M,
        C,
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


def _pair(name: str, v: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, int) and p >= minimum for p in pair):
        raise ValueError(f"conv2d: {name}={v!r} must be an int or a pair of ints >= {minimum}")
    return pair


def pack_conv2d_weight(w: torch.Tensor) -> torch.Tensor:
    """Pack a conv weight ``w: (Cout, Cin/groups, KH, KW)`` (nn.Conv2d layout) for :func:`conv2d`.

    Returns a contiguous ``(KH*KW*Cin/groups, Cout)`` tensor with
    ``packed[(kh*KW + kw)*Cin/groups + c, co] = w[co, c, kh, kw]`` (for depthwise: ``(KH*KW, C)``).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"pack_conv2d_weight: w must be a 4-D (Cout, Cin/groups, KH, KW) tensor, got {shape}")
    cout, cin_g, kh, kw = w.shape
    return w.permute(2, 3, 1, 0).reshape(kh * kw * cin_g, cout).contiguous()


def _output_size(h: int, w: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int]) -> tuple[int, int]:
    return (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1


# ---- split-K: the conv's K steps and shape; the choice itself is shared with linear (split_k.py) --------------
def max_split_k(cin: int, kernel_size: int | tuple[int, int], groups: int = 1) -> int:
    """The largest ``split_k`` :func:`conv2d` accepts: the number of 64-wide K steps of its GEMM loop,
    ``KH*KW*ceil(Cin/64)`` (``ceil(KH*KW*Cin/64)`` for Cin <= 8, whose K is gathered flat); 1 for a depthwise
    conv (groups != 1), which has no K loop to split."""
    kh, kw = _pair("kernel_size", kernel_size, 1)
    if groups != 1:
        return 1
    if cin <= _FLAT_K_MAX_CIN:
        return _split.num_k_steps(kh * kw * cin)
    return kh * kw * _split.num_k_steps(cin)


def _check_split_k(op: str, split_k: int | str, k_steps: int, depthwise: bool) -> int | None:
    """A forced split (validated) or None for "auto"."""
    if depthwise and isinstance(split_k, int) and not isinstance(split_k, bool) and split_k != 1:
        raise ValueError(
            f"{op}: split_k={split_k} with a depthwise conv (groups = Cin): it has no K loop to split; use split_k=1 "
            f"or 'auto'"
        )
    return _split.check_split_k(op, split_k, k_steps, "max_split_k(Cin, kernel_size)")


def conv2d_workspace_numel(
    m: int,
    cout: int,
    cin: int,
    kernel_size: int | tuple[int, int],
    *,
    groups: int = 1,
    split_k: int | str = "auto",
    device: torch.device | str,
) -> int:
    """fp32 elements of split-K workspace that ``conv2d(..., split_k=split_k)`` may use for an output of
    ``m = N*HO*WO`` pixels by ``cout`` channels on ``device`` (0: it never splits). For "auto" this is the largest
    candidate split times ``m * cout``, whatever the measurement picks. A caller that must not allocate during
    the call (a CUDA-graph body) preallocates this much and passes it as ``workspace``."""
    k_steps = max_split_k(cin, kernel_size, groups)
    split = _check_split_k("conv2d_workspace_numel", split_k, k_steps, groups != 1)
    return _split.workspace_numel(split, m, cout, k_steps, device, GEMM_TILE)


def _split_key(x: torch.Tensor, cout: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int]) -> tuple:
    return ("conv2d", *x.shape, cout, *k, *s, *p, x.dtype, x.device)


def auto_split_k(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> int | None:
    """The split ``conv2d(x, w_packed, ..., split_k="auto")`` launches for these arguments (only their shapes, dtype
    and device matter), or None while the first call of this shape on the GPU still has to measure it.
    For benchmarks and logs; conv2d does not need it."""
    n, h, w, cin = x.shape
    k, s, p = _pair("kernel_size", kernel_size, 1), _pair("stride", stride, 1), _pair("padding", padding, 0)
    cout = cin if groups != 1 else w_packed.shape[-1]
    ho, wo = _output_size(h, w, k, s, p)
    key, k_steps = _split_key(x, cout, k, s, p), max_split_k(cin, k, groups)
    return _split.auto_split(key, n * ho * wo, cout, k_steps, x.device, GEMM_TILE)


def conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    epilogue: Epilogue = PLAIN,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | str = "auto",
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused NHWC convolution: ``y = act(conv(x, w) * scale[row] + shift[row]) (+ residual) (then ReLU)``.

    x: (N, H, W, Cin) contiguous, fp16/bf16/fp32; w_packed: from :func:`pack_conv2d_weight`, x's dtype.
    Returns y: (N, HO, WO, Cout), x's dtype (``out``, or the residual when ``epilogue.in_place``). groups: 1, or
    Cin = Cout (depthwise). epilogue: :class:`~.epilogue.Epilogue` (scale/shift tables of (R, Cout) or (Cout,),
    ``row = mask[epilogue.select_index]`` chosen on the device; activation "none", "relu" or "relu6"; residual
    (N, HO, WO, Cout), updated in place with ``in_place``; early exit on ``mask[epilogue.exit_index] == 0``, when
    the kernel returns at once and ``out`` keeps its content, so ``out`` (or in_place) is then required).
    mask: int32 (one entry per mask slot the epilogue reads). The first call for a new shape autotunes (on a GPU):
    do it before graph capture.

    split_k: an int in ``[1, max_split_k(Cin, kernel_size)]`` splits the K loop into that many shares (partial sums
    in ``workspace``, then a reduce kernel with the epilogue); depthwise convs take only 1. "auto": 1 under
    the interpreter; on a GPU, for shapes with few output tiles (:func:`.split_k.choose_split_k`), the fastest of the
    candidate splits, timed at the first call of the shape and cached (the heuristic's split with
    ADN_KERNEL_AUTOTUNE=0, or inside a CUDA graph capture, where nothing may be timed: the engine's warm-up
    calls every shape before capturing). workspace: fp32, contiguous, on x's device, >= split * N*HO*WO * Cout
    elements (:func:`conv2d_workspace_numel`); only used when the conv splits, its content is not read before
    being written. Without it a split call allocates one: a CUDA-graph body must pass a preallocated one.
    """
    op = "conv2d"
    _common.check_float(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D NHWC (N, H, W, Cin), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"{op}: x must be a contiguous NHWC tensor (N, H, W, Cin): for an NCHW tensor pass "
            f"x.permute(0, 2, 3, 1).contiguous() (free for a channels_last tensor)"
        )
    n, h, w, cin = x.shape
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    depthwise = groups != 1
    _common.check_float(op, "w_packed", w_packed, (x.dtype,))
    if depthwise:
        if groups != cin:
            raise ValueError(f"{op}: groups={groups} is not supported: use groups=1 or groups=Cin={cin} (depthwise)")
        cout = cin
        expect, expect_str = (kh * kw, cin), f"({kh * kw}, {cin})"
    else:
        cout = w_packed.shape[-1] if w_packed.dim() == 2 else -1
        expect, expect_str = (kh * kw * cin, cout), f"({kh * kw * cin}, Cout)"
    if w_packed.dim() != 2 or tuple(w_packed.shape) != expect or not w_packed.is_contiguous():
        raise ValueError(
            f"{op}: w_packed must be a contiguous {expect_str} tensor from pack_conv2d_weight(w) for "
            f"kernel_size=({kh}, {kw}), Cin={cin}, groups={groups}; got shape {tuple(w_packed.shape)}"
        )
    ho, wo = _output_size(h, w, (kh, kw), (sh, sw), (ph, pw))
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: input {h}x{w} is smaller than kernel ({kh}, {kw}) with padding ({ph}, {pw})")
    out_shape = (n, ho, wo, cout)
    act, out = _epilogue.check(
        op, epilogue, channels=cout, out_shape=out_shape, dtype=x.dtype, mask=mask, out=out, activations=_ACTIVATIONS
    )
    k_steps = max_split_k(cin, (kh, kw), groups)
    forced_split = _check_split_k(op, split_k, k_steps, depthwise)
    residual = epilogue.residual
    _split.check_workspace(op, workspace, x=x, out=out, residual=residual)
    _common.check_device(
        op,
        "conv2d_ref",
        x=x,
        w_packed=w_packed,
        scale=epilogue.scale,
        shift=epilogue.shift,
        mask=mask,
        residual=residual,
        out=out,
        workspace=workspace,
    )
    if out is not None:
        if _common.overlaps(out, x):
            raise ValueError(
                f"{op}: out overlaps x: a convolution reads neighbouring pixels, so it cannot run in "
                f"place on its input; use another output buffer"
            )
    else:
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    m = n * ho * wo
    if m == 0 or cout == 0:
        return out
    geometry = {"KH": kh, "KW": kw, "SH": sh, "SW": sw, "PH": ph, "PW": pw}
    switches = _epilogue.kernel_switches(epilogue, act)
    indices = _epilogue.kernel_indices(epilogue)

    if depthwise:

        def grid(meta):
            return triton.cdiv(m, meta["BM"]), triton.cdiv(cout, meta["BC"])

        _depthwise_conv2d_kernel[grid](
            x,
            w_packed,
            *_epilogue.kernel_tensors(epilogue, out, mask),
            *indices,
            h,
            w,
            cin,
            ho,
            wo,
            m,
            HAS_EXIT=epilogue.exit_index >= 0,
            **geometry,
            **switches,
        )
        return out

    def launch(split: int, out_t: torch.Tensor, ws: torch.Tensor | None, use_exit: bool) -> None:
        has_exit = use_exit and epilogue.exit_index >= 0
        ptrs = _epilogue.kernel_tensors(epilogue, out_t, mask)

        def grid(meta):
            return triton.cdiv(m, meta["BM"]) * triton.cdiv(cout, meta["BN"]), split

        _conv2d_kernel[grid](
            x,
            w_packed,
            *ptrs,
            ws if split > 1 else out_t,
            *indices,
            h,
            w,
            cin,
            ho,
            wo,
            cout,
            m,
            FLAT_K=cin <= _FLAT_K_MAX_CIN,
            SPLIT_K=split,
            HAS_EXIT=has_exit,
            DOT_PRECISION=dot_precision(x.dtype),
            **geometry,
            # a split's partial kernel has no epilogue: one compiled variant per geometry, whatever the epilogue
            **(switches if split == 1 else _epilogue.NO_EPILOGUE),
        )
        if split > 1:
            _split.reduce_partials(ws, split, m, cout, ptrs, *indices, has_exit=has_exit, switches=switches)

    key = _split_key(x, cout, (kh, kw), (sh, sw), (ph, pw))
    _split.run(op, forced_split, key, m, cout, k_steps, launch, out, workspace, "conv2d_workspace_numel", GEMM_TILE)
    return out


def conv2d_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    epilogue: Epilogue = PLAIN,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | str = "auto",
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`conv2d` (same keywords) with the UNPACKED weight ``w: (Cout, Cin/g, KH, KW)``.

    x: (N, H, W, Cin) NHWC; returns (N, HO, WO, Cout) NHWC. Every step runs in x's dtype (parameters are cast
    to it), so float64 inputs give the exact answer and fp16 inputs show torch's own fp16 rounding. Reads
    the mask with ``.item()`` (a host sync; reference only). ``split_k`` and ``workspace`` are accepted and
    ignored (split-K only changes how the kernel sums K), so both implementations share one signature.
    """
    op = "conv2d_ref"
    if kernel_size is not None and _pair("kernel_size", kernel_size, 1) != tuple(w.shape[2:]):
        raise ValueError(f"{op}: kernel_size={kernel_size} does not match w's shape {tuple(w.shape)}")
    if epilogue.in_place:
        out = epilogue.residual
    if _epilogue.skipped_ref(op, epilogue, mask, out):
        return out
    y = F.conv2d(x.permute(0, 3, 1, 2), w.to(x.dtype), stride=stride, padding=padding, groups=groups)
    y = _epilogue.apply_ref(op, epilogue, y.permute(0, 2, 3, 1), mask)
    if out is not None:
        return out.copy_(y)
    return y.contiguous()
