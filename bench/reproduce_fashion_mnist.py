"""Small-scale reproduction of Adaptive Depth Networks on Fashion-MNIST (docs/method.md, "What the paper reports").

Per seed, three ResNet-20-ADN runs with the same data, schedule and initial weights:
  adn     self-distillation (super-net CE + base-net KD)       -> adn_super, adn_base, all 8 sub-networks
  plain   the same network trained with super-net CE only       -> plain_super, and plain_naive_base: the
                                                                   plain net with the base-net's blocks skipped
  single  the base-depth sub-network trained alone with CE      -> single_base
plus ‖F(h)‖/‖h‖ of every identity-shortcut residual block (ADN vs plain, super-net pass on test images).

Writes bench/results/fashion_mnist_reproduction.json (a list, one object per seed; accuracies in percent) and
bench/results/fashion_mnist_reproduction.png. Run from the repository root after .ci/setup-env (which installs
the package; otherwise prefix PYTHONPATH=.), about 20 minutes on one CPU thread with the defaults:
    python bench/reproduce_fashion_mnist.py
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from adaptive_kernels import create_model
from adaptive_kernels._files import atomic_path, write_text
from adaptive_kernels.cli.eval import latency_source
from adaptive_kernels.training import (
    TrainConfig,
    Trainer,
    accuracy,
    build_data,
    evaluate_subnets,
    seed_everything,
)

MODEL = "resnet20_adn"
RESULTS = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def residual_norm_ratios(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Mean over images of ‖F(h)‖/‖h‖ for every block with an identity shortcut, in the super-net pass.

    h: the block's input (captured by a forward pre-hook); F(h): the block's residual branch
    (``block.residual_branch``, the part added to the shortcut before the final ReLU).
    """
    model.eval()
    inputs: dict[str, torch.Tensor] = {}
    blocks = {
        f"layer{k + 1}.{i}": block
        for k, stage in enumerate(model.stages) for i, block in enumerate(stage) if block.downsample is None
    }
    handles = [
        block.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, block in blocks.items()
    ]
    try:
        model(images, skip="super")
    finally:
        for h in handles:
            h.remove()
    ratios = {}
    for name, block in blocks.items():
        h = inputs[name]
        f = block.residual_branch(h, False)
        ratios[name] = (f.flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)).mean().item()
    return ratios


def train(mode: str, data, args, seed: int, skip: str | None = None) -> tuple[torch.nn.Module, float]:
    seed_everything(seed)  # identical initial weights for the three runs of a seed
    model = create_model(MODEL, num_classes=data.num_classes, in_chans=data.in_chans, width=args.width)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=5e-4, schedule="cosine",
        warmup_epochs=args.warmup_epochs, mode=mode, skip=skip, seed=seed, eval_every_epochs=0,
        progress=args.progress, log_every_steps=20,
    )
    t0 = time.perf_counter()
    Trainer(model, data, config, echo=lambda s: print(f"  [{mode}] {s}", flush=True)).fit()
    return model.eval(), time.perf_counter() - t0


