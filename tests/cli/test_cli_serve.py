"""``serve``'s start-up errors: one line each, before anything is served (a bad checkpoint, a port in use, an SLO no
sub-network can meet, no accuracies, data of another kind, --int8 without kept images); ``--int8 --ray-replicas``'s
accuracies measured here through the INT8 engine; and the phase lines of a real start and stop."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.cli import main
from adaptive_kernels.training import build_data, load_checkpoint, save_checkpoint
from adaptive_kernels.training.checkpoint import INT8_SAMPLE

pytest.importorskip("fastapi", reason="needs fastapi (the [serve] extra)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    model = create_model(spec["name"], **spec["kwargs"])
    path = save_checkpoint({"model": model.state_dict(), "model_spec": spec,
                            "data": {"name": "synthetic", "image_size": [8, 8]}}, folder / "last.pt")
    accuracy = folder / "eval.json"
    accuracy.write_text(json.dumps([{"skip": "FFF", "accuracy": 90.0}, {"skip": "TTT", "accuracy": 89.0}]))
    return path, accuracy


def serve_error(argv, capsys) -> str:
    assert main(["serve", "--port", "0", *argv]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[")]  # phases
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_serve_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "cannot be read" in serve_error(["--checkpoint", str(bad), "--slo-ms", "10"], capsys)


def test_serve_port_in_use(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = serve_error(["--checkpoint", str(checkpoint[0]), "--slo-ms", "10", "--port", str(port)], capsys)
    assert f"port {port} on 127.0.0.1 is in use" in line


def test_serve_refuses_a_queue_bound_below_one_batch_before_profiling(tmp_path, capsys, monkeypatch):
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    path = save_checkpoint({"model": create_model(spec["name"], **spec["kwargs"]).state_dict(), "model_spec": spec,
                            "data": {"name": "synthetic", "image_size": [64, 64]}}, tmp_path / "last.pt")
    accuracy = tmp_path / "eval.json"
    accuracy.write_text(json.dumps({"FFF": 90.0, "TTT": 89.0}))
    from adaptive_kernels.cli import serve

    monkeypatch.setattr(serve, "build_plan", lambda *a, **k: pytest.fail("profiled despite the bad bound"))
    for ray in ([], ["--ray-replicas", "2"]):  # one process, and before Ray or accuracies
        line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--max-batch",
                            "1024", "--max-queue-mb", "1", *ray], capsys)
        assert ("--max-queue-mb 1: the queue must hold at least one full batch (1024 x 1x64x64 float32 = 16777216 "
                "bytes); raise it") in line
    with pytest.raises(SystemExit):
        main(["serve", "--checkpoint", str(path), "--slo-ms", "10", "--max-queue-mb", "0"])
    assert "argument --max-queue-mb: must be an integer in [1, 1048576], got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_serve_refuses_a_device_no_server_runs_on_before_loading(checkpoint, capsys, monkeypatch, device):
    """torch names these devices, but no engine serves on them: refused as build_plan and deploy refuse them
    (``serving_device``), not by an error from inside the compile."""
    from adaptive_kernels.cli import serve

    monkeypatch.setattr(serve, "build_plan", lambda *a, **k: pytest.fail("went on to compile"))
    path, accuracy = checkpoint
    for ray in ([], ["--ray-replicas", "2"]):
        line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--device",
                            device, *ray], capsys)
        assert f"device '{device}': a server runs on cpu or cuda / cuda:N" in line


def test_serve_needs_accuracies(tmp_path, capsys):
    # without --accuracy the sub-networks are measured on --data, by default the checkpoint's dataset: a checkpoint
    # that does not record it is refused before anything is compiled
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    model = create_model(spec["name"], **spec["kwargs"])
    path = save_checkpoint({"model": model.state_dict(), "model_spec": spec, "data": {"image_size": [8, 8]}},
                           tmp_path / "last.pt")
    line = serve_error(["--checkpoint", str(path), "--slo-ms", "10"], capsys)
    assert "does not record its dataset: give --data" in line


@pytest.mark.parametrize("table, message", [
    ('{"FFF": 90.0, "TTT": NaN}', "the accuracy of TTT is nan: give a finite number"),
    ('{"FFF": 90.0, "TT": 89.0}', "skip='TT' has 2 letters but this model has 3 skippable stages"),
    ('[{"skip": "FFF", "accuracy": "high"}]', "the accuracy of FFF is 'high': give a finite number"),
])
def test_serve_refuses_a_bad_accuracy_table_in_one_line(checkpoint, tmp_path, capsys, table, message):
    accuracy = tmp_path / "eval.json"
    accuracy.write_text(table)
    line = serve_error(["--checkpoint", str(checkpoint[0]), "--accuracy", str(accuracy), "--slo-ms", "10"], capsys)
    assert f"--accuracy {accuracy}: {message}" in line


def test_serve_slo_below_the_fastest_sub_network(checkpoint, capsys):
    path, accuracy = checkpoint
    line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "0.0001",
                        "--max-batch", "1", "--profile-iters", "2"], capsys)
    assert "--slo-ms 0.0001 is below the fastest sub-network's batch-1 latency" in line


def test_serve_on_ray_checks_its_flags_and_the_port_before_starting_ray(checkpoint, capsys):
    path, accuracy = checkpoint
    line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--ray-address",
                        "auto"], capsys)
    assert "--ray-address needs --ray-replicas" in line
    pytest.importorskip("ray.serve", reason="needs ray[serve] (the [serve] extra)")
    import ray

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--port",
                            str(port), "--ray-replicas", "2"], capsys)
    assert f"port {port} on 127.0.0.1 is in use" in line
    line = serve_error(["--checkpoint", str(path), "--slo-ms", "10", "--data", "synthetic", "--ray-replicas", "2",
                        "--ray-address", f"127.0.0.1:{port}"], capsys)  # closed now: before measuring accuracies
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in line
    assert not ray.is_initialized()


def test_serve_int8_on_ray_refuses_a_checkpoint_without_kept_images_before_any_work(checkpoint, capsys):
    pytest.importorskip("ray.serve", reason="needs ray[serve] (the [serve] extra)")
    import ray

    path, _ = checkpoint
    with socket.socket() as taken:  # checked before the port, the data and Ray
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        line = serve_error(["--checkpoint", str(path), "--slo-ms", "10", "--int8", "--ray-replicas", "2", "--port",
                            str(taken.getsockname()[1])], capsys)
    assert line == (f"error: --int8: checkpoint {path} keeps no images to measure INT8 ranges on: calibrate it with "
                    f"`python -m adaptive_kernels calibrate --checkpoint {path} --int8-images 300 --out "
                    f"CALIBRATED.pt` and serve that")
    assert not ray.is_initialized()


def test_serve_int8_on_ray_measures_the_accuracies_once_here_through_the_int8_engine(checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    """Without --accuracy the driver builds the INT8 engine from the kept images (faked here: one that answers class
    0), measures every sub-network through it and hands those accuracies and ``int8=True`` to ``deploy`` (faked:
    it stops the command)."""
    pytest.importorskip("ray.serve", reason="needs ray[serve] (the [serve] extra)")
    import adaptive_kernels.cli.serve as serve_cli
    import adaptive_kernels.serving.ray as serving_ray

    kept = torch.randn(4, 1, 8, 8).half()
    calibrated = save_checkpoint({**load_checkpoint(checkpoint[0]), INT8_SAMPLE: kept}, tmp_path / "calibrated.pt")
    built, scored, deployed = [], set(), {}

    class ClassZero(torch.nn.Module):
        def forward(self, x, skip=None):
            scored.add(skip)
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    def compile_engine(model, example, *, int8_calibration=None):
        built.append(int8_calibration)
        return ClassZero()

    def deploy(checkpoint, slo_ms, accuracy, **kwargs):
        deployed.update(kwargs, accuracy=accuracy)
        raise ValueError("deployed (test)")

    monkeypatch.setattr(serve_cli, "compile_engine", compile_engine)
    monkeypatch.setattr(serving_ray, "deploy", deploy)
    assert main(["serve", "--checkpoint", str(calibrated), "--slo-ms", "50", "--int8", "--ray-replicas", "2",
                 "--port", "0", "--test-subset", "40"]) == 2
    err = capsys.readouterr().err
    assert "error: deployed (test)" in err
    assert "[serve] compiling the INT8 engine here to measure the accuracies through it (4 kept images)" in err
    assert "each compiles its INT8 engine on OpenVINO from the checkpoint's kept images" in err
    assert len(built) == 1 and torch.equal(built[0], kept.float())
    assert len(scored) == 8 and deployed["int8"] is True  # every sub-network scored through that engine
    data = build_data("synthetic", image_size=8, test_subset=40)
    labels = torch.cat([y for _, y in data.test_batches(batch_size=500)])
    class0 = 100.0 * (labels == 0).sum().item() / len(labels)
    assert deployed["accuracy"] == {skip: pytest.approx(class0) for skip in scored}


def test_serve_refuses_data_the_model_was_not_trained_on(checkpoint, capsys):
    line = serve_error(["--checkpoint", str(checkpoint[0]), "--slo-ms", "10", "--image-size", "12"], capsys)
    assert "was trained on data image_size [8, 8] but --image-size gives [12, 12]: measure its accuracy" in line


def test_serve_refuses_data_flags_that_accuracy_makes_unused(checkpoint, capsys):
    path, accuracy = checkpoint
    line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--data-dir",
                        "/nonexistent", "--image-size", "32"], capsys)
    assert ("--data-dir, --image-size choose the data that measures the accuracies, which --accuracy gives: drop "
            "them, or drop --accuracy to measure now") in line


def test_serve_refuses_an_empty_host(checkpoint, capsys):
    path, accuracy = checkpoint
    line = serve_error(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--host", " "],
                       capsys)
    assert "--host is empty (that would listen on every interface): give an address" in line


def start_serve(*argv: str) -> tuple[subprocess.Popen, queue.Queue]:
    """``python -m adaptive_kernels serve ARGV`` and a queue of its stderr lines (read on a thread)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "adaptive_kernels", "serve", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip()) for line in proc.stderr], daemon=True).start()
    return proc, lines


