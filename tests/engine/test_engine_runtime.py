"""The runtime (engine/cuda/runtime.py) on the CPU: buffer reuse and in-place residual writes, the conditional
mechanism's wiring with a stand-in IF-node splicer, and execute's argument checks."""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import pytest
import torch
from helpers import device_mask, randomize, rel_err

from adaptive_kernels import create_model
from adaptive_kernels.engine.cuda.lowering import lower
from adaptive_kernels.engine.cuda.ops import Conv
from adaptive_kernels.engine.cuda.runtime import allocate_buffers, execute
from adaptive_kernels.kernels import reference_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

FP32_TOL = 1e-4  # as in test_engine_lowering.py: folded vs unfolded BN in fp32


def test_buffers_are_reused_and_residual_stream_is_updated_in_place():
    model = create_model("resnet50_adn", num_classes=10).eval()
    program = lower(model, (3, 32, 32), kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    tensors = allocate_buffers(program, 1, "cpu", torch.float32)
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) < len(tensors) / 2
    for body in program.bodies():
        # the last conv of every skippable block writes the block input's buffer
        residual_writes = [op for op in body.ops if isinstance(op, Conv) and op.epilogue.residual is not None]
        assert residual_writes and all(op.out is op.epilogue.residual for op in residual_writes)
    # no two values alive at the same time share memory: check along the execution order
    order = list(program.flat_ops())
    span = {}
    for i, (op, _) in enumerate(order):
        for v in (*op.reads(), op.writes()):
            span[v] = (span.get(v, (i, i))[0], i)
    by_storage = {}
    for v, t in tensors.items():
        if v in span:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(span[v])
    for spans in by_storage.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


class _HostSplicer:
    """Stands in for the CUDA IF-node splicer on the CPU: a body whose condition is 0 is rolled back (every
    buffer restored on exit), which is what an IF node that launches nothing amounts to."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.created = None

    def create_conditions(self, mask, stages):
        self.created = (mask, list(stages))

    @contextmanager
    def body(self, index):
        mask, stages = self.created
        saved = {v: t.clone() for v, t in self.tensors.items()}
        yield
        if int(mask[stages[index]]) == 0:
            for v, t in saved.items():
                self.tensors[v].copy_(t)


def test_conditional_mechanism_wiring_with_a_host_splicer():
    model = randomize(create_model("resnet20_adn"))
    x = torch.randn(1, 3, 8, 8)
    program = lower(model, (3, 8, 8), kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    tensors = allocate_buffers(program, 1, "cpu", torch.float32)
    splicer = _HostSplicer(tensors)
    with torch.no_grad():
        for skip in model.skip_configs():
            tensors[program.input].copy_(x)
            got = execute(program, tensors, device_mask(skip), bodies="conditional", splicer=splicer)
            assert splicer.created[1] == [0, 1, 2]
            assert rel_err(got, model(x, skip)) < FP32_TOL


def test_execute_rejects_bad_body_mode_arguments():
    model = create_model("resnet20_adn").eval()
    program = lower(model, (3, 8, 8), kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    tensors = allocate_buffers(program, 1, "cpu", torch.float32)
    mask = device_mask((False,) * 3)
    with pytest.raises(ValueError, match="bodies=.host. needs skip"):
        execute(program, tensors, mask, bodies="host")
    with pytest.raises(ValueError, match="needs an IfNodeSplicer"):
        execute(program, tensors, mask, bodies="conditional")
    with pytest.raises(ValueError, match="use one of"):
        execute(program, tensors, mask, bodies="sometimes")
