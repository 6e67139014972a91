"""Per-block graphs for FSDP2: split a GetaModule's flat graph so each block is a module it calls.

A captured graph is flat: it reads ``model.layers.0.self_attn.q_proj.weight`` as an attribute
and never *calls* ``model.layers.0``, so ``fully_shard(block)`` (whose pre-forward hook
all-gathers the block's shards and whose post-forward hook frees them again) would never fire.
:func:`split_blocks` rewrites the graph so that it does::

    flat:   get_attr model.layers.0.*  ...  every op of layer 0  ...  every op of layer 1 ...
    split:  model_layers_0 = call_module[model.layers.0](hidden, cos, sin, mask, <quantizers>)
            hidden_1 = getitem(model_layers_0, 0)
            model_layers_1 = call_module[model.layers.1](hidden_1, ...)

Each block becomes a ``torch.fx.GraphModule`` holding the block's ops, installed *at the
block's own path* over the attribute holder that was there, with the holder's submodules,
parameters and buffers: every parameter keeps its fully-qualified name (``state_dict`` keys,
``gm.groups``, QASSO's layout, checkpoints of the flat module all still apply).  A block's
quantizers stay where they are (``graph_module.geta_quant.*``, still ``gm.quantizers``): the
root graph passes each quantizer *module* into the block call, and the block graph calls it, so
the block's weights are quantized inside its forward, while they are unsharded.  The same graph
rewritten back (:func:`merge_blocks`) is the flat graph, node names and metadata included;
``GetaModule.compress()`` merges a copy before pruning.

:func:`fully_shard_blocks` is the FSDP2 recipe: split, ``fully_shard`` every block, then the root
(which owns what no block owns: embeddings, final norm, head, quantizer scalars).

A block is a set of nodes: the ops whose ``nn_module_stack`` passes through the block's module
or one inside it, and the parameter/buffer reads under its path.  The split refuses, naming
the block, when a parameter of the block (or a view of one) is also read outside it (a weight
tied across the block boundary: FSDP2 frees it after the block's forward) or when the block's
ops do not form one region (some op outside the block both reads a result of the block and
feeds it).
"""

from __future__ import annotations

import heapq
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir.cost import clean_path
from geta_fx.ir.meta import BLOCKS

__all__ = ["call_quantizer", "find_blocks", "flat_graph_module", "fully_shard_blocks",
           "merge_blocks", "split_blocks"]

def flat_graph_module(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph_module`` itself, or a flat copy of it if it is split (for reading the graph:
    reports, drawings)."""
    if not graph_module.meta.get(BLOCKS):
        return graph_module
    from geta_fx._compat import deepcopy_module

    flat = deepcopy_module(graph_module)
    merge_blocks(flat)
    return flat


def call_quantizer(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block graph's call of a module it does not own (a quantizer of the root), passed in."""
    return module(*args, **kwargs)


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) of every module ``node`` was traced in, outermost first
    (paths as :func:`geta_fx.ir.cost.clean_path` normalises them)."""
    stack = (node.meta.get("nn_module_stack") or {}).values()
    return [(clean_path(v[0]), str(v[1])) for v in stack
            if isinstance(v, tuple) and len(v) >= 2 and isinstance(v[0], str)]


def _stack_paths(node: torch.fx.Node) -> set[str]:
    return {path for path, _ in _stack(node)}


def _stack_classes(graph_module: torch.fx.GraphModule) -> dict[str, str]:
    """Module path -> class name, from every node's ``nn_module_stack``."""
    out: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        for path, cls in _stack(node):
            out.setdefault(path, cls)
    return out


def find_blocks(graph_module: torch.fx.GraphModule) -> tuple[str, ...]:
    """The repeated blocks of a captured model: module paths ``parent.<i>`` with at least two
    siblings of one class (decoder layers, ResNet stages' blocks), the outermost ones."""
    classes = _stack_classes(graph_module)
    by_parent: dict[str, list[str]] = {}
    for path in classes:
        parent, _, last = path.rpartition(".")
        if last.isdigit():
            by_parent.setdefault(parent, []).append(path)
    found = []
    for paths in by_parent.values():
        if len(paths) >= 2 and len({classes[p] for p in paths}) == 1:
            found.extend(paths)
    outer = [p for p in found if not any(p.startswith(q + ".") for q in found)]
    order = {p: i for i, p in enumerate(classes)}  # first appearance in the graph
    return tuple(sorted(outer, key=order.__getitem__))


