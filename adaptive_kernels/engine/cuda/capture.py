"""One CUDA graph per input shape: static buffers, warm-up, capture, and the IF-node splice.

:class:`CapturedGraph` allocates the program's buffers, runs it once outside the capture (Triton
compiles and autotunes there, and conv2d and linear measure their split-K choice: nothing may compile or be timed inside
a capture), then captures it ONCE with ``torch.cuda.graph``. Switching sub-networks afterwards only rewrites
the int32 mask the graph reads.

With ``mechanism="conditional"`` each skippable body is captured into the body of a CUDA IF node
spliced into torch's capture by the ``adaptive_kernels._C`` extension (:class:`IfNodeSplicer`); a
small kernel at the start of the graph sets every IF condition from the mask, so a skipped body
launches nothing. Bodies are captured on a second stream made current with ``torch.cuda.stream``, so
Triton launches and torch ops inside them land in the body graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .program import Program, Value
from .runtime import allocate_buffers, execute

#: CUDA 12.4: IF nodes whose condition a kernel sets (cudaGraphSetConditional), spliced into a capture.
MIN_CONDITIONAL_CUDA = 12040


def conditional_nodes_unavailable() -> str | None:
    """None when the conditional mechanism can run here, else why not (for errors and warnings)."""
    from ... import _ext

    if not _ext.HAS_EXT:
        return _ext.EXT_ERROR or "adaptive_kernels._C is not available"
    ext = _ext._C
    if not ext.has_conditional_nodes():
        return (
            f"adaptive_kernels._C was compiled with CUDA runtime {ext.compiled_cuda_runtime()}, which has no "
            f"conditional graph nodes (needs CUDA >= 12.4)"
        )
    driver = ext.driver_version()
    if driver < MIN_CONDITIONAL_CUDA:
        return f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}; conditional nodes need 12.4"
    return None


@dataclass(frozen=True)
class CaptureStreams:
    """The stream a conditional graph is captured on and the one its IF bodies are captured on (never the same)."""

    capture: torch.cuda.Stream
    body: torch.cuda.Stream


def capture_streams(new_stream: Callable[[], torch.cuda.Stream], attempts: int = 64) -> CaptureStreams:
    """Draw a capture stream and a body stream that are different CUDA streams.

    ``torch.cuda.Stream()`` hands out a pool of 32 streams per device round robin, so two streams made at different
    times can be one stream (torch.cuda.graph's default capture stream is made once per process): a body captured on
    the capture stream makes ``begin_if`` fail. Drawn together, the body is drawn again while it equals the capture.
    """
    capture = new_stream()
    for _ in range(attempts):
        body = new_stream()
        if body.cuda_stream != capture.cuda_stream:
            return CaptureStreams(capture, body)
    raise RuntimeError(
        f"{attempts} new CUDA streams were all the capture stream {capture.cuda_stream:#x}: the stream pool has a "
        f"single stream; conditional capture needs two (use mechanism='early_exit')"
    )


class IfNodeSplicer:
    """Opens and closes CUDA IF-node bodies inside the capture that the current stream is running.

    Usage inside ``torch.cuda.graph(...)``: ``create_conditions(mask, stages)`` once, before any body
    (it launches the kernel that sets condition j to ``mask[stages[j]] != 0`` on every replay), then
    ``with splicer.body(j): ...`` for body j, in order. ``body_stream`` must not be the capture stream.
    """

    def __init__(self, body_stream: torch.cuda.Stream) -> None:
        from ... import _ext

        why = conditional_nodes_unavailable()
        if why is not None:
            raise RuntimeError(f"CUDA IF nodes are unavailable: {why}")
        self._ext = _ext._C
        self._body_stream = body_stream
        self._handles: list[int] = []

    def create_conditions(self, mask: torch.Tensor, stages: Sequence[int]) -> None:
        capture = torch.cuda.current_stream(mask.device)
        self._handles = list(self._ext.create_conditions(capture.cuda_stream, mask, list(stages)))

    @contextmanager
    def body(self, index: int) -> Iterator[None]:
        """Ops run in this block are captured into the body of IF node ``index`` (in creation order)."""
        capture = torch.cuda.current_stream(self._body_stream.device)
        self._ext.begin_if(capture.cuda_stream, self._body_stream.cuda_stream, self._handles[index])
        body_ok = False
        try:
            with torch.cuda.stream(self._body_stream):
                yield
            body_ok = True
        finally:
            try:
                self._ext.end_if(self._body_stream.cuda_stream)
            except RuntimeError:
                if body_ok:  # otherwise the body's own error is the one to report
                    raise


class CapturedGraph:
    """The static buffers and the single CUDA graph of one input shape.

    ``replay(x)`` copies x (the captured shape and dtype) into the static input, replays the graph on
    the current stream and returns the static output buffer (overwritten by the next replay).
    """

    def __init__(
        self,
        program: Program,
        input_shape: tuple[int, ...],
        input_dtype: torch.dtype,
        device: torch.device,
        mask: torch.Tensor,
        mechanism: str,
        streams: CaptureStreams | None = None,
    ) -> None:
        if mechanism not in ("conditional", "early_exit"):
            raise ValueError(f"a graph captures mechanism 'conditional' or 'early_exit', got {mechanism!r}")
        self.input_shape = tuple(input_shape)
        self.tensors: dict[Value, torch.Tensor] = allocate_buffers(program, input_shape[0], device, input_dtype)
        self.input = self.tensors[program.input]
        self.output = self.tensors[program.output]
        self._warm_up(program, mask, mechanism)
        splicer = None
        if mechanism == "conditional":
            streams = streams or capture_streams(lambda: torch.cuda.Stream(device))
            splicer = IfNodeSplicer(streams.body)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=None if streams is None else streams.capture):
            execute(program, self.tensors, mask, bodies=mechanism, splicer=splicer)

    def _warm_up(self, program: Program, mask: torch.Tensor, mechanism: str) -> None:
        """Run every kernel variant the capture will launch, outside the capture, on a side stream.

        Everything runs (an all-ones mask): autotuning an early-exit kernel while its stage is skipped
        would time an empty launch. Bodies run with the exit index the capture will use, since it
        selects the compiled variant (early exit on or off).
        """
        run_all = torch.tensor(program.mask_values((False,) * program.num_stages), dtype=mask.dtype, device=mask.device)
        side = torch.cuda.Stream(mask.device)
        side.wait_stream(torch.cuda.current_stream(mask.device))
        with torch.cuda.stream(side):
            if mechanism == "early_exit":
                execute(program, self.tensors, run_all, bodies="early_exit")
            else:
                execute(program, self.tensors, run_all, bodies="host", skip=(False,) * program.num_stages)
        torch.cuda.current_stream(mask.device).wait_stream(side)

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        self.graph.replay()
        return self.output
