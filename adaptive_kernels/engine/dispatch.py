"""``compile``: check the arguments once, then hand the model to the runtime that serves this input best.

Runtimes, one folder or module each: ``cuda/`` (one CUDA graph, Triton kernels), ``ort/`` (one ONNX graph on ONNX
Runtime, the CPU engine), ``openvino/`` (the CPU engine on OpenVINO, fp32 or INT8, on request) and ``reference.py`` (the eager model, where neither can run). Each builds an
:class:`~.base.Engine`; nothing here runs a model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..kernels.backend import STRUCTURE_ONLY
from ..models.base import ADNModel
from ..models.skip import SkipLike
from .base import Engine
from .cuda.engine import build_cuda_engine, cuda_unavailable
from .cuda.lowering import lower
from .cuda.program import NotLoweredError
from .openvino.engine import INSTALL_HINT as OPENVINO_INSTALL_HINT
from .openvino.engine import OpenVinoEngine, openvino_unavailable
from .ort.engine import INSTALL_HINT, OnnxRuntimeEngine, onnxruntime_unavailable
from .reference import ReferenceEngine

MECHANISMS = ("auto", "conditional", "early_exit", "onnxruntime", "openvino")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: INT8 runs on OpenVINO only (ONNX Runtime's INT8 was no faster than its fp32 on the 2-core dev machine)
INT8 = torch.int8


def compile(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float16,
    mechanism: str = "auto",
    dynamic_batch: bool = False,
    calibration: torch.Tensor | Iterable | None = None,
    skips: Iterable[SkipLike] | None = None,
) -> Engine:
    """Compile an ADN model into an :class:`~.base.Engine` that runs all of its 2^S sub-networks from one graph.

    model: an ADN model (ResNet-ADN, MobileNetV2-ADN, ViT/DeiT-ADN, Swin-T-ADN; for a Swin input size that the
    model pads, e.g. one whose feature maps are not multiples of the window, the engine runs the reference,
    with a warning). Eval-mode semantics whatever ``model.training`` says: BatchNorm running statistics
    are folded into per-channel scale/shift (the normal and the ``_skip`` set; for a calibrated model one row per
    sub-network, picked on the device by the sub-network id that ``set_skip`` writes after the stage bits), dropout
    is off.
    example_input: (N, C, H, W) on the device to run on; its shape, dtype and device are what the engine
    accepts. dtype: compute dtype (float16, bfloat16 or float32; norm parameters stay fp32), or torch.int8 with
    mechanism="openvino" and ``calibration`` images.
    mechanism: "conditional" (CUDA IF nodes; needs the adaptive_kernels._C extension and CUDA >= 12.4),
    "early_exit" (kernels return on their mask bit), "onnxruntime" (the CPU engine: one ONNX graph on ONNX Runtime,
    ``pip install adaptive_kernels[onnx]``), "openvino" (the CPU engine on OpenVINO: fp32 from one graph, or INT8
    from one quantized model per sub-network; ``pip install adaptive_kernels[openvino]``) or "auto" (on CUDA
    conditional when available; on the CPU onnxruntime when installed).
    dynamic_batch: accept other batch sizes (the CUDA engine captures one more graph per new size, with a warning).
    calibration (dtype=torch.int8 only): images the INT8 ranges of every sub-network are measured on, a tensor
    (N, C, H, W) like the example input or an iterable of such batches (or (images, labels) pairs): un-augmented
    training images normalised as for training; the first 300 are used.
    skips (dtype=torch.int8 only): the sub-networks to build ("TFFF", "base", bool sequences; default all 2^S).
    Each INT8 sub-network is a quantized model of its own, so memory and build time grow with their number; the
    engine then serves these only (``skip_configs()``; another one is refused with the list).

    With a CPU example input and ONNX Runtime installed, the engine is an
    :class:`~.ort.engine.OnnxRuntimeEngine` (exact fp32, whatever ``dtype`` says); with mechanism="openvino" an
    :class:`~.openvino.engine.OpenVinoEngine` (fp32 for a float ``dtype``, INT8 for torch.int8). Otherwise, without CUDA (or with
    a CPU example input) the engine runs the reference model and warns once, here.
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
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}: use one of {', '.join(map(repr, MECHANISMS))}")
    if dtype == INT8 and mechanism != "openvino":
        raise ValueError(f"dtype=torch.int8 runs on OpenVINO only: pass mechanism='openvino' (got {mechanism!r})")
    if dtype not in DTYPES and dtype != INT8:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(map(str, DTYPES))} (or "
                         f"torch.int8 with mechanism='openvino')")
    if calibration is not None and dtype != INT8:
        raise ValueError("calibration images are for INT8 only: pass dtype=torch.int8 and mechanism='openvino', or "
                         "no calibration")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    if skips is not None and dtype != INT8:
        raise ValueError("skips= is for INT8 (one quantized model per sub-network): the other engines serve every "
                         "sub-network from one graph; drop skips=")

    if mechanism == "openvino":
        if example_input.device.type != "cpu":
            raise ValueError(f"mechanism='openvino' runs on the CPU, but example_input is on {example_input.device}: "
                             f"pass a CPU example input")
        why_no_openvino = openvino_unavailable(int8=dtype == INT8)
        if why_no_openvino is not None:
            raise ValueError(f"mechanism='openvino' is unavailable: {why_no_openvino}; {OPENVINO_INSTALL_HINT}")
        return OpenVinoEngine(copy.deepcopy(model).float().cpu(), example_input, dynamic_batch=dynamic_batch,
                              int8=dtype == INT8, calibration=calibration, skips=skips)

    cpu_hint = ""
    if mechanism == "onnxruntime" or (mechanism == "auto" and example_input.device.type == "cpu"):
        if example_input.device.type != "cpu":
            raise ValueError(f"mechanism='onnxruntime' runs on the CPU, but example_input is on "
                             f"{example_input.device}: pass a CPU example input (or mechanism='auto' on CUDA)")
        why_no_ort = onnxruntime_unavailable()
        if why_no_ort is None:
            # a float32 CPU copy: ONNX Runtime's CPU kernels are fp32, and export must not touch the caller's model
            return OnnxRuntimeEngine(copy.deepcopy(model).float().cpu(), example_input, dynamic_batch=dynamic_batch)
        if mechanism == "onnxruntime":
            raise ValueError(f"mechanism='onnxruntime' is unavailable: {why_no_ort}; {INSTALL_HINT}")
        cpu_hint = f" ({why_no_ort}: {INSTALL_HINT})"
    why_no_graph = cuda_unavailable(example_input)
    try:
        if why_no_graph is None:
            return build_cuda_engine(model, example_input, dtype=dtype, mechanism=mechanism,
                                     dynamic_batch=dynamic_batch)
        # No graph here, but an unlowerable model must still fail now; lowering on the meta device
        # checks the structure without copying weights or importing kernels.
        lower(model, tuple(example_input.shape[1:]), kernels=STRUCTURE_ONLY, dtype=dtype, device="meta")
        model_dtype = next((p.dtype for p in model.parameters()), None)
        why = f"{why_no_graph}; running the reference model eagerly (in its own dtype {model_dtype})"
    except NotLoweredError as e:
        why = f"{e}; running the reference model eagerly instead"
    warnings.warn(f"adaptive_kernels.compile({type(model).__name__}): {why}{cpu_hint}", stacklevel=2)
    return ReferenceEngine(model, example_input, dynamic_batch=dynamic_batch)
