"""The package's layering, read from its source: each layer imports only the layers below it and nothing imports in
a circle (models <- kernels <- export <- engine <- training <- serving <- cli)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import adaptive_kernels

PACKAGE = Path(adaptive_kernels.__file__).parent
ROOT = PACKAGE.name
#: layer of each top-level part of the package; an import may only point to the same or a lower layer
LAYERS = {"_ext": -1, "_discovery": -1, "_files": -1, "_quiet": -1, "_version": -1, "numerics": -1,
          "models": 0, "kernels": 1, "export": 2, "engine": 3,
          "training": 4, "serving": 5, "cli": 6, "__main__": 6, "": 6}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (function bodies too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import name": the submodule pkg.name when there is one, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    found.discard(module)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return LAYERS[part]


def test_every_part_of_the_package_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in MODULES if "." in m} - LAYERS.keys())
    assert not unknown, f"give these parts of the package a layer in LAYERS: {unknown}"


def test_no_import_points_up_a_layer():
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    # Tarjan's strongly connected components over the module graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"modules importing each other in a circle: {circles}"


def test_the_checker_sees_imports():
    # the graph is read correctly: known edges, relative and absolute, at module level and inside functions
    assert f"{ROOT}.models.base" in GRAPH[f"{ROOT}.engine.dispatch"]
    assert f"{ROOT}.kernels.backend" in GRAPH[f"{ROOT}.engine.cuda.program"]
    assert f"{ROOT}._ext" in GRAPH[f"{ROOT}.engine.cuda.capture"]  # imported inside a function


def test_the_package_works_where_triton_cannot_be_imported():
    # Only the GPU kernels need Triton: the models, the engine's structure check and its CPU fallback must not
    code = f"""
import sys, warnings
sys.modules["triton"] = None  # import triton raises ImportError
import torch, {ROOT} as ak
from {ROOT}.engine import dispatch
assert not ak.kernels.HAS_TRITON and not hasattr(ak.kernels, "conv2d")
dispatch.onnxruntime_unavailable = lambda: "onnxruntime not installed"
model = ak.create_model("resnet20_adn").eval()
x = torch.randn(2, 3, 16, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine = ak.compile(model, x)
assert engine.mechanism == "reference" and "CUDA is not available" in str(caught[0].message)
torch.testing.assert_close(engine(x, "TFT"), model(x, "TFT"))
print("ok", sorted(m for m in sys.modules if m.startswith("{ROOT}.cli")))
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "ok []"  # and the library loaded no part of the command line
