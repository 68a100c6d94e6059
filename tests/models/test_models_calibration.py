"""Per-sub-network norm calibration: the table rows against statistics computed independently (float64 by hand
from the inputs captured in a train-mode pass, and PyTorch's own ``BatchNorm(momentum=None)`` accumulation),
the contract of docs/method.md ("Per-sub-network calibration"), state-dict round trips and errors."""

import copy

import pytest
import torch
from helpers import randomize, rel_err
from torch import nn

from adaptive_kernels import calibrate, create_model
from adaptive_kernels.models.norms import SubnetBatchNorm2d
from adaptive_kernels.models.resnet import Bottleneck, ResNetADN
from adaptive_kernels.models.skip import all_skip_configs, subnet_index
from adaptive_kernels.training.checkpoint import load_model_state

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same weights whichever tests ran before
    if name == "resnet20_adn":
        model, shape = create_model("resnet20_adn", in_chans=1, width=4), (1, 10, 10)
    elif name == "bottleneck":
        model, shape = ResNetADN(Bottleneck, [2, 3], num_classes=5, in_chans=2, width=4, small_input=True), (2, 8, 8)
    else:
        model, shape = create_model("mobilenet_v2_adn", num_classes=5, width_mult=0.1), (3, 32, 32)
    # Running statistics of super- and base-net passes, so that the tables differ from them clearly.
    return randomize(model, seed=1, calibrate=(8, *shape)), shape


