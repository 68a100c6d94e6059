"""Self-distillation training of ADN models (docs/method.md, "Training step"): losses, the two-pass step, the
trainer (single process or DDP under torchrun), trustworthy checkpoints, offline data and evaluation."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataSource, ImageFolderData, InMemoryImages, build_data, load_fashion_mnist, make_synthetic
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .ema import ModelEMA
from .evaluate import (
    LatencyStats,
    SubnetResult,
    accuracy,
    evaluate_subnets,
    format_table,
    measure_latencies_us,
    measure_latency_us,
    plot_tradeoff,
)
from .losses import classification_loss, distillation_kl, mixup_batch, pooled_feature_kl
from .step import StepConfig, forward_backward, train_step
from .trainer import TrainConfig, Trainer, seed_everything

__all__ = [
    "CheckpointError",
    "DataSource",
    "DistEnv",
    "ImageFolderData",
    "InMemoryImages",
    "LatencyStats",
    "ModelEMA",
    "StepConfig",
    "SubnetResult",
    "TrainConfig",
    "Trainer",
    "accuracy",
    "build_data",
    "classification_loss",
    "distillation_kl",
    "evaluate_subnets",
    "format_table",
    "forward_backward",
    "init_distributed",
    "load_checkpoint",
    "load_fashion_mnist",
    "make_synthetic",
    "measure_latencies_us",
    "measure_latency_us",
    "mixup_batch",
    "plot_tradeoff",
    "pooled_feature_kl",
    "save_checkpoint",
    "seed_everything",
    "shutdown_distributed",
    "train_step",
]
