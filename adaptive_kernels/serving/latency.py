"""The scheduler's predictions: latency, from one ``engine.profile(batch_size=b)`` table per batch bucket corrected
online from the latencies the dispatcher measures; the arrival rate, from the latest arrivals; and the reserve's
share (policy step 4), from the latest outcomes.

The correction follows TCP's round-trip estimator (Jacobson): an EWMA of the ratio measured / profiled and an EWMA of
its absolute deviation; a prediction is the profiled latency times ``ratio + margin * deviation``. The ratio follows
a machine that got slower or faster since the profile (other load, frequency), the deviation keeps the prediction
above most measurements when latencies scatter (a median alone is exceeded by half of them, and each excess risks
a deadline).
"""

from __future__ import annotations

import bisect
import math
import numbers
import threading
from collections import deque
from collections.abc import Mapping

from ..models.skip import SkipConfig, parse_skip, skip_to_str
from .policy import RESERVE_SHARE

#: the largest measured / profiled ratio one call may feed into the correction
MAX_SAMPLE = 10.0

#: the share of requests the adaptive policy may miss while it spends slack on accuracy (``ReserveShare``)
MISS_BUDGET = 0.005


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch`` (``max_batch`` itself when it is not a power of two)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    buckets = [1]
    while buckets[-1] * 2 < max_batch:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != max_batch:
        buckets.append(max_batch)
    return buckets


def _microseconds(value: float | str, batch: int, name: str) -> float:
    """A profile entry as a float of µs, or a one-line error naming it."""
    try:
        us = float(value)
    except (TypeError, ValueError):
        us = math.nan
    if not 0 < us < math.inf:
        raise ValueError(f"the profile at batch {batch} gives sub-network {name} {value!r} µs: latencies are "
                         f"positive, finite µs (engine.profile(batch_size={batch}) measures them)")
    return us


def _tf_key(key: object, batch: int, num_stages: int | None) -> str:
    """A profile's key: a sub-network's T/F string (as ``engine.profile`` writes it), or a one-line error."""
    if not isinstance(key, str) or not key.strip() or set(key.strip().upper()) - {"T", "F"}:
        example = f", e.g. {'F' * num_stages!r}" if num_stages else ""
        raise ValueError(f"the profile at batch {batch} has key {key!r}: key each sub-network by its T/F string, as "
                         f"engine.profile() writes it{example}")
    return key.strip()


def _by_skip(table: Mapping[str, float], batch: int, num_stages: int) -> dict[SkipConfig, float]:
    """One bucket's profile as ``{sub-network: µs}``; a key given twice (as "FFT" and "fft") is a one-line error."""
    parsed: dict[SkipConfig, float] = {}
    for key, value in table.items():
        skip = parse_skip(_tf_key(key, batch, num_stages), num_stages)
        if skip in parsed:
            raise ValueError(f"the profile at batch {batch} gives sub-network {skip_to_str(skip)} twice")
        parsed[skip] = _microseconds(value, batch, skip_to_str(skip))
    return parsed


