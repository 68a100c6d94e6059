"""What the benchmark suites and ``bench/gpu_check.sh`` share: the mode, timing, rows, the environment record
and the inference providers.

Modes
  FULL  (a CUDA device is present): the real models (ResNet-50-ADN, ViT-B/16-ADN), fp16, 224 px, batch 1 and 64.
  SMOKE (no CUDA device, or ADN_BENCH_SMOKE=1): tiny models, fp32, a few rounds, only the providers that mean
        something on a CPU, so CI keeps the suites working in seconds. Smoke rows carry ``mode="smoke"`` and go to
        a temporary folder unless ADN_BENCH_OUT names one: CPU numbers never land in bench/results/ by accident.

Providers (how a sub-network is run)
  eager               the reference model, sub-network chosen by python skip flags;
  cuda_graph          one manual CUDA graph captured per sub-network;
  compile             torch.compile(mode="reduce-overhead") of the model with its skip fixed;
  compile_freeze      the same with inductor freezing (weights folded as constants, BN into convs);
  engine_conditional  adaptive_kernels.compile(..., mechanism="conditional"): one graph, IF nodes;
  engine_early_exit   adaptive_kernels.compile(..., mechanism="early_exit"): one graph, kernels exit early.
Every provider is timed the way a user calls it: input in, output out (graph providers copy the input into
their static buffer inside the timed call).

Rows: one dict per measurement with ``ROW_KEYS`` (+ ``mode``, ``metric`` and metric-specific keys), written as
a JSON list per suite. ``macs`` is per image. Times are µs; on a GPU they come from CUDA events around each call
(synchronised per call, so a row is the latency of one call, launch overhead included).

Environment knobs: ADN_BENCH_OUT (row folder; default bench/results/run_<time>/ in FULL mode), ADN_BENCH_SMOKE=1,
ADN_BENCH_WARMUP, ADN_BENCH_ROUNDS, ADN_BENCH_COMPILE_ALL=1 (compile providers for every sub-network, not only
super/base: slow), ADN_BENCH_PROVIDERS=eager,cuda_graph,... and ADN_BENCH_BATCHES=1,64 (run only these providers /
batch sizes of the latency suites; gpu_check.sh splits the providers over its two calls), ADN_BENCH_ROWS_TAG=name
(rows go to ``<suite>_<name>.json``, so two runs of one suite into one folder keep both), ADN_GIT_SHA (when the tree
has no .git, e.g. a copy on a GPU machine).

``python -m bench._harness env`` prints the environment record as JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # Triton kernels run under the interpreter without a GPU; must be set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from torch import nn

from adaptive_kernels._files import write_text
from adaptive_kernels.numerics import relative_error
from bench._rows import ENV_KEYS, PROVIDERS, ROW_KEYS

REPO = Path(__file__).resolve().parent.parent
SMOKE = not CUDA or os.environ.get("ADN_BENCH_SMOKE") == "1"
MODE = "smoke" if SMOKE else "full"
DEVICE = torch.device("cuda" if CUDA else "cpu")

# Providers that measure nothing meaningful without a GPU: marked ``gpu`` and skipped on CPU machines.
GPU_ONLY_PROVIDERS = frozenset({"cuda_graph", "compile", "compile_freeze"})
COMPILE_PROVIDERS = frozenset({"compile", "compile_freeze"})
ENGINE_MECHANISM = {"engine_conditional": "conditional", "engine_early_exit": "early_exit"}

_ENV_ROW_KEYS = (*ENV_KEYS, "git_dirty", "autotune")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def env_subset(name: str, choices: tuple, parse: Callable[[str], object] = str) -> tuple:
    """The entries of ``choices`` that the comma list in ``$name`` names, in ``choices``' order (all when unset)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return choices
    try:
        wanted = {parse(v.strip()) for v in value.split(",") if v.strip()}
    except ValueError:
        wanted = None
    if not wanted or not wanted <= set(choices):
        raise ValueError(f"{name}={value!r}: use a comma list of {', '.join(map(str, choices))}")
    return tuple(c for c in choices if c in wanted)


