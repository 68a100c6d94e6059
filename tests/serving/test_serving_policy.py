"""The dispatch policy against a brute-force reference (general and fifo queues, corrected predictions, arrival
rates), its reserve on hand-built queues, and whole traces replayed on a simulated clock (bench/serving_sim.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from adaptive_kernels.models.skip import all_skip_configs, skip_to_str
from adaptive_kernels.serving.latency import LatencyModel, ReserveShare
from adaptive_kernels.serving.policy import RESERVE_SHARE, Costs, Queued, plan_dispatch, rank_by_accuracy
from bench.serving_load import PAPER_RESNET50, bursty_trace, summarize
from bench.serving_sim import simulate

SKIPS = all_skip_configs(3)  # FFF (super) first, TTT (base) last


def random_latency(rng: random.Random, padded: bool, noise: float = 0.1, slope: float = 0.6) -> LatencyModel:
    """Per-bucket tables, µs: a per-sub-network cost growing with the batch by ``slope`` per input (below 1:
    batching pays, as on a GPU; 1 or more: a batch costs about its parts, as on a CPU, and step 3 splits), times 1
    +- ``noise`` (0.5: a larger batch may be faster, as in a noisy profile)."""
    cost = {s: 100 + 50 * (3 - sum(s)) + rng.uniform(-20, 20) for s in SKIPS}
    tables = {b: {skip_to_str(s): cost[s] * (1 + slope * (b - 1)) * rng.uniform(1 - noise, 1 + noise) for s in SKIPS}
              for b in (1, 2, 4, 8)}
    return LatencyModel(tables, padded=padded)


def reference(queue, now, profiled, accuracy, max_batch, rate=0.0, factor=1.0, overhead=0.0, share=RESERVE_SHARE):
    """Every (prefix of the group, sub-network) pair tried: the largest prefix some sub-network finishes in time; of
    it, the first part that costs no more with the rest after it and one more call's ``overhead`` (step 3's split);
    then the most accurate sub-network that finishes it in time and leaves the group's requests behind it (up to
    ``max_batch`` inputs) time for the fastest to serve them in one batch (step 3's lookahead), with an arrival rate
    or an SLO on the opening request also the reserve (step 4) and time for the fastest to serve as many again within
    the SLO (step 5), else the fastest; then, where that sub-network's own parts cost less, its first part."""
    def predict(skip, batch):
        return profiled(skip, batch) * factor

    def allowed(request):
        return [request.skip] if request.skip is not None else list(accuracy)

    refuse = [i for i, r in enumerate(queue) if all(now + predict(s, r.size) > r.deadline for s in allowed(r))]
    live = [i for i in range(len(queue)) if i not in refuse]
    if not live:
        return tuple(refuse), (), None
    forced = queue[live[0]].skip
    group = [i for i in live if queue[i].skip == forced]
    options = allowed(queue[live[0]])
    serve = ()
    window = ()
    for k in range(1, len(group) + 1):
        members = group[:k]
        if sum(queue[i].size for i in members) > max_batch:
            break
        window = tuple(members)
        deadline = min(queue[i].deadline for i in members)
        if any(now + predict(s, sum(queue[i].size for i in members)) <= deadline for s in options):
            serve = tuple(members)
    batch = sum(queue[i].size for i in serve)

    def fastest(b):
        return min(profiled(s, b) for s in options)

    for j in range(1, len(serve)):
        part = sum(queue[i].size for i in serve[:j])
        if fastest(part) + fastest(batch - part) <= fastest(batch) and (
                (fastest(part) + fastest(batch - part)) * factor <= fastest(batch) * factor - overhead):
            serve, batch = serve[:j], part
            break
    target = min(queue[i].deadline for i in serve)
    behind = window[len(serve):]
    if behind:
        target = min(target, min(queue[i].deadline for i in behind)
                     - fastest(sum(queue[i].size for i in behind)) * factor)
    if forced is not None:
        return tuple(refuse), serve, forced
    if rate > 0:
        target = min(target, now + share * batch / rate)
    slo = queue[serve[0]].slo
    if slo > 0:
        target = min(target, now + slo - min(predict(s, batch) for s in accuracy))
    rank = {s: (-accuracy[s], predict(s, 1), skip_to_str(s)) for s in accuracy}
    fitting = [s for s in accuracy if now + predict(s, batch) <= target]
    chosen = min(fitting, key=rank.get) if fitting else min(accuracy, key=lambda s: (predict(s, batch), rank[s]))
    for j in range(1, len(serve)):  # the chosen sub-network's own split
        part = sum(queue[i].size for i in serve[:j])
        pair = profiled(chosen, part) + profiled(chosen, batch - part)
        if pair <= profiled(chosen, batch) and pair * factor <= profiled(chosen, batch) * factor - overhead:
            return tuple(refuse), serve[:j], chosen
    return tuple(refuse), serve, chosen


def decoded(skip):
    """A forced sub-network as a server decodes it from each request: equal to the profile's, a new object."""
    return None if skip is None else tuple(bool(stage) for stage in skip)


@pytest.mark.parametrize("seed", range(300))
def test_policy_matches_brute_force(seed):
    rng = random.Random(seed)
    latency = random_latency(rng, padded=seed % 2 == 0, noise=0.5 if seed % 5 == 0 else 0.1,
                             slope=(0.6, 1.0, 1.1)[seed % 3])
    for _ in range(seed % 4):  # a corrected latency model: predictions are the profile times a factor
        latency.observe(SKIPS[0], 1, latency.profiled(SKIPS[0], 1) * rng.uniform(0.5, 3.0))
    accuracy = {s: round(rng.uniform(80, 90), 1 if seed % 3 else 0) for s in rng.sample(SKIPS, rng.randint(1, 8))}
    ranking = rank_by_accuracy(accuracy, latency.predict)
    costs = Costs.build(latency.profiled, ranking, 8)
    now = rng.uniform(0, 10)
    forced_choices = [None] * 4 + list(accuracy)[:2]
    # SLOs: none (no guard), ample (it rarely binds), tight (it decides)
    slos = rng.choice([(0.0,), (1.0,), (1e-3, 3e-3, 0.0)])
    queue = [Queued(now + rng.uniform(-1e-4, 3e-3), rng.choice([1, 1, 1, 2, 3]), decoded(rng.choice(forced_choices)),
                    rng.choice(slos)) for _ in range(rng.randint(0, 14))]
    # arrivals per second: none (no reserve), light (the reserve rarely binds), heavy (it decides)
    rate = rng.choice([0.0, rng.uniform(100, 2000), rng.uniform(2000, 50000)])
    # the dispatcher's time per call: none, small (some splits still pay), large (none does)
    overhead = rng.choice([0.0, rng.uniform(0, 30e-6), 1e-3])
    got = plan_dispatch(queue, now, costs, latency.factor, rate=rate, overhead=overhead)
    refuse, serve, skip = reference(queue, now, latency.profiled, accuracy, 8, rate, latency.factor, overhead)
    assert (got.refuse, got.serve, got.skip) == (refuse, serve, skip)
    assert got.batch == sum(queue[i].size for i in serve)
    # a fifo queue (alike requests, deadlines in arrival order): the bisection decides as the reference does
    size, forced = rng.choice([1, 1, 2, 3]), rng.choice(forced_choices)
    slo = rng.choice(slos)
    fifo = [Queued(d, size, forced, slo)
            for d in sorted(now + rng.uniform(-1e-4, 3e-3) for _ in range(rng.randint(0, 40)))]
    got = plan_dispatch(fifo, now, costs, latency.factor, fifo=True, rate=rate, overhead=overhead)
    assert got == plan_dispatch(fifo, now, costs, latency.factor, rate=rate, overhead=overhead)
    refuse, serve, skip = reference(fifo, now, latency.profiled, accuracy, 8, rate, latency.factor, overhead)
    assert (got.refuse, got.serve, got.skip, got.batch) == (refuse, serve, skip, size * len(serve))


@pytest.mark.parametrize("seed", range(60))
def test_policy_reserve_share_matches_brute_force(seed):
    # arrival rates at which step 4 decides (the cautious share leaves only cheaper sub-networks; in the random
    # queues above a share from 0.5 to 4 changed none of 300 decisions): the share the scheduler passes
    # (ReserveShare's, 0.5 .. 4) moves the pick as the reference says, in the general pass and the fifo bisection
    rng = random.Random(seed)
    latency = random_latency(rng, padded=seed % 2 == 0, slope=(0.6, 1.0, 1.1)[seed % 3])
    accuracy = {s: 90 - sum(s) + rng.uniform(0, 0.5) for s in SKIPS}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 8)
    now = rng.uniform(0, 10)
    queue = [Queued(d) for d in sorted(now + rng.uniform(1e-3, 3e-3) for _ in range(rng.randint(1, 6)))]
    rate = rng.uniform(500, 5000)
    for share in (RESERVE_SHARE, rng.uniform(RESERVE_SHARE, 4.0), 4.0):
        expected = reference(queue, now, latency.profiled, accuracy, 8, rate, latency.factor, 0.0, share)
        for fifo in (False, True):
            got = plan_dispatch(queue, now, costs, latency.factor, fifo=fifo, rate=rate, share=share)
            assert (got.refuse, got.serve, got.skip) == expected


