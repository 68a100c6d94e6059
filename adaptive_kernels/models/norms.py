"""Skip-aware BatchNorm: the per-sub-network statistics tables a calibrated model normalises with, and the shared
selection of the sub-network that picks a table row. ``calibrate`` (``models/calibration.py``) fills the tables;
this docstring is their format, shared with the engine's lowering and the one-graph export:

* every ``SubnetBatchNorm2d`` gets two persistent float32 buffers ``subnet_mean`` / ``subnet_var`` of shape
  (2^S, C); row ``j = subnet_index(skip)`` holds the statistics of sub-network ``j``; rows of sub-networks that
  do not run the norm (and of configurations not calibrated) hold copies of the norm's running statistics;
* in eval mode a calibrated norm normalises with row ``j`` of the sub-network being run (weight, bias and
  eps unchanged); in train mode it is a plain BatchNorm. An uncalibrated norm is a plain BatchNorm (its
  table buffers are ``None``: its state dict has exactly BatchNorm's keys).

The model tells its norms which sub-network runs through one small shared ``SubnetSelection`` object that
its ``forward`` updates (one integer store per call, not one per norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(slots=True)
class SubnetSelection:
    """The sub-network a model runs now (``index`` = ``subnet_index(skip)``), shared by the model and its norms.
    While the one-graph export traces, ``index`` is a scalar int64 tensor computed from the mask input."""

    index: int | torch.Tensor
    num_subnets: int


class BatchStatistics(Protocol):
    """What ``calibrate`` gives a norm to record its input's statistics while it runs (``models/calibration.py``)."""

    def normalize(self, norm: nn.BatchNorm2d, row: int, x: torch.Tensor) -> torch.Tensor:
        """Train-mode BatchNorm of x with its batch statistics, which are added to ``row``."""


class SubnetBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, once calibrated, normalises in eval mode with the statistics of the running
    sub-network (row ``selection.index`` of ``subnet_mean`` / ``subnet_var``). x: (N, C, H, W) -> same."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        # None buffers are left out of the state dict: an uncalibrated norm saves and loads as BatchNorm.
        self.register_buffer("subnet_mean", None)
        self.register_buffer("subnet_var", None)
        self.selection: SubnetSelection | None = None  # set by the owning ADN model
        self.statistics: BatchStatistics | None = None  # set while ``calibrate`` runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None:
            # Calibration: train-mode normalisation with the batch's own statistics (what the norm computes
            # in training), but the running statistics stay untouched.
            return self.statistics.normalize(self, self.selection.index, x)
        if self.subnet_mean is None or self.training:
            return super().forward(x)
        j = self.selection.index
        if isinstance(j, torch.Tensor):  # one-graph export: the id is a graph value (index_select: a static shape)
            mean, var = (t.index_select(0, j.reshape(1)).squeeze(0) for t in (self.subnet_mean, self.subnet_var))
        else:
            mean, var = self.subnet_mean[j], self.subnet_var[j]
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def allocate_subnet_table(self) -> None:
        """Create the (2^S, C) table buffers, every row a copy of the running statistics."""
        if self.selection is None:
            raise RuntimeError("this norm belongs to no ADN model (no sub-network selection): it cannot be calibrated")
        rows = self.selection.num_subnets
        self.subnet_mean = self.running_mean.detach().expand(rows, -1).clone()
        self.subnet_var = self.running_var.detach().expand(rows, -1).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A calibrated state dict loads into a fresh (uncalibrated) model: make room for its tables first.
        if prefix + "subnet_mean" in state_dict and self.subnet_mean is None:
            self.allocate_subnet_table()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def subnet_norms(model: nn.Module) -> list[SubnetBatchNorm2d]:
    """Every calibratable norm of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SubnetBatchNorm2d)]


def attach_selection(model: nn.Module, num_stages: int) -> SubnetSelection:
    """Give ``model`` and all its ``SubnetBatchNorm2d`` one shared selection (super-net selected)."""
    selection = SubnetSelection(index=0, num_subnets=2**num_stages)
    for norm in subnet_norms(model):
        norm.selection = selection
    return selection


def prepare_for_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Allocate the tables of every norm whose table is in ``state_dict`` so that ``model.state_dict()``
    lists the same keys (``load_model_state`` compares key sets before loading)."""
    for name, norm in model.named_modules():
        if isinstance(norm, SubnetBatchNorm2d) and norm.subnet_mean is None and f"{name}.subnet_mean" in state_dict:
            norm.allocate_subnet_table()
