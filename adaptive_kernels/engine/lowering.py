"""Lowering an ADN model to a :class:`~.program.Program` of fused ops.

What is lowered (eval-mode semantics: BatchNorm running statistics, no dropout):

* ResNet-ADN (BasicBlock and Bottleneck, ImageNet and CIFAR stems): every conv + BN (+ ReLU) becomes
  one fused conv; the shortcut add and the block's final ReLU go into the last conv's epilogue, which
  writes the residual stream IN PLACE (the downsample branch's output in the first block of a stage).
* MobileNetV2-ADN: conv + BN + ReLU6 / linear bottleneck, depthwise convs, residual add fused.
* ViT / DeiT-ADN: patch embedding as one linear layer over gathered patches, pre-norm encoder blocks as
  LayerNorm -> QKV linear -> attention -> out-projection (+ residual, in place) -> LayerNorm ->
  fc1 + GELU -> fc2 (+ residual, in place), final LayerNorm on the class token only, head.
* Swin-T-ADN: patch embedding as ViT's (+ LayerNorm); the (N, H, W, C) token map stays in row-major token
  order. A block is LayerNorm -> gather into (shifted) window order -> QKV linear -> attention with a
  precomputed bias (relative position, plus the shift mask per window) -> gather back -> projection
  (+ residual, in place) -> LayerNorm -> fc1 + GELU -> fc2 (+ residual, in place): window partition and
  cyclic shift are one fixed permutation of tokens, and only attention needs window order (the gathers
  are left out where the permutation is the identity). Patch merging = gather of the 2x2 neighbourhoods
  -> LayerNorm (skip-aware) -> reduction linear. Final LayerNorm, mean over tokens, head. Not lowered
  (:class:`NotLoweredError`, the engine then runs the reference): input sizes for which the model pads,
  i.e. a feature map that is not a multiple of the window, or one with an odd side before patch merging.

Skip-aware norms: a conv whose BatchNorm has a ``_skip`` twin gets a 2-row table (row 0 the ``_skip`` set, row 1
the normal one) with ``select_index = stage``, so the stage's mask bit picks the row on the device; a LayerNorm with
a twin gets both sets and ``norm_index = stage``. Each stage's skippable blocks become one :class:`~.program.Body`.

Calibrated models (``model.is_calibrated``: per-sub-network BatchNorm statistics, ``models/calibration.py``): every
conv's BN becomes a table of 2^S rows, row ``j = subnet_index(skip)`` folded from the statistics row j of the norm
sub-network j runs (the ``_skip`` twin when it skips the layer's stage), and ``select_index = S``: the program's mask
gets one more slot after the S stage bits, the sub-network id, so one captured graph still serves every
sub-network. LayerNorm families have no running statistics and lower as without calibration.

BatchNorm folding: ``bn(conv(x) + b) = conv(x) * scale + shift`` with ``scale = gamma / sqrt(var + eps)``
and ``shift = beta + (b - mean) * scale``, computed in float64 and kept in float32 (float64 for a
float64 program) whatever the compute dtype, since the kernels apply them in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..epilogue import Epilogue
from ..models.base import ADNModel
from ..models.mobilenetv2 import ConvNormActivation, InvertedResidual, MobileNetV2ADN
from ..models.resnet import BasicBlock, Bottleneck, ResNetADN, SkippableStage
from ..models.skip import stage_bit
from ..models.swin import PatchMerging, Permute, SwinBlock, SwinStage, SwinTransformerADN, shift_region
from ..models.vit import EncoderBlock, VisionTransformerADN
from .program import (
    Attention,
    Body,
    Conv,
    EmbedTokens,
    Gather,
    LayerNorm,
    Linear,
    LoweringError,
    MaxPool,
    MeanPool,
    Op,
    PatchGather,
    Program,
    ToNHWC,
    Value,
    validate,
)
from .runtime import KernelSet

LOWERED_FAMILIES = (ResNetADN, MobileNetV2ADN, VisionTransformerADN, SwinTransformerADN)


class NotLoweredError(LoweringError):
    """The model is known but this configuration (e.g. an input size for which Swin pads) has no lowering yet;
    the engine falls back to the reference model."""


def fold_batchnorm(
    bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None = None, *, subnet_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` in float64 such that ``bn(y + conv_bias) == y * scale + shift`` in eval mode: (C,) from the
    running statistics, or with ``subnet_rows = 2^S`` (2^S, C) tables, row j from the calibrated statistics of
    sub-network j (``subnet_mean``/``subnet_var``; the running statistics in every row for a norm without them)."""
    if bn.running_mean is None or bn.running_var is None:
        raise LoweringError(f"{bn} has no running statistics (track_running_stats=False): it cannot be folded")
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    if subnet_rows is not None:
        table = getattr(bn, "subnet_mean", None)
        if table is None:
            mean, var = mean.expand(subnet_rows, -1), var.expand(subnet_rows, -1)
        elif table.shape[0] != subnet_rows or bn.subnet_var is None or bn.subnet_var.shape != table.shape:
            raise LoweringError(
                f"{bn}: its calibration tables have shape {tuple(table.shape)}, expected ({subnet_rows}, "
                f"{bn.num_features}) for one row per sub-network: calibrate the model again"
            )
        else:
            mean, var = table.detach().double(), bn.subnet_var.detach().double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    bias = -mean if conv_bias is None else conv_bias.detach().double() - mean
    shift = bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


