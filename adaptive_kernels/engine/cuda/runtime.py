"""Running a lowered :class:`~.program.Program` with the kernel set it was prepared for: static buffers, execution.

* :func:`allocate_buffers` — one static tensor per value, reusing the memory of values that are dead
  (greedy, by execution order), so a batch-64 ResNet-50 needs a handful of activation buffers.
* :func:`execute` — runs the items in order. Skippable bodies run in one of three modes (``bodies=``):
  ``"host"`` (the caller's skip tuple decides on the host; eager checks and warm-up), ``"early_exit"``
  (every body kernel reads its stage's mask bit and returns when 0) or ``"conditional"`` (inside a CUDA
  graph capture: each body becomes the body of a CUDA IF node, see ``capture.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from .program import Body, Op, Program, RunContext, Value

BODY_MODES = ("host", "early_exit", "conditional")


class BodySplicer(Protocol):
    """Captures each body of a program into a CUDA IF node (``capture.IfNodeSplicer``)."""

    def create_conditions(self, mask: torch.Tensor, stages: Sequence[int]) -> None: ...

    def body(self, index: int) -> AbstractContextManager[None]: ...


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
    bodies: str,
    skip: Sequence[bool] | None = None,
    splicer: BodySplicer | None = None,
) -> torch.Tensor:
    """Run ``program`` on its buffers; returns the output buffer.

    mask: int32 (program.mask_entries,), on the buffers' device (``program.mask_values(skip)``): 1 = run the stage's
    skippable sub-path, then a calibrated program's sub-network id; read by the kernels for skip-aware and
    calibrated norms (and early exit). bodies: how skippable bodies run (module docstring); "host" needs
    ``skip`` (tuple of bools, True = skip, consistent with ``mask``), "conditional" needs ``splicer``
    and must run inside a CUDA graph capture.
    """
    if bodies not in BODY_MODES:
        raise ValueError(f"bodies={bodies!r}: use one of {', '.join(map(repr, BODY_MODES))}")
    if mask.dim() != 1 or mask.shape[0] != program.mask_entries or mask.dtype != torch.int32:
        what = f"{program.num_stages} stage bits" + (
            " and the sub-network id (calibrated model)" if program.subnet_id_slot is not None else ""
        )
        raise ValueError(
            f"the mask must be int32 ({program.mask_entries},): {what}, got {mask.dtype} {tuple(mask.shape)}; build "
            f"it with program.mask_values(skip)"
        )
    if bodies == "host" and (skip is None or len(skip) != program.num_stages):
        raise ValueError(f"bodies='host' needs skip with {program.num_stages} bools, got {skip!r}")
    if bodies == "conditional":
        if splicer is None:
            raise ValueError("bodies='conditional' needs an IfNodeSplicer (and a CUDA graph capture)")
        splicer.create_conditions(mask, [body.stage for body in program.bodies()])
    ctx = RunContext(tensors, program.kernels, mask)
    body_ctx = RunContext(tensors, program.kernels, mask)
    n_body = 0
    for item in program.items:
        if not isinstance(item, Body):
            item.run(ctx)
            continue
        if bodies == "host":
            if not skip[item.stage]:
                _run_ops(item.ops, body_ctx, -1)
        elif bodies == "early_exit":
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