# ---- models and inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: registry name, builder kwargs, input size and skippable stage count.

    ``num_stages`` comes from docs/method.md (not from the model), so the parametrisation is known at collection time
    and a model that deviates from the paper fails loudly in ``parse_skip`` instead of being benchmarked.
    ``optional_kwargs``: builder kwargs the model may not support yet (the test skips, naming them).
    """

    name: str
    input_size: tuple[int, int]
    num_stages: int
    channels_last: bool = False
    kwargs: tuple[tuple[str, object], ...] = ()
    optional_kwargs: bool = False


def dtype_for_mode() -> torch.dtype:
    # fp16 is the GPU target; the CPU smoke run uses fp32 (fp16 conv on CPU is slow and not what we ship).
    return torch.float32 if SMOKE and not CUDA else torch.float16


def skip_str(skip: tuple[bool, ...]) -> str:
    return "".join("T" if s else "F" for s in skip)


def benchmark_skips(num_stages: int) -> list[tuple[bool, ...]]:
    """Sub-networks to benchmark: super and base first (the headline rows, measured first so that a time-capped
    run still has them), then the intermediate ones (FULL mode only)."""
    from adaptive_kernels.models.skip import all_skip_configs

    configs = all_skip_configs(num_stages)
    head = [configs[0], configs[-1]]
    return head if SMOKE else head + configs[1:-1]


def latency_cases(spec: ModelSpec, batches: tuple[int, ...]) -> list:
    """``pytest.param(provider, batch, skip)`` for every case of a latency suite, in the order they should run
    when time is short: super and base for every provider (engines first) first, then the intermediate
    sub-networks, engines first.

    Compile providers cost seconds of compilation per sub-network, so they cover super and base only unless
    ADN_BENCH_COMPILE_ALL=1. ADN_BENCH_PROVIDERS and ADN_BENCH_BATCHES keep only the providers / batches they name.
    """
    skips = benchmark_skips(spec.num_stages)
    providers = env_subset("ADN_BENCH_PROVIDERS", PROVIDERS)
    batches = env_subset("ADN_BENCH_BATCHES", tuple(batches), int)
    # engines first: a torch.compile case costs seconds of compilation, and a capped run must keep our rows
    head_providers = sorted(providers, key=lambda p: p not in ENGINE_MECHANISM)
    head = [(provider, batch, skip) for batch in batches for skip in skips[:2] for provider in head_providers]
    rest_providers = ["engine_conditional", "engine_early_exit", "cuda_graph", "eager"]
    if os.environ.get("ADN_BENCH_COMPILE_ALL") == "1":
        rest_providers += ["compile", "compile_freeze"]
    rest_providers = [p for p in rest_providers if p in providers]
    rest = [(provider, batch, skip) for provider in rest_providers for batch in batches for skip in skips[2:]]
    return [
        pytest.param(
            provider,
            batch,
            skip,
            marks=[pytest.mark.gpu] if provider in GPU_ONLY_PROVIDERS else [],
            id=f"{provider}-b{batch}-{skip_str(skip)}",
        )
        for provider, batch, skip in head + rest
    ]


class BenchContext:
    """Per-suite cache: the model, inputs per batch, MACs per sub-network, engines per (batch, mechanism).

    One engine serves every sub-network (that is the point of it), so it is built once and reused.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.dtype = dtype_for_mode()
        self._model: nn.Module | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._macs: dict[tuple[bool, ...], int] = {}
        self.engines: dict[tuple[int, str], tuple[nn.Module, float]] = {}

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = build_model(self.spec, self.dtype)
        return self._model

    def input(self, batch: int) -> torch.Tensor:
        """x: (batch, in_chans, H, W), seeded, in the suite's dtype (channels_last for conv nets)."""
        if batch not in self._inputs:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, self.model.in_chans, *self.spec.input_size, generator=gen)
            x = x.to(DEVICE, self.dtype)
            if self.spec.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._inputs[batch] = x
        return self._inputs[batch]

    def macs(self, skip: tuple[bool, ...]) -> int:
        if skip not in self._macs:
            self._macs[skip] = int(self.model.macs(skip, self.spec.input_size))
        return self._macs[skip]

    def engine(self, batch: int, mechanism: str) -> tuple[nn.Module, float]:
        """(engine, seconds to build it, capture included) for this batch and mechanism."""
        key = (batch, mechanism)
        if key not in self.engines:
            self.engines[key] = build_engine(self.model, self.input(batch), self.dtype, mechanism)
        return self.engines[key]

    def close(self) -> None:
        self.engines.clear()
        self._inputs.clear()
        self._model = None
        release_compiled()


