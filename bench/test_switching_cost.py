"""What it costs to make a new sub-network available and to switch between sub-networks, per provider
(ResNet-50-ADN, fp16, batch 1). Rows: ``switching_cost.json``, one ``metric`` per kind of measurement:

  make_available  one row per sub-network, in first-use order (super, base, then the others): ``setup_s`` is the
                  wall time from "never run" to its first output, the earlier sub-networks being available
                  already (capture, compile, or an engine's one-off build for the first one); ``median_us`` is its
                  steady latency afterwards. For ``compile`` ONE torch.compile'd model is fed new sub-networks
                  until two past dynamo's recompile limit, and each row records what was measured: graphs dynamo
                  compiled for it (``new_graphs``), whether dynamo reported hitting the limit
                  (``recompile_limit_hit``), and the eager latency of the same sub-network (``eager_us``).
  switch          alternating super-net / base-net on every call: ``median_us`` per call; ``switch_us`` = that
                  minus the mean of the two steady latencies (what a switch adds).
  set_skip        engines only: one ``engine.set_skip`` call (the device write) timed alone.
  memory          GPU only: allocator bytes over making every sub-network available (``peak_alloc_bytes``,
                  ``held_alloc_bytes``, ``held_reserved_bytes``, relative to the loaded model).

compile_freeze is not repeated here: its compile time per sub-network is the ``setup_s`` of the latency rows.
SMOKE mode (no GPU): resnet20_adn at 32x32, fp32, super and base; ``compile`` uses backend="eager"
with recompile_limit=1 so that dynamo's limit logic runs (and is checked) in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch
from torch._dynamo.utils import counters

from adaptive_kernels.models.skip import all_skip_configs
from bench import _harness as harness
from bench._harness import (
    CUDA,
    SMOKE,
    BenchContext,
    ModelSpec,
    make_row,
    measure,
    relative_error,
    skip_str,
    sync,
    tolerance,
    wall_s,
)

SPEC = (
    ModelSpec("resnet20_adn", input_size=(32, 32), num_stages=3)
    if SMOKE
    else ModelSpec("resnet50_adn", input_size=(224, 224), num_stages=4, channels_last=True)
)
BATCH = 1
SMOKE_SUBNETS = 2
SMOKE_RECOMPILE_LIMIT = 1
# Engines first: when a time cap cuts the run short, the numbers this project exists for are already written.
PROVIDERS = ("engine_conditional", "engine_early_exit", "eager", "cuda_graph", "compile")
# Steady-latency timing per sub-network is short here: the latency suites hold the careful numbers.
STEADY = {"warmup": 1, "rounds": 2} if SMOKE else {"warmup": 5, "rounds": 30}


@pytest.fixture(scope="module")
def ctx():
    context = BenchContext(SPEC)
    yield context
    context.close()


def first_use_order(num_stages: int) -> list[tuple[bool, ...]]:
    """super, base, then the intermediate sub-networks (SMOKE: super and base)."""
    every = all_skip_configs(num_stages)
    order = [every[0], every[-1], *every[1:-1]]
    return order[:SMOKE_SUBNETS] if SMOKE else order


def recompile_limit() -> tuple[str, int]:
    """(name, value) of dynamo's per-function recompile limit (``cache_size_limit`` before torch 2.6)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            return name, int(getattr(cfg, name))
    raise RuntimeError("this torch has neither torch._dynamo.config.recompile_limit nor cache_size_limit")


class DynamoWarnings(logging.Handler):
    """Collects the warnings dynamo logs (the recompile-limit message is one) while attached."""

    LOGGERS = ("torch._dynamo", "torch._dynamo.convert_frame")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def limit_hit_since(self, index: int) -> bool:
        """Did dynamo report hitting its recompile limit in the messages from ``index`` on?"""
        return any("recompile_limit" in m or "cache_size_limit" in m for m in self.messages[index:])


class Available:
    """Makes sub-networks available one by one with one provider; ``run(skip)`` is a call of an available one."""

    def __init__(self, provider: str, ctx: BenchContext):
        self.provider, self.ctx = provider, ctx
        self.x = ctx.input(BATCH)
        self.runs: dict[tuple[bool, ...], object] = {}
        self.engine = None
        self.captures_after_build = None
        self.compiled = None
        if provider in harness.ENGINE_MECHANISM:
            reason = harness.engine_unavailable(provider)
            if reason:
                pytest.skip(reason)
        elif provider == "cuda_graph" and not CUDA:
            pytest.skip("cuda_graph needs a CUDA device")
        elif provider == "compile":
            counters.clear()
            # SMOKE: dynamo without inductor, so the recompile-limit behaviour is exercised in seconds on a CPU.
            self.compiled = (
                torch.compile(ctx.model, backend="eager") if SMOKE else torch.compile(ctx.model, mode="reduce-overhead")
            )

    def make(self, skip: tuple[bool, ...]) -> tuple[float, torch.Tensor, dict]:
        """Make ``skip`` available: (seconds to its first output, that output, row keys)."""
        model, x = self.ctx.model, self.x
        info: dict = {}
        if self.provider == "eager":
            self.runs[skip] = lambda: model(x, skip=skip)
        elif self.provider == "cuda_graph":
            run = harness.capture_cuda_graph(lambda inp: model(inp, skip=skip), x)
            self.runs[skip] = lambda: run(x)
        elif self.provider == "compile":
            self.runs[skip] = lambda: self.compiled(x, skip=skip)
        else:
            if self.engine is None:
                self.engine, build_s = self.ctx.engine(BATCH, harness.ENGINE_MECHANISM[self.provider])
                self.captures_after_build = getattr(self.engine, "capture_count", None)
                info["engine_build_s"] = round(build_s, 4)
                info["engine_mode"] = getattr(self.engine, "mechanism", None)

            def run():
                self.engine.set_skip(skip)
                return self.engine(x)

            self.runs[skip] = run
        seconds, out = wall_s(self.runs[skip])
        return seconds + info.get("engine_build_s", 0.0), out, info


