"""ViT/DeiT-ADN: skip semantics against a hand-built reference, torchvision equivalence, the authors'
checkpoint names, MACs. (Build/forward/bad-skip checks over all models live in the shared model test.)"""

import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from adaptive_kernels.models import create_model
from adaptive_kernels.models.vit import VisionTransformerADN

SKIPPABLE = {2, 5, 8, 11}  # released split: the last block of each group of 3
# small config with the full 12-block depth, so every skip flag has blocks to act on
SMALL = {"image_size": 32, "patch_size": 8, "num_layers": 12, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def _randomise_(model: torch.nn.Module, seed: int, only_small: bool = False) -> None:
    """Random values for every tensor the default init leaves constant (LN, biases, class token, zero head);
    norms get 1 + noise. ``only_small`` keeps the big weight matrices (already random) to save time."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if only_small and t.dim() >= 2 and "head" not in name and "class_token" not in name:
                continue
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2
            is_norm_weight = name.endswith(".weight") and t.dim() == 1 and ".ln" in name
            t.copy_(noise + 1.0 if is_norm_weight else noise)


def _small_model(seed: int = 0) -> VisionTransformerADN:
    model = VisionTransformerADN(**SMALL, num_classes=5).double().eval()
    _randomise_(model, seed)
    return model


def _reference(model: VisionTransformerADN, x: torch.Tensor, skip: tuple[bool, ...]) -> torch.Tensor:
    """Independent forward: block i is in stage i // 3; skippable blocks (2, 5, 8, 11) are bypassed when
    their stage is skipped, the others then normalise with ln_*_skip."""
    n = x.shape[0]
    h = model.conv_proj(x).reshape(n, model.hidden_dim, -1).permute(0, 2, 1)
    h = torch.cat([model.class_token.expand(n, -1, -1), h], dim=1) + model.encoder.pos_embedding
    for i in range(12):
        blk = getattr(model.encoder.layers, f"encoder_layer_{i}")
        skipped = skip[i // 3]
        if skipped and i in SKIPPABLE:
            continue
        ln_1, ln_2 = (blk.ln_1_skip, blk.ln_2_skip) if skipped else (blk.ln_1, blk.ln_2)
        a = ln_1(h)
        h = h + blk.self_attention(a, a, a, need_weights=False)[0]
        h = h + blk.mlp[3](torch.nn.functional.gelu(blk.mlp[0](ln_2(h))))
    return model.heads.head(model.encoder.ln(h)[:, 0])


def test_block_structure():
    model = _small_model()
    for i, blk in enumerate(model.encoder.layers):
        assert blk.stage == i // 3
        assert blk.skippable == (i in SKIPPABLE)
        assert hasattr(blk, "ln_1_skip") == hasattr(blk, "ln_2_skip") == (i not in SKIPPABLE)
    assert model.num_skippable_stages == 4


@pytest.mark.parametrize("skip", ["FFFF", "TTTT", "TFFT", "FTTF", "FFTF"])
def test_skip_matches_hand_built_reference(skip):
    model = _small_model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flags = tuple(c == "T" for c in skip)
    with torch.no_grad():
        torch.testing.assert_close(model(x, skip=skip), _reference(model, x, flags), rtol=1e-10, atol=1e-10)


def test_skip_norms_are_used_and_configs_differ():
    model = _small_model()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outs = {s: model(x, skip=s) for s in ("FFFF", "TFFF", "TTTT")}
        # the base-net with the _skip norms replaced by their twins must change the output
        for blk in model.encoder.layers:
            if not blk.skippable:
                blk.ln_1_skip.load_state_dict(blk.ln_1.state_dict())
                blk.ln_2_skip.load_state_dict(blk.ln_2.state_dict())
        base_plain_norms = model(x, skip="TTTT")
    assert not torch.allclose(outs["FFFF"], outs["TFFF"])
    assert not torch.allclose(outs["TFFF"], outs["TTTT"])
    assert not torch.allclose(outs["TTTT"], base_plain_norms)


@pytest.fixture(scope="module")
def vit_b_16_pair():
    """torchvision vit_b_16 (full width and depth; 64x64 images keep it cheap) with random weights, and
    vit_b_16_adn loaded from its state dict."""
    torch.manual_seed(0)
    upstream = torchvision.models.vit_b_16(image_size=64).eval()
    _randomise_(upstream, seed=2, only_small=True)
    with torch.device("meta"):  # skip our own init: every tensor is overwritten by the load
        model = create_model("vit_b_16_adn", image_size=64)
    model = model.to_empty(device="cpu").eval()
    model.load_upstream_state_dict(upstream.state_dict())
    return upstream, model


def test_torchvision_equivalence_vit_b_16(vit_b_16_pair):
    upstream, model = vit_b_16_pair
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = upstream(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, skip="base"), expected, atol=1e-3)


def test_skip_norms_initialised_from_twins(vit_b_16_pair):
    _, model = vit_b_16_pair
    twins = model.skip_norm_twins()
    assert len(twins) == 16  # 8 mandatory blocks x (ln_1_skip, ln_2_skip)
    modules = dict(model.named_modules())
    for skip_name, twin in twins.items():
        for p_skip, p in zip(modules[skip_name].parameters(), modules[twin].parameters()):
            assert torch.equal(p_skip, p)


def test_torchvision_equivalence_small_vit_b_32_layout():
    """vit_b_32's patch size through torchvision's own class (small width to stay cheap)."""
    cfg = dict(SMALL, image_size=64, patch_size=32)
    upstream = VisionTransformer(**cfg, num_classes=7).eval()
    _randomise_(upstream, seed=3)
    model = VisionTransformerADN(**cfg, num_classes=7).eval()
    model.load_upstream_state_dict(upstream.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), upstream(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, upstream_cfg",
    [
        ("vit_b_16_adn", {"patch_size": 16, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}),
        ("vit_b_32_adn", {"patch_size": 32, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}),
        ("deit_tiny_adn", {"patch_size": 16, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768}),
        ("deit_small_adn", {"patch_size": 16, "num_heads": 6, "hidden_dim": 384, "mlp_dim": 1536}),
    ],
)
def test_builders_match_upstream_shapes(name, upstream_cfg):
    """Each builder has torchvision's keys and shapes for its config, plus the 16 skip-norm tensors x2."""
    with torch.device("meta"):
        model = create_model(name)
        upstream = VisionTransformer(image_size=224, num_layers=12, **upstream_cfg)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in upstream.state_dict().items()}
    extra = {k: s for k, s in ours.items() if k not in theirs}
    assert {k: ours[k] for k in theirs} == theirs
    assert len(extra) == 32 and all("_skip." in k for k in extra)
    assert model.encoder.layers[0].self_attention.num_heads == upstream_cfg["num_heads"]


