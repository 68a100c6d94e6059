"""The scheduler: every request answered exactly once (served, refused or failed), outputs of the sub-network that
served them, graceful shutdown; with a fake engine and with a real small CPU engine against the torch model."""

from __future__ import annotations

import copy
import math
import re
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest
import torch

from adaptive_kernels.models.skip import all_skip_configs, skip_to_str
from adaptive_kernels.serving import LatencyModel, Refused, Scheduler
from adaptive_kernels.serving.policy import RESERVE_SHARE
from adaptive_kernels.serving.scheduler import InputRing

SKIPS = all_skip_configs(2)
SHAPE = (1, 4, 4)


class FakeEngine:
    """Sleeps the profiled time; the output encodes the input and the sub-network: (sum of the image, #skipped)."""

    mechanism = "fake"

    def __init__(self, fail: bool = False, hold: threading.Event | None = None):
        self.fail, self.hold, self.calls, self.threads = fail, hold, 0, set()

    def __call__(self, x, skip=None):
        if self.hold is not None:
            self.hold.wait(30)
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("engine broke")
        time.sleep(2e-4 * (4 - sum(skip)) * (1 + 0.5 * (x.shape[0] - 1)) / 4)
        return torch.stack([x.sum(dim=(1, 2, 3)), torch.full((x.shape[0],), float(sum(skip)))], dim=1)


ACCURACY = {s: 90.0 - sum(s) for s in SKIPS}


def fake_scheduler_latency() -> LatencyModel:
    """FakeEngine's profile: 50 µs per stage run, +50 % per extra input."""
    return LatencyModel({b: {skip_to_str(s): 50 * (4 - sum(s)) * (1 + 0.5 * (b - 1)) for s in SKIPS}
                         for b in (1, 2, 4)})


def fake_scheduler(max_queue_bytes: int | None = None, **kw) -> Scheduler:
    bound = {} if max_queue_bytes is None else {"max_queue_bytes": max_queue_bytes}
    return Scheduler(FakeEngine(**kw), torch.zeros(1, *SHAPE), fake_scheduler_latency(), ACCURACY, **bound)


