"""bench/gpu_check.sh in its CPU dry-run mode: the two-call plan, sections, caps, the budget, rows and the table under
$OUT, and its argument errors."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import _harness as harness
from bench._harness import ROW_KEYS

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ADN_", "OUT"))}
    full_env.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=False, env=full_env, capture_output=True, text=True, timeout=240
    )


def summary(out: Path) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in (out / "summary.txt").read_text().splitlines()}


def test_dry_run_keeps_going_and_writes_rows(tmp_path):
    # both calls: call 1's build, env and GPU tests (skipped: dry run), call 2's autotuned engine (tagged rows,
    # engine providers only) and switching, cut by a 1 s cap: a benchmark section cut by its cap keeps its rows
    # and does not fail the run
    out = tmp_path / "out"
    proc = run_script(
        out,
        "--smoke",
        ADN_GPU_CHECK_SECTIONS="env,build,gpu_tests,engine_autotuned,switching,plot",
        ADN_GPU_CHECK_CAP_switching="1",
    )
    status = {name: fields[0] for name, fields in summary(out).items()}
    assert status == {
        "env": "OK",
        "build": "SKIPPED",
        "gpu_tests": "SKIPPED",
        "engine_autotuned": "OK",
        "switching": "TIMEOUT",
        "plot": "OK",
    }, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr

    env = json.loads((out / "environment.json").read_text())
    assert {"gpu", "driver", "torch", "triton", "cuda", "git_sha"} <= env.keys()
    assert not (out / "latency_resnet.json").exists()  # call 1's rows file is not this section's
    rows = json.loads((out / "latency_resnet_autotuned.json").read_text())
    assert rows and all(set(ROW_KEYS) <= r.keys() and r["mode"] == "smoke" for r in rows)
    assert {r["provider"] for r in rows} == {"engine_conditional", "engine_early_exit"}
    macs = {r["skip"]: r["macs"] for r in rows}
    assert set(macs) == {"FFF", "TTT"} and macs["FFF"] > macs["TTT"] > 0  # resnet20_adn: super and base
    assert (out / "logs" / "engine_autotuned.log").read_text().count("passed") == 1
    md = (out / "results.md").read_text()
    assert "**resnet20_adn**, batch 1" in md and "SMOKE" in md


def test_plan_fits_two_calls_and_runs_nothing(tmp_path):
    out = tmp_path / "never"
    proc = run_script(out, "--plan")
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()
    caps: dict[str, dict[str, int]] = {}
    totals = {}
    for line in proc.stdout.splitlines():
        if line.startswith("budget:"):
            continue
        call, rest = line.split(": ", 1)
        fields = rest.split()
        if fields[0] == "total":
            totals[call] = int(fields[1])
        else:
            assert fields[1] == "cap" and fields[3] == "s", line
            caps.setdefault(call, {})[fields[0]] = int(fields[2])
    assert list(totals) == ["call 1", "call 2"]
    for call, total in totals.items():
        assert total == sum(caps[call].values()) <= 540, call
    # ordered by value: what call 1 must measure, and what is left for call 2
    assert list(caps["call 1"]) == ["build", "env", "gpu_tests", "latency_resnet", "latency_vit", "plot"]
    assert {"compile_resnet", "compile_vit", "switching", "kernels_layers", "engine_autotuned", "train"} <= set(
        caps["call 2"]
    )
    one = run_script(out, "--plan", "--call", "2")
    assert one.returncode == 0 and one.stdout.splitlines()[1:] == [
        line for line in proc.stdout.splitlines() if line.startswith("call 2:")
    ]
    over = run_script(out, "--plan", ADN_GPU_CHECK_CAP_train="600")
    assert over.returncode == 1 and "call 2: over the budget of 540 s" in over.stderr


def test_pack_brings_everything_back_in_a_few_files(tmp_path):
    """Through the device tool only 8 files come back from its $OUT: with ADN_GPU_CHECK_PACK the whole output
    folder arrives as one archive beside the summary and the table."""
    out, pack = tmp_path / "work", tmp_path / "pack"
    proc = run_script(
        out, "--smoke", "--call", "1", ADN_GPU_CHECK_SECTIONS="env,latency_resnet,plot", ADN_GPU_CHECK_PACK=str(pack)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = ["gpu_check.tgz", "latency_vs_macs.png", "results.md", "summary.txt"]
    assert sorted(p.name for p in pack.iterdir()) == expected
    assert (pack / "summary.txt").read_text() == (out / "summary.txt").read_text()
    with tarfile.open(pack / "gpu_check.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
        rows = json.load(tar.extractfile("./latency_resnet.json"))
    assert {"environment.json", "latency_resnet.json", "results.md", "logs/latency_resnet.log"} <= names
    assert rows and all(r["autotune"] is False for r in rows)  # interpreter: one config per kernel
    # call 1's providers (torch.compile's are call 2's; cuda_graph is GPU-only)
    assert {r["provider"] for r in rows} == {"eager", "engine_conditional", "engine_early_exit"}


def test_budget_and_bad_argument(tmp_path):
    proc = run_script(tmp_path, "--smoke", "--call", "1", ADN_GPU_CHECK_BUDGET_S="0", ADN_GPU_CHECK_SECTIONS="env,plot")
    assert proc.returncode == 0
    assert {name: " ".join(f) for name, f in summary(tmp_path).items()} == {
        "env": "SKIPPED 0s budget of 0s spent",
        "plot": "SKIPPED 0s budget of 0s spent",
    }
    for args, env, message in [
        (("--fast",), {}, "unknown argument '--fast' (use --plan, --call 1|2, --smoke)"),
        (("--call", "3"), {}, "--call takes 1 or 2, got '3'"),
        (("--call",), {}, "--call takes 1 or 2, got ''"),
        (("--smoke",), {"ADN_GPU_CHECK_SECTIONS": "env,latency"}, "unknown section 'latency' (--plan lists them)"),
        (("--plan",), {"ADN_GPU_CHECK_CAP_train": "1m"}, "ADN_GPU_CHECK_CAP_train='1m' is not a whole number"),
    ]:
        proc = run_script(tmp_path / "bad", *args, **env)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "bad").exists()  # rejected before any work


def test_provider_and_batch_selection(monkeypatch):
    """What gpu_check.sh splits its calls with: ADN_BENCH_PROVIDERS / ADN_BENCH_BATCHES keep what they name."""
    spec = harness.ModelSpec("resnet20_adn", input_size=(32, 32), num_stages=3)
    monkeypatch.setenv("ADN_BENCH_PROVIDERS", "compile_freeze,eager")
    monkeypatch.setenv("ADN_BENCH_BATCHES", "64")
    cases = [p.values for p in harness.latency_cases(spec, (1, 64))]
    assert {(provider, batch) for provider, batch, _ in cases} == {("eager", 64), ("compile_freeze", 64)}
    monkeypatch.setenv("ADN_BENCH_PROVIDERS", "eager,compiled")
    with pytest.raises(ValueError, match="ADN_BENCH_PROVIDERS='eager,compiled': use a comma list of eager, cuda_graph"):
        harness.latency_cases(spec, (1,))
    monkeypatch.delenv("ADN_BENCH_PROVIDERS")
    monkeypatch.setenv("ADN_BENCH_BATCHES", "one")
    with pytest.raises(ValueError, match="ADN_BENCH_BATCHES='one': use a comma list of 1, 64"):
        harness.latency_cases(spec, (1, 64))