@dataclass
class _Block:
    path: str
    nodes: list[torch.fx.Node] = field(default_factory=list)
    inputs: list[torch.fx.Node] = field(default_factory=list)    # values read from outside
    modules: list[str] = field(default_factory=list)             # outside modules it calls
    outputs: list[torch.fx.Node] = field(default_factory=list)   # values read outside

    def local(self, target: str) -> str | None:
        return target[len(self.path) + 1:] if target.startswith(self.path + ".") else None


def _member(node: torch.fx.Node, blocks: Sequence[str]) -> str | None:
    if node.op == "get_attr":
        return next((p for p in blocks if str(node.target).startswith(p + ".")), None)
    if node.op in ("call_function", "call_module", "call_method"):
        paths = _stack_paths(node)
        return next((p for p in blocks
                     if any(q == p or q.startswith(p + ".") for q in paths)), None)
    return None


def _collect(graph: torch.fx.Graph, paths: Sequence[str]) -> tuple[dict[str, _Block],
                                                                   dict[torch.fx.Node, str]]:
    blocks = {p: _Block(p) for p in paths}
    owner: dict[torch.fx.Node, str] = {}
    for node in graph.nodes:
        p = _member(node, paths)
        if p is not None:
            owner[node] = p
            blocks[p].nodes.append(node)
    index = {n: i for i, n in enumerate(graph.nodes)}
    for b in blocks.values():
        if not any(n.op != "get_attr" for n in b.nodes):
            raise InputError(f"split_blocks: block {b.path!r} runs no op in the captured graph "
                             f"(known module paths come from nn_module_stack)")
        inside = set(b.nodes)
        ins = {i for n in b.nodes for i in n.all_input_nodes if i not in inside}
        b.inputs = sorted(ins, key=index.__getitem__)
        for n in b.nodes:
            if n.op == "call_module" and b.local(str(n.target)) is None \
                    and n.target not in b.modules:
                b.modules.append(str(n.target))
            outside = [u for u in n.users if u not in inside]
            if outside and _param_view(n) is not None:
                raise InputError(
                    f"split_blocks: {_param_view(n)!r} of block {b.path!r} is also read outside it "
                    f"(by {outside[0].format_node()}): a weight shared across the block "
                    f"boundary cannot be sharded with the block; leave {b.path!r} out of "
                    f"blocks=")
            if outside:
                b.outputs.append(n)
    return blocks, owner


def _param_view(node: torch.fx.Node) -> str | None:
    """The attribute ``node`` is (a view of), if it is one: FSDP2 frees a block's unsharded
    parameters after its forward, so no such value may leave the block."""
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        returns = schema.returns if schema is not None else ()
        if not (returns and returns[0].alias_info is not None and node.args
                and isinstance(node.args[0], torch.fx.Node)):
            return None
        node = node.args[0]
    return str(node.target) if node.op == "get_attr" else None


def _block_graph(b: _Block) -> torch.fx.Graph:
    """The block's ops as a graph: inputs, then the quantizer modules it calls, as placeholders."""
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i in b.inputs:
        env[i] = sub.placeholder(i.name)
        env[i].meta = dict(i.meta)
    mods = {t: sub.placeholder(t.replace(".", "_") + "_module") for t in b.modules}
    for n in b.nodes:
        if n.op == "call_module" and b.local(str(n.target)) is None:
            new = sub.create_node("call_function", call_quantizer,
                                  (mods[str(n.target)], *torch.fx.map_arg(n.args, env.__getitem__)),
                                  torch.fx.map_arg(n.kwargs, env.__getitem__), name=n.name)
            new.meta = dict(n.meta)
        else:
            new = sub.node_copy(n, env.__getitem__)
            if n.op in ("get_attr", "call_module"):
                new.target = b.local(str(n.target))
        env[n] = new
    sub.output(tuple(env[o] for o in b.outputs))
    return sub


