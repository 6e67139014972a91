"""dependency_groups: the QADG of GETA as an abstract interpretation over ATen ops.

Why: structured pruning must remove, together, every parameter slice that
touches one channel (conv rows, BN entries, consumer columns, attention heads,
concat offsets, flatten blocks...).  This pass finds those sets for any graph.

How: every stem output channel is an *atom* (``geta_fx.ir.channels``); the rule
registry (``geta_fx.ir.ops_table``) says, per ATen OpOverload, how a tensor's channel
label flows and which atoms must be pruned together (union-find).  Units are the
connected components; a group is a set of units born from stems that got tied
together.  A group is prunable only if it is *zero-invariant*: zeroing the
"out" parameter slices of a unit makes every tensor entry carrying it exactly
zero, and every consumer tolerates its removal.  Anything the table does not
know pins the channels it touches (unprunable, with the reason).

Invariants after the pass:
* ``gm.meta["geta.groups"]``: tuple[PruneGroup], ids in graph order.
* ``gm.meta["geta.channels"]``: ChannelAnalysis for physical_prune.
* ``node.meta["geta.group"]``: tuple[GroupMember] on channel-carrying nodes.
* ``gm.meta["geta.ungrouped"]``: tuple[ParamNote], a reason for every trainable
  parameter in no group (e.g. "used inside torch.cond branch 'true_graph_0'; not
  analysed": higher-order-op bodies are not analysed); branch ones are logged as a warning.
* The graph is not modified (``modified=False``).
* Quantizer call_module nodes and bare ``geta::quantize`` calls are transparent:
  groups are identical with and without them.
* A lowered model (``geta::lowbit_linear`` / ``unpack_weight``, ``geta_lowbit.*``
  buffers) raises a NodeError that says to transform the model from before lowering.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx

from geta_fx.errors import NodeError
from geta_fx.ir import meta
from geta_fx.ir.branches import branch_uses
from geta_fx.ir.channels import Label, UnionFind, size_expr
from geta_fx.ir import op_sets
from geta_fx.ir.args import arg
from geta_fx.ir.ops_table import IGNORED, is_geta_op, quantizer_module, rule_for
from geta_fx.ir.query import get_attr_tensor, is_quantizer, tensor_val
from geta_fx.passes.lower_quant import HOLDER as LOWBIT_HOLDER
from geta_fx.pipeline import PassResult

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: Ops a weight may flow through between its get_attr and the layer using it.
_WEIGHT_TRANSPARENT = op_sets.COPIES


def _weight_order(x: torch.fx.Node, nd: int) -> list[int] | None:
    """For a dim-reordering view of a weight (``W.t()``, ``W.T``, ``W.mT``,
    ``W.transpose(a, b)``, ``W.permute(...)``): output dim i == input dim order[i]."""
    if x.target in op_sets.TRANSPOSES:
        order = list(range(nd))
        if x.target in (aten.t.default, aten.t_copy.default, aten.numpy_T.default):
            return order[::-1]  # t, and .T (numpy_T: all dims reversed) of a 2-D weight
        d0, d1 = (d % nd for d in x.args[1:3])
        order[d0], order[d1] = order[d1], order[d0]
        return order
    if x.target in op_sets.MATRIX_TRANSPOSES:
        order = list(range(nd))
        order[-2], order[-1] = order[-1], order[-2]
        return order
    if x.target in op_sets.PERMUTES:
        return [d % nd for d in arg(x, "dims")]
    return None


#: The attribute dim of a size-1 dim a view added to a weight (``b.view(1, 1, 1, -1)``):
#: none, so a rule that labels it pins (``label_param``: "does not match channels").
NO_DIM = 1 << 20
_UNIT_DIM_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                             aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims})


def _unit_dims_order(x: torch.fx.Node) -> list[int] | None:
    """For a view of a weight that only adds or drops size-1 dims (``b.view(1, -1, 1, 1)``,
    ``w.unsqueeze(0)``): output dim i == input dim order[i] (``NO_DIM`` for an added one)."""
    if x.target not in _UNIT_DIM_VIEWS:
        return None
    src, out = tensor_val(x.args[0]), tensor_val(x)
    if src is None or out is None or not all(
            isinstance(n, int) for n in (*src.shape, *out.shape)):  # weights: static sizes
        return None
    big_in = [i for i, n in enumerate(src.shape) if n != 1]
    big_out = [j for j, n in enumerate(out.shape) if n != 1]
    if [src.shape[i] for i in big_in] != [out.shape[j] for j in big_out]:
        return None
    order = [NO_DIM] * out.dim()
    for i, j in zip(big_in, big_out):
        order[j] = i
    return order


def _is_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A quantizer module call, or a bare ``geta::quantize`` (Q(0) = 0: transparent)."""
    return quantizer_module(gm, node) is not None or (
        node.op == "call_function" and is_geta_op(node.target, "quantize"))


