"""The engine's public API on the CPU: compile's argument checks, the reference fallback (one warning, same
outputs as the model), input checks naming the compiled shape, profile(), and the graph-mode engine with its
capture replaced by eager execution. select_skip: test_engine_select.py; the capture's streams:
test_engine_capture.py."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from helpers import EagerCapture, every_subnetwork, outputs_after_set_skip, randomize
from torch import nn

import adaptive_kernels
from adaptive_kernels import create_model
from adaptive_kernels.engine import Engine, LoweringError, base, compile, dispatch, select_skip
from adaptive_kernels.engine.cuda import engine as engine_module
from adaptive_kernels.engine.cuda.capture import conditional_nodes_unavailable
from adaptive_kernels.engine.cuda.engine import CudaGraphEngine, resolve_mechanism
from adaptive_kernels.engine.cuda.lowering import lower
from adaptive_kernels.kernels import reference_kernels
from adaptive_kernels.models.skip import skip_to_str

pytestmark = pytest.mark.usefixtures("one_thread")

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback used without CUDA")


@pytest.fixture(autouse=True)
def no_onnxruntime(monkeypatch):
    """These tests are about the reference fallback and the generic API: run them as on a machine without
    onnxruntime (test_engine_onnxruntime.py tests the CPU engine)."""
    monkeypatch.setattr(dispatch, "onnxruntime_unavailable", lambda: "onnxruntime not installed")


@pytest.fixture(scope="module")
def resnet20():
    return randomize(create_model("resnet20_adn"), calibrate=(4, 3, 16, 16))


def test_package_exports():
    assert adaptive_kernels.compile is compile
    assert adaptive_kernels.select_skip is select_skip


# ---- compile -----------------------------------------------------------------------------------------
def test_compile_rejects_bad_arguments(resnet20):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError, match="takes an ADN model"):
        compile(nn.Conv2d(3, 3, 1), x)
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        compile(resnet20, [[1.0]])
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        compile(resnet20, torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="dtype=torch.int16 is not supported"):
        compile(resnet20, x, dtype=torch.int16)
    with pytest.raises(ValueError, match="dtype=torch.int8 runs on OpenVINO only: pass mechanism='openvino'"):
        compile(resnet20, x, dtype=torch.int8)
    with pytest.raises(ValueError, match="mechanism='fast'"):
        compile(resnet20, x, mechanism="fast")
    with pytest.raises(ValueError, match="'onnxruntime'"):  # the error lists every mechanism
        compile(resnet20, x, mechanism="fast")
    with pytest.raises(TypeError, match="dynamic_batch must be a bool"):
        compile(resnet20, x, dynamic_batch=1)


def test_compile_rejects_a_model_it_cannot_lower_even_without_cuda():
    model = create_model("resnet20_adn").eval()
    model.layer3[1].relu = nn.SiLU()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error comes first, not a fallback warning
        with pytest.raises(LoweringError, match="layer3.1: only ReLU activations are lowered"):
            compile(model, torch.randn(1, 3, 16, 16))
    assert issubclass(LoweringError, ValueError)


# ---- the reference fallback --------------------------------------------------------------------------
@needs_no_cuda
def test_cpu_fallback_warns_once_and_matches_the_model(resnet20):
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="CUDA is not available; running the reference model") as record:
        engine = compile(resnet20, x)
    assert len(record) == 1
    assert isinstance(engine, Engine) and engine.mechanism == "reference" and engine.capture_count == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per call
        with torch.no_grad():
            for skip in resnet20.skip_configs():
                torch.testing.assert_close(engine(x, skip), resnet20(x, skip), rtol=0, atol=0)
            engine.set_skip("TFT")
            assert engine.skip == (True, False, True)
            # skip=None keeps the configuration set last
            torch.testing.assert_close(engine(x), resnet20(x, "TFT"), rtol=0, atol=0)
            engine.set_skip(None)
            torch.testing.assert_close(engine(x), resnet20(x, "super"), rtol=0, atol=0)


@needs_no_cuda
def test_fallback_runs_its_own_copy_in_eval_mode(resnet20):
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning):
        engine = compile(resnet20, x)
    want = resnet20(x).detach()
    resnet20.train()
    try:
        with torch.no_grad():
            resnet20.fc.weight.add_(1.0)
            got = engine(x)
            resnet20.fc.weight.sub_(1.0)
    finally:
        resnet20.eval()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_swin_size_that_needs_window_padding_runs_its_reference():
    # 32x32 -> 8x8 tokens, which Swin-T pads to its 7x7 windows: not lowered, so the engine warns (before any
    # capture, on any machine) and runs the reference model
    model = create_model("swin_t_adn", num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="8x8 feature map is not a multiple of the 7x7 window") as record:
        engine = compile(model, x)
    assert len(record) == 1
    assert engine.mechanism == "reference" and engine.capture_count == 0
    with torch.no_grad():
        torch.testing.assert_close(engine(x, "TFTF"), model(x, "TFTF"), rtol=0, atol=0)


@needs_no_cuda
def test_swin_at_a_lowered_size_falls_back_only_for_lack_of_cuda():
    # 224x224 -> 56x56 tokens in 7x7 windows, down to one 7x7 window (unshifted) in the last stage: lowered, so
    # the only reason to run the reference here is the missing GPU
    model = create_model("swin_t_adn", num_classes=5).eval()
    x = torch.randn(1, 3, 224, 224)
    with pytest.warns(UserWarning, match="CUDA is not available; running the reference model") as record:
        engine = compile(model, x)
    assert len(record) == 1 and engine.mechanism == "reference"


# ---- input checks --------------------------------------------------------------------------------------
def _engine(model, x, **kwargs) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile(model, x, **kwargs)


def test_bad_input_errors_name_the_compiled_shape(resnet20):
    engine = _engine(resnet20, torch.randn(2, 3, 16, 16))
    compiled = r"\(2, 3, 16, 16\) torch.float32"
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        engine("image")
    with pytest.raises(TypeError, match=f"has dtype torch.float64; this engine was compiled for {compiled}"):
        engine(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"has shape \\(2, 3, 32, 32\\); this engine was compiled for {compiled}"):
        engine(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=f"has shape \\(2, 48, 16\\); this engine was compiled for {compiled}"):
        engine(torch.randn(2, 48, 16))
    with pytest.raises(ValueError, match="has batch 3; .* compile with dynamic_batch=True"):
        engine(torch.randn(3, 3, 16, 16))
    with pytest.raises(ValueError, match="is on meta; this engine was compiled for"):
        engine(torch.empty(2, 3, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="has 2 letters but this model has 3 skippable stages"):
        engine(torch.randn(2, 3, 16, 16), skip="TF")
    assert engine.skip == (False, False, False)  # a rejected call changes nothing


@needs_no_cuda
def test_dynamic_batch_accepts_other_batch_sizes(resnet20):
    engine = _engine(resnet20, torch.randn(2, 3, 16, 16), dynamic_batch=True)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(engine(x, "FTF"), resnet20(x, "FTF"), rtol=0, atol=0)


# ---- mechanisms ----------------------------------------------------------------------------------------
def test_mechanism_resolution():
    assert resolve_mechanism("early_exit") == "early_exit"
    why = conditional_nodes_unavailable()
    if why is None:
        assert resolve_mechanism("auto") == resolve_mechanism("conditional") == "conditional"
    else:
        assert resolve_mechanism("auto") == "early_exit"
        with pytest.raises(ValueError, match="mechanism='conditional' is unavailable: .*Use mechanism='early_exit'"):
            resolve_mechanism("conditional")


# ---- profile ---------------------------------------------------------------------------------------------
@needs_no_cuda
def test_profile_times_every_subnetwork_and_keeps_the_default(resnet20):
    engine = _engine(resnet20, torch.randn(1, 3, 16, 16))
    engine.set_skip("FTF")
    table = engine.profile(iters=2, warmup=1)
    assert list(table) == [skip_to_str(s) for s in resnet20.skip_configs()]
    assert all(isinstance(v, float) and v > 0 for v in table.values())
    assert engine.skip == (False, True, False)
    accuracy = {s: 90.0 - 2.0 * s.count("T") for s in table}  # skipping costs accuracy
    budget = max(table.values()) + 1.0
    assert select_skip(table, accuracy, budget) == (False, False, False)
    with pytest.raises(ValueError, match="iters must be a positive int"):
        engine.profile(iters=0)
    with pytest.raises(ValueError, match=r"profile\(batch_size=4\): this engine runs batch 1 only; compile with dyn"):
        engine.profile(batch_size=4)


@needs_no_cuda
def test_profile_at_another_batch_size_runs_that_batch(monkeypatch, resnet20):
    engine = _engine(resnet20, torch.randn(2, 3, 16, 16), dynamic_batch=True)
    seen = []
    run = type(engine)._run
    monkeypatch.setattr(type(engine), "_run", lambda self, x, skip: seen.append(tuple(x.shape)) or run(self, x, skip))
    table = engine.profile(iters=2, warmup=0, batch_size=5)
    assert len(table) == 8 and set(seen) == {(5, 3, 16, 16)} and len(seen) == 16
    seen.clear()
    engine.profile(iters=1, warmup=0)  # None: the example's batch
    assert set(seen) == {(2, 3, 16, 16)}
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
            engine.profile(batch_size=bad)


@needs_no_cuda
def test_a_long_profile_reports_its_progress(monkeypatch, resnet20, caplog):
    engine = _engine(resnet20, torch.randn(1, 3, 16, 16))
    with caplog.at_level(logging.INFO, logger="adaptive_kernels"):
        engine.profile(iters=1, warmup=0)  # quick: the start line only
        assert [r.getMessage() for r in caplog.records] == [
            "[profile] timing 8 sub-networks, 1 runs each after 0 warm-up, batch 1 ..."]
        caplog.clear()
        monkeypatch.setattr(base, "PROGRESS_EVERY_S", 0.0)  # as if each sub-network took long
        engine.profile(iters=1, warmup=0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8 and lines[1].startswith("[profile] 1/8 sub-networks timed (")
    assert lines[-1].startswith("[profile] 7/8 sub-networks timed (")


# ---- the graph-mode engine logic, with the CUDA graph replaced by eager execution ------------------------
def test_graph_mode_engine_follows_set_skip_and_captures_once(monkeypatch, resnet20, caplog):
    caplog.set_level("INFO", logger="adaptive_kernels.engine.cuda.engine")
    monkeypatch.setattr(engine_module, "CapturedGraph", EagerCapture)
    x = torch.randn(2, 3, 16, 16)
    program = lower(resnet20, (3, 16, 16), kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    engine = CudaGraphEngine(program, x, mechanism="early_exit", dynamic_batch=True)
    assert engine.capture_count == 1
    want = every_subnetwork(resnet20, x)
    for skip, got in outputs_after_set_skip(engine, x, resnet20.skip_configs()):
        assert got.data_ptr() != engine._captures[2].tensors[program.output].data_ptr()  # a copy
        torch.testing.assert_close(got, want[skip], rtol=1e-4, atol=1e-5)
    assert engine.capture_count == 1
    with torch.no_grad():
        x5 = torch.randn(5, 3, 16, 16)
        with pytest.warns(UserWarning, match=r"capturing a new CUDA graph for input shape \(5, 3, 16, 16\)"):
            got = engine(x5, "TTF")
        torch.testing.assert_close(got, resnet20(x5, "TTF"), rtol=1e-4, atol=1e-5)
        assert engine.capture_count == 2
    # every capture is logged under the lowered model's name (the GPU dynamic-batch test counts these lines)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["captured ResNetADN"] * 2


