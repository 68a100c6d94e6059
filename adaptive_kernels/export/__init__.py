"""Export: every sub-network of an ADN model in one ONNX graph (an ``If`` per stage on a mask input), static
ONNX or ``torch.export`` files of one sub-network, and their check against the model with ONNX Runtime.
One module per model family (``resnet``, ``mobilenetv2``, ``vit``, ``swin``) builds the tensor-mask forward
from the model's own submodules (``masked``); ``onnx`` holds the public functions (the command is
``adaptive_kernels.cli.export``)."""

from .onnx import (
    FORMATS,
    INPUT,
    MASK,
    OUTPUT,
    ExportError,
    export_onnx,
    export_pt2,
    graphs_of,
    mask_of,
    masked_forward,
    onnxruntime_session,
    verify_onnx,
)

__all__ = [
    "FORMATS",
    "INPUT",
    "MASK",
    "OUTPUT",
    "ExportError",
    "export_onnx",
    "export_pt2",
    "graphs_of",
    "mask_of",
    "masked_forward",
    "onnxruntime_session",
    "verify_onnx",
]