def build_model(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The registered model in eval mode on DEVICE/dtype; skips the test when the model is not there yet."""
    import adaptive_kernels as ak

    if spec.name not in ak.list_models():
        pytest.skip(f"model {spec.name!r} is not registered yet (the models issue has not landed it)")
    torch.manual_seed(0)
    try:
        model = ak.create_model(spec.name, **dict(spec.kwargs))
    except TypeError as e:
        if not spec.optional_kwargs:
            raise
        pytest.skip(f"{spec.name} does not take the smoke-size kwargs {dict(spec.kwargs)} yet: {e}")
    # A zero-initialised classifier (ViT's head) gives all-zero logits, against which any engine output would
    # pass the correctness gate before timing: give it random weights.
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and not layer.weight.detach().any():
            nn.init.normal_(layer.weight, std=0.02)
    model = model.to(DEVICE, dtype).eval()
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---- timing --------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call latencies in µs."""

    samples_us: list[float]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def _quantile(self, q: int) -> float:
        if len(self.samples_us) < 2:
            return self.samples_us[0]
        return statistics.quantiles(self.samples_us, n=5, method="inclusive")[q // 20 - 1]

    @property
    def p20_us(self) -> float:
        return self._quantile(20)

    @property
    def p80_us(self) -> float:
        return self._quantile(80)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class _CallTimer:
    """Times one call: CUDA events on a GPU (synchronised per call), perf_counter on a CPU. µs."""

    def __init__(self) -> None:
        if CUDA:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        if CUDA:
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) * 1e3
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e3


def measure(
    fn: Callable[[], object],
    benchmark=None,
    *,
    warmup: int | None = None,
    rounds: int | None = None,
    target_s: float = 0.25,
) -> Timing:
    """Latency of ``fn()``: ``warmup`` untimed calls, then ``rounds`` timed calls.

    Without an explicit ``rounds`` the count is chosen from the warm-up so that timing takes about ``target_s``
    (20..200 calls in FULL mode, 3 in SMOKE mode). With a pytest-benchmark fixture the timed calls run under
    ``benchmark.pedantic`` (its table then shows wall time per call, synchronisation included); the returned
    samples are ours (CUDA events on a GPU).
    """
    if warmup is None:
        warmup = env_int("ADN_BENCH_WARMUP", 1 if SMOKE else 10)
    timer = _CallTimer()
    sync()
    estimate = [timer(fn) for _ in range(max(1, warmup))]
    if rounds is None:
        auto = 3 if SMOKE else int(min(200, max(20, target_s * 1e6 / max(statistics.median(estimate), 1.0))))
        rounds = env_int("ADN_BENCH_ROUNDS", auto)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: list[float] = []

    def timed_call() -> None:
        samples.append(timer(fn))

    if benchmark is not None and not benchmark.disabled:
        benchmark.pedantic(timed_call, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        for _ in range(rounds):
            timed_call()
    return Timing(samples)


def resident_mib() -> float:
    """This process's resident memory (MiB) after a garbage collection and glibc's ``malloc_trim`` (freed memory
    handed back to the system)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS")).split()[1]) / 1024


def openvino_static_fp32_mib(onnx_model: bytes, x: torch.Tensor, threads: int) -> float:
    """What deleting one static fp32 super-net compiled by OpenVINO (cut out of the one graph ``onnx_model``, shaped
    for ``x``, run once) hands back (MiB): the reference the INT8 engine's memory is compared with."""
    import numpy as np

    from adaptive_kernels.engine.openvino.engine import shared_core
    from adaptive_kernels.engine.openvino.subnets import specialize

    static = shared_core().read_model(onnx_model)
    static = specialize(static, np.ones(static.input("mask").get_partial_shape()[0].get_length(), np.int32))
    static.reshape({"input": list(x.shape)})
    compiled = shared_core().compile_model(static, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT":
                                                           "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    compiled.create_infer_request().infer({"input": x.numpy()})
    del static
    held = resident_mib()
    del compiled
    return held - resident_mib()


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none), recorded beside CPU timings."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def time_call_us(fn: Callable[[], object]) -> float:
    """µs of one call on the CPU (perf_counter)."""
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e3


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]`` (both lists: one sample per round, in round order)."""
    if len(times) != len(reference) or not times:
        raise ValueError(f"paired samples need one time per round each, got {len(times)} and {len(reference)}")
    return statistics.median(t / ref for t, ref in zip(times, reference, strict=True))


def by_model_and_batch(rows: list[dict]):
    """Yields ``(model, batch, group, by_skip)`` per model and batch in the rows' order: that section's rows and
    ``{(skip, provider): row}``."""
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        group = [r for r in rows if r["model"] == model and r["batch"] == batch]
        yield model, batch, group, {(r["skip"], r["provider"]): r for r in group}


def ratio_ranges(paired: list[dict]) -> str:
    """One table line: each paired ratio's range and median over the sub-networks (``paired``: per sub-network,
    {(provider, reference): ratio})."""
    return "Over the sub-networks: " + "; ".join(
        f"{p} / {ref} {min(r):.3f}-{max(r):.3f} (median {statistics.median(r):.3f})"
        for (p, ref), r in ((pair, [ratios[pair] for ratios in paired]) for pair in paired[0])
    ) + "."


def interleaved_rounds(runners: dict, providers: tuple, configs: list, rounds: int, shuffle) -> dict:
    """CPU timings of ``runners[provider, skip]()`` (µs), one sample per round each: per round and sub-network,
    the providers take turns in a shuffled order (``shuffle``: a ``random.Random``), so that none always follows
    the same one. A call right after another provider's run finds the caches holding that run (each call's own
    Python and torch work costs several times what it does warm), or its threads still busy; a rotating order
    kept the cycle (the engine followed the one-graph session in three rounds of four)."""
    samples: dict = {(provider, skip): [] for provider in providers for skip in configs}
    for _ in range(rounds):
        for skip in configs:
            order = list(providers)
            shuffle.shuffle(order)
            for provider in order:
                samples[provider, skip].append(time_call_us(runners[provider, skip]))
    return samples


def wall_s(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call, device work included."""
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


