"""Training-step throughput: the paper's self-distillation step (``adn``: super-net pass with CE + base-net pass
with KL to the detached super-net, one optimizer step) against a plain step of the same network (``plain``)
and of the base depth trained alone (``single``). The paper's claim: ADN training costs about one ordinary
training run. Rows: ``train_step.json``, ``metric="train_step"``, ``median_us`` per step, ``images_per_s``,
``macs`` = forward MACs per image summed over the step's passes, ``peak_alloc_bytes`` on a GPU.

FULL mode: ResNet-50-ADN (batch 64) and ViT-B/16-ADN (batch 32) at 224 px, fp32 weights, bf16 autocast, SGD.
SMOKE mode (no GPU): resnet20_adn at 32x32, batch 8, fp32.
"""

from __future__ import annotations

import pytest
import torch

from bench import _harness as harness
from bench._harness import CUDA, DEVICE, SMOKE, ModelSpec, make_row, measure

CASES = (
    [(ModelSpec("resnet20_adn", input_size=(32, 32), num_stages=3), 8)]
    if SMOKE
    else [
        (ModelSpec("resnet50_adn", input_size=(224, 224), num_stages=4, channels_last=True), 64),
        (ModelSpec("vit_b_16_adn", input_size=(224, 224), num_stages=4), 32),
    ]
)
MODES = ("adn", "plain", "single")
NUM_CLASSES = 10 if SMOKE else 1000
TIMING = {"warmup": 1, "rounds": 2} if SMOKE else {"warmup": 3, "rounds": 10}
AUTOCAST = torch.bfloat16 if CUDA else None


def training_api():
    """(StepConfig, train_step) from adaptive_kernels.training; skips the test when it is not there yet."""
    try:
        from adaptive_kernels.training.step import StepConfig, train_step
    except ImportError as e:
        pytest.skip(f"adaptive_kernels.training.step (the training issue) is not there yet: {e}")
    return StepConfig, train_step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec,batch", CASES, ids=[f"{s.name}-b{b}" for s, b in CASES])
def test_train_step(benchmark_or_none, rows, spec, batch, mode):
    StepConfig, train_step = training_api()
    import adaptive_kernels as ak

    if spec.name not in ak.list_models():
        pytest.skip(f"model {spec.name!r} is not registered yet")
    torch.manual_seed(0)
    model = ak.create_model(spec.name, num_classes=NUM_CLASSES).to(DEVICE).train()
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    num_stages = model.num_skippable_stages
    super_net, base_net = (False,) * num_stages, (True,) * num_stages
    config = StepConfig(mode=mode, skip=base_net if mode == "single" else None)
    passes = {"adn": [super_net, base_net], "plain": [super_net], "single": [base_net]}[mode]

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, model.in_chans, *spec.input_size, generator=gen).to(DEVICE)
    if spec.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        return train_step(model, optimizer, images, targets, config, autocast_dtype=AUTOCAST)

    # The throughput comparison only means something if each mode does the work it claims: count the passes.
    forwards = []

    def record_skip(module, args, kwargs, out):
        forwards.append(kwargs["skip"] if "skip" in kwargs else (args[1] if len(args) > 1 else None))

    hook = model.register_forward_hook(record_skip, with_kwargs=True)
    try:
        losses = step()
    finally:
        hook.remove()
    assert [model.parse_skip(s) for s in forwards] == passes, f"{mode} step ran the sub-networks {forwards}"
    assert all(torch.isfinite(v).all() for v in losses.values()), losses

    if CUDA:
        harness.sync()
        torch.cuda.reset_peak_memory_stats()
    benchmark = benchmark_or_none()
    if benchmark is not None:
        benchmark.group = f"train step {spec.name} b{batch}"
    timing = measure(step, benchmark, **TIMING)
    extra = {"peak_alloc_bytes": torch.cuda.max_memory_allocated()} if CUDA else {}
    macs = sum(model.macs(s, spec.input_size) for s in passes)
    row = make_row(
        provider="eager",
        model=spec.name,
        skip="+".join(harness.skip_str(s) for s in passes),
        batch=batch,
        dtype=AUTOCAST or torch.float32,
        timing=timing,
        macs=macs,
        metric="train_step",
        step_mode=mode,
        forwards_per_step=len(passes),
        optimizer="SGD",
        images_per_s=round(batch / (timing.median_us * 1e-6), 2),
        **extra,
    )
    rows.add(row)
    assert row["median_us"] > 0
