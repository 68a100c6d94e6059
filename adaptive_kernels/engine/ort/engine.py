"""The CPU engine: every sub-network from one ONNX graph on ONNX Runtime (``compile`` picks it for a CPU input
when ``onnxruntime`` is installed: ``pip install adaptive_kernels[onnx]``).

The graph is ``export_onnx(model, ...)`` with ``skip=None``: an ``If`` per stage on an int32 mask input, served
as ONNX Runtime optimises it for this CPU with the blocked layout kept across the stage boundaries
(``layout.machine_layout``). The engine keeps the default sub-network's mask as a NumPy array, so ``set_skip``
rebuilds nothing, and each call feeds ONNX Runtime the mask of its own sub-network: the session is the only
state calls share, and ``InferenceSession.run`` may be called from many threads at once.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ...export import INPUT, MASK, OUTPUT, check_one_graph, export_onnx, onnxruntime_session
from ...models.base import ADNModel
from ...models.skip import SkipConfig, SkipLike, parse_skip, skip_to_mask
from ..base import Engine
from .layout import machine_layout

logger = logging.getLogger(__name__)
INSTALL_HINT = "pip install adaptive_kernels[onnx] (ONNX Runtime) for a faster CPU engine"


def onnxruntime_unavailable() -> str | None:
    """Why the ONNX Runtime engine cannot run here (None when it can)."""
    missing = [name for name in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed" if missing else None


class OnnxRuntimeEngine(Engine):
    """An ADN model on ONNX Runtime (CPU), one graph for all 2^S sub-networks; build it with ``compile``.

    The :class:`~..base.Engine` interface: ``engine(x, skip=None)``, ``set_skip``, ``skip``, ``profile()``
    (wall-clock medians, ready for ``select_skip``); ``mechanism == "onnxruntime"``. ``set_mask(mask)`` takes
    the raw mask instead (int32 (S,), 1 = run the stage's skippable sub-path). ``onnx_model`` holds the
    portable one graph as exported (``Path("m.onnx").write_bytes(engine.onnx_model)`` serves it elsewhere). ORT runs with
    torch's thread count at build time. Outputs are float32 tensors; inputs are converted to float32.
    """

    def __init__(self, model: ADNModel, example_input: torch.Tensor, *, dynamic_batch: bool,
                 onnx_model: bytes | None = None) -> None:
        """``onnx_model``: a one-graph file of this model already exported (``export_onnx(..., skip=None)``),
        served as it is once its inputs and its output on ``example_input`` agree with the model's (ValueError
        otherwise); default: export it now."""
        super().__init__(num_stages=model.num_skippable_stages, example_input=example_input,
                         mechanism="onnxruntime", dynamic_batch=dynamic_batch)
        self._model_name = type(model).__name__
        start = time.perf_counter()
        if onnx_model is None:
            logger.info("[compile] %s on the CPU: exporting every sub-network to one ONNX graph for ONNX Runtime ...",
                        self._model_name)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                onnx_model = export_onnx(model, path, example_input.float(), dynamic_batch=dynamic_batch).read_bytes()
        else:
            logger.info("[compile] checking the given ONNX graph against %s ...", self._model_name)
            check_one_graph(onnx_model, model, example_input.float())
        self.onnx_model = onnx_model
        logger.info("[compile] laying the graph out for this CPU and loading it in ONNX Runtime (%.0f s so far) ...",
                    time.perf_counter() - start)
        served = machine_layout(onnx_model)
        try:
            self._session = onnxruntime_session(served)
        except Exception as error:  # our rewrite failed, not the model: serve the file as exported
            if served is onnx_model:
                raise
            logger.warning("the one graph laid out for this CPU did not load in ONNX Runtime (%s); serving it as "
                           "exported (correct, a few %% slower)", str(error).splitlines()[0])
            self._session = onnxruntime_session(onnx_model)
        mask = next((i for i in self._session.get_inputs() if i.name == MASK), None)
        if mask is None or mask.shape != [model.num_skippable_stages]:
            raise ValueError(f"onnx_model is not a one-graph export of this {self._model_name}: it needs an input "
                             f"{MASK!r} of shape [{model.num_skippable_stages}] (export_onnx with skip=None)")
        self._mask = np.ones(model.num_skippable_stages, dtype=np.int32)  # fed with every run
        self._known_skips: dict[int, tuple[SkipLike, SkipConfig, np.ndarray]] = {}
        self._output_names = [OUTPUT]
        # what forward's lean path accepts as it is (anything else goes through Engine._check_input)
        self._float32_input = self._input_dtype == torch.float32
        self._image_shape = self._input_shape[1:]
        logger.info("[compile] %s ready on ONNX Runtime in %.0f s", self._model_name, time.perf_counter() - start)

    def set_skip(self, skip: SkipLike) -> None:
        """Set the default sub-network (see :meth:`~..base.Engine.set_skip`): its mask is fed with every call
        without ``skip``, nothing is rebuilt."""
        self._set_default(skip)

    def _set_default(self, skip: SkipLike) -> np.ndarray:
        """Make ``skip`` the default and return its mask."""
        _, self._skip, mask = self._known(skip)
        self._mask = mask
        return mask

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

    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, C, H, W) like the example input -> float32 logits (N, num_classes), a new tensor."""
        array = self._input_array(x)
        # the mask read once: another thread's set_skip between here and the run does not change this call's
        mask = self._mask if skip is None else self._set_default(skip)
        return self._infer(array, mask)

    def _run(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        return self._infer(self._input_array(x), self._known(skip)[2])

    def _infer(self, array: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._session.run(self._output_names, {INPUT: array, MASK: mask})[0])

    def _input_array(self, x: torch.Tensor) -> np.ndarray:
        """x as the float32 array ONNX Runtime takes (checked)."""
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
            self._check_input(x)
            array = x.detach().float().numpy()
        return array

    def _describe(self) -> str:
        return self._model_name
