"""The serving benchmarks' flags: a bad value is ONE ``<script>.py: error:`` line naming the flag (exit status 2),
given before any work (no trace simulated, no server started, nothing written to --out); good flags still run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from adaptive_kernels import create_model
from adaptive_kernels.training import save_checkpoint
from bench import serving_load, serving_sim

RESULTS = Path(__file__).parents[2] / "bench/results/serving"
PROFILE = RESULTS / "paper_resnet50_share.json"  # a serving_load.py result that records its seed
#: the load test checks for its client and plot (after the model flags, before --out): the cases past that need them
needs_client = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("aiohttp", "matplotlib")),
                                  reason="the load test needs aiohttp and matplotlib")


class Started(Exception):
    """Raised where a script would start its work: the checks let the flags through."""


@pytest.fixture
def files(tmp_path):
    """The paths a case names by a capitalised word: bad files of every kind, a small checkpoint and its accuracies."""
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    checkpoint = save_checkpoint({"model": create_model(spec["name"], **spec["kwargs"]).state_dict(),
                                  "model_spec": spec, "data": {"name": "synthetic", "image_size": [8, 8]}},
                                 tmp_path / "last.pt")
    text = {"NOT_JSON": "# a README\n", "JSON_LIST": "[1, 2]", "NOT_RESULT": '{"rows": []}',
            "ACCURACY": json.dumps({"FFF": 90.0, "TFT": 89.5, "TTT": 89.0}),
            "NO_BASE_ACCURACY": json.dumps({"FFF": 90.0, "TFT": 89.5}),
            "FOUR_STAGE_ACCURACY": json.dumps({"FFFF": 90.0, "TTTT": 89.0})}
    no_base = json.loads(PROFILE.read_text())
    no_base["accuracy"].pop("TTTT")
    text["NO_BASE_PROFILE"] = json.dumps(no_base)
    paths = {"CHECKPOINT": str(checkpoint), "MISSING": str(tmp_path / "missing.json"), "FOLDER": str(tmp_path),
             "OUT": str(tmp_path / "out"), "PROFILE": str(PROFILE),
             "SIM_RESULT": str(RESULTS / "sim_paper_resnet50.json"),
             "NO_SEED": str(RESULTS / "paper_resnet50_split.json")}  # written before the load test recorded its seed
    for name, content in text.items():
        (tmp_path / f"{name.lower()}.json").write_text(content)
        paths[name] = str(tmp_path / f"{name.lower()}.json")
    (tmp_path / "a_file").write_text("x")
    paths["A_FILE"] = str(tmp_path / "a_file")
    return paths


def argv(base: dict, change: dict, files: dict) -> list[str]:
    """``base`` with ``change`` applied (None drops a flag, True gives it alone), paths named as in ``files``."""
    out = []
    for flag, value in {**base, **change}.items():
        if value is None:
            continue
        out.append(flag)
        if value is not True:
            out.append(files.get(value, value))
    return out


def refused(main, args: list[str], flag: str, script: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # ONE line, no traceback
    assert err.startswith(f"{script}: error: ") and flag in err, err
    return err


SWEEP = {"--profile": "PROFILE", "--scenario": "x", "--rates": "5", "--seconds": "1", "--traces": "1", "--out": "OUT"}
REPLAY = {"--replay": "PROFILE", "--scenario": "x", "--repeats": "1", "--out": "OUT"}
SIM_CASES = [
    (SWEEP, {"--profile": "MISSING"}, "--profile"),
    (SWEEP, {"--profile": "FOLDER"}, "--profile"),
    (SWEEP, {"--profile": "NOT_JSON"}, "--profile"),
    (SWEEP, {"--profile": "JSON_LIST"}, "--profile"),
    (SWEEP, {"--profile": "NOT_RESULT"}, "--profile"),
    (SWEEP, {"--profile": "SIM_RESULT"}, "--profile"),
    (SWEEP, {"--profile": "NO_BASE_PROFILE"}, "--profile"),
    (SWEEP, {"--profile": ""}, "--profile"),
    (SWEEP, {"--profile": None}, "--profile"),
    (SWEEP, {"--rates": None}, "--rates"),
    (REPLAY, {"--replay": "MISSING"}, "--replay"),
    (REPLAY, {"--replay": "NOT_JSON"}, "--replay"),
    (REPLAY, {"--replay": "NOT_RESULT"}, "--replay"),
    (REPLAY, {"--replay": "SIM_RESULT"}, "--replay"),
    (REPLAY, {"--replay": "NO_SEED"}, "--seed"),
    (REPLAY, {"--rates": "5"}, "--rates"),
    (REPLAY, {"--cv2": "8"}, "--cv2"),
    (REPLAY, {"--repeats": "0"}, "--repeats"),
    (SWEEP, {"--repeats": "3"}, "--repeats"),
    *((SWEEP, {"--rates": rates}, "--rates") for rates in ("abc", "-5", "0", "nan", "inf", "5,,10", "", "5,-1",
                                                            "5,5")),
    *((SWEEP, {"--seconds": v}, "--seconds") for v in ("-1", "0", "nan", "x")),
    *((SWEEP, {"--noise": v}, "--noise") for v in ("-1", "inf")),
    *((SWEEP, {"--cv2": v}, "--cv2") for v in ("0", "-4", "nan")),
    *((SWEEP, {"--load": v}, "--load") for v in ("0", "-1")),
    *((SWEEP, {"--depth": v}, "--depth") for v in ("1", "1.5", "-0.1")),
    *((SWEEP, {"--scenario": v}, "--scenario") for v in ("a/b", "/x", "", ".", "..", "x" * 300)),
    (SWEEP, {"--rates": "5,200000", "--seconds": "10"}, "--rates 200000 x --seconds 10"),  # 2e6 requests a trace
    (SWEEP, {"--traces": "0"}, "--traces"),
    (SWEEP, {"--seed": "-1"}, "--seed"),
    (SWEEP, {"--out": "A_FILE"}, "--out"),
    (SWEEP, {"--out": ""}, "--out"),
]


@pytest.mark.parametrize("base,change,flag", SIM_CASES,
                         ids=[" ".join(f"{k}={v}" for k, v in c.items())[:60] for _, c, _ in SIM_CASES])
def test_serving_sim_refuses_a_bad_flag_before_any_work(base, change, flag, files, capsys, monkeypatch):
    for work in ("sweep", "replay"):
        monkeypatch.setattr(serving_sim, work, lambda *a, **k: pytest.fail("simulated despite a bad flag"))
    refused(serving_sim.main, argv(base, change, files), flag, "serving_sim.py", capsys)
    assert not Path(files["OUT"]).exists()
    assert Path(files["A_FILE"]).read_text() == "x"


#: (field of a serving_load.py result, a bad value for it; "a.b.0": result["a"]["b"][0]), for --profile and --replay
BAD_VALUES = [("max_batch", 32), ("max_batch", 0), ("accuracy.TTTT", None), ("accuracy.FFFF", "NaN"),
              ("accuracy.FFFF", float("inf")), ("accuracy.TTT", 70.0), ("latency_us", {}), ("latency_us.8", {}),
              ("latency_us.x", {"FFFF": 1.0}), ("latency_us.1.FFFF", -1.0), ("slo_ms", -5), ("slo_ms", 0)]
#: only --replay reads these
BAD_REPLAY_VALUES = [("rounds", 0), ("seconds", 0), ("cv2", -1.0), ("depth", 1.0), ("max_requests", 0),
                     ("seed", -1), ("forced.base", "XXXX"), ("rows", []), ("rows.0.rate", -1),
                     ("rows.0.rate", float("nan")), ("rows.0.policy", "foo"), ("rows.0.slo_attainment", None),
                     ("rows.0.sent", "many")]


def with_value(result: dict, field: str, value) -> dict:
    """``result`` with ``field`` ("a.b.0": ``result["a"]["b"][0]``) set to ``value``."""
    *parents, last = field.split(".")
    at = result
    for key in parents:
        at = at[int(key)] if isinstance(at, list) else at[key]
    at[int(last) if isinstance(at, list) else last] = value
    return result


@pytest.mark.parametrize("base,field,value", [(b, f, v) for f, v in BAD_VALUES for b in (SWEEP, REPLAY)]
                         + [(REPLAY, f, v) for f, v in BAD_REPLAY_VALUES],
                         ids=[f"{'replay' if b is REPLAY else 'sweep'}-{f}={v!r}"[:60]
                              for f, v in BAD_VALUES for b in (SWEEP, REPLAY)]
                         + [f"replay-{f}={v!r}"[:60] for f, v in BAD_REPLAY_VALUES])
def test_serving_sim_refuses_a_result_with_a_bad_value_before_simulating(base, field, value, files, tmp_path, capsys,
                                                                         monkeypatch):
    # a result whose values (not only types) the simulation cannot use: one error line naming the file and the
    # field, before any simulation (it was a traceback minutes in, or a meaningless result for an SLO <= 0)
    for work in ("sweep", "replay"):
        monkeypatch.setattr(serving_sim, work, lambda *a, **k: pytest.fail("simulated despite a bad result"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(with_value(json.loads(PROFILE.read_text()), field, value)))
    flag = "--replay" if base is REPLAY else "--profile"
    err = refused(serving_sim.main, argv(base, {flag: str(path)}, files), f"{flag} {path}", "serving_sim.py", capsys)
    assert field.split(".")[0] in err, err
    assert not Path(files["OUT"]).exists()


@pytest.mark.parametrize("base,change", [(SWEEP, {}), (REPLAY, {"--replay": "NO_SEED", "--seed": "200"})],
                         ids=["sweep", "replay"])
def test_serving_sim_runs_with_good_flags(base, change, files, capsys):
    assert serving_sim.main(argv(base, change, files)) == 0
    out = Path(files["OUT"])
    assert sorted(p.name for p in out.iterdir()) == ["x.json", "x.md"]
    result = json.loads((out / "x.json").read_text())
    rates = [2.5] * 4 + [5.0] * 4 if base is REPLAY else [5.0] * len(serving_sim.SIM_POLICIES)
    assert [r["rate"] for r in result["rows"]] == rates
    assert "| 5 | adaptive |" in capsys.readouterr().out


def test_serving_sim_writes_strict_json_for_a_trace_with_nothing_in_it(files):
    # 0.001 req/s x 1 s: traces with no request (no latency, accuracy or batch to report): strict JSON, "-" in the md
    assert serving_sim.main(argv(SWEEP, {"--rates": "0.001", "--traces": "2"}, files)) == 0
    text = (Path(files["OUT"]) / "x.json").read_text()
    rows = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["rows"]
    assert {(r["sent"], r["p99_ms"], r["mean_batch"]) for r in rows} == {(0, None, None)}
    assert "| 0.001 | adaptive | 0 | 0 | 1.0000 ± 0.0000 | +0.0000 ± 0.0000 | - | - | - |" in (
        Path(files["OUT"]) / "x.md").read_text()


LOAD = {"--checkpoint": "CHECKPOINT", "--accuracy": "ACCURACY", "--slo-ms": "50", "--rates": "30,60", "--seconds": "1",
        "--scenario": "x", "--out": "OUT"}
LOAD_CASES = [
    (LOAD, {"--checkpoint": "MISSING"}, "--checkpoint"),
    (LOAD, {"--checkpoint": "NOT_JSON"}, "--checkpoint"),
    (LOAD, {"--checkpoint": None}, "--checkpoint"),
    (LOAD, {"--accuracy": None}, "--accuracy"),
    (LOAD, {"--accuracy": "MISSING"}, "--accuracy"),
    (LOAD, {"--accuracy": "NOT_JSON"}, "--accuracy"),
    (LOAD, {"--accuracy": "NO_BASE_ACCURACY"}, "--accuracy"),
    (LOAD, {"--accuracy": "FOUR_STAGE_ACCURACY"}, "--accuracy"),
    (LOAD, {"--paper-resnet50": True}, "--paper-resnet50"),
    (LOAD, {"--paper-resnet50": True, "--checkpoint": None}, "--accuracy"),
    *((LOAD, {"--slo-ms": v}, "--slo-ms") for v in ("0", "-5", "nan")),
    *((LOAD, {"--rates": v}, "--rates") for v in ("abc", "-5", "0", "inf", "30,,60", "30,30")),
    *((LOAD, {"--seconds": v}, "--seconds") for v in ("-1", "0")),
    (LOAD, {"--rounds": "0"}, "--rounds"),
    *((LOAD, {"--cv2": v}, "--cv2") for v in ("3", "0", "inf")),
    *((LOAD, {"--depth": v}, "--depth") for v in ("1", "-0.5")),
    *((LOAD, {"--max-batch": v}, "--max-batch") for v in ("0", "2000", "x")),
    *((LOAD, {"--threads": v}, "--threads") for v in ("0", "100000")),
    (LOAD, {"--profile-iters": "0"}, "--profile-iters"),
    (LOAD, {"--max-requests": "0"}, "--max-requests"),
    *((LOAD, {"--timeline-rate": v}, "--timeline-rate") for v in ("45", "0", "x")),
    *((LOAD, {"--policies": v}, "--policies") for v in ("super,foo", "super,super", "")),
    (LOAD, {"--seed": "-1"}, "--seed"),
    *((LOAD, {"--scenario": v}, "--scenario") for v in ("a/b", "", "..")),
    pytest.param(LOAD, {"--out": "A_FILE"}, "--out", marks=needs_client),
]


@pytest.fixture
def no_server(monkeypatch):
    """The load test's expensive steps (building ResNet-50, starting the server) raise ``Started``."""
    def start(*args, **kwargs):
        raise Started

    monkeypatch.setattr(serving_load, "Server", start)
    monkeypatch.setattr(serving_load, "paper_resnet50_checkpoint", start)


