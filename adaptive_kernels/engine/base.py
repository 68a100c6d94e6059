"""The runtime-neutral engine: what every runtime's engine shares (the default sub-network, ``set_skip``, ``profile``,
the input checks). A runtime (``cuda/``, ``ort/``, ``openvino/``, ``reference.py``) subclasses :class:`Engine` with
how it runs one sub-network for one call (``_run``) and, when it has a better clock than the wall, times one
(``_time_runs``).

Threads (docs/engine.md, "Threads"): one engine serves calls from many threads. A call runs the sub-network it
resolved when it started (its ``skip``, else the default) whatever other threads do; what a call needs is passed
down, not stored on the engine, and a runtime with state shared by every call (the CUDA engine's static buffers and
mask) makes its ``_run`` atomic."""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import nn

from ..models.skip import SkipConfig, SkipLike, all_skip_configs, parse_skip, skip_to_str

logger = logging.getLogger(__name__)
#: ``profile`` reports its progress at most this often (seconds): a quick profile prints one line
PROGRESS_EVERY_S = 5.0


class Engine(nn.Module):
    """An ADN model compiled for inference; build one with :func:`adaptive_kernels.compile`.

    ``engine(x, skip=None)`` runs the sub-network ``skip`` (None: the default, the one set last, initially the
    super-net; a ``skip`` becomes the default) and returns the logits (N, num_classes) as a new tensor.
    ``engine.set_skip(skip)`` sets the default without rebuilding anything; ``engine.skip`` is the default,
    ``skip_configs()`` all 2^S; ``profile()`` times each. Safe to call from many threads: a call with ``skip`` runs
    exactly that sub-network.
    ``mechanism`` names how the engine runs: ``"conditional"`` / ``"early_exit"`` (one CUDA graph),
    ``"onnxruntime"`` / ``"openvino"`` (the CPU engines) or ``"reference"`` (the eager model). ``capture_count`` counts CUDA
    graph captures (0 for a runtime without graphs). Inputs must match the example input given to ``compile`` in
    C, H, W, dtype and device, and in batch size too unless ``dynamic_batch``.
    """

    capture_count: int = 0

    def __init__(self, *, num_stages: int, example_input: torch.Tensor, mechanism: str, dynamic_batch: bool) -> None:
        super().__init__()
        self.num_skippable_stages = num_stages
        self.mechanism = mechanism
        self.dynamic_batch = dynamic_batch
        self._input_shape = tuple(example_input.shape)
        self._input_dtype = example_input.dtype
        self._device = example_input.device
        self._example = example_input.detach().clone()
        self._skip: SkipConfig = (False,) * num_stages

    # ---- skip configuration ----------------------------------------------------------------------
    @property
    def skip(self) -> SkipConfig:
        """The default sub-network, which calls without ``skip`` run (True = skip that stage's skippable sub-path)."""
        return self._skip

    def skip_configs(self) -> list[SkipConfig]:
        """All 2^S configurations, super-net first, base-net last."""
        return all_skip_configs(self.num_skippable_stages)

    def set_skip(self, skip: SkipLike) -> None:
        """Set the default sub-network, run by the following calls without ``skip``: None/"super", "base", "TFFT" or
        a bool sequence. Calls already running (in other threads) keep theirs."""
        self._skip = parse_skip(skip, self.num_skippable_stages)

    def _call_skip(self, skip: SkipLike) -> SkipConfig:
        """The sub-network a call with ``skip`` runs: the default for None, else ``skip``, which becomes the default."""
        if skip is None:
            return self._skip
        config = parse_skip(skip, self.num_skippable_stages)
        self._skip = config
        return config

    # ---- running ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, C, H, W) like the example input -> logits (N, num_classes)."""
        self._check_input(x)
        return self._run(x, self._call_skip(skip))

    def _run(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        """Sub-network ``skip`` on a checked input, whatever other threads run meanwhile; the default is not read."""
        raise NotImplementedError

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
    def profile(self, iters: int = 50, warmup: int = 5, *, batch_size: int | None = None) -> dict[str, float]:
        """Median latency in microseconds of every sub-network on the compile-time example input, or on a batch of
        ``batch_size`` copies of its first image (another batch size than the example's needs ``dynamic_batch``).

        The CUDA-graph engine times one graph replay with CUDA events; the others the wall clock of a call
        (synchronised on CUDA). Returns ``{"FFFF": us, ..., "TTTT": us}`` (super-net first), ready for
        :func:`~adaptive_kernels.select_skip`. Each run names its sub-network: the default is untouched, and calls
        from other threads meanwhile run theirs (and, sharing the machine, slow the timings down).
        """
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive int, got {iters!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        x = self._profile_input(batch_size)
        configs = self.skip_configs()
        logger.info("[profile] timing %d sub-networks, %d runs each after %d warm-up, batch %d ...", len(configs),
                    iters, warmup, x.shape[0])
        started = last = time.perf_counter()
        table = {}
        for done, skip in enumerate(configs, 1):
            table[skip_to_str(skip)] = statistics.median(self._time_runs(x, skip, iters, warmup))
            if time.perf_counter() - last >= PROGRESS_EVERY_S and done < len(configs):
                last = time.perf_counter()
                logger.info("[profile] %d/%d sub-networks timed (%.0f s)", done, len(configs), last - started)
        return table

    def _profile_input(self, batch_size: int | None) -> torch.Tensor:
        if batch_size is None or batch_size == self._input_shape[0]:
            return self._example
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None (the example's batch), got {batch_size!r}")
        if not self.dynamic_batch:
            raise ValueError(
                f"profile(batch_size={batch_size}): this engine runs batch {self._input_shape[0]} only; compile "
                f"with dynamic_batch=True to profile other batch sizes"
            )
        return self._example[:1].expand(batch_size, *self._input_shape[1:]).contiguous()

    def _time_runs(self, x: torch.Tensor, skip: SkipConfig, iters: int, warmup: int) -> list[float]:
        """Microseconds of ``iters`` runs of sub-network ``skip`` on ``x`` after ``warmup`` untimed ones (wall clock)."""
        cuda = self._device.type == "cuda"
        with torch.no_grad():
            for _ in range(warmup):
                self._run(x, skip)
            times = []
            for _ in range(iters):
                if cuda:
                    torch.cuda.synchronize(self._device)
                t0 = time.perf_counter()
                self._run(x, skip)
                if cuda:
                    torch.cuda.synchronize(self._device)
                times.append((time.perf_counter() - t0) * 1e6)
        return times

    def __repr__(self) -> str:  # a submodule's repr would drown the summary
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return (
            f"{self._describe()}, mechanism={self.mechanism}, input={self._input_shape} {self._input_dtype} on "
            f"{self._device}, dynamic_batch={self.dynamic_batch}, captures={self.capture_count}"
        )

    def _describe(self) -> str:
        """What the engine serves, for its repr."""
        raise NotImplementedError
