"""Tensor-mask forward of ResNet-ADN (all depths): one ``If`` per residual stage (see ``masked.py``)."""

from __future__ import annotations

import torch

from ..models.resnet import ResNetADN
from .masked import MaskedForward, register_masked_forward


@register_masked_forward(ResNetADN)
class ResNetMaskedForward(MaskedForward):
    model: ResNetADN

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.maxpool(m.relu(m.bn1(m.conv1(x))))

    def stage_layers(self) -> list:
        return list(self.model.stages)

    def epilogue(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.fc(torch.flatten(m.avgpool(x), 1))
