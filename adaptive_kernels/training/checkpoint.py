"""Checkpoints you can trust: atomic writes, safe loading, clear errors, RNG state capture.

A checkpoint is a dict saved with ``torch.save`` holding only tensors and plain Python values, so it
loads with ``torch.load(weights_only=True)`` (no arbitrary code runs when a file is opened).
``save_checkpoint`` writes atomically (``_files.atomic_path``): a process killed at any moment leaves either the
previous complete file or the new complete file at ``path``, never a partial one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_path
from ..models import create_model
from ..models.footprint import check_fits, memory_needed
from ..models.norms import prepare_for_state_dict
from ..models.registry import get_builder

FORMAT = "adaptive_kernels.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model")
#: the key of the images ``calibrate --int8-images`` keeps (float16, N x C x H x W) for ``serve --int8``
INT8_SAMPLE = "int8_calibration"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or of the wrong kind."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write ``state`` (plus the format marker) to ``path``; returns the path.

    ``state`` must hold a ``"model"`` state dict; everything in it must be tensors or plain Python values.
    """
    path = Path(path)
    if "model" not in state:
        raise ValueError("a checkpoint needs a 'model' state dict")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint written by ``save_checkpoint``.

    Raises ``CheckpointError`` naming the file and the problem: missing, unreadable/truncated/corrupt,
    not one of our checkpoints (e.g. a bare state dict), or a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors of every kind: report them as one clear problem
        detail = str(e).splitlines()[0] if str(e) else ""
        if detail.startswith("Weights only load failed"):  # torch's text goes on to advise weights_only=False
            detail = "it holds something other than tensors and plain values, which is never unpickled here"
        raise CheckpointError(
            f"checkpoint {path} cannot be read: the file is truncated, corrupt or not a torch checkpoint "
            f"({type(e).__name__}: {detail})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict without our format marker"
        raise CheckpointError(
            f"{path} is not an adaptive_kernels training checkpoint ({what}); to load a bare state dict use "
            f"model.load_state_dict(torch.load(path, weights_only=True))"
        )
    if not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')!r}; this adaptive_kernels reads "
            f"versions <= {VERSION}: upgrade the package"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written completely by save_checkpoint")
    return state


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``model.load_state_dict(strict=True)`` with an error that names ``source`` and the mismatching keys.
    A calibrated state dict (per-sub-network norm tables) loads into an uncalibrated model."""
    prepare_for_state_dict(model, state_dict)
    own = model.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    shapes = [
        f"{k}: {tuple(v.shape)} in file vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    # load_state_dict would cast an integer tensor into a float parameter (0.03 -> 0): a silently broken model
    shapes += [
        f"{k}: {v.dtype} in file vs {own[k].dtype}"
        for k, v in state_dict.items()
        if k in own and v.is_floating_point() != own[k].is_floating_point()
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__} (other architecture or width?): "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}; "
            f"shape mismatches {shapes[:6]}{' ...' if len(shapes) > 6 else ''}"
        )
    model.load_state_dict(state_dict, strict=True)


def model_from_checkpoint(
    path: str | os.PathLike,
    *,
    state: dict[str, Any] | None = None,
    weights: str = "auto",
    data: Any = None,
    purpose: str = "evaluate",
) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """The model a checkpoint holds, built from its ``model_spec`` with the chosen weights loaded (on the CPU).

    weights: "model", "ema" or "auto" (the EMA weights when the checkpoint has them). data: the ``DataSource``
    the model will be used on (``purpose``: "evaluate", "calibrate"): it must be the kind the model was trained
    on (dataset, image size, classes, channels), else the numbers mean nothing. Returns (model, the whole
    checkpoint, the weights used); every problem is a one-line ``CheckpointError`` / ``ValueError``. state: the
    checkpoint when the caller has loaded it already (``load_checkpoint(path)``)."""
    if state is None:
        state = load_checkpoint(path)
    spec = state.get("model_spec")
    if not spec:
        raise CheckpointError(f"checkpoint {path} does not record which model it holds (no model_spec)")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs"), dict)):
        raise CheckpointError(f"checkpoint {path}: its model_spec {str(spec)[:80]!r} is not {{'name': str, 'kwargs': "
                              f"dict}}: a corrupt or foreign checkpoint")
    try:
        get_builder(spec["name"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} holds a model this adaptive_kernels does not have: {e}") from None
    kwargs = spec["kwargs"]
    saved_data = state.get("data")
    if saved_data is not None and not (isinstance(saved_data, dict) and _is_image_size(saved_data.get("image_size"))):
        raise CheckpointError(f"checkpoint {path}: its data record {str(saved_data)[:80]!r} is not {{'name': ..., "
                              f"'image_size': [H, W]}}: a corrupt or foreign checkpoint")
    if data is not None:
        saved = state.get("data") or {}
        given = {"name": data.name, "image_size": list(data.image_size)}
        flags = {"name": "--data", "image_size": "--image-size"}
        for key, value in given.items():
            if key in saved and saved[key] != value:
                raise ValueError(f"{path} was trained on data {key} {saved[key]!r} but {flags[key]} gives {value!r}: "
                                 f"{purpose} on the data it was trained on")
        if kwargs.get("num_classes") != data.num_classes or kwargs.get("in_chans") != data.in_chans:
            raise ValueError(
                f"{path} was trained for {kwargs.get('num_classes')} classes / {kwargs.get('in_chans')} channels, "
                f"but --data {data.name} has {data.num_classes} / {data.in_chans}: {purpose} on its dataset "
                f"({saved.get('name', '?')})"
            )
    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"weights must be 'auto', 'model' or 'ema', got {weights!r}")
    if weights == "auto":
        weights = "ema" if state.get("ema") is not None else "model"
    if state.get(weights) is None:
        other = "model" if weights == "ema" else "ema"
        raise CheckpointError(f"checkpoint {path} holds no {weights.replace('ema', 'EMA')} weights: use --weights {other}")
    if not isinstance(state[weights], Mapping) or not all(isinstance(v, torch.Tensor) for v in state[weights].values()):
        raise CheckpointError(f"checkpoint {path}: its {weights} weights are not a state dict of tensors (a "
                              f"{type(state[weights]).__name__}): a corrupt or foreign checkpoint")
    broken = [k for k, v in state[weights].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # such a model still gives plausible-looking accuracies (a constant class)
        raise CheckpointError(
            f"checkpoint {path}: {len(broken)} tensor(s) of its {weights} weights hold NaN or infinite values "
            f"({', '.join(broken[:4])}{' ...' if len(broken) > 4 else ''}): the run diverged; use an earlier checkpoint"
            f"{' or --weights ' + ('model' if weights == 'ema' else 'ema') if state.get('ema') is not None else ''}"
        )
    try:
        check_fits(memory_needed(spec["name"], kwargs), f"the model of {path} ({spec['name']} {kwargs})",
                   "its model_spec is not a model this machine can hold (a corrupt or foreign checkpoint?)")
        model = create_model(spec["name"], **kwargs)
    except TypeError as e:  # an argument the builder does not take, or of the wrong type
        raise CheckpointError(f"checkpoint {path}: its model_spec ({spec['name']} {kwargs}) does not build: {e} (a "
                              f"corrupt checkpoint, or one from another version of adaptive_kernels)") from None
    load_model_state(model, state[weights], path)
    return model, state, weights


def _is_image_size(size: Any) -> bool:
    return size is None or (isinstance(size, (list, tuple)) and len(size) == 2
                            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size))


def capture_rng_state() -> dict[str, Any]:
    """The state of every RNG a training process uses (python, numpy, torch CPU and all CUDA devices),
    as tensors and plain values so that it loads with ``weights_only=True``."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    # weights_only loading returns the tuple's inner sequence as a list; random.setstate wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