@pytest.mark.parametrize("seed", range(40))
def test_policy_decides_deadlines_at_a_prediction_to_the_last_bit(seed):
    # the pick bisects on (deadline - now) / factor, which rounding can put one place off: a request whose deadline
    # is a prediction exactly, or one ulp either side, must still get what `now + predict <= deadline` says
    rng = random.Random(seed)
    latency = random_latency(rng, padded=seed % 2 == 0)
    for _ in range(3):
        latency.observe(SKIPS[0], 1, latency.profiled(SKIPS[0], 1) * rng.uniform(0.5, 3.0))
    accuracy = {s: 90 - sum(s) + rng.uniform(0, 0.5) for s in SKIPS}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 8)
    now = rng.uniform(0, 1e4)
    for skip in SKIPS:
        exact = now + latency.predict(skip, 1)
        for deadline in (math.nextafter(exact, -math.inf), exact, math.nextafter(exact, math.inf)):
            for rate in (0.0, 1e-3):  # no reserve; a reserve so long that the deadline binds
                got = plan_dispatch([Queued(deadline)], now, costs, latency.factor, rate=rate)
                assert (got.refuse, got.serve, got.skip) == reference([Queued(deadline)], now, latency.profiled,
                                                                       accuracy, 8, rate, latency.factor)


