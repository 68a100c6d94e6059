"""The program's invariants (engine/cuda/program.py: validate) on hand-built toy programs: in-place bodies
pass; values leaking out of a skippable body, temporaries allocated inside one, reads before any write, a wrong
in-place epilogue and a norm-row slot outside the mask are refused with the op named."""

from __future__ import annotations

import pytest
import torch

from adaptive_kernels.engine.cuda.lowering import LoweringError
from adaptive_kernels.engine.cuda.ops import Conv, MaxPool
from adaptive_kernels.engine.cuda.program import Body, Program, Value, validate
from adaptive_kernels.kernels import Epilogue, reference_kernels


def _conv(x: Value, out: Value, residual: Value | None = None) -> Conv:
    w = torch.zeros(4, 4, 1, 1)
    one = torch.ones(4)
    epilogue = Epilogue(scale=one, shift=one, residual=residual, in_place=residual is not None)
    return Conv(x, out, w, epilogue, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), groups=1)


def _program(items, inp, out) -> Program:
    return Program(items, inp, out, 1, reference_kernels(), torch.float32, "toy")


def test_validate_accepts_in_place_bodies_and_rejects_leaks():
    inp, a, scratch = Value("in", (2, 2, 4)), Value("a", (2, 2, 4)), Value("s", (2, 2, 4))
    out = Value("out", (2, 2, 4))
    ok = _program([_conv(inp, a), Body(0, [_conv(a, scratch), _conv(scratch, a, residual=a)]), _conv(a, out)], inp, out)
    validate(ok)
    leak = _program([_conv(inp, a), Body(0, [_conv(a, scratch)]), _conv(scratch, out)], inp, out)
    with pytest.raises(LoweringError, match="defined inside the skippable body of stage 0"):
        validate(leak)
    pooled = Value("p", (1, 1, 4))
    alloc = _program([_conv(inp, a), Body(0, [MaxPool(a, pooled, 2, 2, 0)]), _conv(a, out)], inp, out)
    with pytest.raises(LoweringError, match="allocates a temporary inside the skippable body"):
        validate(alloc)
    undefined = _program([_conv(a, out)], inp, out)
    with pytest.raises(LoweringError, match="before any op writes it"):
        validate(undefined)
    not_in_place = _conv(a, out, residual=a)  # out must be the residual Value when in place
    with pytest.raises(LoweringError, match="in_place=True but out is not its residual"):
        validate(_program([_conv(inp, a), not_in_place], inp, out))
    selects = _conv(inp, out)
    selects.epilogue = Epilogue(scale=torch.ones(2, 4), select_index=1)  # mask slot 1 of a 1-stage program
    with pytest.raises(LoweringError, match="selects its norm row with mask slot 1, but the program's mask has 1"):
        validate(_program([selects], inp, out))
