"""What the SLO-aware scheduler adds to each engine call on the CPU engine, against the goal (docs/serving.md): policy
and batching <= 2 % of the base-net's batch-1 latency; switching sub-network between batches costs nothing
measurable. The model is the demo's base net (ResNet-20-ADN width 8, 1 x 28 x 28, one thread, as ``serve
--threads 1`` runs it), profiled at batches 1..16 like the server. Rows: ``serving_dispatch.json``:

  policy    ``plan_dispatch`` per decision for queues of 1, 16 and 64 requests (``batch`` = queue size), tight
            deadlines (the super-net misses a full batch, so step 3 searches down to a smaller batch and a cheaper
            sub-network): ``provider="fifo"`` alike requests with one SLO (the server's usual queue, bisection) and
            ``provider="general"`` a mixed queue (sizes 1 and 2, one request in four forcing the base-net, jittered
            SLOs: one pass); at an arrival rate the base-net at full batch just keeps up with (the reserve, step 4,
            decides). ``share_of_base_b1`` = median / base-net batch-1 latency. The median is over rounds of
            ``CALLS`` decisions each (a single decision is too short for the clock).
  policy_after_idle  the same fifo decision (queues of 1 and 16) as the server's dispatcher meets it: each one
            timed alone right after its thread slept ``idle_us`` (100 µs, 1 ms: waiting for a request, or for the
            GIL), ``provider="fifo, after idle"``; and the same decision again at once, ``"fifo, repeated"`` (what the
            rows above measure). A thread that waited runs with cold caches on a shared (virtual) machine; inside
            the HTTP server the dispatcher's policy time is this, not the warm figure (bench/results/serving/README.md).
  batching  what the dispatcher does to a batch of 1 or 16 one-image inputs before the engine call, in
            interleaved rounds (same sitting): ``provider="ring"`` the scheduler's ``_batch_input`` (a view of its
            input ring), ``"torch.cat"`` what it did before (``torch.cat`` of the requests' tensors, ``.to``).
  submit_copy  what moved to the submitting thread, per one-image request, interleaved likewise:
            ``"ring.put"`` a tensor (the Python API) and ``"ring.put (http)"`` a decoded read-only array copied into
            the ring; ``"copy (http, before)"`` the copy HTTP decoding made before (``torch.from_numpy(a.copy())``).
  switch    paired, engine at batch 1: each round runs, in random order, (super, base) x 8 (15 switches) and
            super x 8 + base x 8 (1 switch), the same 16 calls; ``switch_us`` = median over rounds of their
            difference / 14, with a 95 % confidence interval of that median (order statistics) in
            ``switch_ci95_us``; ``share_of_call`` relative to the mean call.

SMOKE (default): 3 rounds, 20 switch rounds, numbers that only show the suite runs. ``ADN_BENCH_CPU=1``: 30 rounds
of 2000 decisions and 1000 switch rounds (~30 s); ``ADN_BENCH_OUT=DIR`` keeps the rows.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import numpy as np
import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.engine.ort.engine import onnxruntime_unavailable
from adaptive_kernels.models.skip import skip_to_str
from adaptive_kernels.serving import Queued, Scheduler, build_plan, plan_dispatch, rank_by_accuracy
from adaptive_kernels.serving.policy import Costs
from adaptive_kernels.serving.scheduler import _as_float32_array, _Request
from bench._harness import Timing, load_average, make_row, measure

FULL = os.environ.get("ADN_BENCH_CPU") == "1"
ROUNDS, CALLS, SWITCH_ROUNDS = (30, 2000, 1000) if FULL else (3, 200, 20)
MAX_BATCH = 16
QUEUES = (1, 16, 64)
MODEL = "resnet20_adn"


@pytest.fixture(scope="module")
def plan():
    if reason := onnxruntime_unavailable():
        pytest.skip(f"needs the CPU engine: {reason}")
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=10, in_chans=1, width=8).eval()
    accuracy = {s: 90.7 - 0.1 * sum(s) for s in model.skip_configs()}  # only the order matters here
    return build_plan(model, MODEL, (1, 28, 28), max_batch=MAX_BATCH, accuracy=accuracy, profile_iters=20)


def queues(plan, n: int, now: float) -> dict[str, list[Queued]]:
    """The fifo and the mixed queue of ``n`` requests; deadlines 0.75 x the base-net's full-batch latency away."""
    latency = plan.latency
    base = min(plan.accuracy, key=lambda s: latency.profiled(s, 1))
    slack = 0.75 * latency.profiled(base, MAX_BATCH)
    rng = random.Random(n)
    fifo = [Queued(now + slack + 1e-6 * i, 1, None, slack) for i in range(n)]  # one SLO: the burst guard decides too
    mixed = [Queued(now + slack * rng.uniform(1.0, 1.5), 1 + i % 2, base if i % 4 == 3 else None, slack)
             for i in range(n)]
    return {"fifo": fifo, "general": mixed}


