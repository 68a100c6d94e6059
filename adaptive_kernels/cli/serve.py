"""``python -m adaptive_kernels serve``: an SLO-aware HTTP server for a checkpoint (the Open Inference Protocol,
Prometheus metrics); profiles the engine, prints the plan, serves until Ctrl-C / SIGTERM, then answers what is
queued. ``--ray-replicas N``: N Ray Serve replicas of that server behind one address. ``--int8``: INT8 on OpenVINO,
in one process or in each replica. Needs the [serve] extra."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch

from ..serving import Scheduler, build_plan, checkpoint_model, load_accuracy
from ..serving.latency import MISS_BUDGET
from ..serving.plan import (
    MAX_BATCH,
    MAX_PORT,
    MAX_REPLICAS,
    check_int8_device,
    compile_engine,
    int8_sample,
    measure_accuracies,
    serving_device,
)
from ..serving.scheduler import QUEUE_BYTES, check_queue_bytes
from ..training.checkpoint import load_checkpoint
from ..training.data import build_data
from .checks import (
    HelpFormatter,
    add_data_args,
    checkpoint_data,
    device_name,
    float_range,
    int_range,
    model_name,
    path_text,
    positive_float,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` sub-command."""
    s = sub.add_parser("serve", help="serve a checkpoint over HTTP, picking the sub-network per batch to meet an SLO",
                       formatter_class=HelpFormatter,
                       description="An SLO-aware HTTP server for a checkpoint (Open Inference Protocol / KServe v2, "
                                   "Prometheus metrics at /metrics): profiles the engine, prints the plan, serves "
                                   "until Ctrl-C or SIGTERM, then answers what is queued. Needs the [serve] extra.")
    s.add_argument("--checkpoint", type=path_text, required=True, help="a last.pt / calibrated.pt written by train, demo or calibrate")
    s.add_argument("--slo-ms", type=positive_float, required=True,
                   help="latency objective of a request that sets none (its slo_ms parameter)")
    s.add_argument("--accuracy", type=path_text, help="eval --json output (or {\"TFF\": accuracy, ...}): the sub-networks it lists are "
                                      "served; default: measure every sub-network on --data now (by default the "
                                      "checkpoint's dataset)")
    add_data_args(s, from_checkpoint=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int_range(0, MAX_PORT), default=8000, help="port (0: any free port)")
    s.add_argument("--max-batch", type=int_range(1, MAX_BATCH), default=16,
                   help="the most inputs one engine call takes")
    s.add_argument("--name", type=model_name, help="model name in the protocol's URLs (default: the checkpoint's model name)")
    s.add_argument("--device", type=device_name, default="cpu", help="cpu (ONNX Runtime engine) or cuda / cuda:N")
    s.add_argument("--int8", action="store_true",
                   help="serve INT8 on OpenVINO (CPU; the [openvino] extra), each sub-network's ranges measured on the "
                        "images `calibrate --int8-images N` kept in the checkpoint")
    s.add_argument("--profile-iters", type=positive_int, default=20, help="timed runs per sub-network and batch size")
    s.add_argument("--miss-budget", type=float_range(0.0, 1.0, high_open=True), default=MISS_BUDGET,
                   help="the share of requests the policy may miss while it spends slack on accuracy (0: none, "
                        "the most cautious reserve; see docs/serving.md)")
    s.add_argument("--max-queue-mb", type=int_range(1, 1 << 20), default=QUEUE_BYTES >> 20,
                   help="the most MiB the queued requests' inputs may take (float32); past it a request is refused "
                        "at once (HTTP 503: the server is past its capacity)")
    s.add_argument("--ray-replicas", type=int_range(1, MAX_REPLICAS),
                   help="serve on N Ray Serve replicas (one engine each, --threads CPUs each) behind --host:--port "
                        "instead of one process; see docs/serving.md")
    s.add_argument("--ray-address", help="with --ray-replicas: the Ray cluster to join (auto: the one `ray start` "
                                         "began here); default: start a local Ray on 127.0.0.1 and stop it after")
    s.set_defaults(func=run)


def _progress(line: str) -> None:
    """A phase line of serve, on stderr with the package's own (``[compile] ...``, ``[profile] ...``): stdout keeps
    the plan."""
    print(f"[serve] {line}", file=sys.stderr, flush=True)


def _data(args: argparse.Namespace):
    """The dataset that measures the sub-networks' accuracy (no --accuracy): --data, or the checkpoint's."""
    checkpoint_data(args, load_checkpoint(args.checkpoint))
    return build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                      num_workers=args.workers)


