"""ResNet-ADN: ResNets whose every stage ends in a skippable sub-path (Kang & Lee, NeurIPS 2024).

Layout — torchvision's v1.5 ResNet, state-dict names unchanged, plus skip-aware BN twins::

    conv1 -> bn1 -> relu -> maxpool         stem, never duplicated
                                            (CIFAR-style variants: 3x3 stride-1 conv, maxpool = Identity)
    layer1 .. layerS                        stages (SkippableStage, an nn.Sequential of blocks);
                                            layer{k+1} follows skip[k]
      layerK.i, i < mandatory               mandatory block: conv1/bn1/conv2/bn2[/conv3/bn3],
                                            downsample.0 (1x1 conv) / downsample.1 (BN) on block 0,
                                            and the twins bn1_skip/bn2_skip[/bn3_skip]
      layerK.i, i >= mandatory              skippable block: the same without any ``_skip`` twin
    avgpool -> flatten -> fc                head, never duplicated

A stage of ``n`` blocks has ``mandatory = min(n - 1, (n + 1) // 2)`` blocks (ResNet-50: 2/1, 2/2, 3/3, 2/1
mandatory/skippable). When ``skip[k]`` is True, stage k's skippable blocks are the identity and its
mandatory blocks normalise with their ``_skip`` twins (so those twins' running statistics are updated only
by passes that skip the stage); the downsample BN is shared. These names and semantics are those of the
authors' release (github.com/wchkang/depth, ``models/resnet.py``), so their checkpoints load with a plain
``load_state_dict``; BasicBlock (ResNet-18/34 and the CIFAR nets) follows the same scheme.

Every block exposes ``skippable: bool``, ``stage: int`` (its index into the skip tuple) and
``forward(x, skip_stage)``; ``residual_branch(x, skip_stage)`` is F(x) of ``relu(F(x) + shortcut(x))``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ADNModel, check_positive_int
from .norms import SubnetBatchNorm2d
from .registry import register_model
from .skip import SkipLike


def num_mandatory_blocks(num_blocks: int) -> int:
    """Mandatory blocks of a stage of ``num_blocks`` blocks (the rest are skippable): the first half,
    rounded up, but at least one block is left skippable."""
    return min(num_blocks - 1, (num_blocks + 1) // 2)


class _ResidualBlock(nn.Module):
    """``relu(F(x) + shortcut(x))`` with skip-aware norms in F when the block is mandatory.

    Subclasses build the convs and the norms named in ``norm_names`` (plus their ``_skip`` twins when
    not skippable) and implement ``residual_branch``.
    """

    expansion: int
    norm_names: tuple[str, ...]

    def __init__(self, stage: int, skippable: bool, downsample: nn.Module | None) -> None:
        super().__init__()
        if skippable and downsample is not None:
            raise ValueError("a skippable block must keep the shape of its input (no downsample branch)")
        self.stage = stage
        self.skippable = skippable
        self.downsample = downsample
        self.relu = nn.ReLU()

    def _add_skip_twins(self) -> None:
        if not self.skippable:
            for name in self.norm_names:
                setattr(self, name + "_skip", SubnetBatchNorm2d(getattr(self, name).num_features))

    def norms(self, skip_stage: bool) -> list[nn.BatchNorm2d]:
        """The norms of the residual branch, in order: the ``_skip`` twins when the stage is skipped."""
        if not skip_stage:
            return [getattr(self, name) for name in self.norm_names]
        if self.skippable:
            raise ValueError("a skippable block has no _skip norms: it is the identity when its stage is skipped")
        return [getattr(self, name + "_skip") for name in self.norm_names]

    def residual_branch(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, skip_stage: bool = False) -> torch.Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        if self.skippable and skip_stage:
            return x
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.residual_branch(x, skip_stage) + shortcut)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1
    norm_names = ("bn1", "bn2")

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, stage: int, skippable: bool
    ) -> None:
        super().__init__(stage, skippable, downsample)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = SubnetBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = SubnetBatchNorm2d(planes)
        self._add_skip_twins()

    def residual_branch(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        bn1, bn2 = self.norms(skip_stage)
        out = self.relu(bn1(self.conv1(x)))
        return bn2(self.conv2(out))


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (carries the stride, v1.5) -> 1x1 expanding by 4 (ResNet-50/101)."""

    expansion = 4
    norm_names = ("bn1", "bn2", "bn3")

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, stage: int, skippable: bool
    ) -> None:
        super().__init__(stage, skippable, downsample)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = SubnetBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = SubnetBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = SubnetBatchNorm2d(planes * self.expansion)
        self._add_skip_twins()

    def residual_branch(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        bn1, bn2, bn3 = self.norms(skip_stage)
        out = self.relu(bn1(self.conv1(x)))
        out = self.relu(bn2(self.conv2(out)))
        return bn3(self.conv3(out))


class SkippableStage(nn.Sequential):
    """The blocks of one stage; ``forward(x, skip_stage)`` hands the stage's flag to every block."""

    def __init__(self, stage: int, *blocks: nn.Module) -> None:
        super().__init__(*blocks)
        self.stage = stage

    def forward(self, x: torch.Tensor, skip_stage: bool = False) -> torch.Tensor:
        for block in self:
            x = block(x, skip_stage)
        return x


class ResNetADN(ADNModel):
    """ResNet with one skippable stage per residual stage.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, each >= 2 (a stage needs a mandatory and a skippable part).
        num_classes: outputs of ``fc``.
        in_chans: input channels.
        width: channels of the stem and of the first stage (doubling per stage); 64 for ImageNet ResNets.
        small_input: CIFAR-style stem for 28-32 px images (3x3 stride-1 conv, no maxpool) instead of the
            ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 maxpool).

    ``forward(x, skip=None)``: x (N, in_chans, H, W) -> logits (N, num_classes); ``skip`` has one flag per
    stage (None = super-net).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        width: int = 64,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("width", width)):
            check_positive_int(name, value)
        if not layers or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in layers):
            raise ValueError(f"layers must list >= 2 blocks per stage (mandatory + skippable), got {layers!r}")
        self.in_chans = in_chans
        self.num_skippable_stages = len(layers)
        self.input_size = (32, 32) if small_input else (224, 224)  # what macs() counts at by default
        # 3x3 stride-1 stem, two stride-2 stages / 7x7 stride-2 stem, stride-2 maxpool, three stride-2 stages
        self.batch_norm_stride = 2 ** (len(layers) - 1) if small_input else 2 ** (len(layers) + 1)

        if small_input:
            self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = SubnetBatchNorm2d(width)
        self.relu = nn.ReLU()

        inplanes = width
        for k, num_blocks in enumerate(layers):
            planes, stride = width * 2**k, (1 if k == 0 else 2)
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    SubnetBatchNorm2d(planes * block.expansion),
                )
            mandatory = num_mandatory_blocks(num_blocks)
            blocks = [block(inplanes, planes, stride, downsample, stage=k, skippable=False)]
            inplanes = planes * block.expansion
            blocks += [
                block(inplanes, planes, 1, None, stage=k, skippable=i >= mandatory) for i in range(1, num_blocks)
            ]
            setattr(self, f"layer{k + 1}", SkippableStage(k, *blocks))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.attach_subnet_norms()

        # torchvision's initialisation (the Linear keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[SkippableStage]:
        """``[layer1, layer2, ...]``; ``stages[k]`` follows ``skip[k]``."""
        return [getattr(self, f"layer{k + 1}") for k in range(self.num_skippable_stages)]

    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, in_chans, H, W) -> logits (N, num_classes). ``skip``: None/"super", "base", "TFFT", bools."""
        self.check_input(x)
        skip = self.parse_skip(skip)
        with self.running_subnet(skip):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for stage, skip_stage in zip(self.stages, skip):
                x = stage(x, skip_stage)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---- builders ---------------------------------------------------------------------------------
# ``load_upstream_state_dict`` (identity key map) takes the matching torchvision model's state dict for
# the ImageNet nets, or for any net a state dict of the same layout without ``_skip`` keys (e.g. a
# plainly trained baseline), and copies every norm into its ``_skip`` twin.


@register_model
def resnet18_adn(num_classes: int = 1000, in_chans: int = 3) -> ResNetADN:
    """ResNet-18-ADN: BasicBlocks 2,2,2,2 (1/1 mandatory/skippable per stage), 16 sub-networks."""
    return ResNetADN(BasicBlock, [2, 2, 2, 2], num_classes, in_chans)


@register_model
def resnet34_adn(num_classes: int = 1000, in_chans: int = 3) -> ResNetADN:
    """ResNet-34-ADN: BasicBlocks 3,4,6,3 (2/1, 2/2, 3/3, 2/1), 16 sub-networks."""
    return ResNetADN(BasicBlock, [3, 4, 6, 3], num_classes, in_chans)


@register_model
def resnet50_adn(num_classes: int = 1000, in_chans: int = 3) -> ResNetADN:
    """ResNet-50-ADN: Bottlenecks 3,4,6,3 (2/1, 2/2, 3/3, 2/1), 16 sub-networks."""
    return ResNetADN(Bottleneck, [3, 4, 6, 3], num_classes, in_chans)


@register_model
def resnet101_adn(num_classes: int = 1000, in_chans: int = 3) -> ResNetADN:
    """ResNet-101-ADN: Bottlenecks 3,4,23,3 (2/1, 2/2, 12/11, 2/1), 16 sub-networks."""
    return ResNetADN(Bottleneck, [3, 4, 23, 3], num_classes, in_chans)


@register_model
def resnet20_adn(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> ResNetADN:
    """CIFAR-style ResNet-20-ADN for 28-32 px images: BasicBlocks 3,3,3 of width, 2*width, 4*width channels
    (2/1 per stage), 1x1-conv downsample, 8 sub-networks."""
    return ResNetADN(BasicBlock, [3, 3, 3], num_classes, in_chans, width=width, small_input=True)


@register_model
def resnet56_adn(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> ResNetADN:
    """CIFAR-style ResNet-56-ADN: BasicBlocks 9,9,9 (5/4 per stage), 8 sub-networks."""
    return ResNetADN(BasicBlock, [9, 9, 9], num_classes, in_chans, width=width, small_input=True)
