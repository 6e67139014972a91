"""physical_prune: drop every all-zero unit and rewrite the graph to the slim shapes.

Why: a zeroed channel still costs memory and MACs; this pass removes it for real
(GETA_SPEC §D).  Which units go is decided by zero-ness of their "out"
parameter slices (§D.1), or passed explicitly.

What it rewrites, from dependency_groups' ChannelAnalysis:
* parameter and buffer slices (rows, consumer columns, running stats);
* shape constants: view/reshape/expand/unflatten sizes, split sizes (chunk becomes
  split_with_sizes), slice/narrow bounds, select indices, group_norm's group
  count, grouped convolutions' ``groups``;
* computed operands broadcast against pruned channels get an ``index_select``.

Invariants: the slim graph computes exactly what the zeroed graph computes
(every rule in the table is zero-invariant); ``meta["val"]`` is refreshed by fake
propagation; metadata facts derived from channels (``geta.group``) are invalid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx

from geta_fx.errors import NodeError
from geta_fx.ir import meta
from geta_fx.ir.query import get_attr_tensor, set_attr_tensor, tensor_val
from geta_fx.ir.units import zero_mask
from geta_fx.pipeline import PassResult

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.expand.default, aten.view_copy.default, aten.expand_copy.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.unsafe_split.Tensor, aten.split_with_sizes_copy.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}


def removed_units_from_zeros(gm: torch.fx.GraphModule) -> np.ndarray:
    """Global bool mask of units to remove: all-zero units of prunable groups."""
    analysis: meta.ChannelAnalysis = gm.meta[meta.CHANNELS]
    removed = np.zeros(analysis.num_units, dtype=bool)
    for g in gm.meta[meta.GROUPS]:
        if g.prunable and g.num_units:
            mask = zero_mask(gm, g).cpu().numpy()
            removed[g.unit_offset: g.unit_offset + g.num_units] = mask
    return removed


def align_removed_units(gm: torch.fx.GraphModule, removed: np.ndarray, align: int) -> np.ndarray:
    """``removed`` with some units kept back so that every prunable group keeps a multiple of
    ``align`` channels (kept units x ``unit_size``), or all of its units.

    Odd channel counts can make the slim model slower than the dense one on GPUs (cuDNN/cuBLAS
    tile sizes; benchmarks/README.md "Deploy"); QASSO's ``group_divisible`` avoids them while
    training, this aligns after the fact.  The units kept back are the group's lowest-index
    removed ones; all-zero units stay exact, so the slim model's outputs do not change.
    """
    if align == 1:
        return removed
    removed = removed.copy()
    for g in gm.meta[meta.GROUPS]:
        if not g.prunable or not g.num_units:
            continue
        group = removed[g.unit_offset: g.unit_offset + g.num_units]  # a view into `removed`
        kept = g.num_units - int(group.sum())
        target = kept
        while target < g.num_units and (target * g.unit_size) % align:
            target += 1
        group[np.flatnonzero(group)[: target - kept]] = False
    return removed


@dataclass(frozen=True)
class PhysicalPrune:
    """Remove units (default: the all-zero units of prunable groups) in place.

    ``align`` > 1 keeps every prunable group's channel count a multiple of it (see
    :func:`align_removed_units`).
    """

    name: ClassVar[str] = "physical_prune"
    requires: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    provides: ClassVar[frozenset[str]] = frozenset({"slim"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    removed_units: Any = None
    align: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"physical_prune: align must be an int >= 1, got {self.align!r}")

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        analysis: meta.ChannelAnalysis = gm.meta[meta.CHANNELS]
        removed = (np.asarray(self.removed_units, dtype=bool) if self.removed_units is not None
                   else removed_units_from_zeros(gm))
        prunable = getattr(analysis, "prunable_units", np.ones(analysis.num_units, bool))
        removed = align_removed_units(gm, removed & prunable, self.align)
        if not removed.any():
            return PassResult(gm, False)
        removed_atom = _keep_every_tensor_nonempty(analysis, removed)
        keep = _Keep(removed_atom, analysis.node_labels)
        _slice_params(gm, analysis, removed_atom)
        for node in list(gm.graph.nodes):
            try:
                _rewrite_node(gm, node, keep)
            except NodeError:
                raise
            except Exception as e:  # noqa: BLE001
                raise NodeError(node, f"physical_prune could not rewrite: {e}") from e
        _insert_index_selects(gm, analysis, keep)
        gm.graph.lint()
        gm.recompile()
        _refresh_vals(gm)
        for node in gm.graph.nodes:
            node.meta.pop(meta.GROUP, None)
        gm.meta.pop(meta.GROUPS, None)
        gm.meta.pop(meta.CHANNELS, None)
        return PassResult(gm, True)


def _keep_every_tensor_nonempty(analysis: meta.ChannelAnalysis, removed: np.ndarray) -> np.ndarray:
    """Atoms to remove, after restoring one unit of any tensor that would lose every channel.

    A zero unit may stay (it is exactly zero, so keeping it is still exact); a tensor with
    no channel left would make e.g. a convolution with zero input channels, which ATen
    does not define.  Returns the removed-atom mask.
    """
    u = analysis.unit_of_atom
    removed = removed.copy()
    labels = [lab for labs in analysis.node_labels.values()
              for lab in (labs if isinstance(labs, list) else [labs]) if lab is not None]
    labels += [(None, atoms) for atoms in analysis.param_labels.values()]
    while True:
        removed_atom = np.zeros(len(u), dtype=bool)
        removed_atom[u >= 0] = removed[u[u >= 0]]
        restored = False
        for _, atoms in labels:
            if len(atoms) and removed_atom[atoms].all():
                removed[u[atoms[0]]] = False
                restored = True
        if not restored:
            return removed_atom


class _Keep:
    def __init__(self, removed_atom: np.ndarray, labels: dict[str, Any]) -> None:
        self.removed_atom = removed_atom
        self.labels = labels

    def of(self, node: Any, index: int | None = None) -> tuple[int, np.ndarray] | None:
        """(dim, kept indices) of a node's label, or None if it carries no channels."""
        if not isinstance(node, torch.fx.Node):
            return None
        lab = self.labels.get(node.name)
        if isinstance(lab, list):
            lab = lab[index] if index is not None and index < len(lab) else None
        if lab is None:
            return None
        dim, atoms = lab
        return dim, np.nonzero(~self.removed_atom[atoms])[0]

    def changed(self, node: Any, index: int | None = None) -> tuple[int, np.ndarray, int] | None:
        k = self.of(node, index)
        if k is None:
            return None
        lab = self.labels[node.name]
        n = len((lab[index] if isinstance(lab, list) else lab)[1])
        return (k[0], k[1], n) if len(k[1]) != n else None