# ---- environment and rows ------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# Beside torch/triton (own keys): what else decides a number or whether a suite can run.
_RECORDED_PACKAGES = (
    "numpy",
    "pytest",
    "pytest-benchmark",
    "matplotlib",
    "nvidia-cudnn-cu13",
    "nvidia-cublas",
    "nvidia-cublas-cu12",
    "nvidia-cudnn-cu12",
    "pybind11",
    "ninja",
    "setuptools",
)


def _package_version(*names: str) -> str | None:
    """Installed version of the first of ``names`` found (read from metadata: importing torchvision takes seconds)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def _kernel_autotune() -> bool:
    from adaptive_kernels.kernels import _common

    return _common.AUTOTUNE and not _common.INTERPRET


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict:
    """The CPU a number was measured on: vendor, family/model, name and which of ``CPU_FLAGS`` it has."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", "unknown"), "cpu_vendor": fields.get("vendor_id", "unknown"),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"), "cores": os.cpu_count(),
            "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}}


def environment() -> dict:
    """Card, driver and versions: what a number needs beside it to be a result."""
    import adaptive_kernels as ak

    triton_version = _package_version("triton", "pytorch-triton")
    torchvision_version = _package_version("torchvision")
    if CUDA:
        gpu = torch.cuda.get_device_name(0)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = smi.splitlines()[0].strip() if smi else None
        props = torch.cuda.get_device_properties(0)
        device_detail = {
            "sm_count": props.multi_processor_count,
            "gpu_memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
        }
    else:
        gpu = f"none (cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        driver, device_detail = None, {}
    sha = os.environ.get("ADN_GIT_SHA") or _run(["git", "rev-parse", "HEAD"])
    status = (
        _run(["git", "status", "--porcelain", "--untracked-files=no"]) if not os.environ.get("ADN_GIT_SHA") else None
    )
    return {
        "gpu": gpu,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_sha": sha or "unknown",
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "torchvision": torchvision_version,
        "adaptive_kernels": ak.__version__,
        "ext": ak.HAS_EXT,
        "ext_error": ak.EXT_ERROR,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": {name: _package_version(name) for name in _RECORDED_PACKAGES if _package_version(name)},
        "mode": MODE,
        # False: one fixed config per Triton kernel (ADN_KERNEL_AUTOTUNE=0), so the engine's numbers are untuned
        "autotune": _kernel_autotune(),
        **device_detail,
    }


