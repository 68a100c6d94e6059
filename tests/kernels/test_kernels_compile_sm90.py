"""Every kernel compiles for sm_90 (Hopper) without a GPU: catches what the interpreter lets through
(dtype rules of tl.dot, bf16 code paths, constexpr misuse, shapes the backend rejects).

The kernels are compiled in a subprocess because under TRITON_INTERPRET=1 (set by conftest.py on
machines without CUDA) @triton.jit gives interpreter objects that cannot be compiled. The subprocess runs
this file as a script: it calls the real launchers on small CPU tensors with a recorder in place of each
kernel, so the compiled signature, constexprs and alignment hints are the ones a GPU launch would give,
then compiles one autotune config per variant with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
(the ASTSource arguments as in triton 3.6-3.9: name-keyed signature including "constexpr" entries,
name-keyed constexprs, attrs keyed by argument-index tuples).

The default configs of the two GEMMs (the first autotune config: what launches untuned) are also compiled, and
must use Hopper's wgmma (the PTX holds ``wgmma``) with no register spills (``ptxas -v`` on that PTX for sm_90a,
with the flags Triton passes): a spilling or non-wgmma default would be slow on every untuned GPU run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

# (variant name, module, dtype); the script builds each launch in _launch()
VARIANTS = [
    ("conv2d_gemm", "conv2d", "float16"),
    ("conv2d_gemm", "conv2d", "bfloat16"),
    ("conv2d_gemm_flat_k", "conv2d", "float16"),
    ("conv2d_gemm_split_k", "conv2d", "float16"),
    ("conv2d_gemm_split_k", "conv2d", "bfloat16"),
    ("conv2d_gemm_flat_k_split_k", "conv2d", "float16"),
    ("conv2d_split_k_reduce", "conv2d", "float16"),
    ("conv2d_split_k_reduce", "conv2d", "bfloat16"),
    ("conv2d_depthwise", "conv2d", "float16"),
    ("conv2d_depthwise", "conv2d", "bfloat16"),
    ("linear", "linear", "float16"),
    ("linear", "linear", "bfloat16"),
    ("linear_split_k", "linear", "float16"),
    ("linear_split_k", "linear", "bfloat16"),
    ("linear_split_k_reduce", "linear", "float16"),
    ("linear_split_k_reduce", "linear", "bfloat16"),
    ("layer_norm", "layer_norm", "float16"),
    ("layer_norm", "layer_norm", "bfloat16"),
    ("attention", "attention", "float16"),
    ("attention", "attention", "bfloat16"),
    ("gather_rows", "gather", "float16"),
    ("gather_rows", "gather", "bfloat16"),
]
# the GEMM variants (every epilogue feature on, GELU for linear) whose default config must use wgmma and not spill
DEFAULT_CONFIG_VARIANTS = [("conv2d_gemm", "conv2d", "float16"), ("linear", "linear", "float16")]
MAX_SHARED_SM90 = 232448  # bytes of shared memory one block may use on sm_90
# variants whose launch calls two kernels (split-K: partial sums, then the reduction shared by conv2d and linear,
# compiled with each op's epilogue): the one to compile
KERNEL_OF_VARIANT = {
    "conv2d_gemm_split_k": "_conv2d_kernel",
    "conv2d_gemm_flat_k_split_k": "_conv2d_kernel",
    "conv2d_split_k_reduce": "_split_k_reduce_kernel",
    "linear_split_k": "_linear_kernel",
    "linear_split_k_reduce": "_split_k_reduce_kernel",
}
# modules holding kernels a launcher may call besides its own module's
SHARED_KERNEL_MODULES = ("split_k",)


def _launch(name: str, dtype: torch.dtype) -> None:
    """Call the public launcher with every epilogue feature switched on (the largest code path)."""
    from adaptive_kernels import kernels as K

    def t(*shape, dt=dtype):
        return torch.randn(*shape).to(dt)

    mask = torch.ones(4, dtype=torch.int32)
    if name.startswith("conv2d"):
        depthwise = name == "conv2d_depthwise"
        flat_k = name.startswith("conv2d_gemm_flat_k")
        cin, cout = (3, 64) if flat_k else (64, 64) if depthwise else (64, 128)
        k, s, p = (7, 2, 3) if flat_k else (3, 1, 1)
        x = t(2, 16, 16, cin)
        ho = (16 + 2 * p - k) // s + 1
        w = K.pack_conv2d_weight(t(cout, 1 if depthwise else cin, k, k))
        res = t(2, ho, ho, cout)
        f32 = torch.float32
        split_k = 3 if "split_k" in name else 1
        workspace = torch.empty(split_k * 2 * ho * ho * cout, dtype=f32) if split_k > 1 else None
        K.conv2d(
            x,
            w,
            kernel_size=k,
            stride=s,
            padding=p,
            groups=cin if depthwise else 1,
            epilogue=K.Epilogue(
                scale=t(8, cout, dt=f32),  # a calibrated model's table: one row per sub-network, the id in mask[3]
                shift=t(8, cout, dt=f32),
                select_index=3,
                activation="relu6",
                residual=res,
                residual_relu=True,
                in_place=True,
                exit_index=2,
            ),
            mask=mask,
            split_k=split_k,
            workspace=workspace,
        )
    elif name.startswith("linear"):
        res = t(64, 96)
        split_k = 3 if "split_k" in name else 1
        workspace = torch.empty(split_k * 64 * 96, dtype=torch.float32) if split_k > 1 else None
        K.linear(
            t(64, 256),
            t(96, 256),
            epilogue=K.Epilogue(
                scale=t(8, 96),
                shift=t(8, 96),
                select_index=3,
                activation="gelu",
                residual=res,
                residual_relu=True,
                in_place=True,
                exit_index=1,
            ),
            mask=mask,
            split_k=split_k,
            workspace=workspace,
        )
    elif name == "layer_norm":
        x = t(64, 768)
        K.layer_norm(
            x,
            t(768),
            t(768),
            weight_skip=t(768),
            bias_skip=t(768),
            mask=mask,
            norm_index=0,
            exit_index=1,
            out=torch.empty_like(x),
        )
    elif name == "attention":
        q, k, v = t(8, 3, 49, 32), t(8, 3, 49, 32), t(8, 3, 49, 32)
        K.attention(q, k, v, t(4, 3, 49, 49), backend="triton", mask=mask, exit_index=3, out=torch.empty_like(q))
    elif name == "gather_rows":
        index = torch.randperm(49).int()
        K.gather_rows(t(8, 49, 96), index, mask=mask, exit_index=2, out=t(8, 49, 96))
    else:
        raise ValueError(name)


class _Recorder:
    """Stands in for an autotuned kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.calls = []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((args, kwargs))

        return record


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}


