"""The CPU engine: compile() on a CPU input runs the one-graph ONNX file on ONNX Runtime. Every sub-network
against the eager model, set_skip / set_mask writing the mask without rebuilding, profile() + select_skip, the
mask checks, and the fallback when onnxruntime is missing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import randomize

from adaptive_kernels import create_model
from adaptive_kernels.engine import Engine, compile, dispatch, select_skip
from adaptive_kernels.models.skip import skip_to_str
from adaptive_kernels.numerics import relative_error

onnx = pytest.importorskip("onnx", reason="pip install adaptive_kernels[onnx]")
pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet20():
    return randomize(create_model("resnet20_adn"), calibrate=(4, 3, 16, 16))


@pytest.fixture(scope="module")
def engine(resnet20):
    return compile(resnet20, torch.randn(2, 3, 16, 16), dynamic_batch=True)


def test_cpu_engine_is_onnxruntime_and_exact_for_every_subnetwork(engine, resnet20):
    assert isinstance(engine, Engine) and engine.mechanism == "onnxruntime"
    session = engine._session
    configs = resnet20.skip_configs() * 2
    random.Random(0).shuffle(configs)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for skip in configs:
            engine.set_skip(skip)
            assert engine._mask.tolist() == [0 if s else 1 for s in skip]  # the mask contract: 1 = run
            assert relative_error(engine(x), resnet20(x, skip)) < 1e-4
        # skip= switches too, None keeps it; another batch size runs the same graph
        x5 = torch.randn(5, 3, 16, 16)
        assert relative_error(engine(x5, "TFT"), resnet20(x5, "TFT")) < 1e-4
        assert relative_error(engine(x5), resnet20(x5, "TFT")) < 1e-4
    assert engine._session is session  # nothing rebuilt by switching


def test_the_engine_holds_one_graph_with_an_if_per_stage(engine):
    graph = onnx.load_from_string(engine.onnx_model).graph
    assert [i.name for i in graph.input] == ["input", "mask"]
    assert sum(n.op_type == "If" for n in graph.node) == 3


def test_set_mask_and_its_checks(engine, resnet20):
    engine.set_mask(torch.tensor([1, 0, 1], dtype=torch.int32))
    assert engine.skip == (False, True, False)
    engine.set_mask(np.array([0, 0, 1], dtype=np.int32))
    assert engine.skip == (True, True, False)
    with pytest.raises(ValueError, match=r"mask has shape \(4,\) but this model has 3 skippable stages"):
        engine.set_mask(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="mask has dtype torch.float32; the engine's mask is int32"):
        engine.set_mask(torch.ones(3))
    with pytest.raises(TypeError, match="mask has dtype int64"):
        engine.set_mask(np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"mask holds \[1, 2, 1\]: use 1"):
        engine.set_mask(torch.tensor([1, 2, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="mask must be an int32 torch.Tensor or numpy array"):
        engine.set_mask([1, 1, 1])
    assert engine.skip == (True, True, False)  # rejected masks change nothing
    with pytest.raises(ValueError, match="has 4 letters but this model has 3 skippable stages"):
        engine.set_skip("TFTF")


def test_inputs_the_lean_path_does_not_take_as_they_are_are_converted_or_rejected(resnet20):
    # forward passes a float32 CPU tensor of the compiled shape to ONNX Runtime as a NumPy view; every other input
    # goes through Engine's checks: converted when it is fine, rejected with the message naming the compiled input
    engine = compile(resnet20, torch.randn(2, 3, 16, 16))  # dynamic_batch=False
    x = torch.randn(3, 2, 16, 16).permute(1, 0, 2, 3)  # not contiguous
    with torch.no_grad():
        want = resnet20(x, "FTF")
    assert relative_error(engine(x, "FTF"), want) < 1e-4
    wants_grad = x.clone().requires_grad_()
    got = engine(wants_grad)
    assert relative_error(got, want) < 1e-4 and not got.requires_grad
    negative_view = torch.complex(torch.zeros_like(x), -x).conj().imag  # == x, with the negative bit set
    assert negative_view.is_neg() and relative_error(engine(negative_view, "FTF"), want) < 1e-4
    compiled = r"\(2, 3, 16, 16\) torch.float32"
    for bad, error, match in [
        ("image", TypeError, "must be a torch.Tensor"),
        ([[0.0]], TypeError, r"must be a torch.Tensor like .* or a float32 NumPy array of that shape, got list"),
        (torch.randn(2, 3, 16, 16, dtype=torch.float64), TypeError, f"has dtype torch.float64; .* for {compiled}"),
        (torch.randn(2, 3, 16, 16, dtype=torch.bfloat16), TypeError, "has dtype torch.bfloat16"),
        (torch.randn(2, 3, 32, 32), ValueError, r"has shape \(2, 3, 32, 32\); this engine was compiled for"),
        (torch.randn(3, 16, 16), ValueError, r"has shape \(3, 16, 16\)"),
        (torch.randn(3, 3, 16, 16), ValueError, "has batch 3; .* compile with dynamic_batch=True"),
        (torch.empty(2, 3, 16, 16, device="meta"), ValueError, "is on meta; this engine was compiled for"),
    ]:
        with pytest.raises(error, match=match):
            engine(bad, "TTT")
    assert engine.skip == (False, True, False)  # rejected inputs change nothing
    dynamic = compile(resnet20, torch.randn(2, 3, 16, 16), dynamic_batch=True)
    with pytest.raises(ValueError, match="empty batch"):
        dynamic(torch.randn(0, 3, 16, 16))
    # a float64 example: float64 inputs are converted to the graph's float32, float32 ones are rejected
    doubles = compile(resnet20, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert relative_error(doubles(x.double(), "FTF"), want) < 1e-4
    with pytest.raises(TypeError, match="has dtype torch.float32; this engine was compiled for .* torch.float64"):
        doubles(x)


def test_a_numpy_input_gets_numpy_logits_checked_like_a_tensor(engine, resnet20):
    # a float32 NumPy array in, a new NumPy array out, with no torch call on the way (the speed at batch 1:
    # bench/measure_calibrated_cpu.py, the engine_numpy column)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for skip in resnet20.skip_configs():
            got = engine(x.numpy(), skip)
            assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, 10)
            assert np.array_equal(got, engine(x, skip).numpy())
            assert relative_error(torch.from_numpy(got), resnet20(x, skip)) < 1e-4
    again = engine(x.numpy())
    assert not np.shares_memory(again, engine(x.numpy()))  # each call's own array
    fixed = compile(resnet20, torch.randn(2, 3, 16, 16))  # dynamic_batch=False
    for target, bad, error, match in [
        (engine, x.numpy().astype(np.float64), TypeError, r"dtype float64; .*x.astype\(np.float32\)"),
        (engine, x.numpy().astype(np.float16), TypeError, "dtype float16"),
        (engine, np.zeros((3, 3, 32, 32), np.float32), ValueError, r"shape \(3, 3, 32, 32\); .*\(2, 3, 16, 16\)"),
        (engine, np.zeros((3, 16, 16), np.float32), ValueError, r"shape \(3, 16, 16\)"),
        (engine, np.zeros((0, 3, 16, 16), np.float32), ValueError, "empty batch"),
        (fixed, np.zeros((3, 3, 16, 16), np.float32), ValueError, "batch 3; .*dynamic_batch=True"),
    ]:
        target.set_skip("FFF")
        with pytest.raises(error, match=match):
            target(bad, "TTT")
        assert target.skip == (False, False, False)  # rejected before anything changed


def test_forward_hooks_on_the_engine_or_on_every_module_run(engine, resnet20):
    # the engine's __call__ skips nn.Module's hook machinery only when no forward hook is registered
    x = torch.randn(2, 3, 16, 16)
    seen = []
    hooks = [engine.register_forward_pre_hook(lambda module, args: seen.append("pre")),
             engine.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))]
    try:
        with torch.no_grad():
            got = engine(x, "TFT")
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == ["pre", (2, 10)]
    with torch.no_grad():
        assert relative_error(got, resnet20(x, "TFT")) < 1e-4
    engine(x)
    assert len(seen) == 2  # removed: not called
    with torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append("global")):
        engine(x)
    assert seen[2:] == ["global"]


def test_skip_arguments_seen_before_select_what_they_say(engine, resnet20):
    # forward(x, skip) does not parse an immutable argument it has seen (the same object) again; what it selects
    # must still be what the argument says, after any other switch, and mutable or bad arguments are parsed
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = {s: resnet20(x, s) for s in ("TFT", "FFT", "TTF")}
    tft, bits = "TFT", [False, False, True]
    for _ in range(2):
        assert relative_error(engine(x, tft), want["TFT"]) < 1e-4
        engine.set_mask(torch.tensor([0, 0, 1], dtype=torch.int32))  # TTF
        assert relative_error(engine(x), want["TTF"]) < 1e-4
        assert relative_error(engine(x, bits), want["FFT"]) < 1e-4 and engine.skip == (False, False, True)
        bits[0] = True  # the same list, now TFT
        assert relative_error(engine(x, bits), want["TFT"]) < 1e-4
        bits[0] = False
    for _ in range(2):
        with pytest.raises(ValueError, match=r"skip\[0\]=0.5 is not a bool"):
            engine(x, (0.5, False, True))
    assert engine.skip == (True, False, True) and engine._mask.tolist() == [0, 1, 0]  # a rejected skip changes nothing


def test_profile_feeds_select_skip(engine, resnet20):
    engine.set_skip("FTF")
    table = engine.profile(iters=2, warmup=1)
    assert list(table) == [skip_to_str(s) for s in resnet20.skip_configs()]
    assert all(isinstance(v, float) and v > 0 for v in table.values())
    assert engine.skip == (False, True, False)
    accuracy = {s: 90.0 - 2.0 * s.count("T") for s in table}
    assert select_skip(table, accuracy, max(table.values()) + 1.0) == (False, False, False)


def test_without_onnxruntime_compile_falls_back_and_says_how_to_get_it(monkeypatch, resnet20):
    monkeypatch.setattr(dispatch, "onnxruntime_unavailable", lambda: "onnxruntime not installed")
    x = torch.randn(1, 3, 16, 16)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match=r"running the reference model .*pip install adaptive_kernels\[onnx\]"):
            assert compile(resnet20, x).mechanism == "reference"
    with pytest.raises(ValueError, match=r"mechanism='onnxruntime' is unavailable: onnxruntime not installed; pip"):
        compile(resnet20, x, mechanism="onnxruntime")
    with pytest.raises(ValueError, match="mechanism='onnxruntime' runs on the CPU, but example_input is on meta"):
        compile(resnet20, torch.empty(1, 3, 16, 16, device="meta"), mechanism="onnxruntime")


def test_a_given_onnx_model_is_served_only_when_it_is_this_models(engine, resnet20):
    """A file of another model (same structure, other weights; other input size) or a corrupt one is refused with
    one line, before it is served; this model's own file is served."""
    from adaptive_kernels.engine import OnnxRuntimeEngine

    x = torch.randn(2, 3, 16, 16)
    served = OnnxRuntimeEngine(resnet20, x, dynamic_batch=True, onnx_model=engine.onnx_model)
    with torch.no_grad():
        assert relative_error(served(x, "base"), resnet20(x, "base")) < 1e-4
    other = randomize(create_model("resnet20_adn"), seed=1, calibrate=(4, 3, 16, 16))
    with pytest.raises(ValueError, match=r"does not compute this ResNetADN: relative error .* for TTT"):
        OnnxRuntimeEngine(other, x, dynamic_batch=True, onnx_model=engine.onnx_model)
    with pytest.raises(ValueError, match=r"not a one-graph export of this ResNetADN: .* needs input \(N, 3, 32, 32\)"):
        OnnxRuntimeEngine(resnet20, torch.randn(2, 3, 32, 32), dynamic_batch=True, onnx_model=engine.onnx_model)
    truncated = engine.onnx_model[: len(engine.onnx_model) // 2]
    with pytest.raises(ValueError, match=r"given as bytes \(\d+ bytes\) cannot be loaded by ONNX Runtime: .*truncated"
                       ) as error:
        OnnxRuntimeEngine(resnet20, x, dynamic_batch=True, onnx_model=truncated)
    assert "\n" not in str(error.value)
