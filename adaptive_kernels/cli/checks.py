"""Checks the command line runs before any work starts: numeric flags (as argparse ``type=`` functions that
name the allowed range), output paths, devices, model arguments, and the help formatter; and the flags several
commands share (``add_data_args``: --data, --data-dir, ...; ``parse_model_args``: --model-arg KEY=VALUE); and what
those flags set up when the command runs: ``--threads auto``'s measurement (``faster_thread_count``) and the phase
lines a command shows on stderr (``phase_lines``).

A ``type=`` function raises ``argparse.ArgumentTypeError``; argparse then prints
``adaptive-kernels train: error: argument --batch-size: must be an integer >= 1, got '0'`` and exits 2.
The other checks raise ``ValueError`` with the flag's name, which ``main`` prints as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..models.footprint import check_fits, memory_needed
from ..models.registry import create_model, get_builder
from ..serving.plan import model_name_problem
from ..training.data import DATASETS


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    parse.__name__ = f"int {bound}"
    return parse


def float_range(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
                ) -> Callable[[str], float]:
    """argparse type: a finite float in the interval low..high; ``*_open`` excludes that end (NaN and inf
    never pass: ``--lr nan`` would train a network of NaNs)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    bound = (f"> {low:g}" if low_open else f">= {low:g}") if high is None else f"in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = f"number {bound}"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
seed_int = int_range(0, 2**63 - 1)  # numpy's SeedSequence takes non-negative seeds only
#: more threads than a few per core only slow torch down (100000 of them hang it): a typo, refused
thread_count = int_range(1, 4 * (os.cpu_count() or 1))
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)


def path_text(text: str) -> str:
    """argparse type: a path, not an empty string (``--out ""`` would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r}")
    return text


path_text.__name__ = "path"


def model_name(text: str) -> str:
    """argparse type: a served model's name, one segment of the protocol's URLs (``/v2/models/NAME/infer``); the
    rule ``build_plan`` and ``deploy`` check (``serving.plan.model_name_problem``)."""
    problem = model_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


model_name.__name__ = "model name"


def thread_count_or_auto(text: str) -> int | str:
    """argparse type: ``auto`` (measure, see ``faster_thread_count``) or a thread count (``thread_count``)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return thread_count(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}, or auto") from None


thread_count_or_auto.__name__ = "auto or " + thread_count.__name__


