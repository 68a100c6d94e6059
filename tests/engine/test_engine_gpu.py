"""On a GPU: the IF-node splice itself, then the engine against the fp32 reference model for every
sub-network of ResNet-50-ADN and ViT-B/16-ADN (fp16, batch 1 and 64, both mechanisms), one capture for
all of them in any order, stream-ordered switching, a calibrated model (per-sub-network BN tables), dynamic batch,
profile + select_skip, one engine called from many threads and streams at once.
fp16 outputs are held to helpers.check_fp16_error (within a small multiple of torch's own fp16 error), the rule
tests/engine/test_engine_numerics_emulation.py checks for every family on the CPU. Skipped without CUDA
(conftest.py)."""

from __future__ import annotations

import itertools
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import check_fp16_error, randomize, rel_err, torch_fp16, wrong_outputs_from_threads

from adaptive_kernels import calibrate, create_model
from adaptive_kernels.engine import compile, select_skip
from adaptive_kernels.engine.cuda.capture import IfNodeSplicer, capture_streams, conditional_nodes_unavailable

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_references")]  # tests/conftest.py


def _needs_conditional(mechanism: str) -> None:
    why = conditional_nodes_unavailable() if torch.cuda.is_available() else "no CUDA"
    if mechanism == "conditional" and why is not None:
        pytest.skip(f"conditional mechanism unavailable: {why}")


