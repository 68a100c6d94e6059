"""Builds adaptive_kernels and, when a CUDA toolkit and a CUDA build of torch are present, the
``adaptive_kernels._C`` extension from csrc/ (no GPU needed to compile it).

Environment:
  ADN_SKIP_EXT=1         never build the extension (pure Python install)
  ADN_FORCE_EXT=1        fail the install if the extension cannot be built (default: warn, install without it)
  CUDA_HOME / CUDA_PATH  the CUDA toolkit; default: the folder of the real nvcc on PATH (through symlinks and
                         `exec` wrapper scripts), then /usr/local/cuda, then the newest /usr/local/cuda-*
  TORCH_CUDA_ARCH_LIST   target archs; default "8.0;9.0" (never autodetected: that needs a GPU)
  MAX_JOBS               parallel compile jobs; default min(cores, free memory / 4 GB)
Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch. When the
extension is skipped, the reason is kept in adaptive_kernels/EXT_SKIPPED and reported by
``adaptive_kernels.EXT_ERROR`` and ``python -m adaptive_kernels --version`` (pip shows a build's warnings
only with -v).
"""

import glob
import os
import re
import shutil
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP_NOTE = os.path.join(HERE, "adaptive_kernels", "EXT_SKIPPED")


def _default_max_jobs() -> str:
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


def is_cuda_toolkit(root: str) -> bool:
    """A usable toolkit has the compiler and the runtime headers (torch's guess /usr/local, from a wrapper
    /usr/local/bin/nvcc, has neither)."""
    return os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime_api.h"))


def _nvcc_named_in_script(path: str) -> list[str]:
    """Absolute nvcc paths a small wrapper script execs (e.g. ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []  # a binary: the real compiler
    return re.findall(r"(/[^\s'\"]*/bin/nvcc)\b", head.decode("utf-8", "replace"))


def find_cuda_home(environ=None, which=shutil.which, standard: tuple = ("/usr/local/cuda", "/usr/local/cuda-*")
                   ) -> tuple:
    """``(toolkit folder or None, how it was found / where it was looked for)``, in the order of the module
    docstring; every candidate must pass ``is_cuda_toolkit``."""
    environ = os.environ if environ is None else environ
    candidates = [(environ[v], f"${v}") for v in ("CUDA_HOME", "CUDA_PATH") if environ.get(v)]
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({real})"))
        for target in _nvcc_named_in_script(real):
            candidates.append((os.path.dirname(os.path.dirname(target)), f"the nvcc that {real} runs ({target})"))

    def version(path):
        return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]

    for pattern in standard:  # a glob: the newest version first
        candidates += [(p, p) for p in sorted(glob.glob(pattern), key=version, reverse=True)]
    for root, how in candidates:
        if is_cuda_toolkit(root):
            return root, how
    looked = ", ".join(dict.fromkeys(root for root, _ in candidates))
    return None, f"no CUDA toolkit (bin/nvcc + include/cuda_runtime_api.h) in {looked}"


def record_skip(why: str, fix: str, note_paths: tuple = (SKIP_NOTE,)) -> None:
    """Warn that the extension is skipped and keep the reason where ``import adaptive_kernels`` finds it."""
    message = f"adaptive_kernels: installing WITHOUT the CUDA extension: {why}. Fix: {fix}"
    warnings.warn(message, stacklevel=2)
    print(f"WARNING: {message}", file=sys.stderr)
    for path in note_paths:
        if os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as f:
                f.write(f"{why}. Fix: {fix}\n")


def _clear_skip_note() -> None:
    if os.path.exists(SKIP_NOTE):
        os.unlink(SKIP_NOTE)


def optional_build_ext(base, force: bool, note_path: str = SKIP_NOTE):
    """``base`` (torch's BuildExtension) that, when compiling fails, installs without the extension (warning
    and note naming the error) instead of failing the install; ``force`` (ADN_FORCE_EXT=1) keeps the failure."""

    class OptionalBuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler errors come as several distutils/subprocess/OSError types
                if force:
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                # build_py copied the package before this ran: put the note into the wheel's tree as well
                in_wheel = os.path.join(self.build_lib, "adaptive_kernels", "EXT_SKIPPED")
                record_skip(f"compiling csrc/ failed ({type(e).__name__}: {first})",
                            "see the compiler output with pip install -v; ADN_FORCE_EXT=1 makes this an error",
                            (note_path, in_wheel))
                self.extensions = []  # nothing to copy into the wheel / the source tree

    return OptionalBuildExt


def _extension():
    """Return (ext_modules, cmdclass); empty when the extension is skipped."""
    force = os.environ.get("ADN_FORCE_EXT") == "1"
    _clear_skip_note()
    if os.environ.get("ADN_SKIP_EXT") == "1":
        record_skip("ADN_SKIP_EXT=1 is set", "unset ADN_SKIP_EXT and reinstall")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    why = fix = None
    try:
        import torch
    except ImportError as e:  # build isolation: pip built in a fresh environment without torch
        why = f"torch is not importable in the build environment ({e}; pip's build isolation hides it)"
        fix = "pip install torch first, then pip install --no-build-isolation ."
    else:
        cuda_home, how = find_cuda_home()
        if torch.version.cuda is None:
            why, fix = f"torch {torch.__version__} is a CPU-only build", "install a CUDA build of torch"
        elif cuda_home is None:
            why, fix = how, "install the CUDA toolkit or set CUDA_HOME to it"
        elif not sources:
            why, fix = "csrc/ has no sources", "build from a complete checkout"
        else:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
            print(f"adaptive_kernels: building the CUDA extension with the toolkit {cuda_home} (found: {how})",
                  file=sys.stderr)
    if why:
        if force:
            raise RuntimeError(f"ADN_FORCE_EXT=1 but the extension cannot be built: {why}. Fix: {fix}")
        record_skip(why, fix)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

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
    return [ext], {"build_ext": optional_build_ext(BuildExtension, force)}


# pip (setuptools.build_meta) and `python setup.py` run this file as __main__; tests import its functions.
if __name__ == "__main__":
    ext_modules, cmdclass = _extension()
    setup(
        name="adaptive_kernels",
        version="0.1.0",
        description="Adaptive Depth Networks: models, self-distillation training, one-graph fused inference",
        packages=find_packages(include=["adaptive_kernels", "adaptive_kernels.*"]),
        package_data={"adaptive_kernels": ["EXT_SKIPPED"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.11", "numpy", "tqdm"],
        extras_require={
            "vision": ["torchvision>=0.26"],
            "plot": ["matplotlib"],
            # export_onnx and the CPU engine (compile() on a CPU input): the dynamo exporter and ONNX Runtime
            "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
            # compile(..., mechanism="openvino"): the CPU engine on OpenVINO, fp32 and (with NNCF) INT8
            "openvino": ["onnx>=1.16", "onnxscript>=0.2", "openvino>=2025.0", "nncf>=2.16"],
            # the SLO-aware server (adaptive_kernels.serving.http, serving.ray), its stock client for the tests and
            # the load test's open-loop client (bench/serving_load.py: aiohttp, until now only through ray[serve])
            "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "tritonclient[http]>=2.40",
                      "ray[serve]>=2.30", "aiohttp>=3.9"],
            "test": ["pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "torchvision>=0.26", "matplotlib"],
        },
        entry_points={"console_scripts": ["adaptive-kernels=adaptive_kernels.__main__:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
