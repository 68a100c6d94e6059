"""select_skip (engine/select.py): the most accurate sub-network within a latency budget, checked against brute
force, and its errors."""

from __future__ import annotations

import itertools
import random

import pytest

from adaptive_kernels.engine import select_skip
from adaptive_kernels.models.skip import skip_to_str


def test_select_skip_picks_the_most_accurate_within_budget():
    latency = {"FF": 400.0, "FT": 300.0, "TF": 250.0, "TT": 150.0}
    accuracy = {"FF": 77.6, "FT": 77.1, "TF": 76.9, "TT": 76.1}
    assert select_skip(latency, accuracy, 1000) == (False, False)
    assert select_skip(latency, accuracy, 399.9) == (False, True)
    assert select_skip(latency, accuracy, 260) == (True, False)
    assert select_skip(latency, accuracy, 150) == (True, True)
    # ties in accuracy go to the faster sub-network
    assert select_skip(latency, {**accuracy, "TF": 77.1}, 350) == (True, False)
    # eval --json records, and bool tuples as keys
    records = [{"skip": k, "accuracy": v, "macs": 1} for k, v in accuracy.items()]
    tuples = {(k[0] == "T", k[1] == "T"): v for k, v in latency.items()}
    assert select_skip(tuples, records, 300) == (False, True)


def test_select_skip_agrees_with_brute_force():
    rng = random.Random(0)
    configs = ["".join(c) for c in itertools.product("FT", repeat=4)]
    for _ in range(50):
        latency = {c: rng.uniform(100, 500) for c in configs}
        accuracy = {c: rng.uniform(70, 80) for c in configs}
        budget = rng.uniform(100, 500)
        fitting = [c for c in configs if latency[c] <= budget]
        if not fitting:
            continue
        best = max(fitting, key=lambda c: accuracy[c])
        assert skip_to_str(select_skip(latency, accuracy, budget)) == best


def test_select_skip_errors():
    latency = {"FF": 400.0, "TT": 150.0}
    accuracy = {"FF": 77.6, "TT": 76.1}
    with pytest.raises(ValueError, match="no sub-network runs within 100 us: the fastest, TT, takes 150.0 us"):
        select_skip(latency, accuracy, 100)
    with pytest.raises(ValueError, match="budget_us must be a positive number"):
        select_skip(latency, accuracy, -5)
    with pytest.raises(ValueError, match="share no skip configuration"):
        select_skip({"FT": 1.0}, accuracy, 100)
    with pytest.raises(ValueError, match="must all have one length"):
        select_skip({"FT": 1.0, "TTT": 2.0}, accuracy, 100)
    with pytest.raises(ValueError, match=r"latency_table\[FF\] = nan is not a finite number"):
        select_skip({"FF": float("nan")}, accuracy, 100)
    with pytest.raises(ValueError, match="must be a mapping with keys 'skip' and 'accuracy'"):
        select_skip(latency, [{"skip": "FF"}], 100)
    with pytest.raises(TypeError, match="must be a mapping"):
        select_skip(latency, 3.0, 100)
