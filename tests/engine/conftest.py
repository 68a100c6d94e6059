"""Fixtures shared by the engine tests that check every sub-network of one small model: ``model``, a random
ResNet-20-ADN (width: the test module's ``MODEL_WIDTH``), uncalibrated and calibrated, and ``want``, every
sub-network's output on the module's ``X``, the model run alone in one thread."""

from __future__ import annotations

import pytest
from helpers import every_subnetwork, small_resnet20


@pytest.fixture(scope="module", params=[False, True], ids=["uncalibrated", "calibrated"])
def model(request):
    return small_resnet20(width=request.module.MODEL_WIDTH, calibrated=request.param)


@pytest.fixture(scope="module")
def want(request, model):
    return every_subnetwork(model, request.module.X)
