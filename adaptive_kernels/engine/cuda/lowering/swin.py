"""Lowering of Swin-T-ADN: patch embedding as ViT's (+ LayerNorm); the (N, H, W, C) token map stays in row-major token
order. A block is LayerNorm -> gather into (shifted) window order -> QKV linear -> attention with a precomputed bias
(relative position, plus the shift mask per window) -> gather back -> projection (+ residual, in place) -> LayerNorm
-> fc1 + GELU -> fc2 (+ residual, in place): window partition and cyclic shift are one fixed permutation of tokens,
and only attention needs window order (the gathers are left out where the permutation is the identity). Patch
merging = gather of the 2x2 neighbourhoods -> LayerNorm (skip-aware) -> reduction linear. Final LayerNorm, mean over
tokens, head. Not lowered (:class:`~.NotLoweredError`, the engine then runs the reference): input sizes for which the
model pads, i.e. a feature map that is not a multiple of the window, or one with an odd side before patch merging."""

from __future__ import annotations

import torch
from torch import nn

from ....models.swin import PatchMerging, Permute, SwinBlock, SwinStage, SwinTransformerADN, shift_region
from ..ops import Attention, MeanPool, PatchGather
from ..program import LoweringError, NotLoweredError, Value
from .builder import Builder, lower_stage, mlp_linears, register_lowering, twin


