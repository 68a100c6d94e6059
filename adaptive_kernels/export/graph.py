"""ONNX graph helpers of the export: the sub-graphs of a node and the names a graph reads, and the finishing of a
saved export (stack traces and unused weights dropped, calibrated norms written as a gathered scale and shift,
weights placed in the deepest sub-graph that uses them)."""

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


def drop_unused_weights(graph) -> None:
    """Drop the initializers no node reads (the exporter leaves a few, e.g. a folded-away bias): ONNX Runtime
    would print a "Removing initializer ... not used" warning for each when the file is loaded."""
    used = reads(graph)
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    for node in graph.node:
        for sub in graphs_of(node):
            drop_unused_weights(sub)


def drop_unused_nodes(graph) -> None:
    """Drop the nodes of ``graph`` and its sub-graphs whose outputs nothing reads (ONNX ops have no side effects)."""
    while True:
        used = reads(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for node in graph.node:
        for sub in graphs_of(node):
            drop_unused_nodes(sub)


SUBNET_NORM = "adn_subnet_norm"  # the name prefix of a calibrated norm's Mul and Add: what the CPU layout looks for
SCALE, SHIFT = ".subnet_scale", ".subnet_shift"  # the name endings of its (2^S, C, 1, 1) tables


def _gathered_table(graph, name: str, producers: dict, weights: dict):
    """(table, index) when ``name`` is ``Squeeze(Gather(table, index))`` of an initializer ``table``, else None."""
    squeeze = producers.get(name)
    gather = producers.get(squeeze.input[0]) if squeeze is not None and squeeze.op_type == "Squeeze" else None
    if gather is None or gather.op_type != "Gather" or gather.input[0] not in weights:
        return None
    return weights[gather.input[0]], gather.input[1]


def _same_value(a: str, b: str, producers: dict) -> bool:
    """Whether values ``a`` and ``b`` are one, or made by the same op from the same inputs (the exporter reshapes the
    sub-network id once per gather)."""
    if a == b:
        return True
    made_a, made_b = producers.get(a), producers.get(b)
    return (made_a is not None and made_b is not None and made_a.op_type == made_b.op_type
            and made_a.input == made_b.input and made_a.attribute == made_b.attribute)


def calibrated_norms_as_scale_shift(graph, weights: dict | None = None) -> int:
    """Rewrite every calibrated norm of ``graph`` and its sub-graphs, a ``BatchNormalization`` whose mean and
    variance are rows gathered from the (2^S, C) tables by the sub-network id, as ``x * scale[id] + shift[id]``:
    a ``Gather`` from each of two (2^S, C, 1, 1) tables (``<norm>.subnet_scale`` / ``.subnet_shift``, the norm
    folded per row) and a ``Mul`` and ``Add`` named ``adn_subnet_norm/<norm>/...``. Two ops instead of the
    norm's gathers and squeezes, and the form the CPU engine's layout turns into a blocked op or folds into its
    convolution (``engine/ort/layout``). Returns how many norms were rewritten."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    weights = {} if weights is None else dict(weights)
    weights.update({t.name: t for t in graph.initializer})
    producers = {o: n for n in graph.node for o in n.output}
    rewritten = 0
    for node in list(graph.node):
        if node.op_type == "BatchNormalization" and len(node.output) == 1:
            mean, var = (_gathered_table(graph, name, producers, weights) for name in node.input[3:5])
            if (mean is not None and var is not None and _same_value(mean[1], var[1], producers)
                    and node.input[1] in weights
                    and node.input[2] in weights and mean[0].name.endswith(".subnet_mean")):
                norm = mean[0].name.removesuffix(".subnet_mean")
                eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
                gamma, beta = (numpy_helper.to_array(weights[n]).astype(np.float64) for n in node.input[1:3])
                scale = gamma / np.sqrt(numpy_helper.to_array(var[0]).astype(np.float64) + eps)
                shift = beta - numpy_helper.to_array(mean[0]).astype(np.float64) * scale
                position = list(graph.node).index(node)
                graph.node.remove(node)
                tag = f"{SUBNET_NORM}/{norm}"
                new = []
                for table, end in ((scale, SCALE), (shift, SHIFT)):
                    if norm + end not in weights:
                        tensor = numpy_helper.from_array(table.astype(np.float32)[:, :, None, None], norm + end)
                        graph.initializer.append(tensor)
                        weights[norm + end] = tensor
                    new.append(onnx.helper.make_node("Gather", [norm + end, mean[1]], [f"{tag}{end}"],
                                                     name=f"{tag}/gather{end}"))
                new += [onnx.helper.make_node("Mul", [node.input[0], f"{tag}{SCALE}"], [f"{tag}/scaled"],
                                              name=f"{tag}/mul"),
                        onnx.helper.make_node("Add", [f"{tag}/scaled", f"{tag}{SHIFT}"], [node.output[0]],
                                              name=f"{tag}/add")]
                for k, n in enumerate(new):
                    graph.node.insert(position + k, n)
                rewritten += 1
        for sub in graphs_of(node):
            rewritten += calibrated_norms_as_scale_shift(sub, weights)
    return rewritten


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
    """The saved export as it is served: stack traces and unused weights dropped and, in a one graph, calibrated norms
    as a gathered scale and shift and weights placed in branches."""
    import onnx

    model = onnx.load(str(path))
    _drop_stack_traces(model.graph)
    if one_graph and calibrated_norms_as_scale_shift(model.graph):
        drop_unused_nodes(model.graph)
    drop_unused_weights(model.graph)
    if one_graph:
        _place_weights(model)
    onnx.save(model, str(path))
