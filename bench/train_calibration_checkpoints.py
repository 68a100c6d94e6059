"""Train and SAVE the ResNet-20-ADN checkpoints of the 10-epoch Fashion-MNIST reproduction, so that the
per-sub-network calibration (bench/measure_calibration.py) is measured afterwards without retraining.

Same data, schedule, initial weights and thread count as ``bench/reproduce_fashion_mnist.py --epochs 10``
(it reuses that script's ``train``): 20000 training images (the same fixed subset), no augmentation, batch 64,
lr 0.05, cosine schedule with 0.2 warm-up epochs, 1 thread. Runs are done in the order given by --runs
(MODE:SEED, MODE in adn/plain/single) and each is written to OUT/MODE_seedSEED.pt with save_checkpoint (atomic);
a run whose checkpoint exists is skipped, so the script can be restarted. Hours on one CPU thread:
    python bench/train_calibration_checkpoints.py --out /work/calib_runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_fashion_mnist import MODEL, git_sha, train

from adaptive_kernels.training import build_data, save_checkpoint

DEFAULT_RUNS = ["adn:0", "adn:1", "adn:2", "plain:0", "single:0", "plain:1", "single:1", "plain:2", "single:2"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder (outside the repository)")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="MODE:SEED, in order")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    args.progress = False
    runs = []
    for run in args.runs:
        mode, _, seed = run.partition(":")
        if mode not in ("adn", "plain", "single") or not seed.isdigit():
            p.error(f"--runs {run!r}: write MODE:SEED with MODE adn, plain or single, e.g. adn:0")
        runs.append((mode, int(seed)))
    torch.set_num_threads(args.threads)
    # The reproduction's training subset (the subset is drawn before the test subset, so it does not depend on
    # the test subset size); training never looks at the test split.
    data = build_data("fashion-mnist", args.data_dir, train_subset=args.train_subset, augment=False)
    for mode, seed in runs:
        path = args.out / f"{mode}_seed{seed}.pt"
        if path.exists():
            print(f"{path} exists: skipped", flush=True)
            continue
        print(f"training {mode} seed {seed} ...", flush=True)
        model, seconds = train(mode, data, args, seed, skip="base" if mode == "single" else None)
        spec = {"name": MODEL, "kwargs": {"num_classes": data.num_classes, "in_chans": data.in_chans,
                                          "width": args.width}}
        save_checkpoint({
            "model": model.state_dict(), "model_spec": spec, "mode": mode, "seed": seed, "epochs": args.epochs,
            "train_images": data.num_train, "batch_size": args.batch_size, "lr": args.lr,
            "warmup_epochs": args.warmup_epochs, "threads": args.threads, "train_seconds": round(seconds, 1),
            "data": data.describe(), "git_sha": git_sha(),
        }, path)
        print(f"wrote {path} ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
