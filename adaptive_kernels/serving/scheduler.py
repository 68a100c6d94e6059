"""The request queue and its dispatcher: one thread per engine takes the policy's decision, refuses what cannot be
served in time, runs one batch, answers every request in it, and feeds the measured latency back to the latency model.

Callers (HTTP handlers, a Ray replica, a benchmark) only ``submit`` and wait on the returned future; the engine is
called from the dispatcher thread alone. Every submitted request ends as exactly one of served, refused or failed
(``stats()``: nothing is lost), also on ``close()``, which answers everything queued before the thread ends.
``listeners`` hear each finished request's ``Outcome`` on the thread that finished it; one that raises is logged
once and the request is answered all the same.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..engine.base import Engine
from ..models.skip import SkipLike, parse_skip, skip_to_str
from .latency import MISS_BUDGET, ArrivalRate, LatencyModel, ReserveShare
from .policy import Costs, Decision, Queued, parse_accuracy, plan_dispatch, rank_by_accuracy

_new = tuple.__new__  # ``_new(Outcome, fields)``: a named tuple without its Python ``__new__`` (per served request)

#: engine mechanisms that serve a batch padded to its bucket (one CUDA graph capture per bucket)
PADDED_MECHANISMS = ("conditional", "early_exit")

#: the input ring holds this many full batches of queued inputs (a deeper queue: later inputs stacked at dispatch) ...
RING_BATCHES = 8
#: ... within this many bytes (but always 2 full batches)
RING_BYTES = 32 << 20
#: the queued requests' inputs may take this many bytes in all (the ring and beyond it; default of ``max_queue_bytes``):
#: past it a request is refused at once. Deadlines alone do not bound the queue: at a rate past capacity with a long
#: SLO it holds rate x SLO requests (1000 req/s x 10 s of ResNet-50 images: 6 GB) before any expires.
QUEUE_BYTES = 1 << 30


def check_queue_bytes(max_queue_bytes: int, max_batch: int, image_shape: tuple[int, ...],
                      given: str | None = None) -> None:
    """ValueError unless ``max_queue_bytes`` is an int that holds one full batch of float32 images of
    ``image_shape``: the scheduler's queue bound, checked where it is given (before any profiling); ``given``: how
    the caller's user gave it (a CLI flag), named in the message."""
    batch_bytes = 4 * max_batch * math.prod(image_shape)
    if isinstance(max_queue_bytes, bool) or not isinstance(max_queue_bytes, numbers.Integral):
        raise TypeError(f"{given or 'max_queue_bytes'} must be a whole number of bytes, got "
                        f"{type(max_queue_bytes).__name__} {max_queue_bytes!r}")
    if max_queue_bytes < batch_bytes:
        raise ValueError(f"{given or f'max_queue_bytes={max_queue_bytes!r}'}: the queue must hold at least one full "
                         f"batch ({max_batch} x {'x'.join(map(str, image_shape))} float32 = {batch_bytes} bytes); "
                         f"raise it")


class Refused(Exception):
    """The server will not run this request: its deadline cannot be met, its queue is full, or the server is shutting
    down."""


class Served(NamedTuple):
    """A served request: ``output`` (n, num_classes) float32 on the CPU as a tensor, ``array`` the same as a NumPy
    array (they share memory), the sub-network ``skip`` that ran (as "TFF"), the ``batch`` it ran in (inputs),
    seconds from receipt (``submit``'s ``received``) to answer and whether that met the deadline. ``value`` is the
    rows as the engine returned them (a NumPy array from a CPU runtime's engine, else a tensor): the reader converts,
    not the dispatcher."""

    value: torch.Tensor | np.ndarray
    skip: str
    batch: int
    latency_s: float
    met: bool

    @property
    def output(self) -> torch.Tensor:
        return torch.from_numpy(self.value) if isinstance(self.value, np.ndarray) else self.value

    @property
    def array(self) -> np.ndarray:
        return self.value if isinstance(self.value, np.ndarray) else self.value.numpy()


