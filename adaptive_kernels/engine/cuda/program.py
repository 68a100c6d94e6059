"""The lowered program: a flat list of fused ops over static buffers, with skippable bodies.

Lowering (``lowering/``) turns an ADN model into a :class:`Program` of the ops in ``ops.py``; the runtime
(``runtime.py``) allocates one static buffer per :class:`Value` and executes the ops, eagerly or inside a CUDA-graph
capture (``capture.py``). Every op is written once and runs with any kernel set (``kernels.backend``: the Triton
launchers or their pure-torch ``*_ref`` references) because ops call ``ctx.kernels.conv2d(...)`` etc.

Invariants the runtime relies on (checked by :func:`validate`):

* a :class:`Body` holds the ops of one skippable sub-path; whether or not it runs, every value read
  after it has the same address, because a body only updates values defined before it IN PLACE (the
  residual stream) — values it defines itself are scratch, dead when the body ends;
* no op inside a body allocates memory (a CUDA-graph IF body is captured on a second stream, outside
  torch's graph memory pool, so a temporary there would be handed back to the caching allocator while
  the graph still writes it);
* an op inside a body that cannot exit early on its mask bit writes only body-local scratch, so under
  the early-exit mechanism a skipped body leaves every live value untouched.

``Program.workspace`` is one fp32 scratch buffer that every conv and linear may use for split-K partial sums (so
no kernel allocates one). Sharing it is safe because ops run one after another in stream order: eagerly on one
stream, and in the captured graph too, where a conditional body is the body graph of an IF node that depends on
the nodes captured before it and precedes those captured after it. No value flows through it from one op to the
next (each split-K op writes its partials before reading them back), so it is outside the liveness rules; its
size is the largest :meth:`Op.workspace_numel` of the program's ops.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...kernels.backend import KernelSet
from ...models.skip import skip_to_mask, subnet_index


@dataclass(eq=False)
class Value:
    """A static buffer of the program: ``(batch, *shape)``.

    ``dtype`` None means the engine's compute dtype; only the program input has its own (the caller's).
    Compared by identity: two values are the same buffer only if they are the same object.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        return f"Value({self.name}, (N, {', '.join(map(str, self.shape))}))"


@dataclass
class RunContext:
    """What an op needs to run: the buffers, the kernel set, the device skip mask (int32, 1 = run the
    stage's skippable sub-path; then the sub-network id for a calibrated program, see :class:`Program`) and the
    exit index the op passes to its kernel (-1: never exit)."""

    tensors: Mapping[Value, torch.Tensor]
    kernels: KernelSet
    mask: torch.Tensor
    exit_index: int = -1


