"""Per-sub-network BatchNorm calibration: every one of the 2^S sub-networks normalises with its own statistics.

Training runs only the super-net and the base-net, so a stage's norms only ever see inputs produced by
stages in the same mode; a mixed sub-network (some stages skipped, others not) then normalises with
statistics of inputs it never produces, and loses several points of accuracy. ``calibrate`` measures, for
each sub-network, the exact statistics of every norm's input on a few training images and stores them in the
norms' per-sub-network tables (their format: ``models/norms.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .base import ADNModel
from .norms import subnet_norms
from .skip import SkipConfig, SkipLike, skip_to_str, subnet_index

DEFAULT_BATCH_SIZE = 256


class _Statistics:
    """Element-weighted sums of one norm's per-batch mean and unbiased variance, one row per sub-network,
    in float64 so that many batches add up without rounding drift (the norm's ``BatchStatistics`` while
    ``calibrate`` runs)."""

    def __init__(self, num_subnets: int, norm: nn.BatchNorm2d) -> None:
        like = {"dtype": torch.float64, "device": norm.running_mean.device}
        self.mean = torch.zeros(num_subnets, norm.num_features, **like)
        self.var = torch.zeros(num_subnets, norm.num_features, **like)
        self.count = torch.zeros(num_subnets, **like)
        # The batch's own statistics come out of the normalising batch_norm call itself (momentum 1 writes them
        # into these scratch "running" buffers): a separate var_mean over (N, H, W) would cost as much as the conv.
        self.batch_mean = torch.zeros_like(norm.running_mean)
        self.batch_var = torch.ones_like(norm.running_var)

    def normalize(self, norm: nn.BatchNorm2d, row: int, x: torch.Tensor) -> torch.Tensor:
        """Train-mode BatchNorm of x with its batch statistics, which are added to ``row``."""
        y = F.batch_norm(x, self.batch_mean, self.batch_var, norm.weight, norm.bias, True, 1.0, norm.eps)
        n = x.numel() // x.shape[1]
        self.mean[row] += n * self.batch_mean.double()
        self.var[row] += n * self.batch_var.double()  # BatchNorm stores the unbiased variance
        self.count[row] += n
        return y


@dataclass(frozen=True)
class CalibrationResult:
    """What ``calibrate`` did: images per configuration, the configurations (T/F strings), wall time."""

    images: int
    configs: tuple[str, ...]
    seconds: float


def _parse_configs(model: nn.Module, configs: str | Sequence[SkipLike]) -> list[SkipConfig]:
    if isinstance(configs, str):
        return model.skip_configs() if configs.strip().lower() == "all" else [model.parse_skip(configs)]
    if not isinstance(configs, Sequence) or not configs:
        raise ValueError(
            f"configs must be 'all' or a non-empty list of skip configurations (e.g. ['base', 'TFT']), got {configs!r}"
        )
    parsed = [model.parse_skip(c) for c in configs]
    return list(dict.fromkeys(parsed))  # each configuration once, in the order given


def _batches(images: torch.Tensor | Iterable, batch_size: int | None) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"batch_size must be an int >= 2 (batch statistics need 2 images), got {batch_size!r}")
        if images.dim() != 4:
            raise ValueError(f"images must be a tensor (N, C, H, W) or an iterable of such batches, got shape "
                             f"{tuple(images.shape)}")
        return images.split(size)
    if batch_size is not None:
        raise ValueError("batch_size applies to a tensor of images; the batches of an iterable are used as they come")
    if not isinstance(images, Iterable):
        raise TypeError(f"images must be a tensor (N, C, H, W) or an iterable of batches, got {type(images).__name__}")
    # (images, labels) pairs, as data loaders and DataSource.train_batches yield them, work too.
    return (b[0] if isinstance(b, (tuple, list)) and b else b for b in images)


def _checked(batches: Iterable, model: ADNModel, device: torch.device) -> Iterator[torch.Tensor]:
    """Each batch as a tensor on ``device``, checked (a tensor, the model's input shape, finite values) before any
    sub-network runs it."""
    seen = 0
    for x in batches:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a batch of images must be a tensor (N, C, H, W), got {type(x).__name__}")
        x = x.to(device)
        model.check_input(x)
        finite = torch.isfinite(x).flatten(1).all(1)
        if not finite.all():  # one NaN image would poison every sub-network's tables
            bad = [seen + int(i) for i in (~finite).nonzero().flatten()]
            raise ValueError(f"calibration images {', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''}"
                             f" (counted from 0) hold NaN or infinite values: fix or drop them; no table was changed")
        seen += x.shape[0]
        yield x


def _joined(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches, each one-image batch joined to the batch before it (the first, to the one after it): batch
    statistics need 2 images, and the last batch of a split or a data loader often holds 1."""
    pending = None
    for x in batches:
        if pending is None:
            pending = x
        elif pending.shape[0] < 2 or x.shape[0] < 2:
            pending = torch.cat([pending, x])
        else:
            yield pending
            pending = x
    if pending is not None:
        yield pending


def calibrate(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    *,
    configs: str | Sequence[SkipLike] = "all",
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CalibrationResult:
    """Measure every BatchNorm's statistics for each sub-network in ``configs`` and store them in the model.

    images: a tensor (N, C, H, W), split into batches of ``batch_size`` (default 256), or an iterable of
        batches (tensors, or (images, labels) pairs), read once. Use un-augmented training images, normalised
        as for training; they are moved to the model's device.
    configs: "all" (the 2^S sub-networks) or the configurations to (re)calibrate (any ``skip`` spelling); the
        rows of other configurations keep their current values.
    progress: called with the number of images done after each batch.
    A batch of one image (the last of a split or of a data loader, often) joins the batch before it.

    Statistics per sub-network: each batch runs through the sub-network with train-mode normalisation (batch
    statistics, as in training); a norm's row is the mean over batches, weighted by elements, of the batch
    mean and of the unbiased batch variance (for equal batches exactly what ``BatchNorm(momentum=None)``
    accumulates). No gradients; ``running_mean``/``running_var`` are not modified; the train/eval mode of
    every module is restored. Returns what was done.
    """
    if not isinstance(model, ADNModel):
        raise TypeError(f"calibrate takes an ADN model (create_model(...)), got {type(model).__name__}")
    norms = subnet_norms(model)
    if not norms:
        if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} normalises with LayerNorm, which has no running statistics (it normalises "
                f"each token by its own statistics): there is nothing to calibrate"
            )
        raise ValueError(f"{type(model).__name__} has no calibratable BatchNorm (SubnetBatchNorm2d)")
    cfgs = _parse_configs(model, configs)
    batches = _batches(images, batch_size)
    p = next(model.parameters())
    num_subnets = norms[0].num_subnets
    stats = {norm: _Statistics(num_subnets, norm) for norm in norms}
    modes = {m: m.training for m in model.modules()}
    done = 0
    start = time.perf_counter()
    model.eval()  # dropout off; the norms normalise with batch statistics through ``statistics``
    for norm in norms:
        norm.statistics = stats[norm]
    try:
        with torch.no_grad():
            for x in _joined(_checked(batches, model, p.device)):
                if x.shape[0] < 2:
                    raise ValueError(f"calibration needs >= 2 images for batch statistics, got {x.shape[0]} in all")
                for cfg in cfgs:
                    model(x, skip=cfg)
                done += x.shape[0]
                if progress is not None:
                    progress(done)
    finally:
        for norm in norms:
            norm.statistics = None
        for m, training in modes.items():
            m.training = training
    if done == 0:
        raise ValueError("calibrate got no images: pass a non-empty tensor (N, C, H, W) or iterable of batches")
    rows = [subnet_index(c) for c in cfgs]
    with torch.no_grad():
        for norm in norms:
            if norm.subnet_mean is None:
                norm.allocate_subnet_table()
            s = stats[norm]
            for j in rows:
                used = s.count[j] > 0
                # A sub-network that does not run this norm keeps the running statistics (the format: models/norms.py).
                norm.subnet_mean[j] = s.mean[j] / s.count[j] if used else norm.running_mean
                norm.subnet_var[j] = s.var[j] / s.count[j] if used else norm.running_var
    return CalibrationResult(images=done, configs=tuple(skip_to_str(c) for c in cfgs),
                             seconds=time.perf_counter() - start)
