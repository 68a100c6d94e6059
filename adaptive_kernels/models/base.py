"""What every ADN model shares: the skip API, MAC counting and upstream-weight loading."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager

import torch
from torch import nn

from .norms import attach_subnet_norms, running_subnet, subnet_norms
from .skip import SkipConfig, SkipLike, all_skip_configs, parse_skip, subnet_index


def check_positive_int(name: str, value: object) -> None:
    """Constructor argument check shared by every model: a wrong size must fail when the model is built,
    not as a shape error in the first forward (or as logits of shape (N, 0))."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_probability(name: str, value: object) -> None:
    """A dropout-like rate in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


class ADNModel(nn.Module):
    """Base class of the ADN models.

    Subclasses set ``num_skippable_stages`` and ``in_chans``, implement ``forward(x, skip=None)``
    (calling ``self.parse_skip`` and ``self.check_input`` first) and, when they can import
    upstream (torchvision) weights, ``_upstream_key(key)``.
    Normalisation layers whose module name ends in ``_skip`` are the skip-aware twins of the layer
    with the same name minus ``_skip``. Models with BatchNorm build it as ``SubnetBatchNorm2d``, call
    ``self.attach_subnet_norms()`` at the end of ``__init__`` and run ``forward``'s layers inside
    ``with self.running_subnet(skip):`` (see ``models/norms.py``).
    """

    num_skippable_stages: int
    in_chans: int
    #: the smallest height = width the forward takes (a patch embedding needs one patch; the ViTs their image_size)
    min_input_size: int = 1
    #: the largest (None: no bound; the ViTs: their image_size, fixed by the position embedding)
    max_input_size: int | None = None
    #: how much the input is downsampled before the last BatchNorm (None: no BatchNorm). Training on one image per
    #: process needs that map larger than 1x1: a BatchNorm's batch statistics need more than one value per channel.
    batch_norm_stride: int | None = None

    # ---- skip API -------------------------------------------------------------------------
    def parse_skip(self, skip: SkipLike) -> SkipConfig:
        """Normalise ``skip`` (None, "super", "base", "TFFT", [bools]) to a tuple of bools."""
        return parse_skip(skip, self.num_skippable_stages)

    def skip_configs(self) -> list[SkipConfig]:
        """All 2^S skip configurations, super-net first, base-net last."""
        return all_skip_configs(self.num_skippable_stages)

    def check_input(self, x: torch.Tensor, *, match_parameters: bool = True) -> None:
        """x: (N, in_chans, H, W), floating point. ``match_parameters``: x must also have the parameters'
        device and (outside autocast) dtype, else torch fails deep inside a layer with an unclear message."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an input tensor (N, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input (N, C, H, W), got {x.dtype}: convert with x.float()")
        p = next(self.parameters(), None)
        if match_parameters and p is not None:
            if x.device != p.device:
                raise ValueError(f"input is on {x.device} but the model is on {p.device}: move one with .to(device)")
            if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(
                    f"input has dtype {x.dtype} but the model's parameters are {p.dtype}: convert with "
                    f"x.to({p.dtype}) (or use torch.autocast for mixed precision)"
                )
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}"
                + (" (build the model with in_chans=... to change the channel count)" if x.dim() == 4 else "")
            )

    def input_size_range(self, training_batch: int | None = None) -> tuple[int, int | None]:
        """The (smallest, largest) height = width this model takes (largest None: no bound); ``training_batch``:
        the images per process when it trains (one image needs a larger input, see ``batch_norm_stride``).
        Measured against the models' forward in tests/models/test_models_input_size.py."""
        low = self.min_input_size
        if training_batch == 1 and self.batch_norm_stride is not None:
            low = max(low, self.batch_norm_stride + 1)
        return low, self.max_input_size

    # ---- per-sub-network norm statistics (models/norms.py) --------------------------------
    def attach_subnet_norms(self) -> None:
        """Tell every calibratable norm how many sub-networks this model has (the rows of its table)."""
        attach_subnet_norms(self, self.num_skippable_stages)

    def running_subnet(self, skip: SkipConfig) -> AbstractContextManager[None]:
        """``with model.running_subnet(skip):`` the calibrated norms this thread runs inside the block read the
        table row of sub-network ``skip``. Per call and per thread, not stored on the model: threads sharing one
        model each get their own sub-network."""
        return running_subnet(subnet_index(skip))

    @property
    def is_calibrated(self) -> bool:
        """True once ``adaptive_kernels.calibrate`` (or loading a calibrated state dict) gave the norms their
        per-sub-network statistics."""
        return any(norm.subnet_mean is not None for norm in subnet_norms(self))

    # ---- MACs -----------------------------------------------------------------------------
    @torch.no_grad()
    def macs(self, skip: SkipLike = None, input_size: int | tuple[int, int] | None = None) -> int:
        """Multiply-accumulates of one image through the sub-network ``skip`` (the paper's "FLOPs").

        input_size: (H, W) or one int for a square image; default the model's own (``input_size``: 32x32 for the
        CIFAR-style ResNets, the ViTs' ``image_size``, else 224x224). Counts convolutions, linear layers and
        attention matmuls (the layers that dominate); norms, activations and pooling are not counted, as is
        customary.
        """
        if input_size is None:
            input_size = getattr(self, "input_size", (224, 224))
        if isinstance(input_size, int) and not isinstance(input_size, bool):
            input_size = (input_size, input_size)
        if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size)):
            raise TypeError(f"input_size must be a positive int or (H, W), got {input_size!r}")
        p = next(self.parameters())
        x = torch.zeros(1, self.in_chans, *input_size, device=p.device, dtype=p.dtype)
        total = [0]

        def hook(module, inputs, output):
            total[0] += module_macs(module, inputs, output)

        handles = [m.register_forward_hook(hook) for m in self.modules() if _counts_macs(m)]
        was_training = self.training
        self.eval()
        try:
            self(x, skip=skip)
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
        return total[0]

    # ---- upstream weights -----------------------------------------------------------------
    def _upstream_key(self, key: str) -> str:
        """Map an upstream (torchvision) state-dict key to this model's key. Identity by default."""
        return key

    def skip_norm_twins(self) -> dict[str, str]:
        """``{"layer1.0.bn1_skip": "layer1.0.bn1", ...}``: every skip-aware norm and its twin."""
        names = dict(self.named_modules())
        twins = {}
        for name in names:
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("_skip"):
                twin = name[: -len("_skip")]
                if twin not in names:
                    raise RuntimeError(f"skip-aware norm {name} has no twin {twin}")
                twins[name] = twin
        return twins

    def load_upstream_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an upstream (torchvision) state dict and initialise every ``_skip`` norm from its twin.

        Strict: a missing or unexpected key, or a shape mismatch, raises ``ValueError`` naming them.
        After loading, the super-net computes exactly what the upstream model computes.
        """
        mapped = {self._upstream_key(k): v for k, v in state_dict.items()}
        own = self.state_dict()
        twins = self.skip_norm_twins()
        skip_prefixes = tuple(n + "." for n in twins)
        expected = {k for k in own if not k.startswith(skip_prefixes)}
        missing = sorted(expected - mapped.keys())
        unexpected = sorted(mapped.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{type(self).__name__}.load_upstream_state_dict: the state dict does not match this "
                f"model (is it the right architecture?). missing: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}; unexpected: {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(
                "load_upstream_state_dict: shape mismatch (upstream vs this model): " + "; ".join(bad[:8])
                + " — build the model with matching num_classes/in_chans (and image_size for ViT)"
            )
        for twin_skip, twin in twins.items():
            for k in list(own):
                if k.startswith(twin + "."):
                    mapped[twin_skip + k[len(twin):]] = mapped[k]
        self.load_state_dict(mapped, strict=True)


def _counts_macs(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)) or hasattr(m, "attention_macs")


def module_macs(module: nn.Module, inputs, output) -> int:
    """MACs of one call of a counted module (see ``ADNModel.macs``)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.MultiheadAttention):
        # (N, L, E) batch_first: in-projection, QK^T, AV, out-projection
        q = inputs[0]
        n, seq, e = (q.shape[0], q.shape[1], q.shape[2]) if module.batch_first else (q.shape[1], q.shape[0], q.shape[2])
        return n * (seq * e * 3 * e + 2 * seq * seq * e + seq * e * e)
    return module.attention_macs(inputs, output)
