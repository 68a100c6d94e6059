"""The calibrated one graph on the CPU (issue 29 part 1): per sub-network, the CPU engine (``compile`` on a calibrated
model: the one graph laid out by ``engine/ort/layout``) against ONNX Runtime on the calibrated static export of that
sub-network, interleaved rounds in shuffled order, paired ratios (per round, then the median over rounds); the
memory of the engine's session (all 2^S sub-networks resident) against one static session of the super-net; the
engine's switching cost (``set_skip`` to another sub-network).

    OMP_WAIT_POLICY=PASSIVE python bench/measure_calibrated_cpu.py --model resnet20 --batches 1,64 --rounds 15
    OMP_WAIT_POLICY=PASSIVE python bench/measure_calibrated_cpu.py --model resnet50 --batches 1 --rounds 5
    OMP_WAIT_POLICY=PASSIVE python bench/measure_calibrated_cpu.py --model resnet20 --batches 1 --uncalibrated

Writes bench/results/cpu/{calibrated,uncalibrated}_<model>.{json,md}; the machine (CPU vendor, family/model, ISA flags), threads and
versions are in every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adaptive_kernels as ak
from adaptive_kernels._files import atomic_path, write_text
from adaptive_kernels.engine import OnnxRuntimeEngine
from adaptive_kernels.engine.ort.layout import machine_layout
from adaptive_kernels.export import INPUT, MASK, OUTPUT, mask_of, onnxruntime_session
from adaptive_kernels.numerics import relative_error
from bench._harness import cpu_info, environment, interleaved_rounds, load_average, paired_ratio

OUT = Path(__file__).resolve().parent / "results" / "cpu"
PROVIDERS = ("static", "engine", "engine_numpy", "laid_out", "exported")
# engine: engine(x, skip) on a torch tensor; engine_numpy: the same engine on x as a NumPy array (NumPy logits back, no
# torch call); laid_out: ONNX Runtime on the engine's laid-out graph, mask fed (the engine without its Python and
# torch wrapper); exported: ONNX Runtime on the one graph as exported, mask fed
MODELS = {"resnet20": ("resnet20_adn", 32), "resnet50": ("resnet50_adn", 224)}


SESSION_MEMORY = """
import sys, psutil, numpy as np, onnxruntime  # the library loaded before the count starts
from adaptive_kernels.export import onnxruntime_session
before = psutil.Process().memory_info().rss
session = onnxruntime_session(sys.argv[1], int(sys.argv[2]))
feed = {i.name: (np.ones(int(sys.argv[4]), np.int32) if i.name == "mask" else
                 np.zeros((1, 3, int(sys.argv[3]), int(sys.argv[3])), np.float32)) for i in session.get_inputs()}
session.run(None, feed)
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


