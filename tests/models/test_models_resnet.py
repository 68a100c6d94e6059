"""ResNet-ADN: splits, skip-aware BN semantics against a hand-built reference, torchvision and
authors'-checkpoint compatibility, MACs against the paper."""

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norms
from torch import nn

from adaptive_kernels import create_model

torchvision = pytest.importorskip("torchvision")

# (mandatory, skippable) blocks per stage, as in docs/method.md / the authors' release.
SPLITS = {
    "resnet18_adn": [(1, 1)] * 4,
    "resnet34_adn": [(2, 1), (2, 2), (3, 3), (2, 1)],
    "resnet50_adn": [(2, 1), (2, 2), (3, 3), (2, 1)],
    "resnet101_adn": [(2, 1), (2, 2), (12, 11), (2, 1)],
    "resnet20_adn": [(2, 1)] * 3,
    "resnet56_adn": [(5, 4)] * 3,
}


def reference_forward(model: nn.Module, x: torch.Tensor, skip, split) -> torch.Tensor:
    """Independent re-implementation of the ADN forward from the model's conv/BN submodules: in stage k,
    blocks past the paper's mandatory count are dropped when skip[k], and the mandatory ones then use their
    ``_skip`` BNs."""
    x = model.maxpool(F.relu(model.bn1(model.conv1(x))))
    for k, (mandatory, skippable) in enumerate(split):
        layer = getattr(model, f"layer{k + 1}")
        assert len(layer) == mandatory + skippable
        for i, block in enumerate(layer):
            if i >= mandatory and skip[k]:
                continue
            names = ["bn1", "bn2", "bn3"] if hasattr(block, "conv3") else ["bn1", "bn2"]
            norms = [getattr(block, n + ("_skip" if skip[k] else "")) for n in names]
            convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
            out = x
            for j, (conv, bn) in enumerate(zip(convs, norms)):
                out = bn(conv(out))
                if j < len(convs) - 1:
                    out = F.relu(out)
            shortcut = x if block.downsample is None else block.downsample(x)
            x = F.relu(out + shortcut)
    return model.fc(x.mean((2, 3)))


@pytest.mark.parametrize("name", list(SPLITS))
def test_split_and_block_attributes(name):
    model = create_model(name, num_classes=10)
    split = SPLITS[name]
    assert model.num_skippable_stages == len(split)
    assert len(model.skip_configs()) == 2 ** len(split)
    for k, (mandatory, skippable) in enumerate(split):
        stage = model.stages[k]
        assert stage is getattr(model, f"layer{k + 1}") and stage.stage == k
        assert [b.skippable for b in stage] == [False] * mandatory + [True] * skippable
        assert all(b.stage == k for b in stage)
        for b in stage:
            assert hasattr(b, "bn1_skip") != b.skippable
            # the downsample BN is shared, never duplicated
            assert not any(n.startswith("downsample") and n.endswith("_skip") for n, _ in b.named_modules())


def test_resnet50_every_config_matches_hand_built_reference():
    torch.manual_seed(0)
    model = create_model("resnet50_adn", num_classes=7).eval()
    randomize_norms(model, seed=1)
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    with torch.no_grad():
        for skip in model.skip_configs():
            out = model(x, skip=skip)
            torch.testing.assert_close(out, reference_forward(model, x, skip, SPLITS["resnet50_adn"]))
            assert out.shape == (2, 7) and torch.isfinite(out).all()
            outputs[skip] = out
    assert len({tuple(o.flatten().tolist()) for o in outputs.values()}) == 16  # every sub-network differs
    torch.testing.assert_close(model(x), outputs[(False,) * 4])  # None = super-net


def test_resnet20_small_input_layout_and_reference():
    torch.manual_seed(0)
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, width=8).eval()
    randomize_norms(model, seed=2)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert [s[0].conv1.out_channels for s in model.stages] == [8, 16, 32]
    assert model.layer1[0].downsample is None
    for stage in model.stages[1:]:  # option B: 1x1 stride-2 conv + BN
        conv, bn = stage[0].downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
    assert model.fc.in_features == 32
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for skip in model.skip_configs():
            torch.testing.assert_close(model(x, skip), reference_forward(model, x, skip, SPLITS["resnet20_adn"]))
    assert create_model("resnet20_adn").stages[2][0].conv1.out_channels == 64  # default width 16


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_torchvision_equivalence(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=11).eval()
    randomize_norms(tv, seed=3)
    model = create_model(f"{name}_adn", num_classes=11).eval()
    model.load_upstream_state_dict(tv.state_dict())
    own = model.state_dict()
    twins = model.skip_norm_twins()
    assert len(twins) == sum(len(b.norm_names) for s in model.stages for b in s if not b.skippable)
    for skip_name, twin in twins.items():
        for p in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(own[f"{skip_name}.{p}"], own[f"{twin}.{p}"])

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)
        # With the _skip twins equal to their norms, the base-net is torchvision's net minus the skippable
        # blocks of every stage.
        for k, (mandatory, _) in enumerate(SPLITS[f"{name}_adn"]):
            setattr(tv, f"layer{k + 1}", getattr(tv, f"layer{k + 1}")[:mandatory])
        torch.testing.assert_close(model(x, "base"), tv(x), rtol=1e-5, atol=1e-5)


