"""adaptive_kernels: Adaptive Depth Networks — models, self-distillation training, fused inference."""

from ._ext import EXT_ERROR, HAS_EXT
from ._version import __version__
from .engine import compile, select_skip
from .export import export_onnx, export_pt2
from .models import create_model, list_models
from .models.calibration import CalibrationResult, calibrate
from .models.skip import all_skip_configs, parse_skip, skip_to_str

__all__ = [
    "EXT_ERROR",
    "HAS_EXT",
    "CalibrationResult",
    "__version__",
    "all_skip_configs",
    "calibrate",
    "compile",
    "create_model",
    "export_onnx",
    "export_pt2",
    "list_models",
    "parse_skip",
    "select_skip",
    "skip_to_str",
]
