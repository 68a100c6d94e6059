"""conv2d kernels (implicit GEMM and depthwise) against conv2d_ref computed in float64.

Without CUDA these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on tiny shapes with
odd sizes: channels that are not a multiple of the tile (interpreter tiles are 32 wide), output pixel
counts that are not a multiple of the row tile. GPU tests at ResNet-50 / MobileNetV2 / ViT shapes are
marked ``gpu``.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import triton.testing
from helpers import rel_err

from adaptive_kernels.kernels import Epilogue, _common, conv2d, conv2d_ref, pack_conv2d_weight
from adaptive_kernels.kernels.conv2d import GEMM_TILE, auto_split_k, conv2d_workspace_numel, max_split_k
from adaptive_kernels.kernels.split_k import SPLIT_K_CHOICES, choose_split_k

# the shared split-K choice (conv2d and linear): the fake-GPU tests patch it
split_k_module = importlib.import_module("adaptive_kernels.kernels.split_k")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK = [1, 0, 1]  # stage 0 runs, stage 1 is skipped, stage 2 runs
RUN, SKIP = 0, 1  # indices into MASK: as select_index, RUN picks row 1 (the normal set), SKIP row 0 (the _skip set)
EPILOGUE_FIELDS = {"activation", "residual_relu", "select_index", "exit_index"}


def make_case(n, h, w, cin, cout, k, stride, padding, groups=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    ho = (h + 2 * _pair(padding)[0] - kh) // _pair(stride)[0] + 1
    wo = (w + 2 * _pair(padding)[1] - kw) // _pair(stride)[1] + 1
    case = {
        "x": torch.randn(n, h, w, cin, generator=g),
        "w": torch.randn(cout, cin // groups, kh, kw, generator=g) / (cin // groups * kh * kw) ** 0.5,
        "scale": torch.rand(cout, generator=g) + 0.5,
        "shift": torch.randn(cout, generator=g) * 0.5,
        "scale_skip": torch.rand(cout, generator=g) + 1.5,
        "shift_skip": torch.randn(cout, generator=g) * 0.5 - 1.0,
        "residual": torch.randn(n, ho, wo, cout, generator=g),
    }
    return {k_: (v.to(dtype) if k_ in ("x", "w", "residual") else v).to(DEVICE) for k_, v in case.items()}


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def make_epilogue(case, use=(), dtype=None, **fields):
    """An Epilogue from the case's tensors named in ``use``: "scale"/"shift" (one row), "two_sets" (the skip-aware
    (2, C) tables: row 0 the _skip set, row 1 the normal set), "residual"; floats cast to ``dtype`` when given."""
    t = {}
    if "two_sets" in use:
        t["scale"] = torch.stack([case["scale_skip"], case["scale"]])
        t["shift"] = torch.stack([case["shift_skip"], case["shift"]])
    for name in ("scale", "shift", "residual"):
        if name in use:
            t[name] = case[name]
    if dtype is not None:
        t = {k: v.to(dtype) for k, v in t.items()}
    return Epilogue(**t, **fields)


def run_both(case, *, use=(), dtype_ref=torch.float64, inplace=False, mask=None, **kw):
    """Run the kernel and the float64 reference on the same (already rounded) inputs; epilogue fields in ``kw`` go
    into the Epilogue, the rest to the call."""
    x, w = case["x"], case["w"]
    fields = {k: kw.pop(k) for k in EPILOGUE_FIELDS & kw.keys()}
    ref = conv2d_ref(
        x.to(dtype_ref), w.to(dtype_ref), epilogue=make_epilogue(case, use, dtype_ref, **fields), mask=mask, **kw
    )
    epilogue = make_epilogue(case, use, **fields)
    if inplace:
        epilogue = dataclasses.replace(epilogue, residual=epilogue.residual.clone(), in_place=True)
    y = conv2d(x, pack_conv2d_weight(w), kernel_size=tuple(w.shape[2:]), epilogue=epilogue, mask=mask, **kw)
    if inplace:
        assert y.data_ptr() == epilogue.residual.data_ptr()
    return y, ref


def mask_tensor():
    return torch.tensor(MASK, dtype=torch.int32, device=DEVICE)


GEOMETRIES = {  # n, h, w, cin, cout, kernel, stride, padding
    "1x1 cin tail over 2 blocks": (2, 3, 5, 40, 24, 1, 1, 0),
    "3x3 s1 cout 2 blocks": (1, 5, 7, 20, 36, 3, 1, 1),
    "3x3 s2": (2, 7, 6, 16, 24, 3, 2, 1),
    "1x1 s2 downsample": (2, 7, 7, 24, 40, 1, 2, 0),
    "7x7 s2 stem (flat K)": (1, 11, 9, 3, 16, 7, 2, 3),
    "4x4 s4 patchify (flat K)": (1, 8, 12, 3, 24, 4, 4, 0),
    "16x16 s16 ViT patch (flat K)": (1, 32, 32, 3, 20, 16, 16, 0),
    "3x3 stride (1,2) pad (0,1)": (1, 6, 9, 20, 24, 3, (1, 2), (0, 1)),
}


@pytest.mark.parametrize("geom", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv2d_geometries_fp32(geom):
    n, h, w, cin, cout, k, s, p = geom
    case = make_case(n, h, w, cin, cout, k, s, p)
    y, ref = run_both(case, stride=s, padding=p, use=("scale", "shift", "residual"), activation="relu")
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-4


RESIDUAL_MODES = ["none", "add", "add_relu", "inplace_relu"]


@pytest.mark.parametrize("norm_set", ["normal", "skip"])
@pytest.mark.parametrize("residual_mode", RESIDUAL_MODES)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_conv2d_epilogue_combinations(activation, residual_mode, norm_set):
    case = make_case(1, 4, 5, 20, 24, 1, 1, 0, seed=1)
    case["shift"] = case["shift"] * 8  # push part of the outputs past relu6's clip at 6
    kw = {
        "use": ("two_sets",),
        "activation": activation,
        "mask": mask_tensor(),
        "select_index": RUN if norm_set == "normal" else SKIP,
    }
    if residual_mode != "none":
        kw["use"] += ("residual",)
        kw["residual_relu"] = residual_mode.endswith("relu")
    y, ref = run_both(case, inplace=residual_mode == "inplace_relu", **kw)
    assert rel_err(y, ref) < 1e-4
    # the other set gives a different answer: the selection is real
    other = make_epilogue(
        case,
        kw["use"],
        torch.float64,
        activation=activation,
        select_index=SKIP if norm_set == "normal" else RUN,
        residual_relu=kw.get("residual_relu", False),
    )
    other = conv2d_ref(case["x"].double(), case["w"].double(), epilogue=other, mask=kw["mask"])
    assert rel_err(y, other) > 1e-2


@pytest.mark.parametrize("params", [(), ("shift",), ("scale",)], ids=["plain", "shift only", "scale only"])
def test_conv2d_partial_epilogue(params):
    case = make_case(1, 5, 3, 12, 20, 3, 1, 1, seed=2)
    y, ref = run_both(case, padding=1, use=params)
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize(
    "geom",
    [(1, 7, 5, 40, 3, 1, 1), (1, 9, 7, 24, 3, 2, 1), (1, 5, 6, 20, 5, 1, 2)],
    ids=["3x3 s1 C tail", "3x3 s2", "5x5 s1"],
)
@pytest.mark.parametrize("norm_set", ["normal", "skip"])
def test_conv2d_depthwise(geom, norm_set):
    n, h, w, c, k, s, p = geom
    case = make_case(n, h, w, c, c, k, s, p, groups=c, seed=3)
    y, ref = run_both(
        case,
        stride=s,
        padding=p,
        groups=c,
        use=("two_sets",),
        activation="relu6",
        mask=mask_tensor(),
        select_index=RUN if norm_set == "normal" else SKIP,
    )
    assert rel_err(y, ref) < 1e-4


TABLE_ROWS = 8  # a calibrated model with 3 skippable stages: one row per sub-network
ID_SLOT = 3  # the mask slot after the 3 stage bits: the sub-network id


def distinct_tables(rows, c, seed):
    """(rows, c) scale and shift tables whose rows all differ (row r's scale is near 0.5 + r / 4)."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.arange(rows)[:, None] / 4 + 0.1 * torch.rand(rows, c, generator=g)
    shift = torch.randn(rows, c, generator=g) + torch.arange(rows)[:, None] * 0.3
    return scale.to(DEVICE), shift.to(DEVICE)


@pytest.mark.parametrize(
    "kind,split_k", [("gemm", 1), ("gemm", 3), ("depthwise", 1)], ids=["gemm", "gemm split3", "depthwise"]
)
def test_conv2d_table_row_selected_by_the_mask(kind, split_k):
    # every row of an R-row table, picked on the device by mask[ID_SLOT], gives the float64 reference of that row
    c = 20
    g = c if kind == "depthwise" else 1
    case = make_case(1, 5, 4, c, c, 3, 1, 1, groups=g, seed=12)
    scale, shift = distinct_tables(TABLE_ROWS, c, seed=13)
    w = pack_conv2d_weight(case["w"])
    results = []
    for row in range(TABLE_ROWS):
        mask = torch.tensor([1, 0, 1, row], dtype=torch.int32, device=DEVICE)
        epilogue = Epilogue(
            scale=scale, shift=shift, select_index=ID_SLOT, activation="relu", residual=case["residual"]
        )
        out = torch.full_like(case["residual"], float("nan"))
        y = conv2d(
            case["x"], w, kernel_size=3, padding=1, groups=g, epilogue=epilogue, mask=mask, out=out, split_k=split_k
        )
        assert y.data_ptr() == out.data_ptr()
        # the reference gets the row itself (a one-row epilogue), not the selection
        one_row = Epilogue(
            scale=scale[row].double(), shift=shift[row].double(), activation="relu", residual=case["residual"].double()
        )
        ref = conv2d_ref(case["x"].double(), case["w"].double(), padding=1, groups=g, epilogue=one_row)
        assert rel_err(out, ref) < 1e-4, (row, rel_err(out, ref))
        results.append(out.clone())
    assert min(rel_err(a, b) for i, a in enumerate(results) for b in results[:i]) > 1e-2  # the rows really differ
    # early exit with a table: out keeps its content
    poison = torch.full_like(case["residual"], float("nan"))
    mask = torch.tensor([1, 0, 1, 5], dtype=torch.int32, device=DEVICE)
    epilogue = Epilogue(scale=scale, shift=shift, select_index=ID_SLOT, exit_index=1)
    conv2d(case["x"], w, kernel_size=3, padding=1, groups=g, epilogue=epilogue, mask=mask, out=poison, split_k=split_k)
    assert torch.isnan(poison).all(), "a skipped kernel with a table wrote to its output"


@pytest.mark.parametrize("groups", ["gemm", "depthwise"])
@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_conv2d_early_exit(groups, bit):
    c = 20
    g = c if groups == "depthwise" else 1
    case = make_case(1, 5, 4, c, c, 3, 1, 1, groups=g, seed=4)
    mask = torch.tensor([1, bit], dtype=torch.int32, device=DEVICE)
    poison = torch.full_like(case["residual"], float("nan"))
    use = ("scale", "shift")
    y = conv2d(
        case["x"],
        pack_conv2d_weight(case["w"]),
        kernel_size=3,
        padding=1,
        groups=g,
        epilogue=make_epilogue(case, use, activation="relu", exit_index=1),
        mask=mask,
        out=poison,
    )
    assert y.data_ptr() == poison.data_ptr()
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped kernel wrote to its output"
    else:
        epilogue = make_epilogue(case, use, torch.float64, activation="relu")
        ref = conv2d_ref(case["x"].double(), case["w"].double(), padding=1, groups=g, epilogue=epilogue)
        assert rel_err(poison, ref) < 1e-4
    # the reference follows the same contract
    untouched = torch.full_like(case["residual"], 7.0)
    exit_only = Epilogue(exit_index=1)
    r = conv2d_ref(case["x"], case["w"], padding=1, groups=g, epilogue=exit_only, mask=mask, out=untouched)
    assert r is untouched and (bit == 1 or bool((untouched == 7.0).all()))


LOW_PRECISION_GEOMETRIES = {
    "3x3 s1": (1, 6, 7, 40, 36, 3, 1, 1, 1),
    "7x7 s2 stem": (1, 11, 9, 3, 16, 7, 2, 3, 1),
    "depthwise 3x3 s2": (1, 9, 7, 40, 40, 3, 2, 1, 40),
}


def _check_low_precision(dtype, geom, split_k="auto"):
    n, h, w, cin, cout, k, s, p, g = geom
    case = make_case(n, h, w, cin, cout, k, s, p, groups=g, dtype=dtype, seed=5)
    use = ("two_sets", "residual")
    fields = {"activation": "relu", "residual_relu": True, "select_index": SKIP}
    kw = {"stride": s, "padding": p, "groups": g, "mask": mask_tensor()}
    y, ref = run_both(case, use=use, split_k=split_k, **fields, **kw)
    assert y.dtype == dtype
    torch_same_dtype = conv2d_ref(case["x"], case["w"], epilogue=make_epilogue(case, use, **fields), **kw)
    ours, theirs = rel_err(y, ref), rel_err(torch_same_dtype, ref)
    assert ours <= 2 * theirs, f"{dtype}: kernel error {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.parametrize("geom", LOW_PRECISION_GEOMETRIES.values(), ids=LOW_PRECISION_GEOMETRIES.keys())
def test_conv2d_fp16(geom):
    _check_low_precision(torch.float16, geom)


@pytest.mark.skipif(_common.INTERPRET, reason="bf16 math does not work in Triton's interpreter (checked on the GPU)")
@pytest.mark.parametrize("geom", LOW_PRECISION_GEOMETRIES.values(), ids=LOW_PRECISION_GEOMETRIES.keys())
def test_conv2d_bf16(geom):
    _check_low_precision(torch.bfloat16, geom)


# --- split-K ------------------------------------------------------------------------------------------------------
SPLIT_GEOMETRIES = {  # n, h, w, cin, cout, kernel, stride, padding; every one has max_split_k >= 4
    "1x1 per-tap, cin over 4 K steps": (2, 3, 5, 200, 24, 1, 1, 0),
    "3x3 s2 per-tap": (1, 7, 6, 20, 36, 3, 2, 1),
    "5x5 flat K": (1, 7, 5, 8, 20, 5, 1, 2),
}


@pytest.mark.parametrize("split_k", [2, 3, 4], ids=["split2", "split3 uneven", "split4"])
@pytest.mark.parametrize("geom", SPLIT_GEOMETRIES.values(), ids=SPLIT_GEOMETRIES.keys())
def test_conv2d_split_k_matches_unsplit(geom, split_k):
    n, h, w, cin, cout, k, s, p = geom
    assert max_split_k(cin, k) >= 4
    case = make_case(n, h, w, cin, cout, k, s, p, seed=7)
    kw = {"stride": s, "padding": p, "use": ("scale", "shift", "residual"), "activation": "relu"}
    y, ref = run_both(case, split_k=split_k, **kw)
    unsplit, _ = run_both(case, split_k=1, **kw)
    assert rel_err(y, ref) < 1e-4
    assert rel_err(y, unsplit) < 1e-5  # only the fp32 summation order differs


# every activation, residual mode and norm set at least once, in place included
SPLIT_EPILOGUES = [
    ("none", "none", "normal"),
    ("relu", "add", "skip"),
    ("relu6", "add_relu", "normal"),
    ("relu", "inplace_relu", "skip"),
    ("relu6", "inplace_relu", "normal"),
]


@pytest.mark.parametrize("activation,residual_mode,norm_set", SPLIT_EPILOGUES)
def test_conv2d_split_k_epilogues(activation, residual_mode, norm_set):
    case = make_case(1, 4, 5, 20, 24, 3, 1, 1, seed=8)
    case["shift"] = case["shift"] * 8  # push part of the outputs past relu6's clip at 6
    kw = {
        "padding": 1,
        "use": ("two_sets",),
        "activation": activation,
        "mask": mask_tensor(),
        "select_index": RUN if norm_set == "normal" else SKIP,
    }
    if residual_mode != "none":
        kw["use"] += ("residual",)
        kw["residual_relu"] = residual_mode.endswith("relu")
    y, ref = run_both(case, inplace=residual_mode.startswith("inplace"), split_k=3, **kw)
    assert rel_err(y, ref) < 1e-4


def test_conv2d_split_k_fp16():
    _check_low_precision(torch.float16, LOW_PRECISION_GEOMETRIES["3x3 s1"], split_k=4)


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_conv2d_split_k_early_exit(bit):
    case = make_case(1, 5, 4, 20, 20, 3, 1, 1, seed=9)
    mask = torch.tensor([1, bit], dtype=torch.int32, device=DEVICE)
    poison = torch.full_like(case["residual"], float("nan"))
    workspace = torch.full((4 * 5 * 4 * 20,), float("nan"), device=DEVICE)  # its content must never be read
    conv2d(
        case["x"],
        pack_conv2d_weight(case["w"]),
        kernel_size=3,
        padding=1,
        epilogue=make_epilogue(case, ("scale", "shift"), activation="relu", exit_index=1),
        mask=mask,
        out=poison,
        split_k=4,
        workspace=workspace,
    )
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped split-K conv wrote to its output"
    else:
        epilogue = make_epilogue(case, ("scale", "shift"), torch.float64, activation="relu")
        ref = conv2d_ref(case["x"].double(), case["w"].double(), padding=1, epilogue=epilogue)
        assert rel_err(poison, ref) < 1e-4


def test_max_split_k():
    assert max_split_k(512, 3) == 9 * 8  # per tap: ceil(512 / 64) steps
    assert max_split_k(2048, 1) == 32
    assert max_split_k(100, (1, 3)) == 3 * 2
    assert max_split_k(3, 7) == 3  # flat K: ceil(7*7*3 / 64)
    assert max_split_k(3, 1) == 1
    assert max_split_k(144, 3, groups=144) == 1  # depthwise: nothing to split


def test_choose_split_k_heuristic():
    h100_sms = 132

    def choose(m, cout, k_steps):
        return choose_split_k(m, cout, k_steps, h100_sms, tile=GEMM_TILE)

    assert choose(49, 512, 4) == 1  # K too short to share
    for m in (1, 49, 196, 784, 3136, 12544):
        for cout in (64, 512, 2048):
            previous = None
            for k_steps in range(1, 80, 3):
                split = choose(m, cout, k_steps)
                tiles = -(-m // GEMM_TILE[0]) * -(-cout // GEMM_TILE[1])
                assert split in SPLIT_K_CHOICES and split <= k_steps
                assert split == 1 or (tiles * split <= 2 * h100_sms and k_steps >= 4 * split)
                assert previous is None or split >= previous  # a longer K never splits less
                previous = split
            # more output pixels never split more
            assert choose(m, cout, 72) >= choose(4 * m, cout, 72)


def test_conv2d_workspace_numel():
    m, cout = 30, 24
    assert conv2d_workspace_numel(m, cout, 200, 1, split_k=3, device="cpu") == 3 * m * cout
    assert conv2d_workspace_numel(m, cout, 200, 1, split_k=1, device="cpu") == 0
    assert conv2d_workspace_numel(m, cout, 144, 3, groups=144, device="cpu") == 0
    # "auto" never splits off the GPU, nor under the interpreter
    assert conv2d_workspace_numel(49, 512, 512, 3, device="cpu") == 0
    if _common.INTERPRET:
        case = make_case(1, 7, 7, 40, 24, 3, 1, 1)
        assert auto_split_k(case["x"], pack_conv2d_weight(case["w"]), kernel_size=3, padding=1) == 1
    with pytest.raises(ValueError, match="out of range"):
        conv2d_workspace_numel(m, cout, 200, 1, split_k=5, device="cpu")


@pytest.fixture
def fake_gpu_split_choice(monkeypatch):
    """Make "auto" take the GPU branch on this machine: three candidates, a do_bench that runs the launch once and
    reports a made-up time per split (2 is the fastest), an empty choice cache. Returns the list of timed splits."""
    timed = []

    def fake_do_bench(fn, **kwargs):
        fn()
        split = fn.args[0]
        timed.append(split)
        return {1: 3.0, 2: 1.0, 4: 2.0}[split]

    monkeypatch.setattr(split_k_module, "auto_candidates", lambda *args: (1, 2, 4))
    monkeypatch.setattr(split_k_module, "MEASURED_SPLITS", {})
    monkeypatch.setattr(split_k_module, "num_sms", lambda device: 132)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return timed


def test_conv2d_split_k_auto_measures_once(fake_gpu_split_choice):
    # in place: timing must not update the residual stream; only the real launch does, once
    case = make_case(1, 5, 4, 20, 24, 3, 1, 1, seed=10)
    x, w = case["x"], pack_conv2d_weight(case["w"])
    assert auto_split_k(x, w, kernel_size=3, padding=1) is None  # a measurement is due
    want = conv2d_ref(
        case["x"].double(), case["w"].double(), padding=1, epilogue=Epilogue(residual=case["residual"].double())
    )
    stream = case["residual"].clone()
    conv2d(x, w, kernel_size=3, padding=1, epilogue=Epilogue(residual=stream, in_place=True))
    assert fake_gpu_split_choice == [1, 2, 4]
    assert rel_err(stream, want) < 1e-4
    assert auto_split_k(x, w, kernel_size=3, padding=1) == 2
    with pytest.raises(ValueError, match=r"workspace has 10 elements but split_k='auto' \(up to 4\)"):
        conv2d(x, w, kernel_size=3, padding=1, workspace=torch.empty(10, device=DEVICE))
    y = conv2d(x, w, kernel_size=3, padding=1, epilogue=Epilogue(residual=case["residual"]))
    assert fake_gpu_split_choice == [1, 2, 4], "the cached choice is reused"
    assert rel_err(y, want) < 1e-4


def test_conv2d_split_k_auto_in_capture_uses_heuristic(fake_gpu_split_choice, monkeypatch):
    monkeypatch.setattr(split_k_module, "capturing", lambda device: True)
    case = make_case(1, 5, 4, 20, 24, 3, 1, 1, seed=11)
    y = conv2d(case["x"], pack_conv2d_weight(case["w"]), kernel_size=3, padding=1)
    assert fake_gpu_split_choice == [], "nothing may be timed inside a graph capture"
    assert rel_err(y, conv2d_ref(case["x"].double(), case["w"].double(), padding=1)) < 1e-4


def test_pack_conv2d_weight_layout():
    w = torch.randn(5, 3, 2, 4)
    packed = pack_conv2d_weight(w)
    assert packed.shape == (2 * 4 * 3, 5) and packed.is_contiguous()
    for kh, kw, c, co in [(0, 0, 0, 0), (1, 3, 2, 4), (1, 2, 0, 3)]:
        assert packed[(kh * 4 + kw) * 3 + c, co] == w[co, c, kh, kw]


def _args(**over):
    x = torch.randn(1, 4, 4, 8, device=DEVICE)
    base = {
        "x": x,
        "w_packed": pack_conv2d_weight(torch.randn(16, 8, 3, 3, device=DEVICE)),
        "kernel_size": 3,
        "padding": 1,
    }
    base.update(over)
    return base


def _call(**over):
    """conv2d on _args(**over); Epilogue field names (scale, shift, residual, ...) in ``over`` go into the Epilogue."""
    a = _args(**over)
    fields = {f.name for f in dataclasses.fields(Epilogue)}
    epilogue = Epilogue(**{k: a.pop(k) for k in fields & a.keys()})
    return conv2d(a.pop("x"), a.pop("w_packed"), epilogue=epilogue, **a)


ONE = torch.ones(1, dtype=torch.int32)


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"x": torch.randn(1, 8, 4, 4).permute(0, 2, 3, 1)}, ValueError, "contiguous NHWC"),
        ({"x": torch.randn(4, 4, 8)}, ValueError, "4-D NHWC"),
        ({"x": torch.randint(0, 3, (1, 4, 4, 8))}, TypeError, "dtype"),
        ({"w_packed": torch.randn(16, 8, 3, 3)}, ValueError, "pack_conv2d_weight"),
        ({"w_packed": torch.randn(72, 16).half()}, TypeError, "w_packed has dtype"),
        ({"groups": 2}, ValueError, "groups=2"),
        ({"scale": torch.ones(15)}, ValueError, r"epilogue.scale must be \(16,\) or \(rows, 16\).*got shape \(15,\)"),
        ({"shift": torch.ones(4, 15)}, ValueError, r"epilogue.shift must be \(16,\) or \(rows, 16\)"),
        ({"shift": torch.ones(2, 2, 16)}, ValueError, r"epilogue.shift must be \(16,\) or \(rows, 16\)"),
        ({"scale": torch.ones(0, 16)}, ValueError, "epilogue.scale has no rows"),
        ({"scale": torch.ones(16, 4).t()}, ValueError, "epilogue.scale must be contiguous"),
        ({"scale": torch.ones(4, 16, dtype=torch.int32)}, TypeError, "epilogue.scale has dtype torch.int32"),
        (
            {"scale": torch.ones(4, 16), "shift": torch.ones(4, 16).half(), "select_index": 0, "mask": ONE},
            TypeError,
            "epilogue.scale has dtype torch.float32 but epilogue.shift has torch.float16",
        ),
        (
            {"scale": torch.ones(3, 16), "shift": torch.ones(2, 16), "select_index": 0, "mask": ONE},
            ValueError,
            "epilogue.scale has 3 rows but epilogue.shift has 2",
        ),
        ({"scale": torch.ones(4, 16)}, ValueError, "tables have 4 rows but select_index=-1 can only use row 0"),
        ({"scale": torch.ones(1, 16), "select_index": 0, "mask": ONE}, ValueError, "the tables have 1 row"),
        ({"select_index": 0, "mask": ONE}, ValueError, "there is no scale/shift table"),
        (
            {"scale": torch.ones(8, 16), "select_index": 3, "mask": torch.ones(3, dtype=torch.int32)},
            ValueError,
            "select_index=3 but mask has only 3 entries",
        ),
        ({"scale": torch.ones(8, 16), "select_index": -2, "mask": ONE}, ValueError, "select_index=-2 must be an int"),
        ({"scale": torch.ones(8, 16), "select_index": 0}, ValueError, "select_index=0 given without mask"),
        ({"activation": "gelu"}, ValueError, "activation='gelu'"),
        (
            {"mask": torch.ones(2, dtype=torch.int64), "exit_index": 0, "out": torch.empty(1, 4, 4, 16)},
            TypeError,
            "int32",
        ),
        ({"mask": torch.ones(2, dtype=torch.int32), "exit_index": 2}, ValueError, "only 2 entries"),
        ({"exit_index": 0}, ValueError, "without mask"),
        ({"exit_index": 0, "mask": ONE}, ValueError, "needs out="),
        ({"residual": torch.randn(1, 4, 4, 15)}, ValueError, "epilogue.residual must have the output's shape"),
        ({"residual_relu": True}, ValueError, "residual_relu=True needs epilogue.residual"),
        ({"in_place": True}, ValueError, "in_place=True needs epilogue.residual"),
        (
            {"residual": torch.zeros(1, 4, 4, 16), "in_place": True, "out": torch.empty(1, 4, 4, 16)},
            ValueError,
            "in_place=True writes epilogue.residual: pass out=None",
        ),
        ({"out": torch.empty(1, 4, 4, 16).half()}, TypeError, "out has dtype"),
        ({"kernel_size": 9, "w_packed": torch.randn(9 * 9 * 8, 16)}, ValueError, "smaller than kernel"),
        ({"split_k": 0}, ValueError, "split_k=0 is out of range"),
        ({"split_k": 3}, ValueError, r"K loop has 2 step\(s\) of 64.*1 <= split_k <= 2"),
        ({"split_k": "fast"}, ValueError, "use 'auto' or an int"),
        ({"split_k": 2.0}, TypeError, "split_k must be an int"),
        (
            {"split_k": 2, "workspace": torch.empty(511)},
            ValueError,
            "workspace has 511 elements but split_k=2 needs 512",
        ),
        ({"split_k": 2, "workspace": torch.empty(512, dtype=torch.float64)}, TypeError, "workspace has dtype"),
        ({"split_k": 2, "workspace": torch.empty(512, device="meta")}, ValueError, "workspace on meta"),
        ({"split_k": 2, "workspace": torch.empty(1024)[::2]}, ValueError, "workspace must be contiguous"),
        (
            {"split_k": 2, "groups": 8, "w_packed": pack_conv2d_weight(torch.randn(8, 1, 3, 3))},
            ValueError,
            "depthwise conv",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_conv2d_rejects_bad_input(over, error, match):
    over = {k: (v.to(DEVICE) if torch.is_tensor(v) and v.device.type != "meta" else v) for k, v in over.items()}
    with pytest.raises(error, match=match):
        _call(**over)


def test_conv2d_rejects_out_aliasing_input():
    x = torch.randn(1, 4, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="overlaps x"):
        conv2d(x, pack_conv2d_weight(torch.randn(8, 8, 1, 1, device=DEVICE)), kernel_size=1, out=x)


def test_conv2d_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="conv2d_ref"):
        conv2d(torch.randn(1, 4, 4, 8), pack_conv2d_weight(torch.randn(8, 8, 1, 1)), kernel_size=1)