def device_name(text: str) -> str:
    """argparse type: ``auto`` or a device torch understands (``cpu``, ``cuda``, ``cuda:1``); whether it is
    available is checked by ``resolve_device``."""
    if text == "auto":
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    return text


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --weights and --device of the commands that read a trained checkpoint (eval, calibrate)."""
    p.add_argument("--checkpoint", type=path_text, required=True, help="a last.pt written by train or demo")
    p.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="auto: the EMA weights when the checkpoint has them")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda / cuda:N")


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (a folder the command will write into) and prove it writable now, so that a typo or a
    read-only disk fails before training, not after an epoch. Raises ValueError naming ``flag``."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access is not enough (root, ACLs, read-only mounts): really create a file.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({e.strerror or e}); choose another {flag}") from None
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, flag: str = "--out", *, check: bool = True) -> Iterator[Path]:
    """``check_output_dir`` for the block's command; should the block fail, the folders it created are removed again
    (innermost first; one that got files is kept), so a refused or broken run leaves nothing behind. ``check``
    False: nothing is checked or created (a DDP rank other than the first)."""
    path = Path(path)
    made = [d for d in (path, *path.parents) if not d.exists()] if check else []
    try:
        if check:
            check_output_dir(path, flag)
        yield path
    except BaseException:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def check_batch_size(batch_size: int, data: Any) -> None:
    """``--batch-size`` of a command that trains: at most ``data``'s (a ``DataSource``) training images (every
    training step takes a full batch; a larger one would give an epoch of no step)."""
    if batch_size > data.num_train:
        raise ValueError(f"--batch-size {batch_size}: {data.name} has {data.num_train} training images; give at most "
                         f"{data.num_train}")


def add_data_args(p: argparse.ArgumentParser, default: str | None = None, *, from_checkpoint: bool = False,
                  auto_threads: bool = False) -> None:
    """The data flags of every command that reads a dataset (``default``: --data's default; None: required, unless
    ``from_checkpoint``: the command reads a checkpoint, whose dataset is the default, see ``checkpoint_data``).
    ``auto_threads``: --threads takes ``auto`` and defaults to it (the command calls ``faster_thread_count``)."""
    p.add_argument("--data", choices=DATASETS, default=default, required=default is None and not from_checkpoint,
                   help="dataset" + (" (default: the one the checkpoint was trained on)" if from_checkpoint else ""))
    p.add_argument("--data-dir", type=path_text, help="dataset folder (fashion-mnist: the IDX files, default "
                   "/usr/share/datasets/fashion-mnist; imagefolder: ROOT with train/ and val/)")
    p.add_argument("--test-subset", type=positive_int, help="score on a fixed random subset of N test images")
    p.add_argument("--image-size", type=positive_int,
                   help="imagefolder crop size (default 224) / synthetic size (16)")
    p.add_argument("--workers", type=non_negative_int, default=4,
                   help="imagefolder DataLoader worker processes (0: load in the main process)")
    if auto_threads:
        p.add_argument("--threads", type=thread_count_or_auto, default="auto",
                       help="CPU threads for torch (and ONNX Runtime); auto: torch's default or 1, whichever runs "
                            "this model faster here, measured first (one thread wins on a busy or small machine)")
    else:
        p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")


def faster_thread_count(measure: Callable[[], float], report: Callable[[str], None] = print) -> float:
    """``--threads auto``: runs ``measure`` (a throughput of the command's own work, higher is faster) with torch's
    current thread count and, when that is more than 1, with one thread, and keeps whichever was faster
    (``torch.set_num_threads``). Small convolutions gain little from threads, and while another process keeps the
    cores busy OpenMP's barriers make several threads far slower than one (measured on 2 cores: eval 5x slower with
    2 threads than with 1). ``report`` gets one line when one thread wins. Returns the kept throughput."""
    threads = torch.get_num_threads()
    speed = measure()
    if threads == 1:
        return speed
    torch.set_num_threads(1)
    one = measure()
    if one > speed:
        report(f"[threads] 1 thread runs faster than {threads} on this machine ({one:.0f} vs {speed:.0f} per s): "
               f"using 1 (--threads N to choose)")
        return one
    torch.set_num_threads(threads)
    return speed


def auto_threads(model: torch.nn.Module, data: Any, device: torch.device | str,
                 report: Callable[[str], None] = print) -> None:
    """``--threads auto`` for a command that runs ``model`` forward on ``data`` (a ``DataSource``): the faster of
    torch's thread count and one thread for a forward of up to 16 test images (nothing to choose on a GPU)."""
    if torch.device(device).type != "cpu":
        return
    x, _ = next(data.test_batches(batch_size=min(16, data.num_test)))
    faster_thread_count(lambda: forward_speed(model, x), report)


