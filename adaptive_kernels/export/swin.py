"""Tensor-mask forward of Swin-T-ADN: one ``If`` per stage, the patch merging before a stage inside it
(its norm follows that stage's flag)."""

from __future__ import annotations

import torch

from ..models.swin import SwinTransformerADN
from .masked import MaskedForward, register_masked_forward


@register_masked_forward(SwinTransformerADN)
class SwinMaskedForward(MaskedForward):
    model: SwinTransformerADN

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pre(x)

    def stage_layers(self) -> list:
        return list(self.model.features)

    def epilogue(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.norm(x).mean(dim=(1, 2)))
