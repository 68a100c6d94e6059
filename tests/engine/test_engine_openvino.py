"""The OpenVINO engine (``compile(..., mechanism="openvino")``): fp32 from the one graph, exact for every
sub-network against the torch model and the ONNX Runtime engine; INT8 with one quantized model per sub-network,
each close to its own sub-network's fp32 output and far from every other's, selected without recompiling; static
sub-networks cut out of the one graph; threads; the errors."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import outputs_after_set_skip, wrong_outputs_from_threads

from adaptive_kernels.engine import OpenVinoEngine, compile, dispatch
from adaptive_kernels.engine.openvino.engine import shared_core
from adaptive_kernels.engine.openvino.subnets import specialize
from adaptive_kernels.numerics import relative_error

pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")
openvino = pytest.importorskip("openvino", reason="pip install adaptive_kernels[openvino]")

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
MODEL_WIDTH = 4  # the `model` fixture (tests/engine/conftest.py)
# INT8 vs fp32, relative error on X, resnet20_adn width 4 on 16x16 images, 64 random calibration images, measured
# (openvino 2026.4.1, nncf 3.4.0): 0.044-0.070 over the sub-networks (uncalibrated norms), 0.020-0.038 (calibrated);
# any other sub-network's fp32 output is >= 0.23 away
INT8_TOLERANCE = 0.12



@pytest.fixture(scope="module")
def fp32(model):
    return compile(model, X, mechanism="openvino", dtype=torch.float32, dynamic_batch=True)


@pytest.fixture(scope="module")
def int8(model):
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return compile(model, X, mechanism="openvino", dtype=torch.int8, calibration=images)


def test_fp32_is_exact_for_every_subnetwork_like_onnxruntime(model, fp32, want):
    assert isinstance(fp32, OpenVinoEngine) and fp32.mechanism == "openvino" and fp32.precision == "fp32"
    onnxruntime = compile(model, X)
    assert onnxruntime.mechanism == "onnxruntime"
    for skip, got in outputs_after_set_skip(fp32, X, model.skip_configs()):
        assert relative_error(got, want[skip]) < 1e-4
        assert relative_error(got, onnxruntime(X, skip)) < 1e-4
    with torch.no_grad():
        x5 = torch.randn(5, 3, 16, 16)  # another batch size, the same compiled graph
        assert relative_error(fp32(x5, "TFT"), model(x5, "TFT")) < 1e-4
        got = fp32(x5.numpy(), "FTT")  # NumPy in, NumPy out
        assert isinstance(got, np.ndarray) and relative_error(torch.from_numpy(got), model(x5, "FTT")) < 1e-4
    fp32.set_mask(torch.tensor([0, 1, 1], dtype=torch.int32))
    assert fp32.skip == (True, False, False)
    assert relative_error(fp32(X), want[True, False, False]) < 1e-4


def test_a_subnetwork_cut_out_of_the_one_graph_is_static_and_exact(model, fp32, want):
    one_graph = shared_core().read_model(fp32.onnx_model)
    for skip in [(False, True, False), (True, True, True)]:
        static = specialize(one_graph, np.array([0 if s else 1 for s in skip], dtype=np.int32))
        ops = {node.get_type_name() for node in static.get_ordered_ops()}
        assert "If" not in ops and [p.get_friendly_name() for p in static.get_parameters()] == ["input"]
        compiled = shared_core().compile_model(static, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = torch.from_numpy(compiled.create_infer_request().infer({"input": X.numpy()})[0])
        assert relative_error(got, want[skip]) < 1e-4
    assert {p.get_friendly_name() for p in one_graph.get_parameters()} == {"input", "mask"}  # left as it was


def test_int8_runs_each_subnetwork_with_its_own_model_and_switches_without_recompiling(model, int8, want):
    assert int8.precision == "int8" and len(int8._subnets) == 8
    compiled = {skip: requests.compiled for skip, requests in int8._subnets.items()}
    configs = model.skip_configs() * 2
    random.Random(1).shuffle(configs)
    with torch.no_grad():
        for skip in configs:
            got = int8(X, skip)
            own = relative_error(got, want[skip])
            nearest_other = min(relative_error(got, y) for s, y in want.items() if s != skip)
            assert own < INT8_TOLERANCE and own < nearest_other / 2, (skip, own, nearest_other)
            int8.set_skip(skip)
            assert torch.equal(int8(X), got)  # deterministic, and the default is the sub-network set
    assert {skip: r.compiled for skip, r in int8._subnets.items()} == compiled  # nothing recompiled


def test_threads_sharing_one_engine_each_get_their_own_subnetwork(model, fp32, int8, want):
    assert wrong_outputs_from_threads(fp32, X, want) == 0
    with torch.no_grad():
        own = {skip: int8(X, skip) for skip in model.skip_configs()}  # INT8 is deterministic: its own outputs
    assert wrong_outputs_from_threads(int8, X, own) == 0
    assert all(len(r._idle) >= 1 for r in int8._subnets.values())  # every request given back


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_image_holding_nan_or_inf_answers_nan_like_the_model_and_the_other_is_exact(model, fp32, int8, bad):
    """OpenVINO's CPU plugin answers finite logits for an image holding NaN (the torch model and ONNX Runtime: NaN);
    the engine answers that image's row with NaN, the other row as before."""
    for row, where in ((0, (0, 0, 3, 4)), (1, (1,))):  # one value of the first image, all of the second
        x = X.clone()
        x[where] = bad
        with torch.no_grad():
            ref = model(x, "TFT")
        good = 1 - row
        assert ref[row].isnan().all() and ref[good].isfinite().all()  # the reference itself
        for engine, tolerance in ((fp32, 1e-4), (int8, INT8_TOLERANCE)):
            got = engine(x, "TFT")
            assert got[row].isnan().all()
            assert relative_error(got[good], ref[good]) < tolerance
            assert torch.equal(got[good], engine(X, "TFT")[good])  # as if served without the bad image


