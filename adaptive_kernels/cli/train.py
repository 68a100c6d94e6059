"""``python -m adaptive_kernels train``: train any registered model (adn / plain / single mode), single process or
DDP under torchrun; writes OUT/last.pt and OUT/log.jsonl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..models import list_models
from ..models.footprint import check_fits, memory_needed
from ..training.data import build_data
from ..training.distributed import init_distributed, shutdown_distributed
from ..training.trainer import AMP_DTYPES, OPTIMIZERS, SCHEDULES, TrainConfig, Trainer, seed_everything
from .checks import (
    HelpFormatter,
    add_data_args,
    build_model,
    check_batch_size,
    check_data_fits_model,
    check_image_size,
    check_model_args,
    device_name,
    float_range,
    non_negative_float,
    non_negative_int,
    output_dir,
    parse_model_args,
    path_text,
    positive_float,
    positive_int,
    seed_int,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``train`` sub-command."""
    t = sub.add_parser("train", help="train a model", formatter_class=HelpFormatter,
                       description="Train any registered ADN model; multi-GPU: torchrun --nproc_per_node=N "
                                   "-m adaptive_kernels train ...")
    t.add_argument("--model", required=True, help=f"registered model, e.g. resnet20_adn ({', '.join(list_models())})")
    t.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument, repeatable (e.g. width=16)")
    add_data_args(t)
    t.add_argument("--train-subset", type=positive_int, help="train on a fixed random subset of N images")
    t.add_argument("--no-augment", action="store_true", help="no random crops/flips (short runs learn faster)")
    t.add_argument("--out", type=path_text, required=True, help="output folder: last.pt, log.jsonl")
    t.add_argument("--resume", action="store_true", help="continue OUT/last.pt exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="start over even if OUT/last.pt exists")
    t.add_argument("--mode", choices=("adn", "plain", "single"), default="adn",
                   help="adn: self-distillation; plain: super-net CE only; single: one sub-network")
    t.add_argument("--skip", help="sub-network trained by --mode single: base, super or T/F letters")
    c = TrainConfig()
    t.add_argument("--epochs", type=positive_int, required=True, help="length of the run (and of the LR schedule)")
    t.add_argument("--batch-size", type=positive_int, default=c.batch_size,
                   help="GLOBAL batch (split over processes)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=c.optimizer, help="optimizer")
    t.add_argument("--lr", type=positive_float, default=c.lr, help="peak learning rate (> 0)")
    t.add_argument("--momentum", type=float_range(0.0, 1.0, high_open=True), default=c.momentum,
                   help="SGD momentum in [0, 1) (0: plain SGD)")
    t.add_argument("--weight-decay", type=non_negative_float, default=c.weight_decay,
                   help="not applied to norms and biases (0: none)")
    t.add_argument("--schedule", choices=SCHEDULES, default=c.schedule, help="LR schedule after the warmup")
    t.add_argument("--warmup-epochs", type=non_negative_float, default=c.warmup_epochs,
                   help="linear LR warmup, may be fractional (0: none)")
    t.add_argument("--milestones", type=positive_int, nargs="*", default=[],
                   help="multistep: epochs (>= 1) where LR *= gamma")
    t.add_argument("--lr-gamma", type=positive_float, default=c.lr_gamma, help="multistep: LR factor (> 0)")
    t.add_argument("--amp", choices=tuple(AMP_DTYPES), default=c.amp, help="mixed precision (GPU only)")
    t.add_argument("--clip-grad", type=positive_float, help="clip the gradients' global norm to this (> 0)")
    t.add_argument("--ema", type=float_range(0.0, 1.0, low_open=True, high_open=True), metavar="DECAY",
                   help="keep an EMA of the weights, decay in (0, 1), e.g. 0.9998")
    t.add_argument("--alpha", type=float_range(0.0, 1.0), default=c.alpha,
                   help="weight of the super-net CE in [0, 1] (1-alpha: KD)")
    t.add_argument("--temperature", type=positive_float, default=c.temperature, help="distillation temperature")
    t.add_argument("--top-k", type=non_negative_int,
                   help=f"distil over the teacher's top-k classes (0: all classes); default {c.top_k}, all classes "
                        f"when the data has fewer")
    t.add_argument("--feature-kd", type=non_negative_float, default=0.0,
                   help="weight of pooled stage-output distillation (0: off)")
    t.add_argument("--label-smoothing", type=float_range(0.0, 1.0, high_open=True), default=0.0,
                   help="label smoothing in [0, 1)")
    t.add_argument("--mixup", type=non_negative_float, default=0.0, metavar="ALPHA",
                   help="mixup Beta(alpha, alpha) (0: off)")
    t.add_argument("--seed", type=seed_int, default=0, help="seed of the weights, the data order and augmentation")
    t.add_argument("--sync-bn", action="store_true",
                   help="DDP: BatchNorm statistics over the global batch (SyncBatchNorm) instead of per process")
    t.add_argument("--device", type=device_name, default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    t.add_argument("--save-every", type=non_negative_int,
                   help="also checkpoint every N steps (0 or unset: at epoch ends only)")
    t.add_argument("--log-every", type=positive_int, default=c.log_every_steps, help="log every N steps")
    t.add_argument("--eval-every", type=non_negative_int, default=c.eval_every_epochs,
                   help="evaluate every N epochs (0: never)")
    t.add_argument("--time-limit", type=positive_float,
                   help="stop (with a resumable checkpoint) after this many seconds")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    last = out / "last.pt"
    if args.resume and not last.is_file():
        raise ValueError(f"--resume: there is no checkpoint {last} to continue (drop --resume to start a new run)")
    if not args.resume and last.exists() and not args.overwrite:
        raise ValueError(f"{last} exists: pass --resume to continue it, --overwrite to start over, or another --out")
    model_args = parse_model_args(args.model_arg)
    check_model_args(args.model, model_args)
    c = TrainConfig()
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, milestones=tuple(args.milestones), lr_gamma=args.lr_gamma, amp=args.amp,
        clip_grad=args.clip_grad, ema_decay=args.ema, mode=args.mode, skip=args.skip, alpha=args.alpha,
        temperature=args.temperature, top_k=c.top_k if args.top_k is None else args.top_k or None,
        feature_kd=args.feature_kd,
        label_smoothing=args.label_smoothing, mixup_alpha=args.mixup, seed=args.seed, sync_bn=args.sync_bn,
        save_every_steps=args.save_every or None, log_every_steps=args.log_every, eval_every_epochs=args.eval_every,
        time_limit_s=args.time_limit, progress=not args.no_progress,
    )
    env = init_distributed(args.device)
    try:
        with output_dir(out, check=env.is_main):
            data = build_data(args.data, args.data_dir, train_subset=args.train_subset, test_subset=args.test_subset,
                              image_size=args.image_size, num_workers=args.workers, augment=not args.no_augment,
                              seed=args.seed)
            if args.top_k is not None and args.top_k > data.num_classes:
                raise ValueError(f"--top-k {args.top_k}: {data.name} has {data.num_classes} classes; give at most "
                                 f"{data.num_classes} (0: all classes)")
            check_batch_size(args.batch_size, data)
            spec = {"name": args.model, "kwargs": {"num_classes": data.num_classes, "in_chans": data.in_chans,
                                                   **model_args}}
            check_data_fits_model(spec, data.num_classes, data.in_chans, args.data)
            seed_everything(args.seed)  # the same initial weights on every rank and in every rerun
            model = build_model(spec)  # its parameters checked to fit, then its input size and its training:
            check_image_size(model, args.model, min(data.image_size), args.batch_size // env.world_size)
            check_fits(memory_needed(args.model, spec["kwargs"], (args.batch_size, data.in_chans, *data.image_size),
                                     training=True),
                       f"training {args.model} on batches of {args.batch_size} "
                       f"{'x'.join(map(str, data.image_size))} images",
                       "lower --batch-size (or --image-size, --model-arg)")
            if env.is_main and not args.resume and (out / "log.jsonl").exists():
                (out / "log.jsonl").unlink()
            trainer = Trainer(model, data, config, out_dir=out, env=env, model_spec=spec)
            if args.resume:
                trainer.resume(last)
            summary = trainer.fit()
            if env.is_main:
                print(f"checkpoint: {last}\nlog: {out / 'log.jsonl'}")
                if summary["history"]:
                    print("final: " + json.dumps(summary["history"][-1]))
    finally:
        shutdown_distributed()
    return 0