def _compile_variant(name: str, module_name: str, dtype_name: str, default_config: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    modules = [importlib.import_module(f"adaptive_kernels.kernels.{m}") for m in (module_name, *SHARED_KERNEL_MODULES)]
    recorders, originals = {}, []  # kernel names are unique across these modules
    for module in modules:
        for attr, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.Autotuner):
                recorders[attr] = _Recorder(value)
                originals.append((module, attr, value))
                setattr(module, attr, recorders[attr])
    try:
        _launch(name, getattr(torch, dtype_name))
    finally:
        for module, attr, value in originals:
            setattr(module, attr, value)
    called = {attr: r for attr, r in recorders.items() if r.calls}
    if name in KERNEL_OF_VARIANT:
        rec = called[KERNEL_OF_VARIANT[name]]
    else:
        (rec,) = called.values()
    ((args, kwargs),) = rec.calls
    fn = rec.autotuner.fn
    signature, attrs = {}, {}
    for i, (arg_name, arg) in enumerate(zip(fn.arg_names, args)):
        if isinstance(arg, torch.Tensor):
            signature[arg_name] = _PTR[arg.dtype]
            aligned = arg.data_ptr() % 16 == 0
        elif isinstance(arg, bool):
            signature[arg_name] = "i1"
            aligned = False
        elif isinstance(arg, int):
            signature[arg_name] = "i32" if -(2**31) <= arg < 2**31 else "i64"
            aligned = arg % 16 == 0
        else:
            signature[arg_name] = "fp32"
            aligned = False
        if aligned:  # what a GPU launch's specialisation would tell the compiler
            attrs[(i,)] = [["tt.divisibility", 16]]
    # the smallest tile compiles fastest and every config shares the code path; or the default (the first)
    configs = rec.autotuner.configs
    config = configs[0] if default_config else min(configs, key=lambda c: _tile_size(c.kwargs))
    constexprs = {**kwargs, **config.kwargs}
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn, signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    result = {"shared": int(compiled.metadata.shared), "asm": sorted(compiled.asm.keys()), "config": str(config)}
    if default_config:
        result["wgmma"] = "wgmma" in compiled.asm["ptx"]
        result["spill_bytes"] = _spill_bytes(compiled.asm["ptx"])
    return result


