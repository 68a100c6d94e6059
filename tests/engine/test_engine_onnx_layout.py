"""The CPU engine's machine layout (``engine/ort/layout.py``): ONNX Runtime's optimised one graph with the
blocked layout kept across ``If`` boundaries. Hand-built graphs check the rewrite against the identity (a reorder
in and out is one), real models check every sub-network of the served graph against the eager model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize, small_resnet20

from adaptive_kernels import create_model, export_onnx
from adaptive_kernels.engine.ort.layout import NCHWC, _optimised, keep_blocked_across_ifs, machine_layout
from adaptive_kernels.export import graphs_of, mask_of, onnxruntime_session
from adaptive_kernels.export.graph import SUBNET_NORM
from adaptive_kernels.models.mobilenetv2 import MobileNetV2ADN
from adaptive_kernels.models.resnet import Bottleneck, ResNetADN
from adaptive_kernels.numerics import relative_error

onnx = pytest.importorskip("onnx", reason="pip install adaptive_kernels[onnx]")
ort = pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")
from onnx import TensorProto, helper

pytestmark = pytest.mark.usefixtures("one_thread")
C = 24  # not a multiple of the 8 or 16 channels of a block: the blocked tensor is padded


def _branch(tag: str, source: str, blocked: str | None = None) -> onnx.GraphProto:
    """ReorderInput(source) -> ReorderOutput: the identity, through the blocked layout (its tensor: ``blocked``)."""
    blocked = blocked or f"{tag}_blocked"
    nodes = [helper.make_node("ReorderInput", [source], [blocked], domain=NCHWC),
             helper.make_node("ReorderOutput", [blocked], [f"{tag}_out"], domain=NCHWC, channels=C)]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT,
                                                                            [1, C, 5, 5])])


def _two_ifs(second_reads_plainly: bool, reused_name: str | None = None) -> onnx.ModelProto:
    """x -> If -> y1 -> If -> y2 (each branch the identity through the blocked layout); optionally y1 also feeds
    a Relu of the main graph, which needs y1 in NCHW; optionally every branch's blocked tensor and the main
    graph's Relu of x share one name, as in the files ONNX Runtime writes."""
    b = reused_name
    nodes = [helper.make_node("If", ["c"], ["y1"], then_branch=_branch("t1", "x", b), else_branch=_branch("e1", "x", b)),
             helper.make_node("If", ["c"], ["y2"], then_branch=_branch("t2", "y1", b),
                              else_branch=_branch("e2", "y1", b))]
    outputs = [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, C, 5, 5])]
    if reused_name:
        nodes.append(helper.make_node("Relu", ["x"], [reused_name]))
        outputs.append(helper.make_tensor_value_info(reused_name, TensorProto.FLOAT, [1, C, 5, 5]))
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


def test_a_nested_if_hands_its_blocked_output_across_too():
    # x -> If(c) {If(d) {identity}} -> y1 -> If(c) {identity}: the inner branches' ReorderOutputs and the second
    # If's ReorderInputs go; the outer branches return the inner If's (now blocked) output
    def nested(tag: str) -> onnx.GraphProto:
        inner = helper.make_node("If", ["d"], [f"{tag}_out"], then_branch=_branch(f"{tag}t", "x"),
                                 else_branch=_branch(f"{tag}e", "x"))
        return helper.make_graph([inner], tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT,
                                                                                  [1, C, 5, 5])])

    model = _two_ifs(second_reads_plainly=False)
    model.graph.node[0].CopyFrom(helper.make_node("If", ["c"], ["y1"], then_branch=nested("t1"),
                                                  else_branch=nested("e1")))
    model.graph.input.append(helper.make_tensor_value_info("d", TensorProto.BOOL, []))
    assert keep_blocked_across_ifs(model) == 6
    assert sorted(_reorders(model.graph)) == ["ReorderInput"] * 4 + ["ReorderOutput"] * 2
    x = np.random.default_rng(3).standard_normal((1, C, 5, 5)).astype(np.float32)
    for c in (True, False):
        for d in (True, False):
            out = _run_unoptimised(model, {"x": x, "c": np.array(c), "d": np.array(d)})[0]
            np.testing.assert_array_equal(out, x)