def test_authors_checkpoint_names_load():
    """Keys as written by the authors' VisionTransformer: torchvision's + ln_1_skip/ln_2_skip per mandatory block."""
    upstream = VisionTransformer(**SMALL, num_classes=5)
    authors_sd = {k: torch.randn_like(v) for k, v in upstream.state_dict().items()}
    for i in range(12):
        if i not in SKIPPABLE:
            for ln in ("ln_1_skip", "ln_2_skip"):
                for p in ("weight", "bias"):
                    authors_sd[f"encoder.layers.encoder_layer_{i}.{ln}.{p}"] = torch.randn(SMALL["hidden_dim"])
    model = VisionTransformerADN(**SMALL, num_classes=5)
    model.load_state_dict(authors_sd)  # strict
    key = "encoder.layers.encoder_layer_4.ln_2_skip.bias"
    assert torch.equal(model.state_dict()[key], authors_sd[key])
    skip_keys = [k for k in model.state_dict() if "_skip" in k]
    assert len(skip_keys) == 32
    assert not [k for k in skip_keys if int(k.split(".")[2].removeprefix("encoder_layer_")) in SKIPPABLE]


def test_load_upstream_rejects_missing_and_unexpected_keys():
    upstream_sd = VisionTransformer(**SMALL).state_dict()
    model = VisionTransformerADN(**SMALL)
    missing = {k: v for k, v in upstream_sd.items() if k != "encoder.layers.encoder_layer_3.ln_2.bias"}
    with pytest.raises(ValueError, match=r"missing: \['encoder\.layers\.encoder_layer_3\.ln_2\.bias'\]"):
        model.load_upstream_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected: \['encoder\.extra'\]"):
        model.load_upstream_state_dict({**upstream_sd, "encoder.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatch"):
        VisionTransformerADN(**SMALL, num_classes=3).load_upstream_state_dict(upstream_sd)


def test_load_upstream_accepts_legacy_mlp_names():
    """Old torchvision ViT checkpoints name the MLP linears linear_1/linear_2."""
    upstream = VisionTransformer(**SMALL, num_classes=5).eval()
    _randomise_(upstream, seed=4)
    legacy = {
        k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
        for k, v in upstream.state_dict().items()
    }
    assert any(".mlp.linear_1." in k for k in legacy)
    model = VisionTransformerADN(**SMALL, num_classes=5).eval()
    model.load_upstream_state_dict(legacy)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), upstream(x), rtol=1e-5, atol=1e-5)


def test_macs_vit_b_16_match_paper():
    """Paper (authors' README): 17.58 GMACs super-net, 14.67 TTFF, 11.76 base-net at 224x224."""
    with torch.device("meta"):  # MACs come from shapes only
        model = create_model("vit_b_16_adn")
    assert model.macs() == pytest.approx(17.58e9, rel=0.02)
    assert model.macs("TTFF") == pytest.approx(14.67e9, rel=0.02)
    assert model.macs("base") == pytest.approx(11.76e9, rel=0.02)


def test_macs_counts_one_block_by_hand():
    """Skipping one stage removes exactly one encoder block: in-proj, QK^T, AV, out-proj and the MLP."""
    model = VisionTransformerADN(**SMALL)
    seq, d, mlp = (32 // 8) ** 2 + 1, SMALL["hidden_dim"], SMALL["mlp_dim"]
    block = 4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * mlp
    assert model.macs("FFFF") - model.macs("FTFF") == block
    assert model.macs() == 12 * block + 16 * d * 3 * 8 * 8 + d * 1000


def test_bad_image_size():
    model = VisionTransformerADN(**SMALL)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="patch size"):
        VisionTransformerADN(**dict(SMALL, image_size=36))
