"""The CUDA runtime: lowering to fused Triton ops (``lowering/``, ``program``, ``ops``), static buffers and
execution (``runtime``), one CUDA graph per input shape with IF nodes or early exit (``capture``), the engine."""
