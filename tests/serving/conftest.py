"""A small CPU engine with its serving plan, built once for the serving tests (the ONNX export takes 5-30 s)."""

from __future__ import annotations

import pytest
from helpers import randomize

from adaptive_kernels import create_model
from adaptive_kernels.engine.ort.engine import onnxruntime_unavailable


@pytest.fixture(scope="session")
def small_model():
    """ResNet-20-ADN (width 4, 1 channel, 16x16) with random norms, so that its sub-networks' outputs differ."""
    return randomize(create_model("resnet20_adn", num_classes=10, in_chans=1, width=4), calibrate=(8, 1, 16, 16))


@pytest.fixture(scope="session")
def small_plan(small_model):
    """The model on the CPU engine, profiled at batches 1, 2, 4; accuracy 90 minus the skipped stages."""
    if onnxruntime_unavailable() is not None:
        pytest.skip("needs onnxruntime (the [onnx] extra)")
    from adaptive_kernels.serving import build_plan

    accuracy = {s: 90.0 - sum(s) for s in small_model.skip_configs()}
    return build_plan(small_model, "r20", (1, 16, 16), max_batch=4, accuracy=accuracy, profile_iters=3)
