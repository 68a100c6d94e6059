"""``verify_onnx``: ONNX Runtime on an exported file against the model, sub-network by sub-network;
``check_one_graph``: refuse a one-graph file that is not the model's."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch

from ..models.base import ADNModel
from ..models.skip import SkipConfig, SkipLike, skip_to_str
from ..numerics import relative_error
from .onnx import INPUT, MASK, OUTPUT, inference_only, mask_of
from .session import onnxruntime_session

logger = logging.getLogger(__name__)
#: fp32 through ONNX Runtime or torch.export reorders a few sums, nothing more
TOLERANCE = 1e-4


def verify_onnx(
    path: str | os.PathLike, model: ADNModel, x: torch.Tensor, skips: Sequence[SkipLike] | None = None
) -> dict[str, float]:
    """Relative error of ONNX Runtime on the file at ``path`` against ``model`` for each sub-network
    (default: all 2^S for a one-graph file; a static file is checked for the ``skips`` given, default super)."""
    session = onnxruntime_session(path)
    configs = _configs(session, model, skips)
    logger.info("[export] checking %d sub-network(s) with ONNX Runtime against the model (batch %d) ...",
                len(configs), x.shape[0])
    return _errors(session, model, x, configs)


def _configs(session, model: ADNModel, skips: Sequence[SkipLike] | None) -> list[SkipConfig]:
    """The parsed sub-networks to check: ``skips``, else every one of a one-graph file, the super-net of a static
    one."""
    if skips is not None:
        return [model.parse_skip(s) for s in skips]
    return model.skip_configs() if any(i.name == MASK for i in session.get_inputs()) else [model.parse_skip(None)]


def _errors(session, model: ADNModel, x: torch.Tensor, configs: Sequence[SkipConfig]) -> dict[str, float]:
    one_graph = any(i.name == MASK for i in session.get_inputs())
    errors = {}
    with inference_only(model), torch.no_grad():
        for skip in configs:
            feed = {INPUT: x.detach().cpu().float().numpy()}
            if one_graph:
                feed[MASK] = mask_of(skip).numpy()
            got, want = torch.from_numpy(session.run([OUTPUT], feed)[0]), model(x, skip).float().cpu()
            errors[skip_to_str(skip)] = relative_error(got, want) if got.shape == want.shape else math.inf
    return errors


def check_one_graph(onnx_model: bytes, model: ADNModel, x: torch.Tensor) -> None:
    """Refuse ``onnx_model`` unless it is a one-graph export of ``model``: inputs of its shapes, and
    ONNX Runtime's output within ``TOLERANCE`` of the model's on ``x`` for the super-net and the base-net (a file of
    another model, or of other weights, is never served as this one's). Raises ValueError naming the problem."""
    session = onnxruntime_session(onnx_model)
    name = type(model).__name__
    shapes = {i.name: i.shape for i in session.get_inputs()}
    want = {INPUT: list(x.shape[1:]), MASK: [model.num_skippable_stages]}
    if {INPUT: shapes.get(INPUT, [None])[1:], MASK: shapes.get(MASK)} != want:
        raise ValueError(f"onnx_model is not a one-graph export of this {name}: its inputs are {shapes}, this model "
                         f"needs {INPUT} (N, {', '.join(map(str, want[INPUT]))}) and {MASK} [{want[MASK][0]}]: "
                         f"export this model (export_onnx(model, path, x))")
    errors = _errors(session, model, x, [model.parse_skip(None), model.parse_skip("base")])
    bad = {k: e for k, e in errors.items() if not e < TOLERANCE}
    if bad:
        raise ValueError(f"onnx_model does not compute this {name}: relative error "
                         f"{', '.join(f'{e:.1e} for {k}' for k, e in bad.items())} (tolerance {TOLERANCE:g}); it is "
                         f"the file of another model or of other weights: export this model (export_onnx)")