def test_upstream_state_dict_errors_name_the_keys():
    model = create_model("resnet18_adn")
    sd = torchvision.models.resnet18().state_dict()
    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing: \['layer3\.1\.bn2\.running_var'\]"):
        model.load_upstream_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected: \['layer5\.0\.conv1\.weight'\]"):
        model.load_upstream_state_dict({**sd, "layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="fc.weight"):
        create_model("resnet18_adn", num_classes=10).load_upstream_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):  # a different architecture
        model.load_upstream_state_dict(torchvision.models.resnet34().state_dict())


def test_authors_checkpoint_layout_round_trips():
    torch.manual_seed(0)
    model = create_model("resnet50_adn").eval()
    randomize_norms(model, seed=4)
    # The authors' ResNet-50 state dict: torchvision's keys plus bn{1,2,3}_skip in each mandatory block.
    with torch.device("meta"):  # only the key names are needed
        expected = set(torchvision.models.resnet50().state_dict())
    for k, (mandatory, _) in enumerate(SPLITS["resnet50_adn"]):
        for i in range(mandatory):
            for bn in ("bn1", "bn2", "bn3"):
                for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    expected.add(f"layer{k + 1}.{i}.{bn}_skip.{p}")
    assert set(model.state_dict()) == expected
    assert "layer1.0.bn1_skip.weight" in expected and "layer1.2.bn1_skip.weight" not in expected

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = create_model("resnet50_adn").eval()
    loaded.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for skip in ("super", "TFTF", "base"):
            torch.testing.assert_close(loaded(x, skip), model(x, skip), rtol=0, atol=0)


def test_resnet50_macs_match_paper():
    model = create_model("resnet50_adn")
    # The paper's "GFLOPs" (authors' README): super 4.11, TFFF 3.90, TTFF 3.46, base 2.58.
    for skip, paper in (("FFFF", 4.11e9), ("TFFF", 3.90e9), ("TTFF", 3.46e9), ("TTTT", 2.58e9)):
        assert model.macs(skip) == pytest.approx(paper, rel=0.02), skip


def _bn_state(model):
    return {
        n: (m.running_mean.clone(), m.running_var.clone())
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


def test_skip_norm_statistics_and_gradients_follow_the_pass():
    torch.manual_seed(0)
    model = create_model("resnet20_adn", in_chans=1, width=4).train()
    x = torch.randn(4, 1, 16, 16)
    mandatory_norms = {f"layer{k + 1}.{i}.{bn}" for k in range(3) for i in range(2) for bn in ("bn1", "bn2")}
    skippable_norms = {f"layer{k + 1}.2.{bn}" for k in range(3) for bn in ("bn1", "bn2")}
    shared = {"bn1"} | {f"layer{k}.0.downsample.1" for k in (2, 3)}

    def changed(before, after):
        return {n for n in before if not torch.equal(before[n][0], after[n][0])}

    before = _bn_state(model)
    model(x, "base").sum().backward()
    assert changed(before, _bn_state(model)) == {n + "_skip" for n in mandatory_norms} | shared
    bn_grads = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.weight.grad is not None}
    assert bn_grads == {n + "_skip" for n in mandatory_norms} | shared

    model.zero_grad(set_to_none=True)
    before = _bn_state(model)
    model(x, "super").sum().backward()
    assert changed(before, _bn_state(model)) == mandatory_norms | skippable_norms | shared
    assert not any(p.grad is not None for n, p in model.named_parameters() if "_skip" in n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        create_model("resnet20_adn", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18_adn", num_classes=0)
    with pytest.raises(TypeError):
        create_model("resnet50_adn", widht=3)
    model = create_model("resnet20_adn", in_chans=1, width=4)
    with pytest.raises(ValueError, match="3 skippable stages"):
        model(torch.zeros(1, 1, 16, 16), skip="TFFT")
    with pytest.raises(ValueError, match="no _skip norms"):
        model.layer1[2].residual_branch(torch.zeros(1, 4, 8, 8), skip_stage=True)
    # a skippable block is the identity when its stage is skipped
    h = torch.randn(1, 4, 8, 8)
    assert model.layer1[2](h, skip_stage=True) is h


def test_macs_count_at_the_models_own_input_size():
    model = create_model("resnet20_adn")  # a CIFAR-style 32x32 model
    assert model.macs() == model.macs(None, 32) == model.macs(None, (32, 32)) == pytest.approx(0.041e9, rel=0.02)
    assert model.macs(None, 224) == pytest.approx(2.0e9, rel=0.02)
    assert create_model("resnet50_adn").macs() == create_model("resnet50_adn").macs(None, 224)
    with pytest.raises(TypeError, match=r"input_size must be a positive int or \(H, W\), got '32'"):
        model.macs(None, "32")