@pytest.mark.parametrize("seed", range(40))
def test_policy_sizes_a_full_fifo_batch_at_a_prediction_to_the_last_bit(seed):
    # a queue of more alike requests than a batch holds: the fifo path bisects the envelope on (deadline - now) /
    # factor; a first deadline exactly at a batch's prediction, or one ulp either side, must give the batch that
    # `now + predict <= deadline` gives (the general pass compares exactly)
    rng = random.Random(seed)
    latency = random_latency(rng, padded=seed % 2 == 0, noise=0.5 if seed % 4 < 2 else 0.1)
    for _ in range(3):
        latency.observe(SKIPS[0], 1, latency.profiled(SKIPS[0], 1) * rng.uniform(0.5, 3.0))
    accuracy = {s: 90 - sum(s) + rng.uniform(0, 0.5) for s in SKIPS}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 8)
    now, size = rng.uniform(0, 1e4), 1 + seed % 2
    for batch in range(size, 9, size):
        exact = now + costs.fastest[batch] * latency.factor
        for first in (math.nextafter(exact, -math.inf), exact, math.nextafter(exact, math.inf)):
            queue = [Queued(first + 1e-3 * i, size) for i in range(12)]
            for rate in (0.0, 1e-3):
                got = plan_dispatch(queue, now, costs, latency.factor, fifo=True, rate=rate)
                assert got == plan_dispatch(queue, now, costs, latency.factor, rate=rate)


