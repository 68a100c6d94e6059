"""The memory a model and its forward pass need, estimated on the meta device (nothing is allocated), so that a
request far beyond the machine (a huge image size or batch, a model spec of absurd width) is refused in one line
before anything is allocated, instead of failing deep inside torch's allocator or being killed by the kernel."""

from __future__ import annotations

import os

import torch

from .registry import create_model

BYTES = 4  # fp32


def physical_memory() -> int:
    """The machine's memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_needed(name: str, kwargs: dict, input_shape: tuple[int, ...] | None = None, *,
                  training: bool = False) -> int:
    """A lower bound, in bytes, of what ``create_model(name, **kwargs)`` needs on the CPU in fp32: its parameters,
    and with ``input_shape`` (N, C, H, W) one super-net forward (inference: the largest layer output twice, input
    and output; ``training``: every layer output kept for backward, plus gradients and optimizer state)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if input_shape is None:
        return BYTES * params
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel() if isinstance(o, torch.Tensor) else 0))
             for m in model.modules() if not any(True for _ in m.children())]
    with torch.no_grad():
        model.eval()(torch.empty(input_shape, device="meta"))
    for h in hooks:
        h.remove()
    if training:
        return BYTES * (3 * params + sum(outputs))
    return BYTES * (params + 2 * max(outputs, default=0))


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Raise ValueError when ``nbytes`` exceeds the machine's memory: "{what} needs about X GiB ...: {fix}"."""
    total = physical_memory()
    if total and nbytes > total:
        raise ValueError(f"{what} needs at least {nbytes / 2**30:,.1f} GiB of memory, more than this machine's "
                         f"{total / 2**30:.0f} GiB: {fix}")
