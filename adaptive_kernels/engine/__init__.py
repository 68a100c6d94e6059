"""Inference engines: every sub-network of an ADN model from one graph, switched by a mask.

``compile(model, example_input)`` -> an :class:`Engine`; ``select_skip(latency, accuracy, budget_us)`` picks the most
accurate sub-network within a latency budget. One place per concern: ``dispatch`` (``compile``: argument checks and
the choice of runtime), ``base`` (the runtime-neutral :class:`Engine`: skip state, ``set_skip``, ``profile``, input checks),
``select`` (budgeted choice), and one runtime each: ``cuda/`` (lowering to fused Triton ops, one CUDA graph with IF
nodes or early exit), ``ort/`` (the CPU engine: the one-graph ONNX export on ONNX Runtime, laid out for this CPU), ``openvino/`` (the
same graph on OpenVINO, fp32, or INT8 as one quantized model per sub-network), ``host`` (what the two CPU runtimes
share),
``reference`` (the eager model). A new runtime is a folder beside ``cuda/``, ``ort/`` and ``openvino/`` and one branch in
``compile``.
"""

from .base import Engine
from .cuda.engine import CudaGraphEngine
from .cuda.program import LoweringError, NotLoweredError
from .dispatch import compile
from .openvino.engine import OpenVinoEngine
from .ort.engine import OnnxRuntimeEngine
from .reference import ReferenceEngine
from .select import select_skip

__all__ = [
    "CudaGraphEngine",
    "Engine",
    "LoweringError",
    "NotLoweredError",
    "OnnxRuntimeEngine",
    "OpenVinoEngine",
    "ReferenceEngine",
    "compile",
    "select_skip",
]