def test_policy_serves_the_largest_batch_that_fits_when_the_profile_is_not_monotone():
    # a noisy profile: batch 8 measured faster than batches 3..7; with 0.35 ms of slack, 8 fits and 3..7 do not
    latency = LatencyModel({1: {"F": 100.0}, 2: {"F": 150.0}, 4: {"F": 400.0}, 8: {"F": 300.0}})
    accuracy = {(False,): 90.0}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 8)
    queue = [Queued(1.0 + 350e-6 + 1e-9 * i) for i in range(12)]
    expected = reference(queue, 1.0, latency.profiled, accuracy, 8)
    assert expected[1] == tuple(range(8))
    for fifo in (True, False):
        got = plan_dispatch(queue, 1.0, costs, fifo=fifo)
        assert (got.refuse, got.serve, got.skip, got.batch) == (*expected, 8)


def test_lookahead_reads_only_the_requests_behind_a_batch_a_noisy_profile_lets_grow():
    # batch 2 measured slower than 3: the second request does not fit with the first, the third fits with both;
    # only the fourth is then behind the batch, and its 10 ms leave the super-net time (250 of 300 µs); the second's
    # deadline (300 µs) is the batch's own, not one behind it (that would leave 200 µs: the base-net)
    us = {"S": (150.0, 450.0, 250.0, 1100.0), "B": (100.0, 400.0, 200.0, 1000.0)}
    super_net, base_net = (False,), (True,)
    accuracy = {super_net: 77.6, base_net: 76.1}

    def profiled(skip, batch):
        return us["B" if skip[0] else "S"][batch - 1] * 1e-6

    costs = Costs.build(profiled, rank_by_accuracy(accuracy, profiled), 4)
    queue = [Queued(d * 1e-6) for d in (1000.0, 300.0, 5000.0, 10000.0)]
    assert reference(queue, 0.0, profiled, accuracy, 4) == ((), (0, 1, 2), super_net)
    assert plan_dispatch(queue, 0.0, costs) == ((), (0, 1, 2), super_net, 3)


def test_reserve_picks_what_keeps_up_with_the_arrival_rate():
    # super 10 ms, middle 7 ms, base 5 ms at batch 1; one request with 100 ms of slack: the deadline never binds
    latency = LatencyModel({1: {"FF": 10000.0, "TF": 7000.0, "TT": 5000.0}, 2: {"FF": 18000.0, "TF": 13000.0,
                                                                                 "TT": 9000.0}})
    accuracy = {(False, False): 77.6, (True, False): 77.0, (True, True): 76.1}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 2)
    one = [Queued(1.1)]

    def pick(queue, rate, factor=1.0):
        got = plan_dispatch(queue, 1.0, costs, factor, rate=rate)
        assert got == plan_dispatch(queue, 1.0, costs, factor, rate=rate, fifo=True)
        return skip_to_str(got.skip), got.batch

    assert pick(one, 0.0) == ("FF", 1)  # no rate known: no reserve (the policy before step 4)
    assert pick(one, 49.0) == ("FF", 1)  # 1 / 49 s between arrivals, half of it 10.2 ms: the super-net fits
    assert pick(one, 51.0) == ("TF", 1)  # 9.8 ms: the super-net no longer does
    assert pick(one, 72.0) == ("TT", 1)  # 6.9 ms: only the base-net
    assert pick(one, 1000.0) == ("TT", 1)  # nothing keeps up: the fastest
    assert pick(one, 60.0, factor=1.5) == ("TT", 1)  # corrected predictions: 10.5 ms for the middle one > 8.3
    # a batch of two: twice the time to arrive (2 / 100 s, half of it 10 ms): 13 ms does not fit, 9 ms does
    assert pick([Queued(1.1), Queued(1.1)], 100.0) == ("TT", 2)
    assert pick([Queued(1.1), Queued(1.1)], 69.0) == ("TF", 2)
    # the deadline still binds: 8 ms of slack at a low rate leaves the super-net out
    assert pick([Queued(1.008)], 1.0) == ("TF", 1)
    # a forced sub-network is served as forced, whatever the rate
    forced = [Queued(1.1, 1, (False, False))]
    assert plan_dispatch(forced, 1.0, costs, rate=1000.0).skip == (False, False)


