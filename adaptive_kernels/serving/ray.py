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
import math
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
from .latency import MISS_BUDGET, ReserveShare
from .plan import build_plan, check_int8_device, checkpoint_model, int8_sample
from .policy import parse_accuracy
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


def deploy(checkpoint: str | os.PathLike, slo_ms: float, accuracy: Mapping[SkipLike, float], *, replicas: int = 2,
           max_batch: int = 16, name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
           address: str | None = None, threads: int = 1, device: str = "cpu", profile_iters: int = 20,
           int8: bool = False, miss_budget: float = MISS_BUDGET, max_queue_bytes: int = QUEUE_BYTES) -> RayServer:
    """Serve ``checkpoint`` on ``replicas`` Ray Serve replicas behind ``host:port`` (port 0: a free one); returns
    once every replica has compiled and profiled its engine.

    accuracy: ``{skip: accuracy}`` of the servable sub-networks (as ``load_accuracy`` reads it); threads: CPU threads
    (and Ray CPUs) per replica; device "cuda" gives each replica one GPU. int8: each replica serves INT8 on OpenVINO
    (CPU only), ranged on the images ``calibrate --int8-images`` kept in the checkpoint (``accuracy`` should then be
    the INT8 engine's, as ``serve`` measures it: ``compile_engine`` builds the same engine). address: "auto" or
    "HOST:PORT" or "ray://..." joins a running cluster, where the package and the checkpoint path must exist on every
    node; None uses the Ray this process already runs, else starts a local one (``address="local"``: never a cluster
    found by chance) with ``replicas x threads`` CPUs, a 128 MiB object store and no dashboard, whose workers import
    this ``adaptive_kernels``. A bad argument, a checkpoint that cannot be read (with ``int8``: one that keeps no
    images, or a device other than the CPU), a miss_budget outside [0, 1) (each replica's ``Scheduler`` takes it), a
    taken port or an ``address`` where no cluster answers (:func:`check_cluster`) is a ValueError before Ray starts;
    a replica's start-up error (e.g. an SLO below the fastest sub-network) is raised here. max_queue_bytes: each
    replica's queue bound (``Scheduler``).
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    for what, value in (("threads", threads), ("max_batch", max_batch), ("profile_iters", profile_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float)) or not 0 < slo_ms < math.inf:
        raise ValueError(f"slo_ms must be a positive, finite number of milliseconds, got {slo_ms!r}")
    ReserveShare(budget=miss_budget)  # a bad budget fails here, not in every replica
    check_cluster(address)  # a cluster that is not there fails now, not after minutes of Ray's retries
    model, model_name, image_shape = checkpoint_model(checkpoint)  # a bad checkpoint fails here, not in every replica
    check_queue_bytes(max_queue_bytes, max_batch, image_shape)  # each replica's Scheduler takes it
    if int8:
        check_int8_device(device)
        int8_sample(checkpoint)  # it keeps the images each replica will range INT8 on
    table = {skip_to_str(s): a for s, a in parse_accuracy(accuracy, model.num_skippable_stages).items()}
    with bind_socket(host, port) as sock:  # a taken port fails now; port 0 picks a free one
        port = sock.getsockname()[1]
    connected = not ray.is_initialized()
    started_ray = connected and address is None
    if started_ray:
        package_root = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=replicas * threads, num_gpus=None if device.startswith("cuda") else 0,
                 include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=False)
    elif connected:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:  # gone since check_cluster, or a Ray that check_cluster could not ask
            raise ValueError(f"address {address!r}: {e}") from None
    name = name or model_name
    app_name = f"adn-{name}"
    server = RayServer(f"http://{host}:{port}", name, app_name, started_ray=started_ray, connected=connected)
    try:
        serve.start(http_options={"host": host, "port": port})
        actor = {"num_cpus": threads, "num_gpus": 1 if device.startswith("cuda") else 0}
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
