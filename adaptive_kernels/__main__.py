"""Command line: ``python -m adaptive_kernels {demo,train,eval}`` (also the ``adaptive-kernels`` script).

  demo   train a small ResNet-ADN on Fashion-MNIST within a time budget (default 7 min on 2 CPU cores),
         evaluate every sub-network, print the table, save checkpoint, JSON and plot
  train  train any registered model (adn / plain / single mode); multi-GPU: torchrun --nproc_per_node=N -m
         adaptive_kernels train ...
  eval   accuracy, MACs and measured latency of every sub-network of a checkpoint
  calibrate  per-sub-network BatchNorm statistics of a checkpoint (every mixed sub-network usable)
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

from .models import create_model, list_models
from .training.calibration_cli import add_calibrate_command
from .training.checkpoint import CheckpointError, load_checkpoint, load_model_state
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
    p.add_argument("--test-subset", type=int, help="score on a fixed random subset of N test images")
    p.add_argument("--image-size", type=int, help="imagefolder crop size (default 224) / synthetic size (16)")
    p.add_argument("--workers", type=int, default=4, help="imagefolder DataLoader workers")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptive-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the 10-minute CPU demo on Fashion-MNIST")
    _add_data_args(d, default="fashion-mnist")
    d.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    d.add_argument("--budget-seconds", type=float, default=420.0, help="total time to aim at (default 420)")
    d.add_argument("--width", type=int, default=8, help="base channels of the ResNet-20-ADN (default 8)")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--epochs", type=int, help="override the planned number of epochs")
    d.add_argument("--train-subset", type=int, help="override the planned number of training images")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("--model", required=True, help=f"registered model, e.g. resnet20_adn ({', '.join(list_models())})")
    t.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument, repeatable (e.g. width=16)")
    _add_data_args(t)
    t.add_argument("--train-subset", type=int, help="train on a fixed random subset of N images")
    t.add_argument("--no-augment", action="store_true", help="no random crops/flips (short runs learn faster)")
    t.add_argument("--out", required=True, help="output folder: last.pt, log.jsonl")
    t.add_argument("--resume", action="store_true", help="continue OUT/last.pt exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="start over even if OUT/last.pt exists")
    t.add_argument("--mode", choices=("adn", "plain", "single"), default="adn",
                   help="adn: self-distillation (default); plain: super-net CE only; single: one sub-network")
    t.add_argument("--skip", help="sub-network trained by --mode single: base, super or T/F letters")
    c = TrainConfig()
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--batch-size", type=int, default=c.batch_size, help="GLOBAL batch (split over processes)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=c.optimizer)
    t.add_argument("--lr", type=float, default=c.lr)
    t.add_argument("--momentum", type=float, default=c.momentum)
    t.add_argument("--weight-decay", type=float, default=c.weight_decay, help="not applied to norms and biases")
    t.add_argument("--schedule", choices=SCHEDULES, default=c.schedule)
    t.add_argument("--warmup-epochs", type=float, default=c.warmup_epochs)
    t.add_argument("--milestones", type=int, nargs="*", default=[], help="multistep: epochs where LR *= gamma")
    t.add_argument("--lr-gamma", type=float, default=c.lr_gamma)
    t.add_argument("--amp", choices=tuple(AMP_DTYPES), default=c.amp, help="mixed precision (GPU only)")
    t.add_argument("--clip-grad", type=float, help="clip the gradients' global norm")
    t.add_argument("--ema", type=float, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.9998)")
    t.add_argument("--alpha", type=float, default=c.alpha, help="weight of the super-net CE (1-alpha: KD)")
    t.add_argument("--temperature", type=float, default=c.temperature)
    t.add_argument("--top-k", type=int, default=c.top_k, help="distil over the teacher's top-k classes")
    t.add_argument("--feature-kd", type=float, default=0.0, help="weight of pooled stage-output distillation")
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup Beta(alpha, alpha); 0 = off")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda")
    t.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    t.add_argument("--log-every", type=int, default=c.log_every_steps, help="log every N steps")
    t.add_argument("--eval-every", type=int, default=c.eval_every_epochs, help="evaluate every N epochs (0: never)")
    t.add_argument("--time-limit", type=float, help="stop (with a resumable checkpoint) after this many seconds")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate every sub-network of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="a last.pt written by train or demo")
    _add_data_args(e)
    e.add_argument("--json", help="also write [{skip, accuracy, macs, latency_us}, ...] to this file")
    e.add_argument("--batch-size", type=int, default=500, help="accuracy batch size")
    e.add_argument("--latency-batch", type=int, default=64,
                   help="batch size of the latency measurement (default 64: at batch 1 a CPU mostly measures "
                        "per-layer overheads)")
    e.add_argument("--latency-repeats", type=int, default=30)
    e.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="auto: the EMA weights when the checkpoint has them")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    e.set_defaults(func=cmd_eval)
    add_calibrate_command(sub, _add_data_args)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from .training.demo import run_demo

    started = time.perf_counter()
    if args.data == "imagefolder":
        raise ValueError("the demo trains on in-memory data: --data fashion-mnist (default) or synthetic")
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
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, milestones=tuple(args.milestones), lr_gamma=args.lr_gamma, amp=args.amp,
        clip_grad=args.clip_grad, ema_decay=args.ema, mode=args.mode, skip=args.skip, alpha=args.alpha,
        temperature=args.temperature, top_k=args.top_k, feature_kd=args.feature_kd,
        label_smoothing=args.label_smoothing, mixup_alpha=args.mixup, seed=args.seed,
        save_every_steps=args.save_every, log_every_steps=args.log_every, eval_every_epochs=args.eval_every,
        time_limit_s=args.time_limit, progress=not args.no_progress,
    )
    env = init_distributed(args.device)
    try:
        data = build_data(args.data, args.data_dir, train_subset=args.train_subset, test_subset=args.test_subset,
                          image_size=args.image_size, num_workers=args.workers, augment=not args.no_augment,
                          seed=args.seed)
        spec = {"name": args.model,
                "kwargs": {"num_classes": data.num_classes, "in_chans": data.in_chans, **_model_args(args.model_arg)}}
        seed_everything(args.seed)  # the same initial weights on every rank and in every rerun
        model = create_model(spec["name"], **spec["kwargs"])
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


def cmd_eval(args: argparse.Namespace) -> int:
    state = load_checkpoint(args.checkpoint)
    spec = state.get("model_spec")
    if not spec:
        raise CheckpointError(f"checkpoint {args.checkpoint} does not record which model it holds (no model_spec)")
    data = build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                      num_workers=args.workers)
    kwargs = spec["kwargs"]
    if kwargs.get("num_classes") != data.num_classes or kwargs.get("in_chans") != data.in_chans:
        raise ValueError(
            f"{args.checkpoint} was trained for {kwargs.get('num_classes')} classes / {kwargs.get('in_chans')} "
            f"channels, but --data {args.data} has {data.num_classes} / {data.in_chans}: evaluate on its dataset "
            f"({state.get('data', {}).get('name', '?')})"
        )
    weights = args.weights
    if weights == "auto":
        weights = "ema" if state.get("ema") is not None else "model"
    if weights == "ema" and state.get("ema") is None:
        raise CheckpointError(f"checkpoint {args.checkpoint} holds no EMA weights: use --weights model")
    device = resolve_device(args.device)
    model = create_model(spec["name"], **kwargs)
    load_model_state(model, state[weights], args.checkpoint)
    model.to(device)
    results = evaluate_subnets(model, data, device=device, batch_size=args.batch_size,
                               latency_batch=args.latency_batch, latency_repeats=args.latency_repeats)
    calibrated = ", calibrated" if model.is_calibrated else ""
    print(f"{spec['name']} {kwargs} from {args.checkpoint} ({weights} weights{calibrated}), {data.name} test set "
          f"({data.num_test} images), {device}, {torch.get_num_threads()} threads")
    print(format_table(results, latency_batch=args.latency_batch))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
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
    except (ValueError, FileNotFoundError, ImportError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
