"""Latency of every sub-network of ViT-B/16-ADN for each provider (fp16, batch 1 and 64), headline cases
(super-net, base-net) first. Rows: ``latency_vit.json`` (see bench/_harness.py).

SMOKE mode (no GPU): deit_tiny_adn at 32x32 (16x16 patches: 4 tokens + the class token), fp32, batch 1,
super and base, CPU-meaningful providers only.
"""

import pytest

from bench._harness import SMOKE, BenchContext, ModelSpec, latency_cases, run_latency_case

SPEC = (
    ModelSpec("deit_tiny_adn", input_size=(32, 32), num_stages=4, kwargs=(("image_size", 32),), optional_kwargs=True)
    if SMOKE
    else ModelSpec("vit_b_16_adn", input_size=(224, 224), num_stages=4)
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