def run(args: argparse.Namespace) -> int:
    """SIGTERM (``timeout``, CI, a process manager) during the start-up ends it as Ctrl-C does (``error:
    interrupted``, temporary files removed); once serving, the server's own handler stops it gracefully."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None  # KeyboardInterrupt
    try:
        return _run(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    if args.accuracy:
        given = [flag for flag, value in (("--data", args.data), ("--data-dir", args.data_dir),
                                          ("--image-size", args.image_size), ("--test-subset", args.test_subset))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} choose the data that measures the accuracies, which --accuracy "
                             f"gives: drop {'them' if len(given) > 1 else 'it'}, or drop --accuracy to measure now")
    try:
        from ..serving.http import HttpServer, bind_socket, create_app
        if args.ray_replicas:
            from ..serving.ray import check_cluster, deploy
    except ImportError as e:
        raise ImportError(f"serve needs the [serve] extra ({e.name} is not installed): "
                          f"pip install 'adaptive_kernels[serve]'") from None
    if args.ray_address and not args.ray_replicas:
        raise ValueError("--ray-address needs --ray-replicas N (the replicas to run on that cluster)")
    if args.ray_replicas:
        check_cluster(args.ray_address)  # before measuring accuracies or profiling: Ray would retry for minutes
    int8 = int8_sample(args.checkpoint) if args.int8 else None  # before any work: the checkpoint must keep them
    device = serving_device(args.device, here=not args.int8)  # as build_plan and deploy check it
    if args.int8:
        check_int8_device(device)
    sock = bind_socket(args.host, args.port)  # a taken port fails now, not after profiling
    if args.ray_replicas:
        sock.close()  # Ray's proxy listens there
        return _run_ray(args, deploy, device, int8)
    try:
        _progress(f"loading {args.checkpoint} ...")
        data = None if args.accuracy else _data(args)
        model, name, image_shape = checkpoint_model(args.checkpoint, data)
        check_queue_bytes(args.max_queue_mb << 20, args.max_batch, image_shape, f"--max-queue-mb {args.max_queue_mb}")
        accuracy = load_accuracy(args.accuracy, model.num_skippable_stages) if args.accuracy else None
        plan = build_plan(model, args.name or name, image_shape, max_batch=args.max_batch, accuracy=accuracy,
                          data=data, device=device, profile_iters=args.profile_iters, int8_calibration=int8,
                          progress=_progress)
        plan.check_slo(args.slo_ms)
    except BaseException:
        sock.close()
        raise
    print(plan.describe())
    scheduler = Scheduler(plan.engine, plan.example_input, plan.latency, plan.accuracy, miss_budget=args.miss_budget,
                          max_queue_bytes=args.max_queue_mb << 20)
    server = HttpServer(create_app(scheduler, plan.name, args.slo_ms), sock)
    try:
        server.listen()  # connections made before were refused: none waited through the start-up
        address = f"[{args.host}]:{server.port}" if ":" in args.host else f"{args.host}:{server.port}"  # IPv6
        _progress(f"ready on {address}: {plan.name} at http://{address}/v2/models/{plan.name} (SLO "
                  f"{args.slo_ms:g} ms, max batch {args.max_batch}); metrics at /metrics; Ctrl-C stops")
        server.run()
    finally:
        scheduler.close()
        c = scheduler.stats()
        _progress(f"stopped: {c.submitted} requests, {c.served} served ({c.met} within SLO), {c.refused} refused, "
                  f"{c.failed} failed")
    return 0


def _run_ray(args: argparse.Namespace, deploy, device: str, int8: torch.Tensor | None) -> int:
    """``serve --ray-replicas N``: measure the accuracies here when --accuracy is not given, deploy, serve until
    Ctrl-C / SIGTERM, then stop the deployment (and the local Ray it started).

    With ``int8`` (the images the checkpoint keeps) each replica builds the INT8 engine from those images itself,
    and the accuracies are measured here, once, through one more build of that engine: the same model and images
    give the same engine in every process (``compile_engine``), so they are each replica's own. Measuring in each
    replica instead would run the whole test split once per replica on the replicas' CPUs and need the dataset on
    every node; this costs one INT8 build more and keeps the dataset on this machine, as for fp32."""
    data = None if args.accuracy else _data(args)
    model, _, image_shape = checkpoint_model(args.checkpoint, data)
    check_queue_bytes(args.max_queue_mb << 20, args.max_batch, image_shape, f"--max-queue-mb {args.max_queue_mb}")
    if args.accuracy:
        accuracy = load_accuracy(args.accuracy, model.num_skippable_stages)
    elif int8 is not None:
        _progress(f"compiling the INT8 engine here to measure the accuracies through it ({len(int8)} kept images) ...")
        engine = compile_engine(model, torch.zeros((1, *image_shape)), int8_calibration=int8)
        accuracy = measure_accuracies(model, data, scorer=engine, progress=_progress)
        del engine
    else:
        accuracy = measure_accuracies(model, data, device=device, progress=_progress)
    engine_line = "its INT8 engine on OpenVINO from the checkpoint's kept images" if int8 is not None else "its engine"
    _progress(f"starting {args.ray_replicas} Ray Serve replicas (each compiles {engine_line} and profiles it) ...")
    server = deploy(args.checkpoint, args.slo_ms, accuracy, replicas=args.ray_replicas, max_batch=args.max_batch,
                    name=args.name, host=args.host, port=args.port, address=args.ray_address,
                    threads=args.threads or 1, device=device, profile_iters=args.profile_iters,
                    int8=int8 is not None, miss_budget=args.miss_budget, max_queue_bytes=args.max_queue_mb << 20)
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _progress(f"ready on {args.host}:{args.port}: {server.name} at {server.url}/v2/models/{server.name} "
                  f"({args.ray_replicas} Ray Serve replicas{', INT8 on OpenVINO' if int8 is not None else ''}, "
                  f"SLO {args.slo_ms:g} ms, max batch {args.max_batch}); Ctrl-C stops")
        while not stop.wait(0.5):  # timed: the OS may deliver the signal to a Ray thread, which wakes no wait
            pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        server.stop()
        _progress("stopped: each replica answered what it had queued")
    return 0