def per_decision(timing: Timing) -> Timing:
    return Timing([t / CALLS for t in timing.samples_us])


def policy_inputs(plan) -> tuple[Costs, float, float, float]:
    """The policy's table, the base-net's batch-1 latency (µs), the correction factor in use and an arrival rate the
    base-net at full batch just keeps up with (so that step 4, the reserve, decides)."""
    latency = plan.latency
    costs = Costs.build(latency.profiled, rank_by_accuracy(plan.accuracy, latency.predict), MAX_BATCH)
    base = min(plan.accuracy, key=lambda s: latency.profiled(s, 1))
    return costs, latency.profiled(base, 1) * 1e6, latency.factor, MAX_BATCH / latency.profiled(base, MAX_BATCH)


@pytest.mark.parametrize("n", QUEUES)
def test_policy_cost(benchmark_or_none, rows, plan, n):
    costs, base_b1, factor, rate = policy_inputs(plan)
    now = 100.0
    common = {"model": MODEL, "batch": n, "dtype": torch.float32, "macs": None, "base_b1_us": round(base_b1, 3)}
    for provider, queue in queues(plan, n, now).items():
        fifo = provider == "fifo"
        decision = plan_dispatch(queue, now, costs, factor, fifo=fifo, rate=rate)
        if fifo:  # the bisection decides as the general pass does
            assert decision == plan_dispatch(queue, now, costs, factor, rate=rate)
        assert decision.serve and decision.batch <= MAX_BATCH

        def decide(queue=queue, fifo=fifo):
            for _ in range(CALLS):
                plan_dispatch(queue, now, costs, factor, fifo=fifo, rate=rate)

        benchmark = benchmark_or_none() if fifo else None  # pytest-benchmark times one function per test
        if benchmark is not None:
            benchmark.group = "serving policy (per CALLS decisions)"
        timing = per_decision(measure(decide, benchmark, warmup=1, rounds=ROUNDS))
        rows.add(make_policy_row(provider, timing, base_b1, common, metric="policy", served=decision.batch,
                                 skip=skip_to_str(decision.skip)))


@pytest.mark.parametrize("idle_us", (100, 1000))
def test_policy_cost_after_idle(rows, plan, idle_us):
    costs, base_b1, factor, rate = policy_inputs(plan)
    now = 100.0
    clock = time.perf_counter_ns
    for n in (1, MAX_BATCH):
        queue = queues(plan, n, now)["fifo"]
        decision = plan_dispatch(queue, now, costs, factor, fifo=True, rate=rate)
        assert decision.serve and decision == plan_dispatch(queue, now, costs, factor, rate=rate)  # as the pass does
        cold, warm = [], []
        for _ in range(ROUNDS * 100):
            time.sleep(idle_us / 1e6)
            start = clock()
            plan_dispatch(queue, now, costs, factor, fifo=True, rate=rate)
            between = clock()
            plan_dispatch(queue, now, costs, factor, fifo=True, rate=rate)
            cold.append((between - start) / 1e3)
            warm.append((clock() - between) / 1e3)
        common = {"model": MODEL, "batch": n, "dtype": torch.float32, "macs": None, "base_b1_us": round(base_b1, 3),
                  "idle_us": idle_us}
        for provider, samples in (("fifo, after idle", cold), ("fifo, repeated", warm)):
            rows.add(make_policy_row(provider, Timing(samples), base_b1, common, metric="policy_after_idle",
                                     served=decision.batch, skip=skip_to_str(decision.skip)))


def interleaved(candidates: dict[str, object]) -> dict[str, Timing]:
    """Per-call µs of each candidate (a function that makes CALLS calls): ROUNDS rounds, the candidates in random
    order in each."""
    samples = {name: [] for name in candidates}
    rng = random.Random(0)
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(ROUNDS):
        for name, fn in rng.sample(list(candidates.items()), len(candidates)):
            start = time.perf_counter_ns()
            fn()  # CALLS calls
            samples[name].append((time.perf_counter_ns() - start) / 1e3 / CALLS)
    return {name: Timing(values) for name, values in samples.items()}