def forward_speed(model: torch.nn.Module, x: torch.Tensor, max_seconds: float = 1.0) -> float:
    """Images per second of ``model``'s eval-mode forward on ``x`` (one untimed run, then up to 5 timed runs or
    ``max_seconds``): the measure of ``--threads auto`` for the commands that run the model forward."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
            runs, started = 0, time.perf_counter()
            while runs == 0 or (runs < 5 and time.perf_counter() - started < max_seconds):
                model(x)
                runs += 1
            return runs * len(x) / (time.perf_counter() - started)
    finally:
        model.train(was_training)


def checkpoint_data(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """Without ``--data``, the dataset (and ``--image-size``) the checkpoint ``state`` was trained on."""
    if args.data is not None:
        return
    saved = state.get("data") or {}
    if saved.get("name") not in DATASETS:
        raise ValueError(f"{args.checkpoint} does not record its dataset: give --data ({', '.join(DATASETS)})")
    args.data = saved["name"]
    if args.image_size is None and saved.get("image_size"):
        args.image_size = saved["image_size"][0]


def parse_model_args(pairs: list[str]) -> dict:
    """``--model-arg KEY=VALUE`` pairs as builder keyword arguments (VALUE a Python literal, else the string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg {pair!r}: write KEY=VALUE, e.g. --model-arg width=16")
        if key in out:
            raise ValueError(f"--model-arg {key} is given twice: give each key once")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_model_args(name: str, kwargs: dict[str, Any]) -> None:
    """``--model NAME`` must be registered and every ``--model-arg`` key a parameter of its builder (checked
    before the data is loaded; a typo would otherwise escape as a TypeError from inside the constructor)."""
    params = inspect.signature(get_builder(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # checked when the model is built (build_model)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        known = ", ".join(p for p in params if p not in ("num_classes", "in_chans")) or "none"
        raise ValueError(f"--model-arg {', '.join(unknown)}: {name} takes no such argument (it takes: {known})")


def build_model(spec: dict[str, Any], flag: str = "--model-arg") -> torch.nn.Module:
    """``create_model`` for values a user typed (``flag``: the flag they came from): what the constructor rejects
    with a TypeError (a key a ``**kwargs`` builder passes on, a string where a number belongs) becomes a ValueError
    naming the flag; a model larger than the machine's memory is refused before it is allocated."""
    try:
        check_fits(memory_needed(spec["name"], spec["kwargs"]), f"{spec['name']} {spec['kwargs']}", f"check {flag}")
        return create_model(spec["name"], **spec["kwargs"])
    except TypeError as e:
        raise ValueError(f"{flag}: {spec['name']} rejects {spec['kwargs']}: {e}") from None


def check_image_size(model: torch.nn.Module, name: str, size: int, training_batch: int | None = None) -> None:
    """Images of ``size`` x ``size`` must fit ``model`` (``name``: the registered name; ``training_batch``: images
    per process when it trains), checked before the data is read or a step is taken: too small a size would fail in
    the first forward (a patch embedding, BatchNorm on one value per channel), a ViT takes its image_size only."""
    low, high = model.input_size_range(training_batch)
    if high is not None and low == high and size != low:
        raise ValueError(f"--image-size {size}: {name} takes {low}x{low} images only (its position embedding): give "
                         f"--image-size {low}, or build it for these with --model-arg image_size={size}")
    if size < low:
        why = "" if low == model.input_size_range()[0] else (
            f" when it trains on one image per process (BatchNorm needs more than one value per channel in its "
            f"last, {model.batch_norm_stride}x smaller map; or raise --batch-size)")
        raise ValueError(f"--image-size {size}: {name} needs images of at least {low}x{low}{why}: give --image-size "
                         f"{low} or more")


def check_data_fits_model(spec: dict[str, Any], num_classes: int, in_chans: int, data_name: str) -> None:
    """``--model-arg num_classes/in_chans`` must agree with the data (else cross-entropy fails mid-epoch)."""
    for key, have in (("num_classes", num_classes), ("in_chans", in_chans)):
        if spec["kwargs"].get(key, have) != have:
            raise ValueError(
                f"--model-arg {key}={spec['kwargs'][key]} but --data {data_name} has {have} "
                f"{'classes' if key == 'num_classes' else 'channels'}: drop it (it is taken from the data)"
            )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (line breaks kept), the values a numeric option takes (its type's name: ``int in
    [1, 1024]``, as in its error) and each option's default, except empty ones (None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        kind = getattr(action.type, "__name__", "")
        if kind.startswith(("int ", "number ", "auto or ")):
            text += f" ({kind})"
        empty = action.default is None or action.default is False or action.default == []  # 0 is a real default
        if empty or action.default is argparse.SUPPRESS or re.search(r"\bdefault\b", text):  # says it itself
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Prints a usage error as ONE line (the usage block is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(message: object) -> None:
    """One line on stderr: the CLI's errors never spread over several lines."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


class _PhaseFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = " ".join(record.getMessage().split())  # one line, as every line the CLI prints
        return f"warning: {line}" if record.levelno >= logging.WARNING else line


@contextlib.contextmanager
def phase_lines() -> Iterator[None]:
    """While a command runs, the package's progress records (INFO and above of the ``adaptive_kernels`` loggers:
    ``[export] tracing ...``, ``[compile] ...``, ``[profile] ...``) go to stderr, one line each. The library alone
    stays quiet: without a handler Python shows warnings only (``logging.basicConfig(level=logging.INFO)`` shows
    them in a program)."""
    logger = logging.getLogger("adaptive_kernels")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PhaseFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
