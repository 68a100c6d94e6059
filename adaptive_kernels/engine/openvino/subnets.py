"""One sub-network cut out of the one graph, and its INT8 quantization.

:func:`specialize` turns the one graph (an ``If`` per stage on the ``mask`` input) into the static graph of one
sub-network: the mask becomes a constant, OpenVINO's constant folding resolves every ``If`` condition (and, for a
calibrated model, the rows each norm gathers by the sub-network id), and each ``If`` is replaced by the branch it
takes, nested ones included. The result computes what ``export_onnx(model, ..., skip=...)`` would, from the one
export (ResNet-50-ADN: one export of about 100 s instead of 2^S), and OpenVINO then folds every norm into its conv
as in a static file.

:func:`quantize` has NNCF's post-training quantization place and calibrate the INT8 ranges of one such graph on
images that that sub-network itself ran: activation ranges differ between sub-networks (a stage's input depends on
which earlier stages ran, and a calibrated model's norms on all of them), so no set of ranges fits them all.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import numpy as np

from ..._quiet import muted
from ...export import MASK


def specialize(one_graph, mask: np.ndarray):
    """A static copy of the ``openvino.Model`` ``one_graph`` for the sub-network of ``mask`` (int32 (S,)): no
    ``mask`` input and no ``If`` left. ``one_graph`` itself is not changed."""
    import openvino.opset13 as ops
    from openvino import passes

    model = one_graph.clone()
    parameter = next(p for p in model.get_parameters() if p.get_friendly_name() == MASK)
    constant = ops.constant(np.asarray(mask, dtype=np.int32))
    for target in list(parameter.output(0).get_target_inputs()):
        target.replace_source_output(constant.output(0))
    model.remove_parameter(parameter)
    while True:
        folding = passes.Manager()
        folding.register_pass(passes.ConstantFolding())
        folding.run_passes(model)
        ifs = [node for node in model.get_ordered_ops() if node.get_type_name() == "If"]
        if not ifs:
            break
        for node in ifs:  # outer Ifs first; the branches they take bring nested Ifs into the graph for the next pass
            condition = node.input_value(0).get_node()
            if condition.get_type_name() != "Constant":
                raise ValueError(f"the one graph's If {node.get_friendly_name()!r} does not depend on the mask alone: "
                                 f"it cannot be cut into a static sub-network")
            branch = 0 if bool(condition.get_data().reshape(-1)[0]) else 1  # body 0: then, body 1: else
            body = node.get_function(branch)
            parameters, results = body.get_parameters(), body.get_results()
            for d in node.get_input_descriptions(branch):
                for target in list(parameters[d.body_parameter_index].output(0).get_target_inputs()):
                    target.replace_source_output(node.input_value(d.input_index))
            for d in node.get_output_descriptions(branch):
                for target in list(node.output(d.output_index).get_target_inputs()):
                    target.replace_source_output(results[d.body_value_index].input_value(0))
    model.validate_nodes_and_infer_types()
    return model


def quantize(model, batches: Sequence[np.ndarray]):
    """``model`` (a static sub-network, :func:`specialize`) with INT8 weights and activations, its activation ranges
    measured by NNCF on ``batches`` (float32 arrays shaped like the model's input), weights per output channel."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    try:
        with muted(stdout=True, stderr=True):  # its progress bars; this thread's only
            return nncf.quantize(model, nncf.Dataset(list(batches)), subset_size=len(batches))
    finally:
        # NNCF compiles on a Core of its own: free it now, before the next quantize makes another, so Cores die in
        # the reverse order of their making (engine.py's module docstring says why that order matters)
        gc.collect()
