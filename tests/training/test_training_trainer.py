"""Trainer pieces: LR schedules, optimizer groups, EMA, AMP guard, stopping, and that training learns."""

import math

import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.training import ModelEMA, TrainConfig, Trainer, make_synthetic, seed_everything
from adaptive_kernels.training.trainer import build_optimizer, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, schedule="cosine")
    steps = 10  # per epoch: 10 warmup steps, then 30 cosine steps
    assert [lr_factor(s, cfg, steps) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(9, cfg, steps) == 1.0
    assert lr_factor(10, cfg, steps) == 1.0
    assert lr_factor(25, cfg, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert lr_factor(39, cfg, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_multistep_schedule():
    cfg = TrainConfig(epochs=10, schedule="multistep", milestones=(3, 6), lr_gamma=0.1)
    assert [lr_factor(e * 5, cfg, 5) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_no_weight_decay_for_norms_and_biases():
    model = create_model("resnet20_adn", num_classes=3, in_chans=1, width=2)
    for name in ("sgd", "adamw"):
        opt = build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.01))
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        for pname, p in model.named_parameters():
            module = model.get_submodule(pname.rsplit(".", 1)[0])
            is_norm_or_bias = pname.endswith("bias") or isinstance(module, torch.nn.BatchNorm2d)
            assert (id(p) in decayed) != is_norm_or_bias, pname
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_ema_update_formula():
    model = torch.nn.BatchNorm2d(2)
    ema = ModelEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    model(torch.randn(4, 2, 3, 3))  # moves the running stats and num_batches_tracked
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1 * model.weight.detach())
    torch.testing.assert_close(ema.module.running_mean, 0.1 * model.running_mean)
    assert ema.module.num_batches_tracked.item() == 1  # integer buffers are copied
    assert not ema.module.training and not ema.module.weight.requires_grad


def small_trainer(**overrides):
    data = make_synthetic(num_train=512, num_test=256, image_size=8)
    data.augment = False
    seed_everything(0)
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, width=2)
    config = {"epochs": 4, "batch_size": 32, "lr": 0.05, "progress": False, **overrides}
    return Trainer(model, data, TrainConfig(**config), echo=lambda s: None)


def test_amp_is_refused_on_cpu():
    with pytest.raises(ValueError, match="amp='bf16' is for GPUs only"):
        small_trainer(amp="bf16")


def test_stops_at_step_and_time_limit():
    assert small_trainer(stop_at_step=3).fit()["global_step"] == 3
    summary = small_trainer(time_limit_s=1e-9).fit()
    assert summary["stopped_early"] and summary["global_step"] == 1


@pytest.mark.parametrize("kwargs,match", [({"epochs": 0}, "epochs"), ({"optimizer": "lamb"}, "optimizer"),
                                          ({"schedule": "step"}, "schedule"), ({"clip_grad": 0}, "clip_grad")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_adn_training_teaches_the_base_net_through_distillation_alone():
    """End to end: the base-net gets no label loss, yet it learns (from the super-net), well above chance (10%)."""
    summary = small_trainer().fit()
    last = summary["history"][-1]
    first = summary["history"][0]
    assert last["acc_super"] > 35 and last["acc_base"] > 25
    assert last["acc_super"] > first["acc_super"] and last["acc_base"] > first["acc_base"]
