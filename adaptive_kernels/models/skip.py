"""Skip configurations: parsing and enumeration.

A skip configuration is one bool per skippable stage, ``True`` = skip that stage's skippable
sub-path. Accepted spellings everywhere in the package (models, engine, CLI):

* ``None`` or ``"super"``: nothing skipped (the super-net);
* ``"base"``: every skippable sub-path skipped (the base-net);
* a string of ``T``/``F`` letters, one per stage, e.g. ``"TFFT"`` (case-insensitive);
* a sequence of bools (``0``/``1`` ints are accepted too), e.g. ``[True, False, False, True]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

SkipConfig = tuple[bool, ...]
SkipLike = None | str | Sequence[bool]


def parse_skip(skip: SkipLike, num_stages: int) -> SkipConfig:
    """Normalise any accepted spelling of a skip configuration to a tuple of ``num_stages`` bools."""
    example = "T" * num_stages
    if skip is None:
        return (False,) * num_stages
    if isinstance(skip, str):
        word = skip.strip().lower()
        if word == "super":
            return (False,) * num_stages
        if word == "base":
            return (True,) * num_stages
        bad = sorted({c for c in skip.strip().upper() if c not in "TF"})
        if bad:
            raise ValueError(
                f"skip={skip!r} has unknown letter(s) {''.join(bad)!r}: use 'super', 'base', or "
                f"{num_stages} letters T (skip) / F (run), e.g. {example!r}"
            )
        if len(word) != num_stages:
            raise ValueError(
                f"skip={skip!r} has {len(word)} letters but this model has {num_stages} skippable "
                f"stages: give {num_stages} letters T/F, e.g. {example!r}"
            )
        return tuple(c == "t" for c in word)
    if hasattr(skip, "tolist") and not isinstance(skip, (list, tuple)):
        skip = skip.tolist()  # numpy arrays and tensors
    if isinstance(skip, (bytes, bytearray)):
        raise TypeError(f"skip={skip!r} is bytes: give a str (skip.decode()), e.g. {example!r}")
    if not isinstance(skip, Sequence):
        raise TypeError(
            f"skip must be None, 'super', 'base', a T/F string or a sequence of bools, "
            f"got {type(skip).__name__}"
        )
    if len(skip) != num_stages:
        raise ValueError(
            f"skip has {len(skip)} entries but this model has {num_stages} skippable stages "
            f"(one bool per stage, True = skip), e.g. {[True] * num_stages}"
        )
    out = []
    for i, v in enumerate(skip):
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
            v = v.item()  # a NumPy or torch scalar (np.True_, torch.tensor(1))
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            out.append(bool(v))
        else:
            raise ValueError(f"skip[{i}]={v!r} is not a bool: use True (skip) or False (run)")
    return tuple(out)


def skip_to_str(skip: SkipConfig) -> str:
    """``(True, False)`` -> ``"TF"``."""
    return "".join("T" if s else "F" for s in skip)


def all_skip_configs(num_stages: int) -> list[SkipConfig]:
    """All ``2**num_stages`` configurations, super-net (all False) first, base-net (all True) last."""
    return [tuple(c) for c in itertools.product((False, True), repeat=num_stages)]


def skip_to_mask(skip: SkipConfig) -> list[int]:
    """THE mask contract of the engines, the kernels and the one-graph export: one int per skippable stage,
    1 = run the stage's skippable sub-path, 0 = skip it. ``skip`` is parsed (a tuple of bools, True = skip)."""
    if not isinstance(skip, (tuple, list)) or not all(isinstance(s, bool) for s in skip):
        raise TypeError(f"skip_to_mask takes a parsed skip configuration (a tuple of bools): got {skip!r}; "
                        f"parse a name or string first with adaptive_kernels.parse_skip(skip, num_stages)")
    return [0 if s else 1 for s in skip]


def stage_bit(stage: int, num_stages: int) -> int:
    """The bit that is set in ``subnet_index`` when ``stage`` is skipped: stage 0 is the most significant."""
    return 1 << (num_stages - 1 - stage)


def subnet_index(skip: SkipConfig) -> int:
    """The sub-network's position in ``all_skip_configs(len(skip))``: stage 0 is the most significant bit
    (``(False, False, False)`` -> 0, the super-net; ``(True, True, True)`` -> 7, the base-net). It indexes the
    per-sub-network norm tables of a calibrated model (``models/norms.py``); the engine's lowering and the
    one-graph export compute the same index with ``stage_bit``."""
    return sum(stage_bit(k, len(skip)) for k, flag in enumerate(skip) if flag)
