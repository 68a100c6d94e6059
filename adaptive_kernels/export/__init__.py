"""Export: every sub-network of an ADN model in one ONNX graph (an ``If`` per stage on a mask input), static
ONNX or ``torch.export`` files of one sub-network, and their check against the model with ONNX Runtime.

``masked`` builds the tensor-mask forward from the model's own submodules; ``onnx`` holds the public export
functions, ``graph`` the ONNX graph helpers, ``session`` the ONNX Runtime session and ``verify`` the check (the
command is ``adaptive_kernels.cli.export``). Every other module of the package is a family file (``resnet``,
``mobilenetv2``, ``vit``, ``swin``), imported here so that its ``@register_masked_forward`` class registers:
adding ``export/<family>.py`` is the only edit a new family needs."""

from .._discovery import import_family_files
from .graph import graphs_of
from .masked import ExportError, masked_forward
from .onnx import FORMATS, INPUT, MASK, OUTPUT, export_onnx, export_pt2, mask_of
from .session import onnxruntime_session
from .verify import TOLERANCE, check_one_graph, verify_onnx

__all__ = [
    "FORMATS",
    "INPUT",
    "MASK",
    "OUTPUT",
    "TOLERANCE",
    "ExportError",
    "check_one_graph",
    "export_onnx",
    "export_pt2",
    "graphs_of",
    "mask_of",
    "masked_forward",
    "onnxruntime_session",
    "verify_onnx",
]

import_family_files(__name__, __path__, shared={"graph", "masked", "onnx", "session", "verify"})