def test_burst_guard_leaves_the_fastest_time_for_as_many_again():
    # the case seen over HTTP (ResNet-50, SLO 200 ms): three requests queued, the rate of the latest 8 arrivals still
    # low; the super-net on all three fits their deadline and the reserve, but a burst of three more arriving behind
    # it could then not be served within the SLO even by the base-net
    latency = LatencyModel({1: {"FF": 40600.0, "TF": 34400.0, "TT": 25900.0},
                            4: {"FF": 155600.0, "TF": 127800.0, "TT": 101000.0}})
    accuracy = {(False, False): 77.6, (True, False): 76.5, (True, True): 76.1}
    costs = Costs.build(latency.profiled, rank_by_accuracy(accuracy, latency.predict), 4)

    def pick(queue, rate=5.0, factor=1.0):
        got = plan_dispatch(queue, 1.0, costs, factor, rate=rate)
        assert got == plan_dispatch(queue, 1.0, costs, factor, rate=rate, fifo=True)
        assert (got.refuse, got.serve, got.skip) == reference(queue, 1.0, latency.profiled, accuracy, 4, rate, factor)
        return skip_to_str(got.skip), got.batch

    # batch 3, interpolated, x1.2 (the correction measured then): super 140.8 ms, TF 116.0, base 91.2; deadlines
    # 190 ms away, the reserve (rate 5/s: 300 ms) does not bind
    assert pick([Queued(1.19)] * 3, factor=1.2) == ("FF", 3)  # no SLO given: no guard (the policy before step 5)
    three = [Queued(1.19, 1, None, 0.2)] * 3
    assert pick(three, factor=1.2) == ("TT", 3)  # 140.8 + 91.2, 116.0 + 91.2 > 200: only the base-net leaves it
    assert pick(three) == ("FF", 3)  # uncorrected: 117.3 + 76.0 <= 200
    assert pick([Queued(1.19, 1, None, 0.3)] * 3, factor=1.2) == ("FF", 3)  # a 300 ms SLO: the super-net leaves it
    assert pick([Queued(1.19, 1, None, 0.18)] * 3, factor=1.2) == ("TT", 3)  # nothing leaves it: the fastest
    # one request: 40.6 + 25.9 ms is far within the SLO (light load keeps the super-net)
    assert pick([Queued(1.19, 1, None, 0.2)]) == ("FF", 1)
    # corrected predictions: x2.5, the super-net's 101.5 + 64.8 ms fit 200; x3.05 (123.8 + 79.0) not, TF's do
    assert pick([Queued(1.19, 1, None, 0.2)], rate=0.0, factor=2.5) == ("FF", 1)
    assert pick([Queued(1.19, 1, None, 0.2)], rate=0.0, factor=3.05) == ("TF", 1)


#: ResNet-50-ADN's quiet CPU profile, super FFFF and base TTTT (bench/results/serving/paper_resnet50.json): a batch
#: costs about its parts (base 27.4 ms at batch 1, 132.5 at 5 interpolated, 104.3 at 4)
RESNET50_QUIET_US = {1: {"FF": 40580.0, "TT": 27401.0}, 2: {"FF": 78257.0, "TT": 51067.0},
                     4: {"FF": 180859.0, "TT": 104253.0}, 8: {"FF": 329918.0, "TT": 217142.0}}
SUPER_BASE = {(False, False): 77.6, (True, True): 76.1}


def pick_two(latency, queue, factor=1.2, overhead=0.0):
    """The super-net / base-net decision at time 1.0 (no arrival rate): the general pass, which the fifo bisection
    and the brute-force reference must match, as (sub-network, batch)."""
    costs = Costs.build(latency.profiled, rank_by_accuracy(SUPER_BASE, latency.predict), 8)
    got = plan_dispatch(queue, 1.0, costs, factor, overhead=overhead)
    assert got == plan_dispatch(queue, 1.0, costs, factor, fifo=True, overhead=overhead)
    assert (got.refuse, got.serve, got.skip) == reference(queue, 1.0, latency.profiled, SUPER_BASE, 8, 0.0, factor,
                                                           overhead)
    return skip_to_str(got.skip), got.batch