def test_names_reused_across_scopes_are_made_unique():
    # ONNX Runtime refuses a graph whose branches define a name the main graph has (single static assignment
    # counts the outer scopes); its own optimised ResNet-50 file is one. The rewrite renames them apart.
    model = _two_ifs(second_reads_plainly=False, reused_name="tmp")
    x = np.random.default_rng(2).standard_normal((1, C, 5, 5)).astype(np.float32)
    with pytest.raises(Exception, match="static assignment"):
        _run_unoptimised(model, {"x": x, "c": np.array(True)})
    assert keep_blocked_across_ifs(model) == 4
    for c in (True, False):
        y2, r = _run_unoptimised(model, {"x": x, "c": np.array(c)})
        np.testing.assert_array_equal(y2, x)
        np.testing.assert_array_equal(r, np.maximum(x, 0))


def test_a_value_also_read_in_nchw_keeps_its_reorders():
    model = _two_ifs(second_reads_plainly=True)
    before = model.SerializeToString()
    assert keep_blocked_across_ifs(model) == 0
    assert model.SerializeToString() == before
    x = np.random.default_rng(1).standard_normal((1, C, 5, 5)).astype(np.float32)
    y2, r = _run_unoptimised(model, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(y2, x)
    np.testing.assert_array_equal(r, np.maximum(x, 0))


def _cpu_has_blocked_layout(portable: bytes, folder) -> bool:
    """Whether ONNX Runtime lays ``portable`` out blocked on this CPU (its own optimised graph has reorders)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimised.onnx")
    ort.InferenceSession(portable, options, providers=["CPUExecutionProvider"])
    return any(_reorders(onnx.load(options.optimized_model_filepath).graph))


def _makers(if_node, index: int = 0) -> list:
    """The nodes that make output ``index`` of ``if_node`` in its branches, through nested ``If``s."""
    found = []
    for branch in graphs_of(if_node):
        out = branch.output[index].name
        maker = next(n for n in branch.node if out in n.output)
        found += _makers(maker, list(maker.output).index(out)) if maker.op_type == "If" else [maker]
    return found


def _readers(graph, name: str) -> list:
    """The nodes of ``graph`` and its sub-graphs that read ``name``."""
    found = [n for n in graph.node if name in n.input]
    for node in graph.node:
        for sub in graphs_of(node):
            found += _readers(sub, name)
    return found


def _blocked_boundary(first, second) -> bool:
    """Whether the value ``first`` (an If) hands to ``second`` crosses in the blocked layout: no branch of
    ``first`` (nested ones included) returns a ReorderOutput and ``second``'s branches read the value itself, not
    through a ReorderInput."""
    if any(maker.domain != NCHWC or maker.op_type.startswith("Reorder") for maker in _makers(first)):
        return False
    readers = [n for branch in graphs_of(second) for n in _readers(branch, first.output[0])]
    return bool(readers) and not any(n.op_type == "ReorderInput" for n in readers)


# Boundaries between the main graph's Ifs that cross blocked when the CPU has the blocked layout: every one of
# MobileNetV2's (its five stages in three Ifs, the first two pairs nested: export/masked.py); ResNet-20's first stage
# returns an NCHW Relu (its first block adds the stem's output, read in NCHW from the outer graph, so ONNX Runtime
# leaves that add and ReLU unfused), its second boundary is blocked; both of a narrow ResNet-50's (its first two
# stages nested; its optimised file reuses names across scopes, which the rewrite must undo to load at all).
CASES = {"mobilenet_v2": ((0, 1), 32), "resnet20": ((1,), 16), "resnet50_narrow": ((0, 1), 16)}
MODELS = {"mobilenet_v2": lambda: MobileNetV2ADN(num_classes=10, width_mult=0.5),
          "resnet20": lambda: create_model("resnet20_adn"),
          "resnet50_narrow": lambda: ResNetADN(Bottleneck, [3, 4, 6, 3], num_classes=10, width=8, small_input=True)}


@pytest.mark.parametrize("name", CASES)
def test_served_graph_is_exact_for_every_subnetwork(tmp_path, name):
    blocked, size = CASES[name]
    model = MODELS[name]()
    model = randomize(model, calibrate=(4, 3, size, size))
    portable = export_onnx(model, tmp_path / "one.onnx", torch.randn(1, 3, size, size)).read_bytes()
    served = machine_layout(portable, tree=False)  # the If layout (these models are small enough for the tree)
    if not _cpu_has_blocked_layout(portable, tmp_path):
        assert served == portable  # a CPU without ONNX Runtime's blocked layout serves the portable file
    else:
        ifs = [n for n in onnx.load_from_string(served).graph.node if n.op_type == "If"]
        assert [k for k in range(len(ifs) - 1) if _blocked_boundary(ifs[k], ifs[k + 1])] == list(blocked)
    x = torch.randn(3, 3, size, size)
    for layout in (served, machine_layout(portable, tree=True)):
        session = onnxruntime_session(layout, threads=1)
        with torch.no_grad():
            for skip in model.skip_configs():
                got = session.run(["logits"], {"input": x.numpy(), "mask": mask_of(skip).numpy()})[0]
                assert relative_error(torch.from_numpy(got), model(x, skip)) < 1e-4, (layout is served, skip)


def test_engine_serves_the_exported_graph_when_the_laid_out_one_does_not_load(tmp_path, monkeypatch, caplog):
    from adaptive_kernels.engine import OnnxRuntimeEngine
    from adaptive_kernels.engine.ort import engine as ort_engine

    model = randomize(create_model("resnet20_adn", width=4), calibrate=(4, 3, 16, 16))
    example = torch.randn(2, 3, 16, 16)
    portable = export_onnx(model, tmp_path / "one.onnx", example).read_bytes()
    monkeypatch.setattr(ort_engine, "machine_layout", lambda onnx_model: b"not a model")
    with caplog.at_level("WARNING", logger=ort_engine.__name__):
        engine = OnnxRuntimeEngine(model, example, dynamic_batch=True, onnx_model=portable)
    assert "did not load in ONNX Runtime" in caplog.text and "serving it as exported" in caplog.text
    with torch.no_grad():
        for skip in model.skip_configs():
            assert relative_error(engine(example, skip), model(example, skip)) < 1e-4, skip


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A calibrated ResNet-20-ADN (width 16: every norm's channels a whole number of blocks) and its one graph."""
    model = small_resnet20(width=16, calibrated=True)
    folder = tmp_path_factory.mktemp("calibrated")
    return model, export_onnx(model, folder / "one.onnx", torch.randn(1, 3, 16, 16)).read_bytes(), folder


def _gathered_convs(graph) -> list:
    """The convs of ``graph`` and its sub-graphs that read a weight gathered by the sub-network id."""
    found = [n for n in graph.node if "Conv" in n.op_type and n.input[1].endswith("/w_row")]
    for node in graph.node:
        for sub in graphs_of(node):
            found += _gathered_convs(sub)
    return found


def test_calibrated_one_graph_laid_out_is_exact_for_every_subnetwork(calibrated):
    # against the calibrated model and against ONNX Runtime on each sub-network's static export
    model, portable, folder = calibrated
    served = onnx.load_from_string(machine_layout(portable, tree=False))
    convs = _gathered_convs(served.graph)
    # the stem's and stage 0's norms fold (their rows do not depend on the sub-network within a branch of the
    # first If); every norm of the later Ifs (stages 1 and 2) is a gathered depthwise conv, blocked where this CPU
    # blocks
    ifs = [n for n in onnx.load_from_string(portable).graph.node if n.op_type == "If"]
    later = [n for node in ifs[1:] for branch in graphs_of(node) for n in branch.node
             if n.op_type == "Mul" and n.name.startswith(SUBNET_NORM + "/")]
    assert len(ifs) == 3 and 0 < len(convs) == len(later)
    if _cpu_has_blocked_layout(portable, folder):
        assert all(n.domain == NCHWC for n in convs)
    session = onnxruntime_session(served.SerializeToString(), threads=1)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for skip in model.skip_configs():
            got = torch.from_numpy(session.run(["logits"], {"input": x.numpy(), "mask": mask_of(skip).numpy()})[0])
            static = onnxruntime_session(export_onnx(model, folder / "static.onnx", x, skip=skip).read_bytes(), 1)
            assert relative_error(got, model(x, skip)) < 1e-4, skip
            assert relative_error(got, torch.from_numpy(static.run(["logits"], {"input": x.numpy()})[0])) < 1e-4, skip


def test_calibrated_layout_that_does_not_land_serves_the_graph_as_exported(calibrated, monkeypatch, caplog):
    from adaptive_kernels.engine.ort import layout

    model, portable, _ = calibrated
    monkeypatch.setattr(layout, "_gather_norm_weights", lambda optimised, tables: False)
    with caplog.at_level("WARNING", logger=layout.__name__):
        served = onnx.load_from_string(machine_layout(portable, tree=False))
    assert "did not land" in caplog.text and "serving the one graph as exported" in caplog.text
    assert not _gathered_convs(served.graph)
    session = onnxruntime_session(served.SerializeToString(), threads=1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for skip in model.skip_configs():
            got = session.run(["logits"], {"input": x.numpy(), "mask": mask_of(skip).numpy()})[0]
            assert relative_error(torch.from_numpy(got), model(x, skip)) < 1e-4, skip


def _ops(graph, found: list) -> list:
    """Every node of ``graph`` and its sub-graphs, with the graph that holds it."""
    for node in graph.node:
        found.append((graph, node))
        for sub in graphs_of(node):
            _ops(sub, found)
    return found


def test_small_calibrated_model_is_served_as_a_tree_of_its_subnetworks(calibrated):
    # a ResNet-20 is small: each sub-network's own graph (norms folded into the convs, residual add and ReLU fused
    # with them where this CPU blocks, as in a static file), under a tree of Ifs on the mask bits; nothing gathered
    # by the sub-network id, and the weights in the main graph, one per distinct value
    model, portable, folder = calibrated
    served = onnx.load_from_string(machine_layout(portable))
    assert [n.op_type for n in served.graph.node].count("If") == 1
    nodes = _ops(served.graph, [])
    assert not any(n.name.startswith(SUBNET_NORM) or n.op_type in ("Gather", "BatchNormalization", "Mul")
                   for _, n in nodes)
    assert all(not g.initializer for g, _ in nodes if g is not served.graph)
    leaves = [g for g, n in nodes if n.op_type == "If" for g in graphs_of(n) if not any(m.op_type == "If" for m in g.node)]
    assert len(leaves) == 2 ** model.num_skippable_stages
    if _cpu_has_blocked_layout(portable, folder):  # the super-net's leaf runs the ops of its static file
        static = _optimised(export_onnx(model, folder / "super.onnx", torch.randn(1, 3, 16, 16), skip="super").read_bytes())
        super_leaf = next(g for g in leaves if g.name.startswith("subnetwork_FFF"))
        assert ([n.op_type for n in super_leaf.node if n.domain == NCHWC]
                == [n.op_type for n in static.graph.node if n.domain == NCHWC])
    session = onnxruntime_session(served.SerializeToString(), threads=1)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for skip in model.skip_configs():
            got = torch.from_numpy(session.run(["logits"], {"input": x.numpy(), "mask": mask_of(skip).numpy()})[0])
            assert relative_error(got, model(x, skip)) < 1e-4, skip


def test_a_model_too_large_for_the_tree_keeps_the_if_layout(calibrated, monkeypatch):
    # the sub-networks' weights together exceed twice the super-net's plus a session's base (here: none)
    from adaptive_kernels.engine.ort import layout

    _, portable, _ = calibrated
    monkeypatch.setattr(layout, "SESSION_BASE_BYTES", 0)
    assert layout.subnetwork_tree(portable) is None
    served = onnx.load_from_string(machine_layout(portable))
    assert _gathered_convs(served.graph)
