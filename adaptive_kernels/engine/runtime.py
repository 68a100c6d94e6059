"""Running a lowered :class:`~.program.Program`: kernel sets, static buffers, execution.

* :class:`KernelSet` — the Triton launchers (``triton_kernels()``) or their pure-torch references
  (``reference_kernels()``); a program's op parameters are prepared for one of them at lowering time.
* :func:`allocate_buffers` — one static tensor per value, reusing the memory of values that are dead
  (greedy, by execution order), so a batch-64 ResNet-50 needs a handful of activation buffers.
* :func:`execute` — runs the items in order. Skippable bodies run by one of three mechanisms:
  ``"host"`` (the caller's skip tuple decides on the host; eager checks and warm-up), ``"early_exit"``
  (every body kernel reads its stage's mask bit and returns when 0) or ``"conditional"`` (inside a CUDA
  graph capture: each body becomes the body of a CUDA IF node, see ``graph.py``).

Kernel modules are imported lazily: importing the engine must work where Triton cannot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .program import Body, Op, Program, RunContext, Value

if TYPE_CHECKING:
    from .graph import IfNodeSplicer

MECHANISMS = ("host", "early_exit", "conditional")


def _no_split(*args, **kwargs) -> int:
    return 1


def _no_workspace(*args, **kwargs) -> int:
    return 0


@dataclass(frozen=True)
class KernelSet:
    """The five op families, as launchers with one signature for both implementations.

    ``prepare_conv_weight`` turns an nn.Conv2d weight (Cout, Cin/g, KH, KW) into what ``conv2d`` takes.
    Split-K (the ``split_k``/``workspace`` arguments of ``conv2d`` and ``linear``; the references take and ignore
    them): ``conv2d_max_split_k(cin, kernel_size, groups)`` and ``linear_max_split_k(k)`` are the largest splits the
    launchers accept, ``conv2d_workspace_numel(m, cout, cin, kernel_size, *, groups, split_k, device)`` and
    ``linear_workspace_numel(m, n, k, *, split_k, device)`` the fp32 scratch they may use; the defaults (1 and 0)
    describe an implementation that never splits.
    """

    name: str
    conv2d: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    gather_rows: Callable[..., torch.Tensor]
    prepare_conv_weight: Callable[[torch.Tensor], torch.Tensor]
    conv2d_max_split_k: Callable[[int, tuple[int, int], int], int] = _no_split
    conv2d_workspace_numel: Callable[..., int] = _no_workspace
    linear_max_split_k: Callable[[int], int] = _no_split
    linear_workspace_numel: Callable[..., int] = _no_workspace


@functools.cache
def triton_kernels() -> KernelSet:
    """The fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from .. import kernels as k
    from ..kernels.conv2d import conv2d_workspace_numel, max_split_k
    from ..kernels.linear import linear_max_split_k, linear_workspace_numel

    return KernelSet(
        "triton",
        k.conv2d,
        k.linear,
        k.layer_norm,
        k.attention,
        k.gather_rows,
        k.pack_conv2d_weight,
        conv2d_max_split_k=max_split_k,
        conv2d_workspace_numel=conv2d_workspace_numel,
        linear_max_split_k=linear_max_split_k,
        linear_workspace_numel=linear_workspace_numel,
    )