class SlowEngine(FakeEngine):
    """FakeEngine taking ``seconds`` more per call than its profile says."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __call__(self, x, skip=None):
        time.sleep(self.seconds)
        return super().__call__(x, skip)


def test_scheduler_answers_every_request_once_with_its_own_output():
    scheduler = fake_scheduler()
    sent = []  # (input, future) pairs, appended as one item: 4 threads append at once

    def client(seed: int):
        g = torch.Generator().manual_seed(seed)
        for i in range(60):
            x = torch.randn(1 + i % 2, *SHAPE, generator=g)
            slo = 1e-5 if i % 10 == 0 else 0.05  # 1 in 10 cannot be met by any sub-network: refused
            sent.append((x, scheduler.submit(x, slo)))
            time.sleep(1e-4)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    scheduler.close()
    futures = [f for _, f in sent]
    assert all(f.done() for f in futures)
    stats = scheduler.stats()
    assert stats.submitted == len(futures) == stats.served + stats.refused + stats.failed
    assert stats.queued == stats.in_flight == stats.failed == 0
    refused = [f for f in futures if f.exception() is not None]
    assert len(refused) == stats.refused >= 24 and all(isinstance(f.exception(), Refused) for f in refused)
    for x, f in sent:
        if f.exception() is None:
            served = f.result()
            assert served.output.shape == (x.shape[0], 2)
            torch.testing.assert_close(served.output[:, 0], x.sum(dim=(1, 2, 3)))
            assert served.output[0, 1].item() == served.skip.count("T")
    assert sum(stats.by_skip.values()) == stats.served
    assert len(scheduler.engine.threads) == 1  # one dispatcher thread calls the engine
    assert stats.batches < stats.served  # requests were batched


def test_scheduler_shutdown_answers_the_queue_and_refuses_later_requests():
    scheduler = fake_scheduler()
    futures = [scheduler.submit(torch.ones(1, *SHAPE), 10.0) for _ in range(40)]
    scheduler.close()
    assert all(f.done() and f.exception() is None for f in futures)
    late = scheduler.submit(torch.ones(1, *SHAPE), 10.0)
    with pytest.raises(Refused, match="shutting down"):
        late.result(timeout=1)
    stats = scheduler.stats()
    assert (stats.submitted, stats.served, stats.refused) == (41, 40, 1)


def test_close_called_from_a_done_callback_on_the_dispatcher_answers_everything_without_error(caplog):
    # the callback runs on the dispatcher's own thread, which close() must not try to join (it logged "cannot join
    # current thread" through concurrent.futures and did not close in order)
    hold = threading.Event()
    scheduler = fake_scheduler(hold=hold)
    with caplog.at_level("ERROR"):
        first = scheduler.submit(torch.ones(1, *SHAPE), 10.0)
        first.add_done_callback(lambda _: scheduler.close())
        queued = [scheduler.submit(torch.ones(1, *SHAPE), 10.0) for _ in range(5)]
        hold.set()
        assert first.result(timeout=10).skip and all(f.result(timeout=10).skip for f in queued)
        scheduler._thread.join(timeout=10)
    assert not scheduler._thread.is_alive() and not caplog.records
    with pytest.raises(Refused, match="shutting down"):
        scheduler.submit(torch.ones(1, *SHAPE), 10.0).result(timeout=1)
    stats = scheduler.stats()
    assert (stats.submitted, stats.served, stats.refused, stats.queued) == (7, 6, 1, 0)


def test_a_request_cannot_be_cancelled_and_the_dispatcher_answers_on():
    # a caller cancelling a queued request's future (asyncio.wrap_future does when its task is cancelled) once made
    # the dispatcher's set_result raise: its thread ended and every later request waited forever
    hold = threading.Event()
    scheduler = fake_scheduler(hold=hold)
    try:
        running = scheduler.submit(torch.ones(1, *SHAPE), 10.0)
        while scheduler.stats().in_flight == 0:
            time.sleep(1e-3)
        queued = scheduler.submit(torch.ones(1, *SHAPE), 10.0)
        assert not queued.cancel() and not running.cancel()
        hold.set()
        later = scheduler.submit(torch.ones(1, *SHAPE), 10.0)
        assert all(f.result(timeout=10).skip for f in (running, queued, later))
    finally:
        hold.set()
        scheduler.close()
    assert scheduler.stats().served == 3


def test_scheduler_knows_when_its_queue_is_fifo():
    # the policy's fifo shortcut is right only for alike requests with deadlines in arrival order
    hold = threading.Event()
    scheduler = fake_scheduler(hold=hold)
    try:
        scheduler.submit(torch.ones(1, *SHAPE), 10.0)  # the dispatcher takes it and waits in the engine
        while scheduler.stats().in_flight == 0:
            time.sleep(1e-3)
        flags = []
        for size, slo, skip in [(1, 10.0, None), (1, 10.0, None), (1, 5.0, None), (1, 10.0, None)]:
            scheduler.submit(torch.ones(size, *SHAPE), slo, skip)
            flags.append(scheduler._fifo)
        assert flags == [True, True, False, False]  # an earlier deadline behind a later one: fifo until drained
        hold.set()
        while scheduler.stats().queued:
            time.sleep(1e-3)
        for size, skip in [(1, None), (2, None), (1, "TT")]:
            scheduler.submit(torch.ones(size, *SHAPE), 60.0, skip)
            flags.append(scheduler._fifo)
    finally:
        hold.set()
        scheduler.close()
    assert flags[4] is True  # an empty queue starts over
    assert scheduler.stats().served == 8


def test_scheduler_passes_the_arrival_rate_to_the_policy(monkeypatch):
    from adaptive_kernels.serving import scheduler as module

    seen, policy = [], module.plan_dispatch  # (now, rate, share) of each decision

    def recording(queue, now, costs, factor=1.0, *, fifo=False, rate=0.0, overhead=0.0, share=RESERVE_SHARE):
        seen.append((now, rate, share))
        return policy(queue, now, costs, factor, fifo=fifo, rate=rate, overhead=overhead, share=share)

    monkeypatch.setattr(module, "plan_dispatch", recording)
    clock = [0.0]  # a simulated clock, moved only while the dispatcher waits in the engine
    hold = threading.Event()
    tables = {b: {skip_to_str(s): 50 * (4 - sum(s)) * (1 + 0.5 * (b - 1)) for s in SKIPS} for b in (1, 2, 4)}
    scheduler = Scheduler(FakeEngine(hold=hold), torch.zeros(1, *SHAPE), LatencyModel(tables),
                          {s: 90.0 - sum(s) for s in SKIPS}, clock=lambda: clock[0])
    try:
        scheduler.submit(torch.ones(1, *SHAPE), 10.0)
        while scheduler.stats().in_flight == 0:
            time.sleep(1e-3)
        for i in range(1, 10):  # nine more arrivals, 0.1 s apart
            clock[0] = 0.1 * i
            scheduler.submit(torch.ones(1, *SHAPE), 10.0)
        clock[0] = 1.5
        hold.set()
        while scheduler.stats().queued:
            time.sleep(1e-3)
    finally:
        hold.set()
        scheduler.close()
    assert seen[0] == (0.0, 0.0, RESERVE_SHARE)  # one arrival: no rate yet; the cautious share
    # the next decision at 1.5 s: the window's 8 latest arrivals, 0.2 .. 0.9 s, 7 gaps over 1.5 - 0.2 s; the share
    # after one request served in time
    assert seen[1] == (1.5, pytest.approx(7 / 1.3), pytest.approx(RESERVE_SHARE * math.exp(scheduler.reserve.budget)))
    assert scheduler.stats().served == 10


def test_scheduler_reserve_share_follows_the_attainment_of_the_requests_it_chose_a_sub_network_for():
    scheduler = fake_scheduler()
    budget, x = scheduler.reserve.budget, torch.ones(1, *SHAPE)
    try:
        for _ in range(20):  # one at a time, 1 s to spare: each met
            assert scheduler.submit(x, 1.0).result(10).met
        up = scheduler.reserve.share
        assert up == pytest.approx(RESERVE_SHARE * math.exp(20 * budget))
        for _ in range(5):  # forcing a sub-network: the client's choice, not the policy's
            scheduler.submit(x, 1.0, skip=SKIPS[0]).result(10)
        with pytest.raises(Refused):
            scheduler.submit(x, 1e-5, skip=SKIPS[0]).result(10)
        assert scheduler.reserve.share == up
        with pytest.raises(Refused):  # a miss of its own
            scheduler.submit(x, 1e-5).result(10)
        assert scheduler.reserve.share == pytest.approx(max(RESERVE_SHARE, up * math.exp(budget - 1)))
    finally:
        scheduler.close()
    tables = {b: {skip_to_str(s): 50 * (4 - sum(s)) * (1 + 0.5 * (b - 1)) for s in SKIPS} for b in (1, 2, 4)}
    cautious = Scheduler(FakeEngine(), torch.zeros(1, *SHAPE), LatencyModel(tables), {s: 90.0 - sum(s) for s in SKIPS},
                         miss_budget=0.0)  # serve --miss-budget 0: the share never rises
    try:
        for _ in range(5):
            assert cautious.submit(x, 1.0).result(10).met
        assert cautious.reserve.share == RESERVE_SHARE
    finally:
        cautious.close()


def test_scheduler_refuses_at_once_what_its_full_queue_cannot_hold():
    """The queue holds at most max_queue_bytes of inputs (here 8 one-image requests of 64 bytes): past that a request
    is refused at once with a reason, counted; served ones free their room, so the queue takes them again."""
    hold = threading.Event()
    scheduler = fake_scheduler(max_queue_bytes=8 * 64 + 63, hold=hold)  # 8 images, not 9
    try:
        first = scheduler.submit(torch.ones(1, *SHAPE), 60.0)
        while scheduler.stats().in_flight == 0:  # held in the engine: the rest queue behind it
            time.sleep(1e-3)
        two = scheduler.submit(torch.ones(2, *SHAPE), 60.0)
        queued = [scheduler.submit(torch.ones(1, *SHAPE), 60.0) for _ in range(6)]  # 8 images wait
        over = [scheduler.submit(torch.ones(1, *SHAPE), 60.0), scheduler.submit(torch.ones(2, *SHAPE), 60.0)]
        for future in over:
            assert future.done()
            with pytest.raises(Refused, match=r"the queue is full \(8 images wait, the most max_queue_bytes / "
                                              r"--max-queue-mb allows\)"):
                future.result()
        assert scheduler.stats().queued == 7 and scheduler.stats().refused == 2
        hold.set()
        for future in (first, two, *queued):
            future.result(timeout=30)
        again = [scheduler.submit(torch.ones(1, *SHAPE), 60.0) for _ in range(8)]  # the room is back
        wait(again, timeout=30)
        assert all(f.exception() is None for f in again)
    finally:
        hold.set()
        scheduler.close()
    stats = scheduler.stats()
    assert (stats.submitted, stats.served, stats.refused) == (18, 16, 2)
    with pytest.raises(ValueError, match=r"max_queue_bytes=100: the queue must hold at least one full batch \(4 x "
                                         r"1x4x4 float32 = 256 bytes\); raise it"):
        fake_scheduler(max_queue_bytes=100)


def test_scheduler_engine_failure_is_every_batched_request_s_answer():
    scheduler = fake_scheduler(fail=True)
    futures = [scheduler.submit(torch.ones(1, *SHAPE), 10.0) for _ in range(5)]
    wait(futures, timeout=5)
    scheduler.close()
    assert all(isinstance(f.exception(), RuntimeError) for f in futures)
    assert scheduler.stats().failed == 5


def test_scheduler_rejects_bad_input_in_one_line():
    scheduler = fake_scheduler()
    try:
        with pytest.raises(ValueError, match=r"takes \(N, 1, 4, 4\)"):
            scheduler.submit(torch.ones(1, 3, 4, 4), 1.0)
        with pytest.raises(ValueError, match="1..4 images per request"):
            scheduler.submit(torch.ones(5, *SHAPE), 1.0)
        for slo_s in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match=f"the SLO must be a positive, finite number of seconds, got {slo_s}"):
                scheduler.submit(torch.ones(1, *SHAPE), slo_s)
        with pytest.raises(ValueError, match="skip|stages"):
            scheduler.submit(torch.ones(1, *SHAPE), 1.0, skip="TFT")
        with pytest.raises(TypeError, match="input must be a torch.Tensor or a NumPy array .*, got list"):
            scheduler.submit(torch.ones(1, *SHAPE).tolist(), 1.0)
        with pytest.raises(TypeError, match="the SLO must be a number of seconds, got str '1'"):
            scheduler.submit(torch.ones(1, *SHAPE), "1")
    finally:
        scheduler.close()
    assert scheduler.stats().submitted == 0


def test_scheduler_counts_a_request_s_slo_from_when_it_was_received():
    # a front end reads the request (and decodes it) before submitting: the client's clock ran meanwhile
    scheduler = fake_scheduler()
    try:
        x = torch.ones(1, *SHAPE)
        on_time = scheduler.submit(x, 0.05).result(timeout=10)
        assert on_time.met and on_time.latency_s < 0.01
        received = scheduler.now() - 0.02
        late_start = scheduler.submit(x, 0.05, received=received).result(timeout=10)
        assert late_start.met and late_start.latency_s >= 0.02  # counted from receipt, not from submit
        # 50 us of its 50 ms left: less than any sub-network's 100 us, so refused at once, never served late
        with pytest.raises(Refused, match="deadline cannot be met"):
            scheduler.submit(x, 0.05, received=scheduler.now() - 0.05 + 5e-5).result(timeout=10)
        for bad in ("0", True, math.nan, math.inf, None.__class__):
            with pytest.raises(TypeError, match=r"received must be a time on the scheduler's clock \(Scheduler.now"):
                scheduler.submit(x, 0.05, received=bad)
        with pytest.raises(ValueError, match="later than the scheduler's clock now"):
            scheduler.submit(x, 0.05, received=scheduler.now() + 1.0)
    finally:
        scheduler.close()
    stats = scheduler.stats()
    assert (stats.submitted, stats.served, stats.refused) == (3, 2, 1)


def test_scheduler_keeps_a_numpy_float32_slo_exact_on_a_clock_far_from_zero():
    # perf_counter() is ~1e4-1e5 s on a machine that has run a while; float32 there steps by ~4 ms: a deadline of
    # arrival + np.float32(0.0025) rounded up to 3.9 ms, and requests served in 3 ms were counted as met
    start = time.perf_counter()
    scheduler = Scheduler(SlowEngine(3e-3), torch.zeros(1, *SHAPE), fake_scheduler_latency(), ACCURACY,
                          clock=lambda: 41839.5 + (time.perf_counter() - start))
    try:
        served = scheduler.submit(torch.ones(1, *SHAPE), np.float32(0.0025)).result(timeout=10)
    finally:
        scheduler.close()
    assert served.latency_s > 0.003 and served.met is False  # a Python bool: the answer and the counters serialise
    assert type(scheduler.stats().met) is int


def test_a_listener_that_raises_is_reported_once_and_every_request_is_still_answered(caplog):
    scheduler = fake_scheduler()
    heard = []

    def broken(outcome):
        raise RuntimeError("listener bug")

    scheduler.listeners += [broken, heard.append]
    try:
        with caplog.at_level("ERROR", logger="adaptive_kernels.serving.scheduler"):
            futures = [scheduler.submit(torch.ones(1, *SHAPE), 10.0) for _ in range(3)]
            assert all(f.result(timeout=10).skip for f in futures)
    finally:
        scheduler.close()
    assert len(heard) == 3 and scheduler.stats().served == 3  # the listeners after it heard each one too
    reports = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(reports) == 1 and "listener bug" in caplog.text


@pytest.mark.parametrize("example, error, message", [
    (np.zeros((1, *SHAPE), np.float32), TypeError, "example_input must be the torch.Tensor the engine was compiled"),
    (torch.zeros(SHAPE), ValueError, r"example_input has shape \(1, 4, 4\): give the \(N, C, H, W\) input"),
    (torch.zeros(1, *SHAPE, dtype=torch.int64), ValueError, "example_input is torch.int64 on cpu: give the floating"),
    (torch.zeros(1, *SHAPE, device="meta"), ValueError, "example_input is torch.float32 on meta"),
])
def test_scheduler_rejects_an_example_input_no_engine_was_compiled_with(example, error, message):
    with pytest.raises(error, match=message):
        Scheduler(FakeEngine(), example, fake_scheduler_latency(), ACCURACY)


def test_scheduler_takes_a_queue_bound_of_any_integer_type_and_refuses_other_types_and_complex_inputs():
    scheduler = fake_scheduler(max_queue_bytes=np.int64(4 * 64))  # NumPy's integers are integers
    try:
        with pytest.raises(TypeError, match="input is torch.complex64: the model takes real images"):
            scheduler.submit(torch.ones(1, *SHAPE, dtype=torch.complex64), 1.0)
        with pytest.raises(TypeError, match="input is complex128"):
            scheduler.submit(np.ones((1, *SHAPE), np.complex128), 1.0)
    finally:
        scheduler.close()
    with pytest.raises(TypeError, match="max_queue_bytes must be a whole number of bytes, got float 25088.0"):
        fake_scheduler(max_queue_bytes=25088.0)


@pytest.mark.parametrize("accuracy, message", [
    ({}, "the accuracy table is empty"),
    ({"FF": 90.0, "TT": math.nan}, "the accuracy of TT is nan: give a finite number"),
    ({"FF": 90.0, "TT": None}, "the accuracy of TT is None: give a finite number"),
    ({"FFF": 90.0}, "skip='FFF' has 3 letters but this model has 2 skippable stages"),
])
def test_scheduler_rejects_a_bad_accuracy_table_in_one_line(accuracy, message):
    tables = {1: {skip_to_str(s): 100.0 for s in SKIPS}}
    with pytest.raises(ValueError, match=re.escape(message)):
        Scheduler(FakeEngine(), torch.zeros(1, *SHAPE), LatencyModel(tables), accuracy)


def test_scheduler_on_the_cpu_engine_matches_the_model(small_model, small_plan):
    model, plan = small_model, small_plan
    skips = model.skip_configs()
    scheduler = Scheduler(plan.engine, plan.example_input, plan.latency, plan.accuracy)
    x = torch.randn(24, 1, 16, 16)
    futures = [scheduler.submit(x[i:i + 1], 5.0, skip=skips[i % len(skips)] if i % 3 == 0 else None)
               for i in range(len(x))]
    scheduler.close()
    stats = scheduler.stats()
    assert stats.served == len(x) and stats.refused == stats.failed == 0
    with torch.no_grad():
        for i, f in enumerate(futures):
            served = f.result()
            if i % 3 == 0:
                assert served.skip == skip_to_str(skips[i % len(skips)])  # the forced sub-network ran
            expected = model(x[i:i + 1], skip=served.skip)
            torch.testing.assert_close(served.output, expected, rtol=1e-4, atol=1e-4)
            others = [s for s in skips if skip_to_str(s) != served.skip]
            assert all((model(x[i:i + 1], skip=s) - expected).abs().max() > 1e-3 for s in others)


class GatedEngine:
    """Wraps an engine: each call first waits for ``gate`` (so that requests queue up behind it) and records the
    batch it got."""

    def __init__(self, engine):
        self.engine, self.gate, self.batches, self.inputs = engine, threading.Event(), [], set()
        self.mechanism = getattr(engine, "mechanism", "fake")
        self.numpy_io = getattr(engine, "numpy_io", False)

    def __call__(self, x, skip=None):
        self.gate.wait(30)
        self.batches.append(x.shape[0])
        self.inputs.add(type(x))
        return self.engine(x, skip=skip)


def queue_behind_one_call(scheduler: Scheduler, engine: GatedEngine, inputs, slo: float = 60.0, skips=None):
    """``inputs[0]`` runs (held at the gate) while the others queue; then the gate opens and the queue drains."""
    engine.gate.clear()
    first = scheduler.submit(inputs[0], slo)
    while scheduler.stats().in_flight == 0:
        time.sleep(1e-3)
    futures = [first, *(scheduler.submit(x, slo, None if skips is None else skips[i]) for i, x in enumerate(inputs)
                        if i)]
    engine.gate.set()
    wait(futures, timeout=30)
    return futures


def serve_behind_one_call(scheduler: Scheduler, engine: GatedEngine, inputs, skips=None):
    """:func:`queue_behind_one_call` once, then the scheduler closed (also when it fails)."""
    try:
        return queue_behind_one_call(scheduler, engine, inputs, skips=skips)
    finally:
        engine.gate.set()
        scheduler.close()


def batching_pays(skips, buckets=(1, 2, 4, 8, 16), padded: bool = False) -> LatencyModel:
    """A profile where a batch costs less than its parts (the policy does not split it), alike for every skip."""
    return LatencyModel({b: {skip_to_str(s): 10.0 * (1 + 0.5 * (b - 1)) for s in skips} for b in buckets},
                        padded=padded)


def test_scheduler_batch_of_sixteen_distinct_inputs_answers_each_like_the_model_alone(small_model, small_plan):
    # 16 one-image requests queued behind a running call go to the engine as ONE batch of 16 (a view of the input
    # ring); each answer must be the model's on that request's own input, over enough rounds that the ring wraps
    model = small_model
    engine = GatedEngine(small_plan.engine)
    skips = model.skip_configs()
    # a profile where batching pays (a batch costs less than its parts): the policy does not split the batch
    scheduler = Scheduler(engine, small_plan.example_input, batching_pays(skips), small_plan.accuracy)
    rounds = scheduler.ring.rows // 16 + 2
    g = torch.Generator().manual_seed(0)
    try:
        sent = []
        for _ in range(rounds):
            inputs = [torch.randn(1, 1, 16, 16, generator=g) for _ in range(17)]
            sent += zip(inputs, queue_behind_one_call(scheduler, engine, inputs))
    finally:
        engine.gate.set()
        scheduler.close()
    assert engine.batches.count(16) == rounds  # every round's 16 requests ran as one batch
    assert engine.inputs == {np.ndarray}  # the CPU engine is fed NumPy views of the ring
    with torch.no_grad():
        for i, (x, future) in enumerate(sent):
            served = future.result()
            assert served.batch == (1 if i % 17 == 0 else 16)
            torch.testing.assert_close(served.output, model(x, skip=served.skip), rtol=1e-4, atol=1e-4)
    outputs = torch.cat([f.result().output for _, f in sent])
    assert len(outputs) == len(outputs.unique(dim=0))  # distinct inputs, distinct answers


def test_scheduler_mixed_queue_on_the_cpu_engine_answers_each_like_the_model_alone(small_model, small_plan,
                                                                                   monkeypatch):
    # requests of 1 and 2 images, some forcing a sub-network, queued behind a running call: the policy batches alike
    # requests around the others, so batches are stacked from rows that are not consecutive in the ring (NumPy, for
    # the CPU engine); each answer must still be the model's on that request's own input
    model = small_model
    engine = GatedEngine(small_plan.engine)
    skips = model.skip_configs()
    scheduler = Scheduler(engine, small_plan.example_input, batching_pays(skips), small_plan.accuracy)
    views, view = [], scheduler.ring.view  # one view per batch when its rows are consecutive, one per request if not
    monkeypatch.setattr(scheduler.ring, "view", lambda *args: views.append(args) or view(*args))
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1 + (i % 3 == 1), 1, 16, 16, generator=g) for i in range(30)]
    forced = [skips[i % len(skips)] if i % 4 == 2 else None for i in range(30)]
    futures = serve_behind_one_call(scheduler, engine, inputs, skips=forced)
    assert engine.inputs == {np.ndarray} and max(engine.batches) > 2  # batched, NumPy
    assert len(views) > len(engine.batches)  # some batch was stacked from rows apart in the ring
    with torch.no_grad():
        for x, skip, future in zip(inputs, forced, futures, strict=True):
            served = future.result()
            if skip is not None:
                assert served.skip == skip_to_str(skip)
            assert isinstance(served.array, np.ndarray) and np.shares_memory(served.array, served.output.numpy())
            torch.testing.assert_close(served.output, model(x, skip=served.skip), rtol=1e-4, atol=1e-4)


class PaddedEngine:
    """What the scheduler sees of the GPU engine, on the CPU: ``mechanism == "conditional"`` (one capture per batch
    bucket, so a batch arrives padded to its bucket) and an input dtype of its own (float64 here, as fp16 on a GPU:
    the ring's float32 is converted per dispatch); the model behind it in float64."""

    mechanism = "conditional"

    def __init__(self, model):
        self.model, self.dtypes = copy.deepcopy(model).double(), set()

    def __call__(self, x, skip=None):
        self.dtypes.add(x.dtype)
        return self.model(x, skip=skip)


def test_scheduler_pads_each_batch_to_its_bucket_and_answers_each_request_from_its_own_rows(small_model):
    # the GPU path's host side, run on the CPU: requests of 1 and 3 images (some forcing a sub-network) queue behind a
    # running call; each batch must reach the engine converted and zero-padded to a bucket (1, 2, 4), and each answer
    # be the model's on that request's own input: the padding rows never leak into an answer, nor shift one
    model = small_model
    engine = GatedEngine(PaddedEngine(model))
    skips = model.skip_configs()
    buckets = (1, 2, 4)
    scheduler = Scheduler(engine, torch.zeros(1, 1, 16, 16, dtype=torch.float64),
                          batching_pays(skips, buckets, padded=True), {s: 90.0 - sum(s) for s in skips})
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3 if i % 5 == 2 else 1, 1, 16, 16, generator=g) for i in range(40)]
    forced = [skips[i % len(skips)] if i % 7 == 3 else None for i in range(40)]
    served = [f.result() for f in serve_behind_one_call(scheduler, engine, inputs, skips=forced)]
    assert set(engine.batches) <= set(buckets) and engine.inputs == {torch.Tensor}
    assert engine.engine.dtypes == {torch.float64}
    assert {s.batch for s in served} - set(buckets)  # some batch (3 images) ran padded to 4
    with torch.no_grad():
        for x, skip, answer in zip(inputs, forced, served, strict=True):
            if skip is not None:
                assert answer.skip == skip_to_str(skip)
            assert answer.output.shape == (len(x), 10) and answer.output.dtype == torch.float32
            expected = engine.engine.model(x.double(), skip=answer.skip).float()  # the request alone, unpadded
            torch.testing.assert_close(answer.output, expected, rtol=1e-5, atol=1e-6)