def test_lookahead_leaves_the_requests_behind_the_batch_their_time():
    cpu = LatencyModel(RESNET50_QUIET_US)
    # two requests, 70 ms and 90 ms from their deadlines, predictions x1.5 (base 41.1 ms at batch 1, 76.6 at 2): the
    # two together miss the first's deadline, so the first goes alone; the super-net would finish it (60.9 ms) but
    # leave the second 29 ms where it needs the base-net's 41.1 (seen in the simulation: it was then refused)
    assert pick_two(cpu, [Queued(1.07), Queued(1.09)], factor=1.5) == ("TT", 1)
    # the second 110 ms away: the super-net's 60.9 + 41.1 fit, so the first gets the super-net
    assert pick_two(cpu, [Queued(1.07), Queued(1.11)], factor=1.5) == ("FF", 1)
    # alone, the first gets the super-net however close the second's deadline would have been
    assert pick_two(cpu, [Queued(1.07)], factor=1.5) == ("FF", 1)


def test_split_serves_a_first_part_when_batching_does_not_pay():
    cpu = LatencyModel(RESNET50_QUIET_US)
    # a GPU-like one: a batch costs far less than its parts
    gpu = LatencyModel({1: {"FF": 1500.0, "TT": 1000.0}, 2: {"FF": 1600.0, "TT": 1100.0},
                        4: {"FF": 1800.0, "TT": 1200.0}, 8: {"FF": 2400.0, "TT": 1600.0}}, padded=True)

    # a burst of five with 200 ms left, predictions x1.2: the base-net on all five fits (159 ms), but 1 + 4 costs no
    # more (131.7 <= 132.5 ms profiled) and leaves the four their time: one now, on the super-net (48.7 ms, and the
    # four on the base-net after it by 48.7 + 125.1 <= 200)
    assert pick_two(cpu, [Queued(1.2)] * 5) == ("FF", 1)
    # counting the dispatcher's time for the extra call: 1 + 4 saves 0.85 ms x1.2, 2 + 3 3.8 ms x1.2; 0.3 ms of
    # overhead leaves the first, 1.5 ms only the second (two now, on the super-net: 93.9 ms, then 93.2 for the
    # three), 5 ms neither: all five on the base-net (159 ms; the super-net's 262 would miss)
    assert pick_two(cpu, [Queued(1.2)] * 5, overhead=0.3e-3) == ("FF", 1)
    assert pick_two(cpu, [Queued(1.2)] * 5, overhead=1.5e-3) == ("FF", 2)
    assert pick_two(cpu, [Queued(1.2)] * 5, overhead=5e-3) == ("TT", 5)
    # 140 ms left: the largest batch is 4 (125.1 ms); 1 + 3 costs more than 4 (105.1 > 104.3 ms), 2 + 2 less: two
    # now, on the base-net (61.3 ms): the three behind them need the base-net's 93.2 on three, which leaves 46.8 ms,
    # and neither finishes two in that, so the fastest
    assert pick_two(cpu, [Queued(1.14)] * 5) == ("TT", 2)
    # three: on the base-net every part costs more with its rest (1 + 2 is 78.5 ms, 3 is 77.7), so all three fit on
    # the super-net (129.6 ms); but the super-net's own parts cost less (1 + 2: 118.9 ms): one now on it, the two
    # after it, each answered no later than in the batch of three; unless the dispatcher's time for the extra call
    # eats the 10.7 ms saved
    assert pick_two(cpu, [Queued(1.2)] * 3, factor=1.0) == ("FF", 1)
    assert pick_two(cpu, [Queued(1.2)] * 3, factor=1.0, overhead=10e-3) == ("FF", 1)
    assert pick_two(cpu, [Queued(1.2)] * 3, factor=1.0, overhead=11e-3) == ("FF", 3)
    # the part's sub-network leaves the rest its time even where its own deadline would allow more (a burst of
    # five, 1 + 4 on x1.0: the super-net's 40.6 ms leaves 104.3 for the four in 160 ms; in 140 ms it would not)
    assert pick_two(cpu, [Queued(1.16)] * 5, factor=1.0) == ("FF", 1)
    assert pick_two(cpu, [Queued(1.14)] * 5, factor=1.0) == ("TT", 1)
    # a GPU-like profile never splits: the super-net on all five (2.4 ms at bucket 8)
    assert pick_two(gpu, [Queued(1.2)] * 5) == ("FF", 5)


