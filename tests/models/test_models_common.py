"""Checks every registered model must pass: build, forward for super/base/mixed configs, the skip API,
MACs against torch's own FLOP counter, and bad-input errors."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import adaptive_kernels as ak

NAMES = ak.list_models()


def input_size(model) -> tuple[int, int]:
    """The smallest input each family handles cheaply; ViT/DeiT have a fixed image size."""
    size = getattr(model, "image_size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else tuple(size)
    return (32, 32)


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    torch.manual_seed(0)
    name = request.param
    # ViT/DeiT fix their image size at build time; a small one keeps these checks cheap
    small = {"image_size": 32} if name.startswith(("vit", "deit")) else {}
    model = ak.create_model(name, num_classes=7, **small).eval()
    with torch.no_grad():  # ViT-style heads start at zero; give them weights so outputs differ
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(std=0.02)
    return name, model


def mixed_config(n: int) -> tuple[bool, ...]:
    return tuple(i % 2 == 0 for i in range(n))


def test_forward_super_base_mixed(built):
    name, model = built
    s = model.num_skippable_stages
    assert isinstance(s, int) and s >= 1
    x = torch.randn(2, model.in_chans, *input_size(model))
    outs = {}
    with torch.no_grad():
        for skip in (None, "base", mixed_config(s)):
            y = model(x, skip=skip)
            assert y.shape == (2, 7), name
            assert torch.isfinite(y).all(), name
            outs[str(skip)] = y
    # different sub-networks compute different functions
    assert not torch.allclose(outs["None"], outs["base"], rtol=1e-3, atol=0)


def test_skip_configs_and_none_is_super(built):
    _, model = built
    configs = model.skip_configs()
    s = model.num_skippable_stages
    assert len(configs) == 2**s and len(set(configs)) == 2**s
    assert configs[0] == (False,) * s and configs[-1] == (True,) * s
    x = torch.randn(1, model.in_chans, *input_size(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, skip="F" * s), rtol=0, atol=0)
        torch.testing.assert_close(model(x, skip="base"), model(x, skip=[True] * s), rtol=0, atol=0)


def test_macs_match_torch_flop_counter(built):
    name, model = built
    size = input_size(model)
    x = torch.zeros(1, model.in_chans, *size)
    for skip in (None, "base"):
        counter = FlopCounterMode(display=False)
        # nn.MultiheadAttention's inference fast path is one fused op the counter cannot see
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            # ...and so is CPU flash attention: the math backend decomposes into counted matmuls
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
                model(x, skip=skip)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        expected = counter.get_total_flops() / 2  # one MAC = two FLOPs
        got = model.macs(skip, input_size=size)
        assert got == pytest.approx(expected, rel=1e-3), (name, skip)
    assert model.macs("base", input_size=size) < model.macs(None, input_size=size)


def test_bad_input_errors(built):
    _, model = built
    s = model.num_skippable_stages
    x = torch.randn(1, model.in_chans, *input_size(model))
    with pytest.raises(ValueError, match="skippable stages"):
        model(x, skip="T" * (s + 1))
    with pytest.raises(ValueError, match="unknown letter"):
        model(x, skip="Q" * s)
    with pytest.raises(ValueError, match="skippable stages"):
        model(x, skip=[True] * (s + 2))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, "):
        model(torch.randn(1, model.in_chans + 1, *input_size(model)))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, "):
        model(torch.randn(model.in_chans, *input_size(model)))


def test_in_chans_and_dtype_kwargs():
    model = ak.create_model("resnet20_adn", num_classes=3, in_chans=1, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    y = model(torch.randn(2, 1, 28, 28, dtype=torch.float64), skip="base")
    assert y.shape == (2, 3) and y.dtype == torch.float64
