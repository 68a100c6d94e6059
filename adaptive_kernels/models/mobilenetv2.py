"""MobileNetV2-ADN: MobileNetV2 whose five multi-block stages end in a skippable sub-path.

Layout — the authors' release (github.com/wchkang/depth, ``models/mobilenetv2.py`` and ``models/misc.py``),
NOT torchvision's, so the authors' checkpoints load with a plain ``load_state_dict``. Every conv-BN(-ReLU6)
is one ``ConvNormActivation`` with ``conv_layer``, ``norm`` and, unless it sits in a skippable block,
``norm_skip``; multi-block stages are nested one level deeper::

    features.0                  stem 3x3/2 conv 3 -> 32                               follows skip[0]
    features.1                  inverted residual t=1, 32 -> 16 (n=1, not skippable)  follows skip[0]
    features.2 .. features.6    stages n=2,3,4,3,3 (24, 32, 64, 96, 160 ch)           follow skip[0..4]
      features.K.i              block i; skippable if i >= (n + 1) // 2 (1/1, 2/1, 2/2, 2/1, 2/1)
        .conv.0 / .conv.1 / .conv.2   pw expand (ReLU6) / dw 3x3 (ReLU6) / pw-linear (no activation)
    features.7                  inverted residual 160 -> 320 (n=1, not skippable)     follows skip[4]
    features.8                  1x1 conv 320 -> 1280                                  follows skip[4]
    classifier.0 / .1           dropout / linear

(features.1 has no expansion, so its conv.0 is the dw and conv.1 the pw-linear conv.) When a stage's flag is
True its skippable blocks are the identity and every other layer following that flag normalises with
``norm_skip``. torchvision's ``mobilenet_v2`` state dict (features.0..18, ``conv.0.0``, ``conv.2`` = conv,
``conv.3`` = BN, ...) is mapped onto this layout by ``load_upstream_state_dict``.

Unlike the authors' code, which ran the base-net when no ``skip`` was given, ``forward(x)`` with
``skip=None`` runs the super-net, as every model of this package does.

Every block and conv-norm-act exposes ``stage: int`` (its index into the skip tuple), ``skippable: bool``
and ``forward(x, skip_stage)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ADNModel, check_positive_int, check_probability
from .norms import SubnetBatchNorm2d
from .registry import register_model
from .resnet import SkippableStage
from .skip import SkipLike

# t (expansion), c (output channels), n (blocks), s (stride of the first block): torchvision's table.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` but not more than 10% down (torchvision's
    channel rounding, so ``width_mult`` gives torchvision's widths)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Module):
    """conv -> BN (``norm``, or ``norm_skip`` when the stage is skipped) -> optional ReLU6.

    x: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
        *,
        stage: int,
        skippable: bool,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.skippable = skippable
        self.conv_layer = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.norm = SubnetBatchNorm2d(out_channels)
        if not skippable:
            self.norm_skip = SubnetBatchNorm2d(out_channels)
        self.activation_layer = nn.ReLU6() if activation else None

    def forward(self, x: torch.Tensor, skip_stage: bool = False) -> torch.Tensor:
        if skip_stage and self.skippable:
            raise ValueError("a layer of a skippable block has no norm_skip: the block is skipped, not run")
        x = self.conv_layer(x)
        x = self.norm_skip(x) if skip_stage else self.norm(x)
        return x if self.activation_layer is None else self.activation_layer(x)


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 linear, plus the input when stride 1 and channels match.

    x: (N, inp, H, W) -> (N, oup, H / stride, W / stride).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, *, stage: int, skippable: bool) -> None:
        super().__init__()
        self.stage = stage
        self.skippable = skippable
        self.use_res_connect = stride == 1 and inp == oup
        if skippable and not self.use_res_connect:
            raise ValueError("a skippable block must keep the shape of its input (stride 1, inp == oup)")
        hidden = round(inp * expand_ratio)
        flags = {"stage": stage, "skippable": skippable}
        layers = [ConvNormActivation(inp, hidden, 1, **flags)] if expand_ratio != 1 else []
        layers += [
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, **flags),
            ConvNormActivation(hidden, oup, 1, activation=False, **flags),
        ]
        # A ModuleList (not Sequential) because each layer needs the flag; the names are the same: conv.0 ...
        self.conv = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, skip_stage: bool = False) -> torch.Tensor:
        if self.skippable and skip_stage:
            return x
        out = x
        for layer in self.conv:
            out = layer(out, skip_stage)
        return x + out if self.use_res_connect else out