def test_conv2d_mixed_devices_rejected():
    if DEVICE == "cpu":
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="one device"):
        _call(scale=torch.ones(16))


def test_conv2d_out_aliasing_residual_needs_in_place():
    stream = torch.zeros(1, 4, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="out overlaps epilogue.residual: .* set epilogue.in_place=True"):
        _call(residual=stream, out=stream)


def test_conv2d_ref_rejects_a_mask_row_outside_the_tables():
    case = make_case(1, 3, 3, 8, 8, 1, 1, 0)
    epilogue = Epilogue(scale=torch.ones(4, 8), select_index=1)
    with pytest.raises(ValueError, match=r"mask\[1\] = 4 selects a row outside the 4 rows"):
        conv2d_ref(case["x"], case["w"], epilogue=epilogue, mask=torch.tensor([1, 4], dtype=torch.int32))


# --- GPU: realistic shapes, fp16 -------------------------------------------------------------------------------
GPU_GEOMETRIES = {  # n, h, w, cin, cout, k, stride, padding, groups
    "r50 stem": (2, 224, 224, 3, 64, 7, 2, 3, 1),
    "r50 l1 1x1 64-256": (8, 56, 56, 64, 256, 1, 1, 0, 1),
    "r50 l1 3x3": (8, 56, 56, 64, 64, 3, 1, 1, 1),
    "r50 l2 3x3 s2": (8, 56, 56, 128, 128, 3, 2, 1, 1),
    "r50 l3 1x1 s2 downsample": (8, 28, 28, 512, 1024, 1, 2, 0, 1),
    "r50 l4 3x3": (1, 7, 7, 512, 512, 3, 1, 1, 1),
    "r50 l4 1x1 2048-512": (64, 7, 7, 2048, 512, 1, 1, 0, 1),
    "vit patch 16x16": (2, 224, 224, 3, 768, 16, 16, 0, 1),
    "mbv2 depthwise 3x3": (8, 56, 56, 144, 144, 3, 1, 1, 144),
    "mbv2 depthwise 3x3 s2": (8, 112, 112, 96, 96, 3, 2, 1, 96),
}


