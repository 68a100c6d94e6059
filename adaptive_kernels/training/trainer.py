"""The training loop: optimizer, LR schedule, AMP, clipping, EMA, progress, JSON-lines logs, checkpoints,
exact resume and DDP.

Exact resume: a checkpoint holds model, optimizer, scheduler, GradScaler and EMA states, the position
(epoch, step in epoch, global step) and every RNG state of every rank. Data order and augmentation depend
only on (seed, epoch) and mixup's λ only on (seed, epoch, step), so a run resumed from any step — also in
the middle of an epoch — repeats the uninterrupted run exactly (ImageFolder too: its augmentation is drawn per
sample from (seed, epoch, index); see ``data.py``), given the same number of processes.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import remove_stale_temp_files, write_text
from ..models.skip import parse_skip, skip_to_str
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .data import DataSource
from .distributed import DistEnv, broadcast_buffers, broadcast_flag, gather_objects, wrap_model
from .ema import ModelEMA
from .evaluate import accuracy
from .losses import mixup_batch
from .step import StepConfig, train_step

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``batch_size`` is the GLOBAL batch (split over DDP ranks).

    The fields in ``RUN_CONTROL_FIELDS`` only steer this invocation (length, logging, saving) and may differ
    when resuming; all others must match the checkpoint's.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    amp: str = "none"
    clip_grad: float | None = None
    ema_decay: float | None = None
    mode: str = "adn"
    skip: str | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    top_k: int | None = 500
    feature_kd: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    seed: int = 0
    sync_bn: bool = False
    save_every_steps: int | None = None
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    eval_batch_size: int = 500
    time_limit_s: float | None = None
    stop_at_step: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "lr_gamma", "clip_grad", "ema_decay", "alpha",
                     "temperature", "feature_kd", "label_smoothing", "mixup_alpha", "time_limit_s"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}={value} must be a finite number")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp={self.amp!r}: use one of {', '.join(AMP_DTYPES)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_epochs >= 0")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g} (--warmup-epochs) must be below epochs={self.epochs}: "
                             f"the learning rate would never reach its peak; lower --warmup-epochs or raise --epochs")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad={self.clip_grad} must be > 0 (or None: no clipping)")
        if self.eval_every_epochs < 0:
            raise ValueError(
                f"eval_every_epochs={self.eval_every_epochs} must be >= 0 (0 = no evaluation while training)"
            )
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha={self.mixup_alpha} must be >= 0 (0 = off)")
        if self.milestones and self.schedule != "multistep":
            raise ValueError(f"milestones={list(self.milestones)} (--milestones) apply only to schedule 'multistep'; "
                             f"schedule {self.schedule!r} ignores them: drop them, or use --schedule multistep")
        if self.skip is not None and self.mode != "single":
            trains = "every sub-network" if self.mode == "adn" else "the super-net"
            raise ValueError(f"skip={self.skip!r} (--skip) applies only to mode 'single', the one sub-network it trains; "
                             f"mode {self.mode!r} trains {trains}: drop --skip, or use --mode single")
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ValueError(f"milestones={list(self.milestones)} (--milestones): {late[0]} is not below epochs="
                             f"{self.epochs}, so the run ends before it applies; give epochs where the LR should drop")
        self.milestones = tuple(int(m) for m in self.milestones)


# What resume needs beyond the weights (a hand-made or weights-only checkpoint lacks them).
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "rng", "config")

RUN_CONTROL_FIELDS = frozenset({
    "epochs", "save_every_steps", "log_every_steps", "eval_every_epochs", "eval_batch_size",
    "time_limit_s", "stop_at_step", "progress",
})


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). Call before building the model for a reproducible init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on norm weights and biases (every parameter with ndim <= 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine to 0 / step decay / flat."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    if config.schedule == "multistep":
        return config.lr_gamma ** sum(step >= m * steps_per_epoch for m in config.milestones)
    return 1.0


class JsonlLog:
    """Appends one JSON object per line to ``path`` (nothing when ``path`` is None)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def truncate_after(self, global_step: int) -> None:
        """Drop the records of steps after ``global_step`` (written before a kill, after the checkpoint that a
        resume continues from: the resumed run writes them again) and a partly written last line."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("global_step", 0) <= global_step:
                kept.append(line + "\n")
        write_text(self.path, "".join(kept))


class Trainer:
    """Trains an ADN model (``config.mode``: adn / plain / single) on a ``DataSource``.

    ``out_dir`` receives ``last.pt`` (after every epoch, every ``save_every_steps`` steps and when a run stops
    early) and ``log.jsonl``; ``None`` writes nothing. ``model_spec`` (``{"name": ..., "kwargs": {...}}``,
    what ``create_model`` needs) is stored in checkpoints so that ``eval`` can rebuild the model.
    Under DDP (``env.distributed``) every rank builds a Trainer; only rank 0 logs and writes files.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSource,
        config: TrainConfig,
        *,
        out_dir: str | os.PathLike | None = None,
        env: DistEnv | None = None,
        model_spec: dict[str, Any] | None = None,
        echo: Callable[[str], None] = print,
    ):
        self.env = env or DistEnv()
        self.config = config
        self.data = data
        self.model_spec = model_spec
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = self.env.device
        self._echo = echo
        if getattr(model, "num_skippable_stages", None) is None:
            raise TypeError(f"{type(model).__name__} is not an ADN model (no num_skippable_stages)")
        skip = None
        if config.mode == "single":
            if config.skip is None:
                raise ValueError("mode 'single' needs the sub-network to train: --skip CFG (e.g. base or TFT)")
            skip = parse_skip(config.skip, model.num_skippable_stages)
            config.skip = skip_to_str(skip)  # one spelling, so that resume compares like with like
        self.step_config = StepConfig(
            mode=config.mode, alpha=config.alpha, temperature=config.temperature, top_k=config.top_k,
            feature_kd=config.feature_kd, label_smoothing=config.label_smoothing, skip=skip,
        )
        self.autocast_dtype = AMP_DTYPES[config.amp]
        if self.autocast_dtype is not None and self.device.type != "cuda":
            raise ValueError(f"amp={config.amp!r} is for GPUs only and this run is on {self.device}: use amp='none'")
        if config.sync_bn and self.env.distributed and self.device.type != "cuda":
            raise ValueError(
                f"sync_bn: torch's SyncBatchNorm runs on GPUs only and this run is on {self.device}: drop --sync-bn"
            )
        self.steps_per_epoch = data.steps_per_epoch(config.batch_size, self.env.world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{data.name} has {data.num_train} training images, fewer than one global batch of "
                f"{config.batch_size}: lower the batch size"
            )
        # Stochastic layers (dropout, drop-path) draw from the global RNGs: give each rank its own stream.
        seed_everything(config.seed + self.env.rank)
        if config.sync_bn and self.env.distributed:
            # BatchNorm statistics over the global batch: the DDP run then trains like one process would.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif config.sync_bn:
            self._say("note: sync_bn has no effect in one process (BatchNorm already sees the whole batch)")
        self.model = model.to(self.device)
        self.net = wrap_model(self.model, self.env)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config, self.steps_per_epoch)
        )
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        self.ema = ModelEMA(self.model, config.ema_decay) if config.ema_decay is not None else None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.log = JsonlLog(self.out_dir / "log.jsonl" if self.out_dir is not None and self.env.is_main else None)
        if self.checkpoint_path is not None and self.env.is_main:
            removed = remove_stale_temp_files(self.checkpoint_path)
            if removed:
                self._say(f"removed {len(removed)} partial checkpoint file(s) left by an interrupted save: "
                          f"{', '.join(p.name for p in removed)}")

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "last.pt" if self.out_dir is not None else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and ship: the EMA when enabled, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    def eval_skips(self) -> dict[str, tuple[bool, ...]]:
        """The sub-networks evaluated during training: what this mode trains."""
        s = self.model.num_skippable_stages
        if self.config.mode == "single":
            return {"single": self.step_config.skip}
        if self.config.mode == "plain":
            return {"super": (False,) * s}
        return {"super": (False,) * s, "base": (True,) * s}

    def evaluate(self) -> dict[str, float]:
        """Test accuracy (percent) of the trained sub-networks, e.g. ``{"acc_super": 91.2, "acc_base": 90.1}``."""
        broadcast_buffers(self.model, self.env)
        return {
            f"acc_{name}": accuracy(self.eval_model, self.data, skip, device=self.device,
                                    batch_size=self.config.eval_batch_size, env=self.env)
            for name, skip in self.eval_skips().items()
        }

    def fit(self) -> dict[str, Any]:
        """Train until ``config.epochs`` are done (or ``stop_at_step`` / ``time_limit_s`` is reached).

        Returns ``{"epochs_done", "global_step", "stopped_early", "train_seconds", "history"}``.
        """
        cfg = self.config
        start = time.perf_counter()
        stopped = False
        if self.epoch >= cfg.epochs:
            self._say(
                f"nothing to train: the run already completed {self.epoch} epoch(s) and epochs is {cfg.epochs}; "
                f"pass a larger --epochs to train longer"
            )
            return {"epochs_done": self.epoch, "global_step": self.global_step, "stopped_early": False,
                    "train_seconds": 0.0, "history": self.history}
        self._say(
            f"training {type(self.model).__name__} ({self.config.mode}) on {self.data.name}: "
            f"{self.data.num_train} images, {self.steps_per_epoch} steps/epoch of {cfg.batch_size}, "
            f"epochs {self.epoch + 1}..{cfg.epochs}, {self.env.world_size} process(es) on {self.device}"
        )
        self.model.train()
        while self.epoch < cfg.epochs and not stopped:
            stopped = self._train_epoch(start)
            if stopped:
                break
            self.epoch += 1
            self.step_in_epoch = 0
            if cfg.eval_every_epochs > 0 and (self.epoch % cfg.eval_every_epochs == 0 or self.epoch == cfg.epochs):
                metrics = self.evaluate()
                record = {"epoch": self.epoch, "global_step": self.global_step, **metrics}
                self.history.append(record)
                self.log.write(event="eval", **record)
                self._say(f"epoch {self.epoch}/{cfg.epochs}: " + ", ".join(f"{k} {v:.2f}%" for k, v in metrics.items()))
            self.save()
        if stopped:
            self.save()
            self._say(f"stopped at epoch {self.epoch + 1}, step {self.step_in_epoch}; resume continues from there")
        return {
            "epochs_done": self.epoch, "global_step": self.global_step, "stopped_early": stopped,
            "train_seconds": time.perf_counter() - start, "history": self.history,
        }

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly. Collective under DDP (gathers every rank's RNG state)."""
        rng = gather_objects(capture_rng_state(), self.env)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "config": asdict(self.config),
            "model_spec": self.model_spec,
            "data": self.data.describe(),
            "rng": rng,
            "world_size": self.env.world_size,
            "history": self.history,
        }

    def save(self, path: str | os.PathLike | None = None, extra: dict | None = None) -> Path | None:
        """Write a checkpoint (rank 0; default ``out_dir/last.pt``), with ``extra``'s entries beside the trainer's
        (e.g. ``calibration``). Every rank must call it under DDP."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            return None
        broadcast_buffers(self.model, self.env)
        state = {**self.state_dict(), **(extra or {})}
        if self.env.is_main:
            save_checkpoint(state, path)
            self.log.write(event="checkpoint", path=str(path), epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                           global_step=self.global_step)
        return path

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Restore everything from a checkpoint (default ``out_dir/last.pt``) so that ``fit`` continues exactly.

        Raises ``CheckpointError`` when the file is unusable or was made with a different configuration.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("resume needs a checkpoint path (or an out_dir holding last.pt)")
        state = load_checkpoint(path, map_location=self.device)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"cannot resume from {path}: it lacks {', '.join(missing)} (weights only, not a training state "
                f"written by train); start a new run in another output folder, or evaluate it"
            )
        self._check_compatible(state, path)
        load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.history = list(state.get("history", []))
        rngs = state["rng"]
        restore_rng_state(rngs[self.env.rank % len(rngs)])
        self.log.truncate_after(self.global_step)
        self.log.write(event="resume", path=str(path), epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                       global_step=self.global_step)
        self._say(f"resumed {path}: epoch {self.epoch + 1}, step {self.step_in_epoch}, global step {self.global_step}")

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        # A field the checkpoint predates had its default value then.
        saved = {**asdict(TrainConfig()), **state.get("config", {})}
        now = asdict(self.config)
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
            for k in now
            if k not in RUN_CONTROL_FIELDS and _normalise(saved.get(k)) != _normalise(now[k])
        ]
        if self.model_spec is not None and state.get("model_spec") not in (None, self.model_spec):
            diffs.append(f"model: checkpoint {state['model_spec']} vs now {self.model_spec}")
        saved_data, data = state.get("data", {}), self.data.describe()
        diffs += [f"data {k}: checkpoint {saved_data[k]!r} vs now {data[k]!r}"
                  for k in ("name", "num_classes", "in_chans", "image_size", "num_train", "augment")
                  if k in saved_data and k in data and _normalise(saved_data[k]) != _normalise(data[k])]
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with different settings ({'; '.join(diffs)}). "
                f"Pass the same options, or use a new output folder to start over"
            )
        if saved.get("epochs") != now["epochs"]:
            self._say(f"note: epochs changed {saved.get('epochs')} -> {now['epochs']}; the LR schedule is stretched")
        saved_world = state.get("world_size", 1)
        if saved_world != self.env.world_size:
            self._say(
                f"warning: world_size: checkpoint {saved_world} vs now {self.env.world_size} process(es); the global "
                f"batches stay the same but per-process BatchNorm statistics (without sync_bn) and dropout streams "
                f"do not, so the run will not repeat the uninterrupted one exactly"
            )

    # ---- internals --------------------------------------------------------------------------------------
    def _train_epoch(self, run_start: float) -> bool:
        """Train the rest of the current epoch; True when stopped early (step or time limit)."""
        cfg, env = self.config, self.env
        batches = self.data.train_batches(
            self.epoch, batch_size=cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
            start_step=self.step_in_epoch, device=self.device,
        )
        bar = _progress_bar(
            cfg.progress and env.is_main, total=self.steps_per_epoch, initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
        )
        window_start, window_images = time.perf_counter(), 0
        try:
            for images, labels in batches:
                targets = labels
                if cfg.mixup_alpha > 0:
                    rng = np.random.default_rng([cfg.seed, self.epoch, self.step_in_epoch])
                    images, targets = mixup_batch(images, labels, self.data.num_classes, cfg.mixup_alpha, rng,
                                                  cfg.label_smoothing)
                losses = train_step(
                    self.net, self.optimizer, images, targets, self.step_config, scaler=self.scaler,
                    autocast_dtype=self.autocast_dtype, clip_grad=cfg.clip_grad,
                )
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step_in_epoch += 1
                self.global_step += 1
                window_images += cfg.batch_size
                if bar is not None:
                    bar.update(1)
                if self.global_step % cfg.log_every_steps == 0 or self.step_in_epoch == self.steps_per_epoch:
                    elapsed = time.perf_counter() - window_start
                    record = {k: round(v.item(), 5) for k, v in losses.items()}
                    record.update(lr=self.scheduler.get_last_lr()[0], img_per_s=round(window_images / elapsed, 1))
                    self.log.write(event="train", epoch=self.epoch + 1, step=self.step_in_epoch,
                                   global_step=self.global_step, **record)
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()}, refresh=False)
                    window_start, window_images = time.perf_counter(), 0
                if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self.save()
                if self._should_stop(run_start):
                    return True
        finally:
            if bar is not None:
                bar.close()
        return False

    def _should_stop(self, run_start: float) -> bool:
        cfg = self.config
        if cfg.stop_at_step is not None and self.global_step >= cfg.stop_at_step:
            return True
        if cfg.time_limit_s is None:
            return False
        # Rank 0's clock decides, so that all ranks stop after the same step.
        return broadcast_flag(time.perf_counter() - run_start >= cfg.time_limit_s, self.env)

    def _say(self, message: str) -> None:
        if self.env.is_main:
            self._echo(message)


def _normalise(value: Any) -> Any:
    # Checkpoints store tuples as lists after a round trip through some tools; compare them alike.
    return list(value) if isinstance(value, tuple) else value


class PlainProgress:
    """Progress as a few whole lines (every tenth of the epoch and at its end) for logs and pipes, where tqdm's
    carriage returns pile up into one huge line. Implements the part of tqdm's interface the trainer uses."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", file=None):
        self.total, self.n, self.desc = total, initial, desc
        self.file = file if file is not None else sys.stderr
        self.every = max(1, total // 10)
        self.postfix: dict[str, str] = {}
        self.started, self.start_n = time.perf_counter(), initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            rate = (self.n - self.start_n) / max(time.perf_counter() - self.started, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: step {self.n}/{self.total}, {rate:.2f} step/s{extra}", file=self.file, flush=True)

    def set_postfix(self, values: dict[str, str], refresh: bool = False) -> None:
        self.postfix = dict(values)

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return PlainProgress(kwargs["total"], kwargs.get("initial", 0), kwargs.get("desc", ""))
    from tqdm import tqdm

    return tqdm(unit="step", dynamic_ncols=True, leave=True, **kwargs)