def session_mb(path: Path, threads: int, size: int, stages: int) -> float:
    """Resident memory a fresh process grows by when it loads ``path`` in ONNX Runtime and runs it once (batch 1)."""
    out = subprocess.run([sys.executable, "-c", SESSION_MEMORY, str(path), str(threads), str(size), str(stages)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def calibrated_model(name: str, size: int, calibrated: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ak.create_model(name).eval()
    if calibrated:
        ak.calibrate(model, 2 * torch.randn(8, 3, size, size) + 0.5, batch_size=4)  # statistics unlike the running ones
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skips", default="", help="comma list of sub-networks (default: every one)")
    parser.add_argument("--uncalibrated", action="store_true", help="the model as created (shared norm statistics); "
                        "writes uncalibrated_<model>.{json,md}")
    args = parser.parse_args()
    name, size = MODELS[args.model]
    torch.set_num_threads(args.threads)
    model = calibrated_model(name, size, not args.uncalibrated)
    kind = "uncalibrated" if args.uncalibrated else "calibrated"
    configs = [model.parse_skip(s) for s in args.skips.split(",")] if args.skips else model.skip_configs()
    example = torch.randn(1, 3, size, size)
    machine = {**cpu_info(), "threads": args.threads, **{k: environment()[k] for k in ("torch", "python", "git_sha")},
               "onnxruntime": __import__("onnxruntime").__version__}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        one_graph = ak.export_onnx(model, Path(folder) / "one.onnx", example).read_bytes()
        static_files = {s: ak.export_onnx(model, Path(folder) / f"{ak.skip_to_str(s)}.onnx", example, skip=s)
                        for s in configs}
        stages = model.num_skippable_stages
        static_mb = session_mb(static_files[configs[0]], args.threads, size, stages)
        laid_out = Path(folder) / "laid_out.onnx"
        with atomic_path(laid_out) as tmp:
            tmp.write_bytes(machine_layout(one_graph))
        engine_mb = session_mb(laid_out, args.threads, size, stages)
        notes: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: notes.append(record.getMessage())
        logging.getLogger("adaptive_kernels.engine.ort.layout").addHandler(handler)
        logging.getLogger("adaptive_kernels.engine.ort.layout").setLevel(logging.INFO)
        engine = OnnxRuntimeEngine(model, example, dynamic_batch=True, onnx_model=one_graph)
        static = {s: onnxruntime_session(static_files[s], args.threads) for s in configs}
        exported = onnxruntime_session(one_graph, args.threads)  # the one graph without the layout: the before
        laid_out_session = onnxruntime_session(laid_out, args.threads)
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, size, size)
        xn = x.numpy()
        runners = {}
        for s in configs:
            runners["static", s] = lambda s=s, xn=xn: static[s].run([OUTPUT], {INPUT: xn})[0]
            runners["engine", s] = lambda s=s, x=x: engine(x, s)
            runners["engine_numpy", s] = lambda s=s, xn=xn: engine(xn, s)
            mask = mask_of(s).numpy()
            runners["laid_out", s] = lambda mask=mask, xn=xn: laid_out_session.run([OUTPUT], {INPUT: xn, MASK: mask})[0]
            runners["exported", s] = lambda mask=mask, xn=xn: exported.run([OUTPUT], {INPUT: xn, MASK: mask})[0]
        with torch.inference_mode():
            for s in configs:
                want = model(x, s)
                for provider in PROVIDERS[1:]:
                    error = relative_error(torch.as_tensor(runners[provider, s]()), want)
                    assert error < 1e-4, (provider, s, error)
            for fn in runners.values():
                fn()
            load = load_average()
            samples = interleaved_rounds(runners, PROVIDERS, configs, args.rounds, random.Random(batch))
        for s in configs:
            rows.append({"model": name, "calibrated": not args.uncalibrated, "image_size": size, "batch": batch,
                         "skip": ak.skip_to_str(s),
                         "static_ms": round(statistics.median(samples["static", s]) / 1e3, 3),
                         "engine_ms": round(statistics.median(samples["engine", s]) / 1e3, 3),
                         "engine_numpy_ms": round(statistics.median(samples["engine_numpy", s]) / 1e3, 3),
                         "laid_out_ms": round(statistics.median(samples["laid_out", s]) / 1e3, 3),
                         "exported_ms": round(statistics.median(samples["exported", s]) / 1e3, 3),
                         "laid_out_over_static": round(paired_ratio(samples["laid_out", s], samples["static", s]), 4),
                         "exported_over_static": round(paired_ratio(samples["exported", s], samples["static", s]), 4),
                         "engine_over_static": round(paired_ratio(samples["engine", s], samples["static", s]), 4),
                         "engine_numpy_over_static": round(paired_ratio(samples["engine_numpy", s], samples["static", s]),
                                                           4),
                         "rounds": args.rounds, "load_avg_1min_before": load, "load_avg_1min_after": load_average(),
                         **machine})
        for column in ("engine", "engine_numpy", "laid_out"):
            ratios = [r[f"{column}_over_static"] for r in rows if r["batch"] == batch]
            print(f"{name} ({kind}) b{batch}: {column} / static {min(ratios):.3f}-{max(ratios):.3f} (median "
                  f"{statistics.median(ratios):.3f})", flush=True)
    switches = []
    for k in range(2000):
        t0 = time.perf_counter_ns()
        engine.set_skip(configs[k % len(configs)])
        switches.append((time.perf_counter_ns() - t0) / 1e3)
    summary = {"engine_session_mb": round(engine_mb, 1), "static_super_session_mb": round(static_mb, 1),
               "portable_file_mb": round(len(one_graph) / 2**20, 1),
               "memory_ratio": round(engine_mb / static_mb, 2), "switch_us_median": round(statistics.median(switches), 2),
               "layout": notes}
    OUT.mkdir(parents=True, exist_ok=True)
    write_text(OUT / f"{kind}_{args.model}.json", json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    write_text(OUT / f"{kind}_{args.model}.md", table(rows, summary, machine, kind))
    print(json.dumps(summary))
    return 0


def table(rows: list[dict], summary: dict, machine: dict, kind: str) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["cpu_flags"].items())
    lines = [f"# {kind.capitalize()} one graph on the CPU: {rows[0]['model']} ({rows[0]['image_size']}²)", "",
             (f"Machine: {machine['cpu']}, {machine['cpu_vendor']} family {machine['cpu_family']} model "
              f"{machine['cpu_model']}, {machine['cores']} cores shared with other jobs, {machine['threads']} thread(s); "
              f"flags {flags}. torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, python "
              f"{machine['python']}, git {machine['git_sha'][:10]}. Interleaved rounds in shuffled order; ratio: the "
              f"median over rounds of engine / static in the same round. engine: `engine(x, skip)` on a torch tensor; "
              f"engine on NumPy: the same call on `x.numpy()` (NumPy logits back, no torch call); laid-out graph: ONNX "
              f"Runtime alone on the engine's graph."), "",
             (f"Memory (resident growth of a fresh process that loads the file in ONNX Runtime and runs it once at batch 1): "
             f"the engine's laid-out one graph {summary['engine_session_mb']} MiB (all sub-networks; the engine also "
             f"keeps the portable file, {summary['portable_file_mb']} MiB), one static super-net session {summary['static_super_session_mb']} MiB: "
             f"{summary['memory_ratio']}x. Switching (`set_skip` to another sub-network): {summary['switch_us_median']} "
             f"us median. Layout: {'; '.join(summary['layout']) or 'none logged'}."), ""]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        group = [r for r in rows if r["batch"] == batch]
        ratios = [r["engine_over_static"] for r in group]
        numpy_ratios = [r["engine_numpy_over_static"] for r in group]
        before = [r["exported_over_static"] for r in group]
        graph = [r["laid_out_over_static"] for r in group]
        lines += [(f"## batch {batch} ({group[0]['rounds']} rounds, load {group[0]['load_avg_1min_before']} -> "
                  f"{group[-1]['load_avg_1min_after']})"), "", ("| skip | static ms | engine ms | engine on NumPy ms | laid-out graph ms | one graph as exported ms | "
                  "engine / static | engine on NumPy / static | laid-out graph / static | exported / static |"), "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['skip']} | {r['static_ms']:.3f} | {r['engine_ms']:.3f} | {r['engine_numpy_ms']:.3f} | "
                  f"{r['laid_out_ms']:.3f} | {r['exported_ms']:.3f} | {r['engine_over_static']:.3f} | "
                  f"{r['engine_numpy_over_static']:.3f} | {r['laid_out_over_static']:.3f} | "
                  f"{r['exported_over_static']:.3f} |"
                  for r in group]
        lines += ["", (f"engine / static over the sub-networks: {min(ratios):.3f}-{max(ratios):.3f} (median "
                  f"{statistics.median(ratios):.3f}); on NumPy {min(numpy_ratios):.3f}-{max(numpy_ratios):.3f} (median "
                  f"{statistics.median(numpy_ratios):.3f}); the laid-out graph in ONNX Runtime alone / static "
                  f"{min(graph):.3f}-{max(graph):.3f} (median {statistics.median(graph):.3f}); the one graph as exported / static {min(before):.3f}-{max(before):.3f} "
                  f"(median {statistics.median(before):.3f})."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
