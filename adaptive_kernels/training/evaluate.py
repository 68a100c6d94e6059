"""Evaluate every sub-network of an ADN model: test accuracy, MACs, measured latency; table and plot."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .._files import atomic_path
from ..engine.base import PROGRESS_EVERY_S
from ..models.skip import SkipConfig, SkipLike, skip_to_str
from .data import DataSource
from .distributed import DistEnv, all_reduce_sum

logger = logging.getLogger(__name__)  # the phases of evaluate_subnets at INFO (the CLI shows them on stderr)


@dataclass(frozen=True)
class SubnetResult:
    """One sub-network: ``skip`` as T/F letters, top-1 ``accuracy`` in percent, ``macs`` per image,
    ``latency_us`` = median wall-clock time of one forward at the measured batch size (of what ``evaluate_subnets``
    timed: its ``latency_model``), and the 20th/80th percentiles of those times (their distance is the measurement's
    spread)."""

    skip: str
    accuracy: float
    macs: int
    latency_us: float
    latency_p20_us: float | None = None
    latency_p80_us: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def accuracy(
    model: nn.Module,
    data: DataSource,
    skip: SkipLike = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    env: DistEnv | None = None,
) -> float:
    """Top-1 accuracy (percent) of sub-network ``skip`` on ``data``'s test split.

    Under DDP each rank scores its share of the test set and the counts are summed over ranks.
    """
    env = env or DistEnv()
    was_training = model.training
    model.eval()
    try:
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for x, y in data.test_batches(batch_size=batch_size, rank=env.rank, world_size=env.world_size, device=device):
            counts[0] += (model(x, skip=skip).argmax(dim=1) == y).sum()
            counts[1] += y.numel()
    finally:
        model.train(was_training)
    correct, total = all_reduce_sum(counts, env).tolist()
    if total == 0:
        raise ValueError(f"{data.name} has an empty test split")
    return 100.0 * correct / total


class LatencyStats(NamedTuple):
    """Wall-clock microseconds of one forward: median and 20th / 80th percentiles over the timed rounds."""

    median_us: float
    p20_us: float
    p80_us: float


@torch.inference_mode()
def measure_latencies_us(
    model: nn.Module,
    skips: Sequence[SkipLike],
    input_shape: tuple[int, int, int, int],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    rounds: int = 30,
) -> list[LatencyStats]:
    """Latency of each sub-network in ``skips`` on an input of ``input_shape`` (N, C, H, W), in eval mode on
    ``device`` (synchronised on CUDA), one ``LatencyStats`` per skip.

    Measured in interleaved rounds: each round runs every sub-network once, starting one later each round.
    On a shared machine the load drifts; measured one after the other, a sub-network timed during a busy
    minute looks slower than a bigger one timed later. Interleaved, every sub-network sees the same drift.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.randn(input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in skips]
    total = warmup + rounds
    started = last = time.perf_counter()
    try:
        for r in range(total):
            for k in range(len(skips)):
                i = (r + k) % len(skips)
                sync()
                t0 = time.perf_counter()
                model(x, skip=skips[i])
                sync()
                if r >= warmup:
                    times[i].append(time.perf_counter() - t0)
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and r + 1 < total:  # a long wait says how long it will be
                last = now
                logger.info("[latency] %d/%d rounds in %.0f s, about %.0f s left", r + 1, total, now - started,
                            (now - started) / (r + 1) * (total - r - 1))
    finally:
        model.train(was_training)
    stats = []
    for t in times:
        q = statistics.quantiles(t, n=5, method="inclusive") if len(t) > 1 else [t[0]] * 4
        stats.append(LatencyStats(statistics.median(t) * 1e6, q[0] * 1e6, q[3] * 1e6))
    return stats


def measure_latency_us(
    model: nn.Module,
    skip: SkipLike,
    input_shape: tuple[int, int, int, int],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 5,
    repeats: int = 30,
) -> float:
    """Median wall-clock microseconds of one forward of sub-network ``skip`` (see ``measure_latencies_us``)."""
    return measure_latencies_us(model, [skip], input_shape, device=device, warmup=warmup, rounds=repeats)[0].median_us


