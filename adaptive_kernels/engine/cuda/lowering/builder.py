"""What every family's lowering shares: the :class:`Builder` that collects fused ops, BatchNorm folding, stage
helpers, and the registry of family lowerings (``@register_lowering(ModelClass)`` in ``lowering/<family>.py``).

Skip-aware norms: a conv whose BatchNorm has a ``_skip`` twin gets a 2-row table (row 0 the ``_skip`` set, row 1
the normal one) with ``select_index = stage``, so the stage's mask bit picks the row on the device; a LayerNorm with
a twin gets both sets and ``norm_index = stage``. Each stage's skippable blocks become one :class:`~..program.Body`.

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

from ....kernels.backend import Epilogue, KernelSet
from ....models.skip import stage_bit
from ..ops import Conv, Gather, LayerNorm, Linear
from ..program import Body, LoweringError, Op, Value

#: a family's lowering: (builder, model, input Value (N, C, H, W)) -> the logits Value
FamilyLowering = Callable[["Builder", nn.Module, Value], Value]
#: model class -> its lowering (``register_lowering``); subclasses of a registered class use it too
LOWERINGS: dict[type[nn.Module], FamilyLowering] = {}


def register_lowering(family: type[nn.Module]) -> Callable[[FamilyLowering], FamilyLowering]:
    """Register the decorated function as the lowering of ``family`` (an ADN model class)."""

    def register(fn: FamilyLowering) -> FamilyLowering:
        if family in LOWERINGS:
            raise RuntimeError(f"a lowering of {family.__name__} is registered twice")
        LOWERINGS[family] = fn
        return fn

    return register


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


class Builder:
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


def twin(module: nn.Module, name: str) -> nn.Module | None:
    """The ``_skip`` twin of ``module.<name>`` (None in skippable layers, which have one set)."""
    return getattr(module, name + "_skip", None)


def stage_blocks(stage: nn.Module, name: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """Split a stage into (mandatory blocks, skippable blocks); the skippable ones must come last."""
    blocks = list(stage)
    flags = [bool(getattr(b, "skippable", False)) for b in blocks]
    first = flags.index(True) if True in flags else len(flags)
    if not all(flags[first:]):
        raise LoweringError(f"{name}: skippable blocks must form the end of the stage, got skippable={flags}")
    return blocks[:first], blocks[first:]


def lower_stage(
    b: Builder, stage: nn.Module, x: Value, name: str, lower_block: Callable[[Builder, nn.Module, Value, str], Value]
) -> Value:
    """A stage's mandatory blocks, then its skippable blocks inside the body of ``stage.stage``."""
    mandatory, skippable = stage_blocks(stage, name)
    h = x
    for i, block in enumerate(mandatory):
        h = lower_block(b, block, h, f"{name}.{i}")
    with b.body(stage.stage):
        for i, block in enumerate(skippable, start=len(mandatory)):
            h = lower_block(b, block, h, f"{name}.{i}")
    return h


def mlp_linears(mlp: nn.Module, name: str) -> tuple[nn.Linear, nn.Linear]:
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