def _slice_params(gm: torch.fx.GraphModule, analysis: meta.ChannelAnalysis,
                  removed_atom: np.ndarray) -> None:
    for (fqn, dim), atoms in sorted(analysis.param_labels.items()):
        kept = np.nonzero(~removed_atom[atoms])[0]
        if len(kept) == len(atoms):
            continue
        t = get_attr_tensor(gm, fqn)
        idx = torch.from_numpy(kept).to(t.device)
        with torch.no_grad():
            new = t.detach().index_select(dim, idx).clone()
        set_attr_tensor(gm, fqn, new)


def _with_arg(node: torch.fx.Node, i: int, name: str, value: Any) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _rewrite_node(gm: torch.fx.GraphModule, node: torch.fx.Node, keep: _Keep) -> None:
    if node.op != "call_function":
        return
    t = node.target
    if t in (aten.mean.dim, aten.layer_norm.default, aten.rms_norm.default):
        _maybe_keep_original_count(gm, node, keep)
        return
    if t in _RESHAPES:
        out = keep.changed(node)
        if out is not None:
            dim, kept, _ = out
            sizes = list(node.args[1])
            sizes[dim] = len(kept)
            _with_arg(node, 1, "size", sizes)
        return
    if t is aten.unflatten.int:
        out = keep.changed(node)
        if out is not None:
            dim, kept, _ = out
            start = node.args[1] % len(tensor_val(node.args[0]).shape)
            sizes = list(node.args[2])
            if start <= dim < start + len(sizes):
                sizes[dim - start] = len(kept)
                _with_arg(node, 2, "sizes", sizes)
        return
    if t in _SPLITS:
        inp = keep.changed(node.args[0])
        labels = keep.labels.get(node.name)
        if inp is None or not isinstance(labels, list):
            return
        nd = len(tensor_val(node.args[0]).shape)
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
        if dim != inp[0]:
            return
        sizes = [len(keep.of(node, i)[1]) for i in range(len(labels))]
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)
        node.kwargs = {}
        return
    if t in (aten.slice.Tensor, aten.narrow.default, aten.select.int):
        inp = keep.changed(node.args[0])
        if inp is None:
            return
        in_dim, kept, n = inp
        nd = len(tensor_val(node.args[0]).shape)
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
        if dim != in_dim:
            return
        if t is aten.select.int:
            idx = node.args[2] % n
            pos = np.searchsorted(kept, idx)
            if pos >= len(kept) or kept[pos] != idx:
                raise NodeError(node, "selects a channel that was pruned")
            _with_arg(node, 2, "index", int(pos))
            return
        if t is aten.narrow.default:
            start, length = node.args[2] % n, node.args[3]
            new_start = int(np.searchsorted(kept, start))
            new_end = int(np.searchsorted(kept, start + length))
            node.args = (node.args[0], dim, new_start, new_end - new_start)
            return
        sl = range(n)[slice(*(min(v, n) if isinstance(v, int) and v > n else v for v in (
            node.args[2] if len(node.args) > 2 else None,
            node.args[3] if len(node.args) > 3 else None)))]
        new_start = int(np.searchsorted(kept, sl.start))
        new_end = int(np.searchsorted(kept, sl.stop))
        node.args = (node.args[0], dim, new_start, new_end, *node.args[4:])
        return
    if t is aten.group_norm.default:
        inp = keep.changed(node.args[0])
        if inp is not None:
            _, kept, n = inp
            groups = node.args[1]
            _with_arg(node, 1, "num_groups", groups * len(kept) // n)
        return
    if t in _CONVS or t is aten.convolution.default:
        gi = 8 if t is aten.convolution.default else 6
        groups = node.args[gi] if len(node.args) > gi else node.kwargs.get("groups", 1)
        if groups == 1:
            return
        inp = keep.changed(node.args[0])
        if inp is not None:
            _, kept, n = inp
            new_groups = groups * len(kept) // n
            if len(node.args) <= gi:  # fill defaults so groups can be positional
                defaults = {aten.conv1d.default: [None, [1], [0], [1]],
                            aten.conv2d.default: [None, [1, 1], [0, 0], [1, 1]],
                            aten.conv3d.default: [None, [1, 1, 1], [0, 0, 0], [1, 1, 1]]}
                args = list(node.args) + defaults.get(t, [])[len(node.args) - 2:]
                node.args = tuple(args[:gi])
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "groups"}
                if len(node.args) < gi:
                    raise NodeError(node, "cannot rewrite groups of this convolution")
                node.args = (*node.args, new_groups)
            else:
                _with_arg(node, gi, "groups", new_groups)


