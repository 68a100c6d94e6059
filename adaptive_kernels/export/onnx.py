"""``export_onnx``: one ONNX graph that serves every sub-network (or a static one), ``export_pt2`` and
``verify_onnx`` (ONNX Runtime against the model, per sub-network)."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..models.base import ADNModel
from ..models.mobilenetv2 import MobileNetV2ADN
from ..models.resnet import ResNetADN
from ..models.skip import SkipConfig, SkipLike, skip_to_mask, skip_to_str
from ..models.swin import SwinTransformerADN
from ..models.vit import VisionTransformerADN
from ..numerics import relative_error
from .masked import MaskedForward, StaticForward, forget_cond_compilations
from .mobilenetv2 import MobileNetV2MaskedForward
from .resnet import ResNetMaskedForward
from .swin import SwinMaskedForward
from .vit import ViTMaskedForward

INPUT, MASK, OUTPUT = "input", "mask", "logits"
FORMATS = ("onnx", "pt2")
_MASKED_FORWARDS: dict[type[ADNModel], type[MaskedForward]] = {
    ResNetADN: ResNetMaskedForward,
    MobileNetV2ADN: MobileNetV2MaskedForward,
    VisionTransformerADN: ViTMaskedForward,
    SwinTransformerADN: SwinMaskedForward,
}


class ExportError(ValueError):
    """The model (or this input) cannot be exported; the message says why."""


def masked_forward(model: ADNModel) -> MaskedForward:
    """The tensor-mask forward of ``model`` (see ``export/masked.py``): ``forward(x, mask)``."""
    for family, wrapper in _MASKED_FORWARDS.items():
        if isinstance(model, family):
            return wrapper(model)
    raise ExportError(
        f"{type(model).__name__} cannot be exported: export knows ResNet-ADN, MobileNetV2-ADN, ViT/DeiT-ADN and "
        f"Swin-T-ADN (models from adaptive_kernels.create_model)"
    )


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
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder; give a file name, e.g. {path / 'model.onnx'}")
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: {folder} is not a folder")
    # Open it for appending, as the export will write it: os.access says yes to root even where writes fail.
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror}; choose another path") from e
    if not existed:
        path.unlink()
    return path


@contextlib.contextmanager
def _inference_only(model: nn.Module) -> Iterator[None]:
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
    forget_cond_compilations()
    with _inference_only(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecation chatter
        try:
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=[OUTPUT],
                                        dynamic_shapes=dynamic_shapes, verbose=False, optimize=True)
        except Exception as e:  # the exporter raises many types; name the model and the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"could not export {type(model).__name__} to ONNX: {first}") from e
    batch = program.model.graph.inputs[0].shape[0]
    if isinstance(batch, int) == dynamic_batch:  # never a file that serves other batch sizes than it says
        raise ExportError(f"exporting {type(model).__name__} gave a graph whose batch is "
                          f"{'fixed at ' + str(batch) if dynamic_batch else 'dynamic'} although dynamic_batch="
                          f"{dynamic_batch}: please report this with your torch version ({torch.__version__})")
    program.save(str(path))
    _finish_file(path, one_graph=skip is None)
    return path


def graphs_of(node) -> Iterator:
    """The sub-graphs of an ONNX node (an ``If``'s two branches, a ``Loop``'s body; none for most ops)."""
    import onnx

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        yield from a.graphs


def _place_weights(model) -> int:
    """Move every weight of the main graph into the deepest sub-graph that holds all its uses (an ``If`` branch,
    or the branch of a nested ``If`` that both inner branches read it from); returns how many moved.

    ONNX Runtime's CPU layout pass (NCHWc: blocked channels, conv + add + ReLU fused) left the convolutions of the
    skippable sub-paths unblocked while their weights were in the main graph: ResNet-50-ADN's one graph was 1.2x
    the static file at batch 1, and about the same after this move. A weight in the outer branch of a nested
    ``If`` serves its inner branches' convolutions as well (every convolution of MobileNetV2-ADN's laid-out graph is
    blocked). Nothing is copied: a weight the main graph or two top-level branches read stays where it is."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    where: dict[str, tuple] = {}  # weight -> the common prefix of the sub-graph paths of its uses
    inside: dict[int, object] = {}

    def visit(g, path: tuple) -> None:
        for node in g.node:
            for name in weights.intersection(node.input):
                common = where.get(name, path)
                k = 0
                while k < min(len(common), len(path)) and common[k] == path[k]:
                    k += 1
                where[name] = common[:k]
            for sub in graphs_of(node):
                inside[id(sub)] = sub
                visit(sub, (*path, id(sub)))

    visit(graph, ())
    kept, moved = [], 0
    for t in graph.initializer:
        path = where.get(t.name, ())
        if path:
            inside[path[-1]].initializer.append(t)
            moved += 1
        else:
            kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return moved


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(graph) -> None:
    """Drop the Python stack trace the exporter records on every node (tens of kB each, a third of MobileNetV2's
    file and more in nested branches); the node's other metadata (its module and FX node) stays."""
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for sub in graphs_of(node):
            _drop_stack_traces(sub)