@pytest.mark.parametrize("n", (1, MAX_BATCH))
def test_batching_cost(rows, plan, n):
    latency = plan.latency
    base_b1 = min(latency.profiled(s, 1) for s in plan.accuracy) * 1e6
    common = {"model": MODEL, "batch": n, "dtype": torch.float32, "macs": None, "base_b1_us": round(base_b1, 3)}
    scheduler = Scheduler(plan.engine, plan.example_input, latency, plan.accuracy)
    scheduler.close()  # its dispatcher ends: the batch below is ours
    images = [torch.randn(1, 1, 28, 28) for _ in range(n)]
    ring = scheduler.ring
    batch = [_Request(None, ring.put(x.numpy(), None), 0.0, Queued(1.0)) for x in images]
    device = plan.example_input.device
    assert np.array_equal(scheduler._batch_input(batch, n, True), torch.cat(images).numpy())  # NumPy: a CPU engine

    def ring_view():
        for _ in range(CALLS):
            scheduler._batch_input(batch, n, True)

    def cat_before():  # Scheduler._run before the ring
        for _ in range(CALLS):
            x = images[0] if len(images) == 1 else torch.cat(images)
            x.to(device, torch.float32)

    for provider, timing in interleaved({"ring": ring_view, "torch.cat": cat_before}).items():
        rows.add(make_policy_row(provider, timing, base_b1, common, metric="batching", served=n, skip="-"))
    if n != 1:
        return
    x = images[0]
    array = x.numpy()
    decoded = np.frombuffer(array.tobytes(), dtype="<f4").reshape(array.shape)  # read-only, as HTTP decodes

    def put_tensor():
        for _ in range(CALLS):
            ring.put(_as_float32_array(x), None)

    def put_decoded():
        for _ in range(CALLS):
            ring.put(_as_float32_array(decoded), None)

    def copy_before():
        for _ in range(CALLS):
            torch.from_numpy(decoded.copy())

    candidates = {"ring.put": put_tensor, "ring.put (http)": put_decoded, "copy (http, before)": copy_before}
    for provider, timing in interleaved(candidates).items():
        rows.add(make_policy_row(provider, timing, base_b1, common, metric="submit_copy", served=1, skip="-"))


def make_policy_row(provider: str, timing: Timing, base_b1: float, common: dict, *, metric: str, served: int,
                    skip: str) -> dict:
    return make_row(provider=provider, skip=skip, timing=timing, metric=metric, served=served,
                    share_of_base_b1=round(timing.median_us / base_b1, 5), load_avg_1min=load_average(), **common)


def median_ci95(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median: order statistics n/2 -+ 0.98 sqrt(n)."""
    ordered = sorted(values)
    half = 0.98 * len(ordered) ** 0.5
    lo, hi = int(len(ordered) / 2 - half), int(len(ordered) / 2 + half)
    return ordered[max(lo, 0)], ordered[min(hi, len(ordered) - 1)]


def test_switching_sub_network_between_batches(rows, plan):
    engine = plan.engine
    ranking = rank_by_accuracy(plan.accuracy, plan.latency.predict)
    super_net, base_net = ranking[0], ranking[-1]
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(engine(x, skip=super_net), engine(x, skip=base_net))  # two sub-networks run
    alternating = [super_net, base_net] * 8
    constant = [super_net] * 8 + [base_net] * 8

    def run(order) -> float:
        start = time.perf_counter_ns()
        for skip in order:
            engine(x, skip=skip)
        return (time.perf_counter_ns() - start) / 1e3

    rng = random.Random(0)
    run(alternating), run(constant)  # warm-up
    differences, constant_us = [], []
    for _ in range(SWITCH_ROUNDS):
        first, second = (alternating, constant) if rng.random() < 0.5 else (constant, alternating)
        times = {id(first): run(first), id(second): run(second)}
        differences.append((times[id(alternating)] - times[id(constant)]) / 14)
        constant_us.append(times[id(constant)] / 16)
    switch_us = statistics.median(differences)
    lo, hi = median_ci95(differences)
    call_us = statistics.median(constant_us)
    rows.add(make_row(provider=engine.mechanism, model=MODEL, skip=f"{skip_to_str(super_net)}<->"
                      f"{skip_to_str(base_net)}", batch=1, dtype=torch.float32, timing=Timing(constant_us), macs=None,
                      metric="switch", switch_us=round(switch_us, 3), switch_ci95_us=[round(lo, 3), round(hi, 3)],
                      share_of_call=round(switch_us / call_us, 5), rounds=SWITCH_ROUNDS))
