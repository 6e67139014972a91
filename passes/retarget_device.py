"""retarget_device: point every device the graph recorded at one device.

Factory ops captured by ``torch.export`` (``torch.arange(n, device=x.device)`` becomes
``aten.arange.default(n, device=cpu)``) bake in the capture device; after ``module.to(dev)``
they would still create their tensors there.  ``RetargetDevice(device)`` rewrites the
``device`` kwarg of every node, the device argument of ``aten.to.device``, moves constant
tensors that are plain attributes (``lifted_tensor_0``; ``nn.Module.to`` moves only
parameters and buffers) and ``meta["val"]``, in the graph and every nested graph.  Like
``torch.export.passes.move_to_device_pass`` it retargets *every* recorded device, including
an explicit ``x.to("cpu")`` in the model.  ``GetaModule.to()`` and
``geta_fx.move_to_device`` run it.

Invariant after it: the graph records one device (fact ``device``).  Honest ``modified``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.pipeline import PassResult

aten = torch.ops.aten


def _as_device(value: Any) -> torch.device | None:
    """``value`` as a torch.device if it names one (a torch.device or a device string)."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            return None
    return None


def _move_val(val: Any, device: torch.device) -> Any:
    """``meta["val"]`` (a FakeTensor, or a structure of them) with every tensor on ``device``."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == device else t.to(device)

    try:
        return pytree.tree_map_only(torch.Tensor, move, val)
    except Exception:  # noqa: BLE001 - vals are metadata; the graph itself is already moved
        return val


def _retarget(gm: torch.fx.GraphModule, device: torch.device | str) -> bool:
    """Retarget every recorded device of ``gm`` (and sub-graphs); whether any changed."""
    device = torch.device(device)
    changed = False
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        sub_changed = False
        for node in sub.graph.nodes:
            dev = _as_device(node.kwargs.get("device"))
            if dev is not None and dev != device:
                node.update_kwarg("device", device)
                sub_changed = True
            if (node.op == "call_function" and node.target is aten.to.device
                    and len(node.args) > 1):
                dev = _as_device(node.args[1])
                if dev is not None and dev != device:
                    node.update_arg(1, device)
                    sub_changed = True
            if node.op == "get_attr":
                sub_changed |= _move_constant(sub, str(node.target), device)
            if "val" in node.meta:
                node.meta["val"] = _move_val(node.meta["val"], device)
        if sub_changed:
            sub.recompile()
            changed = True
    return changed


def _move_constant(gm: torch.fx.GraphModule, target: str, device: torch.device) -> bool:
    """Move the plain tensor attribute ``target`` (not a parameter/buffer) to ``device``."""
    *path, name = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    if not isinstance(owner, nn.Module) or name in owner._parameters or name in owner._buffers:
        return False
    value = owner.__dict__.get(name)
    if not isinstance(value, torch.Tensor) or value.device == device:
        return False
    setattr(owner, name, value.to(device))
    return True


def recorded_devices(gm: torch.fx.GraphModule) -> list[str]:
    """The distinct devices ``gm``'s graphs record (device kwargs, ``aten.to.device``)."""
    found: set[str] = set()
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            dev = _as_device(node.kwargs.get("device"))
            if dev is not None:
                found.add(str(dev))
            if node.op == "call_function" and node.target is aten.to.device and \
                    len(node.args) > 1 and _as_device(node.args[1]) is not None:
                found.add(str(_as_device(node.args[1])))
    return sorted(found)


@dataclass(frozen=True)
class RetargetDevice:
    device: torch.device
    name: ClassVar[str] = "retarget_device"
    requires: ClassVar[frozenset[str]] = frozenset({"graph"})
    provides: ClassVar[frozenset[str]] = frozenset({"device"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(gm, _retarget(gm, self.device))