def hand_statistics(model: nn.Module, x: torch.Tensor, skip) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{norm name: (mean, unbiased var)} in float64 of every BatchNorm's input in a train-mode pass of ``skip``
    over the single batch ``x`` (on a copy: train mode updates running statistics)."""
    work = copy.deepcopy(model).train()
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].double()))
             for name, m in work.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        work(x, skip=skip)
    for h in hooks:
        h.remove()
    return {name: (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)) for name, h in seen.items()}


def with_running_stats(model: nn.Module, stats: dict) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            ref.get_submodule(name).running_mean.copy_(mean)
            ref.get_submodule(name).running_var.copy_(var)
    return ref


def test_subnet_index_is_the_position_in_skip_configs():
    for s in (1, 3, 5):
        assert [subnet_index(c) for c in all_skip_configs(s)] == list(range(2**s))
    model = create_model("resnet20_adn", width=4)
    assert subnet_index(model.parse_skip("base")) == 7 and subnet_index(model.parse_skip("TFF")) == 4


@pytest.mark.parametrize("name", ["resnet20_adn", "bottleneck", "mobilenet_v2"])
def test_calibrated_subnet_equals_model_with_hand_computed_statistics(name):
    model, shape = tiny(name)
    x = torch.randn(12, *shape, generator=torch.Generator().manual_seed(2))
    configs = model.skip_configs() if len(model.skip_configs()) <= 8 else ["super", "base", "TFTFT", "FFTTF"]
    uncalibrated = copy.deepcopy(model)
    result = calibrate(model, x, configs=configs, batch_size=12)
    assert model.is_calibrated and result.images == 12 and len(result.configs) == len(configs)
    xe = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for skip in configs:
            stats = hand_statistics(uncalibrated, x, skip)
            want = with_running_stats(uncalibrated, stats)(xe, skip=skip)
            got = model(xe, skip=skip)
            # fp32 statistics against float64 ones through a deep net (MobileNetV2: ~3e-5): the fp32 bound
            assert rel_err(got, want) < 1e-4, skip
            # Rows of norms this sub-network does not run hold the norm's running statistics.
            j = subnet_index(model.parse_skip(skip))
            for n, m in model.named_modules():
                if isinstance(m, SubnetBatchNorm2d) and n not in stats:
                    torch.testing.assert_close(m.subnet_mean[j], m.running_mean, rtol=0, atol=0)
                    torch.testing.assert_close(m.subnet_var[j], m.running_var, rtol=0, atol=0)
        # The mixed sub-networks really change (else this test could not tell rows apart).
        mixed = configs[2]
        assert not torch.allclose(model(xe, skip=mixed), uncalibrated(xe, skip=mixed), atol=1e-3)


def test_a_one_image_batch_joins_its_neighbour():
    # 9 images in batches of 8 leave a last batch of 1 (no batch statistics from one image): it joins the batch before
    # it, so the tables are those of one batch of 9, against float64 hand statistics; a data loader's lone first and
    # last batches join theirs the same way
    model, shape = tiny("resnet20_adn")
    x = torch.randn(9, *shape, generator=torch.Generator().manual_seed(6))
    xe = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    split, loader = copy.deepcopy(model), copy.deepcopy(model)
    assert calibrate(split, x, batch_size=8).images == 9
    assert calibrate(loader, [x[:1], x[1:8], x[8:]]).images == 9
    with torch.no_grad():
        for skip in ("super", "FTF", "base"):
            want = with_running_stats(model, hand_statistics(model, x, skip))(xe, skip=skip)
            assert rel_err(split(xe, skip=skip), want) < 1e-4, skip
            assert rel_err(loader(xe, skip=skip), want) < 1e-4, skip


def test_several_batches_accumulate_like_batchnorm_momentum_none():
    model, shape = tiny("resnet20_adn")
    x = torch.randn(24, *shape, generator=torch.Generator().manual_seed(4))
    reference = copy.deepcopy(model)
    calibrate(model, [(b, torch.zeros(len(b))) for b in x.split(8)])  # (images, labels) pairs
    xe = x[:4]
    for skip in model.skip_configs():
        ref = copy.deepcopy(reference)
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        ref.train()
        with torch.no_grad():
            for b in x.split(8):
                ref(b, skip=skip)
        used = {n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked > 0}
        for n, m in ref.named_modules():  # norms the sub-network does not run keep their statistics
            if isinstance(m, nn.BatchNorm2d) and n not in used:
                m.load_state_dict(reference.get_submodule(n).state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(xe, skip=skip), ref.eval()(xe, skip=skip), rtol=1e-4, atol=1e-5)


def test_uncalibrated_and_train_mode_behave_as_batchnorm():
    model, shape = tiny("resnet20_adn")
    keys = set(model.state_dict())
    assert not model.is_calibrated and not any("subnet" in k for k in keys)
    before = copy.deepcopy(model)
    model.train()
    model.layer2.eval()  # per-module modes are restored, not just the top one
    calibrate(model, torch.randn(8, *shape), configs="base")
    assert model.training and not model.layer2.training and model.layer3.training
    state = model.state_dict()
    for k, v in before.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(state[k], v), k
    assert set(model.state_dict()) - keys == {
        f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
        for b in ("subnet_mean", "subnet_var")
    }
    # Only the base-net's row was calibrated; others are the running statistics.
    bn = model.layer1[0].bn1_skip
    assert not torch.equal(bn.subnet_mean[7], bn.running_mean) and torch.equal(bn.subnet_mean[3], bn.running_mean)
    # Train mode: batch statistics and the same running-statistics update as a plain BatchNorm.
    x = torch.randn(6, *shape)
    before.train(), model.train()
    for skip in ("TFT", "base"):
        torch.testing.assert_close(model(x, skip=skip), before(x, skip=skip), rtol=0, atol=0)
    torch.testing.assert_close(model.layer1[0].bn1_skip.running_var, before.layer1[0].bn1_skip.running_var)


def test_calibrated_state_dict_loads_into_a_fresh_model():
    model, shape = tiny("resnet20_adn")
    calibrate(model, torch.randn(8, *shape))
    state = model.state_dict()
    for load in (lambda m: m.load_state_dict(state, strict=True), lambda m: load_model_state(m, state, "test")):
        fresh = create_model("resnet20_adn", in_chans=1, width=4).eval()
        load(fresh)
        assert fresh.is_calibrated
        x = torch.randn(2, *shape)
        with torch.no_grad():
            for skip in ("FTF", "base"):
                torch.testing.assert_close(fresh(x, skip=skip), model.eval()(x, skip=skip), rtol=0, atol=0)
    other = create_model("resnet20_adn", in_chans=1, width=8)
    with pytest.raises(ValueError, match="does not fit ResNetADN"):
        load_model_state(other, state, "test")


def test_bad_input_is_reported_clearly():
    model, shape = tiny("resnet20_adn")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\)"):
        calibrate(model, torch.randn(8, 3, 10, 10))
    with pytest.raises(ValueError, match="tensor .N, C, H, W."):
        calibrate(model, torch.randn(8, 10, 10))
    with pytest.raises(ValueError, match="no images"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="unknown letter"):
        calibrate(model, torch.randn(8, *shape), configs=["TFX"])
    with pytest.raises(ValueError, match="3 skippable stages"):
        calibrate(model, torch.randn(8, *shape), configs=["TF"])
    with pytest.raises(ValueError, match="batch_size applies to a tensor"):
        calibrate(model, [torch.randn(8, *shape)], batch_size=4)
    with pytest.raises(ValueError, match=">= 2 images"):
        calibrate(model, [torch.randn(1, *shape)])
    with pytest.raises(TypeError, match="convert with x.float"):
        calibrate(model, torch.zeros(8, *shape, dtype=torch.uint8))
    images = torch.randn(12, *shape)
    images[6, 0, 1, 2] = float("nan")
    images[5] = float("inf")
    with pytest.raises(ValueError, match=r"calibration images 5, 6 \(counted from 0\) hold NaN or infinite"):
        calibrate(model, images, batch_size=4)
    assert not model.is_calibrated  # nothing was written by a failed call
    vit = create_model("deit_tiny_adn", num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="LayerNorm, which has no running statistics"):
        calibrate(vit, torch.randn(2, 3, 32, 32))