def _spill_bytes(ptx: str) -> int:
    """Spill stores + loads that ``ptxas -v`` reports for this PTX on sm_90a (Triton's ptxas and flags; its
    compiled kernel's n_spills needs a GPU to load the binary)."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [triton.knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src]
        log = subprocess.run([*cmd, "-o", src + ".o"], capture_output=True, text=True, check=True).stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not spills:
        raise RuntimeError(f"no spill counts in the ptxas -v log:\n{log}")
    return sum(int(a) + int(b) for a, b in spills)


def _tile_size(kwargs: dict) -> int:
    size = 1
    for v in kwargs.values():
        size *= v
    return size


def _main() -> None:
    from adaptive_kernels.kernels import _common

    # Launchers refuse CPU tensors unless the interpreter is on; nothing runs here, so let them through.
    _common.INTERPRET = True
    results = {}
    for name, module_name, dtype_name in VARIANTS:
        try:
            results[f"{name}-{dtype_name}"] = _compile_variant(name, module_name, dtype_name)
        except Exception as e:  # noqa: BLE001 (report every variant, not only the first failure)
            results[f"{name}-{dtype_name}"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
    for name, module_name, dtype_name in DEFAULT_CONFIG_VARIANTS:
        try:
            results[f"{name}-{dtype_name}-default"] = _compile_variant(name, module_name, dtype_name, True)
        except Exception as e:  # noqa: BLE001
            results[f"{name}-{dtype_name}-default"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"compile script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("name,module_name,dtype_name", VARIANTS, ids=[f"{v[0]}-{v[2]}" for v in VARIANTS])
def test_compiles_for_sm90(compiled, name, module_name, dtype_name):
    result = compiled[f"{name}-{dtype_name}"]
    assert "error" not in result, result.get("error")
    assert "cubin" in result["asm"] and "ptx" in result["asm"]
    assert 0 <= result["shared"] <= MAX_SHARED_SM90


@pytest.mark.parametrize(
    "name,module_name,dtype_name", DEFAULT_CONFIG_VARIANTS, ids=[f"{v[0]}-{v[2]}" for v in DEFAULT_CONFIG_VARIANTS]
)
def test_default_gemm_config_uses_wgmma_without_spills(compiled, name, module_name, dtype_name):
    result = compiled[f"{name}-{dtype_name}-default"]
    assert "error" not in result, result.get("error")
    assert result["wgmma"], f"{result['config']}: no wgmma in the PTX"
    assert result["spill_bytes"] == 0, f"{result['config']}: ptxas spills {result['spill_bytes']} bytes"


if __name__ == "__main__":
    _main()
