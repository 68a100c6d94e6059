"""The lowered program executed with the real Triton kernels (fp32) equals the model: on the CPU under
TRITON_INTERPRET=1 (set by conftest.py when there is no GPU), on the GPU otherwise. Tiny models and a few
skip configurations each (the interpreter is slow); early exit runs the kernels' own mask test."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import device_mask, one_thread, randomize, rel_err  # noqa: F401 (one_thread: autouse)

from adaptive_kernels import create_model
from adaptive_kernels.engine.lowering import lower
from adaptive_kernels.engine.runtime import allocate_buffers, execute, triton_kernels
from adaptive_kernels.models.resnet import Bottleneck, ResNetADN
from adaptive_kernels.models.swin import SwinTransformerADN
from adaptive_kernels.models.vit import VisionTransformerADN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest.py sets it)", allow_module_level=True)

MODELS = {
    # BasicBlocks, CIFAR stem, three stages, 1x1-conv downsample
    "resnet20_adn": (lambda: create_model("resnet20_adn", width=4), (2, 3, 8, 8)),
    # Bottlenecks with the ImageNet stem (7x7/2 conv, maxpool)
    "resnet_bottleneck": (lambda: ResNetADN(Bottleneck, [2, 2], num_classes=5, width=4), (1, 3, 16, 16)),
    # SDPA attention in mandatory blocks, the Triton attention (early exit) in skippable ones
    "vit_tiny": (lambda: VisionTransformerADN(8, 4, 6, 2, 16, 32, num_classes=5), (2, 3, 8, 8)),
    # 4x4 tokens in 2x2 windows: window gathers, SDPA with the per-window shift bias (mandatory shifted block 1),
    # Triton attention with the relative-position bias and with the shift bias (skippable blocks 2 and 3);
    # patch merging; then one window (no shift, no gathers)
    "swin_tiny": (
        lambda: _swin(embed_dim=8, depths=(4, 2), num_heads=(2, 2), window_size=2, num_classes=5),
        (2, 3, 16, 16),
    ),
}


def _swin(**kwargs) -> SwinTransformerADN:
    model = SwinTransformerADN(**kwargs)
    with torch.no_grad():  # O(1) relative-position tables: a wrong bias must show
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_()
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_triton_program_equals_model(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize(build(), calibrate=(4, *shape[1:])).to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    program = lower(model, shape[1:], kernels=triton_kernels(), dtype=torch.float32, device=DEVICE)
    tensors = allocate_buffers(program, shape[0], DEVICE, torch.float32)
    configs = model.skip_configs()
    # super, base and one mixed configuration (mandatory blocks then mix both norm sets)
    chosen = [configs[0], configs[-1], configs[len(configs) // 2 - 1]]
    with torch.no_grad():
        for skip in chosen:
            want = model(x, skip)
            for mechanism in ("host", "early_exit"):
                tensors[program.input].copy_(x)
                got = execute(program, tensors, device_mask(skip, DEVICE), mechanism=mechanism, skip=skip)
                assert rel_err(got, want) < 1e-4, (name, skip, mechanism, rel_err(got, want))


def test_triton_program_equals_model_mobilenet_v2():
    # depthwise convs, ReLU6, five stages; one mixed configuration only (52 kernel launches per pass)
    torch.manual_seed(0)
    model = randomize(create_model("mobilenet_v2_adn", num_classes=5, width_mult=0.25), calibrate=(4, 3, 8, 8))
    model = model.to(DEVICE)
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    program = lower(model, (3, 8, 8), kernels=triton_kernels(), dtype=torch.float32, device=DEVICE)
    tensors = allocate_buffers(program, 1, DEVICE, torch.float32)
    skip = (False, True, False, True, False)
    tensors[program.input].copy_(x)
    with torch.no_grad():
        got = execute(program, tensors, device_mask(skip, DEVICE), mechanism="early_exit")
        assert rel_err(got, model(x, skip)) < 1e-4
