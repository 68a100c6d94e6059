"""The scheduler: every request answered exactly once (served, refused or failed), outputs of the sub-network that
served them, graceful shutdown; with a fake engine and with a real small CPU engine against the torch model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

import pytest
import torch

from adaptive_kernels.models.skip import all_skip_configs, skip_to_str
from adaptive_kernels.serving import LatencyModel, Refused, Scheduler

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


def fake_scheduler(**kw) -> Scheduler:
    tables = {b: {skip_to_str(s): 50 * (4 - sum(s)) * (1 + 0.5 * (b - 1)) for s in SKIPS} for b in (1, 2, 4)}
    accuracy = {s: 90.0 - sum(s) for s in SKIPS}
    return Scheduler(FakeEngine(**kw), torch.zeros(1, *SHAPE), LatencyModel(tables), accuracy)


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

    seen, policy = [], module.plan_dispatch  # (now, rate) of each decision

    def recording(queue, now, costs, factor=1.0, *, fifo=False, rate=0.0):
        seen.append((now, rate))
        return policy(queue, now, costs, factor, fifo=fifo, rate=rate)

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
    assert seen[0] == (0.0, 0.0)  # one arrival: no rate yet
    # the next decision at 1.5 s: the window's 8 latest arrivals, 0.2 .. 0.9 s, 7 gaps over 1.5 - 0.2 s
    assert seen[1] == (1.5, pytest.approx(7 / 1.3))
    assert scheduler.stats().served == 10


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
        with pytest.raises(ValueError, match="positive"):
            scheduler.submit(torch.ones(1, *SHAPE), 0.0)
        with pytest.raises(ValueError, match="skip|stages"):
            scheduler.submit(torch.ones(1, *SHAPE), 1.0, skip="TFT")
    finally:
        scheduler.close()
    assert scheduler.stats().submitted == 0


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