@pytest.mark.gpu
@pytest.mark.parametrize("geom", GPU_GEOMETRIES.values(), ids=GPU_GEOMETRIES.keys())
def test_conv2d_gpu_realistic_fp16(geom):
    _check_low_precision(torch.float16, geom)


@pytest.mark.gpu
def test_conv2d_gpu_inplace_and_exit_fp16():
    case = make_case(8, 14, 14, 256, 1024, 1, 1, 0, dtype=torch.float16, seed=6)
    y, ref = run_both(
        case, inplace=True, use=("two_sets", "residual"), residual_relu=True, mask=mask_tensor(), select_index=SKIP
    )
    assert rel_err(y, ref) < 1e-2
    before = y.clone()
    exit_in_place = Epilogue(residual=y, in_place=True, exit_index=SKIP)
    conv2d(case["x"], pack_conv2d_weight(case["w"]), kernel_size=1, epilogue=exit_in_place, mask=mask_tensor())
    assert torch.equal(before, y)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", ["auto", 8, 16])
@pytest.mark.parametrize("geom", [(1, 7, 7, 512, 512, 3, 1, 1, 1), (1, 14, 14, 256, 256, 3, 1, 1, 1)], ids=["l4", "l3"])
def test_conv2d_gpu_split_k_batch1_fp16(geom, split_k):
    # ResNet-50's small-M layers at batch 1, where split-K is meant to help
    _check_low_precision(torch.float16, geom, split_k=split_k)
