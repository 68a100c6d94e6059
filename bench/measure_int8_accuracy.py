"""Top-1 accuracy of every sub-network of a trained checkpoint, fp32 against INT8 on OpenVINO, on the same test set.

fp32: the CPU engine on ONNX Runtime (``compile(model, x)``, exact fp32). INT8: ``compile(model, x,
mechanism="openvino", dtype=torch.int8, calibration=...)``, its ranges measured on the first ``--images``
un-augmented training images of epoch 0's order (``calibration_batches``: the images the ``calibrate`` command
reads). Writes a JSON object (machine, versions, per sub-network both accuracies and their difference) atomically
to ``--out``.
    python bench/measure_int8_accuracy.py --checkpoint demo/calibrated.pt --data fashion-mnist \\
        --out bench/results/cpu/int8_accuracy_demo.json
"""

from __future__ import annotations

import argparse
import json
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
from bench._harness import cpu_info, environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=300, help="calibration images for the INT8 ranges")
    parser.add_argument("--threads", type=int, default=2)
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
    rows = []
    with torch.inference_mode():
        for skip in model.skip_configs():
            a32, a8 = accuracy(fp32, data, skip), accuracy(int8, data, skip)
            rows.append({"skip": skip_to_str(skip), "fp32_top1": a32, "int8_top1": a8, "loss_points": round(a32 - a8, 2)})
            print(f"{rows[-1]['skip']}  fp32 {a32:.2f}  int8 {a8:.2f}  loss {a32 - a8:+.2f}", flush=True)
    env = environment()
    result = {"checkpoint": str(args.checkpoint), "model": state["model_spec"], "weights": weights,
              "calibrated_norms": any(n.subnet_mean is not None for n in subnet_norms(model)), "data": data.name, "test_images": data.num_test,
              "calibration_images": args.images, "int8_build_s": round(build_s, 1), **cpu_info(),
              "threads": args.threads, "torch": env["torch"], "onnxruntime": onnxruntime.__version__,
              "openvino": openvino.__version__, "nncf": nncf.__version__, "git_sha": env["git_sha"],
              "git_dirty": env["git_dirty"], "subnets": rows,
              "max_loss_points": max(r["loss_points"] for r in rows)}
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"max loss {result['max_loss_points']:+.2f} points; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