@pytest.mark.parametrize("base,change,flag", LOAD_CASES,
                         ids=[" ".join(f"{k}={v}" for k, v in getattr(case, "values", case)[1].items())[:60]
                              for case in LOAD_CASES])
def test_serving_load_refuses_a_bad_flag_before_starting_the_server(base, change, flag, files, capsys, no_server):
    refused(serving_load.main, argv(base, change, files), flag, "serving_load.py", capsys)  # Started: too late
    assert not Path(files["OUT"]).exists()
    assert Path(files["A_FILE"]).read_text() == "x"


@needs_client
@pytest.mark.parametrize("change", [{}, {"--policies": "adaptive,base", "--timeline-rate": "30", "--threads": "1"},
                                    {"--paper-resnet50": True, "--checkpoint": None, "--accuracy": None}])
def test_serving_load_lets_good_flags_through_to_the_server(change, files, no_server):
    with pytest.raises(Started):
        serving_load.main(argv(LOAD, change, files))


def test_serving_load_names_a_missing_client_before_starting_the_server(files, capsys, no_server, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "aiohttp" else find_spec(name, *a))
    assert "pip install aiohttp" in refused(serving_load.main, argv(LOAD, {}, files), "aiohttp", "serving_load.py",
                                            capsys)
    assert not Path(files["OUT"]).exists()