#: Deployment ops whose weights are packed integer levels (geta_fx.deploy.lower).
_LOWBIT_OPS = ("lowbit_linear", "unpack_weight")


def _reject_lowered(gm: torch.fx.GraphModule) -> None:
    """A lowered model's weights are packed (or frozen) buffers: nothing left to train or
    prune, so say so instead of returning groups no parameter can move."""
    found = next(((n, f"packed low-bit weights (geta::{n.target.__name__.split('.')[0]})")
                  for n in gm.graph.nodes if n.op == "call_function"
                  and is_geta_op(n.target, *_LOWBIT_OPS)), None) or next(
        ((n, "weights frozen by geta_fx.lower") for n in gm.graph.nodes
         if n.op == "get_attr" and str(n.target).startswith(f"{LOWBIT_HOLDER}.")), None)
    if found is None:
        return
    node, what = found
    held = str(node.target) if node.op == "get_attr" else next(
        (str(a.target) for a in node.all_input_nodes if a.op == "get_attr"), "?")
    raise NodeError(node, f"the model computes with {what} reading {held!r}, which cannot "
                          "be trained or pruned again. Transform the model from before "
                          "lowering instead: gm.compress() without lower=True (or the model "
                          "compress(lower=True) was called on); lower the result of the new "
                          "round with geta_fx.lower")


