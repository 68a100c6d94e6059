"""The OpenVINO engine: every sub-network of an ADN model on OpenVINO's CPU runtime, in fp32 or INT8
(``compile(model, x_cpu, mechanism="openvino")``; ``pip install adaptive_kernels[openvino]``).

fp32 (``dtype=torch.float32`` or a float dtype): OpenVINO compiles the one graph (``export_onnx(..., skip=None)``,
an ``If`` per stage on the ``mask`` input) once, with fp32 inference precision (OpenVINO would otherwise run bf16
on a CPU that has it), and each call feeds its own mask: like the ONNX Runtime engine, one compiled model serves
every sub-network.

INT8 (``dtype=torch.int8`` with ``calibration`` images): one compiled model per sub-network, all built at
``compile`` and kept: each is cut out of the same one graph (``subnets.specialize``) and quantized by NNCF on the
calibration images run through that sub-network (``subnets.quantize``), so every sub-network has its own
activation ranges and its own folded norms. A call picks its sub-network's compiled model: switching recompiles
nothing. Memory: 2^S INT8 models, each about a quarter of the sub-network's fp32 weights.

Threads: a compiled model may be used from many threads, an infer request may not. Each compiled model keeps a
stack of idle requests; a call pops one (or creates one when all are busy), runs, and pushes it back
(``collections.deque`` pops and appends are atomic), so calls never share a request and need no lock.

One ``openvino.Core`` per process (:func:`shared_core`), never destroyed: OpenVINO's CPU plugin installs its own
alternate signal stack on the thread that loads it and, when that Core goes, puts back the stack it found. Cores
that die in another order than they were made (two engines, the first deleted first) put back a stack that was
already freed, and the next signal Python handles on that thread (a ``SIGCHLD`` when a child process exits) kills
the process with SIGSEGV. One Core that outlives every compiled model loads the plugin once.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import math
import threading
import time
from collections.abc import Iterable

import numpy as np
import torch

from ...export import INPUT, MASK
from ...models.base import ADNModel
from ...models.skip import SkipConfig, SkipLike, all_skip_configs, parse_skip, skip_to_mask, skip_to_str
from ..host import HostEngine
from .subnets import quantize, specialize

logger = logging.getLogger(__name__)
INSTALL_HINT = "pip install adaptive_kernels[openvino] (OpenVINO, NNCF and the ONNX exporter)"
#: calibration images NNCF measures each sub-network's ranges on, at most (NNCF's own default subset)
CALIBRATION_IMAGES = 300
#: images per calibration batch for a dynamic-batch engine (a fixed-batch one takes its own batch size)
CALIBRATION_BATCH = 32


def openvino_unavailable(int8: bool = False) -> str | None:
    """Why the OpenVINO engine (``int8``: its INT8 mode, which needs NNCF) cannot run here (None when it can)."""
    needed = ("openvino", "onnx", "onnxscript", *(("nncf",) if int8 else ()))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed" if missing else None


_core_lock = threading.Lock()
_core = None


def shared_core():
    """The process's one ``openvino.Core`` (made on first use, under a lock; see the module docstring for why one).
    Everything here and in the tests and benchmarks compiles through it."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