class Op:
    """One step of a program: reads the Value ``x``, writes the Value ``out``. Subclasses are dataclasses with
    those two fields first, then their parameters; an op that reads more (a residual) extends :meth:`reads`."""

    x: Value
    out: Value
    #: the op's kernel reads the mask and returns early when its sub-path is skipped
    can_exit: bool = False
    #: running the op may allocate a temporary (allowed only outside bodies)
    allocates: bool = False

    def reads(self) -> tuple[Value, ...]:
        return (self.x,)

    def writes(self) -> Value:
        return self.out

    def run(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def workspace_numel(self, kernels: KernelSet, batch: int, device: torch.device) -> int:
        """fp32 elements of the program's split-K workspace this op may use at ``batch`` on ``device`` (0: none)."""
        return 0


@dataclass(eq=False)
class Body:
    """The ops of one skippable sub-path; ``stage`` indexes the skip mask."""

    stage: int
    ops: list[Op] = field(default_factory=list)


@dataclass(eq=False)
class Program:
    """A lowered model. ``items``: ops and bodies in execution order; ``input``: the caller's (N, C, H, W)
    tensor; ``output``: the logits (N, num_classes); ``kernels``: the kernel set the op parameters
    were prepared for; ``dtype``: the compute dtype; ``workspace``: the fp32 split-K scratch shared by the convs and
    linears (None without them), a flat buffer sized by ``allocate_buffers`` from those ops, not from its shape.
    ``subnet_id_slot``: for a calibrated model (per-sub-network BN tables), the mask slot after the ``num_stages``
    stage bits that holds the sub-network id (``models.skip.subnet_index``), which selects the table rows; None for
    an uncalibrated one. The mask then has ``mask_entries`` int32 entries."""

    items: list[Op | Body]
    input: Value
    output: Value
    num_stages: int
    kernels: KernelSet
    dtype: torch.dtype
    model_name: str
    workspace: Value | None = None
    subnet_id_slot: int | None = None

    @property
    def mask_entries(self) -> int:
        """Length of the device mask: one bit per stage, plus the sub-network id of a calibrated program."""
        return self.num_stages + (self.subnet_id_slot is not None)

    def mask_values(self, skip: Sequence[bool]) -> list[int]:
        """The mask for a skip configuration (True = skip): 1 = run each stage's skippable sub-path, then, for a
        calibrated program, the sub-network id (computed here, on the host)."""
        values = skip_to_mask(tuple(skip))
        return values + ([subnet_index(tuple(skip))] if self.subnet_id_slot is not None else [])

    def bodies(self) -> list[Body]:
        return [item for item in self.items if isinstance(item, Body)]

    def flat_ops(self) -> Iterator[tuple[Op, Body | None]]:
        """Every op in execution order with the body holding it (None outside bodies)."""
        for item in self.items:
            if isinstance(item, Body):
                for op in item.ops:
                    yield op, item
            else:
                yield item, None

    def __repr__(self) -> str:
        n_ops = sum(1 for _ in self.flat_ops())
        return (
            f"Program({self.model_name}: {n_ops} ops, {len(self.bodies())} skippable bodies, "
            f"{self.kernels.name} kernels, {self.dtype})"
        )


class LoweringError(ValueError):
    """The model (or the program built from it) breaks an assumption of the engine."""


class NotLoweredError(LoweringError):
    """The model is known but this configuration (e.g. an input size for which Swin pads) has no lowering yet;
    the engine falls back to the reference model."""


def validate(program: Program) -> None:
    """Check the invariants in the module docstring; raise :class:`LoweringError` naming the op."""
    defined_at: dict[Value, Body | None] = {program.input: None}
    for op, body in program.flat_ops():
        epilogue = getattr(op, "epilogue", None)
        if epilogue is not None and epilogue.in_place != (op.out is epilogue.residual):
            raise LoweringError(
                f"{type(op).__name__} writing {op.out}: epilogue.in_place={epilogue.in_place} but out is "
                f"{'not ' if epilogue.in_place else ''}its residual: in place means out is the residual Value"
            )
        if epilogue is not None and epilogue.select_index >= program.mask_entries:
            raise LoweringError(
                f"{type(op).__name__} writing {op.out} selects its norm row with mask slot {epilogue.select_index}, "
                f"but the program's mask has {program.mask_entries} entries"
            )
        for v in op.reads():
            if v not in defined_at:
                raise LoweringError(f"{type(op).__name__} reads {v} before any op writes it")
            owner = defined_at[v]
            if owner is not None and owner is not body:
                raise LoweringError(
                    f"{type(op).__name__} reads {v}, which is defined inside the skippable body of stage "
                    f"{owner.stage}: when that stage is skipped it would be stale (update the residual stream in "
                    f"place instead)"
                )
        out = op.writes()
        defined_at.setdefault(out, body)
        if body is None:
            continue
        if op.allocates:
            raise LoweringError(
                f"{type(op).__name__} allocates a temporary inside the skippable body of stage {body.stage}; bodies "
                f"must only write static buffers"
            )
        if not op.can_exit and defined_at[out] is not body:
            raise LoweringError(
                f"{type(op).__name__} in the body of stage {body.stage} cannot exit early but writes {out}, which "
                f"lives outside the body"
            )
    if program.output not in defined_at:
        raise LoweringError(f"no op writes the program output {program.output}")
    if defined_at[program.output] is not None:
        raise LoweringError("the program output is written inside a skippable body")
