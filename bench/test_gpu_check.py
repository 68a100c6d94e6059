"""bench/gpu_check.sh in its CPU dry-run mode: sections, caps, the budget, rows and the table under $OUT."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from bench._harness import ROW_KEYS

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"


def run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ADN_", "OUT"))}
    full_env.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=False, env=full_env, capture_output=True, text=True, timeout=240
    )


def summary(out: Path) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in (out / "summary.txt").read_text().splitlines()}


def test_dry_run_keeps_going_and_writes_rows(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        out,
        "--smoke",
        ADN_GPU_CHECK_SECTIONS="env,build,gpu_tests,latency_resnet,switching,plot",
        ADN_GPU_CHECK_CAP_switching="1",
    )
    status = {name: fields[0] for name, fields in summary(out).items()}
    assert status == {
        "env": "OK",
        "build": "SKIPPED",
        "gpu_tests": "SKIPPED",
        "latency_resnet": "OK",
        "switching": "TIMEOUT",
        "plot": "OK",
    }, proc.stdout + proc.stderr
    assert proc.returncode == 1  # a section timed out; the ones after it still ran

    env = json.loads((out / "environment.json").read_text())
    assert {"gpu", "driver", "torch", "triton", "cuda", "git_sha"} <= env.keys()
    rows = json.loads((out / "latency_resnet.json").read_text())
    assert rows and all(set(ROW_KEYS) <= r.keys() and r["mode"] == "smoke" for r in rows)
    eager = {r["skip"]: r for r in rows if r["provider"] == "eager"}
    assert set(eager) == {"FFF", "TTT"}  # resnet20_adn: super and base
    assert eager["FFF"]["macs"] > eager["TTT"]["macs"] > 0
    assert (out / "logs" / "latency_resnet.log").read_text().count("passed") == 1
    md = (out / "results.md").read_text()
    assert "**resnet20_adn**, batch 1" in md and "SMOKE" in md


def test_pack_brings_everything_back_in_a_few_files(tmp_path):
    """Through the device tool only 8 files come back from its $OUT: with ADN_GPU_CHECK_PACK the whole output
    folder arrives as one archive beside the summary and the table."""
    out, pack = tmp_path / "work", tmp_path / "pack"
    proc = run_script(out, "--smoke", ADN_GPU_CHECK_SECTIONS="env,latency_resnet,plot", ADN_GPU_CHECK_PACK=str(pack))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = ["gpu_check.tgz", "latency_vs_macs.png", "results.md", "summary.txt"]
    assert sorted(p.name for p in pack.iterdir()) == expected
    assert (pack / "summary.txt").read_text() == (out / "summary.txt").read_text()
    with tarfile.open(pack / "gpu_check.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
        rows = json.load(tar.extractfile("./latency_resnet.json"))
    assert {"environment.json", "latency_resnet.json", "results.md", "logs/latency_resnet.log"} <= names
    assert rows and all(r["autotune"] is False for r in rows)  # interpreter: one config per kernel


def test_budget_and_bad_argument(tmp_path):
    proc = run_script(tmp_path, "--smoke", ADN_GPU_CHECK_BUDGET_S="0", ADN_GPU_CHECK_SECTIONS="env,plot")
    assert proc.returncode == 0
    assert {name: " ".join(f) for name, f in summary(tmp_path).items()} == {
        "env": "SKIPPED 0s budget of 0s spent",
        "plot": "SKIPPED 0s budget of 0s spent",
    }
    proc = run_script(tmp_path, "--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
