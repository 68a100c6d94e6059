"""setup.py's install paths: finding the CUDA toolkit (on fake folders), installing without the extension, with a
note naming cause and fix, when compiling fails, and the real pip wheel + install of a copy of the checkout."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from pathlib import Path

import pytest
from setuptools import Distribution, Extension
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("adn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the functions, builds nothing
    return module


def toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_bytes(b"\x7fELF fake compiler")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def find(setup_py, tmp_path, environ):
    return setup_py.find_cuda_home(environ, shutil.which, standard=(str(tmp_path / "std" / "cuda"),
                                                                    str(tmp_path / "std" / "cuda-*")))


def test_wrapper_script_on_path_leads_to_the_real_toolkit(setup_py, tmp_path):
    """The README's failure: nvcc on PATH is /usr/local/bin/nvcc, a script; torch then guesses /usr/local."""
    real = toolkit(tmp_path / "cuda-13.0")
    executable(tmp_path / "usr-local" / "bin" / "nvcc", f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    found, how = find(setup_py, tmp_path, {"PATH": str(tmp_path / "usr-local" / "bin")})
    assert found == str(real) and "the nvcc that" in how


def test_symlinked_nvcc_and_explicit_variables(setup_py, tmp_path):
    real = toolkit(tmp_path / "tk")
    (tmp_path / "bin").mkdir()
    os.symlink(real / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    path = {"PATH": str(tmp_path / "bin")}
    assert find(setup_py, tmp_path, path)[0] == str(real)
    # CUDA_HOME wins when it is a toolkit; one without headers (torch's /usr/local guess) is passed over.
    other = toolkit(tmp_path / "other")
    assert find(setup_py, tmp_path, {**path, "CUDA_HOME": str(other)}) == (str(other), "$CUDA_HOME")
    assert find(setup_py, tmp_path, {**path, "CUDA_PATH": str(tmp_path)})[0] == str(real)


def test_standard_folders_newest_first_and_nothing_found(setup_py, tmp_path):
    assert find(setup_py, tmp_path, {"PATH": ""})[0] is None
    found, how = find(setup_py, tmp_path, {"PATH": "", "CUDA_HOME": str(tmp_path / "nope")})
    assert found is None and how.startswith("no CUDA toolkit") and str(tmp_path / "nope") in how
    for version in ("12.4", "12.10", "11.8"):
        toolkit(tmp_path / "std" / f"cuda-{version}")
    assert find(setup_py, tmp_path, {"PATH": ""})[0] == str(tmp_path / "std" / "cuda-12.10")


def run_build(setup_py, tmp_path, monkeypatch, force):
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.chdir(tmp_path)
    dist = Distribution({"name": "t", "ext_modules": [Extension("t._C", ["broken.c"])]})
    cmd = setup_py.optional_build_ext(build_ext, force, note_path=str(tmp_path / "EXT_SKIPPED"))(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    return cmd


def test_failed_compile_installs_without_the_extension(setup_py, tmp_path, monkeypatch, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cmd = run_build(setup_py, tmp_path, monkeypatch, force=False)
    assert cmd.get_outputs() == []  # nothing for the wheel to copy
    note = (tmp_path / "EXT_SKIPPED").read_text()
    assert note.startswith("compiling csrc/ failed (") and "Fix: see the compiler output with pip install -v" in note
    assert any("installing WITHOUT the CUDA extension" in str(w.message) for w in caught)
    assert "WARNING: adaptive_kernels: installing WITHOUT the CUDA extension" in capfd.readouterr().err


def test_force_keeps_the_compile_error(setup_py, tmp_path, monkeypatch):
    with pytest.raises(Exception, match="broken.c"):  # the compiler's own failure, unchanged
        run_build(setup_py, tmp_path, monkeypatch, force=True)
    assert not (tmp_path / "EXT_SKIPPED").exists()


def test_pip_wheel_and_install_as_typed_without_the_extension(tmp_path):
    """The real pip path (not setup.py's functions): ``pip wheel --no-build-isolation`` of a copy of the
    checkout with ADN_SKIP_EXT=1 (compiling the extension takes minutes), installed with ``pip install
    --no-deps --target``: the wheel holds the package and the skip note, and the installed copy imports from its
    folder and reports why it has no extension."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "ADN_SKIP_EXT": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                   env=env, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("adaptive_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"adaptive_kernels/__init__.py", "adaptive_kernels/kernels/conv2d.py", "adaptive_kernels/export/onnx.py",
            "adaptive_kernels/EXT_SKIPPED"} <= names
    assert not any(n.endswith(".so") for n in names)
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   env=env, check=True, capture_output=True, timeout=600)
    probe = ("import adaptive_kernels as ak, pathlib; "
             "print(pathlib.Path(ak.__file__).parent); print(ak.HAS_EXT); print(ak.EXT_ERROR)")
    # -S: no .pth files, so the checkout's own editable install (a path finder of its own) stays out of the way
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    out = subprocess.run([sys.executable, "-S", "-c", probe], env={**os.environ, "PYTHONPATH": path},
                         cwd=tmp_path, capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    assert out[0] == str(target / "adaptive_kernels") and out[1] == "False"
    assert "was not built at install: ADN_SKIP_EXT=1 is set. Fix: unset ADN_SKIP_EXT" in out[2]