class _Builder:
    """Collects ops (into the current body, if one is open) and creates values with unique names."""

    def __init__(
        self,
        kernels: KernelSet,
        dtype: torch.dtype,
        device: torch.device,
        split_k: int | str = "auto",
        subnet_id_slot: int | None = None,
    ) -> None:
        self.kernels = kernels
        self.subnet_id_slot = subnet_id_slot  # calibrated model: the mask slot of the sub-network id (= S)
        self.dtype = dtype
        self.device = device
        self.split_k = split_k
        self.workspace: Value | None = None  # the split-K scratch of every conv and linear, made with the first
        self.param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.items: list[Op | Body] = []
        self._body: Body | None = None
        self._names: dict[str, int] = {}

    def value(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Value:
        count = self._names.get(name, 0)
        self._names[name] = count + 1
        return Value(name if count == 0 else f"{name}.{count}", tuple(int(s) for s in shape), dtype)

    def emit(self, op: Op) -> Value:
        (self._body.ops if self._body is not None else self.items).append(op)
        return op.writes()

    @contextmanager
    def body(self, stage: int) -> Iterator[None]:
        if self._body is not None:
            raise LoweringError("skippable bodies cannot nest")
        self._body = Body(stage)
        try:
            yield
        finally:
            body, self._body = self._body, None
        if body.ops:
            self.items.append(body)

    @property
    def in_body(self) -> bool:
        return self._body is not None

    def split_k_of(self, max_split: int) -> tuple[int | str, Value]:
        """The ``split_k`` and the shared workspace for a conv or linear whose K loop allows ``max_split``: "auto",
        or the forced split capped at ``max_split``."""
        if self.workspace is None:
            self.workspace = self.value("split_k_workspace", (), torch.float32)
        return (self.split_k if self.split_k == "auto" else min(self.split_k, max_split)), self.workspace

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().to(self.device, self.dtype).contiguous()

    def vector(self, v: torch.Tensor) -> torch.Tensor:
        return v.detach().to(self.device, self.param_dtype).contiguous()

    # ---- fused ops -----------------------------------------------------------------------
    def conv_bn(
        self,
        x: Value,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        bn_skip: nn.BatchNorm2d | None = None,
        *,
        stage: int = -1,
        activation: str = "none",
        residual: Value | None = None,
        residual_relu: bool = False,
        name: str,
    ) -> Value:
        """conv + folded BN (two sets when ``bn_skip``) + activation (+ residual, written in place)."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise LoweringError(
                f"{name}: expected Conv2d + BatchNorm2d, got {type(conv).__name__} + {type(bn).__name__}"
            )
        h, w, cin = x.shape
        if conv.in_channels != cin or bn.num_features != conv.out_channels:
            raise LoweringError(
                f"{name}: channel mismatch ({cin} in, conv {conv.in_channels}->{conv.out_channels}, "
                f"BN {bn.num_features})"
            )
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.dilation != (1, 1):
            raise LoweringError(
                f"{name}: only zero padding given as numbers and dilation 1 are lowered, got "
                f"padding={conv.padding!r} ({conv.padding_mode}), dilation={conv.dilation}"
            )
        if conv.groups not in (1, cin) or (conv.groups != 1 and conv.out_channels != cin):
            raise LoweringError(f"{name}: groups={conv.groups} is not lowered (only 1 and depthwise)")
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        shape = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, conv.out_channels)
        if residual is not None and residual.shape != shape:
            raise LoweringError(f"{name}: residual {residual} does not match the conv output (N, {shape})")
        split_k, workspace = self.split_k_of(self.kernels.conv2d_max_split_k(cin, (kh, kw), conv.groups))
        scale, shift, select_index = self.bn_tables(bn, bn_skip, stage, conv.bias)
        in_place = residual is not None
        epilogue = Epilogue(
            scale=scale,
            shift=shift,
            select_index=select_index,
            activation=activation,
            residual=residual,
            residual_relu=residual_relu,
            in_place=in_place,
        )
        return self.emit(
            Conv(
                x=x,
                out=residual if in_place else self.value(name, shape),
                weight=self.kernels.prepare_conv_weight(self.weight(conv.weight)),
                kernel_size=(kh, kw),
                stride=(sh, sw),
                padding=(ph, pw),
                groups=conv.groups,
                epilogue=epilogue,
                split_k=split_k,
                workspace=workspace,
            )
        )

    def bn_tables(
        self, bn: nn.BatchNorm2d, bn_skip: nn.BatchNorm2d | None, stage: int, conv_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(scale, shift, select_index) of a conv's folded BN (see the module docstring): (C,) and -1 for a plain
        norm; (2, C) [``_skip`` set, normal set] and the stage for a skip-aware one; (2^S, C) and the sub-network id
        slot in a calibrated model, row j folded from the norm sub-network j runs (``bn_skip`` where j skips
        ``stage``), with that norm's statistics row j."""
        if self.subnet_id_slot is None:
            scale, shift = fold_batchnorm(bn, conv_bias)
            if bn_skip is None:
                return self.vector(scale), self.vector(shift), -1
            scale_skip, shift_skip = fold_batchnorm(bn_skip, conv_bias)
            return self.vector(torch.stack([scale_skip, scale])), self.vector(torch.stack([shift_skip, shift])), stage
        num_stages = self.subnet_id_slot
        scale, shift = fold_batchnorm(bn, conv_bias, subnet_rows=2**num_stages)
        if bn_skip is not None:
            scale_skip, shift_skip = fold_batchnorm(bn_skip, conv_bias, subnet_rows=2**num_stages)
            rows = torch.arange(scale.shape[0], device=scale.device)
            skipped = ((rows & stage_bit(stage, num_stages)) != 0)[:, None]  # the sub-networks that skip ``stage``
            scale, shift = torch.where(skipped, scale_skip, scale), torch.where(skipped, shift_skip, shift)
        return self.vector(scale), self.vector(shift), self.subnet_id_slot

    def linear(
        self,
        x: Value,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        activation: str = "none",
        residual: Value | None = None,
        name: str,
    ) -> Value:
        """``act(x @ weight.T + bias) (+ residual, in place)`` over x's last dim."""
        if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
            raise LoweringError(
                f"{name}: weight {tuple(weight.shape)} does not take inputs with {x.shape[-1]} features"
            )
        shape = (*x.shape[:-1], weight.shape[0])
        if residual is not None and residual.shape != shape:
            raise LoweringError(f"{name}: residual {residual} does not match the output (N, {shape})")
        split_k, workspace = self.split_k_of(self.kernels.linear_max_split_k(weight.shape[1]))
        in_place = residual is not None
        epilogue = Epilogue(
            shift=None if bias is None else self.vector(bias),
            activation=activation,
            residual=residual,
            in_place=in_place,
        )
        return self.emit(
            Linear(
                x=x,
                out=residual if in_place else self.value(name, shape),
                weight=self.weight(weight),
                epilogue=epilogue,
                split_k=split_k,
                workspace=workspace,
            )
        )

    def gather(self, x: Value, index: torch.Tensor, shape: tuple[int, ...], *, name: str) -> Value:
        """Rows of x (of x.shape[-1] features) in the order ``index`` (host int tensor) -> a value of ``shape``."""
        c = x.shape[-1]
        rows = 1
        for s in x.shape[:-1]:
            rows *= s
        size = 1
        for s in shape:
            size *= s
        if index.dim() != 1 or index.numel() * c != size:
            raise LoweringError(f"{name}: {index.numel()} rows of {c} features do not fill the output (N, {shape})")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
            raise LoweringError(f"{name}: gather index outside the {rows} rows of {x}")
        return self.emit(Gather(x, self.value(name, shape), index.to(self.device, torch.int32).contiguous()))

    def layer_norm(
        self,
        x: Value,
        ln: nn.LayerNorm,
        ln_skip: nn.LayerNorm | None = None,
        *,
        stage: int = -1,
        first_token: bool = False,
        name: str,
    ) -> Value:
        """LayerNorm over x's last dim (both parameter sets when ``ln_skip``)."""
        c = x.shape[-1]
        for norm in (ln, ln_skip):
            if norm is None:
                continue
            if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (c,):
                raise LoweringError(f"{name}: expected LayerNorm({c}), got {norm}")
            if ln_skip is not None and norm.eps != ln.eps:
                raise LoweringError(f"{name}: the norm and its _skip twin use different eps")

        def params(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
            weight = norm.weight if norm.weight is not None else torch.ones(c)
            bias = norm.bias if norm.bias is not None else torch.zeros(c)
            return self.vector(weight), self.vector(bias)

        weight, bias = params(ln)
        weight_skip, bias_skip = params(ln_skip) if ln_skip is not None else (None, None)
        shape = (c,) if first_token else x.shape
        return self.emit(
            LayerNorm(
                x=x,
                out=self.value(name, shape),
                weight=weight,
                bias=bias,
                weight_skip=weight_skip,
                bias_skip=bias_skip,
                eps=float(ln.eps),
                norm_index=stage if ln_skip is not None else -1,
                first_token=first_token,
            )
        )


def _twin(module: nn.Module, name: str) -> nn.Module | None:
    """The ``_skip`` twin of ``module.<name>`` (None in skippable layers, which have one set)."""
    return getattr(module, name + "_skip", None)


def _stage_blocks(stage: nn.Module, name: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """Split a stage into (mandatory blocks, skippable blocks); the skippable ones must come last."""
    blocks = list(stage)
    flags = [bool(getattr(b, "skippable", False)) for b in blocks]
    first = flags.index(True) if True in flags else len(flags)
    if not all(flags[first:]):
        raise LoweringError(f"{name}: skippable blocks must form the end of the stage, got skippable={flags}")
    return blocks[:first], blocks[first:]


def _lower_stage(
    b: _Builder, stage: nn.Module, x: Value, name: str, lower_block: Callable[[_Builder, nn.Module, Value, str], Value]
) -> Value:
    """A stage's mandatory blocks, then its skippable blocks inside the body of ``stage.stage``."""
    mandatory, skippable = _stage_blocks(stage, name)
    h = x
    for i, block in enumerate(mandatory):
        h = lower_block(b, block, h, f"{name}.{i}")
    with b.body(stage.stage):
        for i, block in enumerate(skippable, start=len(mandatory)):
            h = lower_block(b, block, h, f"{name}.{i}")
    return h


# ---- ResNet ---------------------------------------------------------------------------------------
def _lower_resnet_block(b: _Builder, block: nn.Module, x: Value, name: str) -> Value:
    stage = block.stage
    if not isinstance(block, (BasicBlock, Bottleneck)):
        raise LoweringError(f"{name}: {type(block).__name__} is not a ResNet BasicBlock/Bottleneck")
    if not isinstance(block.relu, nn.ReLU):
        raise LoweringError(f"{name}: only ReLU activations are lowered")
    shortcut = x
    if block.downsample is not None:
        ds = block.downsample
        if not (isinstance(ds, nn.Sequential) and len(ds) == 2):
            raise LoweringError(f"{name}.downsample: expected Sequential(Conv2d, BatchNorm2d), got {ds}")
        shortcut = b.conv_bn(x, ds[0], ds[1], name=f"{name}.downsample")
    convs = ["conv1", "conv2"] + (["conv3"] if isinstance(block, Bottleneck) else [])
    h = x
    for i, conv in enumerate(convs):
        norm = f"bn{i + 1}"
        last = i == len(convs) - 1
        h = b.conv_bn(
            h,
            getattr(block, conv),
            getattr(block, norm),
            _twin(block, norm),
            stage=stage,
            activation="none" if last else "relu",
            residual=shortcut if last else None,
            residual_relu=last,
            name=f"{name}.{conv}",
        )
    return h


def _lower_resnet(b: _Builder, model: ResNetADN, x: Value) -> Value:
    h = b.emit(ToNHWC(x, b.value("input_nhwc", (x.shape[1], x.shape[2], x.shape[0]))))
    h = b.conv_bn(h, model.conv1, model.bn1, activation="relu", name="conv1")
    if isinstance(model.maxpool, nn.MaxPool2d):
        mp = model.maxpool
        if (
            mp.dilation not in (1, (1, 1))
            or mp.ceil_mode
            or not all(isinstance(v, int) for v in (mp.kernel_size, mp.stride, mp.padding))
        ):
            raise LoweringError(f"maxpool: only square, dilation-1, floor-mode pooling is lowered, got {mp}")
        hh, ww, c = h.shape
        size = (
            (hh + 2 * mp.padding - mp.kernel_size) // mp.stride + 1,
            (ww + 2 * mp.padding - mp.kernel_size) // mp.stride + 1,
            c,
        )
        h = b.emit(MaxPool(h, b.value("maxpool", size), mp.kernel_size, mp.stride, mp.padding))
    elif not isinstance(model.maxpool, nn.Identity):
        raise LoweringError(f"maxpool: expected MaxPool2d or Identity, got {model.maxpool}")
    for k, stage in enumerate(model.stages):
        name = f"layer{k + 1}"
        if not isinstance(stage, SkippableStage):
            raise LoweringError(f"{name}: expected a SkippableStage, got {type(stage).__name__}")
        h = _lower_stage(b, stage, h, name, _lower_resnet_block)
    pooled = b.emit(MeanPool(h, b.value("avgpool", (h.shape[-1],))))
    return b.linear(pooled, model.fc.weight, model.fc.bias, name="fc")


# ---- MobileNetV2 ----------------------------------------------------------------------------------
def _lower_conv_norm_act(b: _Builder, layer: nn.Module, x: Value, name: str, residual: Value | None = None) -> Value:
    if not isinstance(layer, ConvNormActivation):
        raise LoweringError(f"{name}: expected ConvNormActivation, got {type(layer).__name__}")
    act = layer.activation_layer
    if act is not None and not isinstance(act, nn.ReLU6):
        raise LoweringError(f"{name}: only ReLU6 (or no activation) is lowered, got {act}")
    return b.conv_bn(
        x,
        layer.conv_layer,
        layer.norm,
        _twin(layer, "norm"),
        stage=layer.stage,
        activation="relu6" if act is not None else "none",
        residual=residual,
        name=name,
    )


def _lower_inverted_residual(b: _Builder, block: nn.Module, x: Value, name: str) -> Value:
    if not isinstance(block, InvertedResidual):
        raise LoweringError(f"{name}: expected InvertedResidual, got {type(block).__name__}")
    h = x
    layers = list(block.conv)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        h = _lower_conv_norm_act(
            b, layer, h, f"{name}.conv.{i}", residual=x if last and block.use_res_connect else None
        )
    return h


def _lower_mobilenetv2(b: _Builder, model: MobileNetV2ADN, x: Value) -> Value:
    h = b.emit(ToNHWC(x, b.value("input_nhwc", (x.shape[1], x.shape[2], x.shape[0]))))
    for i, module in enumerate(model.features):
        name = f"features.{i}"
        if isinstance(module, ConvNormActivation):
            h = _lower_conv_norm_act(b, module, h, name)
        elif isinstance(module, InvertedResidual):
            h = _lower_inverted_residual(b, module, h, name)
        elif isinstance(module, SkippableStage):
            h = _lower_stage(b, module, h, name, _lower_inverted_residual)
        else:
            raise LoweringError(f"{name}: {type(module).__name__} is not lowered")
    pooled = b.emit(MeanPool(h, b.value("avgpool", (h.shape[-1],))))
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    others = [m for m in model.classifier if not isinstance(m, (nn.Linear, nn.Dropout))]
    if len(linears) != 1 or others:
        raise LoweringError(f"classifier: expected Dropout + one Linear, got {model.classifier}")
    return b.linear(pooled, linears[0].weight, linears[0].bias, name="classifier")


# ---- transformers ---------------------------------------------------------------------------------
def _mlp_linears(mlp: nn.Module, name: str) -> tuple[nn.Linear, nn.Linear]:
    """(fc1, fc2) of a transformer MLP that is Linear, GELU (erf form), Linear, with Dropouts anywhere."""
    layers = list(mlp)
    fcs = [m for m in layers if isinstance(m, nn.Linear)]
    acts = [m for m in layers if not isinstance(m, (nn.Linear, nn.Dropout))]
    if (
        len(fcs) != 2
        or len(acts) != 1
        or not isinstance(acts[0], nn.GELU)
        or acts[0].approximate != "none"
        or layers.index(fcs[0]) > layers.index(acts[0])
        or layers.index(acts[0]) > layers.index(fcs[1])
    ):
        raise LoweringError(f"{name}: expected Linear, GELU (erf), Linear (and Dropouts), got {mlp}")
    return fcs[0], fcs[1]


# ---- ViT ------------------------------------------------------------------------------------------
def _lower_encoder_block(b: _Builder, block: nn.Module, tokens: Value, name: str) -> Value:
    if not isinstance(block, EncoderBlock):
        raise LoweringError(f"{name}: expected EncoderBlock, got {type(block).__name__}")
    mha = block.self_attention
    d = tokens.shape[-1]
    if (
        not isinstance(mha, nn.MultiheadAttention)
        or not mha.batch_first
        or not mha._qkv_same_embed_dim
        or mha.in_proj_bias is None
        or mha.bias_k is not None
        or mha.add_zero_attn
    ):
        raise LoweringError(
            f"{name}.self_attention: only batch_first MultiheadAttention with a packed, biased "
            f"in-projection (no bias_k/v, no zero attention) is lowered"
        )
    fc1, fc2 = _mlp_linears(block.mlp, f"{name}.mlp")
    stage = block.stage
    # SDPA allocates its result: fine in the main capture, not inside an IF body (see program.py).
    backend = "triton" if b.in_body else "sdpa"
    h = b.layer_norm(tokens, block.ln_1, _twin(block, "ln_1"), stage=stage, name=f"{name}.ln_1")
    qkv = b.linear(h, mha.in_proj_weight, mha.in_proj_bias, name=f"{name}.qkv")
    a = b.emit(Attention(qkv, b.value(f"{name}.attention", tokens.shape), mha.num_heads, backend))
    tokens = b.linear(a, mha.out_proj.weight, mha.out_proj.bias, residual=tokens, name=f"{name}.out_proj")
    h = b.layer_norm(tokens, block.ln_2, _twin(block, "ln_2"), stage=stage, name=f"{name}.ln_2")
    h = b.linear(h, fc1.weight, fc1.bias, activation="gelu", name=f"{name}.fc1")
    if fc1.out_features != fc2.in_features or fc2.out_features != d:
        raise LoweringError(f"{name}.mlp: shapes {fc1} -> {fc2} do not map {d} features back to {d}")
    return b.linear(h, fc2.weight, fc2.bias, residual=tokens, name=f"{name}.fc2")


def _lower_vit(b: _Builder, model: VisionTransformerADN, x: Value) -> Value:
    c, hh, ww = x.shape
    p = model.patch_size
    proj = model.conv_proj
    if (
        proj.kernel_size != (p, p)
        or proj.stride != (p, p)
        or proj.padding != (0, 0)
        or proj.groups != 1
        or hh % p
        or ww % p
    ):
        raise LoweringError(f"conv_proj: expected a {p}x{p} stride-{p} patch embedding dividing the {hh}x{ww} input")
    seq = (hh // p) * (ww // p)
    d = model.hidden_dim
    pos = model.encoder.pos_embedding.detach()
    if tuple(pos.shape) != (1, seq + 1, d):
        raise LoweringError(f"encoder.pos_embedding has shape {tuple(pos.shape)}, expected (1, {seq + 1}, {d})")
    patches = b.emit(PatchGather(x, b.value("patches", (seq, c * p * p)), p))
    emb = b.linear(patches, proj.weight.reshape(d, -1), proj.bias, name="conv_proj")
    cls_pos = model.class_token.detach().reshape(d) + pos[0, 0]
    tokens = b.emit(EmbedTokens(emb, b.value("tokens", (seq + 1, d)), b.weight(cls_pos), b.weight(pos[0, 1:])))
    layers = list(model.encoder.layers)
    for i, block in enumerate(layers):
        name = f"encoder.layers.encoder_layer_{i}"
        if block.skippable:
            with b.body(block.stage):
                tokens = _lower_encoder_block(b, block, tokens, name)
        else:
            tokens = _lower_encoder_block(b, block, tokens, name)
    cls = b.layer_norm(tokens, model.encoder.ln, first_token=True, name="encoder.ln")
    heads = list(model.heads)
    if len(heads) != 1 or not isinstance(heads[0], nn.Linear):
        raise LoweringError(f"heads: expected one Linear (no pre-logits layer), got {model.heads}")
    return b.linear(cls, heads[0].weight, heads[0].bias, name="heads.head")


# ---- Swin -----------------------------------------------------------------------------------------
def _window_order(hh: int, ww: int, ws: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """(hh*ww,) token ids in the order the model's attention sees them: cyclic shift by (-shift_h, -shift_w),
    then windows of ws x ws in row-major order, tokens row-major inside each window."""
    ids = torch.arange(hh * ww).view(hh, ww).roll(shifts=(-shift_h, -shift_w), dims=(0, 1))
    return ids.view(hh // ws, ws, ww // ws, ws).permute(0, 2, 1, 3).reshape(-1)


def _window_bias(attn: nn.Module, hh: int, ww: int, shift_h: int, shift_w: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias of one block, as the model builds it (in ``dtype``): the relative-position
    bias (heads, L, L), L = ws*ws; with a shift, plus -100 between tokens of different shift regions, per
    window: (nW, heads, L, L)."""
    ws, heads = attn.window_size, attn.num_heads
    length = ws * ws
    table = attn.relative_position_bias_table.detach().to(dtype)
    bias = table[attn.relative_position_index].view(length, length, heads).permute(2, 0, 1)
    if shift_h == 0 and shift_w == 0:
        return bias.contiguous()
    device = table.device
    rows, cols = shift_region(hh, ws, shift_h, device), shift_region(ww, ws, shift_w, device)
    gh, gw = hh // ws, ww // ws
    region = (rows[:, None] * 3 + cols[None, :]).view(gh, ws, gw, ws).permute(0, 2, 1, 3).reshape(gh * gw, length)
    mask = (region[:, None, :] != region[:, :, None]).to(dtype) * -100.0
    return (bias[None] + mask[:, None]).contiguous()


def _lower_swin_block(b: _Builder, block: nn.Module, tokens: Value, name: str) -> Value:
    if not isinstance(block, SwinBlock):
        raise LoweringError(f"{name}: expected SwinBlock, got {type(block).__name__}")
    attn = block.attn
    hh, ww, d = tokens.shape
    ws, heads = attn.window_size, attn.num_heads
    if hh % ws or ww % ws:
        raise NotLoweredError(
            f"{name}: the {hh}x{ww} feature map is not a multiple of the {ws}x{ws} window, and Swin's window padding "
            f"is not lowered: use an image size that gives multiples of the window at every stage (e.g. 224x224 "
            f"for window 7 and patch 4)"
        )
    for layer, shape in ((attn.qkv, (3 * d, d)), (attn.proj, (d, d))):
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != shape:
            raise LoweringError(
                f"{name}.attn: expected qkv Linear({d}, {3 * d}) and proj Linear({d}, {d}), got {layer}"
            )
    if d % heads:
        raise LoweringError(f"{name}.attn: {heads} heads do not divide {d} features")
    fc1, fc2 = _mlp_linears(block.mlp, f"{name}.mlp")
    if fc1.in_features != d or fc1.out_features != fc2.in_features or fc2.out_features != d:
        raise LoweringError(f"{name}.mlp: shapes {fc1} -> {fc2} do not map {d} features back to {d}")
    # the model's rule: no shift along a side that one window covers
    _, _, shift_h, shift_w = attn.padded_size(hh, ww)
    order = _window_order(hh, ww, ws, shift_h, shift_w)
    in_order = torch.equal(order, torch.arange(order.numel()))
    length = ws * ws
    windows = (hh * ww // length, length, d)  # (nW, L, d): sequence b of the attention batch is window b % nW
    stage = block.stage
    # SDPA allocates its result: fine in the main capture, not inside an IF body (see program.py).
    backend = "triton" if b.in_body else "sdpa"
    bias = _window_bias(attn, hh, ww, shift_h, shift_w, b.param_dtype)

    h = b.layer_norm(tokens, block.norm1, _twin(block, "norm1"), stage=stage, name=f"{name}.norm1")
    if not in_order:
        h = b.gather(h, order, windows, name=f"{name}.windows")
    qkv = b.linear(h, attn.qkv.weight, attn.qkv.bias, name=f"{name}.attn.qkv")
    out = b.value(f"{name}.attn", qkv.shape[:-1] + (d,))
    a = b.emit(Attention(qkv, out, heads, backend, bias=b.weight(bias), seq_len=length))
    if not in_order:
        a = b.gather(a, torch.argsort(order), tokens.shape, name=f"{name}.tokens")
    tokens = b.linear(a, attn.proj.weight, attn.proj.bias, residual=tokens, name=f"{name}.attn.proj")
    h = b.layer_norm(tokens, block.norm2, _twin(block, "norm2"), stage=stage, name=f"{name}.norm2")
    h = b.linear(h, fc1.weight, fc1.bias, activation="gelu", name=f"{name}.mlp.0")
    return b.linear(h, fc2.weight, fc2.bias, residual=tokens, name=f"{name}.mlp.3")


def _lower_patch_merging(b: _Builder, merge: PatchMerging, x: Value, name: str) -> Value:
    hh, ww, c = x.shape
    if hh % 2 or ww % 2:
        raise NotLoweredError(
            f"{name}: patch merging of the {hh}x{ww} feature map pads its odd side, which is not lowered: use an "
            f"image size that keeps every merged feature map even"
        )
    if not isinstance(merge.reduction, nn.Linear) or merge.reduction.in_features != 4 * c:
        raise LoweringError(f"{name}.reduction: expected Linear({4 * c}, ...), got {merge.reduction}")
    ids = torch.arange(hh * ww).view(hh, ww)
    # the model's channel blocks: (even row, even col), (odd, even), (even, odd), (odd, odd)
    index = torch.stack([ids[0::2, 0::2], ids[1::2, 0::2], ids[0::2, 1::2], ids[1::2, 1::2]], dim=-1).reshape(-1)
    h = b.gather(x, index, (hh // 2, ww // 2, 4 * c), name=f"{name}.merge")
    h = b.layer_norm(h, merge.norm, _twin(merge, "norm"), stage=merge.stage, name=f"{name}.norm")
    return b.linear(h, merge.reduction.weight, merge.reduction.bias, name=f"{name}.reduction")


def _lower_swin(b: _Builder, model: SwinTransformerADN, x: Value) -> Value:
    c, hh, ww = x.shape
    p = model.patch_size
    pre = list(model.pre)
    if len(pre) != 3 or not isinstance(pre[1], Permute) or tuple(pre[1].dims) != (0, 2, 3, 1):
        raise LoweringError(f"pre: expected Conv2d, Permute((0, 2, 3, 1)), LayerNorm, got {model.pre}")
    proj = pre[0]
    if (
        not isinstance(proj, nn.Conv2d)
        or proj.kernel_size != (p, p)
        or proj.stride != (p, p)
        or proj.padding != (0, 0)
        or proj.dilation != (1, 1)
        or proj.groups != 1
    ):
        raise LoweringError(f"pre.0: expected a {p}x{p} stride-{p} patch embedding without padding, got {proj}")
    d = proj.out_channels
    patches = b.emit(PatchGather(x, b.value("patches", (hh // p, ww // p, c * p * p)), p))
    h = b.linear(patches, proj.weight.reshape(d, -1), proj.bias, name="pre.0")
    h = b.layer_norm(h, pre[2], name="pre.2")
    for i, layer in enumerate(model.features):
        name = f"features.{i}"
        if isinstance(layer, PatchMerging):
            h = _lower_patch_merging(b, layer, h, name)
        elif isinstance(layer, SwinStage):
            h = _lower_stage(b, layer, h, name, _lower_swin_block)
        else:
            raise LoweringError(f"{name}: {type(layer).__name__} is not lowered")
    h = b.layer_norm(h, model.norm, name="norm")
    pooled = b.emit(MeanPool(h, b.value("avgpool", (h.shape[-1],))))
    return b.linear(pooled, model.head.weight, model.head.bias, name="head")


_LOWERINGS = {
    ResNetADN: _lower_resnet,
    MobileNetV2ADN: _lower_mobilenetv2,
    VisionTransformerADN: _lower_vit,
    SwinTransformerADN: _lower_swin,
}


@torch.no_grad()
def lower(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    kernels: KernelSet,
    dtype: torch.dtype,
    device: torch.device | str,
    split_k: int | str = "auto",
) -> Program:
    """Lower ``model`` for inputs of shape ``(batch, *input_shape)`` = (N, C, H, W).

    Parameters are folded (per sub-network when ``model.is_calibrated``; the program's mask then has the sub-network
    id slot, ``Program.subnet_id_slot``), cast to ``dtype`` (norm scales/shifts: fp32, or fp64 for an fp64 program),
    moved to ``device`` and prepared for ``kernels``. The result is validated (see program.py).
    ``split_k``: "auto" (each conv and linear kernel decides; see kernels.split_k) or an int >= 1 forcing that split-K
    on every groups=1 conv and every linear, capped at what each one's K loop allows (``kernels.conv2d_max_split_k``,
    ``kernels.linear_max_split_k``; for tests and experiments).
    Raises :class:`LoweringError` (a ValueError) for anything outside the lowered families, or
    :class:`NotLoweredError` for an input size the lowering does not cover (Swin sizes that need padding).
    """
    family = next((f for f in LOWERED_FAMILIES if isinstance(model, f)), None)
    if family is None:
        names = ", ".join(f.__name__ for f in LOWERED_FAMILIES)
        kind = "an ADN model" if isinstance(model, ADNModel) else "not an ADN model"
        raise LoweringError(
            f"cannot lower {type(model).__name__} ({kind}): the engine lowers {names} (and "
            f"their subclasses built by adaptive_kernels.create_model)"
        )
    if len(input_shape) != 3 or input_shape[0] != model.in_chans:
        raise LoweringError(
            f"input shape (N, {', '.join(map(str, input_shape))}) does not match the model's "
            f"(N, {model.in_chans}, H, W)"
        )
    if split_k != "auto" and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k={split_k!r}: use 'auto' or an int >= 1")
    # a calibrated model's BN tables are selected by the sub-network id, one mask slot after the stage bits
    subnet_id_slot = model.num_skippable_stages if model.is_calibrated else None
    b = _Builder(kernels, dtype, torch.device(device), split_k, subnet_id_slot)
    x = b.value("input", tuple(input_shape))
    out = _LOWERINGS[family](b, model, x)
    program = Program(
        b.items,
        x,
        out,
        model.num_skippable_stages,
        kernels,
        dtype,
        type(model).__name__,
        workspace=b.workspace,
        subnet_id_slot=subnet_id_slot,
    )
    stages = [body.stage for body in program.bodies()]
    if sorted(stages) != list(range(model.num_skippable_stages)):
        raise LoweringError(
            f"expected one skippable body per stage 0..{model.num_skippable_stages - 1}, got stages {stages}"
        )
    validate(program)
    return program