class _Analyzer:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.uf = UnionFind()
        self.labels: dict[torch.fx.Node, Any] = {}
        self.params: dict[tuple[str, int], np.ndarray] = {}
        self.roles: dict[tuple[str, int], str] = {}
        self.trainable: dict[str, bool] = {}
        self.spaces: list[tuple[int, int, str]] = []  # (first atom, count, node name)
        self.pins: list[tuple[np.ndarray, str, str]] = []
        self.externals: list[tuple[str, int, int, str]] = []
        self.fixed_reads: list[tuple[str, int, torch.fx.Node]] = []
        self.node: torch.fx.Node | None = None

    # ------------------------------------------------------------- rule API
    def label(self, x: Any) -> Label | None:
        if not isinstance(x, torch.fx.Node):
            return None
        lab = self.labels.get(x)
        return lab if isinstance(lab, Label) else None

    def shape(self, x: Any) -> list | None:
        val = tensor_val(x)
        if val is None:
            return None
        return [size_expr(s) for s in val.shape]

    def shape_of_val(self, val: torch.Tensor) -> list:
        return [size_expr(s) for s in val.shape]

    def fresh(self, n: int | None, node: torch.fx.Node) -> np.ndarray:
        if n is None:
            raise NodeError(node, "channel count is not static")
        atoms = self.uf.new(n)
        self.spaces.append((int(atoms[0]) if n else self.uf.n, n, node.name))
        return atoms

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def pin(self, lab: Label | np.ndarray, node: torch.fx.Node, reason: str) -> None:
        atoms = lab.atoms if isinstance(lab, Label) else np.asarray(lab)
        self.pins.append((atoms.ravel().copy(), reason, node.name))

    def pin_inputs(self, node: torch.fx.Node, reason: str) -> None:
        for inp in node.all_input_nodes:
            lab = self.labels.get(inp)
            for part in lab if isinstance(lab, list) else [lab]:
                if isinstance(part, Label):
                    self.pin(part, node, reason)
        return None

    def param(self, x: Any) -> tuple[str, tuple[int, ...], bool] | None:
        """Resolve ``x`` to (attribute fqn, node-dim -> attribute-dim map, trainable)."""
        perm: list[int] | None = None
        while isinstance(x, torch.fx.Node):
            if x.op == "get_attr":
                t = get_attr_tensor(self.gm, str(x.target))
                if not isinstance(t, torch.Tensor):
                    return None
                nd = t.dim()
                p = tuple(perm) if perm is not None else tuple(range(nd))
                trainable = isinstance(t, torch.nn.Parameter) and t.requires_grad
                self.trainable[str(x.target)] = trainable
                return str(x.target), p, trainable
            val = tensor_val(x)
            nd = val.dim() if val is not None else 0
            cur = perm if perm is not None else list(range(nd))
            if _is_quantizer(self.gm, x) or x.target in _WEIGHT_TRANSPARENT or (
                    x.target is aten.expand.default and tensor_val(x.args[0]) is not None
                    and tensor_val(x.args[0]).dim() == nd):
                x = x.args[0]
                perm = cur
            elif (order := _weight_order(x, nd) or _unit_dims_order(x)) is not None:
                # node dim i == input dim order[i]; compose with the outer map
                perm = [order[i] if 0 <= i < len(order) else NO_DIM for i in cur] \
                    if perm is not None else order
                x = x.args[0]
            else:
                return None
        return None

    def param_atoms(self, fqn: str, dim: int) -> np.ndarray | None:
        return self.params.get((fqn, dim))

    def reads_fixed_channels(self, fqn: str, dim: int, node: torch.fx.Node) -> None:
        """Dim ``dim`` of ``fqn`` meets channels no group owns (a graph input) at ``node``.

        Only a tied weight can also be labelled by another use; whatever atoms that use gives
        it are pinned once the graph is done (``_pin_fixed_reads``).
        """
        self.fixed_reads.append((fqn, dim, node))

    def _pin_fixed_reads(self) -> None:
        for fqn, dim, node in self.fixed_reads:
            atoms = self.params.get((fqn, dim))
            if atoms is not None:
                self.pin(atoms, node, f"parameter {fqn} dim {dim} (a tied weight) also reads "
                                      "channels that cannot be pruned (a graph input)")

    def label_param(self, fqn: str, dim: int, atoms: np.ndarray, role: str) -> None:
        key = (fqn, dim)
        t = get_attr_tensor(self.gm, fqn)
        if t.dim() <= dim or t.shape[dim] != len(atoms):
            assert self.node is not None
            self.pin(atoms, self.node, f"parameter {fqn} dim {dim} does not match channels")
            return
        if key in self.params:
            self.uf.union(self.params[key], atoms)
            if role == "out":
                self.roles[key] = "out"
        else:
            self.params[key] = np.asarray(atoms).copy()
            self.roles[key] = role
        if not self.trainable.get(fqn, isinstance(t, torch.nn.Parameter)):
            self.roles[key] = "in"

    def external(self, node: torch.fx.Node, arg_index: int, dim: int,
                 source: torch.fx.Node | None = None) -> None:
        """Operand ``arg_index`` of ``node`` is a computed tensor whose ``dim`` runs along
        the channels labelled on ``source`` (default: the node's own output)."""
        self.externals.append((node.name, arg_index, dim, (source or node).name))

    def external_bias(self, node: torch.fx.Node) -> None:
        lab = self.label(node)
        if lab is not None:
            assert self.node is not None
            self.pin(lab, self.node, "computed bias")

    def mutated(self, x: Any, lab: Label | None, node: torch.fx.Node) -> None:
        """In-place ``node`` wrote its result (labelled ``lab``) into its operand ``x``.

        Readers of ``x`` after ``node`` read the result, so ``x`` takes ``lab``.  A view of
        the same storage made before ``node`` and read after it keeps its old label: sound
        only while the write keeps zeroed channels zero, so those channels are pinned when
        it does not (``ok`` lost).  A write that adds, drops or moves channels is pinned.
        """
        old = self.label(x)
        if old is None and lab is None:
            return
        if old is None or lab is None or old.dim != lab.dim or len(old.atoms) != len(lab.atoms):
            for part in (old, lab):
                if part is not None:
                    self.pin(part, node, f"{_op_name(node)}: an in-place write changes which "
                                         "channels its operand carries")
            return
        self.unify(old.atoms, lab.atoms)
        self.labels[x] = lab
        if old.ok and not lab.ok and _stale_views(x, node, self._position):
            self.pin(lab, node, f"{_op_name(node)}: an in-place write makes pruned channels "
                                "non-zero in a tensor another view reads later")

    @functools.cached_property
    def _position(self) -> dict[torch.fx.Node, int]:
        return {n: i for i, n in enumerate(self.gm.graph.nodes)}

    def _reads_tiled(self, node: torch.fx.Node) -> bool:
        for inp in node.all_input_nodes:
            lab = self.labels.get(inp)
            if any(isinstance(p, Label) and p.tile is not None
                   for p in (lab if isinstance(lab, list) else [lab])):
                return True
        return False

    def from_grid(self, grid: np.ndarray, dims: list[int], ok: bool,
                  indexed: tuple[int, ...] = ()) -> Label:
        """Label for a grid of atoms over output ``dims``: make inner dims whole.

        ``indexed`` grid dims are made whole first (their atoms unified along them): the
        graph only ever picks them apart (``select``/``unbind`` of a packed q/k/v), so the
        label stays on the next dim instead of on one a select would pin.
        """
        for k in indexed:
            self.uf.union(grid, grid.take([0], axis=k))
        roots = self.uf.find(grid)
        varying = [k for k in range(grid.ndim)
                   if grid.shape[k] > 1 and not (roots == roots.take([0], axis=k)).all()]
        if len(varying) >= 2:
            outer = varying[0]
            idx = [slice(None)] * grid.ndim
            for k in range(grid.ndim):
                if k != outer:
                    idx[k] = slice(0, 1)
            self.uf.union(grid, grid[tuple(idx)])
            varying = [outer]
        keep = varying[0] if varying else next(
            (k for k in range(grid.ndim) if grid.shape[k] > 1 and k not in indexed), next(
                (k for k in range(grid.ndim) if grid.shape[k] > 1), 0))
        idx = [0] * grid.ndim
        idx[keep] = slice(None)  # type: ignore[call-overload]
        return Label(dims[keep], np.ascontiguousarray(grid[tuple(idx)]), ok)

    # ------------------------------------------------------------- driver
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                for inp in node.all_input_nodes:
                    lab = self.labels.get(inp)
                    for part in lab if isinstance(lab, list) else [lab]:
                        if isinstance(part, Label):
                            self.pin(part, node, "reaches a graph output")
                continue
            if _is_quantizer(self.gm, node):
                lab = self.label(node.args[0])  # Q(0) = 0: transparent pass-through
                if lab is not None:
                    self.labels[node] = lab
                continue
            if node.op == "call_function" and node.target in IGNORED:
                continue
            rule = rule_for(node.target) if node.op == "call_function" else None
            if rule is None:
                if any(isinstance(self.labels.get(i), (Label, list)) for i in node.all_input_nodes):
                    self.pin_inputs(node, f"unsupported op {_op_name(node)}")
                continue
            if not rule.tiled and self._reads_tiled(node):
                self.pin_inputs(node, f"{_op_name(node)}: channels interleaved with a dynamic "
                                      "dim (tiled) reach an op that cannot follow them")
                continue
            try:
                out = rule.analyze(self, node)
            except NodeError:
                raise
            except Exception as e:  # noqa: BLE001 - an op rule must never crash the pass
                logger.debug("rule for %s failed: %s", node.target, e)
                self.pin_inputs(node, f"{_op_name(node)}: could not analyse ({type(e).__name__}:"
                                      f" {e})")
                out = None
            if out is not None:
                self.labels[node] = out
        self._pin_fixed_reads()


