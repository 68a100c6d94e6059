"""ADN model zoo. Importing this package registers every model."""

from . import mobilenetv2, resnet, swin, vit  # noqa: F401  (registers the builders)
from .base import ADNModel
from .registry import create_model, list_models, register_model

__all__ = ["ADNModel", "create_model", "list_models", "register_model"]
