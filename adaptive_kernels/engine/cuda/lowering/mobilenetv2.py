"""Lowering of MobileNetV2-ADN: conv + BN + ReLU6 / linear bottleneck, depthwise convs, residual add fused."""

from __future__ import annotations

from torch import nn

from ....models.mobilenetv2 import ConvNormActivation, InvertedResidual, MobileNetV2ADN
from ....models.resnet import SkippableStage
from ..ops import MeanPool, ToNHWC
from ..program import LoweringError, Value
from .builder import Builder, lower_stage, register_lowering, twin


def _lower_conv_norm_act(b: Builder, layer: nn.Module, x: Value, name: str, residual: Value | None = None) -> Value:
    if not isinstance(layer, ConvNormActivation):
        raise LoweringError(f"{name}: expected ConvNormActivation, got {type(layer).__name__}")
    act = layer.activation_layer
    if act is not None and not isinstance(act, nn.ReLU6):
        raise LoweringError(f"{name}: only ReLU6 (or no activation) is lowered, got {act}")
    return b.conv_bn(
        x,
        layer.conv_layer,
        layer.norm,
        twin(layer, "norm"),
        stage=layer.stage,
        activation="relu6" if act is not None else "none",
        residual=residual,
        name=name,
    )


def _lower_inverted_residual(b: Builder, block: nn.Module, x: Value, name: str) -> Value:
    if not isinstance(block, InvertedResidual):
        raise LoweringError(f"{name}: expected InvertedResidual, got {type(block).__name__}")
    h = x
    layers = list(block.conv)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        h = _lower_conv_norm_act(
            b, layer, h, f"{name}.conv.{i}", residual=x if last and block.use_res_connect else None
        )
    return h


@register_lowering(MobileNetV2ADN)
def lower_mobilenetv2(b: Builder, model: MobileNetV2ADN, x: Value) -> Value:
    h = b.emit(ToNHWC(x, b.value("input_nhwc", (x.shape[1], x.shape[2], x.shape[0]))))
    for i, module in enumerate(model.features):
        name = f"features.{i}"
        if isinstance(module, ConvNormActivation):
            h = _lower_conv_norm_act(b, module, h, name)
        elif isinstance(module, InvertedResidual):
            h = _lower_inverted_residual(b, module, h, name)
        elif isinstance(module, SkippableStage):
            h = lower_stage(b, module, h, name, _lower_inverted_residual)
        else:
            raise LoweringError(f"{name}: {type(module).__name__} is not lowered")
    pooled = b.emit(MeanPool(h, b.value("avgpool", (h.shape[-1],))))
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    others = [m for m in model.classifier if not isinstance(m, (nn.Linear, nn.Dropout))]
    if len(linears) != 1 or others:
        raise LoweringError(f"classifier: expected Dropout + one Linear, got {model.classifier}")
    return b.linear(pooled, linears[0].weight, linears[0].bias, name="classifier")
