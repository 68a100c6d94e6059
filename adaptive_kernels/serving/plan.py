"""What a server needs before its first request: the model of a checkpoint, its engine, the per-bucket latency profile,
the accuracy of each servable sub-network; and the checks that make a bad start one clear error: those of the
arguments ``build_plan`` and ``ray.deploy`` take, whose bounds ``serve``'s flags share (``MAX_BATCH``, ``MAX_PORT``,
``MAX_REPLICAS``, ``model_name_problem``, ``serving_device``, ``accuracy_table``).

Used alike by ``serve`` (the CLI), the Ray Serve replica and the load benchmark.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine import compile
from ..engine.base import Engine
from ..models.skip import SkipConfig, SkipLike, skip_to_str
from ..training.checkpoint import INT8_SAMPLE, load_checkpoint, model_from_checkpoint
from ..training.data import DataSource
from ..training.distributed import resolve_device
from ..training.evaluate import accuracy as measure_accuracy
from .latency import LatencyModel, batch_buckets
from .policy import parse_accuracy, rank_by_accuracy
from .scheduler import PADDED_MECHANISMS

#: the most inputs one engine call may take (``serve --max-batch``, ``build_plan``, ``deploy``): the plan profiles
#: every bucket up to it, which at 1024 already takes minutes
MAX_BATCH = 1024
#: the highest TCP port (``serve --port``, ``deploy``'s port; 0: any free one)
MAX_PORT = 65535
#: the most Ray Serve replicas of one deployment (``serve --ray-replicas``, ``deploy``'s replicas)
MAX_REPLICAS = 4096
#: a served model's name: one segment of the protocol's URLs (``/v2/models/NAME/infer``)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class BadArgumentType(TypeError, ValueError):
    """An argument of the wrong type (``port="8000"``, ``max_batch=2.0``): a TypeError, and a ValueError as every
    other bad argument, so that a caller (the CLI's one-line errors) catching ValueError catches it too."""


def check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    """``value`` (argument ``what``) as an int in [low, high] (no upper bound when ``high`` is None); a bool or a
    non-integer is a BadArgumentType, one out of range a ValueError, each one line naming ``what``."""
    allowed = (("a positive int" if low == 1 else f"an int >= {low}") if high is None
               else f"an int in [{low}, {high}]")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadArgumentType(f"{what} must be {allowed}, got {value!r} of type {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return int(value)


def check_number(value: Any, what: str, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` (argument ``what``) as a float: a real number, not a bool (BadArgumentType otherwise), for which
    ``ok`` holds (ValueError otherwise; NaN fails every comparison); the message says it must be ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadArgumentType(f"{what} must be {allowed}, got {value!r} of type {type(value).__name__}")
    if not ok(value):
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return float(value)


def check_slo_ms(slo_ms: Any, what: str = "slo_ms") -> float:
    """A latency objective: a positive, finite number of milliseconds (not NaN, inf, 0 or a bool)."""
    return check_number(slo_ms, what, "a positive, finite number of milliseconds", lambda v: 0 < v < math.inf)


def model_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a served model's name (``serve --name``, ``deploy``'s and ``build_plan``'s
    ``name``), or None: it is one segment of the protocol's URLs, so a '/' would serve it where no client looks."""
    if MODEL_NAME.fullmatch(name):
        return None
    return (f"must be letters, digits, '_', '.' or '-' (at most 128, a letter or digit first: it is part of the "
            f"URL), got {name!r}")


def check_model_name(name: Any, what: str = "name") -> str:
    """``name`` as a served model's name (``model_name_problem``); a non-str is a BadArgumentType."""
    if not isinstance(name, str):
        raise BadArgumentType(f"{what} must be a str (the model's name in the URLs), got {name!r}")
    problem = model_name_problem(name)
    if problem:
        raise ValueError(f"{what} {problem}")
    return name


def serving_device(device: Any, *, here: bool = True) -> str:
    """The device a server runs on, as torch names it: cpu, cuda or cuda:N; "auto": a GPU of this machine when it
    has one, else the CPU. ``here``: the engine runs on this machine, whose CUDA must then be available with that
    GPU (``resolve_device``; else torch fails deep inside, or a Ray replica waits forever for a GPU); not ``here``
    (a Ray cluster): only the name is checked. One line naming ``device`` and the fix."""
    if not isinstance(device, (str, torch.device)):
        raise BadArgumentType(f"device must be a str (cpu, cuda or cuda:N), got {device!r}")
    if device == "auto":
        return str(resolve_device(device))
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: a server runs on cpu or cuda / cuda:N")
    if not here:
        return str(dev)
    dev = resolve_device(str(dev))  # CUDA must be available
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}: choose one of them")
    return str(dev)


def accuracy_table(accuracy: Any, num_stages: int) -> dict[SkipConfig, float]:
    """``{skip: accuracy}`` of the servable sub-networks from a mapping (``parse_accuracy``) or from the path of an
    ``eval --json`` file (``load_accuracy``, as ``serve --accuracy`` reads it); anything else is a
    BadArgumentType."""
    if isinstance(accuracy, (str, os.PathLike)):
        return load_accuracy(accuracy, num_stages)
    if not isinstance(accuracy, Mapping):
        raise BadArgumentType(f"accuracy must be a mapping {{skip: accuracy %}} (e.g. {{'FFF': 91.2}}) or the path "
                              f"of an `eval --json` file, got {accuracy!r} of type {type(accuracy).__name__}")
    return parse_accuracy(accuracy, num_stages)


@dataclass
class ServingPlan:
    """A model ready to serve: ``name`` (the protocol's model name), the ``engine`` and the ``example_input`` it was
    compiled for, the ``latency`` profile, ``accuracy`` of the servable sub-networks and where it came from."""

    name: str
    engine: Engine
    example_input: torch.Tensor
    latency: LatencyModel
    accuracy: dict[SkipConfig, float]
    accuracy_source: str

    @property
    def fastest_batch1_s(self) -> float:
        """Seconds of the fastest servable sub-network at batch 1 (as profiled): the smallest SLO that can be met."""
        return min(self.latency.profiled(s, 1) for s in self.accuracy)

    def check_slo(self, slo_ms: float) -> None:
        """Refuse an SLO no request can meet, with the number that would do (and one that is no SLO: NaN, inf,
        <= 0, not a number)."""
        check_slo_ms(slo_ms)
        fastest = self.fastest_batch1_s * 1e3
        if slo_ms < fastest:
            raise ValueError(f"--slo-ms {slo_ms:g} is below the fastest sub-network's batch-1 latency on this machine "
                             f"({fastest:.2f} ms): no request could meet it; raise --slo-ms")

    def describe(self) -> str:
        """The plan as printed at start: one row per servable sub-network, its accuracy and latency per bucket."""
        ranking = rank_by_accuracy(self.accuracy, self.latency.predict)
        buckets = self.latency.buckets
        precision = getattr(self.engine, "precision", None)  # the OpenVINO engine's "fp32" / "int8"
        engine = self.engine.mechanism + (f" {precision.upper()}" if precision else "")
        lines = [(f"{self.name}: {len(ranking)} sub-networks, accuracy from {self.accuracy_source}, engine "
                  f"{engine}, batches {buckets}; latency in ms as profiled"),
                 f"{'skip':<8} {'accuracy':>8} " + " ".join(f"{'b' + str(b):>8}" for b in buckets)]
        for skip in ranking:
            lines.append(f"{skip_to_str(skip):<8} {self.accuracy[skip]:>8.2f} "
                         + " ".join(f"{self.latency.profiled(skip, b) * 1e3:>8.3f}" for b in buckets))
        return "\n".join(lines)


def load_accuracy(path: str | os.PathLike, num_stages: int) -> dict[SkipConfig, float]:
    """``{skip: accuracy}`` from ``eval --json`` records (``[{"skip": "TFF", "accuracy": 90.1, ...}, ...]``) or a
    plain mapping ``{"TFF": 90.1, ...}``; the sub-networks it lists are the ones served."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--accuracy {path}: cannot read it as JSON ({e}); write it with "
                         f"`python -m adaptive_kernels eval --checkpoint CK --data D --json {path}`") from None
    if isinstance(table, list):
        try:
            table = {r["skip"]: r["accuracy"] for r in table}
        except (TypeError, KeyError):
            raise ValueError(f"--accuracy {path}: records need 'skip' and 'accuracy' (eval --json's format)") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"--accuracy {path}: expected eval --json records or {{\"TFF\": accuracy, ...}}")
    try:
        return parse_accuracy(table, num_stages)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--accuracy {path}: {e} (the model has {num_stages} skippable stages)") from None


def checkpoint_model(path: str | os.PathLike, data: DataSource | None = None
                     ) -> tuple[torch.nn.Module, str, tuple[int, ...]]:
    """The model of a ``train``/``demo`` checkpoint in eval mode, its registered name and its image shape (C, H, W);
    ``data`` (what will measure its accuracy) must be what it was trained on (dataset, image size, classes)."""
    model, state, _ = model_from_checkpoint(path, data=data, purpose="measure its accuracy")
    data = state.get("data") or {}
    if "image_size" not in data:
        raise ValueError(f"checkpoint {path} does not record its image size (no 'data' entry): serve a checkpoint "
                         f"written by train or demo")
    spec = state["model_spec"]
    return model.eval(), spec["name"], (spec["kwargs"].get("in_chans", 3), *data["image_size"])


def int8_sample(path: str | os.PathLike) -> torch.Tensor:
    """The images ``calibrate --int8-images`` kept in checkpoint ``path`` (float32), for ``serve --int8``."""
    state = load_checkpoint(path)
    sample = state.get(INT8_SAMPLE)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or len(sample) < 2:
        raise ValueError(f"--int8: checkpoint {path} keeps no images to measure INT8 ranges on: calibrate it with "
                         f"`python -m adaptive_kernels calibrate --checkpoint {path}{_same_calibration(state)} "
                         f"--int8-images 300 --out CALIBRATED.pt` and serve that")
    return sample.float()


def _same_calibration(state: dict) -> str:
    """The ``calibrate`` flags that measure the norms again as ``state``'s own calibration did (calibrate always
    does): without them, the default image count would give other norms than the accuracies were measured with."""
    done = state.get("calibration")
    if not isinstance(done, dict) or not isinstance(done.get("images"), int):
        return ""
    flags = f" --images {done['images']}"
    if isinstance(done.get("batch_size"), int):
        flags += f" --batch-size {done['batch_size']}"
    if done.get("weights") in ("model", "ema"):
        flags += f" --weights {done['weights']}"
    return flags


def measure_accuracies(model: torch.nn.Module, data: DataSource, *, device: str = "cpu", scorer: Engine | None = None,
                       progress: Callable[[str], Any] = lambda line: None) -> dict[SkipConfig, float]:
    """The accuracy (%) of every sub-network of ``model`` on ``data``'s test split, as ``scorer`` (an engine of the
    model; default: the model itself) computes it; ``progress`` hears each one."""
    model, accuracy = model.to(device), {}
    configs = model.skip_configs()
    progress(f"measuring the accuracy of {len(configs)} sub-networks on {data.num_test} {data.name} test images ...")
    for i, skip in enumerate(configs, 1):
        accuracy[skip] = measure_accuracy(scorer or model, data, skip, device=device)
        progress(f"accuracy of {skip_to_str(skip)} on {data.name}: {accuracy[skip]:.2f} % ({i}/{len(configs)})")
    return accuracy


def check_int8_device(device: str | torch.device) -> None:
    """INT8 serving runs on OpenVINO, on the CPU: another ``device`` is refused with the flags to change."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"--int8 runs on the CPU (OpenVINO), not on {device}: drop --int8 or use --device cpu")


def compile_engine(model: torch.nn.Module, example: torch.Tensor, *,
                   int8_calibration: torch.Tensor | None = None, served: Iterable[SkipConfig] | None = None) -> Engine:
    """The serving engine of ``model`` for inputs like ``example`` (dynamic batch, on ``example``'s device); with
    ``int8_calibration`` images INT8 on OpenVINO (CPU), each sub-network's ranges measured on them, and only the
    ``served`` sub-networks built (default all: each is a quantized model of its own). The same model and images
    give the same INT8 engine in any process (NNCF's ranges are deterministic; measured: identical outputs from two
    builds, at 1 and 2 threads), so accuracies measured through one hold for every such build."""
    if int8_calibration is None:
        return compile(model.to(example.device), example, dynamic_batch=True)
    check_int8_device(example.device)
    return compile(model, example, dynamic_batch=True, mechanism="openvino", dtype=torch.int8,
                   calibration=int8_calibration, skips=None if served is None else list(served))


def build_plan(model: torch.nn.Module, name: str, image_shape: tuple[int, ...], *, max_batch: int,
               accuracy: Mapping[SkipLike, float] | None = None, data: DataSource | None = None,
               device: str = "cpu", profile_iters: int = 20, int8_calibration: torch.Tensor | None = None,
               progress: Callable[[str], Any] = lambda line: None) -> ServingPlan:
    """Compile ``model`` (dynamic batch; on CUDA fp16, one capture per bucket; with ``int8_calibration`` images
    INT8 on OpenVINO, each sub-network's ranges measured on them), profile it at every bucket up to ``max_batch``,
    and take the sub-networks' accuracy from ``accuracy`` or measure it on ``data``'s test split (INT8: through
    the engine, whose ranges change it a little). ``accuracy``: a mapping or the path of an ``eval --json`` file
    (``accuracy_table``). ``progress`` hears one line per step. A bad argument (a name that is no URL segment,
    max_batch outside [1, MAX_BATCH], profile_iters < 1, a device that is not cpu / cuda or whose CUDA is not here)
    is a one-line error before the compile (``serving_device``, ``check_int``...)."""
    check_model_name(name)
    check_int(max_batch, "max_batch", 1, MAX_BATCH)
    check_int(profile_iters, "profile_iters", 1)
    device = serving_device(device, here=int8_calibration is None)  # INT8: check_int8_device names the fix
    if int8_calibration is not None:
        check_int8_device(device)
    if accuracy is None and data is None:
        raise ValueError("the policy needs each sub-network's accuracy: give --accuracy EVAL.json (eval --json) or "
                         "--data to measure it now")
    if accuracy is not None:  # its mistakes before the minutes of compiling and profiling
        accuracy = accuracy_table(accuracy, model.num_skippable_stages)
    example = torch.zeros((1, *image_shape), device=device)
    progress(f"compiling {name} for {device}{' in INT8' if int8_calibration is not None else ''} ...")
    # INT8 builds one quantized model per sub-network: only the ones the accuracy table lists are served
    engine = compile_engine(model, example, int8_calibration=int8_calibration, served=accuracy)
    if accuracy is None:
        scorer = engine if int8_calibration is not None else None
        accuracy = measure_accuracies(model, data, device=device, scorer=scorer, progress=progress)
        source = f"--data {data.name} (measured now{', INT8' if scorer is not None else ''})"
    else:
        source = "--accuracy"
    tables = {}
    for bucket in batch_buckets(max_batch):
        progress(f"profiling batch {bucket} ({len(engine.skip_configs())} sub-networks, {profile_iters} runs each) ...")
        tables[bucket] = engine.profile(profile_iters, max(1, profile_iters // 4), batch_size=bucket)
    padded = engine.mechanism in PADDED_MECHANISMS
    return ServingPlan(name, engine, example, LatencyModel(tables, padded=padded), dict(accuracy), source)
