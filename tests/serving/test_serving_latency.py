"""The latency model: buckets, interpolation or padding, and the online correction."""

import math
import re

import pytest

from adaptive_kernels.serving.latency import ArrivalRate, LatencyModel, ReserveShare, batch_buckets

TABLES = {1: {"FF": 100.0, "TT": 50.0}, 2: {"FF": 150.0, "TT": 80.0}, 4: {"FF": 250.0, "TT": 120.0}}


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_interpolated_and_padded_predictions():
    dynamic, padded = LatencyModel(TABLES), LatencyModel(TABLES, padded=True)
    ff = (False, False)
    assert dynamic.predict(ff, 2) == pytest.approx(150e-6)
    assert dynamic.predict(ff, 3) == pytest.approx(200e-6)  # halfway between the buckets 2 and 4
    assert padded.predict(ff, 3) == pytest.approx(250e-6)  # padded to 4
    with pytest.raises(ValueError, match="outside the profiled range"):
        dynamic.predict(ff, 5)


def test_correction_follows_a_slower_machine_and_stays_above_scattered_measurements():
    model = LatencyModel(TABLES)
    tt = (True, True)
    for _ in range(60):
        model.observe(tt, 1, 2 * 50e-6)  # the machine got twice as slow
    assert model.predict(tt, 1) == pytest.approx(100e-6, rel=0.01)
    assert model.predict((False, False), 4) == pytest.approx(500e-6, rel=0.01)  # one factor for every entry
    for i in range(200):
        model.observe(tt, 1, (1.6 if i % 2 else 2.4) * 50e-6)  # same mean, +-20 % scatter
    assert model.ratio == pytest.approx(2.0, rel=0.1)
    assert model.predict(tt, 1) > 2.4 * 50e-6  # above the slow half too


def test_tables_need_batch_one_and_every_sub_network():
    with pytest.raises(ValueError, match="batch 1"):
        LatencyModel({2: TABLES[2]})
    with pytest.raises(ValueError, match="lacks sub-network TT"):
        LatencyModel({1: TABLES[1], 2: {"FF": 1.0}})


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, math.inf, "a", None])
def test_tables_take_only_positive_finite_latencies(value):
    with pytest.raises(ValueError, match=rf"the profile at batch 2 gives sub-network TT {value!r} µs: latencies are "
                                         r"positive, finite µs \(engine.profile\(batch_size=2\)"):
        LatencyModel({**TABLES, 2: {"FF": 150.0, "TT": value}})


@pytest.mark.parametrize("bucket", [0, -2, "2", 2.0, True])
def test_tables_buckets_are_positive_int_batch_sizes(bucket):
    tables = {bucket: TABLES[2], **({} if bucket is True else {1: TABLES[1]})}  # a new dict keeps its first key
    with pytest.raises(ValueError, match=rf"tables has bucket {bucket!r}: buckets are batch sizes, positive ints"):
        LatencyModel(tables)


def test_a_stall_is_bounded_and_refusals_relax_the_correction():
    model = LatencyModel(TABLES)
    tt = (True, True)
    model.observe(tt, 1, 1.0)  # a call stalled for a second (20000x the profile) counts as MAX_SAMPLE
    assert model.ratio == pytest.approx(1 + 0.125 * 9)
    for _ in range(100):
        model.relax()
    assert model.factor == pytest.approx(1.0, abs=1e-3)


def test_arrival_rate_follows_a_burst_and_decays():
    rate = ArrivalRate(window=4)
    assert rate.at(0.0) == 0.0
    rate.arrived(0.0)
    assert rate.at(1.0) == 0.0  # one arrival: no rate
    for t in (1.0, 2.0, 3.0):  # one per second
        rate.arrived(t)
    assert rate.at(3.0) == pytest.approx(1.0)
    assert rate.at(6.0) == pytest.approx(3 / 6)  # no arrival since: the estimate falls
    for t in (3.01, 3.02, 3.03):  # a burst of 100/s: the window forgets the slow arrivals
        rate.arrived(t)
    assert rate.at(3.03) == pytest.approx(3 / 0.03)


def test_reserve_share_rises_while_requests_meet_their_deadlines_and_falls_on_misses():
    share = ReserveShare(low=0.5, high=4.0, budget=0.02, window=100)  # 2 misses allowed in the latest 100
    assert share.share == 0.5
    for n in range(1, 51):
        share.outcome(True)
        assert share.share == pytest.approx(0.5 * math.exp(0.02 * n), rel=1e-12)
    share.outcome(False)  # a miss: ~1 / e
    assert share.share == pytest.approx(0.5 * math.exp(0.02 * 50) * math.exp(0.02 - 1), rel=1e-12)
    for _ in range(3):
        share.outcome(False)
    assert share.share == 0.5  # never below low
    held = [share.outcome(True) or share.share for _ in range(96)]  # outcomes 51-150 hold the 4 misses: it holds
    assert held == [0.5] * 96
    share.outcome(True)  # the first miss left the window: 3 remain, still more than 2
    assert share.share == 0.5
    share.outcome(True)  # 2 remain: it rises again
    assert share.share == pytest.approx(0.5 * math.exp(0.02))
    for _ in range(1000):
        share.outcome(True)
    assert share.share == 4.0  # never above high


@pytest.mark.parametrize("kw, match", [({"low": 0.0}, "0 < low <= high"), ({"low": 5.0}, "0 < low <= high"),
                                       ({"budget": 1.0}, "0 <= budget < 1"), ({"budget": -0.1}, "0 <= budget < 1"),
                                       ({"window": 0}, "positive int"), ({"budget": "0.1"}, "0 <= budget < 1")])
def test_reserve_share_rejects_bad_settings_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match):
        ReserveShare(**kw)


@pytest.mark.parametrize("tables, message", [
    ({1: {}}, "the profile at batch 1 is empty"),
    ({1: {"super": 10.0, "TT": 5.0}}, "the profile at batch 1 has key 'super': key each sub-network by its T/F string"),
    ({1: {"FF": 10.0, "TT": 5.0, "ff": 11.0}}, "the profile at batch 1 gives sub-network FF twice"),
    ({1: {"FF": 10.0, "TT": 5.0}, 2: {"FF": 20.0, "tt": 9.0, "TT": 9.5}},
     "the profile at batch 2 gives sub-network TT"),
    ({1: {"FF": 10.0, "TT": 5.0}, 2: {"FF": 20.0, 3: 9.0}},
     ("the profile at batch 2 has key 3: key each sub-network by its T/F string, as engine.profile() writes it, "
      "e.g. 'FF'")),
])
def test_latency_model_rejects_a_malformed_profile_in_one_line(tables, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LatencyModel(tables)


def test_latency_model_reads_a_sub_network_s_key_in_any_case():
    model = LatencyModel({1: {"ff": 10.0, " TT ": 5.0}, 2: {"FF": 20.0, "tt": 9.0}})
    assert model.skips == [(False, False), (True, True)]
    assert model.profiled((True, True), 2) == pytest.approx(9e-6)