def _maybe_keep_original_count(gm: torch.fx.GraphModule, node: torch.fx.Node,
                               keep: _Keep) -> None:
    """Statistics over a pruned channel dim keep dividing by the original channel count.

        mean(x, dims)              -> sum(x, dims) / N_orig
        layer_norm(x, [C'], w, b)  -> mu = sum(x)/C;  var = (sum((x-mu)^2) + (C-C') mu^2) / C
        rms_norm(x, [C'], w)       -> x * rsqrt(sum(x^2)/C + eps) * w

    The removed channels were exactly zero, so these equal the unpruned statistics.
    """
    inp = keep.changed(node.args[0])
    if inp is None:
        return
    in_dim, kept, n = inp
    x = node.args[0]
    shape = list(tensor_val(x).shape)
    nd = len(shape)
    graph = gm.graph

    def call(op: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return graph.call_function(op, args, kwargs)

    with graph.inserting_before(node):
        if node.target is aten.mean.dim:
            dims = sorted(d % nd for d in node.args[1])
            if in_dim not in dims:
                return
            count = 1
            for d in dims:
                count *= n if d == in_dim else int(shape[d])
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            kwargs = {"dtype": node.kwargs["dtype"]} if node.kwargs.get("dtype") else {}
            out = call(aten.div.Tensor, call(aten.sum.dim_IntList, x, dims, keepdim, **kwargs),
                       float(count))
        else:
            if in_dim != nd - 1:
                return
            removed = n - len(kept)
            is_ln = node.target is aten.layer_norm.default
            w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
            b = (node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")) if is_ln \
                else None
            eps = node.args[4 if is_ln else 3] if len(node.args) > (4 if is_ln else 3) \
                else node.kwargs.get("eps", 1e-5 if is_ln else None)
            if eps is None:
                eps = torch.finfo(tensor_val(x).dtype).eps
            if is_ln:
                mu = call(aten.div.Tensor, call(aten.sum.dim_IntList, x, [-1], True), float(n))
                xc = call(aten.sub.Tensor, x, mu)
                ss = call(aten.sum.dim_IntList, call(aten.mul.Tensor, xc, xc), [-1], True)
                ss = call(aten.add.Tensor, ss,
                          call(aten.mul.Tensor, call(aten.mul.Tensor, mu, mu), float(removed)))
                var = call(aten.div.Tensor, ss, float(n))
                y = call(aten.mul.Tensor, xc,
                         call(aten.rsqrt.default, call(aten.add.Tensor, var, float(eps))))
            else:
                ms = call(aten.div.Tensor,
                          call(aten.sum.dim_IntList, call(aten.mul.Tensor, x, x), [-1], True),
                          float(n))
                y = call(aten.mul.Tensor, x,
                         call(aten.rsqrt.default, call(aten.add.Tensor, ms, float(eps))))
            if isinstance(w, torch.fx.Node):
                y = call(aten.mul.Tensor, y, w)
            if isinstance(b, torch.fx.Node):
                y = call(aten.add.Tensor, y, b)
            out = y
    # "val" (pre-prune, like every node's until _refresh_vals) lets a later rewrite that reads
    # this output see its shape.
    out.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack",
                                                                  "stack_trace", "val")})
    # The replacement carries the norm's channels: later rewrites (e.g. a norm reading this
    # one, as in Bloom's embedding LayerNorm -> block LayerNorm) look labels up by node name.
    if node.name in keep.labels:
        keep.labels[out.name] = keep.labels[node.name]
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _insert_index_selects(gm: torch.fx.GraphModule, analysis: meta.ChannelAnalysis,
                          keep: _Keep) -> None:
    by_name = {n.name: n for n in gm.graph.nodes}
    for k, (name, arg_index, dim, source) in enumerate(analysis.externals):
        node = by_name.get(name)
        src = by_name.get(source)
        if node is None or src is None:
            continue
        out = keep.changed(src)
        if out is None:  # no channel along this operand was removed
            continue
        _, kept, _ = out
        operand = node.args[arg_index]
        buf_name = f"_geta_keep_{k}"
        gm.register_buffer(buf_name, torch.from_numpy(kept.astype(np.int64)))
        with gm.graph.inserting_before(node):
            idx = gm.graph.get_attr(buf_name)
            sel = gm.graph.call_function(aten.index_select.default, (operand, dim, idx))
        args = list(node.args)
        args[arg_index] = sel
        node.args = tuple(args)


def _refresh_vals(gm: torch.fx.GraphModule) -> None:
    """Re-run fake propagation so meta['val'] matches the slim shapes."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode(vals)
    if mode is None or any(v is None for v in vals):
        return
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        with mode:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
    except Exception as e:  # noqa: BLE001 - vals are a convenience; the graph still runs
        logger.debug("could not refresh vals of the slim graph: %s", e)
    finally:
        mode.allow_non_fake_inputs = allow
