"""The dispatch policy against a brute-force reference (general and fifo queues, corrected predictions), and a whole
queue simulated on a virtual clock."""

from __future__ import annotations

import random

import pytest

from adaptive_kernels.models.skip import all_skip_configs, skip_to_str
from adaptive_kernels.serving.latency import LatencyModel
from adaptive_kernels.serving.policy import Costs, Queued, plan_dispatch, rank_by_accuracy

SKIPS = all_skip_configs(3)  # FFF (super) first, TTT (base) last


def random_latency(rng: random.Random, padded: bool, noise: float = 0.1) -> LatencyModel:
    """Per-bucket tables, µs: a per-sub-network cost growing with the batch, times 1 +- ``noise`` (0.5: a larger
    batch may be faster, as in a noisy profile)."""
    cost = {s: 100 + 50 * (3 - sum(s)) + rng.uniform(-20, 20) for s in SKIPS}
    tables = {b: {skip_to_str(s): cost[s] * (1 + 0.6 * (b - 1)) * rng.uniform(1 - noise, 1 + noise) for s in SKIPS}
              for b in (1, 2, 4, 8)}
    return LatencyModel(tables, padded=padded)


def reference(queue, now, predict, accuracy, max_batch):
    """Every (prefix of the group, sub-network) pair tried; the largest prefix, then the most accurate, wins."""
    def allowed(request):
        return [request.skip] if request.skip is not None else list(accuracy)

    refuse = [i for i, r in enumerate(queue) if all(now + predict(s, r.size) > r.deadline for s in allowed(r))]
    live = [i for i in range(len(queue)) if i not in refuse]
    if not live:
        return tuple(refuse), (), None
    forced = queue[live[0]].skip
    group = [i for i in live if queue[i].skip == forced]
    options = []
    for k in range(1, len(group) + 1):
        members = group[:k]
        batch = sum(queue[i].size for i in members)
        if batch > max_batch:
            break
        deadline = min(queue[i].deadline for i in members)
        for s in allowed(queue[members[0]]):
            if now + predict(s, batch) <= deadline:
                options.append(((-k, -accuracy[s], predict(s, 1), skip_to_str(s)), tuple(members), s))
    _, serve, skip = min(options)
    return tuple(refuse), serve, skip


@pytest.mark.parametrize("seed", range(300))
def test_policy_matches_brute_force(seed):
    rng = random.Random(seed)
    latency = random_latency(rng, padded=seed % 2 == 0, noise=0.5 if seed % 5 == 0 else 0.1)
    for _ in range(seed % 4):  # a corrected latency model: predictions are the profile times a factor
        latency.observe(SKIPS[0], 1, latency.profiled(SKIPS[0], 1) * rng.uniform(0.5, 3.0))
    accuracy = {s: round(rng.uniform(80, 90), 1 if seed % 3 else 0) for s in rng.sample(SKIPS, rng.randint(1, 8))}
    ranking = rank_by_accuracy(accuracy, latency.predict)
    costs = Costs.build(latency.profiled, ranking, 8)
    now = rng.uniform(0, 10)
    forced_choices = [None] * 4 + list(accuracy)[:2]
    queue = [Queued(now + rng.uniform(-1e-4, 3e-3), rng.choice([1, 1, 1, 2, 3]), rng.choice(forced_choices))
             for _ in range(rng.randint(0, 14))]
    got = plan_dispatch(queue, now, costs, latency.factor)
    refuse, serve, skip = reference(queue, now, latency.predict, accuracy, 8)
    assert (got.refuse, got.serve, got.skip) == (refuse, serve, skip)
    assert got.batch == sum(queue[i].size for i in serve)
    # a fifo queue (alike requests, deadlines in arrival order): the bisection decides as the reference does
    size, forced = rng.choice([1, 1, 2, 3]), rng.choice(forced_choices)
    fifo = [Queued(d, size, forced) for d in sorted(now + rng.uniform(-1e-4, 3e-3) for _ in range(rng.randint(0, 40)))]
    got = plan_dispatch(fifo, now, costs, latency.factor, fifo=True)
    assert got == plan_dispatch(fifo, now, costs, latency.factor)
    refuse, serve, skip = reference(fifo, now, latency.predict, accuracy, 8)
    assert (got.refuse, got.serve, got.skip, got.batch) == (refuse, serve, skip, size * len(serve))


def test_policy_serves_the_largest_batch_that_fits_when_the_profile_is_not_monotone():
    # a noisy profile: batch 8 measured faster than batches 3..7; with 0.35 ms of slack, 8 fits and 3..7 do not
    latency = LatencyModel({1: {"F": 100.0}, 2: {"F": 150.0}, 4: {"F": 400.0}, 8: {"F": 300.0}})
    accuracy = {(False,): 90.0}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 8)
    queue = [Queued(1.0 + 350e-6 + 1e-9 * i) for i in range(12)]
    expected = reference(queue, 1.0, latency.predict, accuracy, 8)
    assert expected[1] == tuple(range(8))
    for fifo in (True, False):
        got = plan_dispatch(queue, 1.0, costs, fifo=fifo)
        assert (got.refuse, got.serve, got.skip, got.batch) == (*expected, 8)


def simulate(rate_per_s: float, seconds: float, slo_s: float, seed: int = 0):
    """Poisson arrivals served by the policy on a virtual clock; calls take exactly the predicted time."""
    tables = {b: {"FF": 1000 * b ** 0.7, "FT": 800 * b ** 0.7, "TF": 700 * b ** 0.7, "TT": 500 * b ** 0.7}
              for b in (1, 2, 4, 8)}
    latency = LatencyModel(tables)
    accuracy = {s: a for s, a in zip(all_skip_configs(2), (90.0, 89.0, 88.5, 88.0), strict=True)}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 8)
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while t < seconds:
        t += rng.expovariate(rate_per_s)
        arrivals.append(t)
    queue, clock, served, refused, nxt = [], 0.0, [], 0, 0
    while nxt < len(arrivals) or queue:
        while nxt < len(arrivals) and arrivals[nxt] <= clock:
            queue.append(Queued(arrivals[nxt] + slo_s))
            nxt += 1
        if not queue:
            clock = arrivals[nxt]
            continue
        d = plan_dispatch(queue, clock, costs, fifo=True)  # one SLO: deadlines in arrival order
        refused += len(d.refuse)
        if d.skip is not None:
            clock += latency.predict(d.skip, d.batch)
            served += [(clock <= queue[i].deadline, accuracy[d.skip]) for i in d.serve]
        queue = [r for i, r in enumerate(queue) if i not in set(d.refuse) | set(d.serve)]
    return len(arrivals), served, refused


def test_policy_simulated_light_load_serves_the_super_net():
    sent, served, refused = simulate(rate_per_s=50, seconds=5, slo_s=0.005)
    assert refused == 0 and len(served) == sent
    assert all(met for met, _ in served)
    assert sum(acc for _, acc in served) / len(served) > 89.9


def test_policy_simulated_overload_trades_accuracy_for_deadlines():
    # past the super-net's capacity (8 / 5.3 ms = 1500/s at batch 8), within the base-net's (3000/s)
    sent, served, refused = simulate(rate_per_s=2500, seconds=5, slo_s=0.010)
    assert len(served) + refused == sent
    assert all(met for met, _ in served)  # exact predictions: whatever is served meets its deadline
    mean = sum(acc for _, acc in served) / len(served)
    assert 88.0 <= mean < 89.9  # cheaper sub-networks took over
    assert refused < 0.01 * sent