def _memory_baseline() -> tuple[int, int]:
    sync()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


@pytest.mark.parametrize(
    "provider", [pytest.param(p, marks=[pytest.mark.gpu] if p == "cuda_graph" else []) for p in PROVIDERS]
)
def test_make_available_and_switch(benchmark_or_none, rows, ctx, provider):
    order = first_use_order(SPEC.num_stages)
    if provider == "compile":
        limit_name, limit = recompile_limit()
        if SMOKE:
            limit = SMOKE_RECOMPILE_LIMIT
        count = int(os.environ.get("ADN_BENCH_COMPILE_SUBNETS", limit + 2))
        order = order[:count]
    common = {"provider": provider, "model": SPEC.name, "batch": BATCH, "dtype": ctx.dtype}
    harness.release_compiled()  # nothing compiled earlier may count in this provider's memory or recompile limit
    with torch.inference_mode():
        refs = {skip: ctx.model(ctx.input(BATCH), skip=skip).clone() for skip in order}
        baseline = _memory_baseline() if CUDA else None
        limit_patch = (
            torch._dynamo.config.patch(**{limit_name: limit})
            if provider == "compile" and SMOKE
            else contextlib.nullcontext()
        )
        with limit_patch, DynamoWarnings() as dynamo_log:
            available = Available(provider, ctx)
            steady: dict[tuple[bool, ...], float] = {}
            for skip in order:
                graphs_before = counters["stats"]["unique_graphs"]
                warned_before = len(dynamo_log.messages)
                setup_s, out, info = available.make(skip)
                err = relative_error(out, refs[skip])
                assert err < tolerance(ctx.dtype), f"{provider} skip={skip_str(skip)}: relative error {err:.3g}"
                timing = measure(available.runs[skip], **STEADY)
                steady[skip] = timing.median_us
                if provider == "compile":
                    info["new_graphs"] = counters["stats"]["unique_graphs"] - graphs_before
                    info["recompile_limit_hit"] = dynamo_log.limit_hit_since(warned_before)
                    info[limit_name] = limit
                    info["backend"] = "eager" if SMOKE else "inductor (reduce-overhead)"
                    info["eager_us"] = round(
                        measure(lambda s=skip: ctx.model(ctx.input(BATCH), skip=s), **STEADY).median_us, 3
                    )
                rows.add(
                    make_row(
                        **common,
                        skip=skip,
                        timing=timing,
                        macs=ctx.macs(skip),
                        metric="make_available",
                        setup_s=round(setup_s, 4),
                        rel_err=err,
                        **info,
                    )
                )

        if baseline is not None:
            alloc0, reserved0 = baseline
            rows.add(
                make_row(
                    **common,
                    skip="all",
                    timing=None,
                    macs=None,
                    metric="memory",
                    num_available=len(order),
                    peak_alloc_bytes=torch.cuda.max_memory_allocated() - alloc0,
                    held_alloc_bytes=torch.cuda.memory_allocated() - alloc0,
                    held_reserved_bytes=torch.cuda.memory_reserved() - reserved0,
                )
            )

        a, b = order[0], order[1]
        run_a, run_b = available.runs[a], available.runs[b]

        def alternate():
            run_a()
            return run_b()

        benchmark = benchmark_or_none()
        if benchmark is not None:
            benchmark.group = f"switching {SPEC.name} b{BATCH}"
        pair = measure(alternate, benchmark)
        per_call = harness.Timing([t / 2 for t in pair.samples_us])
        extra = {}
        if available.engine is not None:
            captures = getattr(available.engine, "capture_count", None)
            extra["capture_count"] = captures
            # the engine's promise: every sub-network from the one capture made at build time
            assert captures == available.captures_after_build, (
                f"{provider}: capture_count went from {available.captures_after_build} to {captures} while switching"
            )
            set_skip = measure(lambda: available.engine.set_skip(a))
            rows.add(make_row(**common, skip=a, timing=set_skip, macs=None, metric="set_skip"))
        switch_us = per_call.median_us - (steady[a] + steady[b]) / 2
        rows.add(
            make_row(
                **common,
                skip=f"{skip_str(a)}<->{skip_str(b)}",
                timing=per_call,
                macs=None,
                metric="switch",
                switch_us=round(switch_us, 3),
                **extra,
            )
        )

    if provider == "compile" and SMOKE:
        # Checks the detection itself (on a GPU the rows just report what torch did): the first sub-network
        # compiles a graph; the one past the limit compiles none and dynamo says it hit the limit.
        made = [r for r in rows.rows if r["metric"] == "make_available" and r["provider"] == "compile"][-len(order) :]
        assert made[0]["new_graphs"] >= 1 and not made[0]["recompile_limit_hit"], made[0]
        assert made[limit]["recompile_limit_hit"] and made[limit]["new_graphs"] == 0, made[limit]
    harness.release_compiled()