#: ResNet-50-ADN on the CPU engine, µs per bucket, the four sub-networks the paper reports (bench/results/serving/
#: paper_resnet50.json, measured by the HTTP sweep; noisy as measured on a shared machine)
RESNET50_US = {1: {"FFFF": 20143, "TFFF": 18724, "TTFF": 16990, "TTTT": 12731},
               2: {"FFFF": 37939, "TFFF": 73647, "TTFF": 65930, "TTTT": 23952},
               4: {"FFFF": 73979, "TFFF": 68575, "TTFF": 61836, "TTTT": 46043},
               8: {"FFFF": 150226, "TFFF": 336820, "TTFF": 132126, "TTTT": 98378}}


def test_simulated_paper_resnet50_attains_what_the_base_net_does_with_more_accuracy():
    # 20 req/s, bursty (CV² 4, sine), SLO 200 ms, calls 1.5x the profile with log-normal noise (sigma 0.3): the
    # machine under load, past where the base-net attains 0.99. Measured on these 4 traces: base-net 0.9736,
    # adaptive 0.9769 (its reserve share following the attainment, one for the 4 traces as a server's; with it fixed
    # at 0.5, 0.9735: here misses come too often for the share to rise much); the policy before steps 4 and 5 (myopic:
    # no reserve, no guard) 0.027 less than the base-net (0.036 before step 3's lookahead), with the guard alone 0.018
    # less.
    runs = {"base": [], "adaptive": [], "myopic": []}
    share = ReserveShare()
    for seed in range(4):
        arrivals = bursty_trace(60.0, 20.0, 4.0, seed)
        for name, forced, reserve in (("base", "TTTT", True), ("adaptive", None, True), ("myopic", None, False)):
            records = simulate(arrivals, 0.2, RESNET50_US, PAPER_RESNET50, 8, forced, reserve=reserve, guard=reserve,
                               share=share if name == "adaptive" else None, load=1.5, noise=0.3, seed=seed)
            runs[name].append(summarize(records, PAPER_RESNET50, 200.0, 60.0))
    attained = {name: np.mean([r["slo_attainment"] for r in rows]) for name, rows in runs.items()}
    accuracy = {name: np.mean([r["mean_accuracy"] for r in rows]) for name, rows in runs.items()}
    assert all(r["sent"] == r["served"] + r["refused"] for rows in runs.values() for r in rows)
    assert attained["adaptive"] >= attained["base"] - 0.002  # 0.002: ~2 of the ~1200 requests of a trace
    assert accuracy["adaptive"] > PAPER_RESNET50["TTTT"] + 0.1
    assert attained["myopic"] < attained["base"] - 0.01  # what steps 4 and 5 fix


#: the same on a machine twice as fast (bench/results/serving/paper_resnet50_lookahead.json)
RESNET50_FAST_US = {1: {"FFFF": 20282, "TFFF": 18679, "TTFF": 18395, "TTTT": 13575},
                    2: {"FFFF": 39016, "TFFF": 36352, "TTFF": 32707, "TTTT": 24324},
                    4: {"FFFF": 72877, "TFFF": 65476, "TTFF": 59570, "TTTT": 47138},
                    8: {"FFFF": 149300, "TFFF": 149860, "TTFF": 133052, "TTTT": 100513}}


