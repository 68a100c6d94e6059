"""Shared test helpers: models with randomised norms, the relative error, the device mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: OpenMP threads only add overhead (and spin on a shared 2-core machine).
    Import it into a test module to use it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int | torch.Generator) -> None:
    """Random affine parameters and running statistics in every BatchNorm2d (each ``_skip`` twin
    independently), so twins and layers differ and a wrong norm set or a folding bug shows."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, calibrate: tuple[int, ...] | None = None) -> nn.Module:
    """Give every norm (each ``_skip`` twin independently) random affine parameters and BN running
    statistics, and every Linear random weights (ViT's head starts at zero), then switch to eval mode.

    With identity BN statistics a folding bug (or a wrong norm set) could go unnoticed. ``calibrate``: an
    input shape; BN statistics are then measured on random inputs of that shape, as training would (super-net
    passes for the normal set, base-net passes for the ``_skip`` twins), so activations neither saturate nor
    vanish and every sub-network's output differs clearly from the others.
    """
    g = torch.Generator().manual_seed(seed)
    randomize_norms(model, g)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(torch.rand(m.normalized_shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.normalized_shape, generator=g) * 0.2)
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    if calibrate is not None:
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        device = next(model.parameters()).device
        for _ in range(2):
            x = torch.randn(calibrate, generator=g).to(device)
            model(x, "super")
            model(x, "base")
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def device_mask(skip: tuple[bool, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernels' mask for a skip configuration: int32, 1 = run the stage's skippable sub-path."""
    return torch.tensor([0 if s else 1 for s in skip], dtype=torch.int32, device=device)