def make_row(
    *,
    provider: str,
    model: str,
    skip: tuple[bool, ...] | str,
    batch: int,
    dtype: torch.dtype,
    timing: Timing | None,
    macs: int | None,
    metric: str = "latency",
    **extra,
) -> dict:
    """One measurement. ``timing=None`` for rows that are not a latency (e.g. memory): the µs keys are null."""
    env = environment()
    row = {
        "provider": provider,
        "model": model,
        "skip": skip if isinstance(skip, str) else skip_str(skip),
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "median_us": None if timing is None else round(timing.median_us, 3),
        "p20_us": None if timing is None else round(timing.p20_us, 3),
        "p80_us": None if timing is None else round(timing.p80_us, 3),
        "macs": macs,
        **{k: env[k] for k in _ENV_ROW_KEYS},
        "mode": MODE,
        "metric": metric,
        "samples": 0 if timing is None else len(timing.samples_us),
    }
    row.update(extra)
    return row


@dataclass
class RowWriter:
    """Collects one suite's rows and rewrites ``path`` (a JSON list) after every row, so a run cut short by a
    timeout keeps everything measured so far."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row lacks the keys {missing}: build rows with make_row()")
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(self.rows, indent=1) + "\n")


@functools.cache
def results_dir() -> Path | None:
    """Where rows go: ADN_BENCH_OUT; else, in FULL mode, a new ``bench/results/run_<UTC time>/`` (a plain
    ``pytest bench`` on a GPU never overwrites committed rows); else None (smoke: the caller picks a temp dir)."""
    out = os.environ.get("ADN_BENCH_OUT")
    if out:
        return Path(out)
    return None if SMOKE else REPO / "bench" / "results" / time.strftime("run_%Y%m%dT%H%M%SZ", time.gmtime())


# ---- providers -----------------------------------------------------------------------------------------------
class SkipBound(nn.Module):
    """The model with its sub-network fixed: ``forward(x)`` runs ``model(x, skip=skip)`` (what torch.compile gets,
    so each compiled artefact is one sub-network's graph)."""

    def __init__(self, model: nn.Module, skip: tuple[bool, ...]):
        super().__init__()
        self.model = model
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, skip=self.skip)


@dataclass
class Runner:
    """``fn()`` runs the sub-network on the suite's input and returns the output.

    ``setup_s``: wall seconds from nothing to the first output (capture / compile / first call included).
    ``info``: provider-specific row keys.
    """

    fn: Callable[[], torch.Tensor]
    setup_s: float
    info: dict = field(default_factory=dict)


