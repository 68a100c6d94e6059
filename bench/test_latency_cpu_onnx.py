"""CPU deployment: latency of every sub-network of ResNet-50-ADN and MobileNetV2-ADN (224², fp32, batch 1 and 8)
run four ways, measured side by side in interleaved rounds (one call of each provider and sub-network per round,
medians over rounds), so that load on a shared machine hits every provider alike:

  eager           the model, sub-network chosen by python skip flags (torch, CPU)
  onnx_static     ONNX Runtime on a static export of that sub-network alone (one file per sub-network)
  onnx_one_graph  ONNX Runtime on the one graph of every sub-network (an If per stage or pair of
                  small stages), mask fed as an input
  cpu_engine      adaptive_kernels' CPU engine on that graph (``compile(model, x_cpu)``: torch tensors in and out)

Every provider's output is checked against eager first (relative error < 1e-4). Rows: ``latency_cpu_onnx.json``
plus ``latency_cpu_onnx.md`` (the table with the ratios one_graph / static, engine / eager and engine / static) in
the rows folder.

The ratios are paired: in each round the providers of one sub-network run back to back, so the ratio of their two
times in that round sees the same load; a row's ratio is the median over rounds of those per-round ratios
(``paired_ratio_<reference>`` in the one-graph and engine rows). On a shared machine this is steadier than the ratio of two
medians, whose load may differ by the minutes between rounds.

FULL mode: ``ADN_BENCH_CPU=1`` (2 threads, at least 15 rounds and more where a round is short, up to about 2 minutes
per model and batch: ``ADN_BENCH_ROUNDS`` and ``ADN_BENCH_ROUNDS_BUDGET_S`` to change;
``ADN_BENCH_OUT=bench/results/cpu_onnx`` to keep the rows; ~20-27 minutes in all),
with ``OMP_WAIT_POLICY=PASSIVE`` so that torch's idle threads do not spin into the next provider's time (ONNX
Runtime's sessions do not spin: ``onnxruntime_session``).
SMOKE mode (default): resnet20_adn (width 4) at 16², batch 1, the base-net only, 1 thread, 2 rounds (its two
exports take ~15 s of CPU).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from adaptive_kernels._files import write_text
from bench._harness import (
    Timing,
    by_model_and_batch,
    cpu_info,
    env_int,
    environment,
    interleaved_rounds,
    load_average,
    make_row,
    paired_ratio,
    ratio_ranges,
)

FULL = os.environ.get("ADN_BENCH_CPU") == "1"
PROVIDERS = ("eager", "onnx_static", "onnx_one_graph", "cpu_engine")
CASES = (
    [("resnet50_adn", {}, 224, (1, 8)), ("mobilenet_v2_adn", {}, 224, (1, 8))]
    if FULL
    else [("resnet20_adn", {"width": 4}, 16, (1,))]
)
THREADS = 2 if FULL else 1
ROUNDS, WARMUP = (env_int("ADN_BENCH_ROUNDS", 15), 2) if FULL else (2, 1)
# More rounds where a round is short, up to about this long per model and batch: a paired ratio of 15 rounds of
# 5 ms calls spread by +-4 % between the sub-networks of one run (MobileNetV2 b1); 15 rounds of ResNet-50 b8 take
# 8 minutes and stay at 15.
ROUNDS_BUDGET_S = env_int("ADN_BENCH_ROUNDS_BUDGET_S", 120) if FULL else 0
# (provider, reference): the paired ratios reported. engine / static: what the engine's machine layout
# (engine/ort/layout.py) leaves of the one graph's cost over the static files.
PAIRS = (("onnx_one_graph", "onnx_static"), ("cpu_engine", "eager"), ("cpu_engine", "onnx_static"))
TOLERANCE = 1e-4


@pytest.mark.parametrize("name,kwargs,size,batches", CASES, ids=[c[0] for c in CASES])
def test_cpu_onnx_latency(rows, rows_dir, tmp_path, name, kwargs, size, batches):
    pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")
    import onnxruntime

    import adaptive_kernels as ak
    from adaptive_kernels.engine import OnnxRuntimeEngine
    from adaptive_kernels.export import INPUT, MASK, OUTPUT, mask_of, onnxruntime_session
    from adaptive_kernels.numerics import relative_error

    torch.set_num_threads(THREADS)  # the conftest fixture restores the count afterwards
    torch.manual_seed(0)
    model = ak.create_model(name, **kwargs).eval()
    configs = model.skip_configs() if FULL else [model.skip_configs()[-1]]  # smoke: the base-net, two exports
    example = torch.randn(1, model.in_chans, size, size)
    export_start = time.perf_counter()
    one_graph_path = ak.export_onnx(model, tmp_path / "one_graph.onnx", example)
    one_graph = onnxruntime_session(one_graph_path, THREADS)
    static = {skip: onnxruntime_session(ak.export_onnx(model, tmp_path / f"{ak.skip_to_str(skip)}.onnx", example,
                                                       skip=skip), THREADS) for skip in configs}
    engine = OnnxRuntimeEngine(model, example, dynamic_batch=True, onnx_model=one_graph_path.read_bytes())
    export_s = time.perf_counter() - export_start
    masks = {skip: mask_of(skip).numpy() for skip in configs}
    machine = {**cpu_info(), "threads": THREADS, "onnxruntime": onnxruntime.__version__,
               "bench_mode": "cpu_full" if FULL else "cpu_smoke",
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}

    for batch in batches:
        x = torch.randn(batch, model.in_chans, size, size)
        xn = x.numpy()
        runners = {}
        for skip in configs:
            runners["eager", skip] = lambda skip=skip, x=x: model(x, skip)
            runners["onnx_static", skip] = lambda skip=skip, xn=xn: static[skip].run([OUTPUT], {INPUT: xn})[0]
            runners["onnx_one_graph", skip] = lambda skip=skip, xn=xn: one_graph.run(
                [OUTPUT], {INPUT: xn, MASK: masks[skip]})[0]
            runners["cpu_engine", skip] = lambda skip=skip, x=x: engine(x, skip)
        with torch.inference_mode():
            for skip in configs:
                want = runners["eager", skip]()
                for provider in PROVIDERS[1:]:
                    error = relative_error(torch.as_tensor(runners[provider, skip]()), want)
                    assert error < TOLERANCE, f"{provider} {ak.skip_to_str(skip)} batch {batch}: relative error {error}"
            warm_start = time.perf_counter()
            for fn in runners.values():
                for _ in range(WARMUP):
                    fn()
            rounds = rounds_within(ROUNDS_BUDGET_S, (time.perf_counter() - warm_start) / WARMUP, ROUNDS)
            load_before = load_average()
            samples = interleaved_rounds(runners, PROVIDERS, configs, rounds, random.Random(batch))
            load_after = load_average()
        for (provider, skip), times in samples.items():
            timing = Timing(times)
            assert 0 < timing.p20_us <= timing.median_us <= timing.p80_us
            extra = {f"paired_ratio_{reference}": round(paired_ratio(times, samples[reference, skip]), 4)
                     for p, reference in PAIRS if p == provider}
            rows.add(make_row(provider=provider, model=name, skip=skip, batch=batch, dtype=torch.float32,
                              timing=timing, macs=model.macs(skip, (size, size)), image_size=size, export_s=export_s,
                              load_avg_1min_before=load_before, load_avg_1min_after=load_after, rounds=rounds,
                              **machine, **extra))
    write_table(rows.rows, rows_dir / "latency_cpu_onnx.md")


def rounds_within(budget_s: float, round_s: float, minimum: int) -> int:
    """How many rounds of ``round_s`` seconds fit in ``budget_s``, at least ``minimum``."""
    return max(minimum, int(budget_s / round_s) if round_s > 0 else minimum)


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown: per model and batch, each sub-network's median per provider (ms) and the paired ratios, then
    their range over the sub-networks."""
    env = environment()
    first = rows[0]
    lines = [
        "# CPU deployment latency (medians of interleaved rounds, ms)", "",
        (f"Machine: {first['cpu']}, {first['cores']} cores, {first['threads']} threads for torch and ONNX Runtime; "
        f"torch {env['torch']}, onnxruntime {first['onnxruntime']}, python {env['python']}, git {env['git_sha'][:10]}"
        f"{' (dirty)' if env['git_dirty'] else ''}; interleaved rounds (how many: per section), providers in "
        f"shuffled order; "
        f"OMP_WAIT_POLICY={first.get('omp_wait_policy') or 'unset'}; mode {first['bench_mode']}."),
        "Ratios are paired: the median over rounds of the two providers' times in the same round.",
        "Load: other jobs shared this machine; 1-minute load average before/after each batch's rounds below.", "",
    ]
    for model, batch, group, by_skip in by_model_and_batch(rows):
        lines += [(f"## {model}, batch {batch} ({group[0]['rounds']} rounds, load {group[0]['load_avg_1min_before']} "
                  f"-> {group[0]['load_avg_1min_after']})"), "",
                  "| skip | MMACs | " + " | ".join(PROVIDERS) + " | "
                  + " | ".join(f"{_short(p)} / {_short(ref)}" for p, ref in PAIRS) + " |",
                  "|---|---|" + "---|" * (len(PROVIDERS) + len(PAIRS))]
        table = []
        for skip in dict.fromkeys(r["skip"] for r in group):
            ms = {p: by_skip[skip, p]["median_us"] / 1e3 for p in PROVIDERS}
            paired = {(p, ref): by_skip[skip, p][f"paired_ratio_{ref}"] for p, ref in PAIRS}
            table.append(paired)
            lines.append(f"| {skip} | {by_skip[skip, 'eager']['macs'] / 1e6:.0f} | "
                         + " | ".join(f"{ms[p]:.2f}" for p in PROVIDERS)
                         + "".join(f" | {ratio:.3f}" for ratio in paired.values()) + " |")
        lines += ["", ratio_ranges(table), ""]
    write_text(path, "\n".join(lines))


def _short(provider: str) -> str:
    return {"onnx_one_graph": "one_graph", "onnx_static": "static", "cpu_engine": "engine"}.get(provider, provider)


def test_rounds_fill_the_budget_but_never_fall_below_the_minimum():
    assert rounds_within(120, 1.6, 15) == 75  # MobileNetV2 b1: 1.6 s a round
    assert rounds_within(120, 32.0, 15) == 15  # ResNet-50 b8: 32 s a round
    assert rounds_within(0, 0.01, 2) == 2  # smoke mode: no budget


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # rounds 1..3: ratios 2, 1, 3 -> median 2 (the ratio of the two medians would be 4 / 3)
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0
    with pytest.raises(ValueError, match="one time per round each, got 2 and 3"):
        paired_ratio([1.0, 2.0], [1.0, 2.0, 3.0])
