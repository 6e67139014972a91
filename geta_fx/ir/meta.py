"""geta metadata: the namespaced keys and the frozen dataclasses stored under them.

This module is the only place that spells the raw keys; everything else uses the
accessors below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

GROUP = "geta.group"            # node.meta: tuple[GroupMember, ...]
QUANTIZER = "geta.quantizer"    # node.meta: QuantizerInfo (on quantizer call_module nodes)
ORIGIN = "geta.origin"          # node.meta: tuple[str, ...] source node names
GROUPS = "geta.groups"          # gm.meta: tuple[PruneGroup, ...]
CHANNELS = "geta.channels"      # gm.meta: ChannelAnalysis (dependency_groups' full result)
LOG = "geta.log"                # gm.meta: list[PassRecord]
FACTS = "geta.facts"            # gm.meta: frozenset[str] of established facts
UNGROUPED = "geta.ungrouped"    # gm.meta: tuple[ParamNote, ...] trainable params in no group
UNQUANTIZED = "geta.unquantized"  # gm.meta: tuple[ParamNote, ...] weights left float, and why


@dataclass(frozen=True)
class GroupMember:
    """A node's tensor carries channels of group ``group_id`` along ``dims``."""

    group_id: int
    dims: tuple[int, ...]
    role: Literal["root", "member"]


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """The indices of one parameter/buffer dimension that belong to a group's units.

    ``indices[k]`` of dimension ``dim`` of attribute ``fqn`` belongs to local unit
    ``units[k]``.  ``role == "out"`` slices are zeroed by ``zero_units`` (they make the
    unit's channels zero); ``"in"`` slices (consumer columns, running statistics,
    buffers) are only removed by ``compress``.
    """

    fqn: str
    dim: int
    indices: torch.Tensor
    units: torch.Tensor
    role: Literal["out", "in"]
    is_param: bool


@dataclass(frozen=True, eq=False)
class PruneGroup:
    """A zero-invariant group: ``num_units`` units whose param slices are pruned together."""

    id: int
    num_units: int
    prunable: bool
    reason: str | None
    members: tuple[ParamSlice, ...]
    nodes: tuple[str, ...]
    unit_size: int          # channels per unit in the group's first stem (1 = channel, hd = head)
    unit_offset: int        # first global unit id of this group

    @property
    def out_members(self) -> tuple[ParamSlice, ...]:
        return tuple(m for m in self.members if m.role == "out")

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        return (f"PruneGroup(id={self.id}, units={self.num_units}x{self.unit_size}, {state}, "
                f"params={sorted({m.fqn for m in self.members})})")


@dataclass(frozen=True)
class QuantizerInfo:
    qid: str
    target: Literal["weight", "act"]
    param_fqn: str | None


@dataclass(frozen=True)
class ParamNote:
    """Why parameter ``fqn`` is in no prune group / has no quantizer."""

    fqn: str
    reason: str


@dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    created: tuple[str, ...] = ()
    erased: tuple[str, ...] = ()


@dataclass
class ChannelAnalysis:
    """Everything physical pruning needs, produced by dependency_groups.

    ``unit_of_atom[a]`` is the global unit of channel atom ``a`` (-1: never pruned).
    ``node_labels[name] = (dims, atoms)`` with ``atoms`` an int64 array over ``dims``.
    ``param_labels[(fqn, dim)] = atoms`` (1-D) for every sliced attribute dimension.
    ``externals`` lists (node name, arg index, operand dim, label source node) of
    computed operands that must be index-selected when channels go away.
    """

    unit_of_atom: Any
    node_labels: dict[str, Any]
    param_labels: dict[tuple[str, int], Any]
    param_roles: dict[tuple[str, int], str]
    externals: list[tuple[str, int, int, str]] = field(default_factory=list)
    num_units: int = 0


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


def get_groups(gm: torch.fx.GraphModule) -> tuple[PruneGroup, ...]:
    return gm.meta.get(GROUPS, ())


def get_ungrouped(gm: torch.fx.GraphModule) -> tuple[ParamNote, ...]:
    return gm.meta.get(UNGROUPED, ())


def get_unquantized(gm: torch.fx.GraphModule) -> tuple[ParamNote, ...]:
    return gm.meta.get(UNQUANTIZED, ())


def log(gm: torch.fx.GraphModule) -> list[PassRecord]:
    return gm.meta.setdefault(LOG, [])


# ------------------------------------------------------------------ capture-time facts
BATCHNORM = "geta.batchnorm"    # gm.meta: tuple[BatchNormState, ...]
TIED = "geta.tied"              # gm.meta: dict[str, str] alias fqn -> canonical fqn
INPUTS = "geta.inputs"          # gm.meta: tuple[InputShape, ...] (see geta_fx.guards)


@dataclass(frozen=True)
class BatchNormState:
    """How a captured BatchNorm keeps its running statistics (PyTorch's semantics).

    ``num_batches_tracked``: its buffer's fqn (None when the module has none); advanced by
    ``GetaModule`` once per train-mode call, never in eval mode.  ``cumulative``: the module
    had ``momentum=None`` (cumulative moving average): the graph's batch_norm runs with
    momentum 1.0 (running stats := batch stats) and ``GetaModule`` blends them into the
    previous statistics with weight ``1 / num_batches_tracked``.
    """

    module: str
    running_mean: str
    running_var: str
    num_batches_tracked: str | None
    cumulative: bool
