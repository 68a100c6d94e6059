"""Builds adaptive_kernels and, when a CUDA toolkit and a CUDA build of torch are present, the
``adaptive_kernels._C`` extension from csrc/ (no GPU needed to compile it).

Environment:
  ADN_SKIP_EXT=1         never build the extension (pure Python install)
  ADN_FORCE_EXT=1        fail the install if the extension cannot be built (default: warn, skip)
  TORCH_CUDA_ARCH_LIST   target archs; default "8.0;9.0" (never autodetected: that needs a GPU)
  MAX_JOBS               parallel compile jobs; default min(cores, free memory / 4 GB)
Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs() -> str:
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


def _extension():
    """Return (ext_modules, cmdclass); empty when the extension is skipped."""
    force = os.environ.get("ADN_FORCE_EXT") == "1"
    if os.environ.get("ADN_SKIP_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    why = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # build isolation without torch: pure Python install
        why = f"torch is not importable in the build environment ({e}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None:
            why = "no CUDA toolkit found (set CUDA_HOME)"
        elif not sources:
            why = "csrc/ has no sources"
    if why:
        if force:
            raise RuntimeError(f"ADN_FORCE_EXT=1 but the extension cannot be built: {why}")
        warnings.warn(f"adaptive_kernels: building without the CUDA extension: {why}")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    build_info = (
        f'-DADN_BUILT_TORCH="{torch.__version__}"',
        f'-DADN_BUILT_CUDA="{torch.version.cuda}"',
    )
    ext = CUDAExtension(
        name="adaptive_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O2", *build_info], "nvcc": ["-O2", *build_info]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    name="adaptive_kernels",
    version="0.1.0",
    description="Adaptive Depth Networks: models, self-distillation training, one-graph fused inference",
    packages=find_packages(include=["adaptive_kernels", "adaptive_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={
        "vision": ["torchvision>=0.26"],
        "plot": ["matplotlib"],
        # export_onnx and the CPU engine (compile() on a CPU input): the dynamo exporter and ONNX Runtime
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        "test": ["pytest", "pytest-benchmark", "torchvision>=0.26", "matplotlib"],
    },
    entry_points={"console_scripts": ["adaptive-kernels=adaptive_kernels.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
