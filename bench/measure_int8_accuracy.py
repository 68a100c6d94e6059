"""Every sub-network of a trained checkpoint on every CPU runtime: top-1 fp32 against INT8 on OpenVINO on the same test
set, and the latency of each runtime's engine (ONNX Runtime fp32, OpenVINO fp32, OpenVINO INT8).

fp32: the CPU engine on ONNX Runtime (``compile(model, x)``, exact fp32). INT8: ``compile(model, x,
mechanism="openvino", dtype=torch.int8, calibration=...)``, its ranges measured on the first ``--images``
un-augmented training images of epoch 0's order (``calibration_batches``: the images the ``calibrate`` command
reads). Latency (``--batches``, default 1 and 64): ``engine(x, skip)`` of each engine, interleaved rounds in shuffled
order, one call per sample, paired ratios against the ONNX Runtime engine (per round, then the median). Writes a JSON
object (machine, versions, per sub-network both accuracies, their difference and the latencies) atomically to
``--out`` and the table beside it (``.md``).
    python bench/measure_int8_accuracy.py --checkpoint demo/calibrated.pt --data fashion-mnist \\
        --out bench/results/cpu/int8_accuracy_demo.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adaptive_kernels import compile
from adaptive_kernels._files import write_text
from adaptive_kernels.models.norms import subnet_norms
from adaptive_kernels.models.skip import skip_to_str
from adaptive_kernels.training import accuracy, build_data
from adaptive_kernels.training.checkpoint import model_from_checkpoint
from adaptive_kernels.training.data import calibration_batches
from bench._harness import cpu_info, environment, interleaved_rounds, load_average, paired_ratio

RUNTIMES = ("onnxruntime_fp32", "openvino_fp32", "openvino_int8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=300, help="calibration images for the INT8 ranges")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,64", help="latency batch sizes, comma separated ('' for none)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import nncf
    import onnxruntime
    import openvino

    torch.set_num_threads(args.threads)
    data = build_data(args.data, augment=False)
    model, state, weights = model_from_checkpoint(args.checkpoint, data=data)
    model.eval()
    example = torch.zeros(2, data.in_chans, *data.image_size)
    fp32 = compile(model, example, dynamic_batch=True)
    start = time.perf_counter()
    int8 = compile(model, example, mechanism="openvino", dtype=torch.int8, dynamic_batch=True,
                   calibration=calibration_batches(data, args.images, 100))
    build_s = time.perf_counter() - start
    engines = {"onnxruntime_fp32": fp32, "openvino_int8": int8,
               "openvino_fp32": compile(model, example, mechanism="openvino", dtype=torch.float32, dynamic_batch=True)}
    rows = []
    with torch.inference_mode():
        for skip in model.skip_configs():
            a32, a8 = accuracy(fp32, data, skip), accuracy(int8, data, skip)
            rows.append({"skip": skip_to_str(skip), "fp32_top1": a32, "int8_top1": a8, "loss_points": round(a32 - a8, 2)})
            print(f"{rows[-1]['skip']}  fp32 {a32:.2f}  int8 {a8:.2f}  loss {a32 - a8:+.2f}", flush=True)
    latency = measure_latency(engines, model.skip_configs(), example,
                              [int(b) for b in args.batches.split(",") if b], args.rounds)
    for row in rows:
        row["latency"] = {b: per_skip[row["skip"]] for b, per_skip in latency.items()}
    env = environment()
    result = {"checkpoint": str(args.checkpoint), "model": state["model_spec"], "weights": weights,
              "calibrated_norms": any(n.subnet_mean is not None for n in subnet_norms(model)), "data": data.name, "test_images": data.num_test,
              "calibration_images": args.images, "int8_build_s": round(build_s, 1), **cpu_info(),
              "threads": args.threads, "torch": env["torch"], "onnxruntime": onnxruntime.__version__,
              "openvino": openvino.__version__, "nncf": nncf.__version__, "git_sha": env["git_sha"],
              "git_dirty": env["git_dirty"], "subnets": rows,
              "max_loss_points": max(r["loss_points"] for r in rows),
              "latency_rounds": args.rounds, "load_avg_1min": load_average()}
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    write_text(Path(args.out).with_suffix(".md"), table(result))
    print(f"max loss {result['max_loss_points']:+.2f} points; wrote {args.out}")
    return 0


def measure_latency(engines: dict, configs: list, example: torch.Tensor, batches: list[int], rounds: int) -> dict:
    """{batch: {skip: {runtime_ms: ..., runtime_over_onnxruntime_fp32: ...}}}: interleaved rounds (bench/_harness)."""
    out = {}
    for batch in batches:
        x = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(batch))
        runners = {(name, skip): (lambda e=engine, s=skip, x=x: e(x, s)) for name, engine in engines.items()
                   for skip in configs}
        with torch.inference_mode():
            for run in runners.values():
                run()
            before = load_average()
            samples = interleaved_rounds(runners, RUNTIMES, configs, rounds, random.Random(batch))
        per_skip = {}
        for skip in configs:
            row = {f"{name}_ms": round(statistics.median(samples[name, skip]) / 1e3, 4) for name in RUNTIMES}
            row.update({f"{name}_over_onnxruntime_fp32": round(paired_ratio(samples[name, skip],
                                                                            samples["onnxruntime_fp32", skip]), 3)
                        for name in RUNTIMES[1:]})
            per_skip[skip_to_str(skip)] = row
        out[str(batch)] = per_skip
        print(f"batch {batch} (load {before} -> {load_average()}): INT8 / ONNX Runtime fp32 "
              f"{min(r['openvino_int8_over_onnxruntime_fp32'] for r in per_skip.values()):.3f}-"
              f"{max(r['openvino_int8_over_onnxruntime_fp32'] for r in per_skip.values()):.3f}", flush=True)
    return out


def table(result: dict) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["cpu_flags"].items())
    spec = result["model"]
    lines = [f"# Every sub-network on every CPU runtime: {spec['name']} {spec['kwargs']}, {result['data']}", "",
             (f"Checkpoint `{result['checkpoint']}` ({'calibrated norms' if result['calibrated_norms'] else 'as trained'}); "
              f"top-1 on the {result['test_images']} test images; INT8 ranges from {result['calibration_images']} "
              f"training images (build {result['int8_build_s']} s). Machine: {result['cpu']}, {result['cpu_vendor']} "
              f"family {result['cpu_family']} model {result['cpu_model']}, {result['cores']} cores shared with other "
              f"jobs, {result['threads']} thread(s); flags {flags}. torch {result['torch']}, onnxruntime "
              f"{result['onnxruntime']}, openvino {result['openvino'].split('-')[0]}, nncf {result['nncf']}, git "
              f"{result['git_sha'][:10]}{' (dirty)' if result['git_dirty'] else ''}. Latency: `engine(x, skip)`, "
              f"median of {result['latency_rounds']} interleaved rounds; ratios paired per round against the ONNX "
              f"Runtime fp32 engine."), ""]
    batches = list(result["subnets"][0].get("latency", {}))
    head = "| skip | top-1 fp32 | top-1 INT8 | loss (points) |"
    rule = "|---|---|---|---|"
    for b in batches:
        head += f" b{b} ORT fp32 ms | b{b} OV fp32 ms | b{b} OV INT8 ms | b{b} INT8 / ORT fp32 |"
        rule += "---|---|---|---|"
    lines += [head, rule]
    for row in result["subnets"]:
        line = f"| {row['skip']} | {row['fp32_top1']:.2f} | {row['int8_top1']:.2f} | {row['loss_points']:+.2f} |"
        for b in batches:
            t = row["latency"][b]
            line += (f" {t['onnxruntime_fp32_ms']:.3f} | {t['openvino_fp32_ms']:.3f} | {t['openvino_int8_ms']:.3f} | "
                     f"{t['openvino_int8_over_onnxruntime_fp32']:.3f} |")
        lines.append(line)
    lines += ["", f"Largest top-1 loss: {result['max_loss_points']:+.2f} points.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
