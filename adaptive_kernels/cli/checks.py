"""Checks the command line runs before any work starts: numeric flags (as argparse ``type=`` functions that
name the allowed range), output paths, devices, model arguments, and the help formatter; and the flags several
commands share (``add_data_args``: --data, --data-dir, ...; ``parse_model_args``: --model-arg KEY=VALUE).

A ``type=`` function raises ``argparse.ArgumentTypeError``; argparse then prints
``adaptive-kernels train: error: argument --batch-size: must be an integer >= 1, got '0'`` and exits 2.
The other checks raise ``ValueError`` with the flag's name, which ``main`` prints as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..models.registry import create_model, get_builder
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
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)


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


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Like ``check_output_dir`` for a file the command writes at its end (e.g. ``eval --json``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    check_output_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} exists and is not writable; choose another {flag}")
    return path


def add_data_args(p: argparse.ArgumentParser, default: str | None = None, *, optional: bool = False) -> None:
    """The data flags of every command that reads a dataset (``default``: --data's default; None: required unless
    ``optional``)."""
    p.add_argument("--data", choices=DATASETS, default=default, required=default is None and not optional,
                   help="dataset")
    p.add_argument("--data-dir", help="dataset folder (fashion-mnist: the IDX files, default "
                   "/usr/share/datasets/fashion-mnist; imagefolder: ROOT with train/ and val/)")
    p.add_argument("--test-subset", type=positive_int, help="score on a fixed random subset of N test images")
    p.add_argument("--image-size", type=positive_int,
                   help="imagefolder crop size (default 224) / synthetic size (16)")
    p.add_argument("--workers", type=non_negative_int, default=4,
                   help="imagefolder DataLoader worker processes (0: load in the main process)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")


def parse_model_args(pairs: list[str]) -> dict:
    """``--model-arg KEY=VALUE`` pairs as builder keyword arguments (VALUE a Python literal, else the string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg {pair!r}: write KEY=VALUE, e.g. --model-arg width=16")
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


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """``create_model`` for ``--model-arg`` values a user typed: what the constructor rejects with a TypeError
    (a key a ``**kwargs`` builder passes on, a string where a number belongs) becomes a ValueError naming the
    flag."""
    try:
        return create_model(spec["name"], **spec["kwargs"])
    except TypeError as e:
        raise ValueError(f"--model-arg: {spec['name']} rejects {spec['kwargs']}: {e}") from None


def check_data_fits_model(spec: dict[str, Any], num_classes: int, in_chans: int, data_name: str) -> None:
    """``--model-arg num_classes/in_chans`` must agree with the data (else cross-entropy fails mid-epoch)."""
    for key, have in (("num_classes", num_classes), ("in_chans", in_chans)):
        if spec["kwargs"].get(key, have) != have:
            raise ValueError(
                f"--model-arg {key}={spec['kwargs'][key]} but --data {data_name} has {have} "
                f"{'classes' if key == 'num_classes' else 'channels'}: drop it (it is taken from the data)"
            )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (line breaks kept) and each option's default, except empty ones (None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is None or action.default is False or action.default == []  # 0 is a real default
        if empty or action.default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Prints a usage error as ONE line (the usage block is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(message: object) -> None:
    """One line on stderr: the CLI's errors never spread over several lines."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
