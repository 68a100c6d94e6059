"""The GPU engine tests' fp16 rule, predicted on the CPU: for every lowered family, the lowered program runs with
the kernels' torch references in an emulation of the engine's numerics — fp16 weights and activations in memory,
fp32 math inside each op, one fp16 rounding per op output — and EVERY sub-network must satisfy the rule the GPU
tests assert (helpers.check_fp16_error: within FP16_ERROR_FACTOR x torch's own fp16 error). If this passes and a
GPU test fails, the bug is in a kernel or the graph, not in the tolerance.

CPU time is kept small with batch 1, small images and fewer classes: ResNet-50 at 32x32, MobileNetV2 at 64x64,
ViT-B/16 and DeiT-S at image_size=32 (4 patches + class token), Swin-T's depths and widths with window 2 at 64x64
(its 224x224 with window 7 takes ~45 s here; the maps stay multiples of the window, as the lowering needs)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from helpers import (
    FP16_ERROR_FACTOR,
    check_fp16_error,
    device_mask,
    randomize,
    rel_err,
    torch_fp16,
)

from adaptive_kernels import create_model
from adaptive_kernels.engine.cuda.lowering import lower
from adaptive_kernels.engine.cuda.runtime import allocate_buffers, execute
from adaptive_kernels.kernels import reference_kernels
from adaptive_kernels.kernels.backend import OPS, KernelSet

pytestmark = pytest.mark.usefixtures("one_thread")


def _fp32_inside(kernel):
    """A reference kernel taking and writing fp16 tensors, computing in fp32: fp16 arguments are widened, the
    result is rounded to fp16 once, into ``out`` (in place, as the Triton kernels write it)."""

    def widen(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float16 else t

    def run(*args, out=None, **kwargs):
        wide = {k: widen(v) for k, v in kwargs.items()}
        result = kernel(*map(widen, args), out=None if out is None else out.float(), **wide)
        return result.half() if out is None else out.copy_(result)

    return run


def _emulation() -> KernelSet:
    ref = reference_kernels()
    return replace(ref, name="fp16-storage emulation", **{op: _fp32_inside(getattr(ref, op)) for op in OPS})


FAMILIES = {  # name: (model, input size, calibrate BatchNorm statistics)
    "resnet50_adn": (lambda: create_model("resnet50_adn", num_classes=100), 32, True),
    "mobilenet_v2_adn": (lambda: create_model("mobilenet_v2_adn", num_classes=100), 64, True),
    "vit_b_16_adn": (lambda: create_model("vit_b_16_adn", num_classes=100, image_size=32), 32, False),
    "deit_small_adn": (lambda: create_model("deit_small_adn", num_classes=100, image_size=32), 32, False),
    "swin_t_adn": (lambda: create_model("swin_t_adn", num_classes=100, window_size=2), 64, False),
    "resnet20_adn": (lambda: create_model("resnet20_adn"), 32, True),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_numerics_emulation_every_subnetwork_meets_the_gpu_fp16_rule(name):
    build, size, calibrate = FAMILIES[name]
    torch.manual_seed(0)
    model = randomize(build(), calibrate=(4, 3, size, size) if calibrate else None)
    half = torch_fp16(model)
    program = lower(model, (3, size, size), kernels=_emulation(), dtype=torch.float16, device="cpu")
    tensors = allocate_buffers(program, 1, "cpu", torch.float32)
    x = torch.randn(1, 3, size, size)
    wants, yardsticks = {}, []
    with torch.no_grad():
        for skip in model.skip_configs():
            tensors[program.input].copy_(x)
            got = execute(program, tensors, device_mask(skip), bodies="early_exit")
            assert got.dtype == torch.float16
            wants[skip] = model(x, skip)
            yardsticks.append(check_fp16_error(got, wants[skip], half(x.half(), skip), (name, skip)))
    # the rule can fail: any two sub-networks differ by more than twice what it allows, so running the wrong one
    # could not pass
    apart = min(rel_err(wants[a], wants[b]) for a, b in itertools.combinations(wants, 2))
    assert apart > 2 * FP16_ERROR_FACTOR * max(yardsticks), (apart, max(yardsticks))