def evaluate_subnets(
    model: nn.Module,
    data: DataSource,
    *,
    device: torch.device | str = "cpu",
    skips: Sequence[SkipLike] | None = None,
    batch_size: int = 500,
    latency_batch: int = 1,
    latency_repeats: int = 30,
    latency_model: nn.Module | None = None,
    env: DistEnv | None = None,
) -> list[SubnetResult]:
    """Accuracy, MACs and latency (``latency_repeats`` interleaved rounds, see ``measure_latencies_us``) of every
    sub-network (``skips``: default all 2^S, super-net first). The latency is that of ``latency_model``, called like
    the model (``(x, skip=...)``; e.g. an engine compiled from it); None: the model itself."""
    configs: list[SkipConfig] = [model.parse_skip(s) for s in skips] if skips is not None else model.skip_configs()
    shape = (latency_batch, data.in_chans, *data.image_size)
    timed = model if latency_model is None else latency_model
    logger.info("[eval] timing %d sub-networks: %d rounds at batch %d ...", len(configs), latency_repeats,
                latency_batch)
    latencies = measure_latencies_us(timed, configs, shape, device=device, rounds=latency_repeats)
    results = []
    for k, (skip, lat) in enumerate(zip(configs, latencies), 1):
        logger.info("[eval] scoring %s (%d/%d) on %d test images ...", skip_to_str(skip), k, len(configs),
                    data.num_test)
        results.append(SubnetResult(
            skip=skip_to_str(skip),
            accuracy=accuracy(model, data, skip, device=device, batch_size=batch_size, env=env),
            macs=model.macs(skip, input_size=data.image_size),
            latency_us=lat.median_us, latency_p20_us=lat.p20_us, latency_p80_us=lat.p80_us,
        ))
    return results


def format_table(
    results: Sequence[SubnetResult], latency_batch: int = 1, as_trained: Mapping[str, float] | None = None
) -> str:
    """A text table, one row per sub-network, largest first. ``as_trained``: {skip: accuracy} of the model before
    calibration, shown in a column before ``results``' (calibrated) accuracy."""
    rows = sorted(results, key=lambda r: -r.macs)
    width = max(len("skip"), *(len(r.skip) for r in rows))
    before = f"  {'as trained %':>12}" if as_trained is not None else ""
    accuracy_head = "calibrated %" if as_trained is not None else "accuracy %"
    head = (f"{'skip':<{width}}{before}  {accuracy_head:>10}  {'MMACs':>8}  "
            f"{f'latency µs (batch {latency_batch})':>24}  {'p20-p80 µs':>19}")
    lines = [head, "-" * len(head)]
    for r in rows:
        before = f"  {as_trained[r.skip]:>12.2f}" if as_trained is not None else ""
        spread = f"{r.latency_p20_us:.1f}-{r.latency_p80_us:.1f}" if r.latency_p20_us is not None else "-"
        lines.append(f"{r.skip:<{width}}{before}  {r.accuracy:>{len(accuracy_head)}.2f}  {r.macs / 1e6:>8.2f}  "
                     f"{r.latency_us:>24.1f}  {spread:>19}")
    return "\n".join(lines)


