"""Open-loop load test of the SLO-aware server (``python -m adaptive_kernels serve``) over HTTP on 127.0.0.1.

One server process per scenario; the same bursty trace per mean rate (Gamma inter-arrivals with CV² >= 4, the rate
varying as a sine over the run) replayed against four ways of serving, all through the same scheduler:

- ``super``: every request forces the super-net (fixed-model serving with dynamic batching),
- ``base``: every request forces the base-net,
- ``static``: every request forces ``select_skip(profile at the largest batch, accuracy, SLO / 2)`` (a batch may have
  to wait for the one before it: half the SLO each), the base-net when nothing fits,
- ``adaptive``: nothing forced; the policy picks batch and sub-network per dispatch.

Arrivals do not wait for answers (open loop); every request ends as served (HTTP 200), refused (503) or lost (no
answer within the client's timeout), and the run checks sent = answered + refused. Writes ``<scenario>.json`` (rows,
machine, versions), ``<scenario>.md`` (the table) and ``<scenario>_timeline.png`` into ``--out``, each atomically.
Ctrl-C or SIGTERM stops the sweep and the server and writes nothing (exit status 130 / 143); a server that does not
start, or stops during the sweep, ends the run with one line naming why.

    python bench/serving_load.py --checkpoint demo_out/calibrated.pt --accuracy demo_out/subnets.json \\
        --slo-ms 5 --rates 200,500,1000,2000 --seconds 20 --out bench/results/serving --scenario demo
    python bench/serving_load.py --paper-resnet50 --slo-ms 1500 --rates 1,2,4,6 --seconds 30 ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adaptive_kernels._files import atomic_path, write_text
from adaptive_kernels.cli.checks import (
    ArgumentParser,
    float_range,
    int_range,
    output_dir,
    path_text,
    positive_float,
    positive_int,
    seed_int,
    thread_count,
)

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("super", "base", "static", "adaptive")
#: ImageNet top-1 of ResNet-50-ADN as the paper reports it (the authors' README), for the sub-networks it names
PAPER_RESNET50 = {"FFFF": 77.6, "TFFF": 77.1, "TTFF": 76.5, "TTTT": 76.1}
HEADER_LENGTH = "Inference-Header-Content-Length"
#: argparse type of --depth: the rate, mean x (1 + depth x sine), must stay positive (``bursty_trace``)
depth_fraction = float_range(0.0, 1.0, high_open=True)


def bursty_trace(seconds: float, mean_rate: float, cv2: float, seed: int, period_s: float | None = None,
                 depth: float = 0.5, limit: int | None = None) -> np.ndarray:
    """Arrival times (s) over ``seconds``: a Gamma renewal process (shape 1/cv2: squared coefficient of variation
    ``cv2`` of the inter-arrivals) run on a clock whose rate is ``mean_rate * (1 + depth * sin(2 pi t / period))``
    (time rescaling: the process's own inter-arrivals stay Gamma, the rate varies). ``limit``: at most that many,
    the first ones (the same as without it: the gaps are drawn in order), and only that many drawn."""
    rng = np.random.default_rng(seed)
    period_s = period_s or seconds / 2
    shape = 1.0 / cv2
    expected = mean_rate * seconds
    drawn = int(expected * 1.5 + 100) if limit is None else min(int(expected * 1.5 + 100), limit)
    gaps = rng.gamma(shape, 1.0 / shape, size=drawn)  # unit mean
    operational = np.cumsum(gaps)
    grid = np.linspace(0.0, seconds, 20001)
    cumulative = mean_rate * (grid + depth * period_s / (2 * np.pi) * (1 - np.cos(2 * np.pi * grid / period_s)))
    operational = operational[operational < cumulative[-1]]
    return np.interp(operational, cumulative, grid)


class ServerError(RuntimeError):
    """The server did not start, or stopped before the sweep was done: a one-line message that names why."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (``timeout``, CI) stopped the run: the server is stopped, nothing is written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Signals:
    """While ``with signals:`` runs (in the main thread): SIGINT and SIGTERM stop the run with ``Interrupted``.

    Set whatever this process inherited: a shell starts ``cmd &`` with SIGINT ignored (so ``kill -INT`` did nothing
    while the sweep ran), and SIGTERM's default ends the process without its clean-up (the server left running). A
    replay (``run_replay``) is cancelled rather than interrupted inside the event loop: its requests end and the
    loop closes. A further signal while stopping is ignored, so that stopping the server runs to its end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.task: asyncio.Task | None = None  # the replay now running, the one to cancel
        self._previous: dict[int, object] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        if self.task is not None and not self.task.done():
            self.task.cancel()  # run_replay turns the cancellation into Interrupted
            return
        raise Interrupted(signum)

    def check(self) -> None:
        """Interrupted if a signal came (one that arrived while a replay was ending)."""
        if self.signum is not None:
            raise Interrupted(self.signum)


#: ``python -c LAUNCH PARENT_PID COMMAND...`` (Linux) runs COMMAND as a process that gets SIGTERM when PARENT_PID ends,
#: however it ends (even SIGKILL, after which no clean-up of this script runs): prctl(PR_SET_PDEATHSIG) survives exec
_LAUNCH = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


class Server:
    """``python -m adaptive_kernels serve`` as a subprocess on 127.0.0.1, a free port; ``stop()`` ends it with
    SIGINT (graceful: queued requests answered) and returns its output.

    The server runs in its own session (a Ctrl-C to the terminal's process group reaches this script alone, which
    then stops it) and, on Linux, ends with this process. Its output is read by a thread all along (a full pipe
    would block it), so that a failure can name its last lines. A server that does not start is a ``ServerError``
    naming its own error line (its output is printed above it), and is stopped."""

    def __init__(self, argv: list[str], threads: int, start_timeout_s: float = 900.0) -> None:
        cmd = [sys.executable, "-m", "adaptive_kernels", "serve", "--host", "127.0.0.1", "--port", "0",
               "--threads", str(threads), *argv]
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *cmd]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.lines: list[str] = []
        self.ready = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()
        print(f"[load] the server is pid {self.proc.pid}", flush=True)
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"the server did not start within {timeout_s:.0f} s; its log ends: {self.tail()}")
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:  # its output ended: it exited
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=30)
                raise ServerError(f"the server did not start: {self.reason()} ({self.status()}; its output is above)")
            print(f"  | {line.rstrip()}", flush=True)
            found = re.search(r"ready on 127\.0\.0\.1:(\d+): (\S+) at ", line)
            if found:
                self.port, self.name = int(found.group(1)), found.group(2)
                self.ready = True
                return

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "still running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"

    def tail(self, lines: int = 3) -> str:
        """Its last ``lines`` non-empty lines of output, on one line."""
        if not self.alive():
            self._reader.join(timeout=5)  # the rest of its output
        text = [line.strip() for line in self.lines if line.strip()]
        return " | ".join(text[-lines:]) if text else "(nothing)"

    def reason(self) -> str:
        """Its own error line (``error: ...``; the last line when it has none, e.g. a traceback's)."""
        text = [line.strip() for line in self.lines if line.strip()]
        errors = [line for line in text if line.startswith("error:")]
        return errors[-1] if errors else text[-1] if text else "it printed nothing"

    def check(self, doing: str) -> None:
        """A ``ServerError`` naming ``doing`` and the end of its log if the server has stopped."""
        if not self.alive():
            raise ServerError(f"the server stopped ({self.status()}) {doing}; its log ends: {self.tail()}")

    def get(self, path: str) -> bytes:
        """The server's answer to GET ``path``; a ``ServerError`` if it has stopped or does not answer."""
        self.check(f"before GET {path}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30).read()
        except OSError as e:  # URLError, a timeout
            self.check(f"during GET {path}")
            raise ServerError(f"the server did not answer GET {path} ({e}); its log ends: {self.tail()}") from None

    def stop(self, timeout_s: float = 60.0) -> str:
        """End it if it still runs: SIGINT once it serves (graceful: queued requests answered), SIGTERM while it
        starts up (it may ignore SIGINT until then); SIGKILL after ``timeout_s``. Returns its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.ready else signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            except BaseException:
                self.proc.kill()
                self.proc.wait()
                raise
            self.proc.wait()
        self._reader.join(timeout=10)
        return "".join(self.lines)


def request_body(image: np.ndarray, slo_ms: float, skip: str | None) -> tuple[bytes, dict[str, str]]:
    """A v2 infer request with the image as binary tensor data (as tritonclient.http sends it)."""
    raw = image.astype("<f4").tobytes()
    parameters = {"slo_ms": slo_ms, **({"skip": skip} if skip else {})}
    header = json.dumps({"inputs": [{"name": "input", "shape": list(image.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
                         "parameters": parameters}).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


async def replay(url: str, arrivals: np.ndarray, body: bytes, headers: dict[str, str], timeout_s: float,
                 alive: Callable[[], bool] | None = None) -> list[dict]:
    """Send one request per arrival time, whatever the answers (open loop); one record per request. ``alive``: asked
    every 0.1 s; False ends the replay at once (the server stopped: nothing left to send to), its requests cancelled
    (their records stay empty)."""
    import aiohttp

    records: list[dict] = [{} for _ in arrivals]
    loop = asyncio.get_running_loop()

    async def one(session: aiohttp.ClientSession, i: int, start: float) -> None:
        sent = loop.time()
        record = records[i]
        record.update(t=sent - start, lag=sent - start - arrivals[i])
        try:
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
                record["latency"] = loop.time() - sent
                if response.status == 200:
                    size = int(response.headers.get(HEADER_LENGTH, len(payload)))
                    answer = json.loads(payload[:size])["parameters"]
                    record.update(status="served", skip=answer["skip"], batch=answer["batch"],
                                  met=answer["slo_met"])
                else:
                    record.update(status="refused" if response.status == 503 else f"http {response.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            record.update(status="lost", error=type(e).__name__)

    async def send(session: aiohttp.ClientSession) -> None:
        start = loop.time() + 0.1
        for i, at in enumerate(arrivals):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i, start)))
        await asyncio.gather(*tasks)

    async def watch() -> None:
        while alive():
            await asyncio.sleep(0.1)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    tasks: list[asyncio.Task] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024), timeout=timeout) as session:
        sender = asyncio.create_task(send(session))
        watcher = asyncio.create_task(watch()) if alive is not None else None
        running = [task for task in (sender, watcher) if task is not None]
        try:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()  # its error, if any
        finally:  # the server stopped, or this replay was cancelled (Ctrl-C): end every request now
            for task in (*running, *tasks):
                task.cancel()
            await asyncio.gather(*running, *tasks, return_exceptions=True)
    return records


def run_replay(signals: Signals, server: Server, arrivals: np.ndarray, body: bytes, headers: dict[str, str],
               timeout_s: float) -> list[dict]:
    """``replay`` against ``server`` in an event loop of its own; ``Interrupted`` on SIGINT/SIGTERM (``signals``),
    a ``ServerError`` if the server stopped meanwhile."""
    async def cancellable() -> list[dict]:
        signals.task = asyncio.current_task()
        try:
            return await replay(f"http://127.0.0.1:{server.port}/v2/models/{server.name}/infer", arrivals, body,
                                headers, timeout_s, alive=server.alive)
        finally:
            signals.task = None

    try:
        records = asyncio.run(cancellable())
    except asyncio.CancelledError:
        signals.check()
        raise
    signals.check()
    server.check("during the sweep")
    return records


def summarize(records: list[dict], accuracy: dict[str, float], slo_ms: float, seconds: float) -> dict:
    """One row: counts, SLO attainment (server's deadline and client-measured), accuracy, latency, throughput."""
    served = [r for r in records if r.get("status") == "served"]
    latencies = np.array([r["latency"] for r in served]) * 1e3
    counts = {s: sum(r.get("status") == s for r in records) for s in ("served", "refused", "lost")}
    sent = len(records)
    by_skip: dict[str, int] = {}
    for r in served:
        by_skip[r["skip"]] = by_skip.get(r["skip"], 0) + 1
    return {
        "sent": sent, **counts, "other_errors": sent - sum(counts.values()),
        "no_loss": counts["lost"] == 0 and sum(counts.values()) == sent,
        "slo_attainment": sum(r["met"] for r in served) / sent if sent else 1.0,
        "slo_attainment_client": sum(r["latency"] * 1e3 <= slo_ms for r in served) / sent if sent else 1.0,
        "mean_accuracy": float(np.mean([accuracy[r["skip"]] for r in served])) if served else None,
        # None, not NaN, when nothing was served (a tiny rate x seconds): JSON has no NaN
        "p50_ms": float(np.percentile(latencies, 50)) if served else None,
        "p99_ms": float(np.percentile(latencies, 99)) if served else None,
        "throughput_per_s": len(served) / seconds,
        "mean_batch": float(np.mean([r["batch"] for r in served])) if served else None,
        "max_send_lag_ms": max((r.get("lag", 0.0) for r in records), default=0.0) * 1e3,
        "served_by_skip": by_skip,
    }


def server_metrics(server: Server) -> dict[str, float]:
    """The scalar series of the server's /metrics."""
    text = server.get("/metrics").decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(adn_[a-z_]+) ([0-9.e+-]+)$", text, re.MULTILINE)}


def static_pick(latency_us: dict[str, dict[str, float]], accuracy: dict[str, float], slo_ms: float) -> str:
    """``select_skip`` on the profile at the largest batch with half the SLO; the fastest when nothing fits."""
    from adaptive_kernels import select_skip, skip_to_str

    table = latency_us[max(latency_us, key=int)]
    table = {s: t for s, t in table.items() if s in accuracy}
    try:
        return skip_to_str(select_skip(table, accuracy, slo_ms * 1e3 / 2))
    except ValueError:
        return min(table, key=table.get)


def dispatch_cost(latency_us: dict[str, dict[str, float]], accuracy: dict[str, float], shape: list[int],
                  max_batch: int, repeats: int = 2000) -> dict[str, float]:
    """Policy and batching in µs per dispatch measured in this process alone (no HTTP server sharing the GIL), for a
    queue of 1 request and of ``max_batch`` requests: the decision, and the batch the scheduler hands a CPU engine
    (a NumPy view of its input ring, where the requests' inputs were copied when submitted)."""
    from adaptive_kernels.serving import LatencyModel, Queued, plan_dispatch, rank_by_accuracy
    from adaptive_kernels.serving.policy import Costs
    from adaptive_kernels.serving.scheduler import InputRing

    latency = LatencyModel({int(b): t for b, t in latency_us.items()})
    acc = {s: a for s, a in zip(latency.skips, [accuracy.get(k) for k in latency_us["1"]], strict=True)
           if a is not None}
    costs = Costs.build(latency.profiled, rank_by_accuracy(acc, latency.predict), max_batch)
    out = {}
    for n in (1, max_batch):
        queue = [Queued(1.0 + 1e-3 * i, 1, None, 1e-3) for i in range(n)]  # alike requests, one SLO: a fifo queue
        ring = InputRing(2 * max_batch, max_batch, tuple(shape))
        positions = [ring.put(np.zeros((1, *shape), np.float32), None) for _ in range(n)]  # consecutive rows
        t0 = time.perf_counter()
        for _ in range(repeats):
            plan_dispatch(queue, 0.999, costs, fifo=True)
        t1 = time.perf_counter()
        for _ in range(repeats):
            ring.view(positions[0], n, True)
        t2 = time.perf_counter()
        out[f"policy_queue{n}_us"] = (t1 - t0) / repeats * 1e6
        out[f"batching_queue{n}_us"] = (t2 - t1) / repeats * 1e6
    return out


def machine() -> dict:
    """CPU model, cores, load and the versions that decide these numbers."""
    import importlib.metadata

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    versions = {}
    for name in ("onnxruntime", "fastapi", "uvicorn", "prometheus-client", "aiohttp", "numpy", "ray"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None

    def git(*words: str) -> str:
        return subprocess.run(["git", *words], check=False, cwd=REPO, capture_output=True, text=True).stdout

    sha, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, **versions,
            "git": sha.strip() + ("+local changes" if dirty.strip() else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def plot_timeline(traces: dict[str, list[dict]], arrivals: np.ndarray, accuracy: dict[str, float], slo_ms: float,
                  seconds: float, title: str, path: Path) -> None:
    """Offered rate, served accuracy and SLO attainment over time, one line per way of serving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(seconds / 40, 0.25)
    edges = np.arange(0.0, seconds + width, width)
    mids = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(mids, np.histogram(arrivals, edges)[0] / width, color="black")
    axes[0].set_ylabel("offered (req/s)")
    for policy, records in traces.items():
        t = np.array([arrivals[i] for i in range(len(records))])
        served = np.array([r.get("status") == "served" for r in records])
        met = np.array([bool(r.get("met")) for r in records])
        acc = np.array([accuracy[r["skip"]] if r.get("status") == "served" else np.nan for r in records])
        idx = np.digitize(t, edges) - 1
        mean_acc = [np.nanmean(acc[(idx == k) & served]) if ((idx == k) & served).any() else np.nan
                    for k in range(len(mids))]
        attain = [met[idx == k].mean() if (idx == k).any() else np.nan for k in range(len(mids))]
        axes[1].plot(mids, mean_acc, label=policy)
        axes[2].plot(mids, attain, label=policy)
    axes[1].set_ylabel("mean served accuracy (%)")
    axes[2].set_ylabel(f"SLO attainment ({slo_ms:g} ms)")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylim(-0.05, 1.05)
    axes[1].legend(loc="lower left", fontsize=8)
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" for None (nothing served: no accuracy, batch or latency)."""
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The result as a table, one row per (rate, way of serving)."""
    m = result["machine"]
    lines = [f"# Serving load test: {result['scenario']}", "",
             (f"{result['model']} on the CPU engine, SLO {result['slo_ms']:g} ms, max batch {result['max_batch']}, "
             f"{result['seconds']:g} s of traffic per policy and rate in {result['rounds']} rounds (the policies "
             f"take turns: ABCD, DCBA, ...; each round one trace), Gamma inter-arrivals CV² {result['cv2']:g}, "
             f"rate x (1 +/- {result['depth']:g}) sine; accuracy: {result['accuracy_source']}; "
             f"static pick: {result['static_pick']}."),
             (f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work: load {m['load_avg_at_start'][0]:.1f} "
             f"at start, so the numbers are noisy), server threads {result['threads']}; torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}, fastapi {m['fastapi']}, uvicorn {m['uvicorn']}; git {m['git']}, "
             f"{m['date']}."), "",
             ("| rate (req/s) | serving | sent | served | refused | lost | SLO attainment | (client-measured) | "
             "mean accuracy | p50 ms | p99 ms | throughput /s | mean batch |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        acc, batch, p50, p99 = (fmt(row[key], spec) for key, spec in (("mean_accuracy", ".2f"), ("mean_batch", ".1f"),
                                                                       ("p50_ms", ".2f"), ("p99_ms", ".2f")))
        lines.append(f"| {row['rate']:g} | {row['policy']} | {row['sent']} | {row['served']} | {row['refused']} | "
                     f"{row['lost']} | {row['slo_attainment']:.3f} | {row['slo_attainment_client']:.3f} | {acc} | "
                     f"{p50} | {p99} | {row['throughput_per_s']:.1f} | {batch} |")
    o, i = result["overhead"], result["overhead"]["isolated"]
    base, n = o["base_batch1_us"], result["max_batch"]
    lines += ["", (f"Dispatcher time outside the engine per engine call, in the server under load (a decision "
                  f"after the thread waited runs with cold caches: bench/results/serving/README.md): "
                  f"policy {o['policy_us']:.1f} µs, batching {o['batching_us']:.1f} µs, "
                  f"answering {o['answering_us']:.1f} µs; policy + batching = "
                  f"{(o['policy_us'] + o['batching_us']) / base * 100:.1f} % of the base-net's batch-1 latency "
                  f"({base:.1f} µs)."),
              (f"Isolated (this process, no server): policy + batching "
               f"{i['policy_queue1_us'] + i['batching_queue1_us']:.1f}"
              f" µs for a queue of 1 ({(i['policy_queue1_us'] + i['batching_queue1_us']) / base * 100:.1f} %), "
              f"{i[f'policy_queue{n}_us'] + i[f'batching_queue{n}_us']:.1f} µs for a queue of {n} "
              f"({(i[f'policy_queue{n}_us'] + i[f'batching_queue{n}_us']) / base * 100:.1f} %).")]
    return "\n".join(lines) + "\n"


def paper_resnet50_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A ResNet-50-ADN checkpoint (initial weights: only latency matters here) and the paper's accuracies."""
    from adaptive_kernels import create_model
    from adaptive_kernels.training import save_checkpoint

    spec = {"name": "resnet50_adn", "kwargs": {"num_classes": 1000, "in_chans": 3}}
    path = save_checkpoint({"model": create_model(spec["name"]).state_dict(), "model_spec": spec,
                            "data": {"name": "imagefolder", "image_size": [224, 224]}}, folder / "resnet50_adn.pt")
    accuracy = folder / "paper_accuracy.json"
    write_text(accuracy, json.dumps(PAPER_RESNET50))
    return path, accuracy


def rate_list(text: str) -> list[float]:
    """argparse type: mean request rates per second, comma-separated; each a finite number > 0, none twice."""
    rates: list[float] = []
    for item in text.split(","):
        try:
            rate = positive_float(item)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"each rate {e}; write e.g. 5,10,20") from None
        if rate in rates:
            raise argparse.ArgumentTypeError(f"rate {rate:g} is given twice, in {text!r}: give each rate once")
        rates.append(rate)
    return rates


rate_list.__name__ = "rates"


def file_name(text: str) -> str:
    """argparse type: one file name, no folder (--scenario: the results are --out/NAME.json, NAME.md, ...)."""
    if not text.strip() or text in (".", "..") or "/" in text or "\0" in text or len(os.fsencode(text)) > 200:
        raise argparse.ArgumentTypeError(f"must be a plain file name (no '/', not '.' or '..', at most 200 bytes): "
                                         f"the results are --out/NAME.json, ...; got {text!r}")
    return text


file_name.__name__ = "file name"


def policy_list(text: str) -> list[str]:
    """argparse type: ways of serving (``POLICIES``), comma-separated, each once."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in POLICIES:
            raise argparse.ArgumentTypeError(f"unknown way of serving {name!r}: give some of {','.join(POLICIES)}")
        if names.count(name) > 1:
            raise argparse.ArgumentTypeError(f"{name} is given twice, in {text!r}: give each way once")
    return names


policy_list.__name__ = "policies"


def check_served(args: argparse.Namespace) -> None:
    """--paper-resnet50, or --checkpoint and its --accuracy, read now (seconds) rather than by the server after it
    started: a one-line ValueError naming the flag."""
    if args.paper_resnet50:
        given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--accuracy", args.accuracy)) if value]
        if given:
            raise ValueError(f"--paper-resnet50 serves its own checkpoint and accuracies: drop {' and '.join(given)}")
        return
    if not args.checkpoint or not args.accuracy:
        raise ValueError("give --checkpoint CK and --accuracy ACC (the checkpoint's eval --json), or --paper-resnet50")
    from adaptive_kernels.serving import checkpoint_model, load_accuracy

    try:
        model = checkpoint_model(args.checkpoint)[0]
    except ValueError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    stages = model.num_skippable_stages
    if (True,) * stages not in load_accuracy(args.accuracy, stages):  # its ValueError names --accuracy
        raise ValueError(f"--accuracy {args.accuracy} lists no base-net ({'T' * stages}), which the base column "
                         f"serves: add its accuracy")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=path_text, help="served checkpoint (e.g. the demo's calibrated.pt)")
    p.add_argument("--accuracy", type=path_text, help="eval --json / subnets.json of the checkpoint")
    p.add_argument("--paper-resnet50", action="store_true",
                   help="serve ResNet-50-ADN restricted to the four sub-networks the paper reports, with its "
                        "accuracies")
    p.add_argument("--scenario", type=file_name, default="demo", help="name of the result files")
    p.add_argument("--slo-ms", type=positive_float, required=True)
    p.add_argument("--rates", type=rate_list, required=True, help="mean request rates per second, comma-separated")
    p.add_argument("--seconds", type=positive_float, default=20.0, help="traffic per policy and rate, in seconds")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="split --seconds into this many traces the policies replay in turns (ABCD, DCBA, ...)")
    p.add_argument("--cv2", type=float_range(4.0), default=4.0,
                   help="squared coefficient of variation of inter-arrivals (>= 4: a bursty trace)")
    p.add_argument("--depth", type=depth_fraction, default=0.5, help="relative amplitude of the rate's sine")
    p.add_argument("--max-batch", type=int_range(1, 1024), default=16)  # serve's own range
    p.add_argument("--threads", type=thread_count, default=1, help="server (engine) threads; the client takes the rest")
    p.add_argument("--profile-iters", type=positive_int, default=20)
    p.add_argument("--max-requests", type=positive_int, default=100_000, help="a bound on the requests of one run")
    p.add_argument("--timeline-rate", type=positive_float,
                   help="rate whose runs the timeline plots, one of --rates (default: the highest)")
    p.add_argument("--policies", type=policy_list, default=",".join(POLICIES))
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", type=path_text, required=True)
    args = p.parse_args(argv)
    args.out = Path(args.out)
    rates, policies = args.rates, args.policies
    if args.timeline_rate is not None and args.timeline_rate not in rates:
        p.error(f"argument --timeline-rate: {args.timeline_rate:g} is not one of --rates "
                f"({','.join(f'{r:g}' for r in rates)}): give one of them, or leave it out (the highest)")
    signals = Signals()
    with signals:
        try:
            with contextlib.ExitStack() as stack:
                try:
                    check_served(args)
                    # the client and the plot are imported where they are used, after minutes of serving: check now
                    missing = [name for name in ("aiohttp", "matplotlib") if importlib.util.find_spec(name) is None]
                    if missing:
                        raise ValueError(f"the load test needs {' and '.join(missing)}: pip install "
                                         f"{' '.join(missing)}")
                    # proven writable now; a folder made for it is removed again should the run not write there
                    stack.enter_context(output_dir(args.out, "--out"))
                except ValueError as e:
                    p.error(str(e))
                return run(args, rates, policies, signals)
        except Interrupted as e:
            print(f"{p.prog}: interrupted by {signal.Signals(e.signum).name}: stopped the sweep and the server; "
                  f"nothing written", file=sys.stderr, flush=True)
            return 128 + e.signum
        except ServerError as e:
            print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return 1


def run(args: argparse.Namespace, rates: list[float], policies: list[str], signals: Signals) -> int:
    """Start the server, sweep, stop it (whatever happened), write the results; 0 if no request was lost."""
    with tempfile.TemporaryDirectory() as folder:
        if args.paper_resnet50:
            checkpoint, accuracy_file = paper_resnet50_checkpoint(Path(folder))
            source = "the paper's ImageNet top-1 (not measured here); latencies measured here"
        else:
            checkpoint, accuracy_file = Path(args.checkpoint), Path(args.accuracy)
            source = f"{accuracy_file.name} (the checkpoint's own eval)"
        load_at_start = os.getloadavg()  # machine() runs when the result is written, after the sweep's own load
        print(f"[load] starting the server for {checkpoint.name} ...", flush=True)
        server = Server(["--checkpoint", str(checkpoint), "--accuracy", str(accuracy_file), "--slo-ms",
                         str(args.slo_ms), "--max-batch", str(args.max_batch), "--profile-iters",
                         str(args.profile_iters)], args.threads)
        try:
            result = run_sweep(server, args, rates, policies, source, signals)
        finally:
            log = server.stop()
    if server.proc.returncode != 0:  # Ctrl-C is serve's normal stop: exit status 0
        raise ServerError(f"the server ended with {server.status()} on SIGINT; its log ends: {server.tail()}")
    result["server_log_tail"] = log.splitlines()[-3:]
    result["machine"]["load_avg_at_start"] = load_at_start
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{args.scenario}.json", json.dumps(result, indent=1) + "\n")
    write_text(args.out / f"{args.scenario}.md", markdown(result))
    print(markdown(result))
    lost = sum(r["lost"] + r["other_errors"] for r in result["rows"])
    print(f"[load] wrote {args.out}/{args.scenario}.{{json,md}} and the timeline; requests lost: {lost}")
    return 0 if lost == 0 else 1


def run_sweep(server: Server, args: argparse.Namespace, rates: list[float], policies: list[str], source: str,
              signals: Signals) -> dict:
    meta = json.loads(server.get(f"/v2/models/{server.name}"))
    accuracy, latency_us = meta["parameters"]["accuracy"], meta["parameters"]["latency_us"]
    shape = meta["inputs"][0]["shape"][1:]
    ranking = sorted(accuracy, key=accuracy.get, reverse=True)
    forced = {"super": ranking[0], "base": next(s for s in accuracy if set(s) == {"T"}),
              "static": static_pick(latency_us, accuracy, args.slo_ms), "adaptive": None}
    image = np.random.default_rng(args.seed).standard_normal((1, *shape)).astype(np.float32)
    timeline_rate = args.timeline_rate or max(rates)
    rows, traces = [], {}
    before = server_metrics(server)
    for rate in rates:
        # the policies take turns in rounds (ABCD, DCBA, ...), each round one trace that every policy replays: a
        # change in the machine's load hits every policy alike instead of the last ones
        records = {policy: [] for policy in policies}
        t0 = time.perf_counter()
        for r in range(args.rounds):
            arrivals = bursty_trace(args.seconds / args.rounds, rate, args.cv2, args.seed + r,
                                    depth=args.depth, limit=args.max_requests)
            for policy in (policies if r % 2 == 0 else policies[::-1]):
                body, headers = request_body(image, args.slo_ms, forced[policy])
                got = run_replay(signals, server, arrivals, body, headers, args.slo_ms / 1e3 * 20 + 30)
                records[policy] += got
                if rate == timeline_rate and r == 0:
                    traces[policy] = got
                time.sleep(0.5)
        for policy in policies:
            row = {"rate": rate, "policy": policy, "forced": forced[policy],
                   **summarize(records[policy], accuracy, args.slo_ms, args.seconds)}
            rows.append(row)
            print(f"[load] rate {rate:g}/s {policy:>8}: sent {row['sent']}, served {row['served']}, refused "
                  f"{row['refused']}, lost {row['lost']}; SLO {row['slo_attainment']:.3f}, accuracy "
                  f"{fmt(row['mean_accuracy'], '.2f')}, p99 {fmt(row['p99_ms'], '.1f')} ms", flush=True)
        print(f"[load] rate {rate:g}/s: {args.rounds} rounds in {time.perf_counter() - t0:.0f} s", flush=True)
    after = server_metrics(server)
    batches = max(after["adn_batches"] - before["adn_batches"], 1.0)
    overhead = {f"{part}_us": (after[f"adn_dispatch_{part}_seconds"] - before[f"adn_dispatch_{part}_seconds"])
                / batches * 1e6 for part in ("policy", "batching", "answering")}
    overhead.update(batches=batches, base_batch1_us=latency_us["1"][forced["base"]],
                    isolated=dispatch_cost(latency_us, accuracy, shape, args.max_batch))
    timeline = args.out / f"{args.scenario}_timeline.png"
    args.out.mkdir(parents=True, exist_ok=True)
    arrivals = bursty_trace(args.seconds / args.rounds, timeline_rate, args.cv2, args.seed,
                            depth=args.depth, limit=args.max_requests)
    plot_timeline(traces, arrivals, accuracy, args.slo_ms, args.seconds / args.rounds,
                  f"{server.name}, mean {timeline_rate:g} req/s, SLO {args.slo_ms:g} ms", timeline)
    return {"scenario": args.scenario, "model": server.name, "slo_ms": args.slo_ms, "max_batch": args.max_batch,
            "seconds": args.seconds, "rounds": args.rounds, "cv2": args.cv2, "depth": args.depth,
            "threads": args.threads, "seed": args.seed, "max_requests": args.max_requests, "accuracy": accuracy,
            "accuracy_source": source, "latency_us": latency_us,
            "static_pick": forced["static"], "forced": forced, "overhead": overhead, "machine": machine(),
            "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
