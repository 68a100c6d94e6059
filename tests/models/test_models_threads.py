"""One eval-mode model shared by many threads: ``model(x, skip)`` from 8 threads at once, each call with its own
sub-network drawn at random, gives every call its own sub-network's output (the model run alone, one thread),
calibrated (every norm picks its table row by the running sub-network) or not, for both BatchNorm families."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize, wrong_outputs_from_threads

from adaptive_kernels import calibrate, create_model

pytestmark = pytest.mark.usefixtures("one_thread")

BUILDERS = {
    "resnet20_adn": lambda: create_model("resnet20_adn", width=8),
    "mobilenet_v2_adn": lambda: create_model("mobilenet_v2_adn", num_classes=10, width_mult=0.25),
}


@pytest.mark.parametrize("calibrated", [False, True], ids=["uncalibrated", "calibrated"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_threads_sharing_one_model_each_get_their_own_subnetwork(name, calibrated):
    torch.manual_seed(0)
    model = randomize(BUILDERS[name](), calibrate=(4, 3, 16, 16))
    if calibrated:  # shifted images: tables clearly unlike the running statistics
        calibrate(model, 3 * torch.randn(8, 3, 16, 16) + 1)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = {skip: model(x, skip) for skip in model.skip_configs()}
    wrong = wrong_outputs_from_threads(model, x, want)
    assert wrong == 0, f"{wrong} of 200 outputs were not their own sub-network's"
