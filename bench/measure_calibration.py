"""Per-sub-network norm calibration on the 10-epoch Fashion-MNIST reproduction: accuracy of every sub-network as
trained and calibrated, how few calibration images suffice, the calibration time; plain and base-alone baselines
recalibrated the same way.

Reads the checkpoints of bench/train_calibration_checkpoints.py (MODE_seedSEED.pt, MODE adn / plain / single) from
--runs. For each: accuracy of its sub-networks on the FULL 10000-image test set as trained, then after
``adaptive_kernels.calibrate`` on the first 256 / 1024 / 4096 un-augmented images of its training subset (nested:
epoch 0's order with seed 0), each from the uncalibrated weights. ``single`` (trained as the base-net alone) is
scored as the base-net only. Writes bench/results/calibration/MODE.json, one object per (seed, skip); a checkpoint
already there is not measured again. ``--report`` prints the docs/training.md table and the goals, and draws the plot.
    python bench/measure_calibration.py --runs /work/calib_runs
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_fashion_mnist import git_sha

from adaptive_kernels import calibrate, create_model
from adaptive_kernels._files import atomic_path, write_text
from adaptive_kernels.models.skip import skip_to_str
from adaptive_kernels.training import accuracy, build_data, load_checkpoint
from adaptive_kernels.training.checkpoint import load_model_state
from adaptive_kernels.training.data import calibration_batches

OUT = Path(__file__).resolve().parent / "results" / "calibration"
IMAGES = (256, 1024, 4096)
MAIN_IMAGES = 4096  # accuracy_calibrated
MODES = ("adn", "plain", "single")


def measure(path: Path, data, args) -> list[dict]:
    state = load_checkpoint(path)
    spec = state["model_spec"]
    trained = create_model(spec["name"], **spec["kwargs"])
    load_model_state(trained, state["model"], path)
    trained.eval()
    skips = ["base"] if state["mode"] == "single" else trained.skip_configs()
    skips = [trained.parse_skip(s) for s in skips]
    rows = {s: {"seed": state["seed"], "mode": state["mode"], "epochs": state["epochs"], "skip": skip_to_str(s),
                "macs": trained.macs(s, data.image_size), "accuracy": accuracy(trained, data, s, batch_size=500)}
            for s in skips}
    by_images, seconds = {s: {} for s in skips}, {}
    for n in IMAGES:
        model = copy.deepcopy(trained)
        result = calibrate(model, calibration_batches(data, n, args.batch_size), configs=skips)
        seconds[str(n)] = round(result.seconds, 2)
        for s in skips:
            by_images[s][str(n)] = accuracy(model, data, s, batch_size=500)
        print(f"  {path.name}: {n} images calibrated in {result.seconds:.1f} s", flush=True)
    meta = {
        "calibration_images": MAIN_IMAGES, "calibration_batch": args.batch_size,
        "calibration_seconds_by_images": seconds, "calibrated_subnets": len(skips),
        "train_images": state["train_images"], "test_images": data.num_test, "train_seconds": state["train_seconds"],
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s), "
                  f"shared machine", "torch": torch.__version__, "git_sha": git_sha(),
    }
    return [{**rows[s], "accuracy_calibrated": by_images[s][str(MAIN_IMAGES)],
             "accuracy_calibrated_by_images": by_images[s], **meta} for s in skips]


def load_rows(out: Path, mode: str) -> list[dict]:
    path = out / f"{mode}.json"
    return json.loads(path.read_text()) if path.exists() else []


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(out: Path) -> None:
    """docs/training.md table (mean over seeds), the goals, the plot."""
    adn, plain, single = (load_rows(out, m) for m in MODES)
    if not adn:
        print("no ADN rows yet")
        return
    seeds = sorted({r["seed"] for r in adn})
    skips = sorted({r["skip"] for r in adn}, key=lambda s: (-next(r["macs"] for r in adn if r["skip"] == s), s))

    def avg(rows, skip, key, n=None):
        vals = [(r[key][str(n)] if n else r[key]) for r in rows if r["skip"] == skip]
        return mean(vals) if vals else float("nan")

    print(f"ADN, seeds {seeds}, full test set (mean over seeds):\n")
    print("| skip | MMACs | as trained | calibrated 256 | calibrated 1024 | calibrated 4096 | plain as trained | "
          "plain calibrated |")
    print("|---|---|---|---|---|---|---|---|")
    for s in skips:
        macs = next(r["macs"] for r in adn if r["skip"] == s) / 1e6
        cal = " | ".join(f"{avg(adn, s, 'accuracy_calibrated_by_images', n):.2f}" for n in IMAGES)
        print(f"| {s} | {macs:.2f} | {avg(adn, s, 'accuracy'):.2f} | {cal} | {avg(plain, s, 'accuracy'):.2f} | "
              f"{avg(plain, s, 'accuracy_calibrated'):.2f} |")
    base = skips[-1]
    if single:
        print(f"\nbase depth trained alone (seeds {sorted({r['seed'] for r in single})}): as trained "
              f"{avg(single, base, 'accuracy'):.2f}, calibrated {avg(single, base, 'accuracy_calibrated'):.2f}")
    secs = {n: mean([r["calibration_seconds_by_images"][str(n)] for r in adn if r["skip"] == base]) for n in IMAGES}
    print("calibration time, all 8 sub-networks, 1 thread: " + ", ".join(f"{n} images {secs[n]:.1f} s" for n in IMAGES))

    cal = {s: avg(adn, s, "accuracy_calibrated") for s in skips}
    worst = max(((cal[b] - cal[a], a, b) for a in skips for b in skips
                 if a != b and all(x == "F" or y == "T" for x, y in zip(a, b))), default=None)
    mixed = [s for s in skips if s not in (skips[0], base)]
    low = min(mixed, key=lambda s: cal[s])
    print(f"\ngoal 1 (a sub-network running every block of another is never > 0.5 below it): worst gap "
          f"{worst[0]:.2f} points ({worst[1]} below {worst[2]}) -> {'met' if worst[0] <= 0.5 else 'NOT met'}")
    print(f"goal 2 (every mixed sub-network >= base-net): lowest mixed {low} {cal[low]:.2f} vs base {cal[base]:.2f} "
          f"-> {'met' if cal[low] >= cal[base] else 'NOT met'}")
    if plain:
        p_super = avg(plain, skips[0], "accuracy_calibrated")
        gap = p_super - cal[skips[0]]
        print(f"goal 3 (ADN super within 0.5 of plain): ADN super {cal[skips[0]]:.2f} vs plain {p_super:.2f} "
              f"(calibrated; plain seeds {sorted({r['seed'] for r in plain})}) -> gap {gap:.2f}, "
              f"{'met' if gap <= 0.5 else 'NOT met'}")
    plot(adn, plain, single, skips, out / "calibration.png")


def plot(adn, plain, single, skips, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = sorted({r["seed"] for r in adn})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    macs = np.array([next(r["macs"] for r in adn if r["skip"] == s) for s in skips]) / 1e6
    for rows, key, label, style in ((adn, "accuracy", "ADN as trained", "x"),
                                    (adn, "accuracy_calibrated", "ADN calibrated (4096 images)", "o"),
                                    (plain, "accuracy_calibrated", "plain, blocks skipped, calibrated", "^")):
        if not rows:
            continue
        acc = np.array([[r[key] for r in rows if r["skip"] == s] for s in skips])
        ax.errorbar(macs, acc.mean(1), yerr=acc.std(1) if acc.shape[1] > 1 else None, fmt=style, capsize=3,
                    label=label)
        if key == "accuracy_calibrated" and rows is adn:
            for m, a, s in zip(macs, acc.mean(1), skips):
                ax.annotate(s, (m, a), textcoords="offset points", xytext=(3, 4), fontsize=7)
    if single:
        acc = np.array([r["accuracy_calibrated"] for r in single])
        ax.errorbar([macs[-1]], [acc.mean()], yerr=[acc.std()] if len(acc) > 1 else None, fmt="s", capsize=3,
                    label="base depth trained alone, calibrated")
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("test accuracy, % (10000 images, mean over seeds)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 70))
    ax.set_title(f"Fashion-MNIST, resnet20_adn(width=8), {adn[0]['epochs']} epochs x {adn[0]['train_images']} "
                 f"images, seeds {seeds}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for s in skips:
        acc = [mean([r["accuracy_calibrated_by_images"][str(n)] for r in adn if r["skip"] == s]) for n in IMAGES]
        bx.plot(IMAGES, acc, marker="o", label=s)
    bx.set_xscale("log", base=2)
    bx.set_xticks(IMAGES, [str(n) for n in IMAGES])
    bx.set_xlabel("calibration images (un-augmented training images)")
    bx.set_ylabel("ADN calibrated test accuracy, % (mean over seeds)")
    bx.set_title("how many calibration images suffice", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, help="folder of MODE_seedSEED.pt checkpoints")
    p.add_argument("--batch-size", type=int, default=256, help="calibration batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    p.add_argument("--test-subset", type=int, help="score on N test images (smoke runs; default all 10000)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which checkpoints to measure")
    p.add_argument("--report", action="store_true", help="print the docs/training.md table and goals, draw the plot")
    args = p.parse_args(argv)
    out = args.out
    if args.report:
        report(out)
        return 0
    if args.runs is None:
        p.error("--runs FOLDER is needed (or --report)")
    torch.set_num_threads(args.threads)
    # The reproduction's 20000-image training subset (calibration images come from it); the full test set.
    data = build_data("fashion-mnist", args.data_dir, train_subset=20000, test_subset=args.test_subset,
                      augment=False)
    out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        rows = load_rows(out, mode)
        done = {r["seed"] for r in rows}
        for path in sorted(args.runs.glob(f"{mode}_seed*.pt")):
            seed = int(path.stem.removeprefix(f"{mode}_seed"))
            if seed in done:
                continue
            t0 = time.perf_counter()
            rows += measure(path, data, args)
            rows.sort(key=lambda r: (r["seed"], r["skip"]))
            write_text(out / f"{mode}.json", json.dumps(rows, indent=1) + "\n")
            print(f"{path.name}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
