"""Adaptive Depth Networks: python -m adaptive_kernels {demo,train,eval} (also the adaptive-kernels script).

  demo   train a small ResNet-ADN on Fashion-MNIST within a time budget (default 7 minutes on 2 CPU cores),
         evaluate every sub-network, print the table, save checkpoint, JSON and plot
  train  train any registered model (adn / plain / single mode); multi-GPU: torchrun --nproc_per_node=N -m
         adaptive_kernels train ...
  eval   accuracy, MACs and measured latency of every sub-network of a checkpoint
  calibrate  per-sub-network BatchNorm statistics of a checkpoint (every mixed sub-network usable)
  export ONNX (every sub-network in one graph) or torch.export file, checked against the model

Run adaptive-kernels COMMAND --help for a command's options.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from . import __version__
from ._ext import EXT_ERROR, HAS_EXT
from .cli_checks import (
    ArgumentParser,
    HelpFormatter,
    build_model,
    check_data_fits_model,
    check_model_args,
    check_output_dir,
    check_output_file,
    device_name,
    float_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_error,
    seed_int,
)
from .export.cli import add_export_parser
from .models import list_models
from .training.calibration_cli import add_calibrate_command
from .training.checkpoint import load_checkpoint, model_from_checkpoint
from .training.data import DATASETS, build_data
from .training.distributed import init_distributed, resolve_device, shutdown_distributed
from .training.evaluate import evaluate_subnets, format_table
from .training.trainer import AMP_DTYPES, OPTIMIZERS, SCHEDULES, TrainConfig, Trainer, seed_everything


def _model_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg {pair!r}: write KEY=VALUE, e.g. --model-arg width=16")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _add_data_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--data", choices=DATASETS, default=default, required=default is None, help="dataset")
    p.add_argument("--data-dir", help="dataset folder (fashion-mnist: the IDX files, default "
                   "/usr/share/datasets/fashion-mnist; imagefolder: ROOT with train/ and val/)")
    p.add_argument("--test-subset", type=positive_int, help="score on a fixed random subset of N test images")
    p.add_argument("--image-size", type=positive_int,
                   help="imagefolder crop size (default 224) / synthetic size (16)")
    p.add_argument("--workers", type=non_negative_int, default=4,
                   help="imagefolder DataLoader worker processes (0: load in the main process)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaptive-kernels", description=__doc__, formatter_class=HelpFormatter)
    extension = "built" if HAS_EXT else f"not available: {EXT_ERROR}"
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__} (torch {torch.__version__}; CUDA extension {extension})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    d = sub.add_parser("demo", help="the 7-minute CPU demo on Fashion-MNIST", formatter_class=HelpFormatter,
                       description="Train a ResNet-20-ADN within a time budget, evaluate every sub-network, "
                                   "write checkpoint, table and plot.")
    _add_data_args(d, default="fashion-mnist")
    d.add_argument("--out", default="demo_out", help="output folder")
    d.add_argument("--budget-seconds", type=positive_float, default=420.0,
                   help="total time to aim at (7 minutes), measuring and evaluating included")
    d.add_argument("--width", type=positive_int, default=8, help="base channels of the ResNet-20-ADN")
    d.add_argument("--batch-size", type=positive_int, default=64, help="training batch")
    d.add_argument("--epochs", type=positive_int, help="override the planned number of epochs")
    d.add_argument("--train-subset", type=positive_int, help="override the planned number of training images")
    d.add_argument("--seed", type=seed_int, default=0, help="seed of the weights, the data order and the subsets")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model", formatter_class=HelpFormatter,
                       description="Train any registered ADN model; multi-GPU: torchrun --nproc_per_node=N "
                                   "-m adaptive_kernels train ...")
    t.add_argument("--model", required=True, help=f"registered model, e.g. resnet20_adn ({', '.join(list_models())})")
    t.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument, repeatable (e.g. width=16)")
    _add_data_args(t)
    t.add_argument("--train-subset", type=positive_int, help="train on a fixed random subset of N images")
    t.add_argument("--no-augment", action="store_true", help="no random crops/flips (short runs learn faster)")
    t.add_argument("--out", required=True, help="output folder: last.pt, log.jsonl")
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
    t.add_argument("--top-k", type=non_negative_int, default=c.top_k,
                   help="distil over the teacher's top-k classes (0: all classes)")
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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate every sub-network of a checkpoint", formatter_class=HelpFormatter,
                       description="Accuracy, MACs and measured latency of every sub-network of a checkpoint.")
    e.add_argument("--checkpoint", required=True, help="a last.pt written by train or demo")
    _add_data_args(e)
    e.add_argument("--json", help="also write [{skip, accuracy, macs, latency_us, ...}, ...] to this file")
    e.add_argument("--batch-size", type=positive_int, default=500, help="accuracy batch size")
    e.add_argument("--latency-batch", type=positive_int, default=64,
                   help="batch size of the latency measurement (at batch 1 a CPU mostly measures per-layer "
                        "overheads)")
    e.add_argument("--latency-repeats", type=positive_int, default=30,
                   help="timed rounds; each round runs every sub-network once")
    e.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="auto: the EMA weights when the checkpoint has them")
    e.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda / cuda:N")
    e.set_defaults(func=cmd_eval)
    add_export_parser(sub, _model_args)
    add_calibrate_command(sub, _add_data_args)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from .training.demo import run_demo

    started = time.perf_counter()
    if args.data == "imagefolder":
        raise ValueError("the demo trains on in-memory data: --data fashion-mnist (default) or synthetic")
    check_output_dir(args.out, "--out")
    # No augmentation: within one or two epochs random crops and flips slow learning down (measured: -4 points).
    data = build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                      augment=False, seed=args.seed)
    run_demo(
        data, args.out, budget_s=args.budget_seconds, width=args.width, batch_size=args.batch_size,
        epochs=args.epochs, train_images=args.train_subset, seed=args.seed, progress=not args.no_progress,
        choose_threads=args.threads is None, started=started,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    last = out / "last.pt"
    if args.resume and not last.is_file():
        raise ValueError(f"--resume: there is no checkpoint {last} to continue (drop --resume to start a new run)")
    if not args.resume and last.exists() and not args.overwrite:
        raise ValueError(f"{last} exists: pass --resume to continue it, --overwrite to start over, or another --out")
    model_args = _model_args(args.model_arg)
    check_model_args(args.model, model_args)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, milestones=tuple(args.milestones), lr_gamma=args.lr_gamma, amp=args.amp,
        clip_grad=args.clip_grad, ema_decay=args.ema, mode=args.mode, skip=args.skip, alpha=args.alpha,
        temperature=args.temperature, top_k=args.top_k or None, feature_kd=args.feature_kd,
        label_smoothing=args.label_smoothing, mixup_alpha=args.mixup, seed=args.seed, sync_bn=args.sync_bn,
        save_every_steps=args.save_every or None, log_every_steps=args.log_every, eval_every_epochs=args.eval_every,
        time_limit_s=args.time_limit, progress=not args.no_progress,
    )
    env = init_distributed(args.device)
    # the folders check_output_dir is about to create, removed again if the run fails before writing into them
    made = [d for d in (out, *out.parents) if not d.exists()] if env.is_main else []
    try:
        if env.is_main:
            check_output_dir(out, "--out")
        data = build_data(args.data, args.data_dir, train_subset=args.train_subset, test_subset=args.test_subset,
                          image_size=args.image_size, num_workers=args.workers, augment=not args.no_augment,
                          seed=args.seed)
        spec = {"name": args.model, "kwargs": {"num_classes": data.num_classes, "in_chans": data.in_chans,
                                               **model_args}}
        check_data_fits_model(spec, data.num_classes, data.in_chans, args.data)
        seed_everything(args.seed)  # the same initial weights on every rank and in every rerun
        model = build_model(spec)
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
    except BaseException:
        for d in made:  # innermost first; a folder that got files is kept
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        shutdown_distributed()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)  # a corrupt or missing file is reported before the data is read
    data = build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                      num_workers=args.workers)
    model, state, weights = model_from_checkpoint(args.checkpoint, state=state, weights=args.weights, data=data)
    spec, kwargs = state["model_spec"], state["model_spec"]["kwargs"]
    model.to(device)
    results = evaluate_subnets(model, data, device=device, batch_size=args.batch_size,
                               latency_batch=args.latency_batch, latency_repeats=args.latency_repeats)
    calibrated = ", calibrated" if model.is_calibrated else ""
    print(f"{spec['name']} {kwargs} from {args.checkpoint} ({weights} weights{calibrated}), {data.name} test set "
          f"({data.num_test} images), {device}, {torch.get_num_threads()} threads")
    print(format_table(results, latency_batch=args.latency_batch))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m adaptive_kernels`` and the ``adaptive-kernels`` console script."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:  # CheckpointError is a ValueError; OSError: disk full, ...
        print_error(e)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
