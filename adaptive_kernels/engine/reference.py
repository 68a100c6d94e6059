"""The reference runtime: the eval-mode model itself, run eagerly (``compile`` falls back to it where no faster
runtime can run: no CUDA and no ONNX Runtime, or an input size the CUDA lowering does not cover)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.base import ADNModel
from ..models.skip import SkipConfig
from .base import Engine


class ReferenceEngine(Engine):
    """:class:`~.base.Engine` over a private eval-mode copy of the model, in the model's own dtype (inputs are
    converted to it); ``mechanism == "reference"``."""

    def __init__(self, model: ADNModel, example_input: torch.Tensor, *, dynamic_batch: bool) -> None:
        super().__init__(num_stages=model.num_skippable_stages, example_input=example_input, mechanism="reference",
                         dynamic_batch=dynamic_batch)
        self._reference: nn.Module = copy.deepcopy(model).to(example_input.device).eval().requires_grad_(False)
        self._reference_dtype = next((p.dtype for p in self._reference.parameters()), example_input.dtype)

    def _run(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        """Logits (N, num_classes) in the model's dtype. The model takes its sub-network per call: no lock."""
        with torch.no_grad():
            return self._reference(x.to(self._reference_dtype), skip)

    def _describe(self) -> str:
        return type(self._reference).__name__
