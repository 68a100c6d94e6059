"""Split-K for the GEMM kernels (``conv2d``'s implicit GEMM and ``linear``): the reduction op and the shared choice.

A GEMM with few output tiles (ResNet-50 at batch 1: layer4's 3x3 conv has M=49 output pixels and K=4608; ViT-B/16
at batch 1: fc2 has M=197 tokens, N=768 and K=3072, a few dozen 128x64 tiles on a 132-SM H100) leaves most SMs
idle, so its K loop can be cut into ``split`` contiguous shares. The GEMM kernel of split s stores its fp32
partial sum of tile (m, n) to ``workspace[s, m, n]`` (no atomics: every element has one writer, so the result does
not depend on the order of the programs), then :func:`reduce_partials` launches ``_split_k_reduce_kernel``, which
adds the ``split`` partials in fp32 and applies the same fused epilogue as the unsplit kernel
(``epilogue.fused_epilogue``: the mask-selected scale/shift table row = folded BN, or linear's bias as the shift;
activation; residual, in place allowed). Both kernels read the early-exit bit first.

The choice (``split_k="auto"``), shared by both ops (:func:`run`): never split under the interpreter or off the GPU;
on a GPU split only where :func:`choose_split_k` finds few output tiles, and then take the fastest of the
candidate splits, timed once per shape with ``triton.testing.do_bench`` and cached in :data:`MEASURED_SPLITS`
(the heuristic's split with ``ADN_KERNEL_AUTOTUNE=0``, or inside a CUDA graph capture, where nothing may be timed).
K is counted in steps of :data:`SPLIT_K_STEP` (the BK of the default GPU configs), both to validate a forced split
(``1 <= split <= K steps``) and for the heuristic; a kernel config with another BK splits its own K iterations
evenly, and a split left with none stores zeros, so any split in that range is correct.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import _common
from .epilogue import fused_epilogue

SPLIT_K_CHOICES = (1, 2, 4, 8, 16)  # the splits "auto" may choose
SPLIT_K_STEP = 64
_MIN_STEPS_PER_SPLIT = 4
#: (op, shape..., dtype, device) -> the split chosen by timing (GPU only; filled by :func:`run`)
MEASURED_SPLITS: dict[tuple, int] = {}
#: ``launch(split, out, workspace, use_exit)``: one whole GEMM call (the GEMM kernel, then for split > 1 the reduction)
Launch = Callable[[int, torch.Tensor, torch.Tensor | None, bool], None]


def _reduce_configs() -> list[triton.Config]:
    shapes = [(16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 128, 4), (64, 64, 4), (8, 64, 2)]  # BM, BN, warps
    tuned = [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=1) for m, n, w in shapes]
    return _common.choose_configs(triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1), tuned)


def _prune_reduce_configs(configs, nargs, **kwargs):
    return _common.prune_tiles(configs, BM=nargs["M"], BN=nargs["N"])


@triton.autotune(
    configs=_reduce_configs(),
    key=["M", "N", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_reduce_configs},
    restore_value=["out_ptr"],  # out may alias residual (in place)
    cache_results=True,
)
@triton.jit
def _split_k_reduce_kernel(
    ws_ptr,
    out_ptr,
    res_ptr,
    scale_ptr,
    shift_ptr,
    mask_ptr,
    select_index,
    exit_index,
    M,
    N,
    SPLIT_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SELECT_ROW: tl.constexpr,
    HAS_EXIT: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_RELU: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """out[m, n] = epilogue(sum_s ws[s, m, n]) in fp32; ws: (SPLIT_K, M, N), out and res: (M, N), row-major."""
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    rows = rm.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in tl.static_range(SPLIT_K):  # unrolled: the SPLIT_K loads are independent
        acc += tl.load(ws_ptr + rows[:, None] * N + rn[None, :], mask=ok, other=0.0)
        rows += M
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


def reduce_partials(
    workspace: torch.Tensor,
    split: int,
    m: int,
    n: int,
    pointers: tuple[torch.Tensor, ...],
    select_index: int,
    exit_index: int,
    *,
    has_exit: bool,
    switches: dict[str, bool | int],
) -> None:
    """Launch the reduction: ``out = epilogue(sum of the split partials in workspace)``.

    workspace: fp32, holding ``(split, m, n)`` partial sums; ``pointers``: (out, residual, scale, shift, mask) from
    ``epilogue.kernel_tensors``, ``select_index``/``exit_index`` from ``epilogue.kernel_indices`` and ``switches``
    (the ``fused_epilogue`` constexprs) from ``epilogue.kernel_switches``; out and residual: (m, n) row-major.
    ``has_exit``: return at once when ``mask[exit_index] == 0``."""

    def grid(meta):
        return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])

    _split_k_reduce_kernel[grid](
        workspace, *pointers, select_index, exit_index, m, n, SPLIT_K=split, HAS_EXIT=has_exit, **switches
    )


# ---- the choice: validation, heuristic, measurement --------------------------------------------------------------
def num_k_steps(k: int) -> int:
    """The number of :data:`SPLIT_K_STEP`-wide steps of a K loop of length ``k`` (at least 1)."""
    return max(1, triton.cdiv(k, SPLIT_K_STEP))


def choose_split_k(m: int, n: int, k_steps: int, num_sms: int, *, tile: tuple[int, int]) -> int:
    """The split-K heuristic: the largest split in ``SPLIT_K_CHOICES`` with ``tiles * split <= 2 * num_sms``
    (tiles: the ``tile = (BM, BN)`` tiles of the (m, n) output, the tile of the op's default config, which is what
    launches untuned) that leaves every split >= 4 of the ``k_steps`` K steps; 1 when the output alone fills the GPU
    or K is short. Pure function of its arguments. E.g. on 132 SMs: ResNet-50 layer4 3x3 at batch 1 (m=49, n=512,
    k_steps=72, 128x64 tiles): 8 tiles -> 16; ViT-B/16 fc2 at batch 1 (m=197, n=768, k_steps=48, 64x128 tiles):
    24 tiles -> 8."""
    tiles = triton.cdiv(m, tile[0]) * triton.cdiv(n, tile[1])
    best = 1
    for split in SPLIT_K_CHOICES:
        if tiles * split <= 2 * num_sms and k_steps >= _MIN_STEPS_PER_SPLIT * split:
            best = split
    return best


@functools.cache
def _num_sms_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device, queried at the first split-K decision on it (never at import)."""
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


