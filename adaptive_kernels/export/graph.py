"""ONNX graph helpers of the export: the sub-graphs of a node and the names a graph reads, and the finishing of a
saved export (stack traces and unused weights dropped, weights placed in the deepest sub-graph that uses them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def graphs_of(node) -> Iterator:
    """The sub-graphs of an ONNX node (an ``If``'s two branches, a ``Loop``'s body; none for most ops)."""
    import onnx

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        yield from a.graphs


def _place_weights(model) -> int:
    """Move every weight of the main graph into the deepest sub-graph that holds all its uses (an ``If`` branch,
    or the branch of a nested ``If`` that both inner branches read it from); returns how many moved.

    ONNX Runtime's CPU layout pass (NCHWc: blocked channels, conv + add + ReLU fused) left the convolutions of the
    skippable sub-paths unblocked while their weights were in the main graph: ResNet-50-ADN's one graph was 1.2x
    the static file at batch 1, and about the same after this move. A weight in the outer branch of a nested
    ``If`` serves its inner branches' convolutions as well (every convolution of MobileNetV2-ADN's laid-out graph is
    blocked). Nothing is copied: a weight the main graph or two top-level branches read stays where it is."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    where: dict[str, tuple] = {}  # weight -> the common prefix of the sub-graph paths of its uses
    inside: dict[int, object] = {}

    def visit(g, path: tuple) -> None:
        for node in g.node:
            for name in weights.intersection(node.input):
                common = where.get(name, path)
                k = 0
                while k < min(len(common), len(path)) and common[k] == path[k]:
                    k += 1
                where[name] = common[:k]
            for sub in graphs_of(node):
                inside[id(sub)] = sub
                visit(sub, (*path, id(sub)))

    visit(graph, ())
    kept, moved = [], 0
    for t in graph.initializer:
        path = where.get(t.name, ())
        if path:
            inside[path[-1]].initializer.append(t)
            moved += 1
        else:
            kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return moved


def reads(graph) -> set[str]:
    """Every name ``graph``'s nodes, its sub-graphs' nodes (outer-scope names included) and its outputs read."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for sub in graphs_of(node):
            names |= reads(sub)
    return names


def _drop_unused_weights(graph) -> None:
    """Drop the initializers no node reads (the exporter leaves a few, e.g. a folded-away bias): ONNX Runtime
    would print a "Removing initializer ... not used" warning for each when the file is loaded."""
    used = reads(graph)
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    for node in graph.node:
        for sub in graphs_of(node):
            _drop_unused_weights(sub)


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(graph) -> None:
    """Drop the Python stack trace the exporter records on every node (tens of kB each, a third of MobileNetV2's
    file and more in nested branches); the node's other metadata (its module and FX node) stays."""
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for sub in graphs_of(node):
            _drop_stack_traces(sub)


def finish_file(path: Path, one_graph: bool) -> None:
    """The saved export as it is served: stack traces and unused weights dropped and, in a one graph, weights placed
    in branches."""
    import onnx

    model = onnx.load(str(path))
    _drop_stack_traces(model.graph)
    _drop_unused_weights(model.graph)
    if one_graph:
        _place_weights(model)
    onnx.save(model, str(path))
