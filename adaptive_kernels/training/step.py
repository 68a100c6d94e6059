"""One training iteration: the paper's two-pass self-distillation step and the two baselines.

``adn`` (docs/method.md, "Training step"), on one batch:
  1. zero grads;
  2. super-net forward, ``α·CE(out_super, y)``, backward;
  3. base-net forward, ``(1−α)·[T²·KL(base ‖ detached super) (+ β·feature KL)]``, backward;
  4. ONE optimizer step (the gradients of both passes accumulate).
``plain``: super-net forward, CE, backward, step (the same network trained without ADN).
``single``: one fixed sub-network forward, CE, backward, step (e.g. the base depth trained alone).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn

from ..models.skip import SkipConfig
from .losses import classification_loss, distillation_kl, pooled_feature_kl

MODES = ("adn", "plain", "single")


@dataclass(frozen=True)
class StepConfig:
    """What one step computes. ``skip`` is the trained sub-network of ``single`` mode (ignored otherwise).

    ``feature_kd`` > 0 adds ``feature_kd · pooled_feature_kl`` of the stage outputs inside the (1−α) term.
    """

    mode: str = "adn"
    alpha: float = 0.5
    temperature: float = 1.0
    top_k: int | None = 500
    feature_kd: float = 0.0
    label_smoothing: float = 0.0
    skip: SkipConfig | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode == "single" and self.skip is None:
            raise ValueError("mode='single' trains one fixed sub-network: give its skip configuration (e.g. 'base')")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1] (weight of the super-net CE)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.feature_kd < 0:
            raise ValueError(f"feature_kd={self.feature_kd} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class StageOutputs:
    """Records each stage's output during a forward: the output of the last block that ran in ``layer{i}``.

    Forward hooks go on the blocks (children of ``layer1``, ``layer2``, ...) rather than on the stage
    containers, so this works whether the model calls the stage module or iterates over its blocks
    (needed to skip some of them). Use as a context manager; ``take()`` returns and clears the outputs.
    """

    def __init__(self, model: nn.Module):
        model = unwrap(model)
        self.stages = []
        i = 1
        while isinstance(getattr(model, f"layer{i}", None), nn.Module):
            self.stages.append(getattr(model, f"layer{i}"))
            i += 1
        if not self.stages:
            raise ValueError(
                f"feature distillation needs stage modules named layer1, layer2, ... ; "
                f"{type(model).__name__} has none (use feature_kd=0 for this model)"
            )
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> Self:
        for i, stage in enumerate(self.stages):
            for block in stage.children():
                self._handles.append(block.register_forward_hook(self._recorder(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()

    def _recorder(self, stage: int):
        def hook(module, inputs, output):
            self._outputs[stage] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        if len(self._outputs) != len(self.stages):
            raise RuntimeError(f"recorded {len(self._outputs)} of {len(self.stages)} stage outputs")
        out = [self._outputs[i] for i in range(len(self.stages))]
        self._outputs.clear()
        return out


def forward_backward(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: StepConfig,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward passes of one step; gradients ACCUMULATE into ``.grad`` (no zeroing, no step).

    images: (N, C, H, W); targets: (N,) labels or (N, K) soft targets. ``model`` may be DDP-wrapped.
    Returns detached losses: ``loss_super`` (α·CE, or CE for plain/single) and, for ``adn``, ``loss_kd``
    ((1−α)·T²·KL [+ feature term]).
    """
    num_stages = unwrap(model).num_skippable_stages
    super_net, base_net = (False,) * num_stages, (True,) * num_stages
    autocast = (
        torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if config.mode != "adn":
        skip = super_net if config.mode == "plain" else config.skip
        with autocast:
            loss = classification_loss(model(images, skip=skip), targets, config.label_smoothing)
        _check_finite(loss, "cross-entropy")
        backward(loss)
        return {"loss_super": loss.detach()}

    features = StageOutputs(model) if config.feature_kd > 0 else contextlib.nullcontext()
    with features:
        with autocast:
            teacher = model(images, skip=super_net)
            loss_super = config.alpha * classification_loss(teacher, targets, config.label_smoothing)
        teacher_features = [f.detach() for f in features.take()] if config.feature_kd > 0 else None
        _check_finite(loss_super, "super-net cross-entropy")
        backward(loss_super)

        with autocast:
            student = model(images, skip=base_net)
            kd = distillation_kl(student, teacher, config.temperature, config.top_k)
            if teacher_features is not None:
                kd = kd + config.feature_kd * pooled_feature_kl(features.take(), teacher_features, config.temperature)
            loss_kd = (1.0 - config.alpha) * kd
        _check_finite(loss_kd, "base-net distillation")
        backward(loss_kd)
    return {"loss_super": loss_super.detach(), "loss_kd": loss_kd.detach()}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: StepConfig,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    clip_grad: float | None = None,
) -> dict[str, torch.Tensor]:
    """Zero grads, ``forward_backward``, optional gradient clipping (by global norm), ONE optimizer step.

    Returns ``forward_backward``'s losses, plus ``grad_norm`` when clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    losses = forward_backward(model, images, targets, config, scaler=scaler, autocast_dtype=autocast_dtype)
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip_grad).detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return losses


def _check_finite(loss: torch.Tensor, what: str) -> None:
    # A NaN loss means the run is already lost; stop with a useful message instead of training on garbage.
    # Only checked on CPU: on a GPU the .item() would synchronise every step (the GradScaler copes there).
    if loss.device.type == "cpu" and not math.isfinite(loss.item()):
        raise FloatingPointError(f"{what} loss is {loss.item()}: lower the learning rate or enable --clip-grad")
