"""``python -m adaptive_kernels demo``: train a small ResNet-ADN within a time budget, calibrate and evaluate every
sub-network, save table and plot.

The run is sized on the machine it runs on: a few training steps and a test forward are timed first, and the
number of training images and epochs is chosen so that training plus evaluation fit the budget (default
7 minutes on a 2-core CPU, where a step costs two forward and two backward passes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import write_text
from ..engine import select_skip
from ..models.calibration import calibrate
from ..models.skip import skip_to_str
from ..training.data import (
    DEFAULT_CALIBRATION_BATCH,
    DataSource,
    InMemoryImages,
    build_data,
    calibration_batches,
)
from ..training.distributed import DistEnv
from ..training.evaluate import (
    SubnetResult,
    accuracy,
    evaluate_subnets,
    format_table,
    plot_tradeoff,
    require_matplotlib,
)
from ..training.step import StepConfig, train_step
from ..training.trainer import TrainConfig, Trainer, build_optimizer, seed_everything
from .checks import (
    HelpFormatter,
    add_data_args,
    build_model,
    check_batch_size,
    check_image_size,
    faster_thread_count,
    output_dir,
    path_text,
    positive_float,
    positive_int,
    seed_int,
)
from .eval import latency_source

DEMO_MODEL = "resnet20_adn"
MAX_EPOCHS = 15
LATENCY_REPEATS = 30
# Latency of a batch of 64: at batch 1 a CPU spends most of a small net's time in per-layer overheads.
LATENCY_BATCH = 64
# Un-augmented training images for the per-sub-network norm calibration after training.
CALIBRATION_IMAGES = 2048


@dataclass(frozen=True)
class DemoPlan:
    """How the demo spends its budget (all estimates measured on this machine)."""

    width: int
    batch_size: int
    epochs: int
    train_images: int
    test_images: int
    train_img_per_s: float
    est_train_s: float
    est_eval_s: float


def measure_train_speed(
    model: torch.nn.Module, data: DataSource, config: TrainConfig, max_seconds: float = 6.0
) -> float:
    """Training images per second of ``config``'s step on a throw-away copy of ``model`` (one warm-up step,
    then up to 4 timed steps or ``max_seconds``)."""
    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(model, config)
    step = StepConfig(mode=config.mode)
    batches = data.train_batches(0, batch_size=config.batch_size, seed=config.seed)
    timed, start = 0, None
    for i, (x, y) in enumerate(batches):
        train_step(model, optimizer, x, y, step)
        if i == 0:
            start = time.perf_counter()  # the first step pays one-off costs (allocations, kernel selection)
            continue
        timed += 1
        if timed == 4 or time.perf_counter() - start > max_seconds:
            break
    if start is None or timed == 0:
        raise ValueError(f"{data.name}: too few training images to measure a step of batch {config.batch_size}")
    return timed * config.batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def estimate_eval_seconds(model: torch.nn.Module, data: DataSource, num_test: int) -> float:
    """Seconds to calibrate every sub-network on CALIBRATION_IMAGES images, score each twice (as trained,
    calibrated) on ``num_test`` images and time each LATENCY_REPEATS times."""
    model = copy.deepcopy(model).eval()
    x, _ = next(data.test_batches(batch_size=min(256, data.num_test)))
    model(x)
    t0 = time.perf_counter()
    model(x)
    per_image = (time.perf_counter() - t0) / len(x)
    t0 = time.perf_counter()
    model(x[:LATENCY_BATCH])
    latency = time.perf_counter() - t0
    super_macs = model.macs(None, data.image_size)
    relative = sum(model.macs(s, data.image_size) / super_macs for s in model.skip_configs())
    return relative * (per_image * (2 * num_test + CALIBRATION_IMAGES) + latency * (LATENCY_REPEATS + 5))


def plan_demo(
    img_per_s: float, eval_s: float, seconds_left: float, data: DataSource, width: int, batch_size: int,
    epochs: int | None = None, train_images: int | None = None,
) -> DemoPlan:
    """Choose epochs and the training subset: as many distinct images as the time allows (one pass over
    more data beats several passes over less), whole epochs over the full set once it fits (at most
    MAX_EPOCHS). ``epochs``/``train_images`` given by the user are kept."""
    # 10% slack: the measured speed is a few steps' worth, and a shared machine's speed drifts.
    budget_images = 0.9 * max(0.0, seconds_left - eval_s) * img_per_s
    n = data.num_train
    if epochs is None:
        epochs = max(1, min(MAX_EPOCHS, int(budget_images // n)))
    if train_images is None:
        train_images = int(min(n, budget_images // epochs))
    train_images = min(n, max(train_images, batch_size))  # at least one batch, even when the budget is gone
    return DemoPlan(
        width=width, batch_size=batch_size, epochs=epochs, train_images=train_images, test_images=data.num_test,
        train_img_per_s=img_per_s, est_train_s=epochs * train_images / img_per_s, est_eval_s=eval_s,
    )


def budget_choices(results: list[SubnetResult]) -> list[dict[str, Any]]:
    """What a deployment does with the measured table: the sub-network :func:`select_skip` picks for three latency
    budgets, the fastest sub-network's latency, the midpoint and the slowest's (each: budget_us, skip, accuracy,
    latency_us, reliable, doubts).

    A budget holds the median latency. ``reliable`` is False when the measurement's spread could change the pick:
    a more accurate sub-network whose median is over the budget ran within it in at least a fifth of the rounds
    (its 20th percentile fits). ``doubts`` names those sub-networks."""
    latency = {r.skip: r.latency_us for r in results}
    accuracy = {r.skip: r.accuracy for r in results}
    by_skip = {r.skip: r for r in results}
    fastest, slowest = min(latency.values()), max(latency.values())
    choices = []
    for budget in (fastest, (fastest + slowest) / 2, slowest):
        skip = skip_to_str(select_skip(latency, accuracy, budget))
        pick = by_skip[skip]
        doubts = [r.skip for r in results if r.accuracy > pick.accuracy and r.latency_us > budget
                   and r.latency_p20_us is not None and r.latency_p20_us <= budget]
        choices.append({"budget_us": budget, "skip": skip, "accuracy": accuracy[skip], "latency_us": latency[skip],
                        "reliable": not doubts, "doubts": doubts})
    return choices


def run_demo(
    data: InMemoryImages,
    out_dir: str | os.PathLike,
    *,
    budget_s: float = 420.0,
    width: int = 8,
    batch_size: int = 64,
    epochs: int | None = None,
    train_images: int | None = None,
    seed: int = 0,
    progress: bool = True,
    choose_threads: bool = True,
    started: float | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``DEMO_MODEL`` (ADN self-distillation) on ``data`` within ``budget_s`` seconds counted from
    ``started`` (``time.perf_counter()``; default now), score all sub-networks, calibrate their norms
    (``adaptive_kernels.calibrate`` on CALIBRATION_IMAGES training images), evaluate them, write into ``out_dir``:
    ``last.pt`` (checkpoint as trained), ``calibrated.pt``, ``log.jsonl``, ``subnets.json`` (list of {skip,
    accuracy (calibrated), accuracy_as_trained, macs, latency_us}), ``summary.json`` and ``tradeoff.png``. With ``choose_threads``, the faster of torch's thread count and one
    thread is used. Returns the summary."""
    started = time.perf_counter() if started is None else started
    require_matplotlib()  # fail now, not after minutes of training
    out_dir = Path(out_dir)
    (out_dir / "log.jsonl").unlink(missing_ok=True)  # a rerun into the same folder starts a fresh log
    seed_everything(seed)
    spec = {"name": DEMO_MODEL, "kwargs": {"num_classes": data.num_classes, "in_chans": data.in_chans, "width": width}}
    model = build_model(spec, "--width")
    check_image_size(model, DEMO_MODEL, min(data.image_size), batch_size)
    base_config = {
        "batch_size": batch_size, "lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine", "mode": "adn",
        "seed": seed, "eval_every_epochs": 0, "progress": progress, "log_every_steps": 10, "warmup_epochs": 0.1,
    }

    threads = torch.get_num_threads()
    echo(f"[demo] measuring this machine ({threads} thread{'s' * (threads != 1)}): {DEMO_MODEL} width {width}, "
         f"batch {batch_size}, two forward + two backward passes per step ...")

    def speed() -> float:
        return measure_train_speed(model, data, TrainConfig(epochs=1, **base_config))

    img_per_s = faster_thread_count(speed, echo) if choose_threads else speed()
    full_eval_s = estimate_eval_seconds(model, data, data.num_test)
    seconds_left = budget_s - (time.perf_counter() - started) - 3.0  # 3 s: checkpoint, JSON, plot
    # Evaluation may take at most a third of what is left; score a test subset on a slow machine.
    test_images, eval_s = data.num_test, full_eval_s
    if full_eval_s > seconds_left / 3:
        test_images = max(min(data.num_test, 500), int(data.num_test * (seconds_left / 3) / full_eval_s))
        eval_s = full_eval_s * test_images / data.num_test
        data = data.subset(num_test=test_images)
    plan = plan_demo(img_per_s, eval_s, seconds_left, data, width, batch_size, epochs, train_images)
    echo(
        f"[demo] {img_per_s:.0f} training images/s -> {plan.epochs} epoch(s) over {plan.train_images} of "
        f"{data.num_train} training images (~{plan.est_train_s:.0f} s), then all {2 ** model.num_skippable_stages} "
        f"sub-networks on {plan.test_images} test images (~{plan.est_eval_s:.0f} s)"
    )
    train_data = data.subset(num_train=plan.train_images) if plan.train_images < data.num_train else data
    config = TrainConfig(
        epochs=plan.epochs,
        # Safety net when the machine gets slower than measured: stop (and still evaluate) on time.
        time_limit_s=max(1.0, (budget_s - (time.perf_counter() - started) - eval_s - 3.0)),
        **base_config,
    )
    trainer = Trainer(model, train_data, config, out_dir=out_dir, env=DistEnv(), model_spec=spec, echo=echo)
    summary = trainer.fit()
    if summary["stopped_early"]:
        echo("[demo] the time budget ran out before the planned epochs ended; evaluating the model as it is")

    model = trainer.eval_model
    echo(f"[demo] scoring every sub-network as trained on {data.num_test} test images ...")
    as_trained = {skip_to_str(s): accuracy(model, data, s) for s in model.skip_configs()}
    calibration = calibrate(model, calibration_batches(train_data, CALIBRATION_IMAGES, DEFAULT_CALIBRATION_BATCH))
    trainer.save(out_dir / "calibrated.pt", extra={"calibration": {  # as `calibrate` records it
        "images": calibration.images, "batch_size": DEFAULT_CALIBRATION_BATCH, "data": data.name,
        "weights": "model" if trainer.ema is None else "ema", "seconds": round(calibration.seconds, 1)}})
    echo(f"[demo] calibrated the norms of every sub-network on {calibration.images} training images "
         f"({calibration.seconds:.1f} s); evaluating the calibrated sub-networks ...")
    timed = latency_source(model, (LATENCY_BATCH, data.in_chans, *data.image_size), "cpu")
    results = evaluate_subnets(model, data, latency_batch=LATENCY_BATCH, latency_repeats=LATENCY_REPEATS,
                               latency_model=timed)
    table = format_table(results, latency_batch=LATENCY_BATCH, as_trained=as_trained)
    echo(table)
    rows = [{**r.to_dict(), "accuracy_as_trained": as_trained[r.skip]} for r in results]
    write_text(out_dir / "subnets.json", json.dumps(rows, indent=1) + "\n")
    selections = budget_choices(results)
    for c in selections:
        echo(f"[demo] latency budget {c['budget_us']:.0f} us (batch {LATENCY_BATCH}) -> select_skip picks "
             f"{c['skip']}: {c['accuracy']:.2f} % in {c['latency_us']:.0f} us")
        if not c["reliable"]:
            echo(f"[demo]   unreliable pick: the latency spread (p20-p80) of {', '.join(c['doubts'])} crosses "
                 f"this budget; measure on an idle machine (or with more --latency-repeats in eval)")
    trained_results = [SubnetResult(r.skip, as_trained[r.skip], r.macs, r.latency_us) for r in results]
    plot = plot_tradeoff(
        {f"{DEMO_MODEL} width {width}, calibrated": results, "as trained (not calibrated)": trained_results},
        out_dir / "tradeoff.png",
        title=f"{DEMO_MODEL} on {data.name}: {plan.epochs} epoch(s) x {plan.train_images} images, "
              f"CPU, {torch.get_num_threads()} thread(s)",
        latency_batch=LATENCY_BATCH, test_images=data.num_test,
    )
    result = {
        "model": spec, "data": data.name, "plan": asdict(plan), "subnets": rows,
        "calibration": {"images": calibration.images, "seconds": round(calibration.seconds, 1)},
        "train_seconds": round(summary["train_seconds"], 1), "stopped_early": summary["stopped_early"],
        "total_seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "latency_batch": LATENCY_BATCH, "selections": selections,
    }
    write_text(out_dir / "summary.json", json.dumps(result, indent=1) + "\n")
    echo(f"[demo] done in {result['total_seconds']:.0f} s. Outputs in {out_dir.resolve()}:")
    for name in ("last.pt", "calibrated.pt", "subnets.json", "summary.json", plot.name, "log.jsonl"):
        echo(f"  {out_dir / name}")
    echo(f"  evaluate again (same thread count): {shlex.quote(sys.executable)} -m adaptive_kernels eval --checkpoint {out_dir / 'calibrated.pt'} "
         f"--data {data.name} --threads {torch.get_num_threads()}")
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``demo`` sub-command."""
    d = sub.add_parser("demo", help="the 7-minute CPU demo on Fashion-MNIST", formatter_class=HelpFormatter,
                       description="Train a ResNet-20-ADN within a time budget, evaluate every sub-network, "
                                   "write checkpoint, table and plot.")
    add_data_args(d, default="fashion-mnist", auto_threads=True)
    d.add_argument("--out", type=path_text, default="demo_out", help="output folder")
    d.add_argument("--budget-seconds", type=positive_float, default=420.0,
                   help="total time to aim at (7 minutes), measuring and evaluating included")
    d.add_argument("--width", type=positive_int, default=8, help="base channels of the ResNet-20-ADN")
    d.add_argument("--batch-size", type=positive_int, default=64, help="training batch")
    d.add_argument("--epochs", type=positive_int, help="override the planned number of epochs")
    d.add_argument("--train-subset", type=positive_int, help="override the planned number of training images")
    d.add_argument("--seed", type=seed_int, default=0, help="seed of the weights, the data order and the subsets")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.data == "imagefolder":
        raise ValueError("the demo trains on in-memory data: --data fashion-mnist (default) or synthetic")
    with output_dir(args.out):
        # No augmentation: within one or two epochs random crops and flips slow learning down (measured: -4 points).
        data = build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                          augment=False, seed=args.seed)
        check_batch_size(args.batch_size, data)
        if args.train_subset is not None and not args.batch_size <= args.train_subset <= data.num_train:
            raise ValueError(f"--train-subset {args.train_subset}: give from --batch-size ({args.batch_size}) to "
                             f"{data.num_train} ({data.name}'s training images)")
        run_demo(
            data, args.out, budget_s=args.budget_seconds, width=args.width, batch_size=args.batch_size,
            epochs=args.epochs, train_images=args.train_subset, seed=args.seed, progress=not args.no_progress,
            choose_threads=args.threads == "auto", started=started,
        )
    return 0