def test_profile_times_every_subnetwork(int8, model):
    int8.set_skip("FTF")
    table = int8.profile(iters=2, warmup=1)
    assert len(table) == 8 and all(v > 0 for v in table.values()) and int8.skip == (False, True, False)


def test_int8_builds_only_the_subnetworks_asked_for_and_refuses_the_others(model, want):
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tft, ttt = (True, False, True), (True, True, True)
    engine = compile(model, X, mechanism="openvino", dtype=torch.int8, calibration=images, skips=["TTT", "TFT", ttt])
    assert engine.skip_configs() == [tft, ttt] and list(engine._subnets) == [tft, ttt]  # engine order, each once
    assert engine.skip == tft  # the super-net was not built: the most capable built one is the default
    assert set(engine.profile(iters=1, warmup=0)) == {"TFT", "TTT"}
    with torch.no_grad():
        for skip in (tft, ttt):
            assert relative_error(engine(X, skip), want[skip]) < INT8_TOLERANCE
    with pytest.raises(ValueError, match="sub-network FFF was not compiled to INT8: this engine holds TFT, TTT; "
                                         "compile with skips= including it"):
        engine(X, "super")
    with pytest.raises(ValueError, match="sub-network FTF was not compiled"):
        engine.set_mask(torch.tensor([1, 0, 1], dtype=torch.int32))
    assert engine.skip == ttt  # refused: the default is the one set last
    for skips, error, match in [([], ValueError, "skips is empty"), ("TFT", TypeError, "skips must be a list"),
                                (["TFTF"], ValueError, "4 letters but this model has 3")]:
        with pytest.raises(error, match=match):
            compile(model, X, mechanism="openvino", dtype=torch.int8, calibration=images, skips=skips)
    for mechanism, dtype in (("openvino", torch.float32), ("auto", torch.float32)):
        with pytest.raises(ValueError, match="skips= is for INT8"):
            compile(model, X, mechanism=mechanism, dtype=dtype, skips=["TFT"])


def test_the_errors_name_the_fix(model, monkeypatch):
    images = torch.randn(8, 3, 16, 16)
    with pytest.raises(ValueError, match="INT8 needs calibration images: compile\\(..., dtype=torch.int8, calib"):
        compile(model, X, mechanism="openvino", dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype=torch.int8 runs on OpenVINO only: pass mechanism='openvino'"):
        compile(model, X, dtype=torch.int8, calibration=images)
    with pytest.raises(ValueError, match="calibration images are for INT8 only"):
        compile(model, X, mechanism="openvino", dtype=torch.float32, calibration=images)
    with pytest.raises(ValueError, match=r"calibration images must be \(N, 3, 16, 16\) tensors .* got \(8, 3, 32, 32\)"):
        compile(model, X, mechanism="openvino", dtype=torch.int8, calibration=torch.randn(8, 3, 32, 32))
    with pytest.raises(ValueError, match="got 1 images, fewer than one batch of 2"):
        compile(model, X, mechanism="openvino", dtype=torch.int8, calibration=[(images[:1], torch.zeros(1))])
    with pytest.raises(ValueError, match="hold NaN"):
        compile(model, X, mechanism="openvino", dtype=torch.int8, calibration=images.fill_(float("nan")))
    with pytest.raises(ValueError, match="mechanism='openvino' runs on the CPU, but example_input is on meta"):
        compile(model, torch.empty(2, 3, 16, 16, device="meta"), mechanism="openvino")
    monkeypatch.setattr(dispatch, "openvino_unavailable", lambda int8: "openvino not installed")
    with pytest.raises(ValueError, match=r"^mechanism='openvino' is unavailable: openvino not installed; pip install "
                       r"adaptive_kernels\[openvino\]"):
        compile(model, X, mechanism="openvino")


# A process that makes two OpenVINO engines (fp32, then INT8, whose NNCF makes Cores of its own), deletes the first
# one first, then handles a signal in Python (SIGCHLD when a child exits): with a Core per engine it died of SIGSEGV
# (the CPU plugin put back an alternate signal stack it had already freed; engine.py's module docstring), which is
# how the whole test suite once crashed.
ENGINES_DELETED_OUT_OF_ORDER = """
import gc, signal, subprocess, time
import torch
import adaptive_kernels as ak
model = ak.create_model("resnet20_adn", width=4).eval()
x = torch.randn(1, 3, 16, 16)
first = ak.compile(model, x, mechanism="openvino", dtype=torch.float32)
second = ak.compile(model, x, mechanism="openvino", dtype=torch.int8, calibration=torch.randn(8, 3, 16, 16))
expected = model(x, skip="TFT")
assert ak.numerics.relative_error(first(x, "TFT"), expected) < 1e-4
assert ak.numerics.relative_error(second(x, "TFT"), expected) < 0.2
del first; gc.collect()
del second; gc.collect()
signal.signal(signal.SIGCHLD, lambda *args: None)
subprocess.run(["true"], check=True)
time.sleep(0.1)
print("alive")
"""


def test_engines_deleted_in_any_order_leave_the_process_able_to_take_signals():
    proc = subprocess.run([sys.executable, "-c", ENGINES_DELETED_OUT_OF_ORDER], check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("alive"), (
        f"exit {proc.returncode} (-11: SIGSEGV)\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
