"""OpenVINO on the CPU: latency of every sub-network run three ways, in interleaved rounds (one call of each provider
and sub-network per round, providers in shuffled order), the resident memory of the INT8 sub-networks and the cost
of switching between them:

  ort_engine      the fp32 CPU engine on ONNX Runtime (``compile(model, x_cpu)``: the one graph, laid out)
  openvino_fp32   ``compile(..., mechanism="openvino", dtype=torch.float32)``: the one graph on OpenVINO
  openvino_int8   ``compile(..., mechanism="openvino", dtype=torch.int8, calibration=...)``: one NNCF-quantized
                  model per sub-network

Ratios are paired (the median over rounds of two providers' times in the same round). Memory: the resident memory
that deleting the INT8 engine (all 2^S compiled sub-networks, each run) hands back, against that of one static fp32
super-net compiled by OpenVINO. (A first version imported exported compiled models into a fresh process instead:
869 / 1094 MiB against 185 / 208 MiB at b1 / b8, git f8c3575; the engine compiles, it does not import.) Switching: the INT8 engine called in
rounds of (a, a, b): the paired difference of the call to b (after a) and the second call to a.
Every row records the CPU (``cpu_info``: vendor, family/model, ISA flags), thread count and versions.

FULL mode: ``ADN_BENCH_CPU=1``: resnet50_adn at 224², batches 1 and 8, 2 threads, ``ADN_BENCH_ROUNDS`` (default 15)
rounds (about 20 minutes), 64 random calibration images (the ranges' data does not change the latency; accuracy needs a trained
checkpoint: docs/engine.md). ``ADN_BENCH_OUT=bench/results/cpu`` keeps the rows (``latency_cpu_openvino.json`` and
the table ``latency_cpu_openvino.md``). SMOKE mode (default): resnet20_adn (width 4) at 16², batch 1, 1 thread,
2 rounds.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import pytest
import torch

from adaptive_kernels._files import write_text
from bench import _harness as harness

FULL = os.environ.get("ADN_BENCH_CPU") == "1"
PROVIDERS = ("ort_engine", "openvino_fp32", "openvino_int8")
PAIRS = (("openvino_int8", "ort_engine"), ("openvino_int8", "openvino_fp32"), ("openvino_fp32", "ort_engine"))
CASES = [("resnet50_adn", {}, 224, (1, 8))] if FULL else [("resnet20_adn", {"width": 4}, 16, (1,))]
THREADS = 2 if FULL else 1
ROUNDS, WARMUP = (harness.env_int("ADN_BENCH_ROUNDS", 15), 2) if FULL else (2, 1)
CALIBRATION_IMAGES = 64
# FULL mode runs about 20 minutes (two INT8 builds of 16 sub-networks, 15 rounds at b8): past pytest-timeout's 10
pytestmark = pytest.mark.timeout(3600 if FULL else 600)
@pytest.mark.parametrize("name,kwargs,size,batches", CASES, ids=[c[0] for c in CASES])
def test_cpu_openvino_latency(rows, rows_dir, name, kwargs, size, batches):
    pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")
    openvino = pytest.importorskip("openvino", reason="pip install adaptive_kernels[openvino]")
    pytest.importorskip("nncf", reason="pip install adaptive_kernels[openvino]")
    import nncf
    import onnxruntime

    import adaptive_kernels as ak
    from adaptive_kernels.engine import OnnxRuntimeEngine, OpenVinoEngine
    from adaptive_kernels.numerics import relative_error

    torch.set_num_threads(THREADS)  # the conftest fixture restores the count afterwards
    torch.manual_seed(0)
    model = ak.create_model(name, **kwargs).eval()
    configs = model.skip_configs()
    example = torch.randn(1, model.in_chans, size, size)
    start = time.perf_counter()
    ort = OnnxRuntimeEngine(model, example, dynamic_batch=True)
    export_s = time.perf_counter() - start
    fp32 = OpenVinoEngine(model, example, dynamic_batch=True, onnx_model=ort.onnx_model)
    machine = {**harness.cpu_info(), "threads": THREADS, "onnxruntime": onnxruntime.__version__,
               "openvino": openvino.__version__, "nncf": nncf.__version__, "image_size": size, "export_s": export_s,
               "bench_mode": "cpu_full" if FULL else "cpu_smoke", "calibration_images": CALIBRATION_IMAGES}
    calibration = torch.randn(CALIBRATION_IMAGES, model.in_chans, size, size, generator=torch.Generator().manual_seed(1))

    for batch in batches:
        x = torch.randn(batch, model.in_chans, size, size)
        start = time.perf_counter()
        int8 = OpenVinoEngine(model, x, dynamic_batch=False, int8=True, calibration=calibration,
                              onnx_model=ort.onnx_model)  # each sub-network reshaped to this batch
        build_s = time.perf_counter() - start
        engines = {"ort_engine": ort, "openvino_fp32": fp32, "openvino_int8": int8}
        errors = {}
        with torch.inference_mode():
            for skip in configs:
                want = model(x, skip)
                for provider, engine in engines.items():
                    errors[provider, skip] = relative_error(engine(x, skip), want)
                    if provider != "openvino_int8":
                        assert errors[provider, skip] < 1e-4, (provider, skip, errors[provider, skip])
            for engine in engines.values():
                for skip in configs:
                    for _ in range(WARMUP):
                        engine(x, skip)
            load_before = harness.load_average()
            runners = {(p, skip): (lambda e=engines[p], s=skip, x=x: e(x, s)) for p in PROVIDERS for skip in configs}
            shuffle = random.Random(batch)
            samples = harness.interleaved_rounds(runners, PROVIDERS, configs, ROUNDS, shuffle)
            # switching: rounds of (a, a, b) on the INT8 engine; b after a vs a after a
            switch, same = [], []
            for r in range(ROUNDS * 4):
                a, b = shuffle.sample(configs, 2)
                int8(x, a)
                same.append(harness.time_call_us(lambda e=int8, x=x, a=a: e(x, a)))
                switch.append(harness.time_call_us(lambda e=int8, x=x, b=b: e(x, b)))
            load_after = harness.load_average()
        # the engine's own switching work: parse (cached) and pick the sub-network's compiled model
        picks = [configs[i % len(configs)] for i in range(10000)]
        t0 = time.perf_counter()
        for skip in picks:
            int8._subnets[int8._set_default(skip)[0]]
        pick_us = (time.perf_counter() - t0) / len(picks) * 1e6
        # memory: what deleting it hands back, after one run of each compiled model (the engine's calls above)
        static_mib = harness.openvino_static_fp32_mib(ort.onnx_model, x, THREADS)
        held = harness.resident_mib()
        del int8, engines, engine  # (the loop variable above holds the last engine, INT8)
        int8_mib = held - harness.resident_mib()
        common = {**machine, "load_avg_1min_before": load_before, "load_avg_1min_after": load_after,
                  "rounds": ROUNDS, "int8_build_s": round(build_s, 1)}
        for (provider, skip), times in samples.items():
            extra = {f"paired_ratio_{ref}": round(harness.paired_ratio(times, samples[ref, skip]), 4)
                     for p, ref in PAIRS if p == provider}
            dtype = torch.int8 if provider == "openvino_int8" else torch.float32
            rows.add(harness.make_row(provider=provider, model=name, skip=skip, batch=batch, dtype=dtype,
                                      timing=harness.Timing(times), macs=model.macs(skip, (size, size)),
                                      relative_error=errors[provider, skip], **common, **extra))
        rows.add(harness.make_row(provider="openvino_int8", model=name, skip="all", batch=batch, dtype=torch.int8,
                                  timing=None, macs=None, metric="memory", resident_mib=round(int8_mib, 1),
                                  static_fp32_resident_mib=round(static_mib, 1),
                                  ratio_to_static_fp32=round(int8_mib / static_mib, 3), **common))
        rows.add(harness.make_row(provider="openvino_int8", model=name, skip="switch", batch=batch, dtype=torch.int8,
                                  timing=harness.Timing(switch), macs=None, metric="switching",
                                  paired_difference_us=round(statistics.median(s - t for s, t in zip(switch, same)), 1),
                                  same_subnet_median_us=round(statistics.median(same), 1),
                                  engine_pick_us=round(pick_us, 2), **common))
    write_table(rows.rows, rows_dir / "latency_cpu_openvino.md")


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown: per model and batch, each sub-network's median per provider (ms), INT8's error against the model
    and the paired ratios; then memory and switching."""
    env = harness.environment()
    first = rows[0]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in first["cpu_flags"].items())
    lines = [
        "# OpenVINO on the CPU: fp32 and INT8 latency (medians of interleaved rounds, ms)", "",
        (f"Machine: {first['cpu']} ({first['cpu_vendor']} family {first['cpu_family']} model {first['cpu_model']}), "
         f"{first['cores']} cores, {first['threads']} threads; flags: {flags}. torch {env['torch']}, onnxruntime "
         f"{first['onnxruntime']}, openvino {first['openvino']}, nncf {first['nncf']}, python {env['python']}, git "
         f"{env['git_sha'][:10]}{' (dirty)' if env['git_dirty'] else ''}; mode {first['bench_mode']}; INT8 ranges "
         f"from {first['calibration_images']} random images (latency only: the error column is not an accuracy)."),
        ("Ratios are paired: the median over rounds of the two providers' times in the same round. Other jobs "
         "shared the machine: 1-minute load average before/after each batch's rounds below."), "",
    ]
    latency = [r for r in rows if r["metric"] == "latency"]
    for model, batch, group, by_skip in harness.by_model_and_batch(latency):
        lines += [(f"## {model}, batch {batch} ({group[0]['rounds']} rounds, load {group[0]['load_avg_1min_before']} "
                   f"-> {group[0]['load_avg_1min_after']}; INT8 build {group[0]['int8_build_s']} s)"), "",
                  "| skip | " + " | ".join(PROVIDERS) + " | int8 error | "
                  + " | ".join(f"{p} / {ref}" for p, ref in PAIRS) + " |",
                  "|---|" + "---|" * (len(PROVIDERS) + 1 + len(PAIRS))]
        table = []
        for skip in dict.fromkeys(r["skip"] for r in group):
            row = {p: by_skip[skip, p] for p in PROVIDERS}
            table.append({(p, ref): row[p][f"paired_ratio_{ref}"] for p, ref in PAIRS})
            lines.append(f"| {skip} | " + " | ".join(f"{row[p]['median_us'] / 1e3:.2f}" for p in PROVIDERS)
                         + f" | {row['openvino_int8']['relative_error']:.3f}"
                         + "".join(f" | {ratio:.3f}" for ratio in table[-1].values()) + " |")
        lines += ["", harness.ratio_ranges(table), ""]
        for r in rows:
            if r["model"] == model and r["batch"] == batch and r["metric"] == "memory":
                lines.append(f"Memory (resident memory handed back when deleted, after runs): the INT8 engine, all "
                             f"{len(group) // len(PROVIDERS)} sub-networks, {r['resident_mib']:.1f} MiB; one static "
                             f"fp32 super-net compiled by OpenVINO {r['static_fp32_resident_mib']:.1f} MiB: "
                             f"{r['ratio_to_static_fp32']:.2f}x.")
            if r["model"] == model and r["batch"] == batch and r["metric"] == "switching":
                lines.append(f"Switching (INT8 engine): a call to another sub-network than the call before costs "
                             f"{r['paired_difference_us']:.0f} us more than a repeated one (median of paired "
                             f"differences, {r['samples']} pairs; same-sub-network call {r['same_subnet_median_us']:.0f}"
                             f" us); the engine's own work to switch (parse, pick the compiled model) "
                             f"{r['engine_pick_us']:.2f} us.")
        lines.append("")
    write_text(path, "\n".join(lines))
