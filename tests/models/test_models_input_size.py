"""``input_size_range``: the sizes each family declares are the ones its forward really takes — the smallest works
(super-net and base-net, in eval at batch 1 and training at the stated batch), one pixel less fails, and so does one
more than the largest."""

import pytest
import torch

from adaptive_kernels import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [
    ("resnet20_adn", {"width": 2}, (1, None), 5),  # CIFAR stem: the last stage at 1/4; one image needs 2x2 there
    ("resnet18_adn", {}, (1, None), 33),  # ImageNet stem: 1/32
    ("mobilenet_v2_adn", {"width_mult": 0.25}, (1, None), 33),
    ("swin_t_adn", {}, (4, None), 4),  # LayerNorm: no batch statistics
    ("deit_tiny_adn", {"image_size": 32}, (32, 32), 32),
]


def runs(model, size: int, batch: int, training: bool) -> bool:
    model.train(training)
    x = torch.randn(batch, model.in_chans, size, size, generator=torch.Generator().manual_seed(size))
    try:
        with torch.set_grad_enabled(training):
            for skip in ("super", "base"):
                model(x, skip)
    except ValueError:  # the model's own input check, or BatchNorm's "more than 1 value per channel"
        return False
    return True


@pytest.mark.parametrize("name, kwargs, sizes, one_image_training", MODELS, ids=[m[0] for m in MODELS])
def test_declared_input_sizes_are_the_ones_the_forward_takes(name, kwargs, sizes, one_image_training):
    model = create_model(name, num_classes=10, **kwargs)
    assert model.input_size_range() == sizes and model.input_size_range(training_batch=2) == sizes
    assert model.input_size_range(training_batch=1) == (one_image_training, sizes[1])
    low, high = sizes
    assert runs(model, low, 1, training=False) and runs(model, low, 2, training=True)
    assert runs(model, one_image_training, 1, training=True)
    assert not runs(model, one_image_training - 1, 1, training=True)
    if low > 1:
        assert not runs(model, low - 1, 1, training=False) and not runs(model, low - 1, 2, training=True)
    if high is not None:
        assert not runs(model, high + 1, 1, training=False)
