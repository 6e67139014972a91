"""Small graph queries shared by passes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx


def tensor_val(node: Any) -> torch.Tensor | None:
    """The (fake) tensor a node produces, or None for non-tensor nodes."""
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return None


def is_call(node: torch.fx.Node, *targets: Any) -> bool:
    return node.op == "call_function" and node.target in targets


def get_attr_tensor(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    *path, last = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    old = getattr(owner, last)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, last, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    elif last in getattr(owner, "_buffers", {}):
        owner._buffers[last] = value
    else:
        setattr(owner, last, value)


def count_calls(gm: torch.fx.GraphModule, target: Any) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


# ------------------------------------------------------------------ one identity, one creator
def is_quantizer(module: Any) -> bool:
    """Whether ``module`` is a geta quantizer (the one test of the marker every pass uses)."""
    return getattr(module, "is_geta_quantizer", False) is True


def quantizer_of(gm: torch.fx.GraphModule, node: Any) -> torch.nn.Module | None:
    """The geta quantizer module ``node`` calls, if it is such a ``call_module`` node."""
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        mod = get_attr_tensor(gm, str(node.target))
        if is_quantizer(mod):
            return mod
    return None


#: Metadata a new node inherits from the node it stands in for or serves.
INHERITED_META = ("nn_module_stack", "stack_trace")


def create_node_with_meta(graph: torch.fx.Graph, op: str, target: Any,
                          args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
                          anchor: torch.fx.Node, val: Any = None) -> torch.fx.Node:
    """Create a node (at the graph's insertion point) born with its metadata: ``val`` when
    given, ``nn_module_stack``/``stack_trace`` from ``anchor`` and ``geta.origin``
    ``(anchor.name,)`` (the ``_export`` node-metadata-hook idea, with public APIs)."""
    from geta_fx.ir import meta

    node = graph.create_node(op, target, args, kwargs)
    if val is not None:
        node.meta["val"] = val
    for key in INHERITED_META:
        if key in anchor.meta:
            node.meta[key] = anchor.meta[key]
    node.meta[meta.ORIGIN] = (anchor.name,)
    return node
