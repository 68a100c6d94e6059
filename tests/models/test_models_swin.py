"""Swin-T-ADN: skip semantics against a hand-built reference, torchvision equivalence, the authors'
checkpoint layout, MACs. (Build/forward/bad-skip checks over all models live in the shared model test.)"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.swin_transformer import SwinTransformer

from adaptive_kernels.models import create_model
from adaptive_kernels.models.base import module_macs
from adaptive_kernels.models.swin import PatchMerging, ShiftedWindowAttention, SwinTransformerADN

DEPTHS = (2, 2, 6, 2)
MANDATORY = (1, 1, 3, 1)  # released split: the first half of each stage
# Swin-T's depths with tiny widths; window 2 so that the 8x8 and 4x4 maps of a 32x32 image get shifted windows
SMALL = {"embed_dim": 8, "depths": DEPTHS, "num_heads": (1, 2, 2, 4), "window_size": 2}


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random values for every tensor the default init leaves constant or tiny (norms get 1 + noise);
    big weight matrices keep their (already random) init to save time."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or (t.dim() >= 2 and "relative_position_bias_table" not in name):
                continue
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2
            is_norm_weight = name.endswith(".weight") and t.dim() == 1 and "norm" in name
            t.copy_(noise + 1.0 if is_norm_weight else noise)


def _small_model(seed: int = 0, **kwargs) -> SwinTransformerADN:
    model = SwinTransformerADN(**SMALL, num_classes=5, **kwargs).double().eval()
    _randomise_(model, seed)
    return model


def _reference(model: SwinTransformerADN, x: torch.Tensor, skip: tuple[bool, ...]) -> torch.Tensor:
    """Independent forward: stage k = features[2k]; its first half is mandatory (``_skip`` norms when stage k is
    skipped), its second half bypassed; the merging before stage k (features[2k-1]) follows stage k's flag."""
    h = model.pre[2](model.pre[0](x).permute(0, 2, 3, 1))
    for k, depth in enumerate(DEPTHS):
        if k > 0:
            merge = model.features[2 * k - 1]
            h = F.pad(h, (0, 0, 0, h.shape[2] % 2, 0, h.shape[1] % 2))
            h = torch.cat([h[:, 0::2, 0::2], h[:, 1::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 1::2]], dim=-1)
            h = merge.reduction((merge.norm_skip if skip[k] else merge.norm)(h))
        for i in range(depth):
            blk = model.features[2 * k][i]
            if skip[k] and i >= MANDATORY[k]:
                continue
            norm1, norm2 = (blk.norm1_skip, blk.norm2_skip) if skip[k] else (blk.norm1, blk.norm2)
            h = h + blk.attn(norm1(h))
            h = h + blk.mlp(norm2(h))
    return model.head(model.norm(h).mean(dim=(1, 2)))


def test_structure():
    model = _small_model()
    assert model.num_skippable_stages == 4
    for k, depth in enumerate(DEPTHS):
        stage = model.features[2 * k]
        assert stage.stage == k and len(stage) == depth
        for i, blk in enumerate(stage):
            assert blk.stage == k
            assert blk.skippable == (i >= MANDATORY[k])
            assert hasattr(blk, "norm1_skip") == hasattr(blk, "norm2_skip") == (not blk.skippable)
            assert blk.attn.shift_size == (0 if i % 2 == 0 else 1)
        if k > 0:
            merge = model.features[2 * k - 1]
            assert isinstance(merge, PatchMerging) and merge.stage == k


@pytest.mark.parametrize("skip", ["FFFF", "TTTT", "TFFT", "FTTF", "FFTF", "FFFT"])
def test_skip_matches_hand_built_reference(skip):
    model = _small_model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flags = tuple(c == "T" for c in skip)
    with torch.no_grad():
        torch.testing.assert_close(model(x, skip=skip), _reference(model, x, flags), rtol=1e-10, atol=1e-10)


def test_configs_differ():
    model = _small_model()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outs = [model(x, skip=s) for s in ("FFFF", "TFFF", "FTFF", "FFTF", "FFFT", "TTTT")]
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j])


def test_no_stochastic_depth_in_skipped_stages():
    """Training mode: the base-net (every stage skipped) runs its mandatory blocks without stochastic
    depth, so it is deterministic and equals eval mode; the super-net drops residual branches."""
    model = _small_model(stochastic_depth_prob=0.9)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        base_eval, super_eval = model(x, skip="base"), model(x)
        model.train()
        torch.testing.assert_close(model(x, skip="base"), base_eval, rtol=1e-12, atol=1e-12)
        super_a, super_b = model(x), model(x)
    assert not torch.allclose(super_a, super_b)
    assert not torch.allclose(super_a, super_eval)


@pytest.fixture(scope="module")
def swin_t_pair():
    """torchvision swin_t with random weights and swin_t_adn loaded from its state dict (built once)."""
    torch.manual_seed(0)
    upstream = torchvision.models.swin_t().eval()
    _randomise_(upstream, seed=2)
    with torch.device("meta"):  # skip our own init: every tensor is overwritten by the load
        model = create_model("swin_t_adn")
    model = model.to_empty(device="cpu").eval()
    model.load_upstream_state_dict(upstream.state_dict())
    return upstream, model


@pytest.mark.parametrize("size", [(64, 64), (96, 40)])
def test_torchvision_equivalence_swin_t(swin_t_pair, size):
    """64x64: maps of 16, 8, 4, 2 padded to the 7x7 window, shifted only while a map exceeds one window.
    96x40: maps 24x10, 12x5, 6x3, 3x2 (odd sizes at the mergings); 12x5 shifts along H only."""
    upstream, model = swin_t_pair
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = upstream(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, skip="base"), expected, atol=1e-3)