def _window_order(hh: int, ww: int, ws: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """(hh*ww,) token ids in the order the model's attention sees them: cyclic shift by (-shift_h, -shift_w),
    then windows of ws x ws in row-major order, tokens row-major inside each window."""
    ids = torch.arange(hh * ww).view(hh, ww).roll(shifts=(-shift_h, -shift_w), dims=(0, 1))
    return ids.view(hh // ws, ws, ww // ws, ws).permute(0, 2, 1, 3).reshape(-1)


def _window_bias(attn: nn.Module, hh: int, ww: int, shift_h: int, shift_w: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias of one block, as the model builds it (in ``dtype``): the relative-position
    bias (heads, L, L), L = ws*ws; with a shift, plus -100 between tokens of different shift regions, per
    window: (nW, heads, L, L)."""
    ws, heads = attn.window_size, attn.num_heads
    length = ws * ws
    table = attn.relative_position_bias_table.detach().to(dtype)
    bias = table[attn.relative_position_index].view(length, length, heads).permute(2, 0, 1)
    if shift_h == 0 and shift_w == 0:
        return bias.contiguous()
    device = table.device
    rows, cols = shift_region(hh, ws, shift_h, device), shift_region(ww, ws, shift_w, device)
    gh, gw = hh // ws, ww // ws
    region = (rows[:, None] * 3 + cols[None, :]).view(gh, ws, gw, ws).permute(0, 2, 1, 3).reshape(gh * gw, length)
    mask = (region[:, None, :] != region[:, :, None]).to(dtype) * -100.0
    return (bias[None] + mask[:, None]).contiguous()


def _lower_swin_block(b: Builder, block: nn.Module, tokens: Value, name: str) -> Value:
    if not isinstance(block, SwinBlock):
        raise LoweringError(f"{name}: expected SwinBlock, got {type(block).__name__}")
    attn = block.attn
    hh, ww, d = tokens.shape
    ws, heads = attn.window_size, attn.num_heads
    if hh % ws or ww % ws:
        raise NotLoweredError(
            f"{name}: the {hh}x{ww} feature map is not a multiple of the {ws}x{ws} window, and Swin's window padding "
            f"is not lowered: use an image size that gives multiples of the window at every stage (e.g. 224x224 "
            f"for window 7 and patch 4)"
        )
    for layer, shape in ((attn.qkv, (3 * d, d)), (attn.proj, (d, d))):
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != shape:
            raise LoweringError(
                f"{name}.attn: expected qkv Linear({d}, {3 * d}) and proj Linear({d}, {d}), got {layer}"
            )
    if d % heads:
        raise LoweringError(f"{name}.attn: {heads} heads do not divide {d} features")
    fc1, fc2 = mlp_linears(block.mlp, f"{name}.mlp")
    if fc1.in_features != d or fc1.out_features != fc2.in_features or fc2.out_features != d:
        raise LoweringError(f"{name}.mlp: shapes {fc1} -> {fc2} do not map {d} features back to {d}")
    # the model's rule: no shift along a side that one window covers
    _, _, shift_h, shift_w = attn.padded_size(hh, ww)
    order = _window_order(hh, ww, ws, shift_h, shift_w)
    in_order = torch.equal(order, torch.arange(order.numel()))
    length = ws * ws
    windows = (hh * ww // length, length, d)  # (nW, L, d): sequence b of the attention batch is window b % nW
    stage = block.stage
    # SDPA allocates its result: fine in the main capture, not inside an IF body (see program.py).
    backend = "triton" if b.in_body else "sdpa"
    bias = _window_bias(attn, hh, ww, shift_h, shift_w, b.param_dtype)

    h = b.layer_norm(tokens, block.norm1, twin(block, "norm1"), stage=stage, name=f"{name}.norm1")
    if not in_order:
        h = b.gather(h, order, windows, name=f"{name}.windows")
    qkv = b.linear(h, attn.qkv.weight, attn.qkv.bias, name=f"{name}.attn.qkv")
    out = b.value(f"{name}.attn", qkv.shape[:-1] + (d,))
    a = b.emit(Attention(qkv, out, heads, backend, bias=b.weight(bias), seq_len=length))
    if not in_order:
        a = b.gather(a, torch.argsort(order), tokens.shape, name=f"{name}.tokens")
    tokens = b.linear(a, attn.proj.weight, attn.proj.bias, residual=tokens, name=f"{name}.attn.proj")
    h = b.layer_norm(tokens, block.norm2, twin(block, "norm2"), stage=stage, name=f"{name}.norm2")
    h = b.linear(h, fc1.weight, fc1.bias, activation="gelu", name=f"{name}.mlp.0")
    return b.linear(h, fc2.weight, fc2.bias, residual=tokens, name=f"{name}.mlp.3")


def _lower_patch_merging(b: Builder, merge: PatchMerging, x: Value, name: str) -> Value:
    hh, ww, c = x.shape
    if hh % 2 or ww % 2:
        raise NotLoweredError(
            f"{name}: patch merging of the {hh}x{ww} feature map pads its odd side, which is not lowered: use an "
            f"image size that keeps every merged feature map even"
        )
    if not isinstance(merge.reduction, nn.Linear) or merge.reduction.in_features != 4 * c:
        raise LoweringError(f"{name}.reduction: expected Linear({4 * c}, ...), got {merge.reduction}")
    ids = torch.arange(hh * ww).view(hh, ww)
    # the model's channel blocks: (even row, even col), (odd, even), (even, odd), (odd, odd)
    index = torch.stack([ids[0::2, 0::2], ids[1::2, 0::2], ids[0::2, 1::2], ids[1::2, 1::2]], dim=-1).reshape(-1)
    h = b.gather(x, index, (hh // 2, ww // 2, 4 * c), name=f"{name}.merge")
    h = b.layer_norm(h, merge.norm, twin(merge, "norm"), stage=merge.stage, name=f"{name}.norm")
    return b.linear(h, merge.reduction.weight, merge.reduction.bias, name=f"{name}.reduction")


@register_lowering(SwinTransformerADN)
def lower_swin(b: Builder, model: SwinTransformerADN, x: Value) -> Value:
    c, hh, ww = x.shape
    p = model.patch_size
    pre = list(model.pre)
    if len(pre) != 3 or not isinstance(pre[1], Permute) or tuple(pre[1].dims) != (0, 2, 3, 1):
        raise LoweringError(f"pre: expected Conv2d, Permute((0, 2, 3, 1)), LayerNorm, got {model.pre}")
    proj = pre[0]
    if (
        not isinstance(proj, nn.Conv2d)
        or proj.kernel_size != (p, p)
        or proj.stride != (p, p)
        or proj.padding != (0, 0)
        or proj.dilation != (1, 1)
        or proj.groups != 1
    ):
        raise LoweringError(f"pre.0: expected a {p}x{p} stride-{p} patch embedding without padding, got {proj}")
    d = proj.out_channels
    patches = b.emit(PatchGather(x, b.value("patches", (hh // p, ww // p, c * p * p)), p))
    h = b.linear(patches, proj.weight.reshape(d, -1), proj.bias, name="pre.0")
    h = b.layer_norm(h, pre[2], name="pre.2")
    for i, layer in enumerate(model.features):
        name = f"features.{i}"
        if isinstance(layer, PatchMerging):
            h = _lower_patch_merging(b, layer, h, name)
        elif isinstance(layer, SwinStage):
            h = lower_stage(b, layer, h, name, _lower_swin_block)
        else:
            raise LoweringError(f"{name}: {type(layer).__name__} is not lowered")
    h = b.layer_norm(h, model.norm, name="norm")
    pooled = b.emit(MeanPool(h, b.value("avgpool", (h.shape[-1],))))
    return b.linear(pooled, model.head.weight, model.head.bias, name="head")
