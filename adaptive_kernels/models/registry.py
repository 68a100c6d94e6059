"""timm-style model registry: ``@register_model`` builders, ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name (e.g. ``resnet50_adn``)."""
    if fn.__name__ in _MODELS:
        raise RuntimeError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob (``"resnet*"``)."""
    names = sorted(_MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder ``name``; an unknown name raises ValueError listing the close matches."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}; {hint}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered ADN model, e.g. ``create_model("resnet50_adn", num_classes=10)``.

    Common kwargs: ``num_classes``, ``in_chans``, ``device``, ``dtype``.
    """
    builder = get_builder(name)
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    model = builder(**kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