def auto_candidates(m: int, n: int, k_steps: int, device: torch.device, tile: tuple[int, int]) -> tuple[int, ...]:
    """The splits ``split_k="auto"`` picks from, ascending; ``(1,)`` where it never splits: under the interpreter
    (no GPU timer, and the tests keep the plain kernel), off the GPU, and where :func:`choose_split_k` finds
    enough output tiles. Otherwise every choice up to ``k_steps``: the measurement, not the heuristic, decides."""
    if _common.INTERPRET or device.type != "cuda":
        return (1,)
    if choose_split_k(m, n, k_steps, num_sms(device), tile=tile) == 1:
        return (1,)
    return tuple(s for s in SPLIT_K_CHOICES if s <= k_steps)


def check_split_k(op: str, split_k: int | str, k_steps: int, limit: str) -> int | None:
    """A forced split (validated against the ``k_steps`` of the op's K loop; ``limit`` names the function that
    gives it, for the error message) or None for "auto"."""
    if isinstance(split_k, str):
        if split_k != "auto":
            raise ValueError(f"{op}: split_k={split_k!r} is not supported: use 'auto' or an int >= 1")
        return None
    if isinstance(split_k, bool) or not isinstance(split_k, int):
        raise TypeError(f"{op}: split_k must be an int >= 1 or 'auto', got {type(split_k).__name__} {split_k!r}")
    if not 1 <= split_k <= k_steps:
        raise ValueError(
            f"{op}: split_k={split_k} is out of range: the K loop has {k_steps} step(s) of {SPLIT_K_STEP} "
            f"({limit}), so use 1 <= split_k <= {k_steps}, or 'auto'"
        )
    return split_k


def workspace_numel(
    split: int | None, m: int, n: int, k_steps: int, device: torch.device | str, tile: tuple[int, int]
) -> int:
    """fp32 workspace elements for a forced ``split`` (validated by :func:`check_split_k`) or "auto" (None: the
    largest candidate split, whatever the measurement picks) of an (m, n) output; 0 when it does not split.
    ``tile``: the op's default (BM, BN), for the heuristic."""
    if split is None:
        split = max(auto_candidates(m, n, k_steps, torch.device(device), tile))
    return split * m * n if split > 1 else 0


def check_workspace(op: str, workspace: torch.Tensor | None, **others: torch.Tensor | None) -> None:
    """A given workspace is fp32, contiguous and shares no memory with the op's other tensors (``others``)."""
    if workspace is None:
        return
    _common.check_float(op, "workspace", workspace, (torch.float32,))
    if not workspace.is_contiguous():
        raise ValueError(f"{op}: workspace must be contiguous: pass workspace.contiguous() or a fresh tensor")
    for name, t in others.items():
        if t is not None and _common.overlaps(workspace, t):
            raise ValueError(f"{op}: workspace overlaps {name}: pass a separate fp32 scratch tensor")


