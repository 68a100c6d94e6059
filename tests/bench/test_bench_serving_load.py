"""The load test's trace: bursty (inter-arrival CV² >= 4) at the asked mean rate, open loop, bounded; its summary; and
its simulated replay (bench/serving_sim.py --replay) rebuilding the traces an HTTP run sent."""

import numpy as np
import pytest

from bench.serving_load import bursty_trace, summarize


def test_bursty_trace_has_the_asked_rate_and_burstiness():
    arrivals = bursty_trace(200.0, 50.0, cv2=4.0, seed=0, depth=0.0)
    gaps = np.diff(arrivals)
    assert abs(len(arrivals) / 200.0 - 50.0) < 5
    assert gaps.var() / gaps.mean() ** 2 > 3.0  # CV² of a Gamma(1/4) renewal process: 4
    assert arrivals.min() >= 0 and arrivals.max() <= 200.0 and (gaps >= 0).all()
    varying = bursty_trace(200.0, 50.0, cv2=4.0, seed=0, period_s=100.0)
    first, second = np.histogram(varying, bins=[0, 50, 100])[0]
    assert first > 1.3 * second  # the sine's high half, then its low half


def test_bursty_trace_limit_keeps_the_first_arrivals_and_draws_no_more():
    full = bursty_trace(20.0, 50.0, cv2=4.0, seed=3)
    assert len(full) > 500
    np.testing.assert_array_equal(bursty_trace(20.0, 50.0, cv2=4.0, seed=3, limit=500), full[:500])
    np.testing.assert_array_equal(bursty_trace(20.0, 50.0, cv2=4.0, seed=3, limit=10**6), full)
    # 1e12 expected requests: drawing them all would ask numpy for terabytes (MemoryError); the limit draws 100
    assert len(bursty_trace(1e3, 1e9, cv2=4.0, seed=0, limit=100)) == 100


def test_summary_of_nothing_served_is_strict_json():
    import json

    row = summarize([{"status": "refused"}], {"FF": 90.0, "TT": 88.0}, slo_ms=5.0, seconds=1.0)
    assert (row["p50_ms"], row["p99_ms"], row["mean_accuracy"], row["mean_batch"]) == (None, None, None, None)
    json.dumps(row, allow_nan=False)  # NaN is not JSON
    assert summarize([], {"FF": 90.0}, slo_ms=5.0, seconds=1.0)["sent"] == 0


def test_summary_counts_every_request():
    records = [{"status": "served", "latency": 0.002, "skip": "FF", "batch": 2, "met": True},
               {"status": "served", "latency": 0.009, "skip": "TT", "batch": 1, "met": False},
               {"status": "refused"}, {"status": "lost"}]
    row = summarize(records, {"FF": 90.0, "TT": 88.0}, slo_ms=5.0, seconds=1.0)
    assert (row["sent"], row["served"], row["refused"], row["lost"]) == (4, 2, 1, 1)
    assert not row["no_loss"] and row["slo_attainment"] == 0.25 and row["mean_accuracy"] == 89.0


def test_simulated_replay_rebuilds_the_traces_an_http_run_sent():
    # a committed load test (seed 200, 16 rounds of 5 s at 2.5 and 5 req/s): the replay must rebuild exactly the
    # traces the server was sent (same count per rate and way of serving), simulate the forced columns alike
    # (base and static serve the same sub-network), and serve the adaptive column the most accurate on average
    import json
    from pathlib import Path

    from bench.serving_sim import replay

    result = json.loads((Path(__file__).parents[2] / "bench/results/serving/paper_resnet50_split.json").read_text())
    rows = {(r["rate"], r["policy"]): r for r in replay(result, 200, load=1.0, noise=0.3, repeats=1)}
    assert len(rows) == len(result["rows"])
    assert all(r["sent"] == r["http_sent"] for r in rows.values())
    assert [r["sent"] for r in rows.values()] == [228] * 4 + [435] * 4
    for rate in (2.5, 5.0):
        assert rows[rate, "base"]["slo_attainment"] == rows[rate, "static"]["slo_attainment"]
        assert rows[rate, "base"]["mean_accuracy"] == pytest.approx(76.1)
        assert rows[rate, "super"]["mean_accuracy"] == pytest.approx(77.6)
        assert 76.1 < rows[rate, "adaptive"]["mean_accuracy"] < 77.6
    assert replay(result, 201, load=1.0, noise=0.3, repeats=1)[0]["sent"] != 228  # another seed, other traces
