"""The tensor-mask forward that export traces: every sub-network of an ADN model in one graph.

An ADN model's own ``forward(x, skip)`` takes the sub-network as Python bools, so a trace of it holds one
sub-network. :class:`MaskedForward` runs the model's own submodules instead with the skip mask as a tensor
input, ``mask: int32 (S,)``, 1 = run stage k's skippable sub-path (the engine's mask contract), and wraps each
stage in ``torch.cond`` on its mask bit, which ``torch.onnx.export(..., dynamo=True)`` turns into an ONNX
``If``. The then-branch is the stage as the super-net runs it (normal norms and the skippable sub-path), the
else-branch the stage's mandatory layers with their ``_skip`` norms: the one bit selects both the sub-path
and the norm set, and each branch is a plain static sub-graph in which ONNX Runtime still folds every
BatchNorm into its convolution (a norm chosen per layer by ``where`` would keep both norms unfolded).

A calibrated model (``adaptive_kernels.calibrate``) normalises with the table row of the whole sub-network, not
of one stage: the graph computes the sub-network's id from the mask (``subnet_index``: the first stage is the
most significant bit, a skipped stage a 1) and every calibrated norm gathers its mean and variance with it,
so one graph still serves every calibrated sub-network (those norms stay unfolded: ONNX Runtime cannot fold
statistics known only at run time).

Where two consecutive stages hold little of the model's weights (at most :data:`PAIR_SHARE` together: the small
early stages of MobileNetV2, ResNet-50 and Swin-T), they share one nested ``If``: an ``If`` on the first bit whose
branches are each an ``If`` on the second bit, with both stages in every inner branch (four sub-graphs). Every
``If`` an input runs through costs ONNX Runtime a fixed price per call (its sub-graph's execution frame, and on a
CPU with the blocked layout a reorder of the activation in and out), which a static file does not pay and which
shows on a fast network: MobileNetV2-ADN at batch 1 (~5 ms on 2 cores), one graph / static 1.033 -> 1.023
(super-net) and 1.062 -> 1.046 (base-net) with its five stages in three ``If``s (150 paired rounds; docs/export.md). The
price of a pair is that ONNX Runtime folds its norms into each of the four inner branches' convolutions: a session
holds the pair's convs four times instead of twice, hence the bound on the pair's share. torch's ONNX export does
not trace a third level.

The eager models are untouched: this module only reads them. One subclass per family (``export/resnet.py``,
``mobilenetv2.py``, ``vit.py``, ``swin.py``) names its prologue, its stage layers and its epilogue, and registers
itself for its model class with :func:`register_masked_forward`; :func:`masked_forward` finds it from the model.
"""

from __future__ import annotations

import contextlib
import gc
import linecache
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import nn

from ..models.base import ADNModel
from ..models.norms import running_subnet
from ..models.skip import stage_bit


class ExportError(ValueError):
    """The model (or this input) cannot be exported; the message says why."""


