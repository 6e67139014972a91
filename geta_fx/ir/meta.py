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

from geta_fx.ir.query import is_quantizer

GROUP = "geta.group"            # node.meta: tuple[GroupMember, ...]
QUANTIZER = "geta.quantizer"    # node.meta: QuantizerInfo (on quantizer call_module nodes)
ORIGIN = "geta.origin"          # node.meta: tuple[str, ...] source node names
GROUPS = "geta.groups"          # gm.meta: tuple[PruneGroup, ...]
CHANNELS = "geta.channels"      # gm.meta: ChannelAnalysis (dependency_groups' full result)
LOG = "geta.log"                # gm.meta: list[PassRecord]
FACTS = "geta.facts"            # gm.meta: frozenset[str] of established facts
UNGROUPED = "geta.ungrouped"    # gm.meta: tuple[ParamNote, ...] trainable params in no group
UNQUANTIZED = "geta.unquantized"  # gm.meta: tuple[ParamNote, ...] weights left float, and why
BLOCKS = "geta.blocks"          # gm.meta: tuple[str, ...] block paths of a split graph


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


# ------------------------------------------------------------------ facts and their checkers
# A fact is a claim a pass ``provides`` about the graph.  Each fact a pass can provide has a
# checker here, next to its key: ``check(gm) -> None`` when the claim holds, else a sentence
# naming the node or attribute that breaks it.  The Pipeline runs the checkers of what each
# pass provides after it (``verify=True``, the default), and accepts a required fact that no
# record states when its checker passes on the graph as it is (a slim model handed to
# ``lower`` has its quantizers whatever its recorded facts say).
FactCheck = Any  # Callable[[torch.fx.GraphModule], str | None]
FACT_CHECKS: dict[str, FactCheck] = {}
#: fact -> ``evidence(gm) -> bool``: a fact whose checker holds vacuously (no quantizer node at
#: all) is only derived for a pipeline when the graph shows it (some quantizer node exists).
FACT_EVIDENCE: dict[str, Any] = {}


def fact_check(fact: str, *, evidence: Any = None) -> Any:
    """Register the checker of ``fact`` (once: a second registration is an error)."""
    def register(fn: FactCheck) -> FactCheck:
        if fact in FACT_CHECKS:
            raise ValueError(f"fact {fact!r} already has a checker ({FACT_CHECKS[fact]})")
        FACT_CHECKS[fact] = fn
        if evidence is not None:
            FACT_EVIDENCE[fact] = evidence
        return fn
    return register


def derivable(gm: torch.fx.GraphModule, fact: str) -> bool:
    """Whether the graph as it is establishes ``fact`` (checker passes, evidence present)."""
    if fact not in FACT_CHECKS or FACT_CHECKS[fact](gm) is not None:
        return False
    evidence = FACT_EVIDENCE.get(fact)
    return evidence is None or bool(evidence(gm))


def check_fact(gm: torch.fx.GraphModule, fact: str) -> str | None:
    """None when ``fact`` holds on ``gm`` (or has no checker), else what breaks it."""
    check = FACT_CHECKS.get(fact)
    return None if check is None else check(gm)


def needs_val(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> bool:
    """Nodes that must carry ``meta["val"]``: all but the output, value-less module calls
    (export's input guard) and ``get_attr`` nodes of sub-graphs (``torch.cond`` branches)."""
    if node.op == "output" or (node.op == "call_module" and not node.users):
        return False
    return not (node.op == "get_attr" and gm is not None
                and isinstance(_attr(gm, str(node.target)), torch.nn.Module))


def _graphs(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    return [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@fact_check("graph")
def _check_graph(gm: torch.fx.GraphModule) -> str | None:
    for node in gm.graph.find_nodes(op="get_attr"):
        if _attr(gm, str(node.target)) is None:
            return f"get_attr {node.name} reads {node.target!r}, which the module does not have"
    return None


@fact_check("val")
def _check_val(gm: torch.fx.GraphModule) -> str | None:
    for node in gm.graph.nodes:
        if needs_val(node, gm) and "val" not in node.meta:
            return f"node {node.name} ({node.op} {node.target}) has no meta['val']"
    return None


@fact_check("normalized")
def _check_normalized(gm: torch.fx.GraphModule) -> str | None:
    asserts = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range",
               "_assert_async")
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and name.split(".")[0].startswith(asserts):
            return f"assert node {node.name} ({name}) is still in the graph"
    return None


@fact_check("tied")
def _check_tied(gm: torch.fx.GraphModule) -> str | None:
    seen: dict[int, str] = {}
    for fqn, t in [*gm.named_parameters(remove_duplicate=False),
                   *gm.named_buffers(remove_duplicate=False)]:
        first = seen.setdefault(id(t), fqn)
        if first != fqn:
            return f"one tensor has two names: {first!r} and {fqn!r}"
    targets = [str(n.target) for n in gm.graph.find_nodes(op="get_attr")]
    dup = next((t for t in targets if targets.count(t) > 1), None)
    return None if dup is None else f"two get_attr nodes read {dup!r}"


def _quantizer_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, Any]]:
    out = []
    for node in gm.graph.find_nodes(op="call_module"):
        module = _attr(gm, str(node.target))
        if is_quantizer(module):
            out.append((node, module))
    return out


