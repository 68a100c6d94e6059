"""Lowering of ResNet-ADN (BasicBlock and Bottleneck, ImageNet and CIFAR stems): every conv + BN (+ ReLU) becomes one
fused conv; the shortcut add and the block's final ReLU go into the last conv's epilogue, which writes the residual
stream IN PLACE (the downsample branch's output in the first block of a stage)."""

from __future__ import annotations

from torch import nn

from ....models.resnet import BasicBlock, Bottleneck, ResNetADN, SkippableStage
from ..ops import MaxPool, MeanPool, ToNHWC
from ..program import LoweringError, Value
from .builder import Builder, lower_stage, register_lowering, twin


def _lower_resnet_block(b: Builder, block: nn.Module, x: Value, name: str) -> Value:
    stage = block.stage
    if not isinstance(block, (BasicBlock, Bottleneck)):
        raise LoweringError(f"{name}: {type(block).__name__} is not a ResNet BasicBlock/Bottleneck")
    if not isinstance(block.relu, nn.ReLU):
        raise LoweringError(f"{name}: only ReLU activations are lowered")
    shortcut = x
    if block.downsample is not None:
        ds = block.downsample
        if not (isinstance(ds, nn.Sequential) and len(ds) == 2):
            raise LoweringError(f"{name}.downsample: expected Sequential(Conv2d, BatchNorm2d), got {ds}")
        shortcut = b.conv_bn(x, ds[0], ds[1], name=f"{name}.downsample")
    convs = ["conv1", "conv2"] + (["conv3"] if isinstance(block, Bottleneck) else [])
    h = x
    for i, conv in enumerate(convs):
        norm = f"bn{i + 1}"
        last = i == len(convs) - 1
        h = b.conv_bn(
            h,
            getattr(block, conv),
            getattr(block, norm),
            twin(block, norm),
            stage=stage,
            activation="none" if last else "relu",
            residual=shortcut if last else None,
            residual_relu=last,
            name=f"{name}.{conv}",
        )
    return h


@register_lowering(ResNetADN)
def lower_resnet(b: Builder, model: ResNetADN, x: Value) -> Value:
    h = b.emit(ToNHWC(x, b.value("input_nhwc", (x.shape[1], x.shape[2], x.shape[0]))))
    h = b.conv_bn(h, model.conv1, model.bn1, activation="relu", name="conv1")
    if isinstance(model.maxpool, nn.MaxPool2d):
        mp = model.maxpool
        if (
            mp.dilation not in (1, (1, 1))
            or mp.ceil_mode
            or not all(isinstance(v, int) for v in (mp.kernel_size, mp.stride, mp.padding))
        ):
            raise LoweringError(f"maxpool: only square, dilation-1, floor-mode pooling is lowered, got {mp}")
        hh, ww, c = h.shape
        size = (
            (hh + 2 * mp.padding - mp.kernel_size) // mp.stride + 1,
            (ww + 2 * mp.padding - mp.kernel_size) // mp.stride + 1,
            c,
        )
        h = b.emit(MaxPool(h, b.value("maxpool", size), mp.kernel_size, mp.stride, mp.padding))
    elif not isinstance(model.maxpool, nn.Identity):
        raise LoweringError(f"maxpool: expected MaxPool2d or Identity, got {model.maxpool}")
    for k, stage in enumerate(model.stages):
        name = f"layer{k + 1}"
        if not isinstance(stage, SkippableStage):
            raise LoweringError(f"{name}: expected a SkippableStage, got {type(stage).__name__}")
        h = lower_stage(b, stage, h, name, _lower_resnet_block)
    pooled = b.emit(MeanPool(h, b.value("avgpool", (h.shape[-1],))))
    return b.linear(pooled, model.fc.weight, model.fc.bias, name="fc")
