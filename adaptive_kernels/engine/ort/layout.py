"""The CPU engine's graph for this machine: ONNX Runtime's optimised one graph, with the blocked layout kept
across the ``If`` boundaries between stages.

ONNX Runtime's CPU layout pass (NCHWc: channels blocked by the vector width, conv + add + activation fused) runs
on each graph on its own, so every ``If`` branch of the one graph converts its input into the blocked layout
(``ReorderInput``) and its output back (``ReorderOutput``): two copies of the activation per stage boundary that a
static file of one sub-network does not make. :func:`machine_layout` has ONNX Runtime optimise the file (its
``optimized_model_filepath``: the graph as it will run here, blocked ops included) and then drops each such pair
where a value is produced in the blocked layout (by every branch of an ``If``, nested ``If``s' branches included,
or by a ``ReorderOutput`` of the main graph) and every use of it converts it straight back: the blocked tensor
crosses the boundary as it is.
Within one graph ONNX Runtime chains blocked ops in exactly this way; the channels a block pads with are never
read into a real channel (their weights are zero), and the last ``ReorderOutput`` drops them.

The result depends on this CPU's vector width (ONNX Runtime says so when it writes the file): it is built where it
runs, at ``compile`` time, and never saved as the portable file (``OnnxRuntimeEngine.onnx_model`` stays the export).
A CPU without the blocked layout (no NCHWc ops in the optimised graph) keeps the portable file as it is.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from ...export import graphs_of

NCHWC = "com.microsoft.nchwc"


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _is_reorder(node, op_type: str) -> bool:
    """A blocked <-> NCHW reorder (not one to channels-last, which is another layout)."""
    return node.domain == NCHWC and node.op_type == op_type and _attr(node, "channels_last", 0) == 0


def _defines(graph, name: str) -> bool:
    """Whether ``graph`` has a value ``name`` of its own (which hides an outer-scope value of that name)."""
    return (any(name in node.output for node in graph.node) or any(v.name == name for v in graph.input)
            or any(t.name == name for t in graph.initializer))


def _uses(graph, name: str, found: list) -> list:
    """Every (graph, node) that reads ``name`` of ``graph``'s scope: in ``graph``, or in a sub-graph of it that has
    no value of that name of its own (ONNX Runtime's optimised graphs reuse names across scopes)."""
    for node in graph.node:
        if name in node.input:
            found.append((graph, node))
        for sub in graphs_of(node):
            if not _defines(sub, name):
                _uses(sub, name, found)
    return found


def _rename_uses(graph, old: str, new: str) -> None:
    """Rename the reads of ``old`` (of ``graph``'s scope, as :func:`_uses` finds them) to ``new``."""
    for _, node in _uses(graph, old, []):
        for i, value in enumerate(node.input):
            if value == old:
                node.input[i] = new


def _all_names(graph, names: set) -> set:
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in graphs_of(node):
            _all_names(sub, names)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.initializer))
    return names


def _blocked_sources(node, index: int) -> list | None:
    """Where output ``index`` of ``node`` is made in the blocked layout: [(None, node, index)] for a
    ``ReorderOutput`` of the main graph; for an ``If``, per branch (branch, its ReorderOutput, index), or
    (branch, None, index) for a branch that returns a nested ``If``'s output, followed by that ``If``'s own
    sources; None when some branch makes it in NCHW."""
    if _is_reorder(node, "ReorderOutput"):
        return [(None, node, index)]
    if node.domain != "" or node.op_type != "If":
        return None
    sources = []
    for branch in graphs_of(node):
        out = branch.output[index].name
        maker = next((n for n in branch.node if out in n.output), None)
        if maker is not None and _is_reorder(maker, "ReorderOutput"):
            sources.append((branch, maker, index))
            continue
        nested = maker is not None and maker.domain == "" and maker.op_type == "If"
        inner = _blocked_sources(maker, list(maker.output).index(out)) if nested else None
        if inner is None:
            return None
        sources += [(branch, None, index), *inner]
    return sources


def _make_names_unique(graph, seen: set, fresh) -> None:
    """Rename each value that ``graph`` or a sub-graph defines under a name defined before (in any scope) to a
    ``fresh()`` one, definitions and reads alike. ONNX Runtime writes its optimised file with names reused across
    scopes (a branch's reordered weights named like a value of the main graph), which it refuses to load again
    (single static assignment counts the outer scopes), and values about to cross scopes must not be hidden."""
    defined = [*(v.name for v in graph.input), *(t.name for t in graph.initializer),
               *(o for node in graph.node for o in node.output if o)]
    for name in defined:
        if name not in seen:
            seen.add(name)
            continue
        new = fresh()
        _rename_uses(graph, name, new)
        for node in graph.node:
            node.output[:] = [new if o == name else o for o in node.output]
        for v in (*graph.input, *graph.initializer, *graph.output, *graph.value_info):
            if v.name == name:
                v.name = new
    for node in graph.node:
        for sub in graphs_of(node):
            _make_names_unique(sub, seen, fresh)


def keep_blocked_across_ifs(model) -> int:
    """Drop the reorder pairs at ``If`` boundaries of ``model`` (an ``onnx.ModelProto`` as ONNX Runtime optimised
    it), in place; returns how many reorder nodes were removed."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    names = _all_names(graph, set())
    counter = itertools.count()

    def fresh() -> str:
        name = next(f"adn_{k}" for k in counter if f"adn_{k}" not in names)
        names.add(name)
        return name

    _make_names_unique(graph, set(), fresh)

    removed = 0
    for node in list(graph.node):
        for index, value in enumerate(node.output):
            if value in outputs:
                continue
            uses = _uses(graph, value, [])
            if not uses or not all(_is_reorder(user, "ReorderInput") for _, user in uses):
                continue
            sources = _blocked_sources(node, index)
            if sources is None:
                continue
            blocked = fresh()
            if sources[0][0] is None:  # a ReorderOutput of the main graph: its blocked input takes its place
                old = node.input[0]
                producer = next((n for n in graph.node if old in n.output), None)
                if producer is None:
                    continue
                _rename_uses(graph, old, blocked)
                producer.output[list(producer.output).index(old)] = blocked
                for info in [v for v in graph.value_info if v.name == old]:
                    info.name = blocked
                graph.node.remove(node)
                removed += 1
            else:  # every branch returns its blocked tensor instead (its shape: the padded channels)
                node.output[index] = blocked
                for branch, reorder, i in sources:
                    if reorder is not None:
                        branch.output[i].name = reorder.input[0]
                        branch.node.remove(reorder)
                        removed += 1
                    else:  # a nested If's output, blocked now: its NCHW shape no longer holds
                        for info in [v for v in branch.value_info if v.name == branch.output[i].name]:
                            branch.value_info.remove(info)
                    branch.output[i].type.tensor_type.ClearField("shape")
            for where, user in uses:
                where.node.remove(user)
                _rename_uses(where, user.output[0], blocked)
                removed += 1
            for info in [v for v in graph.value_info if v.name == value]:
                graph.value_info.remove(info)
    return removed


def machine_layout(onnx_model: bytes) -> bytes:
    """``onnx_model`` as ONNX Runtime optimises it on this CPU, blocked across ``If`` boundaries (see the module
    docstring); ``onnx_model`` itself when this CPU has no blocked layout or the graph has no such boundary."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # it only optimises the graph
    options.log_severity_level = 3  # not the warning that the file is for this machine only: it is meant to be
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
        onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(options.optimized_model_filepath)
    if keep_blocked_across_ifs(optimised) == 0:
        return onnx_model
    return optimised.SerializeToString()
