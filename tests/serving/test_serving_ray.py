"""The Ray Serve deployment: 2 replicas on a local Ray (127.0.0.1), requests through a stock client
(tritonclient.http) answered with the torch model's output of the sub-network each response names, both replicas
serving, every request answered (served or refused), and Ray stopped afterwards; with ``int8=True`` each replica's
engine is the OpenVINO INT8 one that ``serve --int8`` builds in one process from the checkpoint's kept images."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
from helpers import randomize

from adaptive_kernels import create_model
from adaptive_kernels.engine.ort.engine import onnxruntime_unavailable
from adaptive_kernels.models.skip import skip_to_str
from adaptive_kernels.training import save_checkpoint
from adaptive_kernels.training.checkpoint import INT8_SAMPLE

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the [serve] extra)")
pytest.importorskip("ray.serve", reason="needs ray[serve] (the [serve] extra)")
if onnxruntime_unavailable() is not None:
    pytest.skip("needs onnxruntime (the [onnx] extra)", allow_module_level=True)

import ray
from ray import serve

from adaptive_kernels.serving import ray as serving_ray
from adaptive_kernels.serving.ray import deploy


@pytest.fixture
def checkpoint(tmp_path):
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}}
    model = randomize(create_model(spec["name"], **spec["kwargs"]), calibrate=(8, 1, 16, 16))
    path = save_checkpoint({"model": model.state_dict(), "model_spec": spec,
                            "data": {"name": "synthetic", "image_size": [16, 16]}}, tmp_path / "last.pt")
    return path, model


def test_deploy_refuses_bad_arguments_before_starting_ray(checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    accuracy = {"FFF": 90.0}
    with pytest.raises(ValueError, match="replicas must be an int in \\[1, 4096\\], got 0"):
        deploy(path, 10.0, accuracy, replicas=0)
    with pytest.raises(ValueError, match="miss_budget must be a share of requests, 0 <= miss_budget < 1, got 1.0"):
        deploy(path, 10.0, accuracy, miss_budget=1.0)
    with pytest.raises(ValueError, match="this model has 3 skippable stages"):
        deploy(path, 10.0, {"FF": 90.0})
    with pytest.raises(ValueError, match="the accuracy of FFF is nan: give a finite number"):
        deploy(path, 10.0, {"FFF": math.nan})
    with pytest.raises(ValueError, match="slo_ms must be a positive, finite number of milliseconds, got inf"):
        deploy(path, math.inf, accuracy)
    with pytest.raises(ValueError, match="max_batch must be an int in \\[1, 1024\\], got 0"):
        deploy(path, 10.0, accuracy, max_batch=0)
    with pytest.raises(ValueError, match="profile_iters must be a positive int, got 2.5"):
        deploy(path, 10.0, accuracy, profile_iters=2.5)
    with pytest.raises(ValueError, match="max_queue_bytes=1000: the queue must hold at least one full batch"):
        deploy(path, 10.0, accuracy, max_queue_bytes=1000)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        deploy(bad, 10.0, accuracy)
    with pytest.raises(ValueError, match="--int8 runs on the CPU"):
        deploy(path, 10.0, accuracy, int8=True, device="cuda")
    with pytest.raises(ValueError, match="keeps no images to measure INT8 ranges on: calibrate it with .* --int8-im"):
        deploy(path, 10.0, accuracy, int8=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(ValueError, match="is in use"):
            deploy(path, 10.0, accuracy, port=taken.getsockname()[1])
        closed = taken.getsockname()[1]
    # a cluster that is not there: at once, not after minutes of Ray's retries
    with pytest.raises(ValueError, match=f"no Ray cluster answers at 127.0.0.1:{closed}: .*start a local Ray"):
        deploy(path, 10.0, accuracy, address=f"127.0.0.1:{closed}")
    with pytest.raises(ValueError, match=f"no Ray cluster answers at ray://127.0.0.1:{closed}"):
        deploy(path, 10.0, accuracy, address=f"ray://127.0.0.1:{closed}")
    with pytest.raises(ValueError, match="address 'head-node': give auto, HOST:PORT"):
        deploy(path, 10.0, accuracy, address="head-node")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed}")  # what "auto" reads first
    with pytest.raises(ValueError, match=f"no Ray cluster answers at 127.0.0.1:{closed} \\(found by 'auto'\\)"):
        deploy(path, 10.0, accuracy, address="auto")
    assert not ray.is_initialized()


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test should ``deploy`` start or join Ray: its argument errors come before."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail(f"Ray started despite a bad argument: {a} {k}"))
    yield
    assert not ray.is_initialized()


@pytest.mark.parametrize("kwargs, error, message", [
    # what `serve` refuses as flags: the same bounds and rules (plan.MAX_BATCH, MAX_PORT, MAX_REPLICAS, ...)
    ({"name": "a/b"}, ValueError, "name must be letters, digits, '_', '.' or '-' .*part of the URL.*got 'a/b'"),
    ({"name": ""}, ValueError, "name must be letters, digits"),
    ({"name": 7}, TypeError, "name must be a str"),
    ({"max_batch": 2000}, ValueError, r"max_batch must be an int in \[1, 1024\], got 2000"),
    ({"max_batch": 2.0}, TypeError, r"max_batch must be an int in \[1, 1024\], got 2.0 of type float"),
    ({"replicas": 5000}, ValueError, r"replicas must be an int in \[1, 4096\], got 5000"),
    ({"port": True}, TypeError, r"port must be an int in \[0, 65535\], got True of type bool"),
    ({"port": -1}, ValueError, r"port must be an int in \[0, 65535\], got -1"),
    ({"port": 70000}, ValueError, r"port must be an int in \[0, 65535\], got 70000"),
    ({"port": "8000"}, TypeError, r"port must be an int in \[0, 65535\], got '8000' of type str"),
    ({"host": 127}, TypeError, "host must be a str"),
    ({"miss_budget": "x"}, TypeError, "miss_budget must be a share of requests, 0 <= miss_budget < 1, got 'x'"),
    ({"miss_budget": math.nan}, ValueError, "miss_budget must be a share of requests, 0 <= miss_budget < 1, got nan"),
    ({"slo_ms": "5"}, TypeError, "slo_ms must be a positive, finite number of milliseconds, got '5' of type str"),
    ({"slo_ms": math.nan}, ValueError, "slo_ms must be a positive, finite number of milliseconds, got nan"),
    ({"accuracy": 3}, TypeError, "accuracy must be a mapping .* or the path of an `eval --json` file, got 3"),
    ({"accuracy": "/nonexistent/eval.json"}, ValueError, "--accuracy /nonexistent/eval.json: cannot read it as JSON"),
    ({"device": "tpu"}, ValueError, "device 'tpu' is not a device: use cpu, cuda or cuda:N"),
    ({"device": "mps"}, ValueError, "device 'mps': a server runs on cpu or cuda / cuda:N"),
    ({"device": 0}, TypeError, "device must be a str"),
])
def test_deploy_refuses_what_serve_refuses_before_starting_ray(checkpoint, no_ray, kwargs, error, message):
    """Each is one line naming the argument, raised before Ray starts: ``name="a/b"`` deployed "successfully" where
    no client finds it (404), max_batch=2000 profiled for minutes, port=True served on port 1, port=-1 was a raw
    OverflowError, port="8000", miss_budget="x" or a path as accuracy a raw TypeError / AttributeError."""
    path, _ = checkpoint
    args = {"slo_ms": 10.0, "accuracy": {"FFF": 90.0}, "port": 0, **kwargs}
    with pytest.raises(error, match=message) as raised:
        deploy(path, **args)
    assert isinstance(raised.value, ValueError)  # a wrong type too (BadArgumentType): what the CLI prints in a line
    assert "\n" not in str(raised.value)


def test_deploy_takes_the_accuracy_as_an_eval_json_file(checkpoint, tmp_path, monkeypatch):
    """``accuracy`` may be the path of an ``eval --json`` file, read as ``serve --accuracy`` reads it."""
    path, _ = checkpoint
    records = tmp_path / "eval.json"
    records.write_text(json.dumps([{"skip": "FFF", "accuracy": 90.0}, {"skip": "TTT", "accuracy": 88.5}]))

    class Deployed(Exception):
        pass

    def bind(*args):
        raise Deployed(args[1])  # the table each replica gets

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(serve, "start", lambda *a, **k: None)
    monkeypatch.setattr(serve, "deployment", lambda *a, **k: type("D", (), {"bind": staticmethod(bind)}))
    monkeypatch.setattr(serving_ray.RayServer, "stop", lambda self: None)
    for accuracy in (records, str(records)):
        with pytest.raises(Deployed) as deployed:
            deploy(path, 10.0, accuracy, port=0)
        assert deployed.value.args[0] == {"FFF": 90.0, "TTT": 88.5}
    (tmp_path / "bad.json").write_text('{"FF": 90.0}')
    with pytest.raises(ValueError, match="--accuracy .*bad.json: .*has 2 letters but this model has 3 skippable"):
        deploy(path, 10.0, tmp_path / "bad.json", port=0)


def test_deploy_on_cuda_without_a_gpu_here_is_refused_before_ray_starts(checkpoint, no_ray, monkeypatch):
    """A local Ray started without a GPU waited in serve.run forever for a GPU replica: CUDA must be here, with a
    GPU for each replica, and each replica sees its own GPU as cuda:0."""
    path, _ = checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' asked for but CUDA is not available: use --device cpu"):
        deploy(path, 10.0, {"FFF": 90.0}, device="cuda", port=0)
    with pytest.raises(ValueError, match="--int8 runs on the CPU \\(OpenVINO\\), not on cuda: drop --int8"):
        deploy(path, 10.0, {"FFF": 90.0}, device="cuda", int8=True, port=0)  # INT8 names its own fix
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"this machine has 1 GPU\(s\), but 2 replica\(s\) need 2 \(one GPU each\)"):
        deploy(path, 10.0, {"FFF": 90.0}, device="cuda", replicas=2, port=0)
    with pytest.raises(ValueError, match="device 'cuda:3': this machine has 1 GPU"):
        deploy(path, 10.0, {"FFF": 90.0}, device="cuda:3", port=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="device 'cuda:1': Ray gives each replica one GPU of its own.*device='cuda'"):
        deploy(path, 10.0, {"FFF": 90.0}, device="cuda:1", port=0)


@pytest.mark.parametrize("have, kwargs, message", [
    ({"CPU": 8.0}, {"device": "cuda"},
     r"the Ray cluster at '10.0.0.1:6379' has 0 GPU\(s\), but 2 replica\(s\) need 2 .*add GPU nodes"),
    ({"CPU": 8.0, "GPU": 1.0}, {"device": "cuda"}, r"has 1 GPU\(s\), but 2 replica\(s\) need 2"),
    ({"CPU": 2.0}, {"threads": 2}, r"has 2 CPU\(s\), but 2 replica\(s\) need 4 \(2 CPU\(s\) \(threads\) each\)"),
])
def test_deploy_on_a_cluster_without_the_gpus_it_needs_is_refused_once_connected(checkpoint, monkeypatch, have,
                                                                                   kwargs, message):
    """A cluster's GPUs are on its nodes, not here: deploy connects, asks the cluster's resources and refuses
    (disconnecting) what Ray Serve would wait for forever."""
    path, _ = checkpoint
    calls = []
    monkeypatch.setattr(serving_ray, "check_cluster", lambda address: None)  # no cluster here: Ray's calls faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "cuda" is not this machine's to check
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(("init", k["address"])))
    monkeypatch.setattr(ray, "cluster_resources", lambda: have)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    monkeypatch.setattr(serve, "start", lambda *a, **k: pytest.fail("served on a cluster that cannot place it"))
    with pytest.raises(ValueError, match=message):
        deploy(path, 10.0, {"FFF": 90.0}, replicas=2, address="10.0.0.1:6379", port=0, **kwargs)
    assert calls == [("init", "10.0.0.1:6379"), ("shutdown",)]


@pytest.mark.slow
def test_deploy_cuda_on_a_running_cluster_without_gpus_is_refused_at_once(checkpoint):
    """The real thing: a one-node cluster with no GPU; ``device="cuda"`` is refused once connected (before, Ray Serve
    waited forever for a GPU), and deploy disconnects; the cluster runs on."""
    from ray.cluster_utils import Cluster

    path, _ = checkpoint
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 80 * 2**20})
    try:
        with pytest.raises(ValueError, match=f"the Ray cluster at '{cluster.address}' has 0 GPU"):
            deploy(path, 10.0, {"FFF": 90.0}, replicas=1, device="cuda", address=cluster.address, port=0)
        assert not ray.is_initialized()
    finally:
        cluster.shutdown()


def infer_through(server, model, x) -> set[str]:
    """Send ``x`` row by row through ``server`` with a stock client, 8 at a time, every 12th request with an
    impossible SLO and every 12th another forcing TFT; check each answer against the torch model's output of the
    sub-network the response names and that nothing is lost; return the replicas that answered."""
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)
    assert client.is_model_ready(server.name)
    pending = []
    for i in range(len(x)):
        inp = httpclient.InferInput("input", [1, *x.shape[1:]], "FP32")
        inp.set_data_from_numpy(x[i:i + 1].numpy(), binary_data=True)
        parameters = {"slo_ms": 1e-6} if i % 12 == 5 else {"skip": "TFT"} if i % 12 == 7 else None
        pending.append(client.async_infer(server.name, [inp], parameters=parameters))
    served, refused, replicas = 0, 0, set()
    for i, request in enumerate(pending):
        try:
            result = request.get_result(timeout=60)
        except httpclient.InferenceServerException as e:
            assert i % 12 == 5 and "request refused" in str(e), (i, e)  # only the impossible SLOs
            refused += 1
            continue
        parameters = result.get_response()["parameters"]
        replicas.add(parameters["replica"])
        if i % 12 == 7:
            assert parameters["skip"] == "TFT"
        with torch.no_grad():
            expected = model(x[i:i + 1], skip=parameters["skip"])
        np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), rtol=1e-4, atol=1e-4)
        served += 1
    client.close()
    assert (served, refused) == (len(x) - len(x) // 12, len(x) // 12)  # nothing lost
    return replicas


@pytest.mark.slow
def test_ray_two_replicas_serve_the_model(checkpoint):
    path, model = checkpoint
    accuracy = {skip_to_str(s): 90.0 - sum(s) for s in model.skip_configs()}
    x = torch.randn(48, 1, 16, 16)
    with deploy(path, slo_ms=5000.0, accuracy=accuracy, replicas=2, max_batch=4, port=0, profile_iters=3) as server:
        replicas = infer_through(server, model, x)
        assert len(replicas) == 2, replicas  # both replicas answered
    assert not ray.is_initialized()
    with socket.socket() as probe:  # the proxy is gone
        assert probe.connect_ex(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) != 0


@pytest.mark.slow
def test_ray_replicas_on_two_nodes_of_a_running_cluster(checkpoint, monkeypatch):
    """The cluster path (``serve --ray-address auto``, docs/serving.md): a running Ray cluster of two nodes (two
    raylets with their own object stores, here on one machine) with one CPU each, so the two one-CPU replicas land
    one per node; ``address="auto"`` finds it through RAY_ADDRESS as ``ray start`` leaves it. Both replicas answer
    with the model's outputs; stopping deletes the application and disconnects, and the cluster runs on."""
    from ray.cluster_utils import Cluster

    path, model = checkpoint
    accuracy = {skip_to_str(s): 90.0 - sum(s) for s in model.skip_configs()}
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        with deploy(path, slo_ms=5000.0, accuracy=accuracy, replicas=2, max_batch=4, port=0, profile_iters=3,
                    address="auto") as server:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            assert ray.cluster_resources()["CPU"] == 2 and ray.available_resources().get("CPU", 0) == 0  # 1 per node
            replicas = infer_through(server, model, torch.randn(48, 1, 16, 16))
            assert len(replicas) == 2, replicas
        assert not ray.is_initialized()  # disconnected
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the cluster runs on
            assert server.app_name not in serve.status().applications  # without the application
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_ray_two_replicas_serve_int8_from_the_checkpoints_kept_images(checkpoint, tmp_path):
    """``deploy(int8=True)``: each replica reads the images ``calibrate --int8-images`` kept and builds the engine
    ``serve --int8`` builds in one process (``build_plan(int8_calibration=int8_sample(...))``, made here as the
    reference): both replicas answer with that engine's outputs, which are INT8's, not the fp32 model's."""
    pytest.importorskip("nncf", reason="pip install adaptive_kernels[openvino]")
    from adaptive_kernels.serving import build_plan
    from adaptive_kernels.serving.plan import int8_sample

    _, model = checkpoint
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}}
    kept = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1)).half()  # as calibrate keeps them
    path = save_checkpoint({"model": model.state_dict(), "model_spec": spec, INT8_SAMPLE: kept,
                            "data": {"name": "synthetic", "image_size": [16, 16]}}, tmp_path / "calibrated.pt")
    accuracy = {skip_to_str(s): 90.0 - sum(s) for s in model.skip_configs()}
    reference = build_plan(model, "ref", (1, 16, 16), max_batch=1, accuracy=accuracy, profile_iters=1,
                           int8_calibration=int8_sample(path)).engine
    assert (reference.mechanism, reference.precision) == ("openvino", "int8")
    x = torch.randn(24, 1, 16, 16)
    with deploy(path, slo_ms=5000.0, accuracy=accuracy, replicas=2, max_batch=4, port=0, profile_iters=2,
                int8=True) as server:
        address = server.url.removeprefix("http://")
        client = httpclient.InferenceServerClient(address, concurrency=8)
        assert client.get_model_metadata(server.name)["platform"] == "adaptive_kernels_openvino"
        pending = []
        for i in range(len(x)):
            inp = httpclient.InferInput("input", [1, 1, 16, 16], "FP32")
            inp.set_data_from_numpy(x[i:i + 1].numpy(), binary_data=True)
            parameters = {"skip": skip_to_str(model.skip_configs()[i % 8])} if i % 3 == 0 else None
            pending.append(client.async_infer(server.name, [inp], parameters=parameters))
        off_fp32: dict[str, float] = {}  # replica -> the largest distance of its outputs from the fp32 model's
        for i, request in enumerate(pending):
            result = request.get_result(timeout=120)
            parameters = result.get_response()["parameters"]
            got = torch.from_numpy(result.as_numpy("logits").copy())
            torch.testing.assert_close(got, reference(x[i:i + 1], skip=parameters["skip"]), rtol=1e-4, atol=1e-4)
            with torch.no_grad():
                fp32 = model(x[i:i + 1], skip=parameters["skip"])
            replica = parameters["replica"]
            off_fp32[replica] = max(off_fp32.get(replica, 0.0), (got - fp32).abs().max().item())
        client.close()
        assert len(off_fp32) == 2, off_fp32  # both replicas answered
        assert min(off_fp32.values()) > 1e-3, off_fp32  # each one quantized (fp32 engines agree within 1e-4)
    assert not ray.is_initialized()
