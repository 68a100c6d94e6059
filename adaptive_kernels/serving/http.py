"""The HTTP server: the Open Inference Protocol (KServe v2, as Triton speaks it, with the binary tensor data
extension) over the scheduler, on FastAPI + uvicorn, with Prometheus metrics at ``/metrics``. Needs the ``[serve]``
extra.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready``,
``POST /v2/models/{name}/infer`` (each model route also under ``/v2/models/{name}/versions/1``), ``GET /metrics``.
Request parameters: ``slo_ms`` (this request's latency objective, default the server's ``--slo-ms``) and ``skip``
(force a sub-network, e.g. "TFF"). The response's parameters say
which sub-network served the request (``skip``), the ``batch`` it ran in and whether it met its SLO (``slo_met``);
behind Ray Serve also which ``replica`` answered.
A request the scheduler refuses gets HTTP 503 with ``{"error": "request refused: ..."}``.

Handlers only decode, enqueue and await: the engine runs on the scheduler's dispatcher thread.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import signal
import socket
import sys
import threading
import zlib
from bisect import bisect_left
from collections.abc import Iterator
from concurrent.futures import Future
from itertools import accumulate
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .._version import __version__
from ..models.skip import skip_to_str
from .scheduler import Outcome, Refused, Scheduler

INPUT, OUTPUT = "input", "logits"
#: the model's one version (the protocol's ``/versions/{v}`` routes serve it too)
VERSION = "1"
#: Python hands the GIL to a waiting thread after this many seconds (default 5 ms). The event loop decoding requests
#: keeps the GIL busy under load, and the dispatcher thread needs it between engine calls: at 5 ms each hand-over
#: would eat a millisecond SLO whole. The server sets 0.2 ms while it runs.
SWITCH_INTERVAL_S = 2e-4
HEADER_LENGTH = "Inference-Header-Content-Length"
#: an infer request's body may hold this many bytes per input value of a full request (``--max-batch`` images), plus
#: BODY_SLACK_BYTES of JSON: JSON text takes ~25 (a float32 as a double's repr and ", "), pretty-printed ~40, binary
#: 4. A longer body is refused unread (413), so a wrong or hostile client cannot make the server buffer gigabytes.
BODY_BYTES_PER_VALUE = 64
BODY_SLACK_BYTES = 64 * 2**10
#: seconds a request's body may take to arrive (then 408): a client that stalls mid-upload does not hold its
#: connection, nor the server's graceful shutdown, longer than this
BODY_TIMEOUT_S = 10.0


class ProtocolError(ValueError):
    """A request that breaks the protocol or does not fit the model: HTTP ``status`` with the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request's body, decompressed if its Content-Encoding is gzip or deflate; ProtocolError 413 as soon as it
    is known to exceed ``limit`` bytes (from its Content-Length before reading anything, else once the bytes read, or
    decompressed, pass it), 415 for another encoding, 408 when it has not arrived within ``timeout`` seconds (a
    stalled client would otherwise hold its connection, and a graceful shutdown, for as long as it likes)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported: send the body as is, gzip or deflate",
                            415)
    length = request.headers.get("content-length", "")
    too_long = ProtocolError(f"request body over {limit} bytes: this server takes at most the --max-batch images of "
                             f"one request (JSON or binary); send fewer per request", 413)
    if length.isdigit() and int(length) > limit:
        raise too_long

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_long
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        body = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ProtocolError(f"the request body did not arrive within {timeout:g} s", 408) from None
    if encoding == "identity":
        return body
    # gzip, or deflate (zlib's format, as the HTTP standard and tritonclient have it; raw deflate accepted too)
    wbits = 31 if encoding == "gzip" else (15 if body[:1] == b"\x78" else -15)
    inflate = zlib.decompressobj(wbits)
    try:
        data = inflate.decompress(body, limit + 1)  # at most limit + 1 bytes: a small bomb cannot fill memory
    except zlib.error as e:
        raise ProtocolError(f"the body is not valid {encoding} data ({e})") from None
    if len(data) > limit:
        raise too_long
    if not inflate.eof:
        raise ProtocolError(f"the {encoding} body ends before its compressed data does (truncated)")
    return data