def test_if_nodes_spliced_into_a_torch_capture_follow_the_mask():
    _needs_conditional("conditional")
    stages, n = 4, 1 << 14
    y = torch.zeros(n, device="cuda")
    mask = torch.ones(stages, dtype=torch.int32, device="cuda")
    streams = capture_streams(torch.cuda.Stream)
    splicer = IfNodeSplicer(streams.body)
    y.mul_(0.5).add_(1.0)  # warm up the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=streams.capture):
        splicer.create_conditions(mask, list(range(stages)))
        for stage in range(stages):
            y.mul_(0.5).add_(1.0)  # mandatory
            with splicer.body(stage):
                y.mul_(0.9).add_(0.1)  # skippable, in place
                y.mul_(0.9).add_(0.1)
    for bits in range(2**stages):
        run = [(bits >> s) & 1 for s in range(stages)]
        mask.copy_(torch.tensor(run, dtype=torch.int32))
        y.zero_()
        graph.replay()
        want = 0.0
        for s in range(stages):
            want = want * 0.5 + 1.0
            if run[s]:
                want = (want * 0.9 + 0.1) * 0.9 + 0.1
        torch.testing.assert_close(y, torch.full_like(y, want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference_models():
    """ResNet-50-ADN (calibrated random BN statistics) and ViT-B/16-ADN (random norms and head), fp32 on GPU, each
    with its torch fp16 copy."""
    torch.manual_seed(0)
    resnet = randomize(create_model("resnet50_adn").cuda(), calibrate=(8, 3, 224, 224))
    vit = randomize(create_model("vit_b_16_adn").cuda())
    return {name: (m, torch_fp16(m)) for name, m in (("resnet50_adn", resnet), ("vit_b_16_adn", vit))}


@pytest.mark.parametrize("mechanism", ["conditional", "early_exit"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("name", ["resnet50_adn", "vit_b_16_adn"])
def test_every_subnetwork_matches_the_reference_from_one_capture(reference_models, name, batch, mechanism):
    _needs_conditional(mechanism)
    model, half = reference_models[name]
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    engine = compile(model, x, dtype=torch.float16, mechanism=mechanism)
    assert engine.mechanism == mechanism and engine.capture_count == 1
    configs = model.skip_configs()
    random.Random(batch).shuffle(configs)
    with torch.no_grad():
        for skip in configs:
            got = engine(x, skip)
            assert got.dtype == torch.float16 and got.shape == (batch, 1000)
            check_fp16_error(got, model(x, skip), half(x.half(), skip), (name, batch, mechanism, skip))
    assert engine.capture_count == 1


@pytest.mark.parametrize("mechanism", ["conditional", "early_exit"])
def test_switching_is_stream_ordered_and_never_recaptures(mechanism):
    _needs_conditional(mechanism)
    torch.manual_seed(1)
    model = randomize(create_model("resnet20_adn").cuda(), calibrate=(8, 3, 32, 32))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    engine = compile(model, x, mechanism=mechanism)
    half = torch_fp16(model)
    with torch.no_grad():
        want = {skip: (model(x, skip), half(x.half(), skip)) for skip in model.skip_configs()}
        rng = random.Random(0)
        picks = [rng.choice(model.skip_configs()) for _ in range(40)]
        outs = []
        for skip in picks:  # no host synchronisation between switches
            engine.set_skip(skip)
            outs.append(engine(x))
        for skip, got in zip(picks, outs):
            check_fp16_error(got, *want[skip], skip)
    assert engine.capture_count == 1
    table = engine.profile(iters=5, warmup=2)
    assert set(table) == {"".join("T" if s else "F" for s in c) for c in model.skip_configs()}
    accuracy = {k: 90.0 - k.count("T") for k in table}
    assert select_skip(table, accuracy, max(table.values()) + 1) == (False, False, False)


def _calibrated_fp32_engine(mechanism, seed):
    """A calibrated random ResNet-20-ADN, a batch, its fp32 engine and the eager outputs of every sub-network."""
    _needs_conditional(mechanism)
    torch.manual_seed(seed)
    model = randomize(create_model("resnet20_adn").cuda(), calibrate=(8, 3, 32, 32))
    calibrate(model, 3 * torch.randn(16, 3, 32, 32, device="cuda") + 1)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    engine = compile(model, x, dtype=torch.float32, mechanism=mechanism)
    with torch.no_grad():
        want = {skip: model(x, skip) for skip in model.skip_configs()}
    return model, x, engine, want


@pytest.mark.parametrize("mechanism", ["conditional", "early_exit"])
def test_calibrated_model_every_subnetwork_from_one_capture(mechanism):
    # per-sub-network BN tables selected on the device by the sub-network id, which set_skip writes after the stage
    # bits: fp32 engine vs the calibrated eager model, switching in random order without host syncs
    model, x, engine, want = _calibrated_fp32_engine(mechanism, seed=4)
    with torch.no_grad():
        picks = model.skip_configs() * 2
        random.Random(1).shuffle(picks)
        outs = []
        for skip in picks:
            engine.set_skip(skip)
            outs.append(engine(x))
        for skip, got in zip(picks, outs):
            assert rel_err(got, want[skip]) < 1e-4, (mechanism, skip, rel_err(got, want[skip]))
    assert engine.capture_count == 1


@pytest.mark.parametrize("mechanism", ["conditional", "early_exit"])
def test_threads_on_their_own_streams_each_get_their_own_subnetwork(mechanism):
    # one engine, 8 threads at once (every other one on a CUDA stream of its own) while profile() runs in another:
    # the lock and the stream ordering keep each call's mask, input and output its own (docs/engine.md, "Threads")
    _, x, engine, want = _calibrated_fp32_engine(mechanism, seed=5)
    torch.cuda.synchronize()
    own, threads = threading.local(), itertools.count()

    def call(x, skip):
        if not hasattr(own, "stream"):
            own.stream = torch.cuda.Stream() if next(threads) % 2 else torch.cuda.current_stream()
        with torch.cuda.stream(own.stream):
            out = engine(x, skip)
        own.stream.synchronize()
        return out

    with ThreadPoolExecutor(1) as pool:
        profiling = pool.submit(engine.profile, iters=5, warmup=1)
        wrong = wrong_outputs_from_threads(call, x, want)
        table = profiling.result()
    assert wrong == 0, f"{mechanism}: {wrong} of 200 outputs were not their own sub-network's"
    assert len(table) == 8 and engine.capture_count == 1


def test_dynamic_batch_captures_once_per_batch_size(caplog):
    caplog.set_level("INFO", logger="adaptive_kernels.engine.cuda.engine")
    torch.manual_seed(2)
    model = randomize(create_model("resnet20_adn").cuda(), calibrate=(8, 3, 32, 32))
    engine = compile(model, torch.randn(2, 3, 32, 32, device="cuda"), dynamic_batch=True)
    half = torch_fp16(model)
    seen = {2}
    with torch.no_grad():
        for batch in (2, 3, 2, 3, 5):
            x = torch.randn(batch, 3, 32, 32, device="cuda")
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                got = engine(x, "FTF")
            new = batch not in seen
            seen.add(batch)
            reports = [w for w in record if "capturing a new CUDA graph" in str(w.message)]
            assert len(reports) == int(new)
            assert engine.capture_count == len(seen)
            check_fp16_error(got, model(x, "FTF"), half(x.half(), "FTF"), batch)
    # every capture is logged with its time (the first on a machine includes Triton's compiling)
    assert sum("captured ResNetADN" in r.getMessage() for r in caplog.records) == engine.capture_count


def test_gpu_engine_rejects_bad_input():
    model = create_model("resnet20_adn").cuda().eval()
    engine = compile(model, torch.randn(2, 3, 32, 32, device="cuda"))
    with pytest.raises(ValueError, match=r"is on cpu; this engine was compiled for \(2, 3, 32, 32\)"):
        engine(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="has dtype torch.float16"):
        engine(torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="compile with dynamic_batch=True"):
        engine(torch.randn(4, 3, 32, 32, device="cuda"))


@pytest.mark.parametrize("name", ["mobilenet_v2_adn", "deit_small_adn", "swin_t_adn"])
def test_other_lowered_families_match_the_reference(name):
    torch.manual_seed(3)
    model = create_model(name, num_classes=10).cuda()
    model = randomize(model, calibrate=(8, 3, 224, 224) if name.startswith("mobilenet") else None)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    engine = compile(model, x)
    half = torch_fp16(model)
    with torch.no_grad():
        for skip in model.skip_configs():
            check_fp16_error(engine(x, skip), model(x, skip), half(x.half(), skip), (name, skip))
    assert engine.capture_count == 1
