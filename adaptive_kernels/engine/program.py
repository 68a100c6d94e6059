"""The lowered program: a flat list of fused ops over static buffers, with skippable bodies.

Lowering (``lowering.py``) turns an ADN model into a :class:`Program`; the runtime (``runtime.py``)
allocates one static buffer per :class:`Value` and executes the ops, eagerly or inside a CUDA-graph
capture (``graph.py``). Every op is written once and runs with either kernel set — the Triton launchers
or their pure-torch ``*_ref`` references — because ops call ``ctx.kernels.conv2d(...)`` etc.

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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..epilogue import Epilogue
from ..models.skip import subnet_index

if TYPE_CHECKING:
    from .runtime import KernelSet


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
    """One step of a program. Subclasses are dataclasses listing their Values and parameters."""

    #: the op's kernel reads the mask and returns early when its sub-path is skipped
    can_exit: bool = False
    #: running the op may allocate a temporary (allowed only outside bodies)
    allocates: bool = False

    def reads(self) -> tuple[Value, ...]:
        raise NotImplementedError

    def writes(self) -> Value:
        raise NotImplementedError

    def run(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def workspace_numel(self, kernels: KernelSet, batch: int, device: torch.device) -> int:
        """fp32 elements of the program's split-K workspace this op may use at ``batch`` on ``device`` (0: none)."""
        return 0


@dataclass(eq=False)
class ToNHWC(Op):
    """src: the caller's (N, C, H, W) input -> dst: (N, H, W, C) in the compute dtype (one copy kernel)."""

    src: Value
    dst: Value

    def reads(self):
        return (self.src,)

    def writes(self):
        return self.dst

    def run(self, ctx):
        ctx.tensors[self.dst].copy_(ctx.tensors[self.src].permute(0, 2, 3, 1))


@dataclass(eq=False)
class PatchGather(Op):
    """src: (N, C, H, W) -> dst: (N, H//p, W//p, C*p*p) (any shape of that size, e.g. ViT's (N, L, C*p*p)), patch
    vectors in the order of a flattened (D, C, p, p) conv weight, so the patch embedding becomes one linear
    layer. The last H % p rows and W % p columns are dropped, as a stride-p conv without padding drops them."""

    src: Value
    dst: Value
    patch: int

    def reads(self):
        return (self.src,)

    def writes(self):
        return self.dst

    def run(self, ctx):
        x = ctx.tensors[self.src]
        n, c, h, w = x.shape
        p = self.patch
        hp, wp = h // p, w // p
        patches = x[:, :, : hp * p, : wp * p].view(n, c, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5)
        ctx.tensors[self.dst].view(n, hp, wp, c, p, p).copy_(patches)


@dataclass(eq=False)
class Gather(Op):
    """Rows in a fixed order: src viewed as (N, S, C) rows of C = src.shape[-1] features -> dst viewed as
    (N, R, C), ``dst row r = src row index[r]`` (index: (R,) int32 on the device, shared by the batch).

    Swin: tokens into (shifted) window order and back, and patch merging's 2x2 neighbourhoods (dst
    (H/2, W/2, 4C) from src (H, W, C)). Writes dst without allocating; exits early on its mask bit.
    """

    src: Value
    dst: Value
    index: torch.Tensor
    can_exit = True

    def reads(self):
        return (self.src,)

    def writes(self):
        return self.dst

    def run(self, ctx):
        x, out = ctx.tensors[self.src], ctx.tensors[self.dst]
        c = x.shape[-1]
        ctx.kernels.gather_rows(
            x.view(x.shape[0], -1, c),
            self.index,
            mask=ctx.mask,
            exit_index=ctx.exit_index,
            out=out.view(out.shape[0], -1, c),
        )


def _bound(epilogue: Epilogue, ctx: RunContext) -> Epilogue:
    """The op's epilogue with its residual Value replaced by the buffer and the context's exit index."""
    residual = epilogue.residual
    return replace(epilogue, residual=None if residual is None else ctx.tensors[residual], exit_index=ctx.exit_index)


