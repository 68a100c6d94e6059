"""The HTTP server on 127.0.0.1 (ephemeral port) with a stock client, tritonclient.http: outputs against the torch
model, the sub-network reported and forced, refusals as HTTP errors, metrics; stopped at the end."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from adaptive_kernels.models.skip import parse_skip, skip_to_str

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the [serve] extra)")
pytest.importorskip("fastapi", reason="needs fastapi (the [serve] extra)")

from adaptive_kernels.serving import Refused, Scheduler
from adaptive_kernels.serving.http import HttpServer, _Answers, bind_socket, create_app


@pytest.fixture(scope="module")
def server(small_plan):
    scheduler = Scheduler(small_plan.engine, small_plan.example_input, small_plan.latency, small_plan.accuracy)
    http = HttpServer(create_app(scheduler, "r20", slo_ms=2000.0), bind_socket("127.0.0.1", 0)).start()
    yield http, scheduler
    http.stop()
    scheduler.close()


def infer(client, x: np.ndarray, binary: bool, **parameters):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    return client.infer("r20", [inp], outputs=[out], parameters=parameters or None)


def test_http_serves_the_model_with_a_stock_client(server, small_model):
    http, scheduler = server
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http.port}")
    assert client.is_server_ready() and client.is_model_ready("r20")
    meta = client.get_model_metadata("r20")
    assert meta["inputs"][0]["shape"] == [-1, 1, 16, 16]
    x = torch.randn(3, 1, 16, 16)
    for binary in (True, False):
        result = infer(client, x.numpy(), binary)
        skip = result.get_response()["parameters"]["skip"]
        with torch.no_grad():
            expected = small_model(x, skip=skip)
        np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), rtol=1e-4, atol=1e-4)
    forced = infer(client, x[:1].numpy(), True, skip="TFT", slo_ms=5000)
    assert forced.get_response()["parameters"]["skip"] == "TFT"
    with torch.no_grad():
        np.testing.assert_allclose(forced.as_numpy("logits"), small_model(x[:1], skip=parse_skip("TFT", 3)).numpy(),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(httpclient.InferenceServerException, match="request refused"):
        infer(client, x[:1].numpy(), True, slo_ms=1e-6)  # no sub-network runs in a nanosecond
    with pytest.raises(httpclient.InferenceServerException, match="this model takes"):
        infer(client, np.zeros((1, 3, 16, 16), np.float32), True)
    with pytest.raises(httpclient.InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=10).read().decode()
    assert 'adn_requests_total{status="refused"} 1.0' in metrics
    assert 'adn_served_total{subnet="TFT"} 1.0' in metrics
    assert all(f'adn_served_total{{subnet="{skip_to_str(s)}"}}' in metrics for s in scheduler.ranking)  # from 0 on
    assert 'adn_requests_total{status="failed"} 0.0' in metrics
    assert "adn_queue_depth 0.0" in metrics
    rate = re.search(r"^adn_arrival_rate (\S+)$", metrics, re.MULTILINE)
    assert rate and float(rate.group(1)) > 0  # 4 arrivals so far: a rate
    overhead = re.search(r"^adn_dispatch_overhead_seconds (\S+)$", metrics, re.MULTILINE)
    assert overhead and 0 < float(overhead.group(1)) == scheduler.overhead  # served calls measured it
    share = re.search(r"^adn_reserve_share (\S+)$", metrics, re.MULTILINE)
    assert share and float(share.group(1)) == scheduler.reserve.share
    stats = scheduler.stats()
    assert stats.submitted == stats.served + stats.refused == 4


def test_metrics_tally_each_request_once_and_export_prometheus_counters_and_histograms(small_plan):
    """The tallies a scrape exports: counters by status and sub-network (every one from 0), met, and histograms of
    latency and batch with Prometheus' inclusive buckets, cumulative, their count and sum; each request counted once
    while 2 threads record and 2 scrape."""
    from prometheus_client import generate_latest

    from adaptive_kernels.serving.http import Metrics
    from adaptive_kernels.serving.scheduler import Outcome

    scheduler = Scheduler(small_plan.engine, small_plan.example_input, small_plan.latency, small_plan.accuracy)
    scheduler.close()
    metrics = Metrics(scheduler)

    def value(series: str) -> float:
        text = generate_latest(metrics.registry).decode()
        return float(re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE).group(1))

    assert value('adn_served_total{subnet="FFF"}') == 0 and value('adn_requests_total{status="failed"}') == 0
    for outcome in (Outcome("served", 0.002, "TFT", 4, True), Outcome("served", 0.5, "FFF", 5, False),
                    Outcome("served", 7.0, "TFT", 200, True), Outcome("refused", 0.001)):
        metrics.record(outcome)
    assert value('adn_served_total{subnet="TFT"}') == 2 and value('adn_requests_total{status="refused"}') == 1
    assert value("adn_slo_met_total") == 2
    assert value('adn_request_latency_seconds_bucket{le="0.002"}') == 1  # inclusive: 0.002 <= 0.002
    assert value('adn_request_latency_seconds_bucket{le="0.5"}') == 2
    assert value('adn_request_latency_seconds_bucket{le="5.0"}') == 2 and value(
        'adn_request_latency_seconds_bucket{le="+Inf"}') == 3
    assert value("adn_request_latency_seconds_count") == 3 and value("adn_request_latency_seconds_sum") == 7.502
    assert [value(f'adn_request_batch_size_bucket{{le="{b}"}}') for b in ("2.0", "4.0", "8.0", "128.0", "+Inf")] \
        == [0, 1, 2, 2, 3]
    assert value("adn_request_batch_size_sum") == 209
    served = Outcome("served", 0.003, "TFT", 4, True)
    recorders = [threading.Thread(target=lambda: [metrics.record(served) for _ in range(3000)]) for _ in range(2)]
    scrapers = [threading.Thread(target=lambda: [generate_latest(metrics.registry) for _ in range(50)])
                for _ in range(2)]
    for t in (*recorders, *scrapers):
        t.start()
    for t in (*recorders, *scrapers):
        t.join()
    assert value('adn_served_total{subnet="TFT"}') == 6002
    assert value("adn_request_latency_seconds_count") == value('adn_request_batch_size_bucket{le="+Inf"}') == 6003


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/r20/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


IMAGE = [0.5] * 256  # one 1x16x16 image
INPUT = {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": IMAGE}


@pytest.mark.parametrize("request_json, status, message", [
    ({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": IMAGE}],
      "parameters": {"skip": True}}, 400, "skip must be None, 'super', 'base', a T/F string or a sequence of bools"),
    ({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": IMAGE}],
      "parameters": {"skip": 3}}, 400, "skip must be"),
    ({"inputs": [{"name": "input", "shape": [-1, 1, 16, 16], "datatype": "FP32", "data": IMAGE}]}, 400,
     "input shape [-1, 1, 16, 16]: the batch must be a whole number from 1"),
    ({"inputs": [{"name": "input", "shape": [1.5, 1, 16, 16], "datatype": "FP32", "data": IMAGE}]}, 400,
     "input shape [1.5, 1, 16, 16]: the batch must be a whole number from 1"),
    ({"inputs": [{"name": "input", "shape": [1, 1.0, 16.0, 16.0], "datatype": "FP32", "data": IMAGE}]}, 400,
     "input shape [1, 1.0, 16.0, 16.0]: this model takes [N, 1, 16, 16]"),
    ({"inputs": [INPUT], "parameters": [1]}, 400, "the request's parameters must be a JSON object, got [1]"),
    ({"inputs": [{**INPUT, "parameters": "x"}]}, 400, "the input's parameters must be a JSON object"),
    ({"inputs": [{**INPUT, "parameters": {"binary_data_size": -4}}]}, 400, "binary_data_size -4: give the byte"),
    ({"inputs": [INPUT], "outputs": ["logits"]}, 400, "each output must be a JSON object"),
    ({"inputs": [INPUT], "outputs": {"name": "logits"}}, 400, "outputs must be a list of objects"),
    ({"inputs": [INPUT], "outputs": [{"name": "logits", "parameters": [1]}]}, 400,
     "an output's parameters must be a JSON object"),
    ({"inputs": [INPUT], "parameters": {"slo_ms": math.inf}}, 400, "slo_ms=inf: give a positive, finite number"),
    ({"inputs": [INPUT], "parameters": {"slo_ms": -1}}, 400, "slo_ms=-1: give a positive, finite number"),
    # values NumPy would take silently: NaN, null (NaN), beyond FP32 (inf), beyond a double (OverflowError)
    ({"inputs": [{**INPUT, "data": [math.nan] + IMAGE[1:]}]}, 400, "1 values that are not finite FP32 numbers"),
    ({"inputs": [{**INPUT, "data": [None, None] + IMAGE[2:]}]}, 400, "2 values that are not finite FP32 numbers"),
    ({"inputs": [{**INPUT, "data": [1e39] + IMAGE[1:]}]}, 400, "1 values that are not finite FP32 numbers"),
    ({"inputs": [{**INPUT, "data": [10**400] + IMAGE[1:]}]}, 400, "input data does not hold shape [1, 1, 16, 16]"),
    ({"inputs": [INPUT], "id": 7}, 400, "id 7: the protocol's request id is a string"),
    ({"inputs": [INPUT], "parameters": {"binary_data_output": "false"}}, 400,
     'parameter binary_data_output="false": give true or false'),
    ({"inputs": [INPUT], "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]}, 400,
     "parameter binary_data=1: give true or false"),
    ({"inputs": [INPUT], "outputs": [{"name": "logits", "parameters": {"class_count": 3}}]}, 400,
     "class_count 3: the classification extension is not supported"),
    ({"inputs": [INPUT], "outputs": [{"name": "logits"}, {"name": "logits"}]}, 400, "2 outputs requested"),
])
def test_http_answers_a_malformed_request_with_one_line_and_keeps_serving(server, request_json, status, message):
    """A client's mistake is the client's 4xx with one line saying what is wrong, never a 500 and a server-side
    traceback; the next request is served."""
    http, _ = server
    code, answer = post(http.port, json.dumps(request_json).encode())
    assert (code, set(answer)) == (status, {"error"}) and message in answer["error"] and "\n" not in answer["error"]
    good = {"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": IMAGE}]}
    assert post(http.port, json.dumps(good).encode())[0] == 200


def test_http_counts_the_slo_from_when_the_request_arrived_not_from_after_decoding(server, monkeypatch):
    """Reading and decoding a request is part of the client's wait (a JSON ResNet-50 image: 44 ms here): a
    request whose SLO ran out while it was decoded is refused, and a served one's latency includes the decoding."""
    import adaptive_kernels.serving.http as http_module

    http, _ = server
    decode = http_module.decode_infer_request

    def slow_decode(*args):
        time.sleep(0.06)
        return decode(*args)

    def latency_sum() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=10).read().decode()
        return float(re.search(r"^adn_request_latency_seconds_sum (\S+)$", text, re.MULTILINE).group(1))

    monkeypatch.setattr(http_module, "decode_infer_request", slow_decode)
    code, answer = post(http.port, json.dumps({"inputs": [INPUT], "parameters": {"slo_ms": 50}}).encode())
    assert code == 503 and "request refused" in answer["error"]  # served from submit on, it would count as met
    before = latency_sum()
    code, answer = post(http.port, json.dumps({"inputs": [INPUT], "parameters": {"slo_ms": 2000}}).encode())
    assert code == 200 and answer["parameters"]["slo_met"]
    assert latency_sum() - before >= 0.06


