"""Shared test helpers: models with randomised norms, the relative error, the fp16 error rule, the device mask, calls
from many threads, the CUDA graph replaced by eager execution."""

from __future__ import annotations

import copy
import itertools
import random
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from adaptive_kernels.engine.cuda.runtime import allocate_buffers, execute
from adaptive_kernels.models.skip import skip_to_mask
from adaptive_kernels.numerics import relative_error


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int | torch.Generator) -> None:
    """Random affine parameters and running statistics in every BatchNorm2d (each ``_skip`` twin
    independently), so twins and layers differ and a wrong norm set or a folding bug shows."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, calibrate: tuple[int, ...] | None = None) -> nn.Module:
    """Give every norm (each ``_skip`` twin independently) random affine parameters and BN running
    statistics, and every Linear random weights (ViT's head starts at zero), then switch to eval mode.

    With identity BN statistics a folding bug (or a wrong norm set) could go unnoticed. ``calibrate``: an
    input shape; BN statistics are then measured on random inputs of that shape, as training would (super-net
    passes for the normal set, base-net passes for the ``_skip`` twins), so activations neither saturate nor
    vanish and every sub-network's output differs clearly from the others.
    """
    g = torch.Generator().manual_seed(seed)
    randomize_norms(model, g)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(torch.rand(m.normalized_shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.normalized_shape, generator=g) * 0.2)
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    if calibrate is not None:
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        device = next(model.parameters()).device
        for _ in range(2):
            x = torch.randn(calibrate, generator=g).to(device)
            model(x, "super")
            model(x, "base")
        for m in bns:
            m.momentum = 0.1
    return model.eval()


rel_err = relative_error  # the library's measure (adaptive_kernels/numerics.py), under the tests' short name


#: The fp16 rule of the engine tests (GPU and the CPU numerics emulation), as the kernel tests' rule for one op: the
#: engine's error against the fp32 model may be at most this multiple of the error of the same model run by torch in
#: fp16. fp16 rounding alone puts ~1e-2 into a deep CNN's logits (ResNet-50-ADN: weights alone 1.4e-2), so a fixed
#: tolerance either fails for rounding or hides bugs; the ratio stays near 1 (0.85-1.2 in the CPU emulation) while
#: running a wrong sub-network or norm set costs 0.1-1.
FP16_ERROR_FACTOR = 2.0


def small_resnet20(width: int, calibrated: bool) -> nn.Module:
    """A random ResNet-20-ADN for 3 x 16 x 16 inputs, in eval mode; ``calibrated``: with per-sub-network norm tables
    from shifted images, clearly unlike its running statistics."""
    from adaptive_kernels import calibrate, create_model

    torch.manual_seed(0)
    model = randomize(create_model("resnet20_adn", width=width), calibrate=(4, 3, 16, 16))
    if calibrated:
        calibrate(model, 3 * torch.randn(8, 3, 16, 16) + 1)
    return model.eval()


def every_subnetwork(model: nn.Module, x: torch.Tensor) -> dict[tuple[bool, ...], torch.Tensor]:
    """Each sub-network's output on ``x``, the model run alone in this thread."""
    with torch.no_grad():
        return {skip: model(x, skip) for skip in model.skip_configs()}


def outputs_after_set_skip(engine, x: torch.Tensor, configs: list[tuple[bool, ...]]):
    """Yields ``(skip, engine(x))`` for every configuration twice, in a shuffled order, each call made right after
    ``engine.set_skip(skip)``: a test asserts each output is that sub-network's."""
    configs = list(configs) * 2
    random.Random(0).shuffle(configs)
    with torch.no_grad():
        for skip in configs:
            engine.set_skip(skip)
            yield skip, engine(x)


def torch_fp16(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in fp16 (parameters and buffers), run by torch: the yardstick of :func:`check_fp16_error`."""
    return copy.deepcopy(model).half()


def check_fp16_error(got: torch.Tensor, want: torch.Tensor, torch_half: torch.Tensor, what: object) -> float:
    """Assert ``rel_err(got, want) <= FP16_ERROR_FACTOR * rel_err(torch_half, want)``.

    got: the engine's fp16 output; want: the fp32 model's; torch_half: the :func:`torch_fp16` model's on the
    fp16-rounded input. Returns torch's error (the bound's yardstick)."""
    ours, theirs = rel_err(got, want), rel_err(torch_half, want)
    assert ours <= FP16_ERROR_FACTOR * theirs, (
        f"{what}: error {ours:.2e} vs the fp32 model is more than {FP16_ERROR_FACTOR} x torch's own fp16 error "
        f"{theirs:.2e}: not rounding, a bug"
    )
    return theirs


def device_mask(skip: tuple[bool, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernels' mask for a skip configuration: int32, 1 = run the stage's skippable sub-path."""
    return torch.tensor(skip_to_mask(skip), dtype=torch.int32, device=device)


def wrong_outputs_from_threads(
    call: Callable[[torch.Tensor, tuple[bool, ...]], torch.Tensor],
    x: torch.Tensor,
    want: Mapping[tuple[bool, ...], torch.Tensor],
    *,
    threads: int = 8,
    calls: int = 25,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> int:
    """How many of ``threads`` x ``calls`` outputs of ``call(x, skip)``, called from ``threads`` threads at once, are
    not their own sub-network's: each call draws its ``skip`` at random (seeded per thread) from ``want``
    ({skip: that sub-network's output, run alone}) and is wrong when its relative error exceeds ``tolerance``.

    Every two outputs in ``want`` must differ by more than ``tolerance`` (asserted first): a call that ran another
    sub-network then counts as wrong."""
    for (a, ya), (b, yb) in itertools.combinations(want.items(), 2):
        assert rel_err(ya, yb) > 10 * tolerance, f"sub-networks {a} and {b} are too alike to tell apart"
    configs = list(want)
    start = threading.Barrier(threads)

    def run(thread: int) -> int:
        rng = random.Random(seed * threads + thread)
        start.wait()
        picks = [rng.choice(configs) for _ in range(calls)]
        with torch.no_grad():  # grad mode is per thread
            return sum(rel_err(call(x, skip), want[skip]) > tolerance for skip in picks)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(run, range(threads)))  # a thread's exception is raised here


class EagerCapture:
    """Stands in for ``CapturedGraph`` on the CPU (monkeypatch ``engine.cuda.engine.CapturedGraph``): "replay"
    executes the program eagerly with early exit, reading the engine's device mask exactly as the captured kernels
    would."""

    def __init__(self, program, input_shape, input_dtype, device, mask, mechanism, streams=None):
        assert mechanism == "early_exit" and streams is None
        self.program, self.mask = program, mask
        self.tensors = allocate_buffers(program, input_shape[0], device, input_dtype)
        self.input = self.tensors[program.input]

    def replay(self, x):
        self.input.copy_(x)
        return execute(self.program, self.tensors, self.mask, bodies="early_exit")
