"""``build_plan``'s and ``ServingPlan.check_slo``'s argument checks: one line naming the argument, before the
compile (10-14 s on the test's small net, minutes on ResNet-50): a max_batch or profile_iters out of range or of
the wrong type, a device that is no serving device or whose CUDA is not here, a name that is no URL segment; the
accuracy may be an ``eval --json`` file, as ``serve --accuracy`` reads it; an SLO that is no number of
milliseconds (NaN passed before) is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaptive_kernels.serving import build_plan
from adaptive_kernels.serving import plan as plan_module

ACCURACY = {"FFF": 90.0, "TTT": 88.0}


@pytest.fixture
def no_compile(monkeypatch):
    monkeypatch.setattr(plan_module, "compile_engine", lambda *a, **k: pytest.fail("compiled despite a bad argument"))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_batch": 0}, ValueError, r"max_batch must be an int in \[1, 1024\], got 0"),
    ({"max_batch": 2.0}, TypeError, r"max_batch must be an int in \[1, 1024\], got 2.0 of type float"),
    ({"max_batch": True}, TypeError, r"max_batch must be an int in \[1, 1024\], got True of type bool"),
    ({"max_batch": 2000}, ValueError, r"max_batch must be an int in \[1, 1024\], got 2000"),
    ({"profile_iters": 0}, ValueError, "profile_iters must be a positive int, got 0"),
    ({"profile_iters": "3"}, TypeError, "profile_iters must be a positive int, got '3' of type str"),
    ({"device": "cuda"}, ValueError, "device 'cuda' asked for but CUDA is not available: use --device cpu"),
    ({"device": "tpu"}, ValueError, "device 'tpu' is not a device: use cpu, cuda or cuda:N"),
    ({"device": "meta"}, ValueError, "device 'meta': a server runs on cpu or cuda / cuda:N"),
    ({"device": None}, TypeError, "device must be a str"),
    ({"device": "cuda", "int8_calibration": torch.zeros(2, 1, 16, 16)}, ValueError,
     "--int8 runs on the CPU \\(OpenVINO\\), not on cuda: drop --int8 or use --device cpu"),
    ({"name": "a/b"}, ValueError, "name must be letters, digits, '_', '.' or '-' .* got 'a/b'"),
    ({"accuracy": 3}, TypeError, "accuracy must be a mapping .* or the path of an `eval --json` file, got 3"),
    ({"accuracy": {"FF": 90.0}}, ValueError, "has 2 letters but this model has 3 skippable stages"),
])
def test_build_plan_refuses_bad_arguments_before_compiling(small_model, no_compile, monkeypatch, kwargs, error,
                                                           message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    args = {"name": "r20", "max_batch": 2, "accuracy": ACCURACY, **kwargs}
    with pytest.raises(error, match=message) as raised:
        build_plan(small_model, args.pop("name"), (1, 16, 16), **args)
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)  # the CLI's one-line errors


def test_build_plan_takes_the_accuracy_as_an_eval_json_file(small_model, tmp_path, monkeypatch):
    class Compiled(Exception):
        pass

    def compile_engine(model, example, *, int8_calibration=None, served=None):
        raise Compiled(served)

    monkeypatch.setattr(plan_module, "compile_engine", compile_engine)
    records = tmp_path / "eval.json"
    records.write_text(json.dumps([{"skip": skip, "accuracy": a} for skip, a in ACCURACY.items()]))
    for accuracy in (records, str(records)):
        with pytest.raises(Compiled) as compiled:
            build_plan(small_model, "r20", (1, 16, 16), max_batch=2, accuracy=accuracy)
        assert compiled.value.args[0] == {(False,) * 3: 90.0, (True,) * 3: 88.0}


@pytest.mark.parametrize("slo_ms, error", [
    (math.nan, ValueError), (math.inf, ValueError), (0.0, ValueError), (-5.0, ValueError), (True, TypeError),
    ("50", TypeError), (None, TypeError),
])
def test_check_slo_refuses_what_is_no_slo(small_plan, slo_ms, error):
    with pytest.raises(error, match="slo_ms must be a positive, finite number of milliseconds, got"):
        small_plan.check_slo(slo_ms)


def test_check_slo_takes_an_slo_the_fastest_sub_network_meets(small_plan):
    small_plan.check_slo(1e6)
    small_plan.check_slo(10**9)  # an int
    with pytest.raises(ValueError, match="below the fastest sub-network's batch-1 latency"):
        small_plan.check_slo(1e-6)


def test_measuring_the_accuracies_says_what_it_measures_first_and_counts_each_subnetwork():
    from adaptive_kernels import create_model
    from adaptive_kernels.training import build_data

    data = build_data("synthetic", test_subset=64)
    model = create_model("resnet20_adn", num_classes=data.num_classes, in_chans=data.in_chans, width=2).eval()
    heard: list[str] = []
    measured = plan_module.measure_accuracies(model, data, progress=heard.append)
    assert heard[0] == f"measuring the accuracy of 8 sub-networks on {data.num_test} synthetic test images ..."
    assert [line.rsplit(" ", 1)[-1] for line in heard[1:]] == [f"({i}/8)" for i in range(1, 9)]
    with torch.no_grad():  # top-1 counted here from the test batches, not through measure_accuracy
        batches = list(data.test_batches(batch_size=16))
        for skip in model.skip_configs():
            right = sum(int((model(x, skip).argmax(1) == y).sum()) for x, y in batches)
            assert measured[skip] == pytest.approx(100.0 * right / data.num_test)
    assert len(measured) == 8
