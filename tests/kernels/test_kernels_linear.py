"""linear kernel against linear_ref computed in float64 (interpreter on CPU: tiny odd shapes; GPU: ViT shapes),
split-K included (the choice logic it shares with conv2d is tested in test_kernels_conv2d.py too)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import triton.testing
from helpers import rel_err

from adaptive_kernels.kernels import Epilogue, _common, linear, linear_ref
from adaptive_kernels.kernels.linear import linear_auto_split_k, linear_max_split_k, linear_workspace_numel

split_k_module = importlib.import_module("adaptive_kernels.kernels.split_k")

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
    """The kernel and the float64 reference; the bias is the epilogue's shift, ``kw`` other Epilogue fields or call
    arguments (split_k)."""
    fields = {k: kw.pop(k) for k in {f.name for f in dataclasses.fields(Epilogue)} & kw.keys()}
    bias = case["bias"] if use_bias else None
    residual = case["residual"] if use_residual else None
    ref_epilogue = Epilogue(
        shift=None if bias is None else bias.double(),
        residual=None if residual is None else residual.double(),
        **fields,
    )
    ref = linear_ref(case["x"].double(), case["weight"].double(), epilogue=ref_epilogue, **kw)
    if inplace:
        residual = residual.clone()
    epilogue = Epilogue(shift=bias, residual=residual, in_place=inplace, **fields)
    y = linear(case["x"], case["weight"], epilogue=epilogue, **kw)
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
    y = linear(cls, case["weight"], epilogue=Epilogue(shift=case["bias"]))
    want = linear_ref(cls.double(), case["weight"].double(), epilogue=Epilogue(shift=case["bias"].double()))
    assert rel_err(y, want) < 1e-4


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_linear_early_exit(bit):
    case = make_case(7, 16, 20, seed=3)
    mask = torch.tensor([bit, 1], dtype=torch.int32, device=DEVICE)
    poison = torch.full((7, 20), float("nan"), device=DEVICE)
    epilogue = Epilogue(shift=case["bias"], activation="gelu", exit_index=0)
    y = linear(case["x"], case["weight"], epilogue=epilogue, out=poison, mask=mask)
    assert y.data_ptr() == poison.data_ptr()
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped kernel wrote to its output"
    else:
        want = Epilogue(shift=case["bias"].double(), activation="gelu")
        ref = linear_ref(case["x"].double(), case["weight"].double(), epilogue=want)
        assert rel_err(poison, ref) < 1e-4
    kept = torch.full((7, 20), 3.0, device=DEVICE)
    r = linear_ref(case["x"], case["weight"], epilogue=Epilogue(exit_index=0), mask=mask, out=kept)
    assert r is kept and (bit == 1 or bool((kept == 3.0).all()))


def _check_low_precision(dtype, m, k, n, activation, lead=(), split_k="auto"):
    case = make_case(m, k, n, dtype=dtype, seed=4, lead=lead)
    y, ref = run_both(case, use_residual=True, activation=activation, split_k=split_k)
    assert y.dtype == dtype
    same_dtype = Epilogue(shift=case["bias"], residual=case["residual"], activation=activation)
    theirs = rel_err(linear_ref(case["x"], case["weight"], epilogue=same_dtype), ref)
    ours = rel_err(y, ref)
    assert ours <= 2 * theirs, f"{dtype}: kernel error {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.parametrize("activation", ["gelu", "none"])
def test_linear_fp16(activation):
    _check_low_precision(torch.float16, 33, 72, 40, activation)


@pytest.mark.skipif(_common.INTERPRET, reason="bf16 math does not work in Triton's interpreter (checked on the GPU)")
def test_linear_bf16():
    _check_low_precision(torch.bfloat16, 33, 72, 40, "gelu")


# --- split-K ------------------------------------------------------------------------------------------------------
SPLIT_SHAPES = {  # (lead, m, k, n): K spans >= 4 steps of 64 (max split 4 or 5), M and N off the 32-wide tiles
    "K 256": ((), 37, 256, 40),
    "K 300 tail, (B, L, C) tokens": ((2,), 9, 300, 24),
}


@pytest.mark.parametrize("split_k", [2, 3, 4], ids=["split2", "split3 uneven", "split4"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES.values(), ids=SPLIT_SHAPES.keys())
def test_linear_split_k_matches_unsplit(shape, split_k):
    lead, m, k, n = shape
    assert linear_max_split_k(k) >= 4
    case = make_case(m, k, n, seed=6, lead=lead)
    y, ref = run_both(case, use_residual=True, activation="gelu", split_k=split_k)
    unsplit, _ = run_both(case, use_residual=True, activation="gelu", split_k=1)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-4
    assert rel_err(y, unsplit) < 1e-5  # only the fp32 summation order differs


# every epilogue switch at least once: bias on/off, each activation, residual added or updated in place
SPLIT_EPILOGUES = [
    (True, "none", "none"),
    (False, "gelu", "add"),
    (True, "relu", "add"),
    (True, "gelu", "inplace"),
    (False, "relu", "inplace"),
    (False, "none", "none"),
]


@pytest.mark.parametrize("use_bias,activation,residual_mode", SPLIT_EPILOGUES)
def test_linear_split_k_epilogues(use_bias, activation, residual_mode):
    case = make_case(21, 200, 40, seed=7)
    y, ref = run_both(
        case,
        use_bias=use_bias,
        use_residual=residual_mode != "none",
        inplace=residual_mode == "inplace",
        activation=activation,
        split_k=3,
    )
    assert rel_err(y, ref) < 1e-4


def test_linear_split_k_fp16():
    _check_low_precision(torch.float16, 33, 300, 40, "gelu", split_k=4)


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_linear_split_k_early_exit(bit):
    case = make_case(7, 200, 20, seed=8)
    mask = torch.tensor([1, bit], dtype=torch.int32, device=DEVICE)
    poison = torch.full((7, 20), float("nan"), device=DEVICE)
    workspace = torch.full((4 * 7 * 20,), float("nan"), device=DEVICE)  # its content must never be read
    epilogue = Epilogue(shift=case["bias"], activation="gelu", exit_index=1)
    linear(case["x"], case["weight"], epilogue=epilogue, out=poison, mask=mask, split_k=4, workspace=workspace)
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped split-K linear wrote to its output"
    else:
        want = Epilogue(shift=case["bias"].double(), activation="gelu")
        ref = linear_ref(case["x"].double(), case["weight"].double(), epilogue=want)
        assert rel_err(poison, ref) < 1e-4


def test_linear_workspace_numel():
    m, n = 30, 24
    assert linear_workspace_numel(m, n, 300, split_k=3, device="cpu") == 3 * m * n
    assert linear_workspace_numel(m, n, 300, split_k=1, device="cpu") == 0
    # "auto" never splits off the GPU, nor under the interpreter
    assert linear_workspace_numel(197, 768, 3072, device="cpu") == 0
    if _common.INTERPRET:
        case = make_case(5, 300, 24, lead=(2,))
        assert linear_auto_split_k(case["x"], case["weight"]) == 1
    with pytest.raises(ValueError, match=r"K loop has 5 step\(s\)"):
        linear_workspace_numel(m, n, 300, split_k=6, device="cpu")


@pytest.fixture
def fake_gpu_split_choice(monkeypatch):
    """ "auto" takes the GPU branch here: candidates (1, 2, 4), a do_bench that runs the launch once and reports a
    made-up time per split (2 is the fastest), an empty choice cache. Returns the list of timed splits."""
    timed = []

    def fake_do_bench(fn, **kwargs):
        fn()
        timed.append(fn.args[0])
        return {1: 3.0, 2: 1.0, 4: 2.0}[fn.args[0]]

    monkeypatch.setattr(split_k_module, "auto_candidates", lambda *args: (1, 2, 4))
    monkeypatch.setattr(split_k_module, "MEASURED_SPLITS", {})
    monkeypatch.setattr(split_k_module, "num_sms", lambda device: 132)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return timed


def test_linear_split_k_auto_measures_once(fake_gpu_split_choice):
    # in place: timing must not update the residual stream; only the real launch does, once
    case = make_case(5, 300, 24, seed=9, lead=(2,))
    x, w, b = case["x"], case["weight"], case["bias"]
    assert linear_auto_split_k(x, w) is None  # a measurement is due
    want = linear_ref(x.double(), w.double(), epilogue=Epilogue(shift=b.double(), residual=case["residual"].double()))
    stream = case["residual"].clone()
    linear(x, w, epilogue=Epilogue(shift=b, residual=stream, in_place=True))
    assert fake_gpu_split_choice == [1, 2, 4]
    assert rel_err(stream, want) < 1e-4
    assert linear_auto_split_k(x, w) == 2
    with pytest.raises(ValueError, match=r"workspace has 10 elements but split_k='auto' \(up to 4\)"):
        linear(x, w, epilogue=Epilogue(shift=b), workspace=torch.empty(10, device=DEVICE))
    y = linear(x, w, epilogue=Epilogue(shift=b, residual=case["residual"]))
    assert fake_gpu_split_choice == [1, 2, 4], "the cached choice is reused"
    assert rel_err(y, want) < 1e-4


def test_linear_rejects_workspace_overlap():
    x, w = torch.randn(4, 100, device=DEVICE), torch.randn(16, 100, device=DEVICE)
    out = torch.empty(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="workspace overlaps out"):
        linear(x, w, out=out, split_k=2, workspace=out.view(-1))


TABLE_ROWS = 8  # one row per sub-network of a 3-stage model
ID_SLOT = 3  # the mask slot after the 3 stage bits


@pytest.mark.parametrize("split_k", [1, 3], ids=["whole", "split3"])
def test_linear_table_row_selected_by_the_mask(split_k):
    # every row of an R-row scale/shift table, picked on the device by mask[ID_SLOT], gives the float64 reference of
    # that row; in place on the residual (with the ReLU after the add), as a residual stream update would run
    case = make_case(9, 200, 20, seed=10)
    g = torch.Generator().manual_seed(11)
    scale = (0.5 + torch.arange(TABLE_ROWS)[:, None] / 4 + 0.1 * torch.rand(TABLE_ROWS, 20, generator=g)).to(DEVICE)
    shift = (torch.randn(TABLE_ROWS, 20, generator=g) + torch.arange(TABLE_ROWS)[:, None] * 0.3).to(DEVICE)
    results = []
    for row in range(TABLE_ROWS):
        mask = torch.tensor([0, 1, 1, row], dtype=torch.int32, device=DEVICE)
        stream = case["residual"].clone()
        epilogue = Epilogue(
            scale=scale,
            shift=shift,
            select_index=ID_SLOT,
            activation="gelu",
            residual=stream,
            residual_relu=True,
            in_place=True,
        )
        linear(case["x"], case["weight"], epilogue=epilogue, mask=mask, split_k=split_k)
        one_row = Epilogue(
            scale=scale[row].double(),
            shift=shift[row].double(),
            activation="gelu",
            residual=case["residual"].double(),
            residual_relu=True,
        )
        ref = linear_ref(case["x"].double(), case["weight"].double(), epilogue=one_row)
        assert rel_err(stream, ref) < 1e-4, (row, rel_err(stream, ref))
        results.append(stream)
    assert min(rel_err(a, b) for i, a in enumerate(results) for b in results[:i]) > 1e-2  # the rows really differ
    for row in range(TABLE_ROWS):  # out poisoned, no residual: every element written
        mask = torch.tensor([0, 1, 1, row], dtype=torch.int32, device=DEVICE)
        out = torch.full((9, 20), float("nan"), device=DEVICE)
        epilogue = Epilogue(scale=scale, shift=shift, select_index=ID_SLOT)
        linear(case["x"], case["weight"], epilogue=epilogue, mask=mask, out=out, split_k=split_k)
        want = Epilogue(scale=scale[row].double(), shift=shift[row].double())
        assert rel_err(out, linear_ref(case["x"].double(), case["weight"].double(), epilogue=want)) < 1e-4
    # early exit with a table: out keeps its content
    poison = torch.full((9, 20), float("nan"), device=DEVICE)
    mask = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=DEVICE)
    epilogue = Epilogue(scale=scale, shift=shift, select_index=ID_SLOT, exit_index=0)
    linear(case["x"], case["weight"], epilogue=epilogue, mask=mask, out=poison, split_k=split_k)
    assert torch.isnan(poison).all(), "a skipped kernel with a table wrote to its output"


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"x": torch.randn(4)}, ValueError, r"\(M, K\)"),
        ({"x": torch.randn(4, 8).half()}, TypeError, "weight has dtype"),
        ({"x": torch.randint(0, 2, (4, 8))}, TypeError, "x has dtype"),
        ({"weight": torch.randn(16, 7)}, ValueError, "K=8"),
        ({"weight": torch.randn(8, 16).t()}, ValueError, "unit stride"),
        ({"x": torch.randn(2, 8, 4).transpose(1, 2)}, ValueError, "contiguous"),
        ({"shift": torch.randn(15)}, ValueError, r"epilogue.shift must be \(16,\) or \(rows, 16\)"),
        ({"scale": torch.ones(3, 16)}, ValueError, "tables have 3 rows but select_index=-1"),
        (
            {"scale": torch.ones(3, 16), "select_index": 1, "mask": torch.ones(1, dtype=torch.int32)},
            ValueError,
            "select_index=1 but mask has only 1 entries",
        ),
        ({"activation": "relu6"}, ValueError, "activation='relu6'"),
        ({"residual": torch.randn(4, 15)}, ValueError, "residual must have"),
        ({"out": torch.empty(4, 16).half()}, TypeError, "out has dtype"),
        ({"exit_index": 0}, ValueError, "without mask"),
        ({"exit_index": 0, "mask": torch.ones(1, dtype=torch.int32)}, ValueError, "needs out="),
        ({"exit_index": 3, "mask": torch.ones(2, dtype=torch.int32), "out": torch.empty(4, 16)}, ValueError, "only 2"),
        ({"split_k": 0}, ValueError, "split_k=0 is out of range"),
        ({"split_k": 2}, ValueError, r"K loop has 1 step\(s\) of 64 \(linear_max_split_k\(K\)\).*1 <= split_k <= 1"),
        ({"split_k": "fast"}, ValueError, "use 'auto' or an int"),
        ({"split_k": True}, TypeError, "split_k must be an int"),
        (
            {"x": torch.randn(4, 100), "weight": torch.randn(16, 100), "split_k": 2, "workspace": torch.empty(127)},
            ValueError,
            "workspace has 127 elements but split_k=2 needs 128",
        ),
        ({"workspace": torch.empty(128, dtype=torch.float16)}, TypeError, "workspace has dtype"),
        ({"workspace": torch.empty(256)[::2]}, ValueError, "workspace must be contiguous"),
        ({"workspace": torch.empty(128, device="meta")}, ValueError, "workspace on meta"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_linear_rejects_bad_input(over, error, match):
    args = {"x": torch.randn(4, 8), "weight": torch.randn(16, 8)}
    args.update(over)
    args = {k: (v.to(DEVICE) if torch.is_tensor(v) and v.device.type != "meta" else v) for k, v in args.items()}
    epilogue = Epilogue(**{k: args.pop(k) for k in {f.name for f in dataclasses.fields(Epilogue)} & args.keys()})
    with pytest.raises(error, match=match):
        linear(args.pop("x"), args.pop("weight"), epilogue=epilogue, **args)


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
@pytest.mark.parametrize("split_k", ["auto", 4, 8])
@pytest.mark.parametrize("shape", [((1,), 197, 3072, 768, "none"), ((1,), 197, 768, 768, "none")], ids=["fc2", "proj"])
def test_linear_gpu_split_k_batch1_fp16(shape, split_k):
    # ViT-B/16's few-tile linears at batch 1, where split-K is meant to help
    lead, m, k, n, activation = shape
    _check_low_precision(torch.float16, m, k, n, activation, lead=lead, split_k=split_k)


@pytest.mark.gpu
def test_linear_gpu_inplace_and_exit_fp16():
    case = make_case(197, 3072, 768, dtype=torch.float16, seed=5, lead=(4,))
    y, ref = run_both(case, use_residual=True, inplace=True)
    assert rel_err(y, ref) < 1e-2
    before = y.clone()
    mask = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    linear(
        case["x"],
        case["weight"],
        epilogue=Epilogue(shift=case["bias"], residual=y, in_place=True, exit_index=0),
        mask=mask,
    )
    assert torch.equal(before, y)
