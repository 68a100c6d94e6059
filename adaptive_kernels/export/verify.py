"""``verify_onnx``: ONNX Runtime on an exported file against the model, sub-network by sub-network."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..models.base import ADNModel
from ..models.skip import SkipLike, skip_to_str
from ..numerics import relative_error
from .onnx import INPUT, MASK, OUTPUT, inference_only, mask_of
from .session import onnxruntime_session


def verify_onnx(
    path: str | os.PathLike, model: ADNModel, x: torch.Tensor, skips: Sequence[SkipLike] | None = None
) -> dict[str, float]:
    """Relative error of ONNX Runtime on the file at ``path`` against ``model`` for each sub-network
    (default: all 2^S for a one-graph file; a static file is checked for the ``skips`` given, default super)."""
    session = onnxruntime_session(path)
    one_graph = any(i.name == MASK for i in session.get_inputs())
    if skips is None:
        configs = model.skip_configs() if one_graph else [model.parse_skip(None)]
    else:
        configs = [model.parse_skip(s) for s in skips]
    errors = {}
    with inference_only(model), torch.no_grad():
        for skip in configs:
            feed = {INPUT: x.detach().cpu().float().numpy()}
            if one_graph:
                feed[MASK] = mask_of(skip).numpy()
            got = torch.from_numpy(session.run([OUTPUT], feed)[0])
            errors[skip_to_str(skip)] = relative_error(got, model(x, skip).float().cpu())
    return errors