def _is_view(node: Any) -> bool:
    """``node``'s result shares its first operand's storage (a view, an in-place result, an
    item of a split)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or not node.args:
        return False
    if node.target is operator.getitem:
        return _is_view(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.returns and
                schema.returns[0].alias_info is not None)


def _stale_views(x: torch.fx.Node, node: torch.fx.Node, position: dict[torch.fx.Node, int]
                 ) -> bool:
    """Whether a view of ``x``'s storage (other than ``x`` and in-place ``node``) made before
    ``node`` is read after it."""
    root = x
    while _is_view(root):
        root = root.args[0]
    seen: set[torch.fx.Node] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(u for u in n.users if _is_view(u))
    at = position[node]
    return any(position[v] < at and any(position[u] > at for u in v.users)
               for v in seen - {x, node})


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    return str(getattr(t, "__name__", t)) if node.op == "call_function" else f"{node.op} {t}"


@dataclass(frozen=True)
class DependencyGroups:
    """Find zero-invariant prune groups (GETA's QADG) and annotate the graph."""

    name: ClassVar[str] = "dependency_groups"
    requires: ClassVar[frozenset[str]] = frozenset({"val"})
    provides: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        _reject_lowered(gm)
        an = _Analyzer(gm)
        an.run()
        groups, analysis, node_groups = _build_groups(an)
        gm.meta[meta.GROUPS] = groups
        gm.meta[meta.UNGROUPED] = _ungrouped(gm, groups)
        gm.meta[meta.CHANNELS] = analysis
        for node in gm.graph.nodes:
            node.meta.pop(meta.GROUP, None)
            if node.name in node_groups:
                node.meta[meta.GROUP] = node_groups[node.name]
        return PassResult(gm, False)


def _ungrouped(gm: torch.fx.GraphModule, groups: tuple[meta.PruneGroup, ...]
               ) -> tuple[meta.ParamNote, ...]:
    """A reason for every trainable parameter (quantizers' own excepted) in no group."""
    grouped = {m.fqn for g in groups for m in g.members}
    quant = {name for name, m in gm.named_modules() if is_quantizer(m)}
    hop = {}
    for use in branch_uses(gm):
        hop.setdefault(use.fqn, []).append(use.describe())
    readers: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), []).extend(_op_name(u) for u in node.users)
    aliases: dict[int, list[str]] = {}  # a tied parameter is read under any of its names
    params: dict[int, torch.nn.Parameter] = {}
    for fqn, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(fqn)
        params[id(p)] = p
    notes = []
    for key, names in aliases.items():
        fqn = next((n for n in names if readers.get(n)), names[0])
        if not params[key].requires_grad or grouped.intersection(names) or \
                fqn.rsplit(".", 1)[0] in quant:
            continue
        if fqn in hop:
            reason = "; ".join(hop[fqn]) + "; not analysed"
        elif not readers.get(fqn):
            reason = "not read by the graph"
        else:
            ops = ", ".join(sorted(set(readers[fqn])))
            reason = f"read only by {ops}, which carry no channel of any layer"
        notes.append(meta.ParamNote(fqn, reason))
    if notes and not groups:  # never 0 groups silently
        logger.warning("dependency_groups: found no prune group; %d trainable parameter(s) in "
                       "none: %s", len(notes), "; ".join(f"{n.fqn} ({n.reason})" for n in notes))
        return tuple(notes)
    hop_notes = [n for n in notes if n.fqn in hop]
    if hop_notes:
        logger.warning("dependency_groups: %d parameter(s) are in no prune group: %s",
                       len(hop_notes), "; ".join(f"{n.fqn} ({n.reason})" for n in hop_notes))
    if len(notes) > len(hop_notes):
        logger.info("dependency_groups: parameters in no prune group: %s",
                    "; ".join(f"{n.fqn} ({n.reason})" for n in notes if n.fqn not in hop))
    return tuple(notes)


