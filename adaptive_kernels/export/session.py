"""The ONNX Runtime session the export's check and the ONNX Runtime engine run a file with."""

from __future__ import annotations

import os

import torch


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
    try:
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's Fail/InvalidProtobuf/NoSuchFile...: one line naming the file
        what = f"the ONNX model given as bytes ({len(model)} bytes)" if isinstance(model, bytes) else model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what} cannot be loaded by ONNX Runtime: it is missing, truncated, corrupt or not an "
                         f"ONNX model ({first[:200]})") from e
