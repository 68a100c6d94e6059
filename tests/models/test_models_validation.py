"""Every model constructor rejects a bad size when it is built, naming the argument (not at the first forward,
and never as logits of shape (N, 0))."""

import pytest

from adaptive_kernels import create_model
from adaptive_kernels.models.swin import SwinTransformerADN
from adaptive_kernels.models.vit import VisionTransformerADN

VIT = {"image_size": 32, "patch_size": 8, "num_layers": 12, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
SWIN = {"embed_dim": 8, "depths": (2, 2), "num_heads": (2, 4)}


@pytest.mark.parametrize("name", ["resnet20_adn", "mobilenet_v2_adn", "deit_tiny_adn", "vit_b_32_adn", "swin_t_adn"])
@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"in_chans": -1}, {"num_classes": 2.5}, {"in_chans": True}])
def test_every_builder_rejects_bad_class_and_channel_counts(name, bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{key} must be a positive int, got {value!r}"):
        create_model(name, **bad)


@pytest.mark.parametrize("bad, message", [
    ({"patch_size": 0}, "patch_size must be a positive int, got 0"),
    ({"hidden_dim": 15}, "hidden_dim=15 must be a multiple of num_heads=2"),
    ({"mlp_dim": 0}, "mlp_dim must be a positive int"),
    ({"num_heads": 0}, "num_heads must be a positive int"),
    ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\)"),
    ({"image_size": 30}, "not a multiple of the patch size"),
])
def test_vit_rejects_bad_sizes(bad, message):
    with pytest.raises(ValueError, match=message):
        VisionTransformerADN(**{**VIT, **bad})


@pytest.mark.parametrize("bad, message", [
    ({"window_size": 0}, "window_size must be a positive int, got 0"),
    ({"patch_size": -4}, "patch_size must be a positive int"),
    ({"num_heads": (2,)}, "must list one value per stage"),
    ({"num_heads": (3, 4)}, "stage 0 has 8 channels .* not a multiple of its 3 heads"),
    ({"depths": (2, 1)}, "every stage needs >= 2 blocks"),
    ({"mlp_ratio": 0}, "mlp_ratio must be a positive number"),
    ({"stochastic_depth_prob": -0.1}, "stochastic_depth_prob must be a probability"),
])
def test_swin_rejects_bad_sizes(bad, message):
    with pytest.raises(ValueError, match=message):
        SwinTransformerADN(**{**SWIN, **bad})


def test_valid_small_configs_still_build():
    assert VisionTransformerADN(**VIT).num_skippable_stages == 4
    assert SwinTransformerADN(**SWIN).num_skippable_stages == 2