class _Requests:
    """One compiled model and its idle infer requests (see the module docstring, Threads)."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self._idle = collections.deque([compiled.create_infer_request()])

    def run(self, inputs: dict) -> np.ndarray:
        try:
            request = self._idle.pop()
        except IndexError:  # every request is busy in another thread
            request = self.compiled.create_infer_request()
        try:
            # the input is read in place (the call waits for the run); the output is copied out of the request
            return request.infer(inputs, share_inputs=True)[0]
        finally:
            self._idle.append(request)


def calibration_arrays(images: torch.Tensor | Iterable, example_input: torch.Tensor, *, dynamic_batch: bool,
                       limit: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """The first ``limit`` images of ``images`` (a tensor (N, C, H, W), or an iterable of such batches or of
    (images, labels) pairs) as float32 arrays in batches of the example's batch size (the rest dropped), or with
    ``dynamic_batch`` of up to ``CALIBRATION_BATCH``. ValueError when they do not fit the example input or are
    fewer than one batch."""
    if isinstance(images, torch.Tensor):
        images = [images]
    elif not isinstance(images, Iterable):
        raise TypeError(f"calibration must be a tensor (N, C, H, W) or an iterable of batches, got "
                        f"{type(images).__name__}")
    shape = tuple(example_input.shape[1:])
    batch = 1 if dynamic_batch else example_input.shape[0]
    taken, count = [], 0
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"calibration images must be (N, {', '.join(map(str, shape))}) tensors like the example "
                             f"input, got {got}: pass images of the size the engine serves")
        x = x[: limit - count].detach().cpu().float()
        if not torch.isfinite(x).all():
            raise ValueError("calibration images hold NaN or infinite values: fix or drop them")
        taken.append(x)
        count += x.shape[0]
        if count >= limit:
            break
    if count < batch:
        raise ValueError(f"INT8 calibration got {count} images, fewer than one batch of {batch}: pass at least "
                         f"{batch} (up to {limit} are used)")
    chunk = CALIBRATION_BATCH if dynamic_batch else batch
    return [b.numpy() for b in torch.cat(taken).split(chunk) if b.shape[0] == batch or dynamic_batch]


class OpenVinoEngine(HostEngine):
    """An ADN model on OpenVINO (CPU), fp32 from one graph or INT8 from one model per sub-network; build it with
    ``compile(..., mechanism="openvino")``.

    The :class:`~..host.HostEngine` interface (``engine(x, skip=None)``, ``set_skip``, ``set_mask``, ``profile()``,
    ``onnx_model``); ``mechanism == "openvino"``, ``precision`` is ``"fp32"`` or ``"int8"``. OpenVINO runs with
    torch's thread count at build time. ``calibration`` (INT8 only): images like the example input, normalised as
    for training (un-augmented training images); up to ``CALIBRATION_IMAGES`` are used.
    """

    runtime_name = "OpenVINO"

    def __init__(self, model: ADNModel, example_input: torch.Tensor, *, dynamic_batch: bool, int8: bool = False,
                 calibration: torch.Tensor | Iterable | None = None, onnx_model: bytes | None = None,
                 skips: Iterable[SkipLike] | None = None) -> None:
        """``skips`` (INT8 only): the sub-networks to quantize and serve (default: all 2^S); see ``compile``."""
        if skips is not None and not int8:
            raise ValueError("skips= is for INT8 (one quantized model per sub-network): fp32 serves every "
                             "sub-network from one graph; drop skips=")
        served = None if skips is None else _parse_skips(skips, model.num_skippable_stages)
        if int8 and calibration is None:
            raise ValueError("INT8 needs calibration images: compile(..., dtype=torch.int8, calibration=images) with "
                             "un-augmented training images normalised as for training")
        if not int8 and calibration is not None:
            raise ValueError("calibration images are for INT8 only: pass dtype=torch.int8, or no calibration")
        # checked before the export
        batches = calibration_arrays(calibration, example_input, dynamic_batch=dynamic_batch) if int8 else None
        super().__init__(model, example_input, mechanism="openvino", dynamic_batch=dynamic_batch,
                         onnx_model=onnx_model)
        self.precision = "int8" if int8 else "fp32"
        core = shared_core()
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        one_graph = core.read_model(self.onnx_model)
        if [p.get_friendly_name() for p in one_graph.get_parameters()] != [INPUT, MASK]:
            raise ValueError(f"onnx_model is not a one-graph export of this {self._model_name}: it needs inputs "
                             f"{INPUT!r} and {MASK!r} (export_onnx with skip=None)")
        start = time.perf_counter()
        self._served = served
        if served is not None and self._skip not in served:  # the default: the most capable one built
            self._set_default(served[0])
        if int8:
            self._subnets = {}
            configs = self.skip_configs()
            for k, skip in enumerate(configs, 1):
                logger.info("[compile] quantizing %s (%d/%d) of %s to INT8 (%.0f s so far) ...", skip_to_str(skip), k,
                            len(configs), self._model_name, time.perf_counter() - self._build_start)
                static = specialize(one_graph, np.array(skip_to_mask(skip), dtype=np.int32))
                if not dynamic_batch:  # a static shape: OpenVINO plans the memory and picks kernels once
                    static.reshape({INPUT: list(self._input_shape)})
                self._subnets[skip] = _Requests(core.compile_model(quantize(static, batches), "CPU", config))
            logger.info("[compile] quantized %d sub-networks of %s to INT8 on %d images in %.0f s", len(self._subnets),
                        self._model_name, sum(len(b) for b in batches), time.perf_counter() - start)
        else:
            self._one_graph = _Requests(core.compile_model(one_graph, "CPU", config))
            logger.info("[compile] %s ready on %s in %.0f s", self._model_name, self.runtime_name,
                        time.perf_counter() - self._build_start)

    def skip_configs(self) -> list[SkipConfig]:
        """The sub-networks this engine serves, super-net first: all 2^S, or for INT8 those ``skips`` named."""
        return list(self._served) if self._served is not None else super().skip_configs()

    def _known(self, skip: SkipLike) -> tuple[SkipLike, SkipConfig, np.ndarray]:
        known = super()._known(skip)
        if self._served is not None and known[1] not in self._served:
            raise ValueError(f"sub-network {skip_to_str(known[1])} was not compiled to INT8: this engine holds "
                             f"{', '.join(map(skip_to_str, self._served))}; compile with skips= including it (or "
                             f"skips=None for all)")
        return known

    def _infer(self, array: np.ndarray, config: SkipConfig, mask: np.ndarray) -> np.ndarray:
        if self.precision == "int8":
            out = self._subnets[config].run({INPUT: array})
        else:
            out = self._one_graph.run({INPUT: array, MASK: mask})
        flat = array.reshape(-1)
        if not math.isfinite(flat.dot(flat)):  # 0.6 us for a 28 x 28 image; finite values too large also land here
            # OpenVINO's CPU plugin answers finite logits for an image holding NaN (the model and ONNX Runtime: NaN)
            out[~np.isfinite(array.reshape(len(array), -1)).all(axis=1)] = np.nan
        return out

    def _describe(self) -> str:
        if self.precision == "int8":
            return f"{self._model_name}, int8, one compiled model for each of {len(self._subnets)} sub-networks"
        return f"{self._model_name}, fp32, one graph"


def _parse_skips(skips: Iterable[SkipLike], num_stages: int) -> tuple[SkipConfig, ...]:
    """``skips`` as configurations in the engine's order (super-net first), each once; ValueError naming a bad one."""
    if isinstance(skips, (str, bytes)) or not isinstance(skips, Iterable):
        raise TypeError(f"skips must be a list of sub-networks (e.g. ['FFFF', 'TTTT']), got {skips!r}")
    wanted = {parse_skip(skip, num_stages) for skip in skips}
    if not wanted:
        raise ValueError("skips is empty: name at least one sub-network to compile (or skips=None for all)")
    return tuple(config for config in all_skip_configs(num_stages) if config in wanted)
