"""``python -m adaptive_kernels eval``: accuracy, MACs and measured latency of every sub-network of a checkpoint;
``latency_source``: what the latency column times (``eval`` and ``demo``)."""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from .._files import check_output_file, write_text
from ..engine import compile
from ..engine.ort.engine import onnxruntime_unavailable
from ..models.footprint import check_fits, memory_needed
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..training.data import build_data
from ..training.distributed import resolve_device
from ..training.evaluate import evaluate_subnets, format_table
from .checks import (
    HelpFormatter,
    add_checkpoint_args,
    add_data_args,
    auto_threads,
    checkpoint_data,
    int_range,
    path_text,
    positive_int,
)


def latency_source(model: nn.Module, input_shape: tuple[int, int, int, int], device: torch.device | str) -> nn.Module:
    """What the latency column times, called like the model: on the CPU the CPU engine (the one ONNX graph on ONNX
    Runtime, what a deployment runs, so ``select_skip`` picks from real latencies) when onnxruntime is installed,
    else the eager model (also on CUDA)."""
    if torch.device(device).type != "cpu" or onnxruntime_unavailable() is not None:
        return model
    return compile(model, torch.zeros(input_shape), mechanism="onnxruntime")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``eval`` sub-command."""
    e = sub.add_parser("eval", help="evaluate every sub-network of a checkpoint", formatter_class=HelpFormatter,
                       description="Accuracy, MACs and measured latency of every sub-network of a checkpoint.")
    add_checkpoint_args(e)
    add_data_args(e, from_checkpoint=True, auto_threads=True)
    e.add_argument("--json", type=path_text, help="also write [{skip, accuracy, macs, latency_us, ...}, ...] to this file")
    e.add_argument("--batch-size", type=positive_int, default=500, help="accuracy batch size")
    e.add_argument("--latency-batch", type=positive_int, default=64,
                   help="batch size of the latency measurement (at batch 1 a CPU mostly measures per-layer "
                        "overheads)")
    e.add_argument("--latency-repeats", type=int_range(1, 10000), default=30,
                   help="timed rounds; each round runs every sub-network once")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)  # a corrupt or missing file is reported before the data is read
    checkpoint_data(args, state)
    data = build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                      num_workers=args.workers)
    model, state, weights = model_from_checkpoint(args.checkpoint, state=state, weights=args.weights, data=data)
    spec, kwargs = state["model_spec"], state["model_spec"]["kwargs"]
    batch = max(min(args.batch_size, data.num_test), args.latency_batch)
    check_fits(memory_needed(spec["name"], kwargs, (batch, data.in_chans, *data.image_size)),
               f"evaluating {spec['name']} on batches of {batch} {'x'.join(map(str, data.image_size))} images",
               "lower --batch-size / --latency-batch")
    model.to(device)
    if args.threads == "auto":
        auto_threads(model, data, device)  # before the CPU engine is built: ONNX Runtime takes torch's count
    timed = latency_source(model, (args.latency_batch, data.in_chans, *data.image_size), device)
    results = evaluate_subnets(model, data, device=device, batch_size=args.batch_size,
                               latency_batch=args.latency_batch, latency_repeats=args.latency_repeats,
                               latency_model=timed)
    calibrated = ", calibrated" if model.is_calibrated else ""
    print(f"{spec['name']} {kwargs} from {args.checkpoint} ({weights} weights{calibrated}), {data.name} test set "
          f"({data.num_test} images), {device}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}")
    print(format_table(results, latency_batch=args.latency_batch))
    if args.json:
        write_text(args.json, json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