def git_sha() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_seed(seed: int, data, args) -> dict:
    print(f"seed {seed}: training adn, plain, single(base) ...", flush=True)
    adn, t_adn = train("adn", data, args, seed)
    plain, t_plain = train("plain", data, args, seed)
    single, t_single = train("single", data, args, seed, skip="base")
    eval_kw = {"batch_size": 500, "latency_batch": 1, "latency_repeats": 20}
    shape = (eval_kw["latency_batch"], data.in_chans, *data.image_size)  # timed as eval does (latency_source)
    adn_subnets = evaluate_subnets(adn, data, latency_model=latency_source(adn, shape, "cpu"), **eval_kw)
    plain_subnets = evaluate_subnets(plain, data, latency_model=latency_source(plain, shape, "cpu"), **eval_kw)
    by_skip = {"adn": {r.skip: r for r in adn_subnets}, "plain": {r.skip: r for r in plain_subnets}}
    base = "T" * adn.num_skippable_stages
    sup = "F" * adn.num_skippable_stages
    images = next(data.test_batches(batch_size=1000))[0]
    skippable = [
        f"layer{k + 1}.{i}" for k, stage in enumerate(adn.stages) for i, block in enumerate(stage) if block.skippable
    ]
    return {
        "seed": seed,
        "model": f"{MODEL}(width={args.width})",
        "epochs": args.epochs,
        "adn_super": by_skip["adn"][sup].accuracy,
        "adn_base": by_skip["adn"][base].accuracy,
        "plain_super": by_skip["plain"][sup].accuracy,
        "plain_naive_base": by_skip["plain"][base].accuracy,
        "single_base": accuracy(single, data, base, batch_size=500),
        "adn_subnets": [r.to_dict() for r in adn_subnets],
        "plain_subnets": [r.to_dict() for r in plain_subnets],
        "norm_ratio": {"adn": residual_norm_ratios(adn, images), "plain": residual_norm_ratios(plain, images)},
        "skippable_blocks": skippable,
        "train_images": data.num_train,
        "test_images": data.num_test,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "augment": args.augment,
        "train_seconds": {"adn": round(t_adn, 1), "plain": round(t_plain, 1), "single": round(t_single, 1)},
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "git_sha": git_sha(),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in (("adn_subnets", "ADN: all sub-networks", "o"),
                              ("plain_subnets", "plain: same blocks skipped (naive)", "x")):
        skips = [r["skip"] for r in rows[0][key]]
        macs = np.array([r["macs"] for r in rows[0][key]]) / 1e6
        acc = np.array([[s["accuracy"] for s in row[key]] for row in rows])
        order = np.argsort(macs)
        ax.errorbar(macs[order], acc.mean(0)[order], yerr=acc.std(0)[order] if len(rows) > 1 else None,
                    fmt=style, capsize=3, label=label)
        if key == "adn_subnets":
            for m, a, s in zip(macs, acc.mean(0), skips):
                ax.annotate(s, (m, a), textcoords="offset points", xytext=(3, 4), fontsize=7)
    base_macs = min(r["macs"] for r in rows[0]["adn_subnets"]) / 1e6
    single = np.array([r["single_base"] for r in rows])
    ax.errorbar([base_macs], [single.mean()], yerr=[single.std()] if len(rows) > 1 else None, fmt="s",
                capsize=3, label="base depth trained alone")
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("test accuracy, % (mean over seeds)")
    ax.set_title(f"Fashion-MNIST, {rows[0]['model']}, {rows[0]['epochs']} epoch(s) x {rows[0]['train_images']} "
                 f"images, seeds {[r['seed'] for r in rows]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    blocks = list(rows[0]["norm_ratio"]["adn"])
    x = np.arange(len(blocks))
    for offset, kind in ((-0.2, "adn"), (0.2, "plain")):
        vals = np.array([[row["norm_ratio"][kind][b] for b in blocks] for row in rows]).mean(0)
        bx.bar(x + offset, vals, width=0.4, label=f"{'ADN' if kind == 'adn' else 'plain'}")
    skippable = set(rows[0]["skippable_blocks"])
    bx.set_xticks(x, [b + (" (skippable)" if b in skippable else "") for b in blocks], rotation=30, ha="right",
                  fontsize=8)
    bx.set_ylabel("‖F(h)‖ / ‖h‖ (super-net pass, mean over test images)")
    bx.set_title("residual-branch norm ratio of identity-shortcut blocks", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=20000, help="training images (0: all 60000)")
    p.add_argument("--test-subset", type=int, default=3000, help="test images (0: all 10000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--augment", action="store_true", help="random crops/flips (off: short runs learn faster)")
    p.add_argument("--warmup-epochs", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON, no training")
    args = p.parse_args(argv)
    json_path = args.out / "fashion_mnist_reproduction.json"
    if args.plot_only:
        plot(json.loads(json_path.read_text()), args.out / "fashion_mnist_reproduction.png")
        return 0
    torch.set_num_threads(args.threads)
    data = build_data("fashion-mnist", args.data_dir, train_subset=args.train_subset or None,
                      test_subset=args.test_subset or None, augment=args.augment)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        rows.append(run_seed(seed, data, args))
        write_text(json_path, json.dumps(rows, indent=1) + "\n")  # after every seed: partial results survive
        r = rows[-1]
        print(f"seed {seed}: ADN super {r['adn_super']:.2f} base {r['adn_base']:.2f} | plain super "
              f"{r['plain_super']:.2f} naive base {r['plain_naive_base']:.2f} | single base {r['single_base']:.2f} "
              f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    plot(rows, args.out / "fashion_mnist_reproduction.png")
    print(f"wrote {json_path} and {args.out / 'fashion_mnist_reproduction.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
