"""The request queue and its dispatcher: one thread per engine takes the policy's decision, refuses what cannot be
served in time, runs one batch, answers every request in it, and feeds the measured latency back to the latency model.

Callers (HTTP handlers, a Ray replica, a benchmark) only ``submit`` and wait on the returned future; the engine is
called from the dispatcher thread alone. Every submitted request ends as exactly one of served, refused or failed
(``stats()``: nothing is lost), also on ``close()``, which answers everything queued before the thread ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..engine.base import Engine
from ..models.skip import SkipLike, parse_skip, skip_to_str
from .latency import ArrivalRate, LatencyModel
from .policy import Costs, Decision, Queued, plan_dispatch, rank_by_accuracy

#: engine mechanisms that serve a batch padded to its bucket (one CUDA graph capture per bucket)
PADDED_MECHANISMS = ("conditional", "early_exit")


class Refused(Exception):
    """The server will not run this request: its deadline cannot be met, or the server is shutting down."""


@dataclass(frozen=True)
class Served:
    """A served request: ``output`` (n, num_classes) float32 on the CPU, the sub-network ``skip`` that ran (as
    "TFF"), the ``batch`` it ran in (inputs), seconds from submit to answer and whether that met the deadline."""

    output: torch.Tensor
    skip: str
    batch: int
    latency_s: float
    met: bool


@dataclass(frozen=True)
class Outcome:
    """What listeners hear about each finished request: ``status`` "served", "refused" or "failed"."""

    status: str
    latency_s: float
    skip: str | None = None
    batch: int = 0
    met: bool = False


@dataclass
class _Request:
    x: torch.Tensor
    arrival: float
    queued: Queued
    future: Future = field(default_factory=Future)


@dataclass
class Counters:
    """Request accounting: ``submitted == served + refused + failed + queued + in_flight`` at every moment."""

    submitted: int = 0
    served: int = 0
    refused: int = 0
    failed: int = 0
    met: int = 0
    queued: int = 0
    in_flight: int = 0
    batches: int = 0
    by_skip: dict[str, int] = field(default_factory=dict)
    #: dispatcher seconds outside the engine, summed over dispatches: the policy (``plan_dispatch``), batching (stack,
    #: pad, move the inputs) and answering (split the output, count, resolve the futures)
    policy_s: float = 0.0
    batching_s: float = 0.0
    answering_s: float = 0.0


class Scheduler:
    """SLO-aware dynamic batching over one engine.

    engine: an ``adaptive_kernels.compile`` engine (or anything called as ``engine(x, skip=...)`` with a
    ``mechanism``); example_input: what it was compiled with (its device, dtype and image shape are what the
    engine runs); latency: the per-bucket profile; accuracy: ``{skip: accuracy}`` of the servable sub-networks (the
    policy chooses among these only); clock: seconds, monotonic (tests pass a simulated one).
    """

    def __init__(self, engine: Engine, example_input: torch.Tensor, latency: LatencyModel,
                 accuracy: Mapping[SkipLike, float], *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine = engine
        self.latency = latency
        self.accuracy = {parse_skip(s, latency.num_stages): float(a) for s, a in accuracy.items()}
        unknown = [skip_to_str(s) for s in self.accuracy if s not in latency.skips]
        if unknown:
            raise ValueError(f"accuracy lists sub-networks the profile lacks: {', '.join(unknown)}")
        self.ranking = rank_by_accuracy(self.accuracy, latency.predict)
        self.max_batch = latency.max_batch
        self.costs = Costs.build(latency.profiled, self.ranking, self.max_batch)
        self.image_shape = tuple(example_input.shape[1:])
        self._device, self._dtype = example_input.device, example_input.dtype
        self._padded = getattr(engine, "mechanism", None) in PADDED_MECHANISMS
        self._clock = clock
        self.arrivals = ArrivalRate()  # the policy's burst reserve reads it
        self._queue: list[_Request] = []
        self._queued: list[Queued] = []  # what the policy sees of self._queue, kept beside it
        self._fifo = True  # every queued request alike (size, forced sub-network), deadlines in arrival order
        self._cond = threading.Condition()
        self._closing = False
        self.counters = Counters()
        self.listeners: list[Callable[[Outcome], None]] = []
        self._thread = threading.Thread(target=self._dispatch_loop, name="adn-dispatcher", daemon=True)
        self._thread.start()

    # ---- callers -----------------------------------------------------------------------------------
    def submit(self, x: torch.Tensor, slo_s: float, skip: SkipLike = None) -> Future:
        """Queue ``x`` (n, C, H, W) float32, to be answered within ``slo_s`` seconds; ``skip`` forces a sub-network
        (one of the servable ones). The future's result is a :class:`Served`; its exception a :class:`Refused`
        (deadline, shutdown) or the engine's error. Bad input raises ValueError here."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"input has shape {tuple(x.shape)}; this model takes "
                             f"(N, {', '.join(map(str, self.image_shape))})")
        if not 1 <= x.shape[0] <= self.max_batch:
            raise ValueError(f"input has batch {x.shape[0]}; this server takes 1..{self.max_batch} images per request "
                             f"(--max-batch): split it")
        if not slo_s > 0:
            raise ValueError(f"the SLO must be a positive number of seconds, got {slo_s!r}")
        forced = None
        if skip is not None:
            forced = parse_skip(skip, self.latency.num_stages)
            if forced not in self.accuracy:
                raise ValueError(f"sub-network {skip_to_str(forced)} is not served here; served: "
                                 f"{', '.join(map(skip_to_str, self.ranking))}")
        with self._cond:  # arrival read under the lock: the queue is in arrival order
            arrival = self._clock()
            request = _Request(x, arrival, Queued(arrival + slo_s, int(x.shape[0]), forced))
            self.counters.submitted += 1
            self.arrivals.arrived(arrival)
            if self._closing:
                self._finish_refused(request, "the server is shutting down")
            else:
                queued, last = request.queued, self._queued[-1] if self._queued else None
                self._fifo = last is None or (self._fifo and last.deadline <= queued.deadline
                                              and (last.size, last.skip) == (queued.size, queued.skip))
                self._queue.append(request)
                self._queued.append(queued)
                self.counters.queued += 1
                self._cond.notify()
        return request.future

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests (later ones are refused), answer everything queued, then stop the dispatcher."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def arrival_rate(self) -> float:
        """Arrivals per second now, as the policy's reserve sees them (``ArrivalRate``)."""
        return self.arrivals.at(self._clock())

    def stats(self) -> Counters:
        """A consistent copy of the counters."""
        with self._cond:
            c = self.counters
            return Counters(**{**c.__dict__, "by_skip": dict(c.by_skip)})

    # ---- the dispatcher thread ---------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                start = self._clock()
                decision = plan_dispatch(self._queued, start, self.costs, self.latency.factor, fifo=self._fifo,
                                         rate=self.arrivals.at(start))
                self.counters.policy_s += self._clock() - start
                refused, batch = self._take(decision)
                if refused and not batch:
                    self.latency.relax()
                for request in refused:
                    self._finish_refused(request, "its deadline cannot be met even by the fastest sub-network")
                self.counters.in_flight = len(batch)
            if batch:
                self._run(batch, decision, self._clock())

    def _take(self, decision: Decision) -> tuple[list[_Request], list[_Request]]:
        """Remove the refused and the served requests from the queue (lock held)."""
        refused = [self._queue[i] for i in decision.refuse]
        batch = [self._queue[i] for i in decision.serve]
        taken = len(refused) + len(batch)
        if taken and max(decision.serve[-1:] + decision.refuse[-1:]) == taken - 1:  # the oldest (a fifo queue)
            del self._queue[:taken], self._queued[:taken]
        elif taken:
            drop = set(decision.refuse).union(decision.serve)
            self._queue = [r for i, r in enumerate(self._queue) if i not in drop]
            self._queued = [r.queued for r in self._queue]
        self.counters.queued = len(self._queue)
        return refused, batch

    def _run(self, batch: list[_Request], decision: Decision, start: float) -> None:
        skip = decision.skip
        try:
            x = batch[0].x if len(batch) == 1 else torch.cat([r.x for r in batch])
            x = x.to(self._device, self._dtype)
            if self._padded:
                bucket = next(b for b in self.latency.buckets if b >= decision.batch)
                if bucket > decision.batch:
                    x = torch.cat([x, x.new_zeros((bucket - decision.batch, *self.image_shape))])
            called = self._clock()
            self.counters.batching_s += called - start
            with torch.no_grad():
                y = self.engine(x, skip=skip)
                y = y[: decision.batch].float().cpu()  # synchronises a CUDA engine: the time below is the call's
            returned = self._clock()
        except Exception as error:  # noqa: BLE001 -- the engine's failure is every batched request's answer
            with self._cond:
                self.counters.in_flight = 0
                for request in batch:
                    self._finish(request, Outcome("failed", self._clock() - request.arrival), error=error)
            return
        self.latency.observe(skip, decision.batch, returned - called)
        name = skip_to_str(skip)
        with self._cond:
            self.counters.in_flight = 0
            self.counters.batches += 1
            offset = 0
            done = self._clock()
            for request in batch:
                size = request.queued.size
                latency = done - request.arrival
                met = done <= request.queued.deadline
                outcome = Outcome("served", latency, name, decision.batch, met)
                self._finish(request, outcome, Served(y[offset:offset + size], name, decision.batch, latency, met))
                offset += size
            self.counters.answering_s += self._clock() - returned

    def _finish_refused(self, request: _Request, why: str) -> None:
        latency = self._clock() - request.arrival
        self._finish(request, Outcome("refused", latency), error=Refused(f"request refused: {why}"))

    def _finish(self, request: _Request, outcome: Outcome, result: Served | None = None,
                error: BaseException | None = None) -> None:
        """Count one answer and deliver it (lock held)."""
        c = self.counters
        if outcome.status == "served":
            c.served += 1
            c.met += outcome.met
            c.by_skip[outcome.skip] = c.by_skip.get(outcome.skip, 0) + 1
        elif outcome.status == "refused":
            c.refused += 1
        else:
            c.failed += 1
        for listener in self.listeners:
            listener(outcome)
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)
