"""Latency of every sub-network of ResNet-50-ADN for each provider (fp16, batch 1 and 64, channels_last),
headline cases (super-net, base-net) first. Rows: ``latency_resnet.json`` (see bench/_harness.py).

SMOKE mode (no GPU): resnet20_adn at 32x32, fp32, batch 1, super and base, CPU-meaningful providers only.
"""

import pytest

from bench._harness import SMOKE, BenchContext, ModelSpec, latency_cases, run_latency_case

SPEC = (
    ModelSpec("resnet20_adn", input_size=(32, 32), num_stages=3)
    if SMOKE
    else ModelSpec("resnet50_adn", input_size=(224, 224), num_stages=4, channels_last=True)
)
BATCHES = (1,) if SMOKE else (1, 64)


@pytest.fixture(scope="module")
def ctx():
    context = BenchContext(SPEC)
    yield context
    context.close()


@pytest.mark.parametrize("provider,batch,skip", latency_cases(SPEC, BATCHES))
def test_latency(benchmark_or_none, rows, ctx, provider, batch, skip):
    row = run_latency_case(benchmark_or_none, rows, ctx, provider, batch, skip)
    assert 0 < row["p20_us"] <= row["median_us"] <= row["p80_us"]
    assert row["macs"] > 0