def check_workspace_size(op: str, workspace: torch.Tensor, split: int, m: int, n: int, why: str, sizes: str) -> None:
    """``workspace`` holds ``split`` partial sums of the (m, n) output; ``sizes`` names the op's size function."""
    need = split * m * n
    if workspace.numel() < need:
        raise ValueError(
            f"{op}: workspace has {workspace.numel()} elements but {why} needs {need} (split * M * N = "
            f"{split} * {m} * {n}): pass torch.empty({need}, dtype=torch.float32, device=x.device) (sizes: {sizes})"
        )


def cached_split_k(
    key: tuple, candidates: tuple[int, ...], m: int, n: int, k_steps: int, device, tile: tuple[int, int]
) -> int | None:
    """The split "auto" uses without measuring: 1 with a single candidate, the measured choice once made, the
    heuristic when autotuning is off (ADN_KERNEL_AUTOTUNE=0); None when a measurement is due."""
    if len(candidates) == 1:
        return 1
    if key in MEASURED_SPLITS:
        return MEASURED_SPLITS[key]
    if not _common.AUTOTUNE:
        return choose_split_k(m, n, k_steps, num_sms(device), tile=tile)
    return None


def capturing(device: torch.device) -> bool:
    """Whether the current stream is capturing a CUDA graph (nothing may be timed or allocated then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def measure(candidates: tuple[int, ...], launch: Launch, out: torch.Tensor, workspace: torch.Tensor) -> int:
    """Time one full call per candidate split with triton.testing.do_bench; the fastest wins (the smaller split on a
    tie). Launches write a scratch output with early exit off: the choice is for the compute path, and an
    in-place residual must not be updated again and again."""
    import triton.testing

    scratch = torch.empty_like(out)
    times = [
        triton.testing.do_bench(
            functools.partial(launch, split, scratch, workspace, False), warmup=5, rep=20, return_mode="median"
        )
        for split in candidates
    ]
    return candidates[times.index(min(times))]


def auto_split(key: tuple, m: int, n: int, k_steps: int, device: torch.device, tile: tuple[int, int]) -> int | None:
    """The split ``split_k="auto"`` launches for the op call identified by ``key``, or None while its first call on
    the GPU still has to measure it (the ops' ``auto_split_k`` helpers, for benchmarks and logs)."""
    return cached_split_k(key, auto_candidates(m, n, k_steps, device, tile), m, n, k_steps, device, tile)


def run(
    op: str,
    forced: int | None,
    key: tuple,
    m: int,
    n: int,
    k_steps: int,
    launch: Launch,
    out: torch.Tensor,
    workspace: torch.Tensor | None,
    sizes: str,
    tile: tuple[int, int],
) -> None:
    """Choose the split of one GEMM call and launch it: ``launch(split, out, workspace, True)``.

    forced: a split validated by :func:`check_split_k`, or None for "auto" (see the module docstring; ``key``
    identifies the shape in the cache of measured choices). launch(split, out, workspace, use_exit) runs the whole
    op: the GEMM kernel, then for split > 1 :func:`reduce_partials`. The output is (m, n); ``workspace`` (already
    checked by :func:`check_workspace`) must hold every split that may launch. Without one a split call allocates
    its own, so a CUDA-graph body must pass a preallocated one. Inside a capture nothing is timed: "auto" without a
    measured choice takes the heuristic's split (a caller that captures runs every shape once before). ``tile``: the
    op's default (BM, BN), which the heuristic counts output tiles with."""
    split = forced
    if split is None:
        candidates = auto_candidates(m, n, k_steps, out.device, tile)
        if workspace is not None and len(candidates) > 1:
            check_workspace_size(op, workspace, candidates[-1], m, n, f"split_k='auto' (up to {candidates[-1]})", sizes)
        split = cached_split_k(key, candidates, m, n, k_steps, out.device, tile)
        if split is None and capturing(out.device):
            split = choose_split_k(m, n, k_steps, num_sms(out.device), tile=tile)  # no timing inside a capture
        elif split is None:
            if workspace is None:
                workspace = torch.empty(candidates[-1] * m * n, device=out.device, dtype=torch.float32)
            split = MEASURED_SPLITS[key] = measure(candidates, launch, out, workspace)
    if split > 1:
        if workspace is None:
            workspace = torch.empty(split * m * n, device=out.device, dtype=torch.float32)
        else:
            check_workspace_size(op, workspace, split, m, n, f"split_k={split}", sizes)
    launch(split, out, workspace, True)