def _schedule(graph: torch.fx.Graph, blocks: dict[str, _Block],
              owner: dict[torch.fx.Node, str]) -> list[Any]:
    """A topological order of the contracted graph (nodes, block paths and ``("module", target)``
    reads of the quantizers blocks call), as close to the original order as it allows."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    first_call: dict[str, int] = {}
    for b in blocks.values():
        for n in b.nodes:
            if n.op == "call_module" and str(n.target) in b.modules:
                first_call.setdefault(str(n.target), index[n])
    units: dict[Any, tuple[int, set[Any]]] = {}
    for n in graph.nodes:
        if n not in owner:
            units[n] = (index[n], {owner.get(i, i) for i in n.all_input_nodes})
    for t, at in first_call.items():
        units[("module", t)] = (at, set())
    for b in blocks.values():
        compute = [index[n] for n in b.nodes if n.op not in ("get_attr", "call_module")]
        deps = {owner.get(i, i) for i in b.inputs} | {("module", t) for t in b.modules}
        units[b.path] = (min(compute or [index[b.nodes[0]]]), deps)
    users: dict[Any, list[Any]] = {u: [] for u in units}
    missing = {u: len(d) for u, (_, d) in units.items()}
    for u, (_, deps) in units.items():
        for d in deps:
            users[d].append(u)
    ready = [(at, i, u) for i, (u, (at, d)) in enumerate(units.items()) if not d]
    keys = {u: i for i, u in enumerate(units)}
    heapq.heapify(ready)
    order: list[Any] = []
    while ready:
        _, _, u = heapq.heappop(ready)
        order.append(u)
        for v in users[u]:
            missing[v] -= 1
            if not missing[v]:
                heapq.heappush(ready, (units[v][0], keys[v], v))
    if len(order) != len(units):
        stuck = sorted(p for p in blocks if p not in order)
        raise InputError(f"split_blocks: the ops of block(s) {stuck} do not form one region: an "
                         "op outside the block both reads one of its results and feeds it")
    return order


def _replace_at(graph_module: torch.fx.GraphModule, path: str,
                make: Callable[[nn.Module], nn.Module]) -> None:
    """Put ``make(old)`` at ``path`` in place of the module ``old`` there, holding ``old``'s
    submodules, parameters and buffers under the same names."""
    parent_path, _, name = path.rpartition(".")
    parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
    old = getattr(parent, name)
    new = make(old)
    new._modules = OrderedDict(old._modules)
    new._parameters = OrderedDict(old._parameters)
    new._buffers = OrderedDict(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.train(old.training)
    parent._modules[name] = new


def split_blocks(graph_module: torch.fx.GraphModule | nn.Module,
                 blocks: Iterable[str] | None = None) -> tuple[str, ...]:
    """Rewrite a GetaModule's graph (in place) so that it calls each block as a module.

    ``blocks``: module paths of the model as captured (``"model.layers.0"``); default
    :func:`find_blocks`.  Returns the paths split.  Outputs, gradients, parameter names and
    ``gm.quantizers`` are unchanged; :func:`merge_blocks` undoes it.
    """
    gm = _graph_module(graph_module)
    if gm.meta.get(BLOCKS):
        raise InputError(f"split_blocks: the graph is split already (blocks "
                         f"{list(gm.meta[BLOCKS])}); merge_blocks() first")
    paths = tuple(blocks) if blocks is not None else find_blocks(gm)
    if not paths:
        raise InputError("split_blocks: no repeated blocks found (module paths 'parent.<i>' of "
                         "one class); pass blocks=[...] with module paths of the model")
    for p in paths:
        if not isinstance(p, str) or not p:
            raise InputError(f"split_blocks: blocks must be module paths, got {p!r}")
        inner = [q for q in paths if q != p and q.startswith(p + ".")]
        if inner:
            raise InputError(f"split_blocks: block {inner[0]!r} lies inside block {p!r}")
    if len(set(paths)) != len(paths):
        raise InputError(f"split_blocks: a block is named twice in {list(paths)}")
    known = _stack_classes(gm)
    unknown = [p for p in paths if not any(q == p or q.startswith(p + ".") for q in known)]
    if unknown:
        raise InputError(f"split_blocks: no op of the graph runs in module {unknown[0]!r} "
                         f"(known paths include {sorted(known)[:6]})")
    old = gm.graph
    found, owner = _collect(old, paths)
    order = _schedule(old, found, owner)
    new = torch.fx.Graph(tracer_cls=old._tracer_cls)
    new._codegen = old._codegen
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    module_reads: dict[str, torch.fx.Node] = {}
    for u in order:
        if isinstance(u, torch.fx.Node):
            env[u] = new.node_copy(u, env.__getitem__)
        elif isinstance(u, tuple):
            module_reads[u[1]] = new.create_node("get_attr", u[1],
                                                 name=u[1].replace(".", "_") + "_module")
        else:
            b = found[u]
            args = tuple(env[i] for i in b.inputs) + tuple(module_reads[t] for t in b.modules)
            call = new.call_module(u, args)
            for k, o in enumerate(b.outputs):
                env[o] = new.create_node("call_function", operator.getitem, (call, k),
                                         name=o.name)
                env[o].meta = dict(o.meta)
    for p in paths:  # a GraphModule running the block's ops, over the attribute holder
        _replace_at(gm, p, lambda holder, p=p: torch.fx.GraphModule(holder, _block_graph(found[p]),
                                                                  class_name="GetaBlock"))
    gm.graph = new  # recompiles
    gm.meta[BLOCKS] = paths
    return paths


def merge_blocks(graph_module: torch.fx.GraphModule | nn.Module) -> None:
    """Undo :func:`split_blocks` in place: the flat graph again (same node names and meta),
    plain attribute holders at the block paths.  Not for FSDP-sharded modules."""
    gm = _graph_module(graph_module)
    paths = tuple(gm.meta.get(BLOCKS) or ())
    if not paths:
        return
    old = gm.graph
    new = torch.fx.Graph(tracer_cls=old._tracer_cls)
    new._codegen = old._codegen
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    outs: dict[torch.fx.Node, tuple[Any, ...]] = {}
    module_reads = {n for n in old.nodes if n.op == "get_attr" and n.users and
                    all(u.op == "call_module" and u.target in paths for u in n.users)}
    for n in old.nodes:
        if n in module_reads:
            continue
        if n.op == "call_module" and n.target in paths:
            outs[n] = _inline(new, gm.get_submodule(str(n.target)), str(n.target),
                              n.args, env)
        elif n.op == "call_function" and n.target is operator.getitem and n.args[0] in outs:
            env[n] = outs[n.args[0]][n.args[1]]
        else:
            env[n] = new.node_copy(n, env.__getitem__)
    for p in paths:  # a plain attribute holder again
        _replace_at(gm, p, lambda _block: nn.Module())
    gm.graph = new
    del gm.meta[BLOCKS]


def _inline(new: torch.fx.Graph, block: torch.fx.GraphModule, path: str, args: tuple[Any, ...],
            env: dict[torch.fx.Node, torch.fx.Node]) -> tuple[Any, ...]:
    """Copy ``block``'s ops into ``new`` (called with root ``args``); returns its outputs."""
    local: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in block.graph.nodes if n.op == "placeholder"]
    modules: dict[torch.fx.Node, str] = {}
    for ph, a in zip(placeholders, args, strict=True):
        if a.op == "get_attr" and isinstance(_attr(a), nn.Module):
            modules[ph] = str(a.target)
        else:
            local[ph] = env[a]
    result: tuple[Any, ...] = ()
    for n in block.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            result = tuple(torch.fx.map_arg(n.args[0], local.__getitem__))
            break
        if n.op == "call_function" and n.target is call_quantizer:
            mod, *rest = n.args
            copy = new.create_node("call_module", modules[mod],
                                   tuple(torch.fx.map_arg(tuple(rest), local.__getitem__)),
                                   torch.fx.map_arg(n.kwargs, local.__getitem__), name=n.name)
            copy.meta = dict(n.meta)
        else:
            copy = new.node_copy(n, local.__getitem__)
            if n.op in ("get_attr", "call_module"):
                copy.target = f"{path}.{n.target}"
        local[n] = copy
    return result


def _attr(node: torch.fx.Node) -> Any:
    obj: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _graph_module(m: torch.fx.GraphModule | nn.Module) -> torch.fx.GraphModule:
    gm = getattr(m, "graph_module", m)
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"expected a GetaModule or its graph_module, got {type(m).__name__}")
    return gm


def fully_shard_blocks(gm: nn.Module, blocks: Iterable[str] | None = None,
                       **fsdp_kwargs: Any) -> tuple[str, ...]:
    """FSDP2 with one unit per block: :func:`split_blocks`, ``fully_shard`` on every block, then
    on ``gm`` (the root unit: everything no block owns).  ``fsdp_kwargs`` go to every
    ``fully_shard`` call (``mesh=``, ``reshard_after_forward=``, ``mp_policy=`` ...).
    Build QASSO after this call.  Returns the block paths."""
    from torch.distributed.fsdp import fully_shard

    paths = split_blocks(gm, blocks)
    inner = _graph_module(gm)
    for p in paths:
        fully_shard(inner.get_submodule(p), **fsdp_kwargs)
    fully_shard(gm, **fsdp_kwargs)
    return paths
