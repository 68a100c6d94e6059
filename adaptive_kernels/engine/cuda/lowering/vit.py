"""Lowering of ViT / DeiT-ADN: patch embedding as one linear layer over gathered patches, pre-norm encoder blocks as
LayerNorm -> QKV linear -> attention -> out-projection (+ residual, in place) -> LayerNorm -> fc1 + GELU -> fc2
(+ residual, in place), final LayerNorm on the class token only, head."""

from __future__ import annotations

from torch import nn

from ....models.vit import EncoderBlock, VisionTransformerADN
from ..ops import Attention, EmbedTokens, PatchGather
from ..program import LoweringError, Value
from .builder import Builder, mlp_linears, register_lowering, twin


def _lower_encoder_block(b: Builder, block: nn.Module, tokens: Value, name: str) -> Value:
    if not isinstance(block, EncoderBlock):
        raise LoweringError(f"{name}: expected EncoderBlock, got {type(block).__name__}")
    mha = block.self_attention
    d = tokens.shape[-1]
    if (
        not isinstance(mha, nn.MultiheadAttention)
        or not mha.batch_first
        or not mha._qkv_same_embed_dim
        or mha.in_proj_bias is None
        or mha.bias_k is not None
        or mha.add_zero_attn
    ):
        raise LoweringError(
            f"{name}.self_attention: only batch_first MultiheadAttention with a packed, biased "
            f"in-projection (no bias_k/v, no zero attention) is lowered"
        )
    fc1, fc2 = mlp_linears(block.mlp, f"{name}.mlp")
    stage = block.stage
    # SDPA allocates its result: fine in the main capture, not inside an IF body (see program.py).
    backend = "triton" if b.in_body else "sdpa"
    h = b.layer_norm(tokens, block.ln_1, twin(block, "ln_1"), stage=stage, name=f"{name}.ln_1")
    qkv = b.linear(h, mha.in_proj_weight, mha.in_proj_bias, name=f"{name}.qkv")
    a = b.emit(Attention(qkv, b.value(f"{name}.attention", tokens.shape), mha.num_heads, backend))
    tokens = b.linear(a, mha.out_proj.weight, mha.out_proj.bias, residual=tokens, name=f"{name}.out_proj")
    h = b.layer_norm(tokens, block.ln_2, twin(block, "ln_2"), stage=stage, name=f"{name}.ln_2")
    h = b.linear(h, fc1.weight, fc1.bias, activation="gelu", name=f"{name}.fc1")
    if fc1.out_features != fc2.in_features or fc2.out_features != d:
        raise LoweringError(f"{name}.mlp: shapes {fc1} -> {fc2} do not map {d} features back to {d}")
    return b.linear(h, fc2.weight, fc2.bias, residual=tokens, name=f"{name}.fc2")


@register_lowering(VisionTransformerADN)
def lower_vit(b: Builder, model: VisionTransformerADN, x: Value) -> Value:
    c, hh, ww = x.shape
    p = model.patch_size
    proj = model.conv_proj
    if (
        proj.kernel_size != (p, p)
        or proj.stride != (p, p)
        or proj.padding != (0, 0)
        or proj.groups != 1
        or hh % p
        or ww % p
    ):
        raise LoweringError(f"conv_proj: expected a {p}x{p} stride-{p} patch embedding dividing the {hh}x{ww} input")
    seq = (hh // p) * (ww // p)
    d = model.hidden_dim
    pos = model.encoder.pos_embedding.detach()
    if tuple(pos.shape) != (1, seq + 1, d):
        raise LoweringError(f"encoder.pos_embedding has shape {tuple(pos.shape)}, expected (1, {seq + 1}, {d})")
    patches = b.emit(PatchGather(x, b.value("patches", (seq, c * p * p)), p))
    emb = b.linear(patches, proj.weight.reshape(d, -1), proj.bias, name="conv_proj")
    cls_pos = model.class_token.detach().reshape(d) + pos[0, 0]
    tokens = b.emit(EmbedTokens(emb, b.value("tokens", (seq + 1, d)), b.weight(cls_pos), b.weight(pos[0, 1:])))
    layers = list(model.encoder.layers)
    for i, block in enumerate(layers):
        name = f"encoder.layers.encoder_layer_{i}"
        if block.skippable:
            with b.body(block.stage):
                tokens = _lower_encoder_block(b, block, tokens, name)
        else:
            tokens = _lower_encoder_block(b, block, tokens, name)
    cls = b.layer_norm(tokens, model.encoder.ln, first_token=True, name="encoder.ln")
    heads = list(model.heads)
    if len(heads) != 1 or not isinstance(heads[0], nn.Linear):
        raise LoweringError(f"heads: expected one Linear (no pre-logits layer), got {model.heads}")
    return b.linear(cls, heads[0].weight, heads[0].bias, name="heads.head")