#: bucket bounds (inclusive) of the request latency (seconds) and batch size histograms
LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Prometheus metrics of one scheduler, in a registry of their own (several servers in one process stay apart).

    Each finished request is tallied in plain numbers (``record``, under one lock) that the registry turns into
    Prometheus' counters and histograms when scraped (``collect``). Prometheus' own ``Counter`` / ``Histogram``
    objects took ~2.5-3.8 µs per served request (a lock per update) on the dispatcher before its next engine call."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()  # record (the dispatcher; submit's refusals) against collect (a scrape)
        # the tallies: every status and servable sub-network from 0 (exported from the start, as Prometheus advises)
        self.requests = dict.fromkeys(("served", "refused", "failed"), 0)
        self.served = {skip_to_str(skip): 0 for skip in scheduler.ranking}
        self.met = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket (not cumulative), the last one +Inf
        self.latency_sum = 0.0
        self.batch = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        r.register(self)
        Gauge("adn_queue_depth", "requests waiting", registry=r).set_function(lambda: scheduler.counters.queued)
        Gauge("adn_slo_attainment", "served within SLO / finished requests", registry=r).set_function(
            lambda: _attainment(scheduler))
        Gauge("adn_latency_correction", "measured / profiled latency factor in use", registry=r).set_function(
            lambda: scheduler.latency.factor)
        Gauge("adn_arrival_rate", "arrivals per second over the latest 8, as the policy's reserve sees them",
              registry=r).set_function(scheduler.arrival_rate)
        Gauge("adn_reserve_share", "the policy's reserve share (step 4), following the SLO attainment",
              registry=r).set_function(lambda: scheduler.reserve.share)
        Gauge("adn_batches", "engine calls so far", registry=r).set_function(lambda: scheduler.counters.batches)
        Gauge("adn_dispatch_overhead_seconds", "dispatcher time per call outside the engine (EWMA), as the policy's "
              "split sees it", registry=r).set_function(lambda: scheduler.overhead)
        for part in ("policy", "batching", "answering"):
            Gauge(f"adn_dispatch_{part}_seconds", f"dispatcher time in {part}, summed", registry=r).set_function(
                lambda part=part: getattr(scheduler.counters, f"{part}_s"))
        scheduler.listeners.append(self.record)

    def record(self, outcome: Outcome) -> None:
        """Tally one finished request (a scheduler listener)."""
        with self._lock:
            self.requests[outcome.status] += 1
            if outcome.status == "served":
                self.served[outcome.skip] += 1
                self.met += outcome.met
                self.latency[bisect_left(LATENCY_BUCKETS, outcome.latency_s)] += 1
                self.latency_sum += outcome.latency_s
                self.batch[bisect_left(BATCH_BUCKETS, outcome.batch)] += 1
                self.batch_sum += outcome.batch

    def collect(self) -> Iterator[Metric]:
        """The tallies as Prometheus metric families (the registry calls it on a scrape), copied under the lock so
        that each histogram's buckets, count and sum agree."""
        with self._lock:
            requests, served, met = dict(self.requests), dict(self.served), self.met
            latency, latency_sum = list(self.latency), self.latency_sum
            batch, batch_sum = list(self.batch), self.batch_sum
        family = CounterMetricFamily("adn_requests", "finished requests by outcome", labels=["status"])
        for status, n in requests.items():
            family.add_metric([status], n)
        yield family
        family = CounterMetricFamily("adn_served", "served requests by sub-network", labels=["subnet"])
        for subnet, n in served.items():
            family.add_metric([subnet], n)
        yield family
        yield CounterMetricFamily("adn_slo_met", "served requests that met their SLO", value=met)
        for name, doc, bounds, counts, total in (
                ("adn_request_latency_seconds", "received to answered, served requests", LATENCY_BUCKETS, latency,
                 latency_sum),
                ("adn_request_batch_size", "inputs in the batch that served a request", BATCH_BUCKETS, batch,
                 batch_sum)):
            cumulative = list(accumulate(counts))
            buckets = [(floatToGoString(b), n) for b, n in zip(bounds, cumulative, strict=False)]
            yield HistogramMetricFamily(name, doc, buckets=[*buckets, ("+Inf", cumulative[-1])], sum_value=total)


def _attainment(scheduler: Scheduler) -> float:
    c = scheduler.counters
    finished = c.served + c.refused + c.failed
    return c.met / finished if finished else 1.0


