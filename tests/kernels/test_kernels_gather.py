"""gather_rows kernel (fixed row permutation / selection, early exit) against gather_rows_ref in float64."""

from __future__ import annotations

import pytest
import torch

from adaptive_kernels.kernels import _common, gather_rows, gather_rows_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize(
    "b,s,c,r",
    [(2, 12, 20, 12), (3, 9, 130, 9), (1, 40, 1100, 40), (2, 16, 8, 20)],
    ids=["perm C20", "perm C130", "perm C1100 (two column blocks)", "select with repeats"],
)
def test_gather_rows_fp32(b, s, c, r, index_dtype):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(b, s, c, generator=g)
    index = _permutation(s, c) if r == s else torch.randint(0, s, (r,), generator=g)
    ref = gather_rows_ref(x.double(), index)
    # the reference itself, against an explicit loop
    for i in range(r):
        assert torch.equal(ref[:, i], x[:, index[i]].double())
    y = gather_rows(x.to(DEVICE), index.to(DEVICE, index_dtype))
    assert y.shape == (b, r, c) and y.dtype == torch.float32
    assert torch.equal(y.cpu().double(), ref)  # a copy: exact


def test_gather_rows_fp16_into_out():
    x = torch.randn(2, 10, 24).half().to(DEVICE)
    index = _permutation(10, 1).int().to(DEVICE)
    out = torch.full((2, 10, 24), float("nan"), dtype=torch.float16, device=DEVICE)
    y = gather_rows(x, index, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(out.cpu().double(), gather_rows_ref(x.cpu().double(), index.cpu()))


def test_gather_rows_inverse_permutation_round_trips():
    x = torch.randn(2, 15, 12, device=DEVICE)
    index = _permutation(15, 2).to(DEVICE)
    back = gather_rows(gather_rows(x, index), torch.argsort(index))
    assert torch.equal(back, x)


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_gather_rows_early_exit(bit):
    x = torch.randn(2, 7, 16, device=DEVICE)
    index = _permutation(7, 3).int().to(DEVICE)
    mask = torch.tensor([1, bit], dtype=torch.int32, device=DEVICE)
    poison = torch.full((2, 7, 16), float("nan"), device=DEVICE)
    gather_rows(x, index, mask=mask, exit_index=1, out=poison)
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped kernel wrote to its output"
    else:
        assert torch.equal(poison.cpu().double(), gather_rows_ref(x.cpu().double(), index.cpu()))
    # the reference follows the same contract
    ref_poison = torch.full((2, 7, 16), float("nan"))
    gather_rows_ref(x.cpu(), index.cpu(), mask=mask.cpu(), exit_index=1, out=ref_poison)
    assert torch.isnan(ref_poison).all() == (bit == 0)


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"x": torch.randn(4, 8)}, ValueError, r"x must be \(B, S, C\)"),
        ({"x": torch.randn(2, 4, 8).int()}, TypeError, "x has dtype"),
        ({"x": torch.randn(2, 8, 4).transpose(1, 2)}, ValueError, "x must be contiguous"),
        ({"index": torch.arange(4.0)}, TypeError, "index has dtype torch.float32"),
        ({"index": torch.arange(4).view(2, 2)}, ValueError, "index must be a contiguous 1-D"),
        ({"index": [0, 1]}, TypeError, "index must be a torch.Tensor"),
        ({"out": torch.empty(2, 5, 8)}, ValueError, r"out must have the output's shape \(2, 4, 8\)"),
        ({"out": torch.empty(2, 4, 8).half()}, TypeError, "out has dtype"),
        ({"mask": torch.ones(1, dtype=torch.int32), "exit_index": 0}, ValueError, "needs out="),
        (
            {"mask": torch.ones(1, dtype=torch.int32), "exit_index": 1, "out": torch.empty(2, 4, 8)},
            ValueError,
            "only 1",
        ),
        ({"mask": torch.ones(1), "exit_index": 0, "out": torch.empty(2, 4, 8)}, TypeError, "expected torch.int32"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_gather_rows_rejects_bad_input(over, error, match):
    args = {"x": torch.randn(2, 4, 8), "index": torch.arange(4)}
    args.update(over)
    args = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in args.items()}
    for fn in (gather_rows, gather_rows_ref):
        with pytest.raises(error, match=match):
            fn(args["x"], args["index"], **{k: v for k, v in args.items() if k not in ("x", "index")})


def test_gather_rows_rejects_out_overlapping_x():
    x = torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out overlaps x"):
        gather_rows(x, torch.arange(4, device=DEVICE), out=x)


def test_gather_rows_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="gather_rows_ref"):
        gather_rows(torch.randn(2, 4, 8), torch.arange(4))