@contextlib.contextmanager
def own_trace_memory() -> Iterator[None]:
    """Run an export's trace with none of what ``torch.cond`` compiled before it, and keep none of what the trace
    leaves in torch's process-wide caches, so that a process exporting (or ``compile``-ing on the CPU) again and
    again does not grow with each trace.

    Outside ``torch.compile`` (here: export's tracing), torch.cond compiles one wrapper function of its own and
    keeps the result: the next export of the same architecture reused it with the earlier trace's batch size
    baked in (an export with ``dynamic_batch=False``, then one with ``True``: a file with a fixed batch). So the
    wrapper's cache is dropped before and after the trace. What else a trace leaves behind, dropped after it:

    * the backends its compiles register in dynamo's ``cached_backends`` (with them the traces' graphs: ~9 MB per
      ``compile`` of ResNet-50-ADN on the CPU);
    * the ``weakref.finalize`` callbacks dynamo's guards put on long-lived objects (modules, classes, code
      objects), each holding its guards' ``CheckFunctionManager`` for the life of that object: only those whose
      guards serve no cache entry any more (the wrapper's, just dropped);
    * the generated source of the trace's FX graph modules, which FX keeps for tracebacks (its ``_loader`` and
      ``linecache``), and inductor's memo of their stack frames (``PyCodeCache.stack_frames_for_code``);
    * the trace's ShapeEnvs (one per ``torch.cond`` compile, each with its FakeTensorMode and fake tensors): the
      ``lru_cache``s on ShapeEnv's methods are class-level and keyed by ``self``, so they kept them (emptied: they
      have no per-key removal); and a cond's input that is a view (``mask.to(bool).split(1)``) closes a cycle through
      C++ that gc cannot collect: dynamo fakes the view and its base, the view's TensorImpl holds the base's, which
      then owns the base's Python object, whose ``fake_mode.shape_env.tracked_fakes`` holds the view. Setting
      ``tracked_fakes`` to None (what torch does for a compile attempt it discards) opens it. Both are needed. The
      trace's ShapeEnvs are the ones a scan of gc's objects finds after it and did not before (two scans, 0.15-0.2 s
      each in the test's process, ~490k objects, on the loaded dev machine);
    * the ``(traceback, metric names)`` records dynamo's per-thread MetricsContext appends for each compile and
      never drops.

    Measured on the CPU, ``compile`` of ResNet-20-ADN (width 2, 8x8 images) repeated in one process: +5.3 MB per
    compile with the wrapper's cache and the backends dropped only, +1.2 MB with the first three (without the
    finalizers' part +3.6, without the sources' +2.9; 3 ShapeEnvs more alive after each compile), +0.13 MB with
    all (calls 5-30, +0.07 MB over 20-30; the ShapeEnv count stays at 4). What is left is torch's own and small:
    dynamo's last 64 compilation metrics (a bounded deque), the dead weakrefs of its code trackers.

    Threads: traces run one at a time (``_TRACE_LOCK``): "the trace's ShapeEnvs" are those made while it runs, so
    two exports at once would release each other's mid-trace. A ``torch.compile`` of the caller's own running in
    another thread at the same moment is not covered by the lock (its ShapeEnv would lose its ``tracked_fakes``)."""
    with _TRACE_LOCK:
        yield from _own_trace_memory()


#: one export trace at a time in the process (see own_trace_memory)
_TRACE_LOCK = threading.RLock()  # reentrant: an export inside an export (none today) must not deadlock


def _own_trace_memory() -> Iterator[None]:
    from torch._dynamo import eval_frame

    backends = set(eval_frame.cached_backends)
    finalizers = set(weakref.finalize._registry)
    sources = set(_fx_sources())
    shape_envs = weakref.WeakSet(_shape_envs())
    edits = _metric_edits()
    edits_before = len(edits)
    _forget_cond_compilations()
    try:
        yield
    finally:
        _forget_cond_compilations()
        for key in set(eval_frame.cached_backends) - backends:
            del eval_frame.cached_backends[key]
        _detach_dead_guard_finalizers(set(weakref.finalize._registry) - finalizers)
        _forget_fx_sources(set(_fx_sources()) - sources)
        _release_shape_envs([env for env in _shape_envs() if env not in shape_envs])
        del edits[edits_before:]
        _forget_fx_stack_frames()


def _forget_cond_compilations() -> None:
    # Only the wrapper's cache; if this torch no longer has that wrapper, every compile cache
    # (torch.compiler.reset(): the process's compiled functions compile again on their next call).
    def codes(code: types.CodeType) -> Iterator[types.CodeType]:
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield const
                yield from codes(const)

    cond = sys.modules[torch.cond.__module__].cond
    wrappers = [c for c in codes(cond.__code__) if c.co_name == "_cond_op_wrapper"]
    if not wrappers:
        torch.compiler.reset()
    for code in wrappers:
        torch._dynamo.reset_code(code)


def _detach_dead_guard_finalizers(new: set) -> None:
    """Detach the finalizers among ``new`` that would invalidate dynamo guards no cache entry holds any more."""
    from torch._dynamo.guards import CheckFunctionManager

    for finalizer in new:
        info = weakref.finalize._registry.get(finalizer)
        callback = getattr(info, "func", None)
        guards = getattr(getattr(callback, "func", None), "__self__", None)
        if (isinstance(guards, CheckFunctionManager)
                and getattr(getattr(guards, "guard_manager", None), "cache_entry", None) is None):
            finalizer.detach()


