"""Test set-up. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any @triton.jit function is defined, i.e. before adaptive_kernels.kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not "gpu" in keywords: a folder named gpu is one
            item.add_marker(skip_gpu)
