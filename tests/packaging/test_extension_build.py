"""The CUDA extension adaptive_kernels._C is built wherever it can be (a CUDA build of torch + nvcc; no GPU
needed), loads, matches the running torch, and rejects bad arguments with clear messages before touching
CUDA. Running the IF-node splice needs a GPU: see tests/engine/test_engine_gpu.py."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import adaptive_kernels
from adaptive_kernels import _ext


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nvcc")


buildable = pytest.mark.skipif(
    torch.version.cuda is None or _nvcc() is None or os.environ.get("ADN_SKIP_EXT") == "1",
    reason="the extension is only built with a CUDA build of torch and nvcc (and without ADN_SKIP_EXT=1)",
)


@buildable
def test_extension_is_built_and_loads():
    assert adaptive_kernels.HAS_EXT, f"adaptive_kernels._C did not load: {adaptive_kernels.EXT_ERROR}"
    assert adaptive_kernels.EXT_ERROR is None
    ext = _ext._C
    built_torch, built_cuda = ext.built_with()
    assert built_torch.split("+")[0] == torch.__version__.split("+")[0]
    assert built_cuda == torch.version.cuda
    for name in ("create_conditions", "begin_if", "end_if", "is_capturing", "runtime_version", "driver_version"):
        assert callable(getattr(ext, name)), name
    # the IF-node functions are compiled in exactly when the toolkit has them (CUDA >= 12.4)
    assert ext.has_conditional_nodes() == (ext.compiled_cuda_runtime() >= 12040)
    assert ext.max_conditions() >= 16  # more IF nodes than any model of the zoo needs


@buildable
def test_extension_checks_arguments_before_calling_cuda():
    ext = _ext._C
    if not ext.has_conditional_nodes():
        pytest.skip("built without conditional nodes")
    with pytest.raises(RuntimeError, match="mask must be a CUDA tensor"):
        ext.create_conditions(0, torch.ones(4, dtype=torch.int32), [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="the body needs its own stream"):
        ext.begin_if(5, 5, 0)
    with pytest.raises(TypeError):
        ext.create_conditions(0, "mask", [0])