def test_simulated_goal_where_the_base_net_attains_99_percent_the_adaptive_server_does_past_halfway_accuracy():
    # 20 req/s on the fast machine's profile, calls scattered log-normally (sigma 0.3), 8 traces of 30 s: the
    # base-net attains 1.000; with the reserve's share fixed at 0.5 the adaptive server attained 0.9996 but at 76.54,
    # short of halfway (76.85); the share following the attainment spends some of the 1 % the goal allows on
    # accuracy: measured 0.9957 at 77.09.
    halfway = (PAPER_RESNET50["TTTT"] + PAPER_RESNET50["FFFF"]) / 2
    runs = {"base": [], "adaptive": [], "cautious": []}
    share = ReserveShare()
    for seed in range(8):
        arrivals = bursty_trace(30.0, 20.0, 4.0, seed)
        for name, forced in (("base", "TTTT"), ("adaptive", None), ("cautious", None)):
            records = simulate(arrivals, 0.2, RESNET50_FAST_US, PAPER_RESNET50, 8, forced,
                               share=share if name == "adaptive" else None, noise=0.3, seed=seed)
            runs[name].append(summarize(records, PAPER_RESNET50, 200.0, 30.0))
    attained = {name: np.mean([r["slo_attainment"] for r in rows]) for name, rows in runs.items()}
    accuracy = {name: sum(r["mean_accuracy"] * r["served"] for r in rows) / sum(r["served"] for r in rows)
                for name, rows in runs.items()}
    assert attained["base"] >= 0.99
    assert attained["adaptive"] >= 0.99 and accuracy["adaptive"] >= halfway
    assert accuracy["cautious"] < halfway  # what the following share fixes


def poisson(rate_per_s: float, seconds: float, seed: int = 0) -> np.ndarray:
    gaps = np.random.default_rng(seed).exponential(1 / rate_per_s, int(rate_per_s * seconds * 1.2) + 10)
    times = np.cumsum(gaps)
    return times[times < seconds]


SMALL_US = {b: {"FF": 1000 * b ** 0.7, "FT": 800 * b ** 0.7, "TF": 700 * b ** 0.7, "TT": 500 * b ** 0.7}
            for b in (1, 2, 4, 8)}
SMALL_ACCURACY = {"FF": 90.0, "FT": 89.0, "TF": 88.5, "TT": 88.0}


def test_policy_simulated_light_load_serves_the_super_net():
    records = simulate(poisson(50, 5), 0.005, SMALL_US, SMALL_ACCURACY, 8)
    row = summarize(records, SMALL_ACCURACY, 5.0, 5.0)
    assert row["refused"] == 0 and row["served"] == row["sent"]
    assert row["slo_attainment"] == 1.0
    assert row["mean_accuracy"] > 89.9


def test_policy_simulated_overload_trades_accuracy_for_deadlines():
    # past the super-net's capacity (8 / 4.3 ms = 1900/s at batch 8), within the base-net's (3700/s)
    records = simulate(poisson(2500, 5), 0.010, SMALL_US, SMALL_ACCURACY, 8)
    row = summarize(records, SMALL_ACCURACY, 10.0, 5.0)
    assert row["served"] + row["refused"] == row["sent"]
    assert row["slo_attainment"] * row["sent"] == row["served"]  # exact predictions: what is served is in time
    assert 88.0 <= row["mean_accuracy"] < 89.9  # cheaper sub-networks took over
    assert row["refused"] < 0.01 * row["sent"]


def test_parse_accuracy_refuses_a_table_that_is_not_a_mapping_or_names_a_sub_network_twice_differently():
    from adaptive_kernels.serving.policy import parse_accuracy

    with pytest.raises(TypeError, match=r"the accuracy table must be a mapping \{sub-network: accuracy %\}, got str"):
        parse_accuracy("/path/to/eval.json", 2)
    with pytest.raises(ValueError, match="the accuracy table gives FF twice, as 'super' \\(10\\) and 'FF' \\(90\\)"):
        parse_accuracy({"super": 10, "FF": 90, "TT": 80}, 2)
    with pytest.raises(ValueError, match="gives TT twice"):
        parse_accuracy({"base": 99, "tt": 1}, 2)
    assert parse_accuracy({"super": 90, "FF": 90.0, "TT": 80}, 2) == {(False, False): 90.0, (True, True): 80.0}