def _unpacked(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous()


@functools.cache
def reference_kernels() -> KernelSet:
    """The kernels' pure-torch references (any device; read the mask with ``.item()``)."""
    from .. import kernels as k

    return KernelSet(
        "reference", k.conv2d_ref, k.linear_ref, k.layer_norm_ref, k.attention_ref, k.gather_rows_ref, _unpacked
    )


def _not_runnable(*args, **kwargs) -> torch.Tensor:
    raise RuntimeError("this program was lowered only to check that the model lowers; it cannot run")


#: Lowers a model on the meta device without importing any kernel (the engine's CPU fallback checks
#: that a model would lower, where Triton may not even be installed).
STRUCTURE_ONLY = KernelSet(
    "structure-only", _not_runnable, _not_runnable, _not_runnable, _not_runnable, _not_runnable, _unpacked
)


def allocate_buffers(
    program: Program, batch: int, device: torch.device | str, input_dtype: torch.dtype
) -> dict[Value, torch.Tensor]:
    """A tensor for every value of ``program``, shape ``(batch, *value.shape)``.

    Values whose lifetimes (first write .. last use, in execution order, bodies inline) do not overlap
    share memory when their element count and dtype match. Whether a body runs or not does not change
    this: values defined in a body die in it, and values crossing it are live throughout.
    The input and output values are never shared. Buffers start zeroed.

    ``program.workspace`` (the split-K scratch shared by the convs and linears) gets a flat fp32 tensor as large as
    the largest need of any of them at this batch size on this device (``Op.workspace_numel``; 0 elements when
    none splits), so no kernel allocates one, inside a graph body or anywhere else.
    """
    order = list(program.flat_ops())
    last_use: dict[Value, int] = {}
    for i, (op, _) in enumerate(order):
        for v in (*op.reads(), op.writes()):
            last_use[v] = i
    pinned = {program.input, program.output}

    def dtype_of(v: Value) -> torch.dtype:
        return v.dtype or program.dtype

    def numel(v: Value) -> int:
        n = batch
        for s in v.shape:
            n *= s
        return n

    tensors: dict[Value, torch.Tensor] = {}
    free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    tensors[program.input] = torch.zeros((batch, *program.input.shape), device=device, dtype=input_dtype)
    dying: dict[int, list[Value]] = {}
    for v, i in last_use.items():
        dying.setdefault(i, []).append(v)
    for i, (op, _) in enumerate(order):
        v = op.writes()
        if v not in tensors:
            key = (numel(v), dtype_of(v))
            pool = free.get(key)
            storage = pool.pop() if pool and v not in pinned else torch.zeros(key[0], device=device, dtype=key[1])
            tensors[v] = storage.view(batch, *v.shape)
        for dead in dying.get(i, ()):
            if dead not in pinned:
                free.setdefault((numel(dead), dtype_of(dead)), []).append(tensors[dead].view(-1))
    if program.workspace is not None:
        tensors[program.workspace] = torch.zeros(
            _workspace_numel(program, batch, torch.device(device)), device=device, dtype=torch.float32
        )
    return tensors


def _workspace_numel(program: Program, batch: int, device: torch.device) -> int:
    """The largest split-K scratch any op of ``program`` may use at this batch size (their M depends on it)."""
    return max((op.workspace_numel(program.kernels, batch, device) for op, _ in program.flat_ops()), default=0)


def execute(
    program: Program,
    tensors: dict[Value, torch.Tensor],
    mask: torch.Tensor,
    *,
    mechanism: str,
    skip: Sequence[bool] | None = None,
    splicer: IfNodeSplicer | None = None,
) -> torch.Tensor:
    """Run ``program`` on its buffers; returns the output buffer.

    mask: int32 (program.mask_entries,), on the buffers' device (``program.mask_values(skip)``): 1 = run the stage's
    skippable sub-path, then a calibrated program's sub-network id; read by the kernels for skip-aware and
    calibrated norms (and early exit). mechanism: see the module docstring; "host" needs
    ``skip`` (tuple of bools, True = skip, consistent with ``mask``), "conditional" needs ``splicer``
    and must run inside a CUDA graph capture.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}: use one of {', '.join(map(repr, MECHANISMS))}")
    if mask.dim() != 1 or mask.shape[0] != program.mask_entries or mask.dtype != torch.int32:
        what = f"{program.num_stages} stage bits" + (
            " and the sub-network id (calibrated model)" if program.subnet_id_slot is not None else ""
        )
        raise ValueError(
            f"the mask must be int32 ({program.mask_entries},): {what}, got {mask.dtype} {tuple(mask.shape)}; build "
            f"it with program.mask_values(skip)"
        )
    if mechanism == "host" and (skip is None or len(skip) != program.num_stages):
        raise ValueError(f"mechanism='host' needs skip with {program.num_stages} bools, got {skip!r}")
    if mechanism == "conditional":
        if splicer is None:
            raise ValueError("mechanism='conditional' needs an IfNodeSplicer (and a CUDA graph capture)")
        splicer.create_conditions(mask, [body.stage for body in program.bodies()])
    ctx = RunContext(tensors, program.kernels, mask)
    body_ctx = RunContext(tensors, program.kernels, mask)
    n_body = 0
    for item in program.items:
        if not isinstance(item, Body):
            item.run(ctx)
            continue
        if mechanism == "host":
            if not skip[item.stage]:
                _run_ops(item.ops, body_ctx, -1)
        elif mechanism == "early_exit":
            _run_ops(item.ops, body_ctx, item.stage)
        else:
            with splicer.body(n_body):
                _run_ops(item.ops, body_ctx, -1)
        n_body += 1
    return tensors[program.output]


def _run_ops(ops: list[Op], ctx: RunContext, exit_index: int) -> None:
    ctx.exit_index = exit_index
    for op in ops:
        op.run(ctx)
