"""One engine shared by many threads (docs/engine.md, "Threads"): ``engine(x, skip)`` from 8 threads at once, each
call with its own sub-network drawn at random, gives every call its own sub-network's output (the torch model run
alone, one thread), calibrated or not, for every engine kind that runs on the CPU: the reference engine, the ONNX
Runtime engine, and the CUDA-graph engine's own logic (its lock, device mask and static buffers) with the graph
replaced by eager execution. Calls without ``skip`` while ``profile()`` runs in another thread serve the sub-network
set last. The CUDA engine itself: tests/engine/test_engine_gpu.py (gpu)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import EagerCapture, wrong_outputs_from_threads

from adaptive_kernels.engine import compile
from adaptive_kernels.engine.cuda import engine as engine_module
from adaptive_kernels.engine.cuda.engine import CudaGraphEngine
from adaptive_kernels.engine.cuda.lowering import lower
from adaptive_kernels.kernels import reference_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
MODEL_WIDTH = 8  # the `model` fixture (tests/engine/conftest.py)



def graph_logic_engine(model):
    """The CUDA-graph engine on the CPU: its program with the reference kernels, executed eagerly on "replay"."""
    program = lower(model, (3, 16, 16), kernels=reference_kernels(), dtype=torch.float32, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "CapturedGraph", EagerCapture)
        return CudaGraphEngine(program, X, mechanism="early_exit", dynamic_batch=False)


def reference_engine(model):
    with pytest.warns(UserWarning, match="running the reference model"):
        return compile(model, X, mechanism="early_exit")


BUILD = {"reference": reference_engine, "onnxruntime": lambda model: compile(model, X), "graph_logic": graph_logic_engine}


@pytest.fixture(scope="module")
def engines(model):
    """Each engine kind, built once per model (the ONNX Runtime engine exports the model)."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = BUILD[kind](model)
            assert built[kind].mechanism == {"graph_logic": "early_exit"}.get(kind, kind)
        return built[kind]

    return get


@pytest.mark.parametrize("kind", list(BUILD))
def test_threads_sharing_one_engine_each_get_their_own_subnetwork(engines, want, kind):
    engine = engines(kind)
    wrong = wrong_outputs_from_threads(engine, X, want)
    assert wrong == 0, f"{kind}: {wrong} of 200 outputs were not their own sub-network's"


def test_threads_sharing_one_engine_with_numpy_inputs_each_get_their_own_subnetwork(engines, want):
    engine = engines("onnxruntime")
    wrong = wrong_outputs_from_threads(lambda x, skip: torch.from_numpy(engine(x.numpy(), skip)), X, want)
    assert wrong == 0, f"{wrong} of 200 outputs were not their own sub-network's"


@pytest.mark.parametrize("kind", ["reference", "onnxruntime"])
def test_calls_while_profile_runs_serve_the_subnetwork_set_last(engines, want, kind):
    engine = engines(kind)
    engine.set_skip("FTF")
    ftf = (False, True, False)
    with ThreadPoolExecutor(1) as pool:
        profiling = pool.submit(lambda: [engine.profile(iters=2, warmup=0) for _ in range(3)])
        wrong = wrong_outputs_from_threads(lambda x, skip: engine(x), X, {ftf: want[ftf]}, threads=7)
        tables = profiling.result()
    assert wrong == 0, f"{kind}: {wrong} of 175 calls without skip did not run the sub-network set last"
    assert engine.skip == ftf and all(len(table) == 8 for table in tables)
