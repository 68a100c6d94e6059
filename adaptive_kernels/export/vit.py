"""Tensor-mask forward of ViT/DeiT-ADN: one ``If`` per stage of three encoder blocks."""

from __future__ import annotations

import torch

from ..models.vit import VisionTransformerADN
from .masked import MaskedForward, register_masked_forward


@register_masked_forward(VisionTransformerADN)
class ViTMaskedForward(MaskedForward):
    model: VisionTransformerADN

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return m.encoder.dropout(x + m.encoder.pos_embedding)

    def stage_layers(self) -> list:
        return list(self.model.encoder.layers)

    def epilogue(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.heads(m.encoder.ln(x)[:, 0])