def _finish_file(path: Path, one_graph: bool) -> None:
    """The saved export as it is served: stack traces dropped and, in a one graph, weights placed in branches."""
    import onnx

    model = onnx.load(str(path))
    _drop_stack_traces(model.graph)
    if one_graph:
        _place_weights(model)
    onnx.save(model, str(path))


def export_pt2(model: ADNModel, path: str | os.PathLike, example_input: torch.Tensor, *, skip: SkipLike = None,
               dynamic_batch: bool = True) -> Path:
    """``torch.export`` of the static sub-network ``skip`` (None = super-net), saved with
    ``torch.export.save`` (for ExecuTorch / AOTInductor); ``torch.export.load(path).module()(x)`` runs it."""
    path = _check_arguments(model, path, example_input)
    masked_forward(model)
    wrapper = StaticForward(model, model.parse_skip(skip))
    x = _traced_input(example_input.detach(), dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _inference_only(model), torch.no_grad():
        try:
            program = torch.export.export(wrapper, (x,), dynamic_shapes=dynamic_shapes)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"could not torch.export {type(model).__name__}: {first}") from e
    torch.export.save(program, str(path))
    return path


def onnxruntime_session(path_or_bytes: str | os.PathLike | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session; ``threads``: intra-op threads (default torch's current count).

    Its worker threads do not spin between runs: a spinning pool keeps the cores busy after each run, so torch
    (or another session) running next on the same cores is slowed down. Measured on 2 cores, ResNet-50-ADN b1,
    2 threads: one session alone 29.3 ms spinning vs 30.2 ms not; two sessions run in turn 57 / 60 ms spinning vs
    32 / 34 ms not."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"onnxruntime is not installed ({e}): pip install adaptive_kernels[onnx]") from e
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: not the optimizer's notes on initializers it removed
    model = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def verify_onnx(
    path: str | os.PathLike, model: ADNModel, x: torch.Tensor, skips: Sequence[SkipLike] | None = None
) -> dict[str, float]:
    """Relative error of ONNX Runtime on the file at ``path`` against ``model`` for each sub-network
    (default: all 2^S for a one-graph file; a static file is checked for the ``skips`` given, default super)."""
    session = onnxruntime_session(path)
    one_graph = any(i.name == MASK for i in session.get_inputs())
    if skips is None:
        configs = model.skip_configs() if one_graph else [model.parse_skip(None)]
    else:
        configs = [model.parse_skip(s) for s in skips]
    errors = {}
    with _inference_only(model), torch.no_grad():
        for skip in configs:
            feed = {INPUT: x.detach().cpu().float().numpy()}
            if one_graph:
                feed[MASK] = mask_of(skip).numpy()
            got = torch.from_numpy(session.run([OUTPUT], feed)[0])
            errors[skip_to_str(skip)] = relative_error(got, model(x, skip).float().cpu())
    return errors
