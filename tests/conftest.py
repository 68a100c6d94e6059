"""Test set-up. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any @triton.jit function is defined, i.e. before adaptive_kernels.kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared 2-core machine OpenMP barriers make them slower.
    A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (module scope: its module
    fixtures, e.g. exported models, run with one thread too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def exact_references():
    """For GPU tests against an fp32 reference: cuDNN's default TF32 convolutions would put ~1e-3 of error into the
    fp32 reference itself, and cuBLAS's reduced-precision fp16 reductions into the torch fp16 yardstick (our
    kernels accumulate in fp32)."""
    matmul = torch.backends.cuda.matmul
    before = torch.backends.cudnn.allow_tf32, matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = matmul.allow_fp16_reduced_precision_reduction = False
    yield
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction = before


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not "gpu" in keywords: a folder named gpu is one
            item.add_marker(skip_gpu)