def decode_infer_request(body: bytes, header_length: str | None, image_shape: tuple[int, ...]
                         ) -> tuple[np.ndarray, dict[str, Any], bool]:
    """A v2 infer request -> (input (N, C, H, W) float32, the request's JSON, whether the output goes binary).

    Binary data comes back as a read-only view of ``body``, not copied: ``Scheduler.submit`` copies it once, into
    its input ring."""
    json_size = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r}: give the byte length of the JSON header that "
                                f"starts the body (0..{len(body)})")
        json_size = int(header_length)
    try:
        request = json.loads(body[:json_size])
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        binary = isinstance(e, UnicodeDecodeError) or b'"binary_data_size"' in body  # what the client meant
        hint = (f"; a body with binary tensor data needs the {HEADER_LENGTH} header"
                if header_length is None and binary else "")
        raise ProtocolError(f"the request is not v2 JSON ({str(e)[:200]}){hint}") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"the request needs exactly one input, {INPUT!r} FP32 "
                            f"[N, {', '.join(map(str, image_shape))}]")
    tensor = inputs[0]
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if tensor.get("name") != INPUT or datatype != "FP32":
        raise ProtocolError(f"input {tensor.get('name')!r} {datatype}: this model takes {INPUT!r} FP32")
    if (not isinstance(shape, list) or len(shape) != 4 or tuple(shape[1:]) != image_shape
            or any(type(d) is not int for d in shape[1:])):  # 16.0 == 16, but not a dimension
        raise ProtocolError(f"input shape {shape}: this model takes [N, {', '.join(map(str, image_shape))}]")
    if isinstance(shape[0], bool) or not isinstance(shape[0], int) or shape[0] < 1:
        raise ProtocolError(f"input shape {shape}: the batch must be a whole number from 1 (images in the request)")
    size = _object(tensor.get("parameters"), "the input's parameters").get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ProtocolError(f"binary_data_size {size!r}: give the byte count of the input's binary data")
    if size is not None and "data" in tensor:
        raise ProtocolError("the input has both data and binary_data_size: send its values one way")
    if size is not None and json_size + size != len(body):
        raise ProtocolError(f"binary_data_size {size}, but the body holds {len(body) - json_size} bytes after the "
                            f"{json_size}-byte JSON header: send exactly the input's bytes")
    if size is None and json_size != len(body):
        raise ProtocolError(f"the body holds {len(body) - json_size} bytes after the JSON header that no input "
                            f"claims: give the input's binary_data_size")
    try:
        if size is not None:
            array = np.frombuffer(body, dtype="<f4", count=size // 4, offset=json_size).reshape(shape)
            if size % 4:
                raise ValueError(f"{size} bytes is not a whole number of FP32 values")
        else:
            with np.errstate(over="ignore"):  # beyond FP32's range: inf, refused below
                array = np.asarray(tensor.get("data"), dtype=np.float32).reshape(shape)
    except (ValueError, TypeError, OverflowError) as e:  # OverflowError: an integer beyond a double's range
        raise ProtocolError(f"input data does not hold shape {shape} FP32 values ({str(e)[:200]})") from None
    if not np.isfinite(array).all():  # NaN, Infinity, null (NaN in NumPy), or beyond FP32's range
        bad = int(array.size - np.isfinite(array).sum())
        raise ProtocolError(f"the input holds {bad} values that are not finite FP32 numbers (NaN, Infinity, null or "
                            f"beyond +-3.4e38): send finite values")
    if "id" in request and not isinstance(request["id"], str):
        raise ProtocolError(f"id {json.dumps(request['id'])[:40]}: the protocol's request id is a string")
    parameters = _object(request.get("parameters"), "the request's parameters")
    binary = _flag(parameters, "binary_data_output", False)
    outputs = request.get("outputs")
    if not isinstance(outputs, (list, type(None))):
        raise ProtocolError(f'outputs must be a list of objects like {{"name": "{OUTPUT}"}}')
    if outputs is not None and len(outputs) > 1:
        raise ProtocolError(f"{len(outputs)} outputs requested: this model has one output, {OUTPUT!r}")
    for out in outputs or []:
        out = _object(out, "each output")
        if out.get("name") != OUTPUT:
            raise ProtocolError(f"output {out.get('name')!r}: this model has one output, {OUTPUT!r}")
        out_parameters = _object(out.get("parameters"), "an output's parameters")
        if out_parameters.get("class_count"):
            raise ProtocolError(f"class_count {out_parameters['class_count']!r}: the classification extension is "
                                f"not supported; request the {OUTPUT} and take the top classes")
        binary = _flag(out_parameters, "binary_data", binary)
    return array, request, binary


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean parameter (``"false"`` is a string, not False: the client's mistake, said in one line)."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter {key}={json.dumps(value)[:40]}: give true or false")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a JSON object (absent: empty); anything else is the client's mistake, said in one line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {json.dumps(value)[:40]}")
    return value


def encode_infer_response(name: str, request: dict[str, Any], output: np.ndarray, parameters: dict[str, Any],
                          binary: bool) -> Response:
    """The v2 response: JSON, or JSON header + the raw little-endian FP32 output (binary tensor data extension)."""
    tensor: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(output.shape)}
    raw = np.ascontiguousarray(output, dtype="<f4").tobytes() if binary else b""
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = output.reshape(-1).tolist()
    response = {"model_name": name, "model_version": VERSION, "outputs": [tensor], "parameters": parameters}
    if "id" in request:
        response["id"] = request["id"]
    try:
        header = json.dumps(response, allow_nan=False).encode()  # NaN is not JSON: a client's parser would fail
    except ValueError:
        raise ProtocolError("the output holds values that are not finite (NaN or Infinity), which JSON cannot carry: "
                            "request it as binary data (binary_data_output)", 500) from None
    if not binary:
        return Response(header, media_type="application/json")
    return Response(header + raw, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


class _Answers:
    """Hands the scheduler's answers, finished on its dispatcher thread, to the event loop with one wake-up per
    burst: ``asyncio.wrap_future`` wakes the loop once per request (a write to its self-pipe and a GIL hand-over:
    ~15 µs of the dispatcher's time per future, measured), so a batch of 16 cost the dispatcher ~0.2 ms before its
    next engine call; here the first answer of a burst schedules one delivery and the rest join it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready: list[tuple[asyncio.Future, Future]] = []
        self._lock = threading.Lock()

    def watch(self, future: Future) -> asyncio.Future:
        """An awaitable of ``future``'s outcome on this loop (call it on the loop's thread)."""
        waiter = self.loop.create_future()
        future.add_done_callback(lambda done: self._arrived(waiter, done))
        return waiter

    def _arrived(self, waiter: asyncio.Future, future: Future) -> None:  # any thread: where the future was finished
        with self._lock:
            self._ready.append((waiter, future))
            first = len(self._ready) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the loop's thread
        with self._lock:
            ready, self._ready = self._ready, []
        for waiter, future in ready:
            if waiter.done():  # cancelled: the client went away
                continue
            if (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


def _error(message: str, status: int) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")


def create_app(scheduler: Scheduler, name: str, slo_ms: float, replica: str | None = None) -> FastAPI:
    """The FastAPI app serving ``scheduler`` as model ``name``; ``slo_ms``: the SLO of requests that set none;
    ``replica``: this server's id among several behind one address (a Ray Serve replica), named in every response's
    parameters and in the server metadata."""
    app = FastAPI(title=f"adaptive_kernels: {name}", version=__version__)
    app.state.metrics = Metrics(scheduler)
    app.state.answers = None  # an _Answers, made on the first request, on the loop that serves
    metadata = {
        "name": name, "versions": [VERSION], "platform": f"adaptive_kernels_{scheduler.engine.mechanism}",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *scheduler.image_shape]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {"slo_ms": slo_ms, "max_batch": scheduler.max_batch,
                       "accuracy": {skip_to_str(s): scheduler.accuracy[s] for s in scheduler.ranking},
                       "latency_us": {str(b): t for b, t in scheduler.latency.table().items()}},
    }

    body_limit = BODY_SLACK_BYTES + BODY_BYTES_PER_VALUE * scheduler.max_batch * math.prod(scheduler.image_shape)

    def known(model: str, version: str | None = None) -> Response | None:
        """None for this model (and its one version), else the 404 naming what is served."""
        if model != name:
            return _error(f"unknown model {model!r}; this server serves {name!r}", 404)
        if version is not None and version != VERSION:
            return _error(f"unknown version {version!r} of model {name!r}; this server serves version {VERSION}", 404)
        return None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        """Routing errors (an unknown path: 404, a wrong method: 405) as the protocol's {"error": ...}: a v2 client
        reads that key (tritonclient fails on FastAPI's {"detail": ...})."""
        return _error(f"{request.method} {request.url.path}: {error.detail}", error.status_code)

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": "adaptive_kernels", "version": __version__, "extensions": ["binary_tensor_data"],
                **({"replica": replica} if replica else {})}

    @app.get("/v2/health/live")
    def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def server_ready() -> dict[str, Any]:
        return {"ready": True}

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    def ready(model: str, version: str | None = None) -> Response:
        return known(model, version) or Response(json.dumps({"ready": True}), media_type="application/json")

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    def model_metadata(model: str, version: str | None = None) -> Response:
        return known(model, version) or Response(json.dumps(metadata), media_type="application/json")

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        received = scheduler.now()  # the SLO counts from here: reading and decoding the request are waited for too
        if (unknown := known(model, version)) is not None:
            return unknown
        try:
            x, body, binary = decode_infer_request(await read_body(request, body_limit, BODY_TIMEOUT_S),
                                                   request.headers.get(HEADER_LENGTH), scheduler.image_shape)
            parameters = body.get("parameters") or {}
            slo = parameters.get("slo_ms", slo_ms)
            if isinstance(slo, bool) or not isinstance(slo, (int, float)) or not 0 < slo < math.inf:
                raise ProtocolError(f"parameter slo_ms={slo!r}: give a positive, finite number of milliseconds")
            future = scheduler.submit(x, slo / 1e3, parameters.get("skip"), received=received)
        except (ValueError, TypeError) as e:  # the request's mistake (a skip of a wrong type is a TypeError)
            return _error(str(e), getattr(e, "status", 400))
        except ClientDisconnect:  # the client went away while sending: no one to answer, nothing to log
            return Response(status_code=400)
        loop = asyncio.get_running_loop()
        if (answers := app.state.answers) is None or answers.loop is not loop:  # bound to the serving loop
            answers = app.state.answers = _Answers(loop)
        try:
            served = await answers.watch(future)
        except Refused as e:
            return _error(str(e), 503)
        except Exception as e:  # noqa: BLE001 -- the engine failed: the client hears why
            return _error(f"inference failed: {type(e).__name__}: {e}", 500)
        result = {"skip": served.skip, "batch": served.batch, "slo_met": served.met, "slo_ms": slo,
                  **({"replica": replica} if replica else {})}
        try:
            return encode_infer_response(name, body, served.array, result, binary)
        except ProtocolError as e:
            return _error(str(e), e.status)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


#: connections the listening socket holds before the server accepts them
BACKLOG = 2048


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port), or one clear ValueError when it is taken. It listens
    only once the server runs (uvicorn's ``listen``): until then a connection is refused at once, where a listening
    socket would hold it in the backlog through the start-up (a minute of profiling, then served as if just
    arrived: its SLO counts from the handler's start)."""
    if not host.strip():
        raise ValueError("--host is empty (that would listen on every interface): give an address, e.g. 127.0.0.1 "
                         "(the default) or 0.0.0.0 for every interface")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use: stop what listens there or choose another --port") \
                from None
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --host/--port") from None
    return sock


class HttpServer:
    """uvicorn serving ``app`` on ``sock``. ``run()`` blocks (Ctrl-C / SIGTERM stop it gracefully: no new
    connections, open requests answered); ``start()`` runs it on a thread and ``stop()`` ends that (tests,
    benchmarks). ``port`` is the port bound."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                     timeout_graceful_shutdown=30, backlog=BACKLOG,
                                                     lifespan="off"))  # no start-up/shutdown hooks: a second Ctrl-C
        # (forced exit) left "auto"'s idle lifespan task to be cancelled, and it logged a CancelledError traceback
        self._thread: threading.Thread | None = None

    def listen(self) -> None:
        """Start taking connections (they wait for ``run`` in the backlog); ValueError if another socket listens on
        the port since ``bind_socket`` (both bound with SO_REUSEADDR, neither listening yet)."""
        try:
            self.sock.listen(BACKLOG)
        except OSError as e:
            raise ValueError(f"port {self.port} is in use ({e.strerror or e}): stop what listens there or choose "
                             f"another --port") from None

    def run(self) -> None:
        """Serve until Ctrl-C / SIGTERM, then return normally (uvicorn re-raises the signal it stopped on once its
        graceful shutdown is done; here that ends the call, so the caller's clean-up and summary run)."""
        self.listen()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
        try:
            self._server.run(sockets=[self.sock])
        except KeyboardInterrupt:
            pass
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    def start(self, timeout: float = 30.0) -> HttpServer:
        self._thread = threading.Thread(target=self.run, name="adn-http", daemon=True)
        self._thread.start()
        for _ in range(int(timeout / 0.01)):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        raise RuntimeError(f"the HTTP server did not start on port {self.port}")

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.sock.close()
