"""What the CPU runtimes (``ort/``, ``openvino/``) share: the one-graph export they start from, the default
sub-network kept as a parsed configuration and its NumPy mask (so ``set_skip`` rebuilds nothing), ``set_mask``,
and the lean input path that hands a float32 CPU tensor to the runtime as a NumPy view.

A runtime subclasses :class:`HostEngine` with ``_infer(array, config, mask)``: run sub-network ``config`` (its
mask ``mask``) on ``array`` and return a new float32 array. Each call reads the default once, as one
(configuration, mask) pair, and passes it down: the engine holds no per-call state.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules import module as _module

from ..export import check_one_graph, export_onnx
from ..models.base import ADNModel
from ..models.skip import SkipConfig, SkipLike, parse_skip, skip_to_mask
from .base import Engine

logger = logging.getLogger(__name__)


class HostEngine(Engine):
    """An ADN model served from its one-graph ONNX export by a CPU runtime; see the module docstring.

    ``set_mask(mask)`` selects the sub-network by its raw mask (int32 (S,), 1 = run the stage's skippable sub-path);
    ``onnx_model`` holds the portable one graph as exported (``Path("m.onnx").write_bytes(engine.onnx_model)``).
    Outputs are float32 tensors; inputs are converted to float32."""

    #: the runtime's name in progress lines (set by each runtime)
    runtime_name = ""
    #: ``engine(array)`` takes a float32 NumPy array and returns the logits as a new NumPy array (the serving
    #: scheduler feeds it its input ring as NumPy)
    numpy_io = True

    def __init__(self, model: ADNModel, example_input: torch.Tensor, *, mechanism: str, dynamic_batch: bool,
                 onnx_model: bytes | None = None) -> None:
        """``onnx_model``: a one-graph file of this model already exported (``export_onnx(..., skip=None)``), served
        once its inputs and its output on ``example_input`` agree with the model's (ValueError otherwise; the check
        runs ONNX Runtime); default: export it now."""
        super().__init__(num_stages=model.num_skippable_stages, example_input=example_input, mechanism=mechanism,
                         dynamic_batch=dynamic_batch)
        self._model_name = type(model).__name__
        self._build_start = time.perf_counter()
        if onnx_model is None:
            logger.info("[compile] %s on the CPU: exporting every sub-network to one ONNX graph for %s ...",
                        self._model_name, self.runtime_name)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                onnx_model = export_onnx(model, path, example_input.float(), dynamic_batch=dynamic_batch).read_bytes()
        else:
            logger.info("[compile] checking the given ONNX graph against %s ...", self._model_name)
            check_one_graph(onnx_model, model, example_input.float())
        self.onnx_model = onnx_model
        config = self._skip
        self._default = (config, np.array(skip_to_mask(config), dtype=np.int32))  # read once per call
        self._known_skips: dict[int, tuple[SkipLike, SkipConfig, np.ndarray]] = {}
        # what forward's lean path accepts as it is (anything else goes through Engine._check_input)
        self._float32_input = self._input_dtype == torch.float32
        self._image_shape = self._input_shape[1:]

    @property
    def _mask(self) -> np.ndarray:
        """The default sub-network's mask, fed to calls without ``skip``."""
        return self._default[1]

    def set_skip(self, skip: SkipLike) -> None:
        """Set the default sub-network (see :meth:`~.base.Engine.set_skip`): nothing is rebuilt."""
        self._set_default(skip)

    def _set_default(self, skip: SkipLike) -> tuple[SkipConfig, np.ndarray]:
        """Make ``skip`` the default and return (its configuration, its mask)."""
        _, config, mask = self._known(skip)
        # plain values written straight into the instance: nn.Module.__setattr__ (which looks for parameters,
        # buffers and sub-modules first) costs a few microseconds right after a run, on every call with ``skip``
        vars(self).update(_skip=config, _default=(config, mask))
        return config, mask

    def _known(self, skip: SkipLike) -> tuple[SkipLike, SkipConfig, np.ndarray]:
        """(skip, its configuration, its mask), parsed once per immutable ``skip`` object."""
        known = self._known_skips.get(id(skip))
        if known is None or known[0] is not skip:
            config = parse_skip(skip, self.num_skippable_stages)
            known = (skip, config, np.array(skip_to_mask(config), dtype=np.int32))
            if (skip is None or isinstance(skip, (str, tuple))) and len(self._known_skips) < 4096:
                # held, so its id stays its own; immutable, so the same object is the same sub-network: not
                # parsed again when forward(x, skip) gets it back (parsing costs ~60 us right after a run)
                self._known_skips[id(skip)] = known
        return known

    def set_mask(self, mask: torch.Tensor | np.ndarray) -> None:
        """Select the sub-network by its mask: int32 (S,), 1 = run stage k's skippable sub-path, 0 = skip it."""
        if not isinstance(mask, (torch.Tensor, np.ndarray)):
            raise TypeError(f"mask must be an int32 torch.Tensor or numpy array of shape ({self.num_skippable_stages},),"
                            f" got {type(mask).__name__}")
        values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask
        if values.dtype != np.int32:
            raise TypeError(f"mask has dtype {mask.dtype}; the engine's mask is int32 (1 = run the stage's "
                            f"skippable sub-path): convert with .to(torch.int32) / .astype(np.int32)")
        if values.shape != (self.num_skippable_stages,):
            raise ValueError(f"mask has shape {tuple(values.shape)} but this model has {self.num_skippable_stages} "
                             f"skippable stages: give shape ({self.num_skippable_stages},)")
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"mask holds {values.tolist()}: use 1 (run the skippable sub-path) or 0 (skip it)")
        self.set_skip([v == 0 for v in values.tolist()])

    def __call__(self, x: torch.Tensor | np.ndarray, skip: SkipLike = None) -> torch.Tensor | np.ndarray:
        """``forward``, through nn.Module's call (its hooks) only when a forward hook is registered on this engine or
        globally: that call costs 2-4 % of a ResNet-20 run at batch 1 on the CPU (measured right after another
        session's run, issue 29)."""
        if (self._forward_hooks or self._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks):
            return super().__call__(x, skip)
        return self.forward(x, skip)

    def forward(self, x: torch.Tensor | np.ndarray, skip: SkipLike = None) -> torch.Tensor | np.ndarray:
        """x: (N, C, H, W) like the example input -> float32 logits (N, num_classes), a new tensor; or x a float32
        NumPy array of that shape -> the logits as a new NumPy array, with no torch call on the way (each costs
        microseconds right after a run: x.numpy() and torch.from_numpy 7-12 % of a ResNet-20 run at batch 1)."""
        if isinstance(x, np.ndarray):
            array, to_torch = self._numpy_input(x), False
        else:
            array, to_torch = self._input_array(x), True
        # the default read once: another thread's set_skip between here and the run does not change this call's
        config, mask = self._default if skip is None else self._set_default(skip)
        out = self._infer(array, config, mask)
        return torch.from_numpy(out) if to_torch else out

    def _run(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        _, config, mask = self._known(skip)
        return torch.from_numpy(self._infer(self._input_array(x), config, mask))

    def _infer(self, array: np.ndarray, config: SkipConfig, mask: np.ndarray) -> np.ndarray:
        """Sub-network ``config`` (mask ``mask``) on a checked float32 array -> a new float32 array."""
        raise NotImplementedError

    def _numpy_input(self, x: np.ndarray) -> np.ndarray:
        """A NumPy input, checked like a tensor (one-line errors naming the fix); float32 only: no silent cast."""
        if (x.dtype == np.float32 and x.shape[1:] == self._image_shape and x.ndim == 4 and x.shape[0] >= 1
                and (self.dynamic_batch or x.shape[0] == self._input_shape[0])):
            return x
        expected = f"a float32 array of shape {self._input_shape}"
        if x.dtype != np.float32:
            raise TypeError(f"engine input is a NumPy array of dtype {x.dtype}; this engine takes {expected}: "
                            f"convert with x.astype(np.float32)")
        if x.ndim != 4 or x.shape[1:] != self._image_shape:
            raise ValueError(f"engine input has shape {x.shape}; this engine was compiled for {expected} (N, C, H, W "
                             f"must match; compile again for another image size)")
        if x.shape[0] < 1:
            raise ValueError(f"engine input has an empty batch, shape {x.shape}")
        raise ValueError(f"engine input has batch {x.shape[0]}; this engine was compiled for {expected}: pass that "
                         f"batch size, or compile with dynamic_batch=True")

    def _input_array(self, x: torch.Tensor) -> np.ndarray:
        """x as the float32 array the runtime takes (checked)."""
        # Lean on purpose: right after a run the caches hold the model, and every torch call costs tens of us.
        # Measured on 2 cores, a call around a no-op session right after a MobileNetV2-ADN run: Engine.forward's
        # checks and conversions 290 us (360 us switching sub-network), this path 160 us (175 us); of a 4.5 ms
        # base-net. A float32 CPU tensor of the right shape goes through as a NumPy view; anything else gets
        # Engine's checks (their errors) and conversions.
        try:
            array = x.numpy()  # raises for another device, a tensor that needs grad, a dtype NumPy lacks
        except (AttributeError, RuntimeError, TypeError):
            array = None
        if (array is None or not self._float32_input or array.dtype != np.float32
                or array.shape[1:] != self._image_shape or array.shape[0] < 1
                or (array.shape[0] != self._input_shape[0] and not self.dynamic_batch)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"engine input must be a torch.Tensor like the example input {self._input_shape} "
                                f"{self._input_dtype} or a float32 NumPy array of that shape, got {type(x).__name__}")
            self._check_input(x)
            array = x.detach().float().numpy(force=True)  # force: also resolves conj / neg views
        return array

    def _describe(self) -> str:
        return self._model_name