def test_skip_norms_initialised_from_twins(swin_t_pair):
    _, model = swin_t_pair
    twins = model.skip_norm_twins()
    assert len(twins) == 2 * sum(MANDATORY) + 3  # norm1_skip/norm2_skip per mandatory block, 3 mergings
    modules = dict(model.named_modules())
    for skip_name, twin in twins.items():
        for p_skip, p in zip(modules[skip_name].parameters(), modules[twin].parameters()):
            assert torch.equal(p_skip, p)


def test_relative_position_index_matches_torchvision():
    """Built, not loaded: our index buffer equals torchvision's for the 7x7 window and a small one."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention as TVAttention

    for window in (7, 3):
        ours = ShiftedWindowAttention(16, window, 0, 2).relative_position_index
        assert torch.equal(ours, TVAttention(16, [window, window], [0, 0], 2).relative_position_index)


@pytest.mark.parametrize("size", [(32, 32), (44, 28)])
def test_torchvision_equivalence_small_config(size):
    """Same math through torchvision's own class with tiny widths and window 2 (many shifted windows)."""
    upstream = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=list(DEPTHS), num_heads=[1, 2, 2, 4], window_size=[2, 2], num_classes=5
    ).eval()
    _randomise_(upstream, seed=3)
    model = SwinTransformerADN(**SMALL, num_classes=5).eval()
    model.load_upstream_state_dict(upstream.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), upstream(x), rtol=1e-5, atol=1e-5)


def _authors_keys() -> set[str]:
    """State-dict keys of the authors' swin_t (models/swin_transformer.py in github.com/wchkang/depth)."""
    keys = {"pre.0.weight", "pre.0.bias", "pre.2.weight", "pre.2.bias", "norm.weight", "norm.bias"}
    keys |= {"head.weight", "head.bias"}
    block_names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.0", "mlp.3"]
    for k, depth in enumerate(DEPTHS):
        if k > 0:
            j = 2 * k - 1
            keys |= {f"features.{j}.reduction.weight"}
            keys |= {f"features.{j}.{n}.{p}" for n in ("norm", "norm_skip") for p in ("weight", "bias")}
        for i in range(depth):
            prefix = f"features.{2 * k}.{i}."
            names = block_names + (["norm1_skip", "norm2_skip"] if i < MANDATORY[k] else [])
            keys |= {prefix + n + p for n in names for p in (".weight", ".bias")}
            keys |= {prefix + "attn.relative_position_bias_table", prefix + "attn.relative_position_index"}
    return keys


def test_authors_checkpoint_layout_loads():
    with torch.device("meta"):
        full = create_model("swin_t_adn")
    assert set(full.state_dict()) == _authors_keys()
    assert "features.0.0.norm1_skip.weight" in _authors_keys()

    model = SwinTransformerADN(**SMALL, num_classes=5)
    shapes = model.state_dict()
    authors_sd = {
        k: torch.randn_like(shapes[k]) if shapes[k].is_floating_point() else shapes[k] for k in _authors_keys()
    }
    model.load_state_dict(authors_sd)  # strict
    for key in ("features.4.2.norm2_skip.bias", "features.3.norm_skip.weight", "pre.2.weight"):
        assert torch.equal(model.state_dict()[key], authors_sd[key])


def test_load_upstream_rejects_missing_and_unexpected_keys():
    upstream_sd = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=list(DEPTHS), num_heads=[1, 2, 2, 4], window_size=[2, 2]
    ).state_dict()
    model = SwinTransformerADN(**SMALL)
    # torchvision's features.5.1 (stage 2, block 1) is our features.4.1
    missing = {k: v for k, v in upstream_sd.items() if k != "features.5.1.norm2.bias"}
    with pytest.raises(ValueError, match=r"missing: \['features\.4\.1\.norm2\.bias'\]"):
        model.load_upstream_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected: \['extra\.weight'\]"):
        model.load_upstream_state_dict({**upstream_sd, "extra.weight": torch.zeros(1)})


def test_macs_swin_t_match_paper():
    """Authors' README: 4.49 GMACs super-net, 3.75 TTFF, 2.34 base-net at 224x224."""
    with torch.device("meta"):  # MACs come from shapes only
        model = create_model("swin_t_adn")
    assert model.macs() == pytest.approx(4.49e9, rel=0.02)
    assert model.macs("TTFF") == pytest.approx(3.75e9, rel=0.02)
    assert model.macs("base") == pytest.approx(2.34e9, rel=0.02)


@pytest.mark.parametrize("shift", [0, 3])
def test_attention_macs_match_flop_counter(shift):
    """qkv + proj (their own hooks) + attention_macs equal torch's matmul count, padded windows included."""
    attn = ShiftedWindowAttention(dim=8, window_size=7, shift_size=shift, num_heads=2).eval()
    x = torch.randn(1, 9, 11, 8)  # padded to 14x14: 4 windows
    counted = []
    hooks = [m.register_forward_hook(lambda m, i, o: counted.append(module_macs(m, i, o))) for m in attn.modules()]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        attn(x)
    for h in hooks:
        h.remove()
    assert len(counted) == 3  # qkv, proj, attention
    assert sum(counted) * 2 == counter.get_total_flops()


def test_bad_image_size():
    model = SwinTransformerADN(**SMALL)
    with pytest.raises(ValueError, match="at least 4x4"):
        model(torch.randn(1, 3, 3, 16))
