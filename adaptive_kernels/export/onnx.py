"""``export_onnx``: one ONNX graph that serves every sub-network (or a static one), and ``export_pt2``; the
graph's input and output names and its mask input (``mask_of``)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .._files import atomic_path, check_output_file
from .._quiet import muted
from ..models.base import ADNModel
from ..models.skip import SkipConfig, SkipLike, skip_to_mask, skip_to_str
from .graph import finish_file
from .masked import ExportError, StaticForward, masked_forward, own_trace_memory

logger = logging.getLogger(__name__)  # the phases of an export at INFO (the CLI shows them; docs/export.md)
INPUT, MASK, OUTPUT = "input", "mask", "logits"
#: one trace at a time: torch.export (dynamo) is not thread-safe, and ``own_trace_memory`` empties torch's process-wide
#: caches around a trace (``compile`` / ``export_onnx`` from two threads: the second waits for the first's trace)
_TRACE_LOCK = threading.Lock()
FORMATS = ("onnx", "pt2")


def mask_of(skip: SkipConfig) -> torch.Tensor:
    """The mask input for a parsed skip configuration (a tuple of bools, True = skip the stage, as
    ``parse_skip`` and ``model.skip_configs()`` give): int32 (S,), 1 = run the stage's skippable sub-path."""
    return torch.tensor(skip_to_mask(skip), dtype=torch.int32)


def _check_arguments(model: object, path: str | os.PathLike, example_input: object) -> Path:
    if not isinstance(model, ADNModel):
        raise ExportError(
            f"{type(model).__name__} cannot be exported: export takes an ADN model from "
            f"adaptive_kernels.create_model(...)"
        )
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor (N, C, H, W), got {type(example_input).__name__}")
    model.check_input(example_input)
    return check_output_file(path)


@contextlib.contextmanager
def inference_only(model: nn.Module) -> Iterator[None]:
    """Eval mode and parameters that need no gradient, restored afterwards. Without gradients, tracing
    ``torch.cond`` skips its autograd pass (measured: half the export time of a small ViT)."""
    was_training = model.training
    needed_grad = [p for p in model.parameters() if p.requires_grad]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p in needed_grad:
            p.requires_grad_(True)


def _traced_input(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    # torch.export specialises a dimension whose example size is 1: trace a dynamic batch with 2 images.
    if dynamic_batch and example_input.shape[0] == 1:
        return example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input


def export_onnx(
    model: ADNModel,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    skip: SkipLike = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (eval-mode semantics) to an ONNX file at ``path``; returns the path.

    ``skip=None``: ONE graph for every sub-network, inputs ``input`` (N, C, H, W) and ``mask`` (int32, one
    entry per skippable stage, 1 = run that stage's skippable sub-path), output ``logits`` (N, num_classes);
    each stage is an ONNX ``If`` on its mask bit. ``skip`` given ("base", "TFFT", bools; "super" is the
    super-net): a static graph of that sub-network alone, input ``input`` only.
    example_input: (N, C, H, W) like the inputs to serve (its C, H, W are fixed in the graph; N too unless
    ``dynamic_batch``). Norms are the model's as trained.
    """
    path = _check_arguments(model, path, example_input)
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    wrapper: nn.Module
    if skip is None:
        wrapper = masked_forward(model)
    else:
        masked_forward(model)  # the same family check, so both forms accept the same models
        wrapper = StaticForward(model, model.parse_skip(skip))
    x = _traced_input(example_input.detach(), dynamic_batch)
    args: tuple[torch.Tensor, ...] = (x,) if skip is not None else (x, mask_of((False,) * model.num_skippable_stages))
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = ({0: batch},) if skip is not None else ({0: batch}, None)
    names = [INPUT] if skip is not None else [INPUT, MASK]
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it; say so before tracing)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({e}): pip install adaptive_kernels[onnx]") from e
    name = type(model).__name__
    started = time.perf_counter()
    what = (f"every sub-network in one graph, {len(wrapper.blocks)} If node(s)" if skip is None
            else f"sub-network {skip_to_str(wrapper.skip)}")
    logger.info("[export] tracing %s (%s) and translating it to ONNX ...", name, what)
    with (_TRACE_LOCK, inference_only(model), torch.no_grad(), warnings.catch_warnings(), muted(),
          own_trace_memory()):
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecation chatter
        try:
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=[OUTPUT],
                                        dynamic_shapes=dynamic_shapes, verbose=False, optimize=False)
            logger.info("[export] optimizing the ONNX graph (%.0f s so far) ...", time.perf_counter() - started)
            program.optimize()  # what optimize=True does, after the renaming: a phase line of its own
        except Exception as e:  # the exporter raises many types; name the model and the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"could not export {name} to ONNX: {first}") from e
    batch = program.model.graph.inputs[0].shape[0]
    if isinstance(batch, int) == dynamic_batch:  # never a file that serves other batch sizes than it says
        raise ExportError(f"exporting {type(model).__name__} gave a graph whose batch is "
                          f"{'fixed at ' + str(batch) if dynamic_batch else 'dynamic'} although dynamic_batch="
                          f"{dynamic_batch}: please report this with your torch version ({torch.__version__})")
    logger.info("[export] writing the ONNX file (%.0f s so far) ...", time.perf_counter() - started)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        finish_file(tmp, one_graph=skip is None)
    logger.info("[export] exported %s in %.0f s", name, time.perf_counter() - started)
    return path


def export_pt2(model: ADNModel, path: str | os.PathLike, example_input: torch.Tensor, *, skip: SkipLike = None,
               dynamic_batch: bool = True) -> Path:
    """``torch.export`` of the static sub-network ``skip`` (None = super-net), saved with
    ``torch.export.save`` (for ExecuTorch / AOTInductor); ``torch.export.load(path).module()(x)`` runs it."""
    path = _check_arguments(model, path, example_input)
    masked_forward(model)
    wrapper = StaticForward(model, model.parse_skip(skip))
    x = _traced_input(example_input.detach(), dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    logger.info("[export] tracing %s (sub-network %s) with torch.export ...", type(model).__name__,
                skip_to_str(wrapper.skip))
    with inference_only(model), torch.no_grad(), own_trace_memory():
        try:
            program = torch.export.export(wrapper, (x,), dynamic_shapes=dynamic_shapes)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"could not torch.export {type(model).__name__}: {first}") from e
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(program, f)  # a file object: by its name torch would warn that it does not end in .pt2
    return path
