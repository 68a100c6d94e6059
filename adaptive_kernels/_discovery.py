"""Family files are found, not listed: ``models/``, ``export/`` and ``engine/cuda/lowering/`` each import every
module of their package except their shared machinery, so each family file's decorator (``@register_model``,
``@register_masked_forward``, ``@register_lowering``) runs. Adding ``<package>/<family>.py`` is the only edit."""

import importlib
import pkgutil
from collections.abc import Iterable


def import_family_files(package: str, path: Iterable[str], shared: Iterable[str]) -> None:
    """Import every module of ``package`` (found on its ``__path__``) whose name is not in ``shared``."""
    shared = set(shared)
    for module in pkgutil.iter_modules(path):
        if module.name not in shared:
            importlib.import_module(f"{package}.{module.name}")
