"""Tensor-mask forward of MobileNetV2-ADN: the stem and the single-block stages join the ``If`` of the stage
whose flag they follow (``features.0``-``features.2`` on bit 0, ``features.6``-``features.8`` on bit 4)."""

from __future__ import annotations

import torch
from torch import nn

from ..models.mobilenetv2 import MobileNetV2ADN
from .masked import MaskedForward, register_masked_forward


@register_masked_forward(MobileNetV2ADN)
class MobileNetV2MaskedForward(MaskedForward):
    model: MobileNetV2ADN

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def stage_layers(self) -> list:
        return list(self.model.features)

    def epilogue(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
