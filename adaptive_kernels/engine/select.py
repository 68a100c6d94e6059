"""Choosing a sub-network for a latency budget (what a deployment of an ADN wants: meet a deadline)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..models.skip import SkipConfig, parse_skip, skip_to_str

#: ``{skip: number}`` (skip as "TFFT" or a sequence of bools), or a list of records
#: ``{"skip": ..., "latency_us" | "accuracy": number, ...}`` as written by ``adaptive-kernels eval --json``.
Table = Mapping[Any, float] | Sequence[Mapping[str, Any]]


def _num_stages(key: Any) -> int | None:
    if isinstance(key, str):
        word = key.strip().lower()
        return None if word in ("super", "base") else len(word)
    try:
        return len(key)
    except TypeError:
        return None


def _pairs(table: Table, field: str, what: str) -> list[tuple[Any, Any]]:
    """``table`` -> ``[(skip key, value), ...]``; ``field`` is the record key holding the value."""
    if isinstance(table, Mapping):
        pairs = list(table.items())
    elif isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        pairs = []
        for i, record in enumerate(table):
            if not isinstance(record, Mapping) or "skip" not in record or field not in record:
                raise ValueError(
                    f"{what}[{i}] must be a mapping with keys 'skip' and {field!r} (as written by "
                    f"`adaptive-kernels eval --json`), got {record!r}"
                )
            pairs.append((record["skip"], record[field]))
    else:
        raise TypeError(
            f"{what} must be a mapping {{skip: {field}}} or a list of records with 'skip' and {field!r}, "
            f"got {type(table).__name__}"
        )
    if not pairs:
        raise ValueError(f"{what} is empty")
    return pairs


def _table_stages(pairs: list[tuple[Any, Any]], what: str) -> int | None:
    """The number of skippable stages the table's keys spell out (None: only 'super'/'base')."""
    lengths = {n for n in (_num_stages(k) for k, _ in pairs) if n is not None}
    if len(lengths) > 1:
        raise ValueError(
            f"{what}: the skip configurations must all have one length (one flag per skippable stage), "
            f"got lengths {sorted(lengths)}"
        )
    return lengths.pop() if lengths else None


def _is_number(value: Any) -> bool:
    # numbers.Real covers NumPy's scalars (np.float32, np.int64), which tables built with NumPy hold.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _normalise(pairs: list[tuple[Any, Any]], num_stages: int, what: str) -> dict[SkipConfig, float]:
    out: dict[SkipConfig, float] = {}
    for key, value in pairs:
        skip = parse_skip(key, num_stages)
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{what}[{skip_to_str(skip)}] = {value!r} is not a finite number")
        if skip in out:
            raise ValueError(f"{what} lists the configuration {skip_to_str(skip)} twice")
        out[skip] = float(value)
    return out


def select_skip(latency_table: Table, accuracy_table: Table, budget_us: float) -> SkipConfig:
    """The most accurate sub-network whose latency is within ``budget_us`` microseconds.

    latency_table: from ``engine.profile()`` (``{"TFFT": µs, ...}``) or eval records with ``latency_us``;
    accuracy_table: ``{skip: accuracy}`` or eval records with ``accuracy``. Only configurations present in
    both tables are considered. Ties in accuracy go to the faster configuration.
    Returns the skip configuration as a tuple of bools (True = skip), accepted by ``engine.set_skip``.
    Raises ValueError when no configuration fits the budget (naming the fastest one).
    """
    if not _is_number(budget_us) or not budget_us > 0:
        raise ValueError(f"budget_us must be a positive number of microseconds, got {budget_us!r}")
    latency_pairs = _pairs(latency_table, "latency_us", "latency_table")
    accuracy_pairs = _pairs(accuracy_table, "accuracy", "accuracy_table")
    n_latency = _table_stages(latency_pairs, "latency_table")
    n_accuracy = _table_stages(accuracy_pairs, "accuracy_table")
    if n_latency is not None and n_accuracy is not None and n_latency != n_accuracy:
        raise ValueError(
            f"latency_table has skip configurations of {n_latency} flags but accuracy_table of {n_accuracy} "
            f"(one flag per skippable stage): the two tables must come from the same model"
        )
    num_stages = n_latency if n_latency is not None else n_accuracy
    if num_stages is None:
        raise ValueError(
            "'super'/'base' alone do not say how many skippable stages the model has; include at least one "
            "configuration spelled out, e.g. 'TFFT' or (True, False, False, True)"
        )
    latency = _normalise(latency_pairs, num_stages, "latency_table")
    accuracy = _normalise(accuracy_pairs, num_stages, "accuracy_table")
    common = [s for s in latency if s in accuracy]
    if not common:
        raise ValueError(
            f"latency_table and accuracy_table share no skip configuration (latency: "
            f"{', '.join(map(skip_to_str, latency))}; accuracy: {', '.join(map(skip_to_str, accuracy))})"
        )
    fitting = [s for s in common if latency[s] <= budget_us]
    if not fitting:
        fastest = min(common, key=lambda s: latency[s])
        raise ValueError(
            f"no sub-network runs within {budget_us:g} us: the fastest, {skip_to_str(fastest)}, takes "
            f"{latency[fastest]:.1f} us; raise the budget (or use a smaller batch or model)"
        )
    return min(fitting, key=lambda s: (-accuracy[s], latency[s], skip_to_str(s)))