def require_matplotlib():
    """The matplotlib module, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or adaptive_kernels[plot])") from e
    return matplotlib


#: what the T/F labels of the plot mean (models/skip.py), printed under it
SKIP_KEY = ("labels: one letter per skippable stage, the first stage first; T = that stage's skippable blocks "
            "skipped (its other blocks run), F = run; all F = the super-net, all T = the base-net")


def plot_tradeoff(
    series: Mapping[str, Sequence[SubnetResult]],
    path: str | os.PathLike,
    title: str = "",
    latency_batch: int = 1,
    test_images: int | None = None,
) -> Path:
    """PNG with two panels: accuracy vs MACs and accuracy vs measured latency, one colour per series
    (e.g. {"ADN": [...all sub-networks...], "plain, blocks skipped": [...]}), each point labelled with its skip
    (the key to the letters, ``SKIP_KEY``, under the panels); a line joins each series' Pareto front (no cheaper
    sub-network is more accurate). ``test_images``: how many test images the accuracies are measured on (stated
    on the accuracy axes)."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(series, title, latency_batch, test_images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def tradeoff_figure(series: Mapping[str, Sequence[SubnetResult]], title: str = "", latency_batch: int = 1,
                    test_images: int | None = None):
    """The figure ``plot_tradeoff`` saves (matplotlib's pyplot, already set up by it)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    costs = (lambda r: r.macs / 1e6, lambda r: r.latency_us / 1e3)
    labels: list[list[tuple[float, float, str, str]]] = [[], []]
    for i, (name, results) in enumerate(series.items()):
        color = f"C{i}"
        for k, (ax, cost) in enumerate(zip(axes, costs)):
            rows = sorted(results, key=cost)
            ax.scatter([cost(r) for r in rows], [r.accuracy for r in rows], color=color, label=name, zorder=3,
                       marker="o" if len(rows) > 1 else "s")
            if len(rows) > 1:
                front = _pareto_front(rows, cost)  # the best accuracy for each cost
                ax.plot([cost(r) for r in front], [r.accuracy for r in front], color=color, alpha=0.6)
                labels[k] += [(cost(r), r.accuracy, r.skip, color) for r in rows]
    axes[0].set_xlabel("MMACs per image")
    axes[1].set_xlabel(f"measured latency, ms (batch {latency_batch})")
    on = f" ({test_images} test images)" if test_images is not None else ""
    for ax in axes:
        ax.set_ylabel(f"test accuracy, %{on}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.margins(0.12)  # room for the labels beside the outermost points
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, SKIP_KEY, ha="center", va="bottom", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    for ax, points in zip(axes, labels):
        place_labels(fig, ax, points)
    return fig


# Where a label may go, in points from its point (text anchored at its nearest corner): beside it first, then
# above and below, then farther out.
_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3, 4) for dx, dy in
            ((5, -4), (-5, -4), (5, 4), (-5, 4), (0, 6), (0, -8), (8, 0), (-8, 0))]


def place_labels(fig, ax, points: Sequence[tuple[float, float, str, str]]) -> None:
    """Annotate each (x, y, text, color) of ``points`` at the first offset (``_OFFSETS``) where the label overlaps
    no label placed before, no point's marker and not the legend, inside the axes (else at the first offset): points
    at equal x (sub-networks of equal MACs) get their labels beside, above and below each other. Also labels
    bench/plot.py's panels."""
    fig.canvas.draw()  # fixes limits and transforms: positions in pixels from here on
    renderer = fig.canvas.get_renderer()
    radius = 4.0 * fig.dpi / 72  # a scatter marker's radius (6 pt across) and a little
    markers = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    inside = ax.get_window_extent(renderer)

    def free(box) -> bool:
        if not (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1):
            return False
        if any(box.overlaps(other) for other in taken):
            return False
        return not any(box.x0 - radius < mx < box.x1 + radius and box.y0 - radius < my < box.y1 + radius
                       for mx, my in markers)

    for x, y, text, color in points:
        chosen = None
        for dx, dy in _OFFSETS:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, color=color,
                                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                va="bottom" if dy > 0 else "top" if dy < 0 else "center", zorder=4)
            box = label.get_window_extent(renderer)
            if free(box):
                chosen = (label, box)
                break
            label.remove()
        if chosen is None:  # nowhere free: beside the point, as before
            dx, dy = _OFFSETS[0]
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, color=color,
                                ha="left", va="top", zorder=4)
            chosen = (label, label.get_window_extent(renderer))
        taken.append(chosen[1])


def _pareto_front(rows: Sequence[SubnetResult], cost) -> list[SubnetResult]:
    """The rows, sorted by cost, that are more accurate than every cheaper row."""
    front: list[SubnetResult] = []
    for r in sorted(rows, key=cost):
        if not front or r.accuracy > front[-1].accuracy:
            front.append(r)
    return front
