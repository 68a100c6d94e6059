"""The ops of a lowered :class:`~.program.Program`: each a dataclass whose first two fields are the Values it reads
(``x``) and writes (``out``), its parameters, and ``run(ctx)`` calling the context's kernel set."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ...kernels.backend import Epilogue
from .program import Op, RunContext, Value


@dataclass(eq=False)
class ToNHWC(Op):
    """x: the caller's (N, C, H, W) input -> out: (N, H, W, C) in the compute dtype (one copy kernel)."""

    x: Value
    out: Value

    def run(self, ctx):
        ctx.tensors[self.out].copy_(ctx.tensors[self.x].permute(0, 2, 3, 1))


@dataclass(eq=False)
class PatchGather(Op):
    """x: (N, C, H, W) -> out: (N, H//p, W//p, C*p*p) (any shape of that size, e.g. ViT's (N, L, C*p*p)), patch
    vectors in the order of a flattened (D, C, p, p) conv weight, so the patch embedding becomes one linear
    layer. The last H % p rows and W % p columns are dropped, as a stride-p conv without padding drops them."""

    x: Value
    out: Value
    patch: int

    def run(self, ctx):
        x = ctx.tensors[self.x]
        n, c, h, w = x.shape
        p = self.patch
        hp, wp = h // p, w // p
        patches = x[:, :, : hp * p, : wp * p].view(n, c, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5)
        ctx.tensors[self.out].view(n, hp, wp, c, p, p).copy_(patches)


@dataclass(eq=False)
class Gather(Op):
    """Rows in a fixed order: x viewed as (N, S, C) rows of C = x.shape[-1] features -> out viewed as
    (N, R, C), ``out row r = x row index[r]`` (index: (R,) int32 on the device, shared by the batch).

    Swin: tokens into (shifted) window order and back, and patch merging's 2x2 neighbourhoods (out
    (H/2, W/2, 4C) from x (H, W, C)). Writes out without allocating; exits early on its mask bit.
    """

    x: Value
    out: Value
    index: torch.Tensor
    can_exit = True

    def run(self, ctx):
        x, out = ctx.tensors[self.x], ctx.tensors[self.out]
        c = x.shape[-1]
        ctx.kernels.gather_rows(
            x.view(x.shape[0], -1, c),
            self.index,
            mask=ctx.mask,
            exit_index=ctx.exit_index,
            out=out.view(out.shape[0], -1, c),
        )


@dataclass(eq=False)
class FusedGemm(Op):
    """What conv and linear share: a weight, the fused ``epilogue`` (its residual a Value; ``in_place``: ``out`` is
    that residual, the residual stream; its exit index is set when the op runs), and ``split_k`` ("auto" or a forced
    int) with ``workspace`` (the program's shared split-K scratch), which go to the kernel."""

    x: Value
    out: Value
    weight: torch.Tensor
    epilogue: Epilogue
    split_k: int | str = field(default="auto", kw_only=True)
    workspace: Value | None = field(default=None, kw_only=True)
    can_exit = True

    def reads(self):
        return (self.x,) if self.epilogue.residual is None else (self.x, self.epilogue.residual)

    def launch_args(self, ctx: RunContext) -> dict:
        """The keyword arguments both kernels take: the epilogue bound to this run's buffers and exit index, the
        mask, the output (None when written in place), split-K and its workspace."""
        t = ctx.tensors
        residual = self.epilogue.residual
        epilogue = replace(self.epilogue, residual=None if residual is None else t[residual], exit_index=ctx.exit_index)
        return {
            "epilogue": epilogue,
            "mask": ctx.mask,
            "out": None if epilogue.in_place else t[self.out],
            "split_k": self.split_k,
            "workspace": None if self.workspace is None else t[self.workspace],
        }


@dataclass(eq=False)
class Conv(FusedGemm):
    """Fused conv: ``out = act(conv(x, w) * scale[row] + shift[row]) (+ residual) (then ReLU)``, NHWC.

    The epilogue holds the folded-BN tables (one row; a skip-aware BN's 2 rows selected by the stage's mask bit; a
    calibrated model's 2^S rows selected by the sub-network id slot). ``weight`` is in the form the program's kernel
    set takes (packed for Triton, (Cout, Cin/g, KH, KW) for the reference).
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int

    def run(self, ctx):
        ctx.kernels.conv2d(
            ctx.tensors[self.x],
            self.weight,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            **self.launch_args(ctx),
        )

    def workspace_numel(self, kernels, batch, device):
        if self.workspace is None:
            return 0
        ho, wo, cout = self.out.shape
        return kernels.conv2d_workspace_numel(
            batch * ho * wo, cout, self.x.shape[-1], self.kernel_size, groups=self.groups, split_k=self.split_k,
            device=device,
        )


@dataclass(eq=False)
class Linear(FusedGemm):
    """``out = act(x @ weight.T + bias) (+ residual)`` over the last dim; the bias is the epilogue's shift."""

    def run(self, ctx):
        ctx.kernels.linear(ctx.tensors[self.x], self.weight, **self.launch_args(ctx))

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
    """Multi-head self-attention core: x: (N, ..., 3*D) (the qkv projection: nn.MultiheadAttention's packed in-projection,
    heads contiguous in each third) -> out: (N, ..., D) with the heads concatenated, ready for out_proj.
    The tokens form B sequences of ``seq_len`` tokens (None: x's next-to-last dim), one after the other:
    Swin's (N, nW, L, 3*D) windows, or its (N, H, W, 3*D) map when that is already in window order.

    ``backend``: "sdpa" (torch's fused attention; allocates its result, so mandatory blocks only) or
    "triton" (writes ``out`` directly and exits on the mask bit; used inside skippable bodies).
    ``bias``: additive attention bias in the compute dtype, (heads, L, L) or (nb, heads, L, L) with sequence
    b using bias[b % nb] (Swin's relative-position bias, plus the shift mask per window).
    """

    x: Value
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

    def run(self, ctx):
        qkv = ctx.tensors[self.x]
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
    """ViT token assembly: out[:, 0] = class_token + pos[0]; out[:, 1:] = x + pos[1:].
    x: (N, L, D) patch embeddings, out: (N, L + 1, D); ``cls_pos``: (D,), ``pos``: (L, D) in the compute dtype."""

    x: Value
    out: Value
    cls_pos: torch.Tensor
    pos: torch.Tensor

    def run(self, ctx):
        out = ctx.tensors[self.out]
        torch.add(ctx.tensors[self.x], self.pos, out=out[:, 1:])
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

    def run(self, ctx):
        y = F.max_pool2d(ctx.tensors[self.x].permute(0, 3, 1, 2), self.kernel_size, self.stride, self.padding)
        ctx.tensors[self.out].permute(0, 3, 1, 2).copy_(y)


@dataclass(eq=False)
class MeanPool(Op):
    """Global average pool: x: (N, H, W, C) -> out: (N, C) (torch accumulates fp16 in fp32)."""

    x: Value
    out: Value
    allocates = True

    def run(self, ctx):
        torch.mean(ctx.tensors[self.x], dim=(1, 2), out=ctx.tensors[self.out])
