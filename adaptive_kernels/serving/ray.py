"""Scale-out on Ray Serve: N replicas of the same server behind one address, one replica = one engine + its
scheduler, each serving the Open Inference Protocol routes of :func:`.http.create_app` (Ray Serve's FastAPI ingress)
and naming itself in every response's ``replica`` parameter. Ray's proxy spreads requests over the replicas; each
replica batches and picks sub-networks for its own queue. Needs the ``[serve]`` extra (``ray[serve]``); nothing
else in the package imports this module.

``deploy(checkpoint, slo_ms, accuracy, replicas=N)`` starts a local Ray (``replicas x threads`` CPUs, no dashboard,
HTTP on 127.0.0.1) or joins a cluster (``address="auto"``), runs the deployment and returns a :class:`RayServer`;
its ``stop()`` ends what ``deploy`` started; ``int8=True``: each replica serves INT8 on OpenVINO. Running it on a
cluster: docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import ray
import torch
from ray import serve

from ..models.skip import SkipLike, skip_to_str
from .http import SWITCH_INTERVAL_S, bind_socket, create_app
from .latency import MISS_BUDGET
from .plan import (
    MAX_BATCH,
    MAX_PORT,
    MAX_REPLICAS,
    BadArgumentType,
    accuracy_table,
    build_plan,
    check_int,
    check_int8_device,
    check_model_name,
    check_number,
    check_slo_ms,
    checkpoint_model,
    int8_sample,
    serving_device,
)
from .scheduler import QUEUE_BYTES, Scheduler, check_queue_bytes

#: the object store of a Ray started here (bytes): replicas exchange only requests and answers through it
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
#: how long ``check_cluster`` waits for a cluster's address to accept a connection (Ray itself retries for minutes)
CLUSTER_CONNECT_TIMEOUT_S = 5.0


def check_cluster(address: str | None) -> None:
    """Fail at once, before any work, when ``address`` (``deploy``'s; ``serve --ray-address``) reaches no running
    Ray cluster: "auto" must find one (RAY_ADDRESS, or the cluster ``ray start`` recorded on this machine), and
    ``HOST:PORT`` / ``ray://HOST:PORT`` must accept a TCP connection within CLUSTER_CONNECT_TIMEOUT_S (ray.init
    would log retries for minutes). None (start a local Ray) passes. Raises ValueError, one line."""
    if address is None:
        return
    target = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment
        except ImportError:  # another Ray: ray.init finds it or fails, wrapped in deploy
            return
        try:
            target = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise ValueError("address 'auto' finds no running Ray cluster (RAY_ADDRESS is not set and `ray start` "
                             "has recorded none on this machine): start one (`ray start --head`), set RAY_ADDRESS "
                             "or give HOST:PORT, or give no address to start a local Ray") from None
        if not isinstance(target, str) or target == "auto":
            return
    host, colon, port = target.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"address {address!r}: give auto, HOST:PORT (the head node's GCS, as `ray start --head` "
                         f"prints it), ray://HOST:PORT (Ray Client), or no address to start a local Ray")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CLUSTER_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reached = "" if target == address else f" (found by {address!r})"
        raise ValueError(f"no Ray cluster answers at {target}{reached}: {e.strerror or e}; check the head node's "
                         f"address and port (`ray start --head` prints them), or give no address to start a local "
                         f"Ray") from None


def check_resources(have: Mapping[str, float], replicas: int, threads: int, gpu: bool, where: str) -> None:
    """Refuse, in one line, a deployment the Ray resources ``have`` (``ray.cluster_resources()``; a local Ray's:
    this machine's GPUs) cannot place: each of the ``replicas`` takes ``threads`` CPUs and, with ``gpu``, one GPU.
    Ray Serve would otherwise wait forever for a node that has them (``where``: the cluster, as named in the
    message). Resources an autoscaler would add later are not counted."""
    need = {"CPU": replicas * threads, **({"GPU": replicas} if gpu else {})}
    for resource, needed in need.items():
        got = have.get(resource, 0)
        if got < needed:
            each = "one GPU" if resource == "GPU" else f"{threads} CPU(s) (threads)"
            fix = ("add GPU nodes, give fewer replicas or device='cpu'" if resource == "GPU"
                   else "add nodes, or give fewer replicas or threads")
            raise ValueError(f"{where} has {got:g} {resource}(s), but {replicas} replica(s) need {needed} ({each} "
                             f"each), and Ray Serve would wait for them forever: {fix}")


@serve.ingress()
class Replica:
    """One engine, its scheduler and the HTTP routes, built in the replica's process: the checkpoint is read and the
    engine compiled and profiled there (``checkpoint`` must be readable at that path on every node). ``int8``: the
    engine is OpenVINO INT8, its ranges measured on the images ``calibrate --int8-images`` kept in the checkpoint,
    which the replica reads from there itself (as ``serve --int8`` in one process does; nothing goes through Ray's
    object store). The plan (``describe()``) goes to the replica's log."""

    def __init__(self, checkpoint: str, accuracy: dict[str, float], slo_ms: float, max_batch: int, name: str | None,
                 device: str, profile_iters: int, threads: int, int8: bool = False,
                 miss_budget: float = MISS_BUDGET, max_queue_bytes: int = QUEUE_BYTES) -> None:
        torch.set_num_threads(threads)  # the CPU engine takes torch's thread count
        model, model_name, image_shape = checkpoint_model(checkpoint)
        plan = build_plan(model, name or model_name, image_shape, max_batch=max_batch, accuracy=accuracy, device=device,
                          profile_iters=profile_iters, int8_calibration=int8_sample(checkpoint) if int8 else None)
        plan.check_slo(slo_ms)
        logging.getLogger("ray.serve").info("plan:\n%s", plan.describe())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.scheduler = Scheduler(plan.engine, plan.example_input, plan.latency, plan.accuracy,
                                   miss_budget=miss_budget, max_queue_bytes=max_queue_bytes)
        self._app = create_app(self.scheduler, plan.name, slo_ms, replica=self.replica)
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # as HttpServer.run: the dispatcher gets the GIL in time

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def __del__(self) -> None:
        # Ray Serve calls this after the replica's last request: answer what is still queued, stop the dispatcher.
        # A constructor that failed (e.g. the SLO check) left no scheduler.
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()


def _replica_error(app_name: str) -> str | None:
    """The last line of the exception a replica of ``app_name`` failed with (``"ValueError: ..."``), or None."""
    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get(app_name) if app else None
    raised = [line for line in (deployment.message if deployment else "").splitlines()
              if re.match(r"[A-Za-z_.]+(Error|Exception): ", line)]
    return raised[-1] if raised else None


class RayServer:
    """A running deployment: ``url`` (``http://host:port``), ``name`` (the model's name in the routes). ``stop()``
    (or leaving a ``with`` block) deletes the application, shuts Serve and Ray down when ``deploy`` started Ray
    (``started_ray``), and disconnects from a cluster ``deploy`` connected to (``connected``)."""

    def __init__(self, url: str, name: str, app_name: str, *, started_ray: bool, connected: bool) -> None:
        self.url, self.name, self.app_name = url, name, app_name
        self.started_ray, self.connected = started_ray, connected

    def stop(self) -> None:
        if not ray.is_initialized():
            return
        try:
            serve.delete(self.app_name)
            if self.started_ray:
                serve.shutdown()
        finally:
            if self.connected:
                ray.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy(checkpoint: str | os.PathLike, slo_ms: float, accuracy: Mapping[SkipLike, float] | str | os.PathLike, *,
           replicas: int = 2, max_batch: int = 16, name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
           address: str | None = None, threads: int = 1, device: str = "cpu", profile_iters: int = 20,
           int8: bool = False, miss_budget: float = MISS_BUDGET, max_queue_bytes: int = QUEUE_BYTES) -> RayServer:
    """Serve ``checkpoint`` on ``replicas`` Ray Serve replicas behind ``host:port`` (port 0: a free one); returns
    once every replica has compiled and profiled its engine.

    accuracy: ``{skip: accuracy}`` of the servable sub-networks, or the path of an ``eval --json`` file (as
    ``serve --accuracy`` reads it: ``load_accuracy``); threads: CPU threads (and Ray CPUs) per replica; device "cpu",
    or "cuda" (each replica gets one GPU of its own, its cuda:0; "auto": "cuda" when this machine has a GPU).
    int8: each replica serves INT8 on OpenVINO (CPU only), ranged on the images ``calibrate --int8-images`` kept in
    the checkpoint (``accuracy`` should then be the INT8 engine's, as ``serve`` measures it: ``compile_engine``
    builds the same engine). address: "auto" or "HOST:PORT" or "ray://..." joins a running cluster, where the
    package and the checkpoint path must exist on every node; None uses the Ray this process already runs, else
    starts a local one (``address="local"``: never a cluster found by chance) with ``replicas x threads`` CPUs (and
    this machine's GPUs for "cuda"), a 128 MiB object store and no dashboard, whose workers import this
    ``adaptive_kernels``. max_queue_bytes: each replica's queue bound (``Scheduler``).

    Checked as ``serve`` checks its flags, before Ray starts: a bad argument is one line, a ValueError (a wrong
    type: ``plan.BadArgumentType``, a TypeError and a ValueError) naming it: replicas in [1, MAX_REPLICAS],
    max_batch in [1, MAX_BATCH], port in [0, MAX_PORT], a name that is one URL segment, a miss_budget in [0, 1), a
    device that is cpu or cuda and, for a Ray started here, one this machine has (as many GPUs as replicas), a
    checkpoint that cannot be read (with ``int8``: one that keeps no images, or a device other than the CPU), a
    taken port, an ``address`` where no cluster answers (:func:`check_cluster`). A cluster (or the Ray this process
    runs) without the CPUs or GPUs the replicas need is refused once connected (:func:`check_resources`), not waited
    for; a replica's start-up error (e.g. an SLO below the fastest sub-network) is raised here.
    """
    replicas = check_int(replicas, "replicas", 1, MAX_REPLICAS)
    threads = check_int(threads, "threads", 1)
    max_batch = check_int(max_batch, "max_batch", 1, MAX_BATCH)
    profile_iters = check_int(profile_iters, "profile_iters", 1)
    port = check_int(port, "port", 0, MAX_PORT)
    slo_ms = check_slo_ms(slo_ms)
    miss_budget = check_number(miss_budget, "miss_budget", "a share of requests, 0 <= miss_budget < 1",
                               lambda v: 0 <= v < 1)
    if name is not None:
        check_model_name(name)
    if not isinstance(host, str):
        raise BadArgumentType(f"host must be a str (an address to listen on, e.g. '127.0.0.1'), got {host!r}")
    local = address is None and not ray.is_initialized()  # a Ray started here, on this machine's CPUs and GPUs
    device = serving_device(device, here=local and not int8)  # int8: check_int8_device names the fix
    if int8:
        check_int8_device(device)
    gpu = torch.device(device).type == "cuda"
    if gpu and torch.device(device).index not in (None, 0):
        raise ValueError(f"device {device!r}: Ray gives each replica one GPU of its own, which it sees as cuda:0: "
                         f"give device='cuda'")
    device = "cuda" if gpu else device
    check_cluster(address)  # a cluster that is not there fails now, not after minutes of Ray's retries
    model, model_name, image_shape = checkpoint_model(checkpoint)  # a bad checkpoint fails here, not in every replica
    check_queue_bytes(max_queue_bytes, max_batch, image_shape)  # each replica's Scheduler takes it
    if int8:
        int8_sample(checkpoint)  # it keeps the images each replica will range INT8 on
    table = {skip_to_str(s): a for s, a in accuracy_table(accuracy, model.num_skippable_stages).items()}
    with bind_socket(host, port) as sock:  # a taken port fails now; port 0 picks a free one
        port = sock.getsockname()[1]
    if local and gpu:  # the Ray started here gets replicas x threads CPUs and this machine's GPUs
        check_resources({"CPU": replicas * threads, "GPU": torch.cuda.device_count()}, replicas, threads, gpu,
                        "this machine")
    connected = not ray.is_initialized()
    started_ray = connected and address is None
    if started_ray:
        package_root = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=replicas * threads, num_gpus=None if gpu else 0,
                 include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=False)
    elif connected:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:  # gone since check_cluster, or a Ray that check_cluster could not ask
            raise ValueError(f"address {address!r}: {e}") from None
    if not started_ray:  # a cluster, or the Ray this process runs: can it place the replicas at all?
        try:
            check_resources(ray.cluster_resources(), replicas, threads, gpu,
                            f"the Ray cluster at {address!r}" if address else "the Ray this process runs")
        except ValueError:
            if connected:
                ray.shutdown()
            raise
    name = name or model_name
    app_name = f"adn-{name}"
    server = RayServer(f"http://{host}:{port}", name, app_name, started_ray=started_ray, connected=connected)
    try:
        serve.start(http_options={"host": host, "port": port})
        actor = {"num_cpus": threads, "num_gpus": 1 if gpu else 0}
        app = serve.deployment(Replica, name=app_name, num_replicas=replicas, ray_actor_options=actor,
                               max_constructor_retry_count=replicas).bind(
            str(Path(checkpoint).resolve()), table, float(slo_ms), max_batch, name, device, profile_iters, threads,
            bool(int8), float(miss_budget), max_queue_bytes)
        serve.run(app, name=app_name, route_prefix="/")
    except RuntimeError:
        error = _replica_error(app_name)
        server.stop()
        if error is None:
            raise
        if error.startswith("ValueError: "):  # the replica's start-up check (e.g. an SLO below the fastest net)
            raise ValueError(error.removeprefix("ValueError: ")) from None
        raise RuntimeError(f"a replica failed to start: {error}") from None
    except BaseException:
        server.stop()
        raise
    return server
