"""Exponential moving average of a model's weights (optional in the paper's recipe)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


class ModelEMA:
    """``ema = decay · ema + (1 − decay) · weights`` after every optimizer step.

    Floating-point parameters and buffers (BatchNorm running statistics, both the normal and the ``_skip``
    sets) are averaged; integer buffers (``num_batches_tracked``) are copied. ``module`` is the averaged
    model, always in eval mode and without gradients.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.999; got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        own = self.module.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                own[name].lerp_(value, 1.0 - self.decay)
            else:
                own[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