class SkipAwareFeatures(nn.Sequential):
    """``features``: runs each child with the flag of the stage it follows, ``skip[child.stage]``."""

    def forward(self, x: torch.Tensor, skip: tuple[bool, ...]) -> torch.Tensor:
        for module in self:
            x = module(x, skip[module.stage])
        return x


class MobileNetV2ADN(ADNModel):
    """MobileNetV2 with 5 skippable stages (32 sub-networks).

    Args:
        num_classes: outputs of the classifier.
        in_chans: input channels.
        width_mult: channel multiplier, as torchvision's ``width_mult``.
        dropout: dropout before the classifier.

    ``forward(x, skip=None)``: x (N, in_chans, H, W) -> logits (N, num_classes); ``skip`` has 5 flags
    (None = super-net).
    """

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans)):
            check_positive_int(name, value)
        if not isinstance(width_mult, (int, float)) or width_mult <= 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        check_probability("dropout", dropout)
        self.in_chans = in_chans
        self.num_skippable_stages = sum(n >= 2 for _, _, n, _ in INVERTED_RESIDUAL_SETTING)
        last = self.num_skippable_stages - 1  # the flag of the n=1 stage and the conv after the last stage
        self.batch_norm_stride = 2 * math.prod(s for *_, s in INVERTED_RESIDUAL_SETTING)  # the stem, then 16

        # torchvision key prefix -> our module prefix, for load_upstream_state_dict.
        self._upstream_prefixes: dict[str, str] = {}
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormActivation(in_chans, channels, 3, 2, stage=0, skippable=False)]
        self._map_conv_norm_act("features.0.0", "features.0.1", "features.0")
        tv_index, stage = 1, 0  # torchvision's flat feature index; the next multi-block stage's flag
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(c * width_mult)
            blocks = []
            for i in range(n):
                block_stage = stage if n >= 2 else min(stage, last)
                skippable = n >= 2 and i >= (n + 1) // 2
                block = InvertedResidual(
                    channels, out_channels, s if i == 0 else 1, t, stage=block_stage, skippable=skippable
                )
                ours = f"features.{len(features)}" + (f".{i}" if n >= 2 else "")
                self._map_inverted_residual(f"features.{tv_index}", ours, len(block.conv))
                blocks.append(block)
                channels, tv_index = out_channels, tv_index + 1
            if n >= 2:
                features.append(SkippableStage(stage, *blocks))
                stage += 1
            else:
                features.append(blocks[0])
        self._map_conv_norm_act(f"features.{tv_index}.0", f"features.{tv_index}.1", f"features.{len(features)}")
        features.append(ConvNormActivation(channels, last_channels, 1, stage=last, skippable=False))
        self.features = SkipAwareFeatures(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channels, num_classes))
        self.attach_subnet_norms()

        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _map_conv_norm_act(self, tv_conv: str, tv_norm: str, ours: str) -> None:
        self._upstream_prefixes[tv_conv] = f"{ours}.conv_layer"
        self._upstream_prefixes[tv_norm] = f"{ours}.norm"

    def _map_inverted_residual(self, tv: str, ours: str, num_layers: int) -> None:
        # torchvision nests all but the last conv-BN as conv.L.0 / conv.L.1; the pw-linear conv and its BN
        # are flat: conv.L / conv.{L+1}.
        for layer in range(num_layers - 1):
            self._map_conv_norm_act(f"{tv}.conv.{layer}.0", f"{tv}.conv.{layer}.1", f"{ours}.conv.{layer}")
        layer = num_layers - 1
        self._map_conv_norm_act(f"{tv}.conv.{layer}", f"{tv}.conv.{layer + 1}", f"{ours}.conv.{layer}")

    def _upstream_key(self, key: str) -> str:
        # Keys we do not know stay as they are, so load_upstream_state_dict reports them as unexpected.
        prefix, _, leaf = key.rpartition(".")
        return f"{self._upstream_prefixes.get(prefix, prefix)}.{leaf}"

    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, in_chans, H, W) -> logits (N, num_classes). ``skip``: None/"super", "base", "TFTFT", bools."""
        self.check_input(x)
        skip = self.parse_skip(skip)
        with self.running_subnet(skip):
            x = self.features(x, skip)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model
def mobilenet_v2_adn(
    num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2ADN:
    """MobileNetV2-ADN (authors' layout, 5 skippable stages, 32 sub-networks); ``skip=None`` = super-net."""
    return MobileNetV2ADN(num_classes, in_chans, width_mult, dropout)
