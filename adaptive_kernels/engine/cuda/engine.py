"""The CUDA-graph engine: every sub-network of a lowered model from one captured CUDA graph per input shape."""

from __future__ import annotations

import logging
import threading
import time
import warnings

import torch

from ...kernels import triton_kernels
from ...models.base import ADNModel
from ...models.skip import SkipConfig
from ..base import Engine
from .capture import CapturedGraph, capture_streams, conditional_nodes_unavailable
from .lowering import lower
from .program import Program

# INFO: how long each capture took (the first one on a machine includes Triton's compiling and autotuning).
logger = logging.getLogger(__name__)


def cuda_unavailable(example_input: torch.Tensor) -> str | None:
    """Why the CUDA-graph engine cannot run for this input (None when it can)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if example_input.device.type != "cuda":
        return f"example_input is on {example_input.device} (move the model and input to a CUDA device for the graph)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not importable ({e})"
    return None


def resolve_mechanism(mechanism: str) -> str:
    """"conditional" or "early_exit" for the requested mechanism ("auto": conditional where this machine has it)."""
    if mechanism == "early_exit":
        return mechanism
    why = conditional_nodes_unavailable()
    if why is None:
        return "conditional"
    if mechanism == "conditional":
        raise ValueError(f"mechanism='conditional' is unavailable: {why}. Use mechanism='early_exit' (or 'auto')")
    return "early_exit"


class CudaGraphEngine(Engine):
    """:class:`~..base.Engine` over a lowered :class:`~.program.Program`: one CUDA graph per input shape serves every
    sub-network; ``mechanism`` is ``"conditional"`` (skipped sub-paths are CUDA IF nodes that launch nothing) or
    ``"early_exit"`` (their kernels return at once).

    A call that runs another sub-network than the call before writes the skip mask (one tiny device-to-device copy,
    ordered on the current CUDA stream before its replay: no host sync, no re-capture); ``set_skip`` only sets the
    default. Outputs are in the engine's compute dtype. The engine keeps working copies of the weights: later changes
    to the model are not seen.

    Threads: the graph's static input, output and mask are shared by every call, so a call (mask write, copy in,
    replay, copy out) is enqueued under a lock, and a call on another CUDA stream than the call before first waits
    for that stream: on the device too, calls run one after another, each with its own sub-network.
    """

    def __init__(self, program: Program, example_input: torch.Tensor, *, mechanism: str, dynamic_batch: bool) -> None:
        super().__init__(num_stages=program.num_stages, example_input=example_input, mechanism=mechanism,
                         dynamic_batch=dynamic_batch)
        self.capture_count = 0
        self._program = program
        self._captures: dict[int, CapturedGraph] = {}
        # the stage bits, then (calibrated model) the sub-network id; set_skip rewrites them together
        self._mask = torch.tensor(program.mask_values(self._skip), dtype=torch.int32, device=self._device)
        self._mask_skip = self._skip  # the sub-network the mask holds once the calls enqueued so far have run
        self._device_masks: dict[SkipConfig, torch.Tensor] = {self._skip: self._mask.clone()}
        self._streams = None  # conditional: the capture and IF-body streams of every capture, drawn together
        if mechanism == "conditional":
            self._streams = capture_streams(lambda: torch.cuda.Stream(self._device))
        # held while a call is enqueued: the static buffers, the mask and the captures are every call's
        self._lock = threading.Lock()
        self._capture(self._input_shape)
        self._last_stream = self._current_stream()  # the stream of the call enqueued last

    def _run(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        """Logits (N, num_classes) in the compute dtype, a new tensor."""
        with self._lock, torch.no_grad():
            return self._prepare(x, skip).replay(x).clone()

    def _prepare(self, x: torch.Tensor, skip: SkipConfig) -> CapturedGraph:
        """With the lock held: order this call after the one before, point the mask at ``skip`` and return the
        graph of x's batch size (captured first if new)."""
        stream = self._current_stream()
        if stream != self._last_stream:
            # the call before may still be reading or writing the static buffers on its stream
            stream.wait_stream(self._last_stream)
            self._last_stream = stream
        if skip != self._mask_skip:
            cached = self._device_masks.get(skip)
            if cached is None:
                # 1 = run the skippable sub-path; a calibrated program appends the sub-network id (its BN table row)
                with torch.inference_mode(False):
                    cached = torch.tensor(self._program.mask_values(skip), dtype=torch.int32, device=self._device)
                self._device_masks[skip] = cached
            self._mask.copy_(cached)
            self._mask_skip = skip
        return self._captures.get(x.shape[0]) or self._capture(tuple(x.shape))

    def _current_stream(self) -> torch.Stream:
        return torch.get_device_module(self._device).current_stream(self._device)

    def _capture(self, shape: tuple[int, ...]) -> CapturedGraph:
        if self._captures:
            warnings.warn(
                f"adaptive_kernels engine: capturing a new CUDA graph for input shape {shape} "
                f"(dynamic_batch=True; {len(self._captures)} shape(s) captured before)",
                stacklevel=3,
            )
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():  # see build_cuda_engine: static buffers change in place
            capture = CapturedGraph(
                self._program, shape, self._input_dtype, self._device, self._mask, self.mechanism, self._streams
            )
        self._captures[shape[0]] = capture
        self.capture_count += 1
        logger.info(
            "captured %s (%s, input %s) in %.1f s: warm-up (Triton compiles and autotunes kernels the first time on "
            "a machine, then reads its disk cache) and one CUDA graph capture",
            self._program.model_name, self.mechanism, shape, time.perf_counter() - start,
        )
        return capture

    def _time_runs(self, x: torch.Tensor, skip: SkipConfig, iters: int, warmup: int) -> list[float]:
        """One graph replay per run, timed with CUDA events (a batch size not captured yet is captured first). The
        lock is taken per run: calls from other threads go on between runs, not between a run's events."""
        times = []
        for run in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with self._lock, torch.no_grad():
                capture = self._prepare(x, skip)
                capture.input.copy_(x)
                start.record()
                capture.graph.replay()
                end.record()
            end.synchronize()
            if run >= warmup:
                times.append(start.elapsed_time(end) * 1000.0)
        return times

    def _describe(self) -> str:
        return repr(self._program)


def build_cuda_engine(
    model: ADNModel, example_input: torch.Tensor, *, dtype: torch.dtype, mechanism: str, dynamic_batch: bool
) -> CudaGraphEngine:
    """Lower ``model`` with the Triton kernels and capture its graph (``mechanism``: "auto", "conditional" or
    "early_exit"); raises :class:`~.program.LoweringError` / ``NotLoweredError`` before capturing anything."""
    resolved = resolve_mechanism(mechanism)
    # Buffers and the mask are written in place on every call: they must not become inference tensors when
    # compile() runs under torch.inference_mode().
    with torch.inference_mode(False):
        program = lower(model, tuple(example_input.shape[1:]), kernels=triton_kernels(), dtype=dtype,
                        device=example_input.device)
        return CudaGraphEngine(program, example_input, mechanism=resolved, dynamic_batch=dynamic_batch)