class LatencyModel:
    """Predicted latency in seconds of a sub-network at a batch size.

    tables: ``{batch bucket: {"FFF": µs, ...}}``, each from ``engine.profile(batch_size=bucket)``. padded: the engine
    runs a batch padded to the next bucket (the GPU engine: one capture per bucket), so a batch of b costs its
    bucket's latency; otherwise (the CPU engine, dynamic batch) a batch between two buckets is interpolated linearly.
    alpha, beta: EWMA weights of the ratio and of its deviation; margin: deviations added to the ratio.
    ``observe`` may be called from the dispatcher thread while another thread reads ``predict``.
    """

    def __init__(self, tables: Mapping[int, Mapping[str, float]], *, padded: bool = False, alpha: float = 0.125,
                 beta: float = 0.25, margin: float = 2.0) -> None:
        if not tables:
            raise ValueError("tables is empty: profile the engine at batch 1 at least")
        wrong = [b for b in tables if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if wrong:
            raise ValueError(f"tables has bucket {wrong[0]!r}: buckets are batch sizes, positive ints")
        self.buckets = sorted(tables)
        if self.buckets[0] != 1:
            raise ValueError(f"tables must include batch 1 (the refusal rule needs it), got buckets {self.buckets}")
        if not tables[1]:
            raise ValueError("the profile at batch 1 is empty: it needs each servable sub-network's latency")
        self.num_stages = len(_tf_key(next(iter(tables[1])), 1, None))
        parsed = {b: _by_skip(tables[b], b, self.num_stages) for b in self.buckets}
        self.skips: list[SkipConfig] = list(parsed[1])
        self._seconds: dict[SkipConfig, list[float]] = {}
        for skip in self.skips:
            missing = [b for b in self.buckets if skip not in parsed[b]]
            if missing:
                raise ValueError(f"the profile at batch {missing[0]} lacks sub-network {skip_to_str(skip)}")
            self._seconds[skip] = [parsed[b][skip] * 1e-6 for b in self.buckets]
        self.padded = padded
        self.max_batch = self.buckets[-1]
        self.alpha, self.beta, self.margin = alpha, beta, margin
        self.ratio, self.deviation = 1.0, 0.0
        self._factor = 1.0
        self._lock = threading.Lock()

    def profiled(self, skip: SkipConfig, batch: int) -> float:
        """The profile's latency (seconds) of ``skip`` at ``batch``, without the online correction."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside the profiled range 1..{self.max_batch}")
        row = self._seconds[skip]
        i = bisect.bisect_left(self.buckets, batch)
        if self.padded or self.buckets[i] == batch:
            return row[i]
        lo, hi = self.buckets[i - 1], self.buckets[i]
        return row[i - 1] + (row[i] - row[i - 1]) * (batch - lo) / (hi - lo)

    def predict(self, skip: SkipConfig, batch: int) -> float:
        """Predicted seconds of one call running ``skip`` on ``batch`` inputs (the profile, corrected)."""
        return self.profiled(skip, batch) * self._factor

    def observe(self, skip: SkipConfig, batch: int, seconds: float) -> None:
        """Fold one measured call into the correction. A sample counts at most ``MAX_SAMPLE`` times the profile: one
        call stalled by the OS (a preempted process on a shared machine) must not make every prediction miss."""
        sample = min(seconds / self.profiled(skip, batch), MAX_SAMPLE)
        with self._lock:
            self.deviation += self.beta * (abs(sample - self.ratio) - self.deviation)
            self.ratio += self.alpha * (sample - self.ratio)
            self._factor = self.ratio + self.margin * self.deviation

    def relax(self) -> None:
        """Move the correction one step back toward the profile. The scheduler calls it when it refused requests
        and served none: a refusal is a prediction nothing measures, so without this a correction that grew during
        a slow spell could refuse every later request and never be measured down again."""
        with self._lock:
            self.deviation *= 1 - self.beta
            self.ratio += self.alpha * (1.0 - self.ratio)
            self._factor = self.ratio + self.margin * self.deviation

    @property
    def factor(self) -> float:
        """What predictions multiply the profile by now."""
        return self._factor

    def table(self) -> dict[int, dict[str, float]]:
        """The profile as given (µs per bucket and sub-network), for printing the plan."""
        return {b: {skip_to_str(s): self._seconds[s][i] * 1e6 for s in self.skips} for i, b in enumerate(self.buckets)}


class ArrivalRate:
    """Arrivals per second over the latest ``window`` arrivals, as seen at a time ``now``: the gaps between them over
    ``now`` minus the oldest of them, so the estimate follows a burst within a few requests and decays once arrivals
    stop. The scheduler calls ``arrived`` under its lock on submit and ``at`` before each decision."""

    def __init__(self, window: int = 8) -> None:
        self._times: deque[float] = deque(maxlen=window)

    def arrived(self, t: float) -> None:
        self._times.append(t)

    def at(self, now: float) -> float:
        """The rate at ``now`` (0 before two arrivals)."""
        times = self._times
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(now - times[0], 1e-9)


class ReserveShare:
    """Step 4's ``share`` of the policy, following the SLO attainment of the requests the policy chose a sub-network
    for: it starts at ``low`` (``RESERVE_SHARE``, the cautious one); each request served in time multiplies it by
    ``e ** budget``, each miss (served late or refused) by ``e ** (budget - 1)`` (about 1 / e), within ``low`` ..
    ``high``; and it rises only while the latest ``window`` outcomes hold at most ``budget * window`` misses.

    So under light load, where nothing misses, the share rises to ``high`` (the reserve hardly binds: the super-net),
    a miss brings it back toward ``low`` within a few misses, and where misses come more often than ``budget`` it
    stays at ``low``, the policy as it was before the share moved. ``budget`` is the share of requests the server may
    miss while it buys accuracy with them (0.005, half of the 1 % a 0.99 attainment target allows; 0: never, the
    share stays at ``low``; ``serve --miss-budget``). Tuned in bench/serving_sim.py
    (bench/results/serving/README.md). The dispatcher thread alone calls ``outcome``; any thread may read ``share``
    (one float, e.g. for metrics).
    """

    def __init__(self, low: float = RESERVE_SHARE, high: float = 4.0, budget: float = MISS_BUDGET,
                 window: int = 1000) -> None:
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got low={low!r}, high={high!r}")
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 <= budget < 1:
            raise ValueError(f"budget is a share of requests, 0 <= budget < 1 (0: the share stays at low); got "
                             f"{budget!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.low, self.high, self.budget, self.window = low, high, budget, window
        self._up, self._down = math.exp(budget), math.exp(budget - 1.0)
        self._allowed = budget * window
        self._latest: deque[bool] = deque(maxlen=window)  # True: a miss
        self._misses = 0
        self.share = low

    def outcome(self, met: bool) -> None:
        """One request the policy chose for: served by its deadline (``met``), or not (late, refused)."""
        latest = self._latest
        if len(latest) == latest.maxlen:
            self._misses -= latest[0]  # the append below drops it
        latest.append(not met)
        if met:
            if self._misses <= self._allowed:
                self.share = min(self.high, self.share * self._up)
        else:
            self._misses += 1
            self.share = max(self.low, self.share * self._down)