def _fx_sources() -> dict[str, str]:
    from torch.fx import graph_module

    return graph_module._loader.eval_cache


def _forget_fx_sources(keys: set[str]) -> None:
    sources = _fx_sources()
    for key in keys:
        sources.pop(key, None)
        linecache.cache.pop(key, None)


def _shape_envs() -> list:
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return [o for o in gc.get_objects() if issubclass(type(o), ShapeEnv)]


def _release_shape_envs(new: list) -> None:
    """Let the ShapeEnvs in ``new`` (the trace's, done with) be freed: drop them from the ``lru_cache``s of
    ShapeEnv's methods (class-level, so keyed by ``self``; only ``cache_clear`` exists: the caches are emptied,
    a memo recomputed on the next use) and break their cycle through C++ (``tracked_fakes``)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for attr in vars(ShapeEnv).values():
        if callable(getattr(attr, "cache_clear", None)):
            attr.cache_clear()
    for env in new:
        # dynamo records each input it fakes; a view's fake holds its base's TensorImpl from C++, which keeps the
        # base's Python object, whose fake_mode holds the ShapeEnv, whose tracked_fakes hold the view: a cycle gc
        # does not see. torch breaks it the same way for a compile attempt it discards (OutputGraph cleanup).
        env.tracked_fakes = None


def _metric_edits() -> list:
    # dynamo's per-thread MetricsContext appends (traceback, metric names) for each metric a compile sets, for its
    # "already set" error, and resets its metrics at each new compile but never these (torch 2.14)
    from torch._dynamo.utils import get_metrics_context

    edits = getattr(get_metrics_context(), "_edits", None)
    return edits if isinstance(edits, list) else []


def _forget_fx_stack_frames() -> None:
    # inductor memoizes the stack frames of generated code by (file, line) with functools.cache, the trace's FX
    # files (``<eval_with_key>.N``, new names each trace) among them: ~116 entries a compile; the memo has no
    # per-key removal, so all of it goes (recomputed from PyCodeCache.linemaps on the next use)
    codecache = sys.modules.get("torch._inductor.codecache")
    stack_frames = getattr(getattr(codecache, "PyCodeCache", None), "stack_frames_for_code", None)
    if callable(getattr(stack_frames, "cache_clear", None)):
        stack_frames.cache_clear()


def _run_layers(layers: Sequence[nn.Module], skip_stage: bool, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x, skip_stage)
    return x


def subnet_id(mask: torch.Tensor) -> torch.Tensor:
    """``subnet_index`` of the configuration a mask (int32 (S,), 1 = run) selects, as an int64 scalar tensor."""
    s = mask.shape[0]
    weights = torch.tensor([stage_bit(k, s) for k in range(s)], dtype=torch.int64, device=mask.device)
    return ((1 - mask.to(torch.int64)) * weights).sum()


PAIR_SHARE = 0.2  # the largest share of the model's parameters two stages may hold to share one nested If

Group = tuple[int, list[nn.Module]]


def _parameter_count(layers: Sequence[nn.Module]) -> int:
    return sum(p.numel() for layer in layers for p in layer.parameters())


def pair_small_stages(groups: Sequence[Group], total_parameters: int) -> list[list[Group]]:
    """The stage groups in blocks of one ``If`` each, in order: two consecutive groups form a block (one nested
    ``If``) when they hold at most ``PAIR_SHARE`` of ``total_parameters`` together; pairs are taken from the first
    stage on."""
    blocks: list[list[Group]] = []
    k = 0
    while k < len(groups):
        pair = groups[k:k + 2]
        if len(pair) == 2 and _parameter_count(pair[0][1] + pair[1][1]) <= PAIR_SHARE * total_parameters:
            blocks.append(list(pair))
            k += 2
        else:
            blocks.append([groups[k]])
            k += 1
    return blocks


def _run_block(runs: Sequence[torch.Tensor], block: Sequence[Group], skips: tuple[bool, ...],
               x: torch.Tensor) -> torch.Tensor:
    """The stages of ``block`` with the skip flags chosen so far (``skips``), each further flag an ``If``."""
    if len(skips) == len(block):
        for (_, layers), skip_stage in zip(block, skips):
            x = _run_layers(layers, skip_stage, x)
        return x
    bit = runs[block[len(skips)][0]]
    return torch.cond(bit, partial(_run_block, runs, block, (*skips, False)),
                      partial(_run_block, runs, block, (*skips, True)), (x,))


def group_by_stage(layers: Sequence[nn.Module]) -> list[Group]:
    """Consecutive layers that follow the same skip flag (``layer.stage``), in order: one ``If`` each, or one
    nested ``If`` for a pair (:func:`pair_small_stages`)."""
    groups: list[Group] = []
    for layer in layers:
        if groups and groups[-1][0] == layer.stage:
            groups[-1][1].append(layer)
        else:
            groups.append((layer.stage, [layer]))
    return groups


class MaskedForward(nn.Module):
    """``forward(x, mask)``: x (N, C, H, W), mask int32 (S,) with 1 = run -> logits (N, num_classes).

    Subclasses implement ``prologue``, ``stage_layers`` (every layer with ``.stage`` and
    ``forward(x, skip_stage)``, in order) and ``epilogue``, reusing the model's submodules.
    """

    def __init__(self, model: ADNModel) -> None:
        super().__init__()
        self.model = model
        self.groups = group_by_stage(self.stage_layers())
        self.blocks = pair_small_stages(self.groups, sum(p.numel() for p in model.parameters()))

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stage_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def epilogue(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.model.is_calibrated:
            return self._calibrated_forward(x, mask)
        return self._stages(x, mask)

    def _stages(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # One Cast and one Split give every If its condition (a one-element bool). A Gather, Equal and Not per
        # stage (``mask[k] != 0``) cost MobileNetV2-ADN's base-net 1.5 % at batch 1 on ONNX Runtime, 2 cores:
        # one graph / static 1.097 -> 1.082 (super-net 1.057 -> 1.052), 120-150 paired rounds.
        runs = mask.to(torch.bool).split(1)
        x = self.prologue(x)
        for block in self.blocks:
            x = _run_block(runs, block, (), x)
        return self.epilogue(x)

    def _calibrated_forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The norms in the branches read the id from the running sub-network (a free variable of theirs, lifted by
        # torch.cond); it is this trace's alone and reset on exit.
        with running_subnet(subnet_id(mask)):
            return self._stages(x, mask)


_MASKED_FORWARDS: dict[type[ADNModel], type[MaskedForward]] = {}


def register_masked_forward(family: type[ADNModel]) -> Callable[[type[MaskedForward]], type[MaskedForward]]:
    """Class decorator: the decorated ``MaskedForward`` subclass is the tensor-mask forward of ``family`` and of
    its subclasses (``@register_masked_forward(ResNetADN)`` in ``export/resnet.py``)."""
    def register(wrapper: type[MaskedForward]) -> type[MaskedForward]:
        if family in _MASKED_FORWARDS:
            raise RuntimeError(f"a masked forward for {family.__name__} registered twice")
        _MASKED_FORWARDS[family] = wrapper
        return wrapper
    return register


def masked_forward(model: ADNModel) -> MaskedForward:
    """The tensor-mask forward of ``model`` (``forward(x, mask)``): the one registered for the nearest class in
    ``type(model).__mro__``, so a subclass of a family is exported as that family."""
    for family in type(model).__mro__:
        if family in _MASKED_FORWARDS:
            return _MASKED_FORWARDS[family](model)
    raise ExportError(
        f"{type(model).__name__} cannot be exported: export knows {', '.join(f.__name__ for f in _MASKED_FORWARDS)} "
        f"and their subclasses (models from adaptive_kernels.create_model)"
    )


class StaticForward(nn.Module):
    """``forward(x)``: the model's own forward with one fixed sub-network (what a static export traces)."""

    def __init__(self, model: ADNModel, skip: tuple[bool, ...]) -> None:
        super().__init__()
        self.model = model
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.skip)