@fact_check("geta.quantizer", evidence=lambda gm: bool(_quantizer_nodes(gm)))
def _check_quantizer(gm: torch.fx.GraphModule) -> str | None:
    for node, _ in _quantizer_nodes(gm):
        if not isinstance(node.meta.get(QUANTIZER), QuantizerInfo):
            return f"quantizer node {node.name} has no meta[{QUANTIZER!r}]"
    return None


@fact_check("quant_folded")
def _check_quant_folded(gm: torch.fx.GraphModule) -> str | None:
    quant = {node for node, _ in _quantizer_nodes(gm)}
    readers: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in quant:
        info = node.meta.get(QUANTIZER)
        src = node.args[0] if node.args else None
        if src in quant:
            return f"quantizer {node.name} reads quantizer {getattr(src, 'name', src)}"
        if getattr(info, "target", None) == "act" and isinstance(src, torch.fx.Node):
            other = readers.setdefault(src, node)
            if other is not node:
                return f"activation quantizers {other.name} and {node.name} both read {src.name}"
    return None


@fact_check("geta.group")
def _check_group(gm: torch.fx.GraphModule) -> str | None:
    if GROUPS not in gm.meta:
        return f"gm.meta has no {GROUPS!r}"
    for g in get_groups(gm):
        for m in g.members:
            t = _attr(gm, m.fqn)
            if not isinstance(t, torch.Tensor):
                return f"group {g.id} slices {m.fqn!r}, which the module does not have"
            if m.dim >= t.dim() or (len(m.indices) and int(m.indices.max()) >= t.shape[m.dim]):
                return (f"group {g.id} slices {m.fqn!r} dim {m.dim} beyond its shape "
                        f"{tuple(t.shape)}")
    return None


@fact_check("slim")
def _check_slim(gm: torch.fx.GraphModule) -> str | None:
    """After physical pruning: every attribute's ``val`` has the attribute's (new) shape."""
    for node in gm.graph.find_nodes(op="get_attr"):
        t, val = _attr(gm, str(node.target)), node.meta.get("val")
        if isinstance(t, torch.Tensor) and isinstance(val, torch.Tensor) and \
                tuple(val.shape) != tuple(t.shape):
            return (f"get_attr {node.name} ({node.target}) has val shape {tuple(val.shape)} "
                    f"but the tensor is {tuple(t.shape)}")
    return None


@fact_check("geta.lowbit")
def _check_lowbit(gm: torch.fx.GraphModule) -> str | None:
    left = [node.name for node, _ in _quantizer_nodes(gm)]
    return None if not left else f"quantizer modules are left after lowering: {left[:3]}"


@fact_check("train_flags")
def _check_train_flags(gm: torch.fx.GraphModule) -> str | None:
    from geta_fx.passes.train_mode import graph_modes

    modes = graph_modes(gm)
    return None if len(modes) <= 1 else f"train flags disagree: {sorted(modes.items())}"


@fact_check("device")
def _check_device(gm: torch.fx.GraphModule) -> str | None:
    from geta_fx.passes.retarget_device import recorded_devices

    devices = recorded_devices(gm)
    return None if len(devices) <= 1 else f"the graph records several devices: {devices}"