def serve_session(argv: list[str], drive) -> tuple[subprocess.Popen, list[str]]:
    """``serve ARGV`` driven by ``drive(proc, next_line)`` (``next_line()``: its next stderr line, kept), killed if
    ``drive`` fails; returns the process and every stderr line it printed."""
    proc, lines = start_serve(*argv)
    seen: list[str] = []

    def next_line(timeout: float = 240) -> str:
        seen.append(lines.get(timeout=timeout))
        return seen[-1]

    try:
        drive(proc, next_line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)  # the reader thread's last lines
    while not lines.empty():
        seen.append(lines.get())
    return proc, seen


def until_ready(next_line) -> str:
    """The ``[serve] ready on`` line, within 240 s."""
    deadline = time.monotonic() + 240
    while not (line := next_line(max(0.1, deadline - time.monotonic()))).startswith("[serve] ready on"):
        pass
    return line


def test_serve_stops_on_sigterm_during_its_start_up_as_on_ctrl_c(checkpoint):
    """SIGTERM (``timeout``, CI) while it loads, exports or profiles: the same one line and status as Ctrl-C, not a
    silent death by the signal; bounded."""
    path, accuracy = checkpoint

    def drive(proc, next_line):
        assert next_line(120).startswith("[serve] loading")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130

    _, seen = serve_session(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "50", "--port", "0",
                             "--max-batch", "1", "--profile-iters", "2", "--threads", "1"], drive)
    assert seen[-1] == "error: interrupted" and not any("ready on" in line for line in seen), seen


