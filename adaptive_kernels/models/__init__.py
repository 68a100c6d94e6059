"""ADN model zoo. Importing this package registers every model: each of its modules other than the shared
machinery is a family file and is imported here, so its ``@register_model`` builders register.
Adding ``models/<family>.py`` is the only edit a new family needs."""

from .._discovery import import_family_files
from .base import ADNModel
from .registry import create_model, list_models, register_model

__all__ = ["ADNModel", "create_model", "list_models", "register_model"]

#: the package's shared machinery; every other module here is a family file
SHARED_MODULES = frozenset({"base", "calibration", "footprint", "norms", "registry", "skip"})
import_family_files(__name__, __path__, shared=SHARED_MODULES)
