"""The engine module and ``compile``: every sub-network of an ADN model from one captured CUDA graph."""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings

import torch
from torch import nn

from ..models.base import ADNModel
from ..models.skip import SkipConfig, SkipLike, all_skip_configs, parse_skip, skip_to_str
from .graph import CapturedGraph, capture_streams, conditional_nodes_unavailable
from .lowering import NotLoweredError, lower
from .program import Program
from .runtime import STRUCTURE_ONLY, triton_kernels

# INFO: how long each capture took (the first one on a machine includes Triton's compiling and autotuning).
logger = logging.getLogger(__name__)

MECHANISMS = ("auto", "conditional", "early_exit", "onnxruntime")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Engine(nn.Module):
    """An ADN model compiled for inference; build it with :func:`compile`.

    ``engine(x, skip=None)`` runs the sub-network ``skip`` (None keeps the one set last, initially the
    super-net) and returns the logits (N, num_classes) as a new tensor, in the engine's dtype (the
    model's own in the reference mode).
    ``engine.set_skip(skip)`` switches sub-network: on the graph path it is one tiny device-to-device
    copy into the skip mask, ordered on the current CUDA stream before the next replay — no host sync,
    no re-capture. ``capture_count`` counts CUDA graph captures (1 per input shape).

    Modes (``engine.mechanism``): ``"conditional"`` (skipped sub-paths are CUDA IF nodes that launch
    nothing), ``"early_exit"`` (their kernels return at once) or ``"reference"`` (no CUDA graph: the
    eval-mode reference model runs eagerly — without CUDA, or for an input size that is not lowered yet).
    Inputs must match the compile-time example's shape (batch too, unless ``dynamic_batch``), dtype and
    device. The engine keeps working copies of the weights: later changes to the model are not seen.
    """

    def __init__(
        self,
        *,
        num_stages: int,
        example_input: torch.Tensor,
        mechanism: str,
        dynamic_batch: bool,
        program: Program | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_skippable_stages = num_stages
        self.mechanism = mechanism
        self.dynamic_batch = dynamic_batch
        self.capture_count = 0
        self._program = program
        self._reference = reference
        self._input_shape = tuple(example_input.shape)
        self._input_dtype = example_input.dtype
        self._device = example_input.device
        self._example = example_input.detach().clone()
        self._skip: SkipConfig = (False,) * num_stages
        self._captures: dict[int, CapturedGraph] = {}
        if reference is not None:
            self._reference_dtype = next((p.dtype for p in reference.parameters()), example_input.dtype)
        if program is not None:
            # the stage bits, then (calibrated model) the sub-network id; set_skip rewrites them together
            self._mask = torch.tensor(program.mask_values(self._skip), dtype=torch.int32, device=self._device)
            self._device_masks: dict[SkipConfig, torch.Tensor] = {self._skip: self._mask.clone()}
            self._streams = None  # conditional: the capture and IF-body streams of every capture, drawn together
            if mechanism == "conditional":
                self._streams = capture_streams(lambda: torch.cuda.Stream(self._device))
            self._capture(self._input_shape)

    # ---- skip configuration ----------------------------------------------------------------------
    @property
    def skip(self) -> SkipConfig:
        """The sub-network the next call runs (True = skip that stage's skippable sub-path)."""
        return self._skip

    def skip_configs(self) -> list[SkipConfig]:
        """All 2^S configurations, super-net first, base-net last."""
        return all_skip_configs(self.num_skippable_stages)

    def set_skip(self, skip: SkipLike) -> None:
        """Select the sub-network for the following calls: None/"super", "base", "TFFT" or a bool sequence."""
        skip = parse_skip(skip, self.num_skippable_stages)
        if skip == self._skip:
            return
        if self._program is not None:
            cached = self._device_masks.get(skip)
            if cached is None:
                # 1 = run the skippable sub-path; a calibrated program appends the sub-network id (its BN table row)
                mask = self._program.mask_values(skip)
                with torch.inference_mode(False):
                    cached = torch.tensor(mask, dtype=torch.int32, device=self._device)
                self._device_masks[skip] = cached
            with torch.no_grad():
                self._mask.copy_(cached)
        self._skip = skip

    # ---- running ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, C, H, W) like the example input -> logits (N, num_classes)."""
        self._check_input(x)
        if skip is not None:
            self.set_skip(skip)
        with torch.no_grad():
            if self._program is None:
                return self._run_without_graph(x)
            capture = self._captures.get(x.shape[0]) or self._capture(tuple(x.shape))
            return capture.replay(x).clone()

    def _run_without_graph(self, x: torch.Tensor) -> torch.Tensor:
        # the reference model runs in its own dtype; the engine accepts the example input's
        return self._reference(x.to(self._reference_dtype), self._skip)

    def _capture(self, shape: tuple[int, ...]) -> CapturedGraph:
        if self._captures:
            warnings.warn(
                f"adaptive_kernels engine: capturing a new CUDA graph for input shape {shape} "
                f"(dynamic_batch=True; {len(self._captures)} shape(s) captured before)",
                stacklevel=3,
            )
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():  # see compile(): static buffers are updated in place
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

    def _check_input(self, x: torch.Tensor) -> None:
        expected = f"{tuple(self._input_shape)} {self._input_dtype} on {self._device}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"engine input must be a torch.Tensor like the example input {expected}, got {type(x).__name__}"
            )
        if x.dtype != self._input_dtype:
            raise TypeError(
                f"engine input has dtype {x.dtype}; this engine was compiled for {expected}: convert "
                f"with x.to({self._input_dtype})"
            )
        if x.device != self._device:
            raise ValueError(
                f"engine input is on {x.device}; this engine was compiled for {expected}: move it with "
                f"x.to({str(self._device)!r})"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self._input_shape[1:]:
            raise ValueError(
                f"engine input has shape {tuple(x.shape)}; this engine was compiled for {expected} "
                f"(N, C, H, W must match; compile again for another image size)"
            )
        if x.shape[0] < 1:
            raise ValueError(f"engine input has an empty batch, shape {tuple(x.shape)}")
        if x.shape[0] != self._input_shape[0] and not self.dynamic_batch:
            raise ValueError(
                f"engine input has batch {x.shape[0]}; this engine was captured for {expected}: pass "
                f"that batch size, or compile with dynamic_batch=True (one more capture per batch size)"
            )

    # ---- measuring -------------------------------------------------------------------------------
    def profile(self, iters: int = 50, warmup: int = 5) -> dict[str, float]:
        """Median latency in microseconds of every sub-network on the compile-time example input.

        Graph modes time one graph replay with CUDA events; the reference mode times the eager model
        (wall clock, synchronised on CUDA). Returns ``{"FFFF": us, ..., "TTTT": us}`` (super-net first),
        ready for :func:`~adaptive_kernels.select_skip`. The current sub-network is restored afterwards.
        """
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive int, got {iters!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        previous = self._skip
        table: dict[str, float] = {}
        try:
            for skip in self.skip_configs():
                self.set_skip(skip)
                table[skip_to_str(skip)] = statistics.median(self._time_runs(iters, warmup))
        finally:
            self.set_skip(previous)
        return table

    def _time_runs(self, iters: int, warmup: int) -> list[float]:
        with torch.no_grad():
            if self._program is not None:
                capture = self._captures[self._input_shape[0]]
                capture.input.copy_(self._example)
                for _ in range(warmup):
                    capture.graph.replay()
                times = []
                for _ in range(iters):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    capture.graph.replay()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1000.0)
                return times
            cuda = self._device.type == "cuda"
            for _ in range(warmup):
                self._run_without_graph(self._example)
            times = []
            for _ in range(iters):
                if cuda:
                    torch.cuda.synchronize(self._device)
                t0 = time.perf_counter()
                self._run_without_graph(self._example)
                if cuda:
                    torch.cuda.synchronize(self._device)
                times.append((time.perf_counter() - t0) * 1e6)
            return times

    def __repr__(self) -> str:  # the reference submodule's repr would drown the summary
        return f"Engine({self.extra_repr()})"

    def extra_repr(self) -> str:
        what = repr(self._program) if self._program is not None else type(self._reference).__name__
        return (
            f"{what}, mechanism={self.mechanism}, input={self._input_shape} {self._input_dtype} on {self._device}, "
            f"dynamic_batch={self.dynamic_batch}, captures={self.capture_count}"
        )


def _graph_unavailable(example_input: torch.Tensor) -> str | None:
    """Why the CUDA-graph path cannot run for this input (None when it can)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if example_input.device.type != "cuda":
        return f"example_input is on {example_input.device} (move the model and input to a CUDA device for the graph)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not importable ({e})"
    return None


def compile(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float16,
    mechanism: str = "auto",
    dynamic_batch: bool = False,
) -> Engine:
    """Compile an ADN model into an :class:`Engine` that runs all of its 2^S sub-networks from one CUDA graph.

    model: an ADN model (ResNet-ADN, MobileNetV2-ADN, ViT/DeiT-ADN, Swin-T-ADN; for a Swin input size that the
    model pads, e.g. one whose feature maps are not multiples of the window, the engine runs the reference,
    with a warning). Eval-mode semantics whatever ``model.training`` says: BatchNorm running statistics
    are folded into per-channel scale/shift (the normal and the ``_skip`` set; for a calibrated model one row per
    sub-network, picked on the device by the sub-network id that ``set_skip`` writes after the stage bits), dropout
    is off.
    example_input: (N, C, H, W) on the device to run on; its shape, dtype and device are what the engine
    accepts. dtype: compute dtype (float16, bfloat16 or float32); norm parameters stay fp32.
    mechanism: "conditional" (CUDA IF nodes; needs the adaptive_kernels._C extension and CUDA >= 12.4),
    "early_exit" (kernels return on their mask bit), "onnxruntime" (the CPU engine: one ONNX graph on ONNX Runtime,
    ``pip install adaptive_kernels[onnx]``) or "auto" (on CUDA conditional when available; on the CPU onnxruntime
    when installed).
    dynamic_batch: accept other batch sizes, capturing one more graph per new size (with a warning).

    With a CPU example input and ONNX Runtime installed, the engine is an :class:`OnnxRuntimeEngine` (exact fp32,
    whatever ``dtype`` says). Otherwise, without CUDA (or with a CPU example input) the engine runs the reference
    model and warns once, here.
    A model that cannot be lowered raises ValueError before anything is captured.
    """
    if not isinstance(model, ADNModel):
        raise TypeError(
            f"compile() takes an ADN model from adaptive_kernels.create_model(...), got {type(model).__name__}"
        )
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor (N, C, H, W), got {type(example_input).__name__}")
    model.check_input(example_input, match_parameters=False)  # the engine converts dtype and device itself
    if example_input.shape[0] < 1:
        raise ValueError(f"example_input has an empty batch, shape {tuple(example_input.shape)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(map(str, DTYPES))}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}: use one of {', '.join(map(repr, MECHANISMS))}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    input_shape = tuple(example_input.shape[1:])
    common = {"num_stages": model.num_skippable_stages, "example_input": example_input, "dynamic_batch": dynamic_batch}

    cpu_hint = ""
    if mechanism == "onnxruntime" or (mechanism == "auto" and example_input.device.type == "cpu"):
        from .onnx_runtime import INSTALL_HINT, OnnxRuntimeEngine, onnxruntime_unavailable

        why_no_ort = onnxruntime_unavailable()
        if example_input.device.type != "cpu":
            raise ValueError(f"mechanism='onnxruntime' runs on the CPU, but example_input is on "
                             f"{example_input.device}: pass a CPU example input (or mechanism='auto' on CUDA)")
        if why_no_ort is None:
            # a float32 CPU copy: ONNX Runtime's CPU kernels are fp32, and export must not touch the caller's model
            return OnnxRuntimeEngine(copy.deepcopy(model).float().cpu(), example_input, dynamic_batch=dynamic_batch)
        if mechanism == "onnxruntime":
            raise ValueError(f"mechanism='onnxruntime' is unavailable: {why_no_ort}; {INSTALL_HINT}")
        cpu_hint = f" ({why_no_ort}: {INSTALL_HINT})"
    why_no_graph = _graph_unavailable(example_input)
    try:
        if why_no_graph is None:
            resolved = _resolve_mechanism(mechanism)
            # Buffers and the mask are written in place on every call: they must not become inference tensors
            # when compile() runs under torch.inference_mode().
            with torch.inference_mode(False):
                program = lower(model, input_shape, kernels=triton_kernels(), dtype=dtype, device=example_input.device)
                return Engine(program=program, mechanism=resolved, **common)
        # No graph here, but an unlowerable model must still fail now; lowering on the meta device
        # checks the structure without copying weights or importing kernels.
        lower(model, input_shape, kernels=STRUCTURE_ONLY, dtype=dtype, device="meta")
        why = f"{why_no_graph}; running the reference model eagerly (in its own dtype {_model_dtype(model)})"
    except NotLoweredError as e:
        why = f"{e}; running the reference model eagerly instead"
    warnings.warn(f"adaptive_kernels.compile({type(model).__name__}): {why}{cpu_hint}", stacklevel=2)
    reference = copy.deepcopy(model).to(example_input.device).eval().requires_grad_(False)
    return Engine(reference=reference, mechanism="reference", **common)


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters()), None)


def _resolve_mechanism(mechanism: str) -> str:
    if mechanism == "early_exit":
        return mechanism
    why = conditional_nodes_unavailable()
    if why is None:
        return "conditional"
    if mechanism == "conditional":
        raise ValueError(f"mechanism='conditional' is unavailable: {why}. Use mechanism='early_exit' (or 'auto')")
    return "early_exit"