def _epilogue_reads(x: Value, epilogue: Epilogue) -> tuple[Value, ...]:
    return (x,) if epilogue.residual is None else (x, epilogue.residual)


@dataclass(eq=False)
class Conv(Op):
    """Fused conv: ``out = act(conv(x, w) * scale[row] + shift[row]) (+ residual) (then ReLU)``, NHWC.

    ``epilogue``: the :class:`~adaptive_kernels.epilogue.Epilogue` with the folded-BN tables (one row; a skip-aware
    BN's 2 rows selected by the stage's mask bit; a calibrated model's 2^S rows selected by the sub-network id slot)
    and its residual as a Value (``in_place``: ``out`` is that residual, the residual stream); its exit index is set
    when the op runs. ``weight`` is in the form the program's kernel set takes (packed for Triton,
    (Cout, Cin/g, KH, KW) for the reference). ``split_k`` ("auto" or a forced int) and ``workspace`` (the program's
    shared split-K scratch) go to the kernel.
    """

    x: Value
    out: Value
    weight: torch.Tensor
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    epilogue: Epilogue
    split_k: int | str = "auto"
    workspace: Value | None = None
    can_exit = True

    def reads(self):
        return _epilogue_reads(self.x, self.epilogue)

    def writes(self):
        return self.out

    def run(self, ctx):
        t = ctx.tensors
        epilogue = _bound(self.epilogue, ctx)
        ctx.kernels.conv2d(
            t[self.x],
            self.weight,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            epilogue=epilogue,
            mask=ctx.mask,
            out=None if epilogue.in_place else t[self.out],
            split_k=self.split_k,
            workspace=None if self.workspace is None else t[self.workspace],
        )

    def workspace_numel(self, kernels, batch, device):
        if self.workspace is None:
            return 0
        ho, wo, cout = self.out.shape
        return kernels.conv2d_workspace_numel(
            batch * ho * wo,
            cout,
            self.x.shape[-1],
            self.kernel_size,
            groups=self.groups,
            split_k=self.split_k,
            device=device,
        )


@dataclass(eq=False)
class Linear(Op):
    """``out = act(x @ weight.T + bias) (+ residual)`` over the last dim; the bias is the ``epilogue``'s shift, its
    residual a Value (``in_place``: ``out`` is that residual). ``split_k`` ("auto" or a forced int) and ``workspace``
    (the program's shared split-K scratch) go to the kernel."""

    x: Value
    out: Value
    weight: torch.Tensor
    epilogue: Epilogue
    split_k: int | str = "auto"
    workspace: Value | None = None
    can_exit = True

    def reads(self):
        return _epilogue_reads(self.x, self.epilogue)

    def writes(self):
        return self.out

    def run(self, ctx):
        t = ctx.tensors
        epilogue = _bound(self.epilogue, ctx)
        ctx.kernels.linear(
            t[self.x],
            self.weight,
            epilogue=epilogue,
            mask=ctx.mask,
            out=None if epilogue.in_place else t[self.out],
            split_k=self.split_k,
            workspace=None if self.workspace is None else t[self.workspace],
        )

    def workspace_numel(self, kernels, batch, device):
        if self.workspace is None:
            return 0
        rows = batch
        for s in self.x.shape[:-1]:
            rows *= s
        return kernels.linear_workspace_numel(
            rows, self.out.shape[-1], self.x.shape[-1], split_k=self.split_k, device=device
        )


@dataclass(eq=False)
class LayerNorm(Op):
    """LayerNorm over the last dim; with ``norm_index >= 0`` the mask picks (weight, bias) or the _skip set.
    ``first_token``: normalise only token 0 of x: (N, L, C) into out: (N, C) (ViT's class token)."""

    x: Value
    out: Value
    weight: torch.Tensor
    bias: torch.Tensor
    weight_skip: torch.Tensor | None
    bias_skip: torch.Tensor | None
    eps: float
    norm_index: int = -1
    first_token: bool = False
    can_exit = True

    def reads(self):
        return (self.x,)

    def writes(self):
        return self.out

    def run(self, ctx):
        x = ctx.tensors[self.x]
        ctx.kernels.layer_norm(
            x[:, 0] if self.first_token else x,
            self.weight,
            self.bias,
            weight_skip=self.weight_skip,
            bias_skip=self.bias_skip,
            eps=self.eps,
            mask=ctx.mask,
            norm_index=self.norm_index,
            exit_index=ctx.exit_index,
            out=ctx.tensors[self.out],
        )


