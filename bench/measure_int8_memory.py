"""Resident memory of the OpenVINO INT8 engine as a function of the sub-networks it builds (``compile(...,
skips=[...])``), against one static fp32 super-net compiled by OpenVINO: what deleting each hands back after one run
of every compiled model (``bench/_harness.resident_mib``, as ``test_latency_cpu_openvino.py`` measures it), and the
INT8 build time. Random weights, random calibration images (memory and time do not depend on them).

    python bench/measure_int8_memory.py --model resnet50_adn --size 224 --threads 2 \\
        --sets all,FFFF+TFFF+TTFF+TTTT --out bench/results/cpu/int8_memory_resnet50.json

Writes a JSON object (machine, versions, one row per set) atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adaptive_kernels as ak
from adaptive_kernels._files import write_text
from adaptive_kernels.engine import OpenVinoEngine
from bench._harness import cpu_info, environment, load_average, openvino_static_fp32_mib, resident_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50_adn")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="calibration images")
    parser.add_argument("--sets", default="all", help="comma-separated sets of sub-networks, each 'all' or "
                        "skips joined by '+' (e.g. FFFF+TTTT)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import nncf
    import openvino

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ak.create_model(args.model).eval()
    x = torch.randn(1, model.in_chans, args.size, args.size)
    onnx_model = ak.compile(model, x).onnx_model  # one export, shared by every build below
    calibration = torch.randn(args.images, model.in_chans, args.size, args.size,
                              generator=torch.Generator().manual_seed(1))
    static_mib = openvino_static_fp32_mib(onnx_model, x, args.threads)
    rows = []
    for name in args.sets.split(","):
        skips = None if name == "all" else name.split("+")
        held = resident_mib()
        start = time.perf_counter()
        engine = OpenVinoEngine(model, x, dynamic_batch=False, int8=True, calibration=calibration,
                                          onnx_model=onnx_model, skips=skips)
        build_s = time.perf_counter() - start
        for skip in engine.skip_configs():
            engine(x, skip)
        built = len(engine.skip_configs())
        after = resident_mib()
        del engine
        freed = after - resident_mib()
        rows.append({"subnetworks": name, "count": built, "int8_resident_mib": round(freed, 1),
                     "growth_while_held_mib": round(after - held, 1), "ratio_to_static_fp32": round(freed / static_mib, 3),
                     "build_s": round(build_s, 1)})
        print(f"{name}: {built} sub-networks, {freed:.1f} MiB = {freed / static_mib:.2f}x one static fp32 "
              f"({static_mib:.1f} MiB), built in {build_s:.0f} s", flush=True)
    env = environment()
    result = {"model": args.model, "image_size": args.size, "batch": 1, "threads": args.threads,
              "calibration_images": args.images, "static_fp32_resident_mib": round(static_mib, 1), "rows": rows,
              **cpu_info(), "torch": env["torch"], "openvino": openvino.__version__, "nncf": nncf.__version__,
              "git_sha": env["git_sha"], "git_dirty": env["git_dirty"], "load_avg_1min": load_average()}
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