class EchoEngine:
    """Answers each input with itself, flattened: a VIEW of the input, the worst case for a reused input buffer."""

    mechanism = "fake"

    def __call__(self, x, skip=None):
        return x.flatten(1)


def echo_scheduler(max_batch: int = 4) -> tuple[Scheduler, GatedEngine]:
    buckets = [b for b in (1, 2, 4, 8, 16) if b <= max_batch]
    tables = {b: {skip_to_str(s): 10.0 * (1 + 0.5 * (b - 1)) * (4 - sum(s)) for s in SKIPS} for b in buckets}
    engine = GatedEngine(EchoEngine())
    scheduler = Scheduler(engine, torch.zeros(1, *SHAPE), LatencyModel(tables), {s: 90.0 - sum(s) for s in SKIPS})
    return scheduler, engine


def test_scheduler_answers_do_not_alias_the_reused_input_ring():
    # an engine that answers with a view of its input would hand out rows of the ring, which later requests
    # overwrite: every answer, read at the end, must still be its own input. Mixed sizes (1, 2), forced sub-networks
    # (batches around requests not taken), queues deeper than the ring (inputs kept outside it; the rows of the
    # batch being run must not be reused meanwhile) and wrap-arounds.
    scheduler, engine = echo_scheduler()
    g = torch.Generator().manual_seed(1)
    rows = scheduler.ring.rows
    sent = []
    try:
        for depth in (3, 4, 7, rows // 2, rows - 1, rows, rows + 9, 2 * rows + 5, 5, 1):
            inputs = [torch.randn(1 + (i % 3 == 2), *SHAPE, generator=g) for i in range(depth)]
            skips = [SKIPS[i % len(SKIPS)] if depth % 2 and i % 4 == 1 else None for i in range(depth)]
            sent += zip(inputs, queue_behind_one_call(scheduler, engine, inputs, skips=skips))
        for _ in range(3 * rows):  # one at a time as well
            x = torch.randn(1, *SHAPE, generator=g)
            sent.append((x, scheduler.submit(x, 60.0)))
            sent[-1][1].result(timeout=30)
    finally:
        engine.gate.set()
        scheduler.close()
    stats = scheduler.stats()
    assert stats.served == stats.submitted and max(engine.batches) == 4
    for x, future in sent:
        torch.testing.assert_close(future.result().output, x.flatten(1), rtol=0, atol=0)
    assert scheduler.ring.head > 3 * rows  # the ring was reused


def test_scheduler_copies_the_input_when_submitted():
    scheduler, engine = echo_scheduler()
    x = torch.ones(1, *SHAPE)
    engine.gate.clear()
    try:
        future = scheduler.submit(x, 60.0)
        x += 1  # the caller reuses its tensor at once
        held = scheduler.submit(np.full((2, *SHAPE), 3.0, dtype=np.float64), 60.0)  # other types are converted
    finally:
        engine.gate.set()
        scheduler.close()
    assert future.result().output.unique().tolist() == [1.0]
    assert held.result().output.dtype == torch.float32 and held.result().output.unique().tolist() == [3.0]


def test_input_ring_reuses_rows_only_behind_the_oldest_in_use():
    ring = InputRing(rows=8, max_batch=4, image_shape=(1, 1, 1))

    def image(n, value):
        return np.full((n, 1, 1, 1), value, dtype=np.float32)

    assert [ring.put(image(3, k), oldest=0) for k in range(2)] == [0, 3]
    assert ring.put(image(3, 9), oldest=0) is None  # would straddle the end: skipped to row 0, which is in use
    assert ring.put(image(2, 2), oldest=0) == 6  # fits before the end
    assert ring.put(image(1, 3), oldest=0) is None  # full
    assert ring.put(image(3, 4), oldest=3) == 8  # row 0: positions 0..2 are done
    # a batch of positions 6..10 is one view, through the mirror of rows 0..3 after the end
    torch.testing.assert_close(ring.view(6, 5).flatten(), torch.tensor([2.0, 2, 4, 4, 4]))
    assert ring.put(image(1, 5), oldest=None) == 11  # nothing in use
    assert ring.view(11, 1).item() == 5.0
    assert ring.holds(ring.view(11, 1)) and not ring.holds(torch.zeros(1))


def test_an_int8_plan_serves_each_sub_network_near_its_fp32_output_with_its_own_accuracy(small_model):
    """``serve --int8``'s plan: the OpenVINO INT8 engine, ranges from the sample ``calibrate --int8-images`` keeps;
    the accuracies are the INT8 engine's own (measured through it), and what it serves is near the fp32 model."""
    pytest.importorskip("nncf", reason="pip install adaptive_kernels[openvino]")
    from adaptive_kernels.serving import build_plan
    from adaptive_kernels.training import build_data
    from adaptive_kernels.training.evaluate import accuracy

    data = build_data("synthetic", image_size=16, test_subset=64, augment=False)
    sample = torch.cat([x for x, _ in data.train_batches(0, batch_size=64, seed=0)])[:64]
    plan = build_plan(small_model, "r20", (1, 16, 16), max_batch=2, data=data, profile_iters=2,
                      int8_calibration=sample)
    assert (plan.engine.mechanism, plan.engine.precision) == ("openvino", "int8")
    assert plan.accuracy_source == "--data synthetic (measured now, INT8)"
    assert "engine openvino INT8, batches" in plan.describe().splitlines()[0]
    x = torch.cat([x for x, _ in data.test_batches(batch_size=64)])[:2]
    with torch.no_grad():
        for skip in small_model.skip_configs():
            assert plan.accuracy[skip] == accuracy(plan.engine, data, skip)
            want = small_model(x, skip=skip)
            # INT8 of a random width-4 net: 0.04-0.13 of the output's scale measured (NNCF's ranges vary a little)
            assert (plan.engine(x, skip=skip) - want).abs().max() <= 0.3 * want.abs().max()
    with pytest.raises(ValueError, match="--int8 runs on the CPU"):
        build_plan(small_model, "r20", (1, 16, 16), max_batch=2, data=data, device="cuda", int8_calibration=sample)
    # an accuracy table that lists two sub-networks: only those two are quantized, profiled and served
    two = {s: a for s, a in plan.accuracy.items() if sum(s) in (0, 3)}
    plan = build_plan(small_model, "r20", (1, 16, 16), max_batch=2, accuracy=two, profile_iters=1,
                      int8_calibration=sample)
    assert plan.engine.skip_configs() == list(two) == [(False,) * 3, (True,) * 3]
    assert set(plan.latency.skips) == set(two)


def test_scheduler_splits_a_batch_only_where_the_profile_saves_more_than_its_own_time_per_call():
    # nine requests, the first running (held) while eight queue. The policy's split (step 3) serves a first part
    # alone where the profile says that costs no more than the batch, counting the dispatcher's own time for the
    # extra call, which the scheduler measures (policy, batching, answering)
    def batches(us: dict[int, float]) -> tuple[list[int], float]:
        engine = GatedEngine(EchoEngine())
        tables = {b: {skip_to_str(s): us[b] for s in SKIPS} for b in (1, 2, 4, 8)}
        scheduler = Scheduler(engine, torch.zeros(1, *SHAPE), LatencyModel(tables), {s: 90.0 - sum(s) for s in SKIPS})
        inputs = [torch.randn(1, *SHAPE) for _ in range(9)]
        futures = serve_behind_one_call(scheduler, engine, inputs)
        for x, future in zip(inputs, futures):
            torch.testing.assert_close(future.result().output, x.flatten(1), rtol=0, atol=0)
        return engine.batches, scheduler.overhead

    # a batch costs a picosecond per input more than its parts: splitting saves less than any call's overhead, so
    # the eight go as one
    got, overhead = batches({b: 10.0 * b + 1e-6 * (b - 1) for b in (1, 2, 4, 8)})
    assert got == [1, 8] and overhead > 0
    # one input 1 ms, more 50 ms each: every split saves >= 49 ms (times the correction), far more than the
    # dispatcher's time: one at a time
    got, overhead = batches({1: 1e3, 2: 1e5, 4: 2e5, 8: 4e5})
    assert got == [1] * 9 and 0 < overhead < 5e-3


def test_scheduler_answers_the_queue_with_the_policy_s_error_instead_of_hanging(monkeypatch):
    # a policy that raises (a bug) must not kill the dispatcher silently with callers waiting forever: every queued
    # request gets the error, and the scheduler keeps serving once the policy works again
    from adaptive_kernels.serving import scheduler as module

    policy, broken = module.plan_dispatch, [True]

    def failing(*args, **kwargs):
        if broken[0]:
            raise RuntimeError("policy broke")
        return policy(*args, **kwargs)

    monkeypatch.setattr(module, "plan_dispatch", failing)
    hold = threading.Event()
    scheduler = fake_scheduler(hold=hold)
    try:
        futures = [scheduler.submit(torch.ones(1, *SHAPE), 10.0) for _ in range(3)]
        wait(futures, timeout=10)
        assert all(isinstance(f.exception(timeout=0), RuntimeError) for f in futures)
        stats = scheduler.stats()
        assert (stats.failed, stats.queued, stats.served) == (3, 0, 0)
        broken[0] = False
        hold.set()
        x = torch.randn(1, *SHAPE)
        assert scheduler.submit(x, 10.0).result(timeout=10).output[0, 0] == pytest.approx(float(x.sum()))
    finally:
        hold.set()
        scheduler.close()
