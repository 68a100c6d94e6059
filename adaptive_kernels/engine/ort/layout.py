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

A calibrated one graph (its norms ``x * scale[id] + shift[id]``, rows gathered by the sub-network id:
``export.graph.calibrated_norms_as_scale_shift``) gets more (:func:`calibrated_layout`), because ONNX Runtime folds
no norm whose statistics are chosen at run time, and blocks no convolution whose weights live in an outer scope
(the mandatory convs, read by both branches of their ``If``): before ONNX Runtime optimises it, every branch gets its
own copy of the conv weights it reads; a norm whose rows are equal for every sub-network that can reach it (the
stem's, and the first ``If``'s, whose stages' statistics depend on no earlier bit) becomes a constant that ONNX
Runtime folds into its conv; every other norm becomes a depthwise 1x1 conv with placeholder weights, which ONNX
Runtime blocks and fuses with the following add and ReLU like any conv. After it, each such conv reads its weight
and bias gathered from the per-sub-network tables by the sub-network id instead of the placeholders. If a placeholder
does not come back as a conv, the file is served as exported (and the log says so).

A small model (:func:`subnetwork_tree`; ResNet-20, not ResNet-50), calibrated or not, gets neither: its one graph is
rewritten as a tree of ``If``s on the mask bits whose 2^S leaves are the sub-networks' own graphs, each stage's branch
taken and each calibrated norm's row a constant, so ONNX Runtime optimises every leaf as it optimises a static file
(norms folded into the convs, residual add and ReLU fused with them, blocked from end to end); the leaves' weights
then move to the main graph, one per distinct value. On ResNet-20 the passes left by the layout above cost 7-12 %
(per-activation work is a larger share of a small model's time); the tree costs its ``If``s (2-5 % at batch 1) and
memory: it is built when all sub-networks' weights together fit in twice the super-net's plus ``SESSION_BASE_BYTES``.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from pathlib import Path

from ...export import MASK, graphs_of
from ...export.graph import SCALE, SHIFT, SUBNET_NORM, drop_unused_nodes, drop_unused_weights
from ...models.skip import stage_bit

logger = logging.getLogger(__name__)

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


def _name_maker(graph):
    """A function that returns a new name each call, one used nowhere in ``graph`` (any scope) nor returned before."""
    names = _all_names(graph, set())
    counter = itertools.count()

    def fresh() -> str:
        name = next(f"adn_{k}" for k in counter if f"adn_{k}" not in names)
        names.add(name)
        return name

    return fresh


def keep_blocked_across_ifs(model) -> int:
    """Drop the reorder pairs at ``If`` boundaries of ``model`` (an ``onnx.ModelProto`` as ONNX Runtime optimised
    it), in place; returns how many reorder nodes were removed."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    fresh = _name_maker(graph)
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


def _own_conv_weights(graph, outer: dict, counter) -> int:
    """Give every conv of ``graph``'s sub-graphs that reads its weight from an outer scope a copy of its own (ONNX
    Runtime blocks only convs whose weights are constants of their graph); returns how many were copied."""
    here = {**outer, **{t.name: t for t in graph.initializer}}
    copied = 0
    for node in graph.node:
        for sub in graphs_of(node):
            own = {t.name for t in sub.initializer}
            for inner in sub.node:
                if inner.op_type == "Conv" and inner.input[1] not in own and inner.input[1] in here:
                    copy = sub.initializer.add()
                    copy.CopyFrom(here[inner.input[1]])
                    copy.name = f"{inner.input[1]}@{next(counter)}"
                    inner.input[1] = copy.name
                    own.add(copy.name)
                    copied += 1
            copied += _own_conv_weights(sub, here, counter)
    return copied


def _stage_of_condition(graph) -> dict[str, int]:
    """Each ``If`` condition of the one graph -> its stage: the outputs of the ``Split`` of the cast mask."""
    cast = {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] == MASK}
    split = next((n for n in graph.node if n.op_type == "Split" and n.input[0] in cast), None)
    return {} if split is None else {name: k for k, name in enumerate(split.output)}


def _row_as_constant(graph, gather, table, row: int) -> None:
    """Replace ``gather`` (of ``graph``: a row of a per-sub-network ``table`` gathered by the sub-network id) by that
    row as a constant, which ONNX Runtime folds into the conv before it."""
    from onnx import numpy_helper

    graph.node.remove(gather)
    graph.initializer.append(numpy_helper.from_array(table[row][None], gather.output[0]))


def _norms_to_convs(graph, fixed: dict[int, bool], stages: dict[str, int], outer: dict, tables: dict) -> int:
    """Rewrite the tagged calibrated norms of ``graph`` (``fixed``: stage -> skipped, as the enclosing branches
    decide): rows equal for every reachable sub-network become constants (ONNX Runtime folds them into the conv
    before), the others depthwise 1x1 convs with placeholder weights whose tables go into ``tables`` (the
    placeholder bias's name ``<tag>#<k>/b`` -> (scale (2^S, C), shift (2^S, C))). Returns how many norms became convs."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    here = {**outer, **{t.name: t for t in graph.initializer}}
    converted = 0
    for mul in [n for n in graph.node if n.op_type == "Mul" and n.name.startswith(SUBNET_NORM + "/")]:
        tag = mul.name.removesuffix("/mul")
        add = next((n for n in graph.node if n.name == f"{tag}/add"), None)
        gathers = {n.output[0]: n for n in graph.node if n.op_type == "Gather" and n.output[0] in
                   (mul.input[1], add.input[1] if add is not None else None)}
        if add is None or len(gathers) != 2:
            continue
        scale, shift = (numpy_helper.to_array(here[gathers[name].input[0]]) for name in (mul.input[1], add.input[1]))
        rows = scale.shape[0]
        reach = [j for j in range(rows) if all(bool(j & stage_bit(k, len(stages))) == skipped
                                               for k, skipped in fixed.items())]
        if all(np.array_equal(t[j], t[reach[0]]) for t in (scale, shift) for j in reach):
            for name, table in ((mul.input[1], scale), (add.input[1], shift)):
                _row_as_constant(graph, gathers[name], table, reach[0])
            continue
        channels = scale.shape[1]
        tag = f"{tag}#{len(tables)}"  # a norm of a mandatory layer appears in both branches: one tag each
        for node in (*gathers.values(), add):
            graph.node.remove(node)
        position = list(graph.node).index(mul)
        graph.node.remove(mul)
        weight, bias = f"{tag}/w", f"{tag}/b"
        graph.initializer.extend([numpy_helper.from_array(scale[0].reshape(channels, 1, 1, 1), weight),
                                  numpy_helper.from_array(shift[0].reshape(channels), bias)])
        graph.node.insert(position, onnx.helper.make_node("Conv", [mul.input[0], weight, bias], [add.output[0]],
                                                          name=tag, group=channels, kernel_shape=[1, 1]))
        tables[bias] = (scale.reshape(rows, channels), shift.reshape(rows, channels))
        converted += 1
    for node in graph.node:
        if node.op_type == "If" and node.input[0] in stages:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    branch = {**fixed, stages[node.input[0]]: a.name == "else_branch"}
                    converted += _norms_to_convs(a.g, branch, stages, here, tables)
        else:
            for sub in graphs_of(node):
                converted += _norms_to_convs(sub, fixed, stages, here, tables)
    return converted


def _reading(graph, names, found: list) -> list:
    """Every (graph, node) of ``graph`` and its sub-graphs whose third input (a conv's bias) is one of ``names``."""
    for node in graph.node:
        if len(node.input) > 2 and node.input[2] in names:
            found.append((graph, node))
        for sub in graphs_of(node):
            _reading(sub, names, found)
    return found


def _gather_norm_weights(model, tables: dict) -> bool:
    """In ``model`` as ONNX Runtime optimised it, make each placeholder conv (found by its bias, the one name ONNX
    Runtime keeps) read its rows of the tables, gathered by the sub-network id (computed from the mask in the main
    graph); False when some placeholder is not one conv any more (ONNX Runtime rewrote it in a way this does not
    know)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    found = _reading(model.graph, tables, [])
    convs = {node.input[2]: (graph, node) for graph, node in found
             if node.op_type in ("Conv", "FusedConv") and node.domain in ("", "com.microsoft", NCHWC)}
    if set(convs) != set(tables) or len(found) != len(tables):
        return False
    graph = model.graph
    mask = next(i for i in graph.input if i.name == MASK)
    stages = mask.type.tensor_type.shape.dim[0].dim_value
    bits = np.array([stage_bit(k, stages) for k in range(stages)], dtype=np.int64)
    ident = f"{SUBNET_NORM}/id"
    graph.initializer.extend([numpy_helper.from_array(bits, f"{ident}/bits"),
                              numpy_helper.from_array(np.array(1, dtype=np.int64), f"{ident}/one")])
    for k, node in enumerate([
            onnx.helper.make_node("Cast", [MASK], [f"{ident}/mask"], to=onnx.TensorProto.INT64),
            onnx.helper.make_node("Sub", [f"{ident}/one", f"{ident}/mask"], [f"{ident}/skipped"]),
            onnx.helper.make_node("Mul", [f"{ident}/skipped", f"{ident}/bits"], [f"{ident}/weighted"]),
            onnx.helper.make_node("ReduceSum", [f"{ident}/weighted"], [ident], keepdims=0)]):
        graph.node.insert(k, node)
    for bias, (scale, shift) in tables.items():
        where, conv = convs[bias]
        tag = bias.removesuffix("/b")
        rows, channels = scale.shape
        graph.initializer.extend([numpy_helper.from_array(scale.reshape(rows, channels, 1, 1, 1), tag + SCALE),
                                  numpy_helper.from_array(shift, tag + SHIFT)])
        position = list(where.node).index(conv)
        where.node.insert(position, onnx.helper.make_node("Gather", [tag + SCALE, ident], [f"{tag}/w_row"]))
        where.node.insert(position, onnx.helper.make_node("Gather", [tag + SHIFT, ident], [f"{tag}/b_row"]))
        conv.input[1], conv.input[2] = f"{tag}/w_row", f"{tag}/b_row"
    return True


def _optimised(onnx_model: bytes):
    """``onnx_model`` as ONNX Runtime optimises it for this CPU (an ``onnx.ModelProto``)."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # it only optimises the graph
    options.log_severity_level = 3  # not the warning that the file is for this machine only: it is meant to be
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
        onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def calibrated_layout(onnx_model: bytes):
    """The calibrated one graph ``onnx_model`` as ONNX Runtime optimises it with its norms blocked or folded (module
    docstring), an ``onnx.ModelProto``; None when it has no tagged norm or the rewrite did not land."""
    import onnx

    model = onnx.load_from_string(onnx_model)
    stages = _stage_of_condition(model.graph)
    tables: dict = {}
    if not stages or not _tagged_anywhere(model.graph):
        return None
    _own_conv_weights(model.graph, {}, itertools.count())
    blocked = _norms_to_convs(model.graph, {}, stages, {}, tables)
    drop_unused_nodes(model.graph)
    optimised = _optimised(model.SerializeToString())
    if not _gather_norm_weights(optimised, tables):
        logger.warning("[compile] the calibrated norms' layout did not land in ONNX Runtime's graph; serving the one "
                       "graph as exported (correct, slower)")
        return None
    logger.info("[compile] calibrated norms: %d as blocked depthwise convs, the rest folded into their convs", blocked)
    return optimised


def _tagged_anywhere(graph) -> bool:
    return any(node.name.startswith(SUBNET_NORM + "/") or any(_tagged_anywhere(sub) for sub in graphs_of(node))
               for node in graph.node)


# What an ONNX Runtime CPU session holds beyond its weights (a ResNet-20-ADN static session: 11-13 MiB resident for
# 1.1 MiB of weights). The sub-network tree is built when its weights stay within it plus twice the super-net's, so
# that all sub-networks resident cost at most twice one static session.
SESSION_BASE_BYTES = 8 * 2**20


def _weight_bytes(tensor) -> int:
    import numpy as np
    import onnx

    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _subnetwork_reads(graph, runs: tuple[bool, ...], stages: dict[str, int], found: set) -> set:
    """The names the nodes of one sub-network read (``runs[k]``: stage k's skippable sub-path runs): ``graph``'s
    nodes and, of a stage's ``If``, the branch it takes."""
    for node in graph.node:
        found.update(node.input)
        if node.op_type == "If" and node.input[0] in stages:
            taken = "then_branch" if runs[stages[node.input[0]]] else "else_branch"
            _subnetwork_reads(next(a.g for a in node.attribute if a.name == taken), runs, stages, found)
        else:
            for sub in graphs_of(node):
                _subnetwork_reads(sub, runs, stages, found)
    return found


def _all_weights(graph, found: dict) -> dict:
    found.update({t.name: t for t in graph.initializer})
    for node in graph.node:
        for sub in graphs_of(node):
            _all_weights(sub, found)
    return found


def _specialise(graph, runs: tuple[bool, ...], stages: dict[str, int], outer: dict) -> None:
    """Make ``graph`` (in place) the graph of one sub-network: each stage's ``If`` replaced by the nodes and weights of
    the branch it takes, each norm row gathered by the sub-network id by that sub-network's row as a constant."""
    from onnx import helper, numpy_helper

    here = {**outer, **{t.name: t for t in graph.initializer}}
    row = sum(stage_bit(k, len(runs)) for k, run in enumerate(runs) if not run)
    k = 0
    while k < len(graph.node):
        node = graph.node[k]
        if node.op_type == "If" and node.input[0] in stages:
            taken = "then_branch" if runs[stages[node.input[0]]] else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == taken)
            _specialise(branch, runs, stages, here)
            inlined = [*branch.node, *(helper.make_node("Identity", [value.name], [out])
                                       for value, out in zip(branch.output, node.output))]
            graph.node.remove(node)
            for j, inner in enumerate(inlined):
                graph.node.insert(k + j, inner)
            graph.initializer.extend(branch.initializer)
            here.update({t.name: t for t in branch.initializer})
            k += len(inlined)
        elif node.op_type == "Gather" and node.input[0].endswith((SCALE, SHIFT)) and node.input[0] in here:
            _row_as_constant(graph, node, numpy_helper.to_array(here[node.input[0]]), row)
        else:
            for sub in graphs_of(node):
                _specialise(sub, runs, stages, here)
            k += 1


def _prefix_names(graph, prefix: str, counter) -> None:
    """Prefix every value ``graph`` defines (nodes' outputs, weights; in sub-graphs too) and name every node anew:
    the sub-networks' graphs, side by side in one file, must not share a name."""
    defined = set()

    def collect(g) -> None:
        defined.update(t.name for t in g.initializer)
        defined.update(o for n in g.node for o in n.output if o)
        for n in g.node:
            for sub in graphs_of(n):
                collect(sub)

    def rename(g) -> None:
        for t in g.initializer:
            t.name = prefix + t.name
        for n in g.node:
            n.input[:] = [prefix + i if i in defined else i for i in n.input]
            n.output[:] = [prefix + o if o in defined else o for o in n.output]
            n.name = f"{prefix}{next(counter)}"
            for sub in graphs_of(n):
                rename(sub)
        for v in (*g.output, *g.value_info):
            if v.name in defined:
                v.name = prefix + v.name

    collect(graph)
    rename(graph)


def _share_weights(model) -> int:
    """Move every weight of the sub-graphs of ``model`` (as ONNX Runtime optimised it) into the main graph, one
    initializer per distinct value; returns how many there are. ONNX Runtime keeps a sub-graph's weights resident
    several times over (each enclosing graph's copy of it), the main graph's once; and the sub-networks' graphs
    share many (a stage's convs folded with rows that do not depend on the sub-network)."""
    from onnx import numpy_helper

    graph = model.graph
    fresh = _name_maker(graph)
    _make_names_unique(graph, set(), fresh)
    by_value: dict = {}

    def hoist(g) -> None:
        for node in g.node:
            for sub in graphs_of(node):
                for t in sub.initializer:
                    key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
                    if key not in by_value:
                        by_value[key] = fresh()
                        shared = graph.initializer.add()
                        shared.CopyFrom(t)
                        shared.name = by_value[key]
                    _rename_uses(sub, t.name, by_value[key])
                del sub.initializer[:]
                hoist(sub)

    hoist(graph)
    return len(by_value)


def subnetwork_tree(onnx_model: bytes, *, always: bool = False):
    """The one graph ``onnx_model`` as a tree of ``If``s on the mask bits whose leaves are the sub-networks' own
    graphs (each stage's branch taken, calibrated norm rows constant), as ONNX Runtime optimises it for this CPU,
    their weights shared in the main graph (an ``onnx.ModelProto``); None when the sub-networks' weights together
    exceed ``SESSION_BASE_BYTES`` plus twice the super-net's (``always``: build it regardless, for tests)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(onnx_model)
    graph = model.graph
    stages = _stage_of_condition(graph)
    if not stages or len(graph.output) != 1:
        return None
    configs = list(itertools.product((True, False), repeat=len(stages)))
    weights = _all_weights(graph, {})
    sizes = [sum(_weight_bytes(weights[n]) for n in _subnetwork_reads(graph, runs, stages, set())
                 if n in weights and not n.endswith((SCALE, SHIFT))) for runs in configs]
    if not always and sum(sizes) > 2 * sizes[0] + SESSION_BASE_BYTES:
        return None
    producers = {o: n for n in graph.node for o in n.output}
    needed, wanted = set(), [*stages]
    while wanted:  # the main graph's nodes that compute the conditions from the mask
        node = producers.get(wanted.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            wanted += node.input
    conditions = [n for n in graph.node if id(n) in needed]
    made = {o for n in conditions for o in n.output}
    counter = itertools.count()
    leaves = {}
    for runs in configs:
        leaf = onnx.GraphProto()
        leaf.CopyFrom(graph)
        del leaf.input[:]
        _specialise(leaf, runs, stages, {})
        kept = [n for n in leaf.node if not made.issuperset(n.output)]
        del leaf.node[:]
        leaf.node.extend(kept)
        drop_unused_nodes(leaf)
        drop_unused_weights(leaf)
        leaf.output[0].type.tensor_type.ClearField("shape")
        leaf.name = f"subnetwork_{''.join('F' if run else 'T' for run in runs)}"  # the skip string
        _prefix_names(leaf, leaf.name + "/", counter)
        leaves[runs] = leaf
    condition = {k: name for name, k in stages.items()}
    output = graph.output[0]

    def subtree(prefix: tuple[bool, ...]):
        if len(prefix) == len(stages):
            return leaves[prefix]
        name = f"subnetwork_tree/{''.join('F' if run else 'T' for run in prefix)}"
        node = helper.make_node("If", [condition[len(prefix)]], [name], name=name,
                                then_branch=subtree((*prefix, True)), else_branch=subtree((*prefix, False)))
        value = helper.make_tensor_value_info(name, output.type.tensor_type.elem_type, None)
        return helper.make_graph([node], name, [], [value])

    top = subtree(()).node[0]
    top.output[0] = output.name
    del graph.node[:]
    graph.node.extend([*conditions, top])
    drop_unused_weights(graph)
    optimised = _optimised(model.SerializeToString())
    shared = _share_weights(optimised)
    logger.info("[compile] one graph per sub-network, %d in a tree of Ifs on the mask; %d distinct weights",
                len(configs), shared)
    return optimised


def machine_layout(onnx_model: bytes, *, tree: bool | None = None) -> bytes:
    """``onnx_model`` as ONNX Runtime optimises it on this CPU: a small model as a tree of its sub-networks' graphs
    (:func:`subnetwork_tree`; ``tree``: True or False to choose, default by its weights), else blocked across ``If``
    boundaries (see the module docstring), a calibrated one graph with its norms blocked or folded; ``onnx_model``
    itself when this CPU has no blocked layout or the graph has no such boundary."""
    leaves = None if tree is False else subnetwork_tree(onnx_model, always=tree is True)
    if leaves is not None:
        return leaves.SerializeToString()
    optimised = calibrated_layout(onnx_model) or _optimised(onnx_model)
    if keep_blocked_across_ifs(optimised) == 0:
        return onnx_model
    return optimised.SerializeToString()