def raw_post(port: int, head: bytes, body: bytes) -> tuple[int, dict]:
    """POST ``head`` (the header lines) and as much of ``body`` as the server takes; its status and JSON answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/r20/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n")
        try:
            sock.sendall(body)
        except OSError:  # the server answered and closed without reading it all
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", answer.lower()).group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_http_refuses_a_body_larger_than_a_full_request_unread(server):
    """A body longer than --max-batch images could take (64 bytes a value + 64 KiB: any JSON a client writes) is a
    413 with one line, from its Content-Length before any of it is read, or (chunked) once it passes the limit; the
    server keeps serving. A full batch of random values, pretty-printed, is within the limit."""
    http, scheduler = server
    limit = 64 * 2**10 + 64 * scheduler.max_batch * 256
    code, answer = raw_post(http.port, b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n",
                            b"{" * 1000)  # announces 10 GB, sends 1 kB: answered at once
    assert code == 413 and f"request body over {limit} bytes" in answer["error"] and "\n" not in answer["error"]
    chunk = b"a" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 2)) + b"0\r\n\r\n"
    code, answer = raw_post(http.port, b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunked)
    assert code == 413 and f"request body over {limit} bytes" in answer["error"]
    x = np.random.default_rng(0).standard_normal((scheduler.max_batch, 1, 16, 16)).astype(np.float32)
    full = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}, indent=4).encode()
    assert 30 < len(full) / x.size < 64 and len(full) < limit  # the most a client writes a value in, within
    assert post(http.port, full)[0] == 200


def test_http_checks_the_binary_tensor_data_against_its_byte_counts(server):
    """The binary extension's byte counts must agree: the header's JSON length, binary_data_size and the body; a
    request that breaks them is a 400 naming the mismatch, never served from the bytes that happen to be there."""
    http, _ = server
    raw = np.full(256, 0.5, "<f4").tobytes()

    def request(size, extra=b"", header=None, data=False):
        tensor = {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                  "parameters": {"binary_data_size": size}, **({"data": IMAGE} if data else {})}
        head = json.dumps({"inputs": [tensor]}).encode()
        body = head + raw + extra
        length = str(len(head) if header is None else header).encode()
        head = b"Content-Length: %d\r\nInference-Header-Content-Length: %s\r\n" % (len(body), length)
        return raw_post(http.port, head, body)

    assert request(len(raw))[0] == 200
    for args, message in (((10**30,), "binary_data_size 1000000000000000000000000000000, but the body holds 1024"),
                          ((len(raw), b"junk"), "binary_data_size 1024, but the body holds 1028 bytes"),
                          ((len(raw), b"", None, True), "both data and binary_data_size"),
                          ((len(raw), b"", -1), "Inference-Header-Content-Length '-1': give the byte length"),
                          ((len(raw), b"", 10**9), "Inference-Header-Content-Length '1000000000'")):
        code, answer = request(*args)
        assert code == 400 and message in answer["error"] and "\n" not in answer["error"], (args, answer)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode() + raw
    code, answer = raw_post(http.port, b"Content-Length: %d\r\n" % len(body), body)  # the header left out
    assert code == 400 and "needs the Inference-Header-Content-Length header" in answer["error"]


def test_http_refuses_json_nested_past_the_parser_in_one_line(server):
    http, _ = server
    for body in (b"[" * 100_000, b'{"inputs": [{"name": "input", "data": ' + b"[" * 5000 + b"]}]}"):
        code, answer = raw_post(http.port, b"Content-Length: %d\r\n" % len(body), body)
        assert code == 400 and "the request is not v2 JSON" in answer["error"] and "\n" not in answer["error"]


def test_http_serves_the_versioned_routes_and_answers_unknown_paths_in_the_protocol_s_error_format(server,
                                                                                                  small_model):
    http, _ = server
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http.port}")
    assert client.is_model_ready("r20", model_version="1") and not client.is_model_ready("r20", model_version="2")
    assert client.get_model_metadata("r20", model_version="1")["versions"] == ["1"]
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("r20", [inp], model_version="1")
    with torch.no_grad():
        expected = small_model(torch.from_numpy(x), skip=result.get_response()["parameters"]["skip"])
    np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(httpclient.InferenceServerException, match="unknown version '2' of model 'r20'"):
        client.infer("r20", [inp], model_version="2")
    for path, status in (("/v2/nowhere", 404), ("/v2/models/r20/infer", 405)):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{http.port}{path}", timeout=10)  # a GET
        assert error.value.code == status and set(json.loads(error.value.read())) == {"error"}
    assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http.port}/v2/health/ready?model=x",
                                             timeout=10).read()) == {"ready": True}


def test_http_takes_gzip_and_deflate_bodies_as_tritonclient_sends_them_within_the_size_limit(server, small_model):
    http, scheduler = server
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http.port}")
    x = np.random.default_rng(2).standard_normal((1, 1, 16, 16)).astype(np.float32)
    for algorithm in ("gzip", "deflate"):
        for binary in (True, False):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("r20", [inp], request_compression_algorithm=algorithm)
            with torch.no_grad():
                expected = small_model(torch.from_numpy(x), skip=result.get_response()["parameters"]["skip"])
            np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), rtol=1e-4, atol=1e-4)
    import gzip

    limit = 64 * 2**10 + 64 * scheduler.max_batch * 256
    bomb = gzip.compress(b" " * (limit + 1))  # ~1 kB that inflates past the limit
    code, answer = raw_post(http.port, b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(bomb), bomb)
    assert code == 413 and f"request body over {limit} bytes" in answer["error"]
    for head, body, status, message in (
            (b"Content-Encoding: br\r\n", b"{}", 415, "Content-Encoding 'br' is not supported"),
            (b"Content-Encoding: gzip\r\n", b"{}", 400, "the body is not valid gzip data"),
            (b"Content-Encoding: gzip\r\n", gzip.compress(b"{}" * 100)[:20], 400, "truncated")):
        code, answer = raw_post(http.port, head + b"Content-Length: %d\r\n" % len(body), body)
        assert code == status and message in answer["error"], answer


def test_http_answers_a_client_that_stalls_mid_body_with_408_within_the_body_timeout(server, monkeypatch):
    import socket

    import adaptive_kernels.serving.http as http_module

    http, _ = server
    monkeypatch.setattr(http_module, "BODY_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", http.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/r20/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
                     b'{"inputs"')  # then nothing
        start = time.perf_counter()
        answer = sock.recv(65536)
        waited = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer and waited < 5


def test_http_a_client_gone_mid_body_leaves_no_traceback_and_the_server_serves_on(server):
    import logging
    import socket

    http, _ = server
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")  # where uvicorn logs "Exception in ASGI application"
    logger.addHandler(handler)
    try:
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/r20/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
                         b'{"inputs"')
            time.sleep(0.2)  # the handler is reading the body
        time.sleep(0.3)
        assert post(http.port, json.dumps({"inputs": [INPUT]}).encode())[0] == 200
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]


def test_a_json_response_never_holds_nan():
    from adaptive_kernels.serving.http import ProtocolError, encode_infer_response

    with pytest.raises(ProtocolError, match="not finite .* request it as binary data") as error:
        encode_infer_response("r20", {}, np.array([[np.nan, 1.0]], np.float32), {}, binary=False)
    assert error.value.status == 500
    response = encode_infer_response("r20", {}, np.array([[np.nan, 1.0]], np.float32), {}, binary=True)
    assert response.status_code == 200  # binary data carries it


def test_a_batch_of_answers_reaches_the_event_loop_with_one_wake_up():
    # the dispatcher finishes a batch's futures in a row on its thread; each used to wake the loop on its own (~15 µs
    # of the dispatcher's time per request); each waiter must still get its own answer, refusal included, and a
    # waiter cancelled meanwhile (its client gone) must not stop the others
    async def serve_one_batch():
        loop = asyncio.get_running_loop()
        answers, wakeups, wake = _Answers(loop), [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda callback, *args: wakeups.append(callback) or wake(callback, *args)
        futures = [Future() for _ in range(16)]
        for f in futures:
            f.set_running_or_notify_cancel()  # as the scheduler's are
        waiters = [answers.watch(f) for f in futures]
        waiters[3].cancel()

        def finish():
            for i, f in enumerate(futures):
                f.set_exception(Refused("late")) if i == 5 else f.set_result(i)

        dispatcher = threading.Thread(target=finish)
        dispatcher.start()
        dispatcher.join()
        return len(wakeups), await asyncio.gather(*waiters, return_exceptions=True)

    wakeups, results = asyncio.run(serve_one_batch())
    assert wakeups == 1
    assert isinstance(results[3], asyncio.CancelledError) and isinstance(results[5], Refused)
    assert [r for i, r in enumerate(results) if i not in (3, 5)] == [i for i in range(16) if i not in (3, 5)]


def test_http_answers_concurrent_clients_each_with_its_own_output(server, small_model):
    http, _ = server
    images = torch.randn(24, 1, 16, 16, generator=torch.Generator().manual_seed(4))

    def ask(i):
        return post(http.port, json.dumps({"inputs": [{**INPUT, "data": images[i].flatten().tolist()}]}).encode())

    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(ask, range(len(images))))
    with torch.no_grad():
        for image, (code, answer) in zip(images, answers, strict=True):
            assert code == 200, answer
            skip = answer["parameters"]["skip"]
            got = torch.tensor(answer["outputs"][0]["data"]).reshape(1, -1)
            torch.testing.assert_close(got, small_model(image[None], skip=skip), rtol=1e-4, atol=1e-4)
