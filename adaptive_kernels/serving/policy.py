"""The dispatch policy: at each dispatch, which queued requests to refuse, which to serve now, and with which
sub-network. A pure function of the queue, the clock and the latency predictions (tested with a simulated clock).

The rule (SlackFit-like, after SuperServe, NSDI '25):

1. Refuse every request that cannot finish in time even on the fastest sub-network it allows at its own size
   (batch 1 for a one-image request): an explicit refusal now beats a late answer.
2. The oldest remaining request opens the batch; requests that allow the same sub-networks (none forced, or the
   same one forced) join it in arrival order, up to ``max_batch`` inputs.
3. Take the largest such batch that some allowed sub-network finishes before the earliest deadline in it, and serve
   it, or the part of it said next, with the most accurate of those sub-networks that steps 4 and 5 allow and that
   leaves the requests queued behind it their time: those of the group left out (up to ``max_batch`` inputs), served
   next on the fastest in one batch, still finish by their earliest deadline (the lookahead; the fastest satisfies
   it whenever anything does). Seen in bench/serving_sim.py: a request served on the super-net with 70 ms of slack
   while the one behind it, 82 ms from its deadline, needed the base-net's 40 ms after it; it was then refused.
   Split what batching does not pay for: when the profile says that a first part now and the rest right after cost
   no more than the batch, counting the dispatcher's own time per call (``t(p) + t(b - p) + overhead <= t(b)``, on
   the fastest's row or the forced sub-network's; the scheduler measures ``overhead``: policy, batching, answering),
   serve the smallest such part (the rest is then behind it: the lookahead keeps its time). The same work, but the
   part is answered sooner and the rest is planned again with the part's measured time and what arrived meanwhile; a
   batch sized to its deadline otherwise misses as a whole when its one call runs slow. On a CPU a batch costs about
   its parts (ResNet-50: 27.4 ms at batch 1, 132 ms at 5), so this splits; on a GPU a batch costs far less than its
   parts, so it does not. The sub-network chosen is then held to the same rule on its own row: a measured profile
   need not cost what the fastest's does in proportion (ResNet-50's super-net once profiled 92.5 ms at batch 2, 40.3
   at 1), and where the chosen one's parts cost less than its batch, its first part is served (it finishes sooner,
   and the rest after it no later than the batch would have). In bench/serving_sim.py (calls scattered
   log-normally, sigma 0.3) the split raised the adaptive server's attainment at 5 req/s from 0.985 to 0.992 and the
   base-net's from 0.994 to 0.996 (bench/results/serving/README.md).
4. Keep a reserve for what arrives meanwhile: at the predicted arrival rate, ``batch`` more requests arrive in
   ``batch / rate`` seconds; the sub-network must finish the batch within a ``share`` of that (and by the deadline):
   the most accurate that does, the fastest when none does. With ``RESERVE_SHARE`` = 0.5 the server keeps up with
   twice the predicted rate, which is what a bursty stream needs; the scheduler passes a share that follows the SLO
   attainment (``latency.ReserveShare``: 0.5 after misses, up to 4 while requests meet their deadlines), because a
   fixed 0.5 spends accuracy a fast engine does not need to (ResNet-50 over HTTP at 20 req/s: 0.998 attained at
   76.52 with 0.5, 0.996 at 77.11 with the share following, the base-net 0.999 and 0.993;
   bench/results/serving/README.md).
5. Guard against the next burst: a batch of b requests says that b more may come while it runs, so the sub-network
   must leave the fastest one time to serve as many within one SLO (the batch's own): ``t(skip, b) + t(fastest, b)
   <= slo``. The rate of step 4 reacts to a burst only after several arrivals (it averages the latest 8); this
   reacts to the queue itself. Seen over HTTP: the super-net on three queued ResNet-50 requests took 142 ms while a
   burst of five arrived behind it, and one of those was refused. In bench/serving_sim.py the guard raised
   attainment by up to 0.010 for 0.001-0.06 points of accuracy (bench/results/serving/README.md).

Under light load the queue holds one request and the super-net serves it; as load grows the batches grow and the
sub-networks get cheaper, so throughput follows the load while every served request still meets its deadline as
predicted. Step 4 keeps it from being myopic: without it a batch with ample slack runs the super-net to the last
microsecond of its deadline while a burst queues behind it, and the burst is then refused or served late (in the
simulated sweeps of bench/serving_sim.py the adaptive server then attained less than the fixed base-net; tuned there).

Cost: it runs before every engine call, so it must stay a small fraction of the cheapest call (the goal: 2 % of the
base-net's batch-1 latency). It reads a table of the profile (:class:`Costs`, built once) times the latency model's
current correction factor instead of calling the latency model, and it tries the sub-networks only at the largest
batch the fastest of them fits. Step 1 is one pass over the queue, or a bisection when the caller knows the queue is
``fifo`` (every request alike, deadlines in arrival order: the refused requests are then the oldest ones).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter
from typing import NamedTuple

from ..models.skip import SkipConfig, SkipLike, parse_skip, skip_to_str

#: predict(skip, batch) -> seconds
Predict = Callable[[SkipConfig, int], float]

#: step 4: the share of the time ``batch`` new requests take to arrive (at the predicted rate) a batch may run, the
#: cautious one (``latency.ReserveShare`` moves between it and more as the SLO attainment allows)
RESERVE_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class Queued:
    """What the policy sees of a queued request: its absolute ``deadline`` (seconds, on the policy's clock), its
    ``size`` (images), the sub-network it forces (None: any) and its ``slo`` (seconds from arrival to deadline; the
    burst guard of step 5 reads it; 0: no guard)."""

    deadline: float
    size: int = 1
    skip: SkipConfig | None = None
    slo: float = 0.0


class Decision(NamedTuple):
    """``refuse`` and ``serve`` index the queue given to :func:`plan_dispatch` (``serve`` oldest first); ``skip``
    runs the ``batch`` inputs of ``serve`` (None when nothing is served)."""

    refuse: tuple[int, ...] = ()
    serve: tuple[int, ...] = ()
    skip: SkipConfig | None = None
    batch: int = 0


@dataclass(frozen=True)
class Costs:
    """The profile as the policy reads it: ``seconds[skip][b]``, the profiled seconds of each servable sub-network
    on a batch of b (1..``max_batch``; index 0 unused), ``fastest[b]`` the least of them, ``ranking`` the
    sub-networks most accurate first. A prediction is a profiled time times the correction factor in use.

    Two tables make step 3 bisections (monotone where a profile need not be: noise): ``envelope[skip or None,
    size][j]``, the least profiled time of ``skip`` (None: of the fastest) over the batches ``size*j ..
    size*(max_batch // size)``, non-decreasing in j (the largest batch of alike requests that fits a deadline);
    ``leading[b][r]``, the least time at batch b of the ``r + 1`` most accurate sub-networks, non-increasing in r
    (the most accurate sub-network that fits), and ``leading_negated``, the same negated (non-decreasing: a plain
    C bisection finds the first guess, :func:`_most_accurate`); ``quickest[b]``, the sub-network step 4 falls back
    to at batch b (the fastest; of equally fast ones the most accurate). ``parts[skip or None][b]``: the first parts p
    of a batch b that cost no more with the rest after them, ``t(p) + t(b - p) <= t(b)``, ascending: step 3's split
    candidates (a dispatch then also counts its overhead); empty where batching pays (a GPU), so the split costs a
    dispatch nothing there."""

    ranking: tuple[SkipConfig, ...]
    seconds: Mapping[SkipConfig, tuple[float, ...]]
    fastest: tuple[float, ...]
    max_batch: int
    envelope: Mapping[tuple[SkipConfig | None, int], tuple[float, ...]]
    leading: tuple[tuple[float, ...], ...]
    leading_negated: tuple[tuple[float, ...], ...]
    quickest: tuple[SkipConfig, ...]
    parts: Mapping[SkipConfig | None, tuple[tuple[int, ...], ...]]

    @classmethod
    def build(cls, profiled: Predict, ranking: Sequence[SkipConfig], max_batch: int) -> Costs:
        """The table of ``profiled(skip, batch)`` (``LatencyModel.profiled``) for ``ranking`` (the servable
        sub-networks, most accurate first: :func:`rank_by_accuracy`) and batches up to ``max_batch``."""
        if not ranking:
            raise ValueError("ranking is empty: the policy needs at least one servable sub-network")
        seconds = {s: (0.0, *(profiled(s, b) for b in range(1, max_batch + 1))) for s in ranking}
        fastest = tuple(min(row[b] for row in seconds.values()) for b in range(max_batch + 1))
        envelope = {}
        for key, row in ((None, fastest), *seconds.items()):
            for size in range(1, max_batch + 1):
                least = list(row[::size])  # batches 0, size, 2 size, ...
                for j in range(len(least) - 2, 0, -1):
                    least[j] = min(least[j], least[j + 1])
                envelope[key, size] = tuple(least)
        leading = tuple(tuple(accumulate((seconds[s][b] for s in ranking), min)) for b in range(max_batch + 1))
        parts = {key: tuple(tuple(p for p in range(1, b) if row[p] + row[b - p] <= row[b])
                            for b in range(max_batch + 1))
                 for key, row in ((None, fastest), *seconds.items())}
        quickest = tuple(ranking[row.index(row[-1])] for row in leading)  # leading ends at the fastest's time
        return cls(tuple(ranking), seconds, fastest, max_batch, envelope, leading,
                   tuple(tuple(-t for t in row) for row in leading), quickest, parts)


def parse_accuracy(accuracy: Mapping[SkipLike, float], num_stages: int) -> dict[SkipConfig, float]:
    """``{sub-network: accuracy %}`` as the policy ranks it: at least one sub-network, each of ``num_stages`` stages,
    each accuracy a finite number; a one-line ValueError naming the entry otherwise."""
    if not isinstance(accuracy, Mapping):
        raise TypeError(f"the accuracy table must be a mapping {{sub-network: accuracy %}}, got "
                        f"{type(accuracy).__name__} (a file from eval --json: serving.load_accuracy reads it)")
    if not accuracy:
        raise ValueError("the accuracy table is empty: give the accuracy of each sub-network to serve")
    table, given = {}, {}
    for skip, value in accuracy.items():
        parsed = parse_skip(skip, num_stages)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"the accuracy of {skip_to_str(parsed)} is {value!r}: give a finite number (%)")
        if parsed in table and table[parsed] != number:
            raise ValueError(f"the accuracy table gives {skip_to_str(parsed)} twice, as {given[parsed]!r} "
                             f"({table[parsed]:g}) and {skip!r} ({number:g}): give it once")
        table[parsed], given[parsed] = number, skip
    return table


def rank_by_accuracy(accuracy: Mapping[SkipConfig, float], predict: Predict) -> tuple[SkipConfig, ...]:
    """The sub-networks most accurate first; equal accuracies: the faster at batch 1 first."""
    return tuple(sorted(accuracy, key=lambda s: (-accuracy[s], predict(s, 1), skip_to_str(s))))


_deadline = attrgetter("deadline")
_new = tuple.__new__  # ``_new(Decision, fields)``: half the cost of ``Decision(*fields)`` (a Python __new__)
_NEVER = float("inf")  # a module constant: float("inf") is a call, and step 3 resets ``rest`` to it per member


def plan_dispatch(queue: Sequence[Queued], now: float, costs: Costs, factor: float = 1.0, *,
                  fifo: bool = False, rate: float = 0.0, overhead: float = 0.0,
                  share: float = RESERVE_SHARE) -> Decision:
    """The policy's decision for ``queue`` (oldest first) at time ``now``.

    costs: the profile (:meth:`Costs.build`); factor: what predictions multiply it by (``LatencyModel.factor``);
    a request larger than ``costs.max_batch`` is the caller's error. rate: the predicted arrivals per second
    (``ArrivalRate.at(now)``; step 4); share: step 4's share of ``batch / rate`` (``ReserveShare.share``, which
    follows the SLO attainment; the default is the least it takes, the cautious one). overhead: the dispatcher's
    seconds per call outside the engine (step 3's split adds a call; 0: the profile alone decides). fifo: the caller
    knows that every request has the same size and forced sub-network and that deadlines never decrease along the
    queue (all requests alike, one SLO); the decision is the same, found in O(log n) instead of O(n).

    Every comparison is ``now + profiled * factor <= deadline``, as ``LatencyModel.predict`` computes it, so steps 1
    and 3 agree to the last bit (a request step 1 keeps fits on its own in step 3).
    """
    if not queue:
        return Decision()
    if fifo:
        return _plan_fifo(queue, now, costs, factor, rate, overhead, share)
    seconds, fastest, max_batch = costs.seconds, costs.fastest, costs.max_batch
    # Steps 1-3 in one pass over the queue (most of a mixed queue's cost: plain branches and comparisons, no min(),
    # one append per member), in three loops on one iterator so that each runs only the checks its stretch needs.
    # Step 3's largest batch is tracked as members join: ``k``, the last member whose prefix the fastest finishes by
    # the prefix's earliest deadline (``limit``), and ``rest``, the earliest deadline among the members after it.
    refuse, members = [], []
    requests = enumerate(queue)  # three loops take turns on it: before the batch opens, while it fills, after
    for i, request in requests:  # step 1 until a request is kept; step 2: it opens the batch (it fits on its own)
        own = fastest if (forced := request.skip) is None else seconds[forced]
        if now + own[request.size] * factor > request.deadline:
            refuse.append(i)
            continue
        row, total, deadline = own, request.size, request.deadline
        members.append(i)
        last, batch, limit, rest = i, total, deadline, _NEVER
        break
    else:
        return Decision(tuple(refuse))
    for i, request in requests:  # steps 1 and 2, step 3 as members join
        skip, size, due = request.skip, request.size, request.deadline
        if skip is forced or (forced is not None and skip == forced):  # None == a tuple: two __eq__ calls
            if now + row[size] * factor > due:  # step 1 on the batch's row: the same sub-networks allowed
                refuse.append(i)
                continue
            if total + size > max_batch:
                break
            total += size
            if due < deadline:  # noqa: PLR1730 -- min() is a call per request on the dispatcher's hot path
                deadline = due
            members.append(i)
            if now + row[total] * factor <= deadline:  # step 3: a larger batch fits
                last = i  # one store each (a tuple assignment of four builds a tuple)
                batch = total
                limit = deadline
                rest = _NEVER
            elif due < rest:
                rest = due
        elif now + (fastest if skip is None else seconds[skip])[size] * factor > due:
            refuse.append(i)
    for i, request in requests:  # the batch is full: step 1 only
        skip = request.skip
        if now + (fastest if skip is None else seconds[skip])[request.size] * factor > request.deadline:
            refuse.append(i)
    k = members.index(last)
    totals = None
    if parts := costs.parts[forced][batch]:  # step 3's split
        totals = _totals(queue, members)
        if part := _split(parts, totals[:k], row, batch, factor, overhead):
            head = totals.index(part)
            for m in members[head + 1:k + 1]:  # the split-off members now wait behind the part
                if (due := queue[m].deadline) < rest:
                    rest = due
            k, batch = head, part  # limit may stay the whole batch's: the lookahead (rest - t < their deadlines)
    if k + 1 < len(members):  # step 3's lookahead: those queued behind, served next on the fastest, keep their time
        rest -= row[total - batch] * factor
        if rest < limit:  # noqa: PLR1730
            limit = rest
    skip = _most_accurate(costs, forced, batch, now, factor, limit, rate, queue[members[0]].slo, share)
    if forced is None and (parts := costs.parts[skip][batch]):  # the chosen one's own split
        totals = totals or _totals(queue, members)
        if part := _split(parts, totals[:k], costs.seconds[skip], batch, factor, overhead):
            k, batch = totals.index(part), part
    serve = members if k + 1 == len(members) else members[:k + 1]
    return _new(Decision, (tuple(refuse), tuple(serve), skip, batch))


def _totals(queue: Sequence[Queued], members: list[int]) -> list[int]:
    """The inputs of each prefix of the batch (step 3's split candidates)."""
    return list(accumulate(queue[m].size for m in members))


def _plan_fifo(queue: Sequence[Queued], now: float, costs: Costs, factor: float, rate: float,
               overhead: float, share: float) -> Decision:
    """``plan_dispatch`` for a queue of alike requests with deadlines in arrival order: the requests step 1 refuses
    are the oldest ones, the batch is the next ones, and its earliest deadline is its first request's."""
    head = queue[0]
    forced, size = head.skip, head.size
    row = costs.fastest if forced is None else costs.seconds[forced]
    first = bisect_left(queue, now + row[size] * factor, key=_deadline)  # step 1: deadline < now + fastest
    refuse = _span(0, first)
    if first == len(queue):
        return Decision(refuse)
    deadline = queue[first].deadline
    full = costs.max_batch // size
    window = count = min(len(queue) - first, full)
    if count == full:  # step 3 on the envelope: the first count whose best remaining time misses, minus one
        count = _first_over(costs.envelope[forced, size], full, now, factor, deadline) - 1
    else:
        while now + row[size * count] * factor > deadline:
            count -= 1
    batch = size * count
    parts = costs.parts[forced][batch]
    if parts and (part := _split(parts, range(size, batch, size), row, batch, factor, overhead)):  # step 3's split
        count, batch = part // size, part
    if count < window:  # step 3's lookahead: those queued behind, served next on the fastest, keep their time
        rest = queue[first + count].deadline - row[size * (window - count)] * factor
        if rest < deadline:  # noqa: PLR1730
            deadline = rest
    skip = _most_accurate(costs, forced, batch, now, factor, deadline, rate, queue[first].slo, share)
    if forced is None and (parts := costs.parts[skip][batch]) and (
            part := _split(parts, range(size, batch, size), costs.seconds[skip], batch, factor, overhead)):
        count, batch = part // size, part  # the chosen one's own split
    return _new(Decision, (refuse, _span(first, first + count), skip, batch))


def _split(parts: tuple[int, ...], candidates: Sequence[int], row: tuple[float, ...], batch: int, factor: float,
           overhead: float) -> int:
    """Step 3's split of a ``batch`` on ``row``: the smallest of ``candidates`` (first parts a queue allows,
    ascending) among ``parts`` (``Costs.parts``) that costs no more with the rest after it, counting ``overhead`` for
    the extra call; 0 when none does."""
    whole = row[batch] * factor - overhead
    for part in candidates:
        if part in parts and (row[part] + row[batch - part]) * factor <= whole:
            return part
    return 0


def _first_over(envelope: tuple[float, ...], full: int, now: float, factor: float, deadline: float) -> int:
    """The first j in 1..``full`` with ``now + envelope[j] * factor > deadline`` (``full + 1`` when none; the
    envelope is non-decreasing): like :func:`_most_accurate`, a plain C bisection on the rearranged inequality
    (a Python key per probe cost ~0.1 us each), then moved by the comparison itself, exact to the last bit."""
    if not factor > 0:
        return bisect_left(envelope, True, 1, full + 1, key=lambda t: now + t * factor > deadline)
    j = bisect_right(envelope, (deadline - now) / factor, 1, full + 1)
    while j <= full and now + envelope[j] * factor <= deadline:
        j += 1
    while j > 1 and now + envelope[j - 1] * factor > deadline:
        j -= 1
    return j


def _span(start: int, stop: int) -> tuple[int, ...]:
    """``tuple(range(start, stop))``, built directly when it holds 0 or 1 index (most decisions; 4x cheaper)."""
    if stop - start == 1:
        return (start,)
    return tuple(range(start, stop)) if stop > start else ()


def _most_accurate(costs: Costs, forced: SkipConfig | None, batch: int, now: float, factor: float,
                   deadline: float, rate: float, slo: float, share: float) -> SkipConfig:
    """The most accurate allowed sub-network that finishes ``batch`` by ``deadline`` (one does: the caller checked
    the fastest), at a predicted ``rate`` > 0 within the reserve's share of ``batch / rate`` (step 4), and with
    ``slo`` > 0 early enough for the fastest to serve another ``batch`` within ``slo`` (step 5); the fastest when
    none does all that."""
    if forced is not None:
        return forced
    limit = deadline  # comparisons, not min(): this runs before every engine call
    if rate > 0 and (reserve := now + share * batch / rate) < limit:
        limit = reserve
    if slo > 0 and (guard := now + slo - costs.fastest[batch] * factor) < limit:
        limit = guard
    # the first r with ``now + leading[r] * factor <= limit``: a guess by plain bisection on the rearranged
    # inequality (``-t >= -(limit - now) / factor``, which rounding may put one place off), then moved by the
    # comparison itself, so the answer is the one that comparison gives, to the last bit
    leading = costs.leading[batch]
    r = bisect_left(costs.leading_negated[batch], -(limit - now) / factor) if factor > 0 else 0
    count = len(leading)
    while r < count and now + leading[r] * factor > limit:
        r += 1
    while r > 0 and now + leading[r - 1] * factor <= limit:
        r -= 1
    return costs.ranking[r] if r < count else costs.quickest[batch]
