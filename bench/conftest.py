"""Benchmark set-up. tests/conftest.py does not apply when bench/ runs alone, so this file repeats what matters:
TRITON_INTERPRET=1 without a GPU (set by ``bench._harness`` before adaptive_kernels is imported) and skipping
``gpu``-marked benchmarks without CUDA. Also fixtures shared by the suites."""

import os
import re
from pathlib import Path

import pytest
import torch

from bench import _harness as harness

BENCH_DIR = Path(__file__).resolve().parent


@pytest.fixture
def benchmark_or_none(request):
    """A function returning pytest-benchmark's ``benchmark`` fixture, or None where the plugin is missing (the GPU
    machine may lack it) or off (``-p no:benchmark``): ``harness.measure`` then times with its own loop.

    Lazy, so that a test that skips before timing anything does not make pytest-benchmark warn about an unused
    fixture."""

    def get():
        try:
            return request.getfixturevalue("benchmark")
        except pytest.FixtureLookupError:
            return None

    return get


def pytest_collection_modifyitems(config, items):
    if harness.CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None and BENCH_DIR in Path(item.path).resolve().parents:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Smoke runs use one CPU thread: their timings mean nothing anyway, and on a shared 2-core machine two
    OpenMP threads busy-waiting for each other made a resnet20 forward ~30x slower (14 ms vs 527 ms, measured
    under load). Only bench/ tests: tests/ keep their own setting."""
    if harness.CUDA:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rows_dir(tmp_path_factory) -> Path:
    """Where the suites write rows (see ``harness.results_dir``); a temp folder for smoke runs."""
    return harness.results_dir() or tmp_path_factory.mktemp("bench_rows")


@pytest.fixture(scope="module")
def rows(request, rows_dir) -> harness.RowWriter:
    """The module's row file: ``test_latency_resnet.py`` -> ``latency_resnet.json`` (``latency_resnet_<tag>.json``
    with ADN_BENCH_ROWS_TAG=tag)."""
    suite = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    tag = os.environ.get("ADN_BENCH_ROWS_TAG", "")
    if tag and not re.fullmatch(r"[A-Za-z0-9_-]+", tag):
        raise ValueError(f"ADN_BENCH_ROWS_TAG={tag!r}: use letters, digits, '_' and '-' only (it names a file)")
    return harness.RowWriter(rows_dir / (f"{suite}_{tag}.json" if tag else f"{suite}.json"))
