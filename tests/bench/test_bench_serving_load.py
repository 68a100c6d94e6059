"""The load test's trace: bursty (inter-arrival CV² >= 4) at the asked mean rate, open loop, bounded."""

import numpy as np

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


def test_summary_counts_every_request():
    records = [{"status": "served", "latency": 0.002, "skip": "FF", "batch": 2, "met": True},
               {"status": "served", "latency": 0.009, "skip": "TT", "batch": 1, "met": False},
               {"status": "refused"}, {"status": "lost"}]
    row = summarize(records, {"FF": 90.0, "TT": 88.0}, slo_ms=5.0, seconds=1.0)
    assert (row["sent"], row["served"], row["refused"], row["lost"]) == (4, 2, 1, 1)
    assert not row["no_loss"] and row["slo_attainment"] == 0.25 and row["mean_accuracy"] == 89.0
