"""``bench/serving_load.py`` end to end, as a short smoke: it starts ``serve`` on 127.0.0.1, replays a small bursty
trace against the four ways of serving, stops the server and writes its results; every request sent is answered or
refused, on the client's count and on the server's."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adaptive_kernels import create_model
from adaptive_kernels.training import save_checkpoint

pytest.importorskip("aiohttp", reason="the load test's client needs aiohttp")
pytest.importorskip("matplotlib", reason="the load test plots its timeline with matplotlib")
pytest.importorskip("fastapi", reason="needs fastapi (the [serve] extra)")

from bench.serving_load import POLICIES, main

pytestmark = pytest.mark.slow


SCRIPT = Path(__file__).parents[2] / "bench/serving_load.py"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    checkpoint = save_checkpoint({"model": create_model(spec["name"], **spec["kwargs"]).state_dict(),
                                  "model_spec": spec, "data": {"name": "synthetic", "image_size": [8, 8]}},
                                 folder / "last.pt")
    accuracy = folder / "subnets.json"
    accuracy.write_text(json.dumps({"FFF": 90.0, "TFT": 89.5, "TTT": 89.0}))
    return ["--checkpoint", str(checkpoint), "--accuracy", str(accuracy), "--max-batch", "4", "--profile-iters", "3"]


def test_load_script_smoke(tmp_path, served):
    out = tmp_path / "results"
    code = main([*served, "--slo-ms", "50", "--rates", "30,60", "--seconds", "1", "--max-requests", "200",
                 "--scenario", "smoke", "--out", str(out)])
    assert code == 0  # nothing lost
    assert sorted(p.name for p in out.iterdir()) == ["smoke.json", "smoke.md", "smoke_timeline.png"]  # no temp files
    result = json.loads((out / "smoke.json").read_text())
    rows = result["rows"]
    assert [(r["rate"], r["policy"]) for r in rows] == [(rate, p) for rate in (30.0, 60.0) for p in POLICIES]
    for row in rows:
        assert row["sent"] > 0 and row["sent"] == row["served"] + row["refused"], row
        assert row["lost"] == row["other_errors"] == 0 and row["no_loss"]
        forced = row["forced"]
        assert forced is None or set(row["served_by_skip"]) <= {forced}  # a forced sub-network served them all
    assert "| 60 | adaptive |" in (out / "smoke.md").read_text()
    # the server stopped (SIGINT, graceful) and counted the same requests as the client
    stopped = re.search(r"stopped: (\d+) requests, (\d+) served \(\d+ within SLO\), (\d+) refused, (\d+) failed",
                        "\n".join(result["server_log_tail"]))
    assert stopped, result["server_log_tail"]
    submitted, served, refused, failed = map(int, stopped.groups())
    assert (submitted, served, refused, failed) == (sum(r["sent"] for r in rows), sum(r["served"] for r in rows),
                                                    sum(r["refused"] for r in rows), 0)


# The script run as a user runs it (its own process, its server a child of it): Ctrl-C, SIGTERM and a server that
# dies stop the sweep at once with one line, the server is always stopped, and a run that writes nothing leaves no
# --out folder behind.

def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class Run:
    """``bench/serving_load.py`` as a process of its own (its own process group, as a shell job is), its output read
    as it comes; ``until(text)`` waits for a line holding ``text``; ``server``: its server's pid."""

    def __init__(self, argv: list[str], ignore_sigint: bool = False) -> None:
        cmd = [sys.executable, str(SCRIPT), *argv]
        if ignore_sigint:  # as a non-interactive shell starts `cmd &`: SIGINT ignored, which exec keeps
            cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.server: int | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def until(self, text: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=1.0)
                if line is None:
                    pytest.fail(f"the script ended before {text!r}: {self.proc.wait()} {self.proc.stderr.read()}")
                if text in line:
                    self.server = self.server or next(iter(children(self.proc.pid)), None)
                    return
        pytest.fail(f"no {text!r} within {timeout_s:.0f} s: {''.join(self.out[-5:])}")

    def end(self, timeout_s: float) -> tuple[int, str, float]:
        """Its exit status, its stderr and the seconds it took to end (at most ``timeout_s``: then it fails)."""
        t0 = time.monotonic()
        try:
            _, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the script did not end within {timeout_s:.0f} s")
        return self.proc.returncode, err, time.monotonic() - t0

    def close(self) -> None:
        """Kill what a failed test left running."""
        for pid in (self.proc.pid, self.server):
            if pid is not None and running(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=30)


