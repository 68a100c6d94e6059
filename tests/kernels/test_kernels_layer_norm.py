"""layer_norm kernel (skip-aware affine set, early exit) against layer_norm_ref computed in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from adaptive_kernels.kernels import _common, layer_norm, layer_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    case = {
        # an offset mean and a large scale: the variance must be taken around the mean, not as E[x^2] - E[x]^2
        "x": (torch.randn(*shape, generator=g) * 3 + 5).to(dtype),
        "weight": torch.rand(c, generator=g) + 0.5,
        "bias": torch.randn(c, generator=g),
        "weight_skip": torch.rand(c, generator=g) - 1.5,
        "bias_skip": torch.randn(c, generator=g) + 2.0,
    }
    return {name: t.to(DEVICE) for name, t in case.items()}


def run_both(case, **kw):
    params = {k: case[k] for k in ("weight", "bias")}
    if kw.get("norm_index", -1) >= 0:
        params.update(weight_skip=case["weight_skip"], bias_skip=case["bias_skip"])
    ref = layer_norm_ref(case["x"].double(), **{k: v.double() for k, v in params.items()}, **kw)
    y = layer_norm(case["x"], **params, **kw)
    return y, ref


@pytest.mark.parametrize("norm_set", ["unselected", "normal", "skip"])
@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 20), (3, 130)], ids=["C48", "B-L-C20", "C130"])
def test_layer_norm_fp32(shape, norm_set):
    case = make_case(shape, seed=1)
    mask = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    kw = {} if norm_set == "unselected" else {"mask": mask, "norm_index": 1 if norm_set == "normal" else 0}
    y, ref = run_both(case, eps=1e-5, **kw)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-4
    if norm_set != "unselected":  # the other set gives a different answer: the selection is real
        other = layer_norm_ref(
            case["x"].double(),
            case["weight"].double(),
            case["bias"].double(),
            weight_skip=case["weight_skip"].double(),
            bias_skip=case["bias_skip"].double(),
            mask=mask,
            norm_index=0 if norm_set == "normal" else 1,
            eps=1e-5,
        )
        assert rel_err(y, other) > 1e-1


def test_layer_norm_in_place_and_strided_rows():
    case = make_case((6, 40), seed=2)
    ref = layer_norm_ref(case["x"].double(), case["weight"].double(), case["bias"].double())
    x = case["x"].clone()
    y = layer_norm(x, case["weight"], case["bias"], out=x)
    assert y.data_ptr() == x.data_ptr() and rel_err(x, ref) < 1e-4
    wide = torch.randn(6, 64, device=DEVICE)
    wide[:, :40] = case["x"]
    y = layer_norm(wide[:, :40], case["weight"], case["bias"])  # rows strided by 64
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_layer_norm_early_exit(bit):
    case = make_case((5, 24), seed=3)
    mask = torch.tensor([1, 1, bit], dtype=torch.int32, device=DEVICE)
    poison = torch.full((5, 24), float("nan"), device=DEVICE)
    layer_norm(case["x"], case["weight"], case["bias"], mask=mask, exit_index=2, out=poison)
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped kernel wrote to its output"
    else:
        ref = layer_norm_ref(case["x"].double(), case["weight"].double(), case["bias"].double())
        assert rel_err(poison, ref) < 1e-4


def _check_low_precision(dtype, shape):
    case = make_case(shape, dtype=dtype, seed=4)
    mask = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    y, ref = run_both(case, mask=mask, norm_index=0)
    assert y.dtype == dtype
    theirs = rel_err(
        layer_norm_ref(
            case["x"],
            case["weight"],
            case["bias"],
            weight_skip=case["weight_skip"],
            bias_skip=case["bias_skip"],
            mask=mask,
            norm_index=0,
        ),
        ref,
    )
    ours = rel_err(y, ref)
    assert ours <= 2 * theirs, f"{dtype}: kernel error {ours:.2e} vs torch {theirs:.2e}"


def test_layer_norm_fp16():
    _check_low_precision(torch.float16, (9, 96))


@pytest.mark.skipif(_common.INTERPRET, reason="bf16 math does not work in Triton's interpreter (checked on the GPU)")
def test_layer_norm_bf16():
    _check_low_precision(torch.bfloat16, (9, 96))


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"x": torch.randn(8)}, ValueError, r"\(M, C\)"),
        ({"x": torch.randn(4, 8).int()}, TypeError, "x has dtype"),
        ({"weight": torch.ones(7)}, ValueError, r"weight must have shape \(8,\)"),
        ({"bias": None}, ValueError, "weight and bias are required"),
        ({"norm_index": 0, "mask": torch.ones(1, dtype=torch.int32)}, ValueError, "weight_skip"),
        ({"weight_skip": torch.ones(8), "bias_skip": torch.zeros(8)}, ValueError, "only used with norm_index"),
        (
            {
                "weight_skip": torch.ones(8).half(),
                "bias_skip": torch.zeros(8),
                "norm_index": 0,
                "mask": torch.ones(1, dtype=torch.int32),
            },
            TypeError,
            "share one dtype",
        ),
        ({"mask": torch.ones(1, dtype=torch.int32), "exit_index": 1, "out": torch.empty(4, 8)}, ValueError, "only 1"),
        ({"mask": torch.ones(1, dtype=torch.int32), "exit_index": 0}, ValueError, "needs out="),
        ({"out": torch.empty(4, 9)}, ValueError, "out must have"),
        ({"eps": -1.0}, ValueError, "eps"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_layer_norm_rejects_bad_input(over, error, match):
    args = {"x": torch.randn(4, 8), "weight": torch.ones(8), "bias": torch.zeros(8)}
    args.update(over)
    args = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in args.items()}
    with pytest.raises(error, match=match):
        layer_norm(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


def test_layer_norm_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="layer_norm_ref"):
        layer_norm(torch.randn(4, 8), torch.ones(8), torch.zeros(8))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [(1, 197, 768), (64, 197, 768), (8, 3136, 96), (8, 49, 768)],
    ids=["vit b1", "vit b64", "swin s1 b8", "swin s4 b8"],
)
def test_layer_norm_gpu_realistic_fp16(shape):
    _check_low_precision(torch.float16, shape)
