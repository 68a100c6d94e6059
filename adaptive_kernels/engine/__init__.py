"""Inference engine: lower an ADN model to fused Triton kernels and run every sub-network from one CUDA graph.

``compile(model, example_input)`` -> :class:`Engine`; ``select_skip(latency, accuracy, budget_us)`` picks
the most accurate sub-network within a latency budget. Pieces, one job per module: ``lowering`` (model ->
program, BatchNorm folding), ``program`` (the ops), ``runtime`` (kernel sets, buffers, execution),
``graph`` (capture, CUDA IF nodes), ``engine`` (the module), ``select`` (budgeted choice), ``onnx_runtime`` (the
CPU engine: the one-graph ONNX export on ONNX Runtime), ``onnx_layout`` (that graph optimised for this CPU, its
blocked layout kept across the ``If`` boundaries).
"""

from .engine import Engine, compile
from .lowering import LoweringError, NotLoweredError
from .onnx_runtime import OnnxRuntimeEngine
from .select import select_skip

__all__ = ["Engine", "LoweringError", "NotLoweredError", "OnnxRuntimeEngine", "compile", "select_skip"]
