"""Skip-aware BatchNorm: the per-sub-network statistics tables a calibrated model normalises with, and the per-call
selection of the sub-network that picks a table row. ``calibrate`` (``models/calibration.py``) fills the tables;
this docstring is their format, shared with the engine's lowering and the one-graph export:

* every ``SubnetBatchNorm2d`` gets two persistent float32 buffers ``subnet_mean`` / ``subnet_var`` of shape
  (2^S, C); row ``j = subnet_index(skip)`` holds the statistics of sub-network ``j``; rows of sub-networks that
  do not run the norm (and of configurations not calibrated) hold copies of the norm's running statistics;
* in eval mode a calibrated norm normalises with row ``j`` of the sub-network being run (weight, bias and
  eps unchanged); in train mode it is a plain BatchNorm. An uncalibrated norm is a plain BatchNorm (its
  table buffers are ``None``: its state dict has exactly BatchNorm's keys).

The model's ``forward`` tells its norms which sub-network runs through :func:`running_subnet`, a thread-local value
set for the duration of the call (one store per call, not one per norm): threads sharing one model each normalise
with their own call's row, and nothing per call is stored on the modules. (Thread-local rather than a
``contextvars.ContextVar``: ``torch.compile(fullgraph=True)`` traces the one, not the other; a forward never awaits,
so asyncio tasks cannot interleave inside it.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

# ``.index``: ``subnet_index`` of the sub-network this thread's running forward computes (unset, i.e. 0, the super-net,
# outside one). While the one-graph export traces, a scalar int64 tensor computed from the mask input.
_RUNNING = threading.local()


def _running_index() -> int | torch.Tensor:
    return getattr(_RUNNING, "index", 0)


@contextmanager
def running_subnet(index: int | torch.Tensor) -> Iterator[None]:
    """Calibrated norms run by this thread inside the ``with`` block normalise with row ``index`` of their tables
    (``subnet_index(skip)``, or a scalar int64 tensor while the one-graph export traces); restored on exit."""
    previous = _running_index()
    _RUNNING.index = index
    try:
        yield
    finally:
        _RUNNING.index = previous


class BatchStatistics(Protocol):
    """What ``calibrate`` gives a norm to record its input's statistics while it runs (``models/calibration.py``)."""

    def normalize(self, norm: nn.BatchNorm2d, row: int, x: torch.Tensor) -> torch.Tensor:
        """Train-mode BatchNorm of x with its batch statistics, which are added to ``row``."""


class SubnetBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, once calibrated, normalises in eval mode with the statistics of the running
    sub-network (row :func:`running_subnet` of ``subnet_mean`` / ``subnet_var``). x: (N, C, H, W) -> same."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        # None buffers are left out of the state dict: an uncalibrated norm saves and loads as BatchNorm.
        self.register_buffer("subnet_mean", None)
        self.register_buffer("subnet_var", None)
        self.num_subnets: int | None = None  # the table's rows (2^S), set by the owning ADN model
        self.statistics: BatchStatistics | None = None  # set while ``calibrate`` runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None:
            # Calibration: train-mode normalisation with the batch's own statistics (what the norm computes
            # in training), but the running statistics stay untouched.
            return self.statistics.normalize(self, _running_index(), x)
        if self.subnet_mean is None or self.training:
            return super().forward(x)
        j = _running_index()
        if isinstance(j, torch.Tensor):  # one-graph export: the id is a graph value (index_select: a static shape)
            mean, var = (t.index_select(0, j.reshape(1)).squeeze(0) for t in (self.subnet_mean, self.subnet_var))
        else:
            mean, var = self.subnet_mean[j], self.subnet_var[j]
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def allocate_subnet_table(self) -> None:
        """Create the (2^S, C) table buffers, every row a copy of the running statistics."""
        if self.num_subnets is None:
            raise RuntimeError("this norm belongs to no ADN model (no count of sub-networks): it cannot be calibrated")
        self.subnet_mean = self.running_mean.detach().expand(self.num_subnets, -1).clone()
        self.subnet_var = self.running_var.detach().expand(self.num_subnets, -1).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A calibrated state dict loads into a fresh (uncalibrated) model: make room for its tables first.
        if prefix + "subnet_mean" in state_dict and self.subnet_mean is None:
            self.allocate_subnet_table()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def subnet_norms(model: nn.Module) -> list[SubnetBatchNorm2d]:
    """Every calibratable norm of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SubnetBatchNorm2d)]


def attach_subnet_norms(model: nn.Module, num_stages: int) -> None:
    """Tell every ``SubnetBatchNorm2d`` of ``model`` how many sub-networks it has (the rows of a table)."""
    for norm in subnet_norms(model):
        norm.num_subnets = 2**num_stages


def prepare_for_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Allocate the tables of every norm whose table is in ``state_dict`` so that ``model.state_dict()``
    lists the same keys (``load_model_state`` compares key sets before loading)."""
    for name, norm in model.named_modules():
        if isinstance(norm, SubnetBatchNorm2d) and norm.subnet_mean is None and f"{name}.subnet_mean" in state_dict:
            norm.allocate_subnet_table()
