"""linear kernel against linear_ref computed in float64 (interpreter on CPU: tiny odd shapes; GPU: ViT shapes)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from adaptive_kernels.kernels import _common, linear, linear_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(m, k, n, dtype=torch.float32, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    case = {
        "x": torch.randn(*lead, m, k, generator=g).to(dtype),
        "weight": (torch.randn(n, k, generator=g) / k**0.5).to(dtype),
        "bias": torch.randn(n, generator=g),
        "residual": torch.randn(*lead, m, n, generator=g).to(dtype),
    }
    return {name: t.to(DEVICE) for name, t in case.items()}


def run_both(case, *, use_bias=True, use_residual=False, inplace=False, **kw):
    bias = case["bias"] if use_bias else None
    residual = case["residual"] if use_residual else None
    ref = linear_ref(
        case["x"].double(),
        case["weight"].double(),
        None if bias is None else bias.double(),
        residual=None if residual is None else residual.double(),
        **kw,
    )
    if inplace:
        residual = residual.clone()
        kw["out"] = residual
    y = linear(case["x"], case["weight"], bias, residual=residual, **kw)
    if inplace:
        assert y.data_ptr() == residual.data_ptr()
    return y, ref


@pytest.mark.parametrize("residual_mode", ["none", "add", "inplace"])
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_epilogue_combinations(use_bias, activation, residual_mode):
    # M, N, K all off the 32-wide interpreter tiles; K spans two blocks
    case = make_case(37, 40, 24, seed=1)
    y, ref = run_both(
        case,
        use_bias=use_bias,
        use_residual=residual_mode != "none",
        inplace=residual_mode == "inplace",
        activation=activation,
    )
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-4


def test_linear_leading_dims_and_row_strides():
    case = make_case(5, 24, 20, seed=2, lead=(3,))  # (B, L, C) tokens
    y, ref = run_both(case, use_residual=True, activation="gelu")
    assert y.shape == (3, 5, 20) and rel_err(y, ref) < 1e-4
    # a strided 2-D view, e.g. the class token x[:, 0] of (B, L, C)
    cls = case["x"][:, 0]
    assert not cls.is_contiguous()
    y = linear(cls, case["weight"], case["bias"])
    assert rel_err(y, linear_ref(cls.double(), case["weight"].double(), case["bias"].double())) < 1e-4


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_linear_early_exit(bit):
    case = make_case(7, 16, 20, seed=3)
    mask = torch.tensor([bit, 1], dtype=torch.int32, device=DEVICE)
    poison = torch.full((7, 20), float("nan"), device=DEVICE)
    y = linear(case["x"], case["weight"], case["bias"], activation="gelu", out=poison, mask=mask, exit_index=0)
    assert y.data_ptr() == poison.data_ptr()
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped kernel wrote to its output"
    else:
        ref = linear_ref(case["x"].double(), case["weight"].double(), case["bias"].double(), activation="gelu")
        assert rel_err(poison, ref) < 1e-4
    kept = torch.full((7, 20), 3.0, device=DEVICE)
    r = linear_ref(case["x"], case["weight"], mask=mask, exit_index=0, out=kept)
    assert r is kept and (bit == 1 or bool((kept == 3.0).all()))


def _check_low_precision(dtype, m, k, n, activation, lead=()):
    case = make_case(m, k, n, dtype=dtype, seed=4, lead=lead)
    y, ref = run_both(case, use_residual=True, activation=activation)
    assert y.dtype == dtype
    theirs = rel_err(
        linear_ref(case["x"], case["weight"], case["bias"], residual=case["residual"], activation=activation), ref
    )
    ours = rel_err(y, ref)
    assert ours <= 2 * theirs, f"{dtype}: kernel error {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.parametrize("activation", ["gelu", "none"])
def test_linear_fp16(activation):
    _check_low_precision(torch.float16, 33, 72, 40, activation)


@pytest.mark.skipif(_common.INTERPRET, reason="bf16 math does not work in Triton's interpreter (checked on the GPU)")
def test_linear_bf16():
    _check_low_precision(torch.bfloat16, 33, 72, 40, "gelu")


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"x": torch.randn(4)}, ValueError, r"\(M, K\)"),
        ({"x": torch.randn(4, 8).half()}, TypeError, "weight has dtype"),
        ({"x": torch.randint(0, 2, (4, 8))}, TypeError, "x has dtype"),
        ({"weight": torch.randn(16, 7)}, ValueError, "K=8"),
        ({"weight": torch.randn(8, 16).t()}, ValueError, "unit stride"),
        ({"x": torch.randn(2, 8, 4).transpose(1, 2)}, ValueError, "contiguous"),
        ({"bias": torch.randn(15)}, ValueError, r"bias must have shape \(16,\)"),
        ({"activation": "relu6"}, ValueError, "activation='relu6'"),
        ({"residual": torch.randn(4, 15)}, ValueError, "residual must have"),
        ({"out": torch.empty(4, 16).half()}, TypeError, "out has dtype"),
        ({"exit_index": 0}, ValueError, "without mask"),
        ({"exit_index": 0, "mask": torch.ones(1, dtype=torch.int32)}, ValueError, "needs out="),
        ({"exit_index": 3, "mask": torch.ones(2, dtype=torch.int32), "out": torch.empty(4, 16)}, ValueError, "only 2"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_linear_rejects_bad_input(over, error, match):
    args = {"x": torch.randn(4, 8), "weight": torch.randn(16, 8)}
    args.update(over)
    args = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in args.items()}
    with pytest.raises(error, match=match):
        linear(args.pop("x"), args.pop("weight"), **args)


def test_linear_rejects_out_aliasing_input():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="overlaps x"):
        linear(x, torch.randn(8, 8, device=DEVICE), out=x)


def test_linear_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="linear_ref"):
        linear(torch.randn(4, 8), torch.randn(16, 8))


# --- GPU: ViT-B/16 shapes, fp16 ----------------------------------------------------------------------------------
GPU_SHAPES = {  # (lead, m, k, n, activation)
    "vit qkv b1": ((1,), 197, 768, 2304, "none"),
    "vit fc1 gelu b8": ((8,), 197, 768, 3072, "gelu"),
    "vit fc2 b8": ((8,), 197, 3072, 768, "none"),
    "head b1": ((), 1, 768, 1000, "none"),
    "r50 fc b64": ((), 64, 2048, 1000, "relu"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_linear_gpu_realistic_fp16(shape):
    lead, m, k, n, activation = shape
    _check_low_precision(torch.float16, m, k, n, activation, lead=lead)


@pytest.mark.gpu
def test_linear_gpu_inplace_and_exit_fp16():
    case = make_case(197, 3072, 768, dtype=torch.float16, seed=5, lead=(4,))
    y, ref = run_both(case, use_residual=True, inplace=True)
    assert rel_err(y, ref) < 1e-2
    before = y.clone()
    mask = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    linear(case["x"], case["weight"], case["bias"], residual=y, out=y, mask=mask, exit_index=0)
    assert torch.equal(before, y)