@dataclass(eq=False)
class Attention(Op):
    """Multi-head self-attention core: qkv: (N, ..., 3*D) (nn.MultiheadAttention's packed in-projection,
    heads contiguous in each third) -> out: (N, ..., D) with the heads concatenated, ready for out_proj.
    The tokens form B sequences of ``seq_len`` tokens (None: qkv's next-to-last dim), one after the other:
    Swin's (N, nW, L, 3*D) windows, or its (N, H, W, 3*D) map when that is already in window order.

    ``backend``: "sdpa" (torch's fused attention; allocates its result, so mandatory blocks only) or
    "triton" (writes ``out`` directly and exits on the mask bit; used inside skippable bodies).
    ``bias``: additive attention bias in the compute dtype, (heads, L, L) or (nb, heads, L, L) with sequence
    b using bias[b % nb] (Swin's relative-position bias, plus the shift mask per window).
    """

    qkv: Value
    out: Value
    heads: int
    backend: str
    bias: torch.Tensor | None = None
    seq_len: int | None = None

    @property
    def can_exit(self) -> bool:  # type: ignore[override]
        return self.backend == "triton"

    @property
    def allocates(self) -> bool:  # type: ignore[override]
        return self.backend == "sdpa"

    def reads(self):
        return (self.qkv,)

    def writes(self):
        return self.out

    def run(self, ctx):
        qkv = ctx.tensors[self.qkv]
        seq, three_d = self.seq_len or qkv.shape[-2], qkv.shape[-1]
        head_dim = three_d // (3 * self.heads)
        q, k, v = qkv.view(-1, seq, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = ctx.tensors[self.out].view(-1, seq, self.heads, head_dim).transpose(1, 2)
        ctx.kernels.attention(
            q,
            k,
            v,
            self.bias,
            backend=self.backend,
            mask=ctx.mask,
            exit_index=ctx.exit_index if self.can_exit else -1,
            out=out,
        )


@dataclass(eq=False)
class EmbedTokens(Op):
    """ViT token assembly: out[:, 0] = class_token + pos[0]; out[:, 1:] = emb + pos[1:].
    emb: (N, L, D), out: (N, L + 1, D); ``cls_pos``: (D,), ``pos``: (L, D) in the compute dtype."""

    emb: Value
    out: Value
    cls_pos: torch.Tensor
    pos: torch.Tensor

    def reads(self):
        return (self.emb,)

    def writes(self):
        return self.out

    def run(self, ctx):
        out = ctx.tensors[self.out]
        torch.add(ctx.tensors[self.emb], self.pos, out=out[:, 1:])
        out[:, 0].copy_(self.cls_pos)


@dataclass(eq=False)
class MaxPool(Op):
    """NHWC max pooling (ResNet stem); torch's kernel, whose result is copied into ``out``."""

    x: Value
    out: Value
    kernel_size: int
    stride: int
    padding: int
    allocates = True

    def reads(self):
        return (self.x,)

    def writes(self):
        return self.out

    def run(self, ctx):
        y = F.max_pool2d(ctx.tensors[self.x].permute(0, 3, 1, 2), self.kernel_size, self.stride, self.padding)
        ctx.tensors[self.out].permute(0, 3, 1, 2).copy_(y)


@dataclass(eq=False)
class MeanPool(Op):
    """Global average pool: x: (N, H, W, C) -> out: (N, C) (torch accumulates fp16 in fp32)."""

    x: Value
    out: Value
    allocates = True

    def reads(self):
        return (self.x,)

    def writes(self):
        return self.out

    def run(self, ctx):
        torch.mean(ctx.tensors[self.x], dim=(1, 2), out=ctx.tensors[self.out])


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
        values = [0 if s else 1 for s in skip]
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
