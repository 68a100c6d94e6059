"""Lowering is exact: the lowered program, executed with the kernels' torch references in fp32, equals the
model for EVERY skip configuration — BatchNorm folded, both norm sets chosen by the device mask, skippable
bodies run on the host's word ("host", what a CUDA IF node does) or by early exit on the mask bit.
Also: BatchNorm folding, the models and Swin input sizes that are not lowered (the model pads), and calibrated models.
The program's invariants are in test_engine_program.py, the runtime (buffers, the conditional wiring) in
test_engine_runtime.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import EagerCapture, device_mask, randomize, rel_err
from torch import nn

import adaptive_kernels
from adaptive_kernels import create_model, list_models
from adaptive_kernels.engine.cuda import engine as engine_module
from adaptive_kernels.engine.cuda.engine import CudaGraphEngine
from adaptive_kernels.engine.cuda.lowering import LoweringError, NotLoweredError, fold_batchnorm, lower
from adaptive_kernels.engine.cuda.ops import Attention, Conv, Gather
from adaptive_kernels.engine.cuda.program import Program
from adaptive_kernels.engine.cuda.runtime import allocate_buffers, execute
from adaptive_kernels.kernels import reference_kernels
from adaptive_kernels.kernels.backend import STRUCTURE_ONLY
from adaptive_kernels.models.skip import subnet_index
from adaptive_kernels.models.swin import SwinTransformerADN
from adaptive_kernels.models.vit import VisionTransformerADN

pytestmark = pytest.mark.usefixtures("one_thread")

FP32_TOL = 1e-4  # fp32 rounding of folded vs unfolded BN, amplified by calibrated (small-variance) BN layers


def swin(**kwargs) -> SwinTransformerADN:
    """A small Swin-ADN whose relative-position tables are O(1) (the init's std 0.02 would hide a wrong bias)."""
    model = SwinTransformerADN(**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_()
    return model


MODELS = {
    "resnet20_adn": (lambda: create_model("resnet20_adn"), (2, 3, 16, 16)),
    "resnet18_adn": (lambda: create_model("resnet18_adn", num_classes=10), (1, 3, 32, 32)),
    "resnet50_adn": (lambda: create_model("resnet50_adn", num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v2_adn": (lambda: create_model("mobilenet_v2_adn", num_classes=10, width_mult=0.5), (1, 3, 32, 32)),
    "deit_tiny_adn": (lambda: create_model("deit_tiny_adn", num_classes=10, image_size=32), (2, 3, 32, 32)),
    "vit_small": (lambda: VisionTransformerADN(32, 8, 12, 4, 64, 128, num_classes=10), (2, 3, 32, 32)),
    # 33x18 image -> 8x4 tokens (the conv drops the last row and 2 columns); window 2: stage 0 shifted by 1 in
    # both directions, 8 windows; merging -> 4x2; stage 1 (depth 4: a mandatory shifted block) shifted along H
    # only (one window covers W), its unshifted blocks already in window order (no gathers)
    "swin_window2": (
        lambda: swin(embed_dim=16, depths=(2, 4), num_heads=(2, 4), window_size=2, num_classes=10),
        (2, 3, 33, 18),
    ),
    # window 3 (L = 9, shift 1) on 6x6 tokens, then one 3x3 window (no shift, as the model) after merging
    "swin_window3": (
        lambda: swin(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=3, num_classes=10),
        (1, 3, 24, 24),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_program_equals_model_for_every_skip_config(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize(build(), calibrate=(4, *shape[1:]))
    x = torch.randn(shape)
    program = lower(model, shape[1:], kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    assert len(program.bodies()) == model.num_skippable_stages
    tensors = allocate_buffers(program, shape[0], "cpu", torch.float32)
    configs = model.skip_configs()
    outputs = {}
    with torch.no_grad():
        for skip in configs:
            want = model(x, skip)
            for mechanism in ("host", "early_exit"):
                tensors[program.input].copy_(x)
                got = execute(program, tensors, device_mask(skip), bodies=mechanism, skip=skip).clone()
                assert rel_err(got, want) < FP32_TOL, (name, skip, mechanism, rel_err(got, want))
            outputs[skip] = want
    # every two sub-networks differ by far more than the tolerance (so a program that ran the wrong one, or the
    # wrong norm set, could not pass)
    assert min(rel_err(outputs[a], outputs[b]) for a in configs for b in configs if a < b) > 100 * FP32_TOL


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: create_model("resnet20_adn"), (2, 3, 16, 16)),
        # Swin: the attention bias (relative position + shift mask) is built in the program's dtype, not in fp32
        (lambda: swin(embed_dim=8, depths=(4, 2), num_heads=(2, 2), window_size=2, num_classes=5), (1, 3, 16, 16)),
    ],
    ids=["resnet20_adn", "swin"],
)
def test_program_float64_is_exact_to_rounding(build, shape):
    model = randomize(build()).double()
    x = torch.randn(shape, dtype=torch.float64)
    program = lower(model, shape[1:], kernels=reference_kernels(), dtype=torch.float64, device="cpu")
    tensors = allocate_buffers(program, shape[0], "cpu", torch.float64)
    with torch.no_grad():
        for skip in model.skip_configs():
            tensors[program.input].copy_(x)
            got = execute(program, tensors, device_mask(skip), bodies="early_exit")
            assert rel_err(got, model(x, skip)) < 1e-12


def test_swin_program_structure():
    build, shape = MODELS["swin_window2"]
    program = lower(build().eval(), shape[1:], kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    attention = [op for op, _ in program.flat_ops() if isinstance(op, Attention)]
    # per-window bias (nW, heads, L, L) exactly where the model shifts: stage 0 block 1, stage 1 blocks 1 and 3
    assert [tuple(op.bias.shape) for op in attention] == [
        (2, 4, 4),
        (8, 2, 4, 4),
        (4, 4, 4),
        (2, 4, 4, 4),
        (4, 4, 4),
        (2, 4, 4, 4),
    ]
    assert [op.backend for op in attention] == ["sdpa", "triton", "sdpa", "sdpa", "triton", "triton"]
    gathers = [op for op, _ in program.flat_ops() if isinstance(op, Gather)]
    # 2 per block of stage 0, 1 for merging, 2 per shifted block of stage 1 (its unshifted ones are in order)
    assert len(gathers) == 2 * 2 + 1 + 2 * 2
    for op in gathers:  # every gather is a permutation of its rows, except merging's (a regrouping)
        assert sorted(op.index.tolist()) == list(range(op.index.numel()))


@pytest.mark.parametrize(
    "size,match",
    [
        ((3, 32, 32), r"features.0.0: the 8x8 feature map is not a multiple of the 7x7 window"),
        ((3, 20, 20), r"features.0.0: the 5x5 feature map is not a multiple of the 7x7 window"),
    ],
)
def test_swin_sizes_that_need_window_padding_are_not_lowered(size, match):
    with torch.device("meta"):
        model = create_model("swin_t_adn")
    with pytest.raises(NotLoweredError, match=match + ".*padding is not lowered"):
        lower(model, size, kernels=STRUCTURE_ONLY, dtype=torch.float16, device="meta")


def test_swin_odd_sizes_before_patch_merging_are_not_lowered():
    model = swin(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=3, num_classes=5).eval()
    with pytest.raises(NotLoweredError, match="features.1: patch merging of the 3x3 feature map pads its odd side"):
        lower(model, (3, 12, 12), kernels=reference_kernels(), dtype=torch.float32, device="cpu")


def test_fold_batchnorm_tables_match_each_subnetwork_of_a_calibrated_norm():
    model, _, _ = calibrated("resnet20_adn")
    bn = model.layer3[0].bn2  # a mandatory norm of the last stage: a distinct row for each sub-network
    bias = torch.randn(bn.num_features, dtype=torch.float64)
    scale, shift = fold_batchnorm(bn.double(), bias, subnet_rows=8)
    y = torch.randn(2, bn.num_features, 3, 3, dtype=torch.float64)
    for skip in model.skip_configs():
        with model.running_subnet(skip):
            want = bn(y + bias[:, None, None])
        j = subnet_index(skip)
        torch.testing.assert_close(y * scale[j, :, None, None] + shift[j, :, None, None], want)
    with pytest.raises(LoweringError, match=r"calibration tables have shape \(8, 32\), expected \(4, 32\)"):
        fold_batchnorm(bn, subnet_rows=4)


def test_fold_batchnorm_matches_eval_batchnorm():
    torch.manual_seed(1)
    bn = randomize(nn.BatchNorm2d(7)).double()
    bias = torch.randn(7, dtype=torch.float64)
    y = torch.randn(3, 7, 4, 5, dtype=torch.float64)
    scale, shift = fold_batchnorm(bn, bias)
    want = bn(y + bias[:, None, None])
    torch.testing.assert_close(y * scale[:, None, None] + shift[:, None, None], want, rtol=1e-12, atol=1e-12)


# ---- what is not lowered ------------------------------------------------------------------------------


def test_lowering_rejects_models_outside_its_families():
    model = create_model("resnet20_adn").eval()
    model.layer2[0].relu = nn.GELU()
    with pytest.raises(LoweringError, match="layer2.0: only ReLU"):
        lower(model, (3, 8, 8), kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    with pytest.raises(LoweringError, match="cannot lower Sequential"):
        lower(
            nn.Sequential(nn.Conv2d(3, 3, 1)), (3, 8, 8), kernels=reference_kernels(), dtype=torch.float32, device="cpu"
        )
    with pytest.raises(LoweringError, match="does not match the model's"):
        lower(create_model("resnet20_adn"), (1, 8, 8), kernels=reference_kernels(), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_lowers_at_its_default_size(name):
    # On the meta device: structure, shapes and invariants only, no weights or kernels (fast).
    with torch.device("meta"):
        model = create_model(name)
    size = getattr(model, "image_size", 32 if name in ("resnet20_adn", "resnet56_adn") else 224)
    program = lower(model, (3, size, size), kernels=STRUCTURE_ONLY, dtype=torch.float16, device="meta")
    assert [b.stage for b in program.bodies()] == list(range(model.num_skippable_stages))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert program.output.shape == (head.out_features,)


# ---- calibrated models: per-sub-network BN tables selected by the sub-network id slot ------------------------------
CALIBRATED_MODELS = {
    "resnet20_adn": (lambda: create_model("resnet20_adn", width=8), (2, 3, 8, 8)),
    "mobilenet_v2_adn": (lambda: create_model("mobilenet_v2_adn", num_classes=10, width_mult=0.25), (1, 3, 16, 16)),
}


def calibrated(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(calibrated model, the same model uncalibrated, input shape): random norms and running statistics, then
    ``adaptive_kernels.calibrate`` on 8 random images (statistics far from the running ones: a different scale)."""
    build, shape = CALIBRATED_MODELS[name]
    torch.manual_seed(seed)
    model = randomize(build(), seed, calibrate=(4, *shape[1:]))
    plain = copy.deepcopy(model)
    adaptive_kernels.calibrate(model, 3 * torch.randn(8, *shape[1:]) + 1)
    assert model.is_calibrated and not plain.is_calibrated
    return model.eval(), plain.eval(), shape


def program_mask(program: Program, skip: tuple[bool, ...], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(program.mask_values(skip), dtype=torch.int32, device=device)


@pytest.mark.parametrize("name", list(CALIBRATED_MODELS))
def test_calibrated_program_equals_model_for_every_skip_config(name):
    model, plain, shape = calibrated(name)
    stages = model.num_skippable_stages
    program = lower(model, shape[1:], kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    assert program.subnet_id_slot == stages and program.mask_entries == stages + 1
    convs = [op for op, _ in program.flat_ops() if isinstance(op, Conv)]
    distinct = []
    for op in convs:  # every folded BN is a table of 2^S rows picked by the id slot
        assert op.epilogue.select_index == stages
        assert op.epilogue.scale.shape == op.epilogue.shift.shape == (2**stages, op.out.shape[-1])
        distinct.append(len({tuple(row.tolist()) for row in op.epilogue.shift}))
    # a norm's statistics depend only on the stages up to its own (rows of sub-networks that skip its block copy the
    # running statistics); the last stage's mandatory norms differ in all 2^S rows
    assert max(distinct) == 2**stages
    x = torch.randn(shape)
    tensors = allocate_buffers(program, shape[0], "cpu", torch.float32)
    with torch.no_grad():
        for skip in model.skip_configs():
            want = model(x, skip)
            assert rel_err(plain(x, skip), want) > 1e-2  # calibration changed this sub-network's output
            for mechanism in ("host", "early_exit"):
                tensors[program.input].copy_(x)
                got = execute(program, tensors, program_mask(program, skip), bodies=mechanism, skip=skip)
                assert rel_err(got, want) < FP32_TOL, (name, skip, mechanism, rel_err(got, want))
    # the CPU fallback's structure check (meta device, no kernels) lowers it too
    meta = lower(model, shape[1:], kernels=STRUCTURE_ONLY, dtype=torch.float16, device="meta")
    assert meta.subnet_id_slot == stages
    # the uncalibrated copy lowers as before: 2-row tables on the stage bit (skip-aware norms), no id slot
    program = lower(plain, shape[1:], kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    assert program.subnet_id_slot is None and program.mask_entries == stages
    assert {op.epilogue.select_index for op, _ in program.flat_ops() if isinstance(op, Conv)} <= {-1, *range(stages)}


def test_calibrated_program_rejects_a_mask_without_the_id_slot():
    model, _, shape = calibrated("resnet20_adn")
    program = lower(model, shape[1:], kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    tensors = allocate_buffers(program, shape[0], "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"mask must be int32 \(4,\): 3 stage bits and the sub-network id"):
        execute(program, tensors, device_mask((False,) * 3), bodies="early_exit")


def test_a_call_writes_the_stage_bits_and_the_subnet_id(monkeypatch):
    # the engine's mask without a GPU: the capture executes eagerly; a call must write the stage bits AND the id,
    # and that mask must drive the program to the calibrated model's sub-network. set_skip alone writes nothing.
    monkeypatch.setattr(engine_module, "CapturedGraph", EagerCapture)
    model, _, shape = calibrated("resnet20_adn")
    program = lower(model, shape[1:], kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    x = torch.randn(shape)
    engine = CudaGraphEngine(program, x, mechanism="early_exit", dynamic_batch=False)
    mask = engine._mask
    assert mask.tolist() == [1, 1, 1, 0]  # the super-net: every stage runs, id 0
    for skip, want_mask in [
        ("TFT", [0, 1, 0, 5]),
        ("base", [0, 0, 0, 7]),
        ("FTF", [1, 0, 1, 2]),
        ("super", [1] * 3 + [0]),
    ]:
        before = mask.tolist()
        engine.set_skip(skip)
        assert mask.tolist() == before
        with torch.no_grad():
            got = engine(x)
            assert engine._mask is mask and mask.tolist() == want_mask  # one buffer, rewritten in place
            assert rel_err(got, model(x, skip)) < FP32_TOL
