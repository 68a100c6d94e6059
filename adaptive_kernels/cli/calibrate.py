"""``python -m adaptive_kernels calibrate``: per-sub-network norm calibration of a trained checkpoint.

Reads a checkpoint written by ``train`` or ``demo``, runs ``adaptive_kernels.calibrate`` on N un-augmented
training images (a fixed random subset, the first N of epoch 0's order) and writes the calibrated checkpoint
atomically (``save_checkpoint``); ``eval`` (and everything that loads a checkpoint) then uses the tables.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator

import torch

from .._files import check_output_file
from ..engine.openvino.engine import CALIBRATION_IMAGES as INT8_IMAGES
from ..models.calibration import CalibrationResult, calibrate
from ..models.footprint import check_fits, memory_needed
from ..training.checkpoint import INT8_SAMPLE, load_checkpoint, model_from_checkpoint, save_checkpoint
from ..training.data import (
    DEFAULT_CALIBRATION_BATCH,
    DEFAULT_CALIBRATION_IMAGES,
    DataSource,
    build_data,
    calibration_batches,
)
from ..training.distributed import resolve_device
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


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    data: DataSource,
    out: str | os.PathLike,
    *,
    num_images: int = DEFAULT_CALIBRATION_IMAGES,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    weights: str = "auto",
    device: str | torch.device = "cpu",
    choose_threads: bool = False,
    int8_images: int = 0,
    echo: Callable[[str], None] = print,
) -> CalibrationResult:
    """Calibrate every sub-network of the model in ``checkpoint`` on ``data``'s training images and write the
    checkpoint, with the calibrated ``weights`` ("auto": the EMA weights when there are, as ``eval`` picks
    them), to ``out``. Everything else in the checkpoint is kept (a training run resumes from it as before). With
    ``choose_threads`` (``--threads auto``), the faster of torch's thread count and one thread is used.
    ``int8_images``: also keep the first N of these images in the checkpoint (``INT8_SAMPLE``, float16), the
    sample ``serve --int8`` measures each sub-network's INT8 ranges on: one pass over the data for both."""
    if isinstance(int8_images, bool) or not isinstance(int8_images, int) or not 0 <= int8_images <= num_images:
        raise ValueError(f"int8_images={int8_images!r} (--int8-images) must be an int from 0 to the calibration's "
                         f"images ({num_images})")
    kept: list[torch.Tensor] = []
    batches = _keeping(calibration_batches(data, num_images, batch_size), int8_images, kept)
    model, state, weights = model_from_checkpoint(checkpoint, weights=weights, data=data, purpose="calibrate")
    spec = state["model_spec"]
    total = min(num_images, data.num_train)
    batch = min(batch_size, total)
    check_fits(memory_needed(spec["name"], spec["kwargs"], (batch, data.in_chans, *data.image_size)),
               f"calibrating {spec['name']} on batches of {batch} {'x'.join(map(str, data.image_size))} images",
               "lower --batch-size")
    model.to(device)
    if choose_threads:
        auto_threads(model, data, device, echo)
    configs = len(model.skip_configs())
    every = f" (all of them: {data.name} has fewer than {num_images})" if num_images > data.num_train else ""
    echo(f"calibrating {configs} sub-networks of {spec['name']} ({weights} weights) on {total} un-augmented "
         f"{data.name} training images{every}, batches of {batch_size} ...")
    started, last = time.perf_counter(), [0.0]

    def progress(done: int) -> None:
        now = time.perf_counter() - started
        if now - last[0] >= 2.0 or done >= total:  # a line every 2 s at most
            last[0] = now
            echo(f"  {done}/{total} images x {configs} sub-networks ({now:.0f} s)")

    result = calibrate(model, batches, progress=progress)
    state[weights] = {k: v.cpu() for k, v in model.state_dict().items()}
    state["calibration"] = {"images": result.images, "batch_size": batch_size, "data": data.name,
                            "weights": weights, "seconds": round(result.seconds, 1)}
    if kept:  # an earlier sample (of the same training data) stays when none is asked for
        state[INT8_SAMPLE] = torch.cat(kept)
        echo(f"kept {len(state[INT8_SAMPLE])} of the images for INT8 (serve --int8)")
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, out)
    echo(f"wrote {out}: {result.images} images x {configs} sub-networks in {result.seconds:.1f} s")
    return result


def _keeping(batches: Iterator[torch.Tensor], count: int, kept: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches`` as they are, keeping (CPU, float16) copies of their first ``count`` images in ``kept``."""
    have = 0
    for batch in batches:
        if have < count:
            kept.append(batch[:count - have].detach().to("cpu", torch.float16, copy=True))
            have += len(kept[-1])
        yield batch


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``calibrate`` sub-command."""
    c = sub.add_parser("calibrate", help="per-sub-network BatchNorm calibration of a checkpoint",
                       formatter_class=HelpFormatter, description="Per-sub-network norm statistics of a checkpoint, measured on N un-augmented training images (the "
                       "first N of epoch 0's order), written to --out with everything else kept; eval, export and "
                       "training resume then use them.")
    add_checkpoint_args(c)
    add_data_args(c, from_checkpoint=True, auto_threads=True)
    c.add_argument("--images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES,
                   help=f"un-augmented training images to calibrate on (default {DEFAULT_CALIBRATION_IMAGES})")
    c.add_argument("--batch-size", type=positive_int, default=DEFAULT_CALIBRATION_BATCH,
                   help=f"default {DEFAULT_CALIBRATION_BATCH}")
    c.add_argument("--int8-images", type=int_range(0, INT8_IMAGES), default=0,
                   help="also keep the first N of these images in --out (float16) for serve --int8, which measures "
                        "each sub-network's INT8 ranges on them (0: none)")
    c.add_argument("--out", type=path_text, required=True, help="calibrated checkpoint to write (may be --checkpoint itself)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    checkpoint_data(args, load_checkpoint(args.checkpoint))
    data = build_data(args.data, args.data_dir, test_subset=args.test_subset, image_size=args.image_size,
                      num_workers=args.workers, augment=False)
    calibrate_checkpoint(args.checkpoint, data, args.out, num_images=args.images, batch_size=args.batch_size,
                         weights=args.weights, device=resolve_device(args.device),
                         choose_threads=args.threads == "auto", int8_images=min(args.int8_images, args.images))
    return 0
