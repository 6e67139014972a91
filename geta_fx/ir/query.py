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