def release_compiled() -> None:
    """Forget every torch.compile artefact (and its CUDA graphs), so the next compile starts from zero."""
    torch._dynamo.reset()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def capture_cuda_graph(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """One CUDA graph of ``fn`` on a static copy of ``x``. Returns ``run(x_new)``: copies the input into the static
    buffer, replays, returns the static output (the closure keeps the graph alive)."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (cuDNN/cuBLAS pick and allocate here)
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fn(static_x)

    def run(x_new: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x_new)
        graph.replay()
        return static_y

    return run


def engine_unavailable(provider: str) -> str | None:
    """Why an engine provider cannot run here, or None."""
    import adaptive_kernels as ak

    if not hasattr(ak, "compile"):
        return "adaptive_kernels.compile (the engine issue) is not there yet"
    if CUDA and ENGINE_MECHANISM[provider] == "conditional":
        try:
            from adaptive_kernels.engine.cuda.capture import conditional_nodes_unavailable
        except ImportError:  # an engine without that helper: the extension is what it needs
            why = None if ak.HAS_EXT else ak.EXT_ERROR
        else:
            why = conditional_nodes_unavailable()
        if why:
            return f"mechanism='conditional' is unavailable here: {why}"
    return None


def build_engine(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, mechanism: str) -> tuple[nn.Module, float]:
    """(engine, seconds to build and capture it). A model the engine does not lower yet runs as the
    reference (``engine.mechanism == "reference"``), which the rows record."""
    import adaptive_kernels as ak

    seconds, engine = wall_s(lambda: ak.compile(model, x, dtype=dtype, mechanism=mechanism))
    return engine, seconds


def make_runner(provider: str, ctx: BenchContext, batch: int, skip: tuple[bool, ...]) -> Runner:
    """Make ``skip``'s sub-network runnable with ``provider`` (skips the test when the provider is missing).
    Call inside ``torch.inference_mode()``."""
    model, x = ctx.model, ctx.input(batch)
    if provider == "eager":
        fn = functools.partial(model, x, skip=skip)
        seconds, _ = wall_s(fn)
        return Runner(fn, seconds)
    if provider == "cuda_graph":
        if not CUDA:
            pytest.skip("cuda_graph needs a CUDA device")
        t0 = time.perf_counter()
        run = capture_cuda_graph(functools.partial(model, skip=skip), x)
        run(x)
        sync()
        return Runner(functools.partial(run, x), time.perf_counter() - t0)
    if provider in COMPILE_PROVIDERS:
        release_compiled()
        bound = SkipBound(model, skip)
        if provider == "compile":
            compiled = torch.compile(bound, mode="reduce-overhead")
        else:
            # mode= and options= are exclusive: reduce-overhead is inductor's triton.cudagraphs option.
            compiled = torch.compile(bound, options={"freezing": True, "triton.cudagraphs": CUDA})
        fn = functools.partial(compiled, x)
        seconds, _ = wall_s(fn)
        return Runner(fn, seconds)
    if provider in ENGINE_MECHANISM:
        reason = engine_unavailable(provider)
        if reason:
            pytest.skip(reason)
        engine, build_s = ctx.engine(batch, ENGINE_MECHANISM[provider])
        t0 = time.perf_counter()
        engine.set_skip(skip)
        fn = functools.partial(engine, x)
        fn()
        sync()
        info = {
            "engine_build_s": round(build_s, 3),
            "capture_count": getattr(engine, "capture_count", None),
            # "reference" means the engine fell back to the eager model (no CUDA, or a model it cannot lower)
            "engine_mode": getattr(engine, "mechanism", None),
        }
        return Runner(fn, time.perf_counter() - t0, info)
    raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")


def tolerance(dtype: torch.dtype) -> float:
    # DESIGN.md: engine vs reference < 1e-2 in fp16; fp32 paths agree to < 1e-4.
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def run_latency_case(
    get_benchmark: Callable[[], object],
    rows: RowWriter,
    ctx: BenchContext,
    provider: str,
    batch: int,
    skip: tuple[bool, ...],
) -> dict:
    """Time one sub-network with one provider, check its output against eager, write the row and return it.
    ``get_benchmark()``: the pytest-benchmark fixture or None (conftest's ``benchmark_or_none``)."""
    skip = ctx.model.parse_skip(skip)  # a model that deviates from docs/method.md's stage count fails here
    with torch.inference_mode():
        ref = ctx.model(ctx.input(batch), skip=skip).clone()
        runner = make_runner(provider, ctx, batch, skip)
        err = relative_error(runner.fn(), ref)
        if not err < tolerance(ctx.dtype):  # also catches NaN
            pytest.fail(
                f"{provider} {ctx.spec.name} skip={skip_str(skip)} b{batch}: output differs from eager by "
                f"relative error {err:.3g} (tolerance {tolerance(ctx.dtype):g}); not benchmarking a wrong result"
            )
        benchmark = get_benchmark()
        if benchmark is not None:
            benchmark.group = f"{ctx.spec.name} b{batch} {skip_str(skip)}"
        timing = measure(runner.fn, benchmark)
    row = make_row(
        provider=provider,
        model=ctx.spec.name,
        skip=skip,
        batch=batch,
        dtype=ctx.dtype,
        timing=timing,
        macs=ctx.macs(skip),
        setup_s=round(runner.setup_s, 4),
        rel_err=err,
        **runner.info,
    )
    rows.add(row)
    if benchmark is not None:
        benchmark.extra_info.update({k: row[k] for k in ("median_us", "p20_us", "p80_us", "macs", "setup_s")})
    return row


def main(argv: list[str]) -> int:
    if argv[1:] == ["env"]:
        print(json.dumps(environment(), indent=1))
        return 0
    print("usage: python -m bench._harness env   (prints the environment record as JSON)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