def test_serve_stopped_by_two_quick_ctrl_c_exits_without_tracebacks(checkpoint):
    """The second Ctrl-C forces the exit (uvicorn): it once left an idle lifespan task to be cancelled, which logged
    a 30-line CancelledError traceback; bounded."""
    path, accuracy = checkpoint

    def drive(proc, next_line):
        port = re.match(r"\[serve\] ready on 127\.0\.0\.1:(\d+): ", until_ready(next_line)).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30) as answer:
            assert answer.status == 200  # serving: its signal handlers are in place
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0

    _, seen = serve_session(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "50", "--port", "0",
                             "--max-batch", "1", "--profile-iters", "2", "--threads", "1"], drive)
    log = "\n".join(seen)
    assert seen[-1].startswith("[serve] stopped: 0 requests") and "Traceback" not in log, log


def test_serve_shows_its_phases_on_stderr_then_serves_and_stops(checkpoint):
    """A real ``python -m adaptive_kernels serve`` on 127.0.0.1: one line per phase on stderr while it starts
    (stdout keeps the plan; a connection meanwhile is refused at once, not held until it is ready), answers once
    ready, stops on Ctrl-C (SIGINT) with its last line; bounded."""
    path, accuracy = checkpoint
    with socket.socket() as probe:  # a free port, known before the ready line
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def drive(proc, next_line):
        next_line(120)
        with pytest.raises(ConnectionRefusedError):  # bound (the port is taken) but not listening yet
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert re.match(rf"\[serve\] ready on 127\.0\.0\.1:{port}: ", until_ready(next_line))
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": [0.0] * 64}], "parameters": {"slo_ms": 10000}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/resnet20_adn/infer", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.loads(answer.read())["parameters"]["slo_met"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            assert answer.status == 200
            # one request met: the default budget would have raised the share to 0.5 e^0.005; --miss-budget 0 not
            assert "\nadn_reserve_share 0.5\n" in answer.read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0

    proc, seen = serve_session(["--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "50", "--host",
                                "127.0.0.1", "--port", str(port), "--max-batch", "1", "--profile-iters", "2",
                                "--threads", "1", "--miss-budget", "0"], drive)
    phases = [line.split("]")[0] + "]" for line in seen]
    assert seen[0] == f"[serve] loading {path} ..."
    assert phases.index("[compile]") < phases.index("[profile]") < len(seen) - 2 and "[export]" in phases
    assert seen[-1] == "[serve] stopped: 1 requests, 1 served (1 within SLO), 0 refused, 0 failed", seen
    assert "resnet20_adn: 2 sub-networks" in proc.stdout.read()  # the plan, on stdout


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "abc"])
def test_serve_refuses_a_miss_budget_outside_0_to_1_in_one_line(checkpoint, capsys, value):
    path, accuracy = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", str(path), "--accuracy", str(accuracy), "--slo-ms", "10", "--miss-budget",
              value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--miss-budget: must be a {'' if value == 'abc' else 'finite '}number in [0, 1), got " \
        f"'{value}'" in err[0], err
