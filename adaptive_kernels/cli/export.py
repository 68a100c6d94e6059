"""``python -m adaptive_kernels export``: write an ONNX (one graph, or one sub-network) or a torch.export file
and check it against the model, sub-network by sub-network, before reporting success."""

from __future__ import annotations

import argparse

import torch

from .._files import atomic_path, check_output_file
from ..export import FORMATS, TOLERANCE, export_onnx, export_pt2, verify_onnx
from ..models import list_models
from ..models.base import ADNModel
from ..models.footprint import check_fits, memory_needed
from ..models.skip import skip_to_str
from ..numerics import relative_error
from ..training.checkpoint import model_from_checkpoint
from .checks import (
    HelpFormatter,
    build_model,
    check_image_size,
    check_model_args,
    int_range,
    parse_model_args,
    path_text,
    positive_int,
    thread_count,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` on the CLI's sub-parsers."""
    p = sub.add_parser("export", help="export to ONNX (every sub-network in one graph) or torch.export, verified",
                       formatter_class=HelpFormatter, description="Write an ONNX file (every sub-network in one graph, or --skip's alone) or a torch.export file, "
                       "and check it against the model, sub-network by sub-network, before it replaces --out.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=f"registered model with fresh weights ({', '.join(list_models())})")
    source.add_argument("--checkpoint", type=path_text, help="a last.pt written by train or demo (its EMA weights when it has them)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument for --model, repeatable (e.g. num_classes=10)")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="onnx: ONNX (one graph with a mask input, or --skip's sub-network alone); "
                        "pt2: torch.export of one static sub-network (torch.export.save)")
    p.add_argument("--skip", help="export this sub-network alone (super, base or T/F letters); "
                                  "default: onnx every sub-network in one graph, pt2 the super-net")
    p.add_argument("--image-size", type=positive_int, help="input height = width (default: the checkpoint's, or 224)")
    p.add_argument("--batch-size", type=int_range(1, 256), default=1,
                   help="batch of the example input (the batch stays dynamic: the file runs any batch)")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch and ONNX Runtime (default: torch's choice)")
    p.add_argument("--out", type=path_text, required=True, help="file to write, e.g. model.onnx / model.pt2")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> tuple[ADNModel, dict, int | None]:
    """The model, its spec and the image size it was trained at (None: unknown)."""
    if args.model:
        spec = {"name": args.model, "kwargs": parse_model_args(args.model_arg)}
        check_model_args(args.model, spec["kwargs"])
        return build_model(spec), spec, None
    if args.model_arg:
        raise ValueError("--model-arg goes with --model; a checkpoint records its own model arguments")
    model, state, _ = model_from_checkpoint(args.checkpoint)
    size = state.get("data", {}).get("image_size")
    return model, state["model_spec"], (size[0] if size else None)


#: the file names each format's files go by: an --out of the other format's is a mix-up, refused
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}


def run(args: argparse.Namespace) -> int:
    out = check_output_file(args.out, "--out")
    other = next((f for f, suffix in SUFFIXES.items() if f != args.format and out.suffix == suffix), None)
    if other is not None:
        raise ValueError(f"--out {out} has the suffix of --format {other} files, but --format {args.format} was "
                         f"asked for: give --out {out.with_suffix(SUFFIXES[args.format])} or --format {other}")
    model, spec, trained_size = _load(args)
    model.eval()
    size = args.image_size or getattr(model, "image_size", None) or trained_size or 224
    check_image_size(model, spec["name"], size)
    check_fits(memory_needed(spec["name"], spec["kwargs"], (args.batch_size + 1, model.in_chans, size, size)),
               f"exporting {spec['name']} at batch {args.batch_size + 1} (the check's) and {size}x{size} images",
               "lower --image-size / --batch-size")
    x = torch.randn(args.batch_size, model.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    # the check runs another batch size than the traced one, so a batch baked into the graph would show
    check = torch.randn(args.batch_size + 1, model.in_chans, size, size, generator=torch.Generator().manual_seed(1))
    # Written beside --out and checked there: a file that fails the check never replaces a good one.
    with atomic_path(out) as tmp:
        if args.format == "onnx":
            export_onnx(model, tmp, x, skip=args.skip)
            skips = None if args.skip is None else [args.skip]
            errors = verify_onnx(tmp, model, check, skips)
            checked_by = "ONNX Runtime"
        else:
            skip = model.parse_skip(args.skip)
            export_pt2(model, tmp, x, skip=skip)
            with torch.no_grad():
                with open(tmp, "rb") as f:  # by its name (not .pt2) torch would warn
                    got = torch.export.load(f).module()(check)
                errors = {skip_to_str(skip): relative_error(got, model(check, skip))}
            checked_by = "torch.export.load"
        what = "every sub-network in one graph" if args.format == "onnx" and args.skip is None else "one sub-network"
        print(f"{type(model).__name__} ({what}), input (N, {model.in_chans}, {size}, {size}) -> {out} "
              f"({tmp.stat().st_size / 1e6:.1f} MB)")
        print(f"relative error, {checked_by} vs the model (batch {check.shape[0]}, fp32):")
        for config, error in errors.items():
            print(f"  {config}  {error:.2e}{'' if error < TOLERANCE else '  FAILED'}")
        bad = [c for c, e in errors.items() if not e < TOLERANCE]
        if bad:
            raise ValueError(f"the export does not match the model for {', '.join(bad)} (tolerance {TOLERANCE:g}); "
                             f"{out} was not written: please report this with the model name")
    print(f"ok: {len(errors)} sub-network(s) within {TOLERANCE:g}")
    return 0