@pytest.fixture
def run():
    runs: list[Run] = []
    yield lambda *args, **kwargs: runs.append(Run(*args, **kwargs)) or runs[-1]
    for r in runs:
        r.close()


def assert_stopped(server: int | None) -> None:
    assert server is not None, "the script started no server"
    deadline = time.monotonic() + 10
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(server), f"the server (pid {server}) still runs"


SWEEP = ["--slo-ms", "50", "--rates", "30", "--seconds", "30", "--policies", "super,base"]  # a minute of traffic


@pytest.mark.parametrize("how", ["SIGINT to its pid, SIGINT ignored as in `cmd &`", "SIGINT to its process group",
                                 "SIGTERM to its pid"])
def test_load_script_stops_the_sweep_and_its_server_on_a_signal(how, served, run, tmp_path):
    out = tmp_path / "results"
    r = run([*served, *SWEEP, "--out", str(out)], ignore_sigint="ignored" in how)
    r.until("] ready on 127.0.0.1")
    time.sleep(2)  # requests being served
    sig = signal.SIGTERM if "SIGTERM" in how else signal.SIGINT
    if "group" in how:
        os.killpg(r.proc.pid, sig)  # Ctrl-C in a terminal
    else:
        os.kill(r.proc.pid, sig)
    code, err, took = r.end(timeout_s=40)
    assert code == 128 + sig, (code, err)
    assert err == f"serving_load.py: interrupted by {sig.name}: stopped the sweep and the server; nothing written\n"
    assert took < 30
    assert_stopped(r.server)
    assert not out.exists()  # made for the results, none written: removed again


def test_load_script_stops_when_its_server_dies(served, run, tmp_path):
    out = tmp_path / "results"
    r = run([*served, *SWEEP, "--out", str(out)])
    r.until("] ready on 127.0.0.1")
    time.sleep(2)
    assert r.server is not None
    os.kill(r.server, signal.SIGKILL)
    code, err, took = r.end(timeout_s=40)  # not a minute of requests to nothing, then a traceback
    assert code == 1 and took < 15, (code, took, err)
    assert err.count("\n") == 1 and err.startswith("serving_load.py: error: the server stopped (killed by SIGKILL) "
                                                   "during the sweep; its log ends: "), err
    assert "ready on 127.0.0.1" in err  # the end of its log
    assert not out.exists()


def test_load_script_stops_a_server_still_starting_on_sigterm(served, run, tmp_path):
    out = tmp_path / "results"
    r = run([*served, *SWEEP, "--out", str(out)])
    r.until("[serve] loading")
    os.kill(r.proc.pid, signal.SIGTERM)
    code, err, _ = r.end(timeout_s=40)
    assert code == 128 + signal.SIGTERM and err.count("\n") == 1 and "interrupted by SIGTERM" in err, (code, err)
    assert_stopped(r.server)
    assert not out.exists()


def test_load_script_names_the_servers_own_error_when_it_does_not_start(served, run, tmp_path):
    # serve refuses an SLO below its fastest sub-network after compiling and profiling: its error line, not a
    # traceback holding its whole log; no --out folder left behind (nor its parent, made for it)
    out = tmp_path / "new" / "results"
    r = run([*served, "--slo-ms", "0.001", "--rates", "30", "--seconds", "1", "--out", str(out)])
    code, err, _ = r.end(timeout_s=120)
    assert code == 1, (code, err)
    assert err.count("\n") == 1, err
    assert err.startswith("serving_load.py: error: the server did not start: error: --slo-ms 0.001 is below "), err
    assert "raise --slo-ms" in err
    assert "ready on 127.0.0.1" not in "".join(r.out)
    assert not (tmp_path / "new").exists()
