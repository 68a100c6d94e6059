"""The lowered program executed with the real Triton kernels (fp32) equals the model: on the CPU under
TRITON_INTERPRET=1 (set by conftest.py when there is no GPU), on the GPU otherwise. Tiny models and a few
skip configurations each (the interpreter is slow); early exit runs the kernels' own mask test."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from helpers import device_mask, randomize, rel_err

from adaptive_kernels import calibrate, create_model
from adaptive_kernels.engine.cuda.lowering import lower
from adaptive_kernels.engine.cuda.ops import Conv, Linear
from adaptive_kernels.engine.cuda.runtime import allocate_buffers, execute
from adaptive_kernels.kernels import reference_kernels, triton_kernels
from adaptive_kernels.kernels.backend import STRUCTURE_ONLY
from adaptive_kernels.models.resnet import Bottleneck, ResNetADN
from adaptive_kernels.models.swin import SwinTransformerADN
from adaptive_kernels.models.vit import VisionTransformerADN

pytestmark = pytest.mark.usefixtures("one_thread")

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
                got = execute(program, tensors, device_mask(skip, DEVICE), bodies=mechanism, skip=skip)
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
        got = execute(program, tensors, device_mask(skip, DEVICE), bodies="early_exit")
        assert rel_err(got, model(x, skip)) < 1e-4


SPLIT_MODELS = {
    # every groups=1 conv split (capped at its K steps): the 7x7 stem's flat K in 3, the 3x3s per tap in 4, inside
    # skippable bodies too (early exit of both split-K kernels); the fc (K=128) in 2
    "resnet_bottleneck": (
        lambda: ResNetADN(Bottleneck, [2, 2], num_classes=5, width=16),
        (1, 3, 16, 16),
        {Conv: {1, 2, 3, 4}, Linear: {2}},
    ),
    # the linears with K > 64 split: the patch embedding (K=192) in 3, every fc2 (K=128, residual in place) in 2,
    # the skippable block's too; the others (K=32) stay whole
    "vit": (lambda: VisionTransformerADN(16, 8, 3, 2, 32, 128, num_classes=5), (2, 3, 16, 16), {Linear: {1, 2, 3}}),
}


@pytest.mark.parametrize("name", list(SPLIT_MODELS))
def test_triton_program_forced_split_k_equals_model(name):
    # split_k=4 forced on every conv and linear; they all share one preallocated workspace
    build, shape, want_splits = SPLIT_MODELS[name]
    torch.manual_seed(0)
    model = randomize(build(), calibrate=(4, *shape[1:])).to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    program = lower(model, shape[1:], kernels=triton_kernels(), dtype=torch.float32, device=DEVICE, split_k=4)
    ops = [(op, body) for op, body in program.flat_ops() if isinstance(op, (Conv, Linear))]
    assert {kind: {op.split_k for op, _ in ops if type(op) is kind} for kind in want_splits} == want_splits
    assert any(op.split_k > 1 for op, body in ops if body is not None)
    assert all(op.workspace is program.workspace for op, _ in ops)
    tensors = allocate_buffers(program, shape[0], DEVICE, torch.float32)
    workspace = tensors[program.workspace]
    assert workspace.dtype == torch.float32
    needs = [op.split_k * shape[0] * math.prod(op.out.shape) for op, _ in ops if op.split_k > 1]  # split * M * N
    assert workspace.numel() == max(needs)
    workspace.fill_(float("nan"))  # never read before written; the split kernels really use it
    configs = model.skip_configs()
    with torch.no_grad():
        for skip in (configs[0], configs[-1]):
            want = model(x, skip)
            for mechanism in ("host", "early_exit"):
                tensors[program.input].copy_(x)
                got = execute(program, tensors, device_mask(skip, DEVICE), bodies=mechanism, skip=skip)
                assert rel_err(got, want) < 1e-4, (skip, mechanism, rel_err(got, want))
    assert not torch.isnan(workspace).all()


def test_lower_split_k_argument():
    model = create_model("resnet20_adn", width=4)
    with pytest.raises(ValueError, match="split_k=0"):
        lower(model, (3, 8, 8), kernels=STRUCTURE_ONLY, dtype=torch.float32, device="meta", split_k=0)
    # the reference kernels never split: a forced split becomes 1, and the shared workspace stays empty
    program = lower(model, (3, 8, 8), kernels=reference_kernels(), dtype=torch.float32, device="cpu", split_k=4)
    assert {op.split_k for op, _ in program.flat_ops() if isinstance(op, (Conv, Linear))} == {1}
    assert allocate_buffers(program, 2, "cpu", torch.float32)[program.workspace].numel() == 0
    # "auto" under the interpreter (or on the CPU) never splits either
    program = lower(model, (3, 8, 8), kernels=triton_kernels(), dtype=torch.float32, device=DEVICE)
    if DEVICE == "cpu":
        assert allocate_buffers(program, 2, "cpu", torch.float32)[program.workspace].numel() == 0


CALIBRATED_MODELS = {
    # BasicBlocks, three stages: all 8 sub-networks
    "resnet20_adn": (lambda: create_model("resnet20_adn", width=4), (2, 3, 8, 8), None),
    # depthwise convs, ReLU6, five stages: 8 of the 32 sub-networks (2.6 s each in the interpreter; all 32 run with
    # the reference kernels in test_engine_lowering.py, and every table row through the kernels in test_kernels_*):
    # super, base, each stage skipped alone, one mixed
    "mobilenet_v2_adn": (
        lambda: create_model("mobilenet_v2_adn", num_classes=5, width_mult=0.25),
        (1, 3, 8, 8),
        ["FFFFF", "TTTTT", "TFFFF", "FTFFF", "FFTFF", "FFFTF", "FFFFT", "TFTFT"],
    ),
}


@pytest.mark.parametrize("name", list(CALIBRATED_MODELS))
def test_triton_calibrated_program_equals_model(name):
    # per-sub-network BN tables (2^S rows, the sub-network id in mask slot S) through the real kernels, by early exit
    # (the kernels' own mask test, as the captured early-exit graph runs)
    build, shape, configs = CALIBRATED_MODELS[name]
    torch.manual_seed(0)
    model = randomize(build(), calibrate=(4, *shape[1:]))
    plain = copy.deepcopy(model).to(DEVICE)
    calibrate(model, 3 * torch.randn(8, *shape[1:]) + 1)
    model = model.eval().to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    program = lower(model, shape[1:], kernels=triton_kernels(), dtype=torch.float32, device=DEVICE)
    assert program.subnet_id_slot == model.num_skippable_stages
    tensors = allocate_buffers(program, shape[0], DEVICE, torch.float32)
    with torch.no_grad():
        for skip in model.skip_configs() if configs is None else [model.parse_skip(c) for c in configs]:
            want = model(x, skip)
            assert rel_err(plain(x, skip), want) > 1e-2  # calibration changed this sub-network's output
            mask = torch.tensor(program.mask_values(skip), dtype=torch.int32, device=DEVICE)
            tensors[program.input].copy_(x)
            got = execute(program, tensors, mask, bodies="early_exit")
            assert rel_err(got, want) < 1e-4, (name, skip, rel_err(got, want))