@dataclass(frozen=True)
class _Numbering:
    """Where each atom went: its space's group, its unit, and each group's unit range."""

    roots: np.ndarray          # atom -> union-find root (0: untracked)
    group_of_space: np.ndarray  # space -> group id
    group_of_atom: np.ndarray  # atom -> group id (-1: none)
    root_group: np.ndarray     # root atom -> group id
    unit_of_atom: np.ndarray   # atom -> global unit id (-1: none)
    group_units: list[np.ndarray]  # group -> the roots of its units, in unit order
    offsets: list[int]         # group -> its first global unit id
    num_units: int

    @property
    def num_groups(self) -> int:
        return len(self.group_units)


def _group_spaces(an: _Analyzer, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each space, group of each atom): spaces sharing a tracked root form one
    group; ids follow the spaces' creation order (graph order: deterministic)."""
    n = an.uf.n
    space_of = np.full(n, -1, dtype=np.int64)
    for s, (first, count, _) in enumerate(an.spaces):
        space_of[first: first + count] = s
    parent = list(range(len(an.spaces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    atoms = np.arange(1, n)
    valid = roots[atoms] != 0
    order = atoms[valid][np.argsort(roots[atoms[valid]], kind="stable")]
    if len(order) > 1:
        same = roots[order[1:]] == roots[order[:-1]]
        pairs = np.stack([space_of[order[:-1]][same], space_of[order[1:]][same]], 1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        for a, b in np.unique(pairs, axis=0) if len(pairs) else []:
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    comp = [find(i) for i in range(len(an.spaces))]
    gid_of_comp = {c: g for g, c in enumerate(sorted(set(comp)))}
    group_of_space = np.array([gid_of_comp[c] for c in comp], dtype=np.int64)
    group_of_atom = np.full(n, -1, dtype=np.int64)
    group_of_atom[1:] = np.where(space_of[1:] >= 0,
                                 group_of_space[np.maximum(space_of[1:], 0)], -1)
    return group_of_space, group_of_atom


def _number_units(an: _Analyzer) -> _Numbering:
    """Units: distinct roots per group, ordered by group, then by the unit's first atom."""
    n = an.uf.n
    roots = an.uf.roots()
    group_of_space, group_of_atom = _group_spaces(an, roots)
    num_groups = int(group_of_space.max()) + 1 if len(group_of_space) else 0
    first_atom_of_root = np.full(n, n, dtype=np.int64)
    np.minimum.at(first_atom_of_root, roots[1:], np.arange(1, n))
    live = np.arange(1, n)
    live = live[(group_of_atom[live] >= 0) & (roots[live] != 0)]
    pair = np.unique(group_of_atom[live] * n + roots[live])
    ug, ur = pair // n, pair % n
    order = np.lexsort((first_atom_of_root[ur], ug))
    ug, ur = ug[order], ur[order]
    counts = np.bincount(ug, minlength=num_groups)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
    root_group = np.full(n, -1, dtype=np.int64)
    root_group[roots[1:]] = group_of_atom[1:]
    unit_of_root = np.full(n, -1, dtype=np.int64)
    unit_of_root[ur] = np.arange(len(ur))
    unit_of_atom = np.full(n, -1, dtype=np.int64)
    unit_of_atom[1:] = unit_of_root[roots[1:]]
    unit_of_atom[roots == 0] = -1
    return _Numbering(
        roots=roots, group_of_space=group_of_space, group_of_atom=group_of_atom,
        root_group=root_group, unit_of_atom=unit_of_atom,
        group_units=[ur[offsets[g]: offsets[g] + counts[g]] for g in range(num_groups)],
        offsets=offsets, num_units=int(counts.sum()))


def _unprunable(an: _Analyzer, nb: _Numbering) -> dict[int, str]:
    """group -> why it is not prunable: pinned atoms, untracked atoms, units no "out" slice
    produces (first reason wins)."""
    roots, group_of_atom = nb.roots, nb.group_of_atom
    reasons: dict[int, str] = {}
    for atoms_, reason, where in an.pins:
        if len(atoms_) == 0:
            continue
        r = roots[atoms_]
        gs = set(nb.root_group[r[r != 0]].tolist()) | set(group_of_atom[atoms_[r == 0]].tolist())
        for g in gs:
            if g >= 0 and g not in reasons:
                reasons[g] = f"{reason} (at {where})"
    untracked = np.unique(group_of_atom[(roots == 0) & (group_of_atom >= 0)])
    for g in untracked.tolist():
        reasons.setdefault(g, "concatenated with channels no layer produces")
    covered = np.zeros(nb.num_units, dtype=bool)
    for key, atoms_ in an.params.items():
        if an.roles[key] == "out":
            u = nb.unit_of_atom[atoms_]
            covered[u[u >= 0]] = True
    for g in range(nb.num_groups):
        units = len(nb.group_units[g])
        if g not in reasons and units and not covered[
                nb.offsets[g]: nb.offsets[g] + units].all():
            reasons[g] = "no trainable parameter produces these channels"
        if g not in reasons and units == 0:
            reasons[g] = "empty"
    return reasons


def _members(an: _Analyzer, nb: _Numbering) -> dict[int, list[meta.ParamSlice]]:
    """The parameter slices of each group (indices along the dim, and their units)."""
    members: dict[int, list[meta.ParamSlice]] = {g: [] for g in range(nb.num_groups)}
    for (fqn, dim), atoms_ in sorted(an.params.items()):
        u = nb.unit_of_atom[atoms_]
        g_of = nb.group_of_atom[atoms_]
        is_param = an.trainable.get(fqn, False) or isinstance(
            get_attr_tensor(an.gm, fqn), torch.nn.Parameter)
        for g in np.unique(g_of[u >= 0]):
            sel = np.nonzero((g_of == g) & (u >= 0))[0]
            members[int(g)].append(meta.ParamSlice(
                fqn=fqn, dim=dim, indices=torch.from_numpy(sel.astype(np.int64)),
                units=torch.from_numpy((u[sel] - nb.offsets[int(g)]).astype(np.int64)),
                role=an.roles[(fqn, dim)], is_param=is_param))
    return members


def _node_groups(an: _Analyzer, nb: _Numbering) -> tuple[
        dict[str, tuple[meta.GroupMember, ...]], dict[str, Any], dict[int, list[str]]]:
    """(node -> its GroupMembers, node -> its (dim, atoms) labels, group -> its nodes)."""
    node_groups: dict[str, tuple[meta.GroupMember, ...]] = {}
    node_labels: dict[str, Any] = {}
    group_nodes: dict[int, list[str]] = {g: [] for g in range(nb.num_groups)}
    first_space_node = {int(nb.group_of_space[s]): an.spaces[s][2] for s in
                        reversed(range(len(an.spaces)))}
    for node, lab in an.labels.items():
        parts = lab if isinstance(lab, list) else [lab]
        node_labels[node.name] = [(p.dim, p.atoms) if isinstance(p, Label) else None
                                  for p in parts] if isinstance(lab, list) else \
            (lab.dim, lab.atoms)
        gm_: list[meta.GroupMember] = []
        for p in parts:
            if not isinstance(p, Label):
                continue
            for g in np.unique(nb.group_of_atom[p.atoms]):
                if g < 0:
                    continue
                role = "root" if first_space_node.get(int(g)) == node.name else "member"
                gm_.append(meta.GroupMember(int(g), (p.dim,), role))
                group_nodes[int(g)].append(node.name)
        if gm_:
            node_groups[node.name] = tuple(dict.fromkeys(gm_))
    return node_groups, node_labels, group_nodes


def _build_groups(an: _Analyzer) -> tuple[tuple[meta.PruneGroup, ...], meta.ChannelAnalysis,
                                          dict[str, tuple[meta.GroupMember, ...]]]:
    """PruneGroups, the ChannelAnalysis physical_prune reads, and each node's GroupMembers."""
    nb = _number_units(an)
    reasons = _unprunable(an, nb)
    members = _members(an, nb)
    node_groups, node_labels, group_nodes = _node_groups(an, nb)
    groups = []
    for g in range(nb.num_groups):
        spaces = [s for s in range(len(an.spaces)) if nb.group_of_space[s] == g]
        first, count, _ = an.spaces[spaces[0]]
        nunits = len(nb.group_units[g])
        first_units = np.unique(nb.unit_of_atom[first: first + count])
        unit_size = count // max(1, len(first_units[first_units >= 0])) if nunits else count
        groups.append(meta.PruneGroup(
            id=g, num_units=nunits if nunits else count, prunable=g not in reasons,
            reason=reasons.get(g), members=tuple(members[g]),
            nodes=tuple(dict.fromkeys(group_nodes[g])), unit_size=max(1, unit_size),
            unit_offset=nb.offsets[g]))
    analysis = meta.ChannelAnalysis(
        unit_of_atom=nb.unit_of_atom, node_labels=node_labels,
        param_labels={k: v.copy() for k, v in an.params.items()}, param_roles=dict(an.roles),
        externals=list(an.externals), num_units=nb.num_units)
    prunable_units = np.zeros(nb.num_units, dtype=bool)
    for grp in groups:
        if grp.prunable:
            prunable_units[grp.unit_offset: grp.unit_offset + grp.num_units] = True
    analysis.prunable_units = prunable_units  # type: ignore[attr-defined]
    return tuple(groups), analysis, node_groups
