"""The dispatch policy: at each dispatch, which queued requests to refuse, which to serve now, and with which
sub-network. A pure function of the queue, the clock and the latency predictions (tested with a simulated clock).

The rule (SlackFit-like, after SuperServe, NSDI '25):

1. Refuse every request that cannot finish in time even on the fastest sub-network it allows at its own size
   (batch 1 for a one-image request): an explicit refusal now beats a late answer.
2. The oldest remaining request opens the batch; requests that allow the same sub-networks (none forced, or the
   same one forced) join it in arrival order, up to ``max_batch`` inputs.
3. Serve the largest such batch that some allowed sub-network finishes before the earliest deadline in it, with the
   most accurate of those sub-networks.

Under light load the queue holds one request and the super-net serves it; as load grows the batches grow and the
sub-networks get cheaper, so throughput follows the load while every served request still meets its deadline as
predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..models.skip import SkipConfig, skip_to_str

#: predict(skip, batch) -> seconds
Predict = Callable[[SkipConfig, int], float]


@dataclass(frozen=True)
class Queued:
    """What the policy sees of a queued request: its absolute ``deadline`` (seconds, on the policy's clock), its
    ``size`` (images) and the sub-network it forces (None: any)."""

    deadline: float
    size: int = 1
    skip: SkipConfig | None = None


@dataclass(frozen=True)
class Decision:
    """``refuse`` and ``serve`` index the queue given to :func:`plan_dispatch` (``serve`` oldest first); ``skip``
    runs the ``batch`` inputs of ``serve`` (None when nothing is served)."""

    refuse: tuple[int, ...] = ()
    serve: tuple[int, ...] = ()
    skip: SkipConfig | None = None
    batch: int = 0


def rank_by_accuracy(accuracy: Mapping[SkipConfig, float], predict: Predict) -> tuple[SkipConfig, ...]:
    """The sub-networks most accurate first; equal accuracies: the faster at batch 1 first."""
    return tuple(sorted(accuracy, key=lambda s: (-accuracy[s], predict(s, 1), skip_to_str(s))))


def plan_dispatch(queue: Sequence[Queued], now: float, predict: Predict, ranking: Sequence[SkipConfig],
                  max_batch: int) -> Decision:
    """The policy's decision for ``queue`` (oldest first) at time ``now``.

    predict: seconds of one call of a sub-network on a batch; ranking: the servable sub-networks, most accurate first
    (:func:`rank_by_accuracy`); max_batch: the most inputs one call takes (a larger request is the caller's error).
    """
    fastest_cache: dict[tuple[SkipConfig | None, int], float] = {}

    def fastest(forced: SkipConfig | None, size: int) -> float:
        key = (forced, size)
        if key not in fastest_cache:
            fastest_cache[key] = predict(forced, size) if forced is not None else min(predict(s, size)
                                                                                       for s in ranking)
        return fastest_cache[key]

    refuse = []
    first = None
    for i, request in enumerate(queue):
        if now + fastest(request.skip, request.size) > request.deadline:
            refuse.append(i)
        elif first is None:
            first = i
    if first is None:
        return Decision(refuse=tuple(refuse))
    forced = queue[first].skip
    allowed = ranking if forced is None else (forced,)
    refused = set(refuse)
    members, sizes, deadlines = [], [], []
    total, earliest = 0, float("inf")
    for i in range(first, len(queue)):
        request = queue[i]
        if i in refused or request.skip != forced:
            continue
        if total + request.size > max_batch:
            break
        total += request.size
        earliest = min(earliest, request.deadline)
        members.append(i)
        sizes.append(total)
        deadlines.append(earliest)
    for k in range(len(members), 0, -1):
        for skip in allowed:
            if now + predict(skip, sizes[k - 1]) <= deadlines[k - 1]:  # step 1's comparison, to the last bit
                return Decision(refuse=tuple(refuse), serve=tuple(members[:k]), skip=skip, batch=sizes[k - 1])
    raise AssertionError("unreachable: the first request fits on its own (step 1)")
