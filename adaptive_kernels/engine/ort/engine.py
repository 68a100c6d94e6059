"""The CPU engine: every sub-network from one ONNX graph on ONNX Runtime (``compile`` picks it for a CPU input
when ``onnxruntime`` is installed: ``pip install adaptive_kernels[onnx]``).

The graph is ``export_onnx(model, ...)`` with ``skip=None``: an ``If`` per stage on an int32 mask input, served
as ONNX Runtime optimises it for this CPU with the blocked layout kept across the stage boundaries
(``layout.machine_layout``). The engine keeps the default sub-network's mask as a NumPy array, so ``set_skip``
rebuilds nothing, and each call feeds ONNX Runtime the mask of its own sub-network: the session is the only
state calls share, and ``InferenceSession.run`` may be called from many threads at once. The default, ``set_mask``
and the input path are ``HostEngine``'s (``engine/host``), shared with the OpenVINO engine.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import numpy as np
import torch

from ...export import INPUT, MASK, OUTPUT, onnxruntime_session
from ...models.base import ADNModel
from ...models.skip import SkipConfig
from ..host import HostEngine
from .layout import machine_layout

logger = logging.getLogger(__name__)
INSTALL_HINT = "pip install adaptive_kernels[onnx] (ONNX Runtime) for a faster CPU engine"


def onnxruntime_unavailable() -> str | None:
    """Why the ONNX Runtime engine cannot run here (None when it can)."""
    missing = [name for name in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed" if missing else None


class OnnxRuntimeEngine(HostEngine):
    """An ADN model on ONNX Runtime (CPU), one graph for all 2^S sub-networks; build it with ``compile``.

    The :class:`~..base.Engine` interface: ``engine(x, skip=None)``, ``set_skip``, ``skip``, ``profile()``
    (wall-clock medians, ready for ``select_skip``); ``mechanism == "onnxruntime"``. ``set_mask(mask)`` takes
    the raw mask instead (int32 (S,), 1 = run the stage's skippable sub-path). ``onnx_model`` holds the
    portable one graph as exported (``Path("m.onnx").write_bytes(engine.onnx_model)`` serves it elsewhere). ORT runs with
    torch's thread count at build time. Outputs are float32 tensors; inputs are converted to float32.
    """

    runtime_name = "ONNX Runtime"

    def __init__(self, model: ADNModel, example_input: torch.Tensor, *, dynamic_batch: bool,
                 onnx_model: bytes | None = None) -> None:
        """``onnx_model``: a one-graph file of this model already exported (``export_onnx(..., skip=None)``),
        served as it is once its inputs and its output on ``example_input`` agree with the model's (ValueError
        otherwise); default: export it now."""
        super().__init__(model, example_input, mechanism="onnxruntime", dynamic_batch=dynamic_batch,
                         onnx_model=onnx_model)
        logger.info("[compile] laying the graph out for this CPU and loading it in %s (%.0f s so far) ...",
                    self.runtime_name, time.perf_counter() - self._build_start)
        served = machine_layout(self.onnx_model)
        try:
            self._session = onnxruntime_session(served)
        except Exception as error:  # our rewrite failed, not the model: serve the file as exported
            if served is self.onnx_model:
                raise
            logger.warning("the one graph laid out for this CPU did not load in ONNX Runtime (%s); serving it as "
                           "exported (correct, a few %% slower)", str(error).splitlines()[0])
            self._session = onnxruntime_session(self.onnx_model)
        mask = next((i for i in self._session.get_inputs() if i.name == MASK), None)
        if mask is None or mask.shape != [model.num_skippable_stages]:
            raise ValueError(f"onnx_model is not a one-graph export of this {self._model_name}: it needs an input "
                             f"{MASK!r} of shape [{model.num_skippable_stages}] (export_onnx with skip=None)")
        self._output_names = [OUTPUT]
        logger.info("[compile] %s ready on %s in %.0f s", self._model_name, self.runtime_name,
                    time.perf_counter() - self._build_start)

    def _infer(self, array: np.ndarray, config: SkipConfig, mask: np.ndarray) -> np.ndarray:
        return self._session.run(self._output_names, {INPUT: array, MASK: mask})[0]