class Outcome(NamedTuple):
    """What listeners hear about each finished request: ``status`` "served", "refused" or "failed". (``Served`` and
    ``Outcome`` are named tuples: the dispatcher makes one of each per served request, and a frozen dataclass
    cost 0.6-0.7 µs each to make, these 0.2.)"""

    status: str
    latency_s: float
    skip: str | None = None
    batch: int = 0
    met: bool = False


def _running_future() -> Future:
    """A request's future, already running: ``cancel()`` returns False and the request is answered as any other (a
    cancelled future would make the dispatcher's ``set_result`` raise and stop it, leaving every later request
    unanswered)."""
    future = Future()
    future.set_running_or_notify_cancel()
    return future


@dataclass(eq=False)
class _Request:
    x: np.ndarray | None  # the input (a float32 copy), when it is not in the ring
    pos: int | None  # its position in the ring (InputRing.put), None when it is not there
    arrival: float
    queued: Queued
    future: Future = field(default_factory=_running_future)


class InputRing:
    """One preallocated float32 buffer that queued inputs are copied into when submitted, in arrival order, so that
    the batch of consecutive requests a dispatch serves is a view of it: nothing is stacked at dispatch.

    Why: ``torch.cat`` of 16 one-image inputs cost ~4.5 us on the dispatcher (2 % of the demo base-net's batch-1
    call; the policy's own budget), most of it per-tensor overhead; a cached view costs ~0.1 us, and the copy moves
    to the submitting thread (for HTTP it replaces the copy that decoding made anyway).

    A position only grows; position p is row ``p % rows``. An input never straddles the end (the rows left there
    are skipped), and the first ``max_batch`` rows are mirrored after the end, so a batch that runs past the end is
    still one view. Rows are reused only behind ``oldest``, the first position still queued or being run: the
    caller (holding its lock) passes it to :meth:`put`.
    """

    def __init__(self, rows: int, max_batch: int, image_shape: tuple[int, ...]) -> None:
        if rows < max_batch:
            raise ValueError(f"the ring needs at least max_batch={max_batch} rows, got {rows}")
        self.rows, self.max_batch = rows, max_batch
        self.tensor = torch.empty(rows + max_batch, *image_shape)  # a row is read only after it is written
        self.array = self.tensor.numpy()
        self.head = 0  # the position of the next input
        self._views: dict[tuple[int, int, bool], torch.Tensor | np.ndarray] = {}
        self._span = (self.tensor.data_ptr(), self.tensor.data_ptr() + self.tensor.nbytes)

    def put(self, image: np.ndarray, oldest: int | None) -> int | None:
        """Copy ``image`` (n, C, H, W) float32 into free rows -> its position; None when the rows from ``oldest``
        (None: nothing in use) to here leave no room."""
        size, row = len(image), self.head % self.rows
        start = self.head
        if row + size > self.rows:
            start, row = start + self.rows - row, 0
        if start + size - (start if oldest is None else oldest) > self.rows:
            return None
        self.array[row:row + size] = image
        if row < self.max_batch:
            mirrored = min(row + size, self.max_batch) - row
            self.array[self.rows + row:self.rows + row + mirrored] = image[:mirrored]
        self.head = start + size
        return start

    def view(self, pos: int, size: int, array: bool = False) -> torch.Tensor | np.ndarray:
        """The ``size`` rows from position ``pos`` (which hold consecutive positions), as a (size, C, H, W) tensor
        view, or NumPy view with ``array``."""
        key = (pos % self.rows, size, array)
        view = self._views.get(key)
        if view is None:  # at most 2 x rows x max_batch of them, each made once
            view = self._views[key] = (self.array if array else self.tensor)[key[0]:key[0] + size]
        return view

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s data starts inside the ring (an engine that answered with a view of its input)."""
        return tensor.is_cpu and self._span[0] <= tensor.data_ptr() < self._span[1]  # is_cpu: ~8x .device


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
    policy chooses among these only); clock: seconds, monotonic (tests pass a simulated one); max_queue_bytes: the
    most the queued requests' inputs may take (float32; at least one full batch): a request past it is refused at
    once (the server is past its capacity), never buffered without bound.
    """

    def __init__(self, engine: Engine, example_input: torch.Tensor, latency: LatencyModel,
                 accuracy: Mapping[SkipLike, float], *, clock: Callable[[], float] = time.perf_counter,
                 miss_budget: float = MISS_BUDGET, max_queue_bytes: int = QUEUE_BYTES) -> None:
        _check_example_input(example_input)
        self.engine = engine
        self.latency = latency
        self.accuracy = parse_accuracy(accuracy, latency.num_stages)
        unknown = [skip_to_str(s) for s in self.accuracy if s not in latency.skips]
        if unknown:
            raise ValueError(f"accuracy lists sub-networks the profile lacks: {', '.join(unknown)}")
        self.ranking = rank_by_accuracy(self.accuracy, latency.predict)
        self.max_batch = latency.max_batch
        self.costs = Costs.build(latency.profiled, self.ranking, self.max_batch)
        self.image_shape = tuple(example_input.shape[1:])
        self._device, self._dtype = example_input.device, example_input.dtype
        self._padded = getattr(engine, "mechanism", None) in PADDED_MECHANISMS
        # the ring is float32 on the CPU; other engines get it converted (on the device) per dispatch
        self._convert = self._device.type != "cpu" or self._dtype != torch.float32
        # a CPU runtime's engine takes and returns NumPy arrays (``numpy_io``): the dispatcher then makes no torch
        # call (each costs microseconds right after a run; measured in bench/results/serving/README.md)
        self._numpy = getattr(engine, "numpy_io", False) and not self._convert
        image_bytes = 4 * example_input[0].numel()
        check_queue_bytes(max_queue_bytes, self.max_batch, self.image_shape)
        self._max_queued_images = int(max_queue_bytes) // image_bytes
        self._queued_images = 0  # the inputs of the queued requests (lock held)
        rows = max(2 * self.max_batch, min(RING_BATCHES * self.max_batch, RING_BYTES // max(image_bytes, 1)))
        self.ring = InputRing(rows, self.max_batch, self.image_shape)
        self._running_from: int | None = None  # the first ring position of the batch being run
        self._outside = 0  # queued requests whose input is not in the ring (it was full)
        #: the dispatcher's seconds per call outside the engine (policy, batching, answering; EWMA, weight 1/8): the
        #: policy's split (step 3) adds a call only where the profile saves more than this. Dispatcher thread only.
        self.overhead = 0.0
        self._clock = clock
        self.arrivals = ArrivalRate()  # the policy's burst reserve reads it
        #: the reserve's share (policy step 4), following the attainment of the requests the policy chose for (not of
        #: those forcing a sub-network). Dispatcher thread only.
        self.reserve = ReserveShare(budget=miss_budget)
        self._queue: list[_Request] = []
        self._queued: list[Queued] = []  # what the policy sees of self._queue, kept beside it
        self._fifo = True  # every queued request alike (size, forced sub-network), deadlines in arrival order
        self._cond = threading.Condition()
        self._closing = False
        self.counters = Counters()
        self.listeners: list[Callable[[Outcome], None]] = []
        self._failed_listeners: set[int] = set()  # ids of listeners that raised (reported once each)
        self._thread = threading.Thread(target=self._dispatch_loop, name="adn-dispatcher", daemon=True)
        self._thread.start()

    # ---- callers -----------------------------------------------------------------------------------
    def submit(self, x: torch.Tensor | np.ndarray, slo_s: float, skip: SkipLike = None, *,
               received: float | None = None) -> Future:
        """Queue ``x`` (n, C, H, W) float32 (a tensor or a NumPy array; other dtypes are converted), to be answered
        within ``slo_s`` seconds; ``skip`` forces a sub-network (one of the servable ones). The input is copied
        here: changing ``x`` afterwards does not change the request. The future's result is a :class:`Served`;
        its exception a :class:`Refused` (deadline, shutdown) or the engine's error; it cannot be cancelled (every
        submitted request is answered). Bad input raises ValueError (TypeError for a wrong type) here.

        received: when the request reached the caller, on this scheduler's clock (:meth:`now`; default: now): its
        deadline is ``received + slo_s`` and its latency counts from then. A front end passes the moment it began
        reading the request, so that the SLO covers the reading and decoding too (the client's clock does: a
        JSON-encoded ResNet-50 image took 44 ms to decode here, the demo's 784 values 0.3 ms)."""
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(f"input must be a torch.Tensor or a NumPy array (N, C, H, W), got {type(x).__name__}")
        if isinstance(slo_s, bool) or not isinstance(slo_s, numbers.Real):
            raise TypeError(f"the SLO must be a number of seconds, got {type(slo_s).__name__} {slo_s!r}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"input has shape {tuple(x.shape)}; this model takes "
                             f"(N, {', '.join(map(str, self.image_shape))})")
        if not 1 <= x.shape[0] <= self.max_batch:
            raise ValueError(f"input has batch {x.shape[0]}; this server takes 1..{self.max_batch} images per request "
                             f"(--max-batch): split it")
        if not 0 < slo_s < math.inf:  # NaN fails too; an infinite one would never be refused nor count as late
            raise ValueError(f"the SLO must be a positive, finite number of seconds, got {slo_s!r}")
        slo_s = float(slo_s)  # a NumPy float32 plus the clock (~1e4-1e5 s) would round the deadline by milliseconds
        if received is not None and (isinstance(received, bool) or not isinstance(received, numbers.Real)
                                     or not math.isfinite(received)):
            raise TypeError(f"received must be a time on the scheduler's clock (Scheduler.now()), got {received!r}")
        received = None if received is None else float(received)
        forced = None
        if skip is not None:
            forced = parse_skip(skip, self.latency.num_stages)
            if forced not in self.accuracy:
                raise ValueError(f"sub-network {skip_to_str(forced)} is not served here; served: "
                                 f"{', '.join(map(skip_to_str, self.ranking))}")
        if x.is_complex() if isinstance(x, torch.Tensor) else x.dtype.kind == "c":
            raise TypeError(f"input is {x.dtype}: the model takes real images (float32); a complex input's imaginary "
                            f"part would be dropped")
        image = _as_float32_array(x)
        with self._cond:  # arrival read under the lock: the queue is in arrival order, and so is the ring
            now = self._clock()
            if received is not None and received > now:
                raise ValueError(f"received={received!r} is later than the scheduler's clock now ({now!r}): pass "
                                 f"a time read from Scheduler.now() before submitting")
            arrival = now if received is None else received
            request = _Request(None, None, arrival, Queued(arrival + slo_s, int(x.shape[0]), forced, slo_s))
            self.counters.submitted += 1
            self.arrivals.arrived(now)
            if self._closing:
                self._finish_refused(request, "the server is shutting down")
            elif self._queued_images + request.queued.size > self._max_queued_images:
                self._finish_refused(request, f"the queue is full ({self._queued_images} images wait, the most "
                                              f"max_queue_bytes / --max-queue-mb allows): the server is past its "
                                              f"capacity; retry later")
            else:
                self._queued_images += request.queued.size
                request.pos = self.ring.put(image, self._oldest_in_ring())
                if request.pos is None:
                    request.x = image.copy()
                    self._outside += 1
                queued, last = request.queued, self._queued[-1] if self._queued else None
                self._fifo = last is None or (self._fifo and last.deadline <= queued.deadline
                                              and (last.size, last.skip) == (queued.size, queued.skip))
                self._queue.append(request)
                self._queued.append(queued)
                self.counters.queued += 1
                self._cond.notify()
        return request.future

    def _oldest_in_ring(self) -> int | None:
        """The first ring position still queued or being run (lock held): ring positions grow along the queue."""
        oldest = self._running_from
        if self._queue:
            first = self._queue[0].pos
            if first is None and self._outside:
                first = next((r.pos for r in self._queue if r.pos is not None), None)
            if first is not None and (oldest is None or first < oldest):
                oldest = first
        return oldest

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests (later ones are refused), answer everything queued, then stop the dispatcher. Called
        on the dispatcher's own thread (a listener, a future's done-callback), it cannot wait for that thread: it
        returns at once, and the dispatcher answers what is queued and stops after the callback."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def now(self) -> float:
        """The scheduler's clock (seconds): what ``submit``'s ``received`` is read from."""
        return self._clock()

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
                begun = self._clock()
                try:
                    decision = plan_dispatch(self._queued, begun, self.costs, self.latency.factor, fifo=self._fifo,
                                             rate=self.arrivals.at(begun), overhead=self.overhead,
                                             share=self.reserve.share)
                except Exception as error:  # noqa: BLE001 -- a failing policy must answer the queue, never hang it
                    self._fail_queued(error)
                    continue
                start = self._clock()
                self.counters.policy_s += start - begun
                in_ring = not self._outside  # then every input of the batch is in the ring
                refused, batch = self._take(decision)
                if batch:
                    first = batch[0].pos
                    if first is None:
                        first = next((r.pos for r in batch if r.pos is not None), None)
                    self._running_from = first  # its rows stay untouched until the engine returns
                if refused and not batch:
                    self.latency.relax()
                for request in refused:
                    if request.queued.skip is None:
                        self.reserve.outcome(False)
                    self._finish_refused(request, "its deadline cannot be met even by the fastest sub-network")
                self.counters.in_flight = len(batch)
            if batch:
                self._run(batch, decision, in_ring, self._clock(), start - begun)

    def _fail_queued(self, error: Exception) -> None:
        """Answer every queued request with ``error`` (lock held): the policy raised, so no decision can be made for
        them (a bug, reported to each caller instead of a dead dispatcher and callers waiting forever)."""
        queue, now = self._queue, self._clock()
        self._queue, self._queued, self._outside, self._fifo = [], [], 0, True
        self.counters.queued = self._queued_images = 0
        for request in queue:
            self._finish(request, Outcome("failed", now - request.arrival), error=error)

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
        self._queued_images -= decision.batch  # the served inputs
        for request in refused:
            self._queued_images -= request.queued.size
        if self._outside:
            self._outside -= sum(r.pos is None for r in refused) + sum(r.pos is None for r in batch)
        return refused, batch

    def _run(self, batch: list[_Request], decision: Decision, in_ring: bool, start: float, policy_s: float) -> None:
        skip, size = decision.skip, decision.batch
        try:
            x = self._batch_input(batch, size, in_ring)
            called = self._clock()
            self.counters.batching_s += called - start
            if self._numpy:
                y = self.engine(x, skip=skip)  # a new array: never a view of the ring
                returned = self._clock()
            else:
                with torch.no_grad():
                    y = self.engine(x, skip=skip)
                    y = y[:size].float().cpu()  # synchronises a CUDA engine: the time below is the call's
                returned = self._clock()
                if self.ring.holds(y):  # the next dispatches overwrite the ring: an answer must not live there
                    y = y.clone()
        except Exception as error:  # noqa: BLE001 -- the engine's failure is every batched request's answer
            with self._cond:
                self.counters.in_flight = 0
                self._running_from = None
                for request in batch:
                    self._finish(request, Outcome("failed", self._clock() - request.arrival), error=error)
            return
        self.latency.observe(skip, size, returned - called)
        name = skip_to_str(skip)
        with self._cond:
            self.counters.in_flight = 0
            self._running_from = None
            self.counters.batches += 1
            offset = 0
            done = self._clock()
            for request in batch:
                n = request.queued.size
                latency = done - request.arrival
                met = done <= request.queued.deadline
                if request.queued.skip is None:
                    self.reserve.outcome(met)
                outcome = _new(Outcome, ("served", latency, name, size, met))
                self._finish(request, outcome, _new(Served, (y[offset:offset + n], name, size, latency, met)))
                offset += n
            answered = self._clock()
            self.counters.answering_s += answered - returned
            self.overhead += (policy_s + (called - start) + (answered - returned) - self.overhead) / 8

    def _batch_input(self, batch: list[_Request], size: int, in_ring: bool) -> torch.Tensor | np.ndarray:
        """The engine's input for ``batch`` (``size`` images; ``in_ring``: every input is in the ring): a view of
        the ring when the inputs are consecutive there (the usual case: nothing is copied), else stacked; a NumPy
        array for a CPU runtime's engine, else a tensor converted to the engine's device and dtype and padded to
        the bucket for a padded engine."""
        first, last, numpy = batch[0], batch[-1], self._numpy
        if in_ring and last.pos + last.queued.size - first.pos == size:  # positions grow along the queue: no gap
            x = self.ring.view(first.pos, size, numpy)
            return x if numpy else self._to_engine(x, size)
        # a batch around a request not taken (a mixed queue), or one whose input is not in the ring
        parts = [r.x if r.pos is None else self.ring.view(r.pos, r.queued.size, True) for r in batch]
        if numpy:
            return np.concatenate(parts)
        x = torch.from_numpy(np.concatenate(parts))
        return self._to_engine(x, size)

    def _to_engine(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """A batch tensor of ``size`` images converted to the engine's device and dtype, padded to the bucket for a
        padded engine."""
        if self._convert:
            x = x.to(self._device, self._dtype)
        if self._padded:
            bucket = next(b for b in self.latency.buckets if b >= size)
            if bucket > size:
                x = torch.cat([x, x.new_zeros((bucket - size, *self.image_shape))])
        return x

    def _finish_refused(self, request: _Request, why: str) -> None:
        latency = self._clock() - request.arrival
        self._finish(request, Outcome("refused", latency), error=Refused(f"request refused: {why}"))

    def _listener_failed(self, listener: Callable[[Outcome], None]) -> None:
        """Log a listener's exception (called in its ``except``), once per listener."""
        if id(listener) not in self._failed_listeners:
            self._failed_listeners.add(id(listener))
            logging.getLogger(__name__).exception(
                "scheduler listener %r raised: the request is answered and the dispatcher goes on (reported once)",
                listener)

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
            try:
                listener(outcome)
            except Exception:  # noqa: BLE001 -- a listener's bug must not end the dispatcher (every later request
                self._listener_failed(listener)  # would wait forever): reported once, the answer still delivered
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)


def _check_example_input(example_input: torch.Tensor) -> None:
    """TypeError / ValueError unless ``example_input`` can be what an engine was compiled with: a real floating
    (N >= 1, C, H, W) tensor with data (the scheduler takes the image shape, device and dtype from it)."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be the torch.Tensor the engine was compiled with (N, C, H, W), got "
                        f"{type(example_input).__name__}")
    if example_input.ndim != 4 or example_input.shape[0] < 1:
        raise ValueError(f"example_input has shape {tuple(example_input.shape)}: give the (N, C, H, W) input the "
                         f"engine was compiled with")
    if not example_input.is_floating_point() or example_input.device.type == "meta":
        raise ValueError(f"example_input is {example_input.dtype} on {example_input.device}: give the floating "
                         f"input, on the engine's device, that the engine was compiled with")


def _as_float32_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """x as a float32 NumPy array on the CPU, a view where it already is one."""
    if isinstance(x, np.ndarray):
        array = x
    else:
        try:  # the common case first: reading x.device alone costs more than this view (~1 us)
            array = x.numpy()
        except (RuntimeError, TypeError):  # on a GPU, needs grad, a dtype NumPy lacks (bfloat16), a neg view
            array = x.detach().to(torch.float32).numpy(force=True)  # force: also resolves conj/neg views
    return array if array.dtype == np.float32 else array.astype(np.float32)
