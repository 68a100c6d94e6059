"""ADN model zoo. Importing this package registers every model: each of its modules other than the shared
machinery in ``_SHARED`` is a family file and is imported here, so its ``@register_model`` builders register.
Adding ``models/<family>.py`` is the only edit a new family needs."""

import importlib
import pkgutil

from .base import ADNModel
from .registry import create_model, list_models, register_model

__all__ = ["ADNModel", "create_model", "list_models", "register_model"]

_SHARED = {"base", "calibration", "norms", "registry", "skip"}


def _import_families() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _SHARED:
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()
