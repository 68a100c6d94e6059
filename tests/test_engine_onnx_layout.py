"""The CPU engine's machine layout (``engine/onnx_layout.py``): ONNX Runtime's optimised one graph with the
blocked layout kept across ``If`` boundaries. Hand-built graphs check the rewrite against the identity (a reorder
in and out is one), real models check every sub-network of the served graph against the eager model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize

from adaptive_kernels import create_model, export_onnx
from adaptive_kernels.engine.onnx_layout import NCHWC, keep_blocked_across_ifs, machine_layout
from adaptive_kernels.export.onnx import graphs_of, mask_of, onnxruntime_session
from adaptive_kernels.models.mobilenetv2 import MobileNetV2ADN
from adaptive_kernels.numerics import relative_error

onnx = pytest.importorskip("onnx", reason="pip install adaptive_kernels[onnx]")
ort = pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")
from onnx import TensorProto, helper

pytestmark = pytest.mark.usefixtures("one_thread")
C = 24  # not a multiple of the 8 or 16 channels of a block: the blocked tensor is padded


def _branch(tag: str, source: str) -> onnx.GraphProto:
    """ReorderInput(source) -> ReorderOutput: the identity, through the blocked layout."""
    nodes = [helper.make_node("ReorderInput", [source], [f"{tag}_blocked"], domain=NCHWC),
             helper.make_node("ReorderOutput", [f"{tag}_blocked"], [f"{tag}_out"], domain=NCHWC, channels=C)]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT,
                                                                            [1, C, 5, 5])])


def _two_ifs(second_reads_plainly: bool) -> onnx.ModelProto:
    """x -> If -> y1 -> If -> y2 (each branch the identity through the blocked layout); optionally y1 also feeds
    a Relu of the main graph, which needs y1 in NCHW."""
    nodes = [helper.make_node("If", ["c"], ["y1"], then_branch=_branch("t1", "x"), else_branch=_branch("e1", "x")),
             helper.make_node("If", ["c"], ["y2"], then_branch=_branch("t2", "y1"), else_branch=_branch("e2", "y1"))]
    outputs = [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, C, 5, 5])]
    if second_reads_plainly:
        nodes.append(helper.make_node("Relu", ["y1"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, C, 5, 5]))
    graph = helper.make_graph(nodes, "two_ifs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, 5]),
                                                 helper.make_tensor_value_info("c", TensorProto.BOOL, [])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(NCHWC, 1)])
    model.ir_version = 9
    return model


def _run_unoptimised(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _reorders(graph) -> list[str]:
    found = []
    for node in graph.node:
        if node.domain == NCHWC and node.op_type.startswith("Reorder"):
            found.append(node.op_type)
        for sub in graphs_of(node):
            found += _reorders(sub)
    return found


def test_the_pair_at_an_if_boundary_goes_and_the_graph_stays_the_identity():
    model = _two_ifs(second_reads_plainly=False)
    assert keep_blocked_across_ifs(model) == 4  # both branches' ReorderOutput of If 1, both ReorderInput of If 2
    assert sorted(_reorders(model.graph)) == ["ReorderInput"] * 2 + ["ReorderOutput"] * 2
    x = np.random.default_rng(0).standard_normal((1, C, 5, 5)).astype(np.float32)
    for c in (True, False):
        np.testing.assert_array_equal(_run_unoptimised(model, {"x": x, "c": np.array(c)})[0], x)


def test_a_value_also_read_in_nchw_keeps_its_reorders():
    model = _two_ifs(second_reads_plainly=True)
    before = model.SerializeToString()
    assert keep_blocked_across_ifs(model) == 0
    assert model.SerializeToString() == before
    x = np.random.default_rng(1).standard_normal((1, C, 5, 5)).astype(np.float32)
    y2, r = _run_unoptimised(model, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(y2, x)
    np.testing.assert_array_equal(r, np.maximum(x, 0))


def _has_blocked_layout(served: bytes) -> bool:
    return any(_reorders(onnx.load_from_string(served).graph))


def _blocked_boundary(first, second) -> bool:
    """Whether the value ``first`` (an If) hands to ``second`` crosses in the blocked layout: no branch of
    ``first`` returns a ReorderOutput and ``second``'s branches read the value itself, not through a ReorderInput."""
    for branch in graphs_of(first):
        maker = next(n for n in branch.node if branch.output[0].name in n.output)
        if maker.domain != NCHWC or maker.op_type.startswith("Reorder"):
            return False
    readers = [n for branch in graphs_of(second) for n in branch.node if first.output[0] in n.input]
    return bool(readers) and not any(n.op_type == "ReorderInput" for n in readers)


# Boundaries that cross blocked when the CPU has the blocked layout: every one of MobileNetV2's; ResNet-20's
# first stage returns an NCHW Relu (its first block adds the stem's output, read in NCHW from the outer graph, so
# ONNX Runtime leaves that add and ReLU unfused), its second boundary is blocked.
CASES = {"mobilenet_v2": ((0, 1, 2, 3), 32), "resnet20": ((1,), 16)}


@pytest.mark.parametrize("name", CASES)
def test_served_graph_is_exact_for_every_subnetwork(tmp_path, name):
    blocked, size = CASES[name]
    model = MobileNetV2ADN(num_classes=10, width_mult=0.5) if name == "mobilenet_v2" else create_model("resnet20_adn")
    model = randomize(model, calibrate=(4, 3, size, size))
    portable = export_onnx(model, tmp_path / "one.onnx", torch.randn(1, 3, size, size)).read_bytes()
    served = machine_layout(portable)
    if not _has_blocked_layout(served):
        assert served == portable  # a CPU without ONNX Runtime's blocked layout serves the portable file
    else:
        ifs = [n for n in onnx.load_from_string(served).graph.node if n.op_type == "If"]
        assert [k for k in range(len(ifs) - 1) if _blocked_boundary(ifs[k], ifs[k + 1])] == list(blocked)
    session = onnxruntime_session(served, threads=1)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        for skip in model.skip_configs():
            got = session.run(["logits"], {"input": x.numpy(), "mask": mask_of(skip).numpy()})[0]
            assert relative_error(torch.from_numpy(got), model(x, skip)) < 1e-4, skip
