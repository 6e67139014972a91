"""Channel rules of index-moving ops: views/reshapes, permutes, slicing, split, cat, stack.

A channel label is carried to wherever its dimension goes; a reshape that spreads it over
several dims keeps the outermost one (inner dims made whole).  Shape constants baked into
the graph (view/reshape/expand sizes, unflatten sizes, split sizes, slice/narrow bounds,
select indices) are rewritten from the kept channel counts.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import sympy
import torch
import torch.fx

from geta_fx.errors import NodeError
from geta_fx.ir import op_sets
from geta_fx.ir.args import arg, set_arg
from geta_fx.ir.channels import KeptChannels, Label, concrete, reshape_groups
from geta_fx.ir.query import create_node_with_meta, get_attr_tensor, tensor_val
from geta_fx.ir.registry import channel_rule
from geta_fx.ir.rules_vision import NOT_A_SHUFFLE, rewrite_shuffle, shuffle_label

aten = torch.ops.aten

DERIVED = "the output shape is derived from the input's (pruned) shape, no constant"


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# --------------------------------------------------------------------------- reshapes

#: Reshape-like ops with a size list, by the name of that argument.
SIZE_ARG = {aten.view.default: "size", aten._unsafe_view.default: "size",
            aten.reshape.default: "shape", aten.expand.default: "size",
            aten.view_copy.default: "size", aten.expand_copy.default: "size"}


def _kept_size(gm: torch.fx.GraphModule, node: torch.fx.Node, dim: int, kept: np.ndarray,
               n: int, entry: Any) -> Any:
    """The slim size entry of ``node``'s channel dim: the kept count, or, where the dim is
    tiled (``B*H`` heads), the size node ``entry`` computes divided by the original count and
    times the kept one (``-1`` stays ``-1``)."""
    size = tensor_val(node).shape[dim]
    if isinstance(size, int) and size == n:
        return len(kept)
    if not isinstance(entry, torch.fx.Node):
        if entry == -1:
            return -1
        raise NodeError(node, f"size {entry} of a tiled channel dim is not a size node")
    val = entry.meta.get("val")
    with gm.graph.inserting_before(node):
        tile = create_node_with_meta(gm.graph, "call_function", operator.floordiv, (entry, n),
                                     anchor=node, val=None if val is None else val // n)
        return create_node_with_meta(gm.graph, "call_function", operator.mul,
                                     (tile, len(kept)), anchor=node,
                                     val=None if val is None else val // n * len(kept))


def _rewrite_sizes(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> None:
    """view/reshape/expand sizes: the channel dim's entry becomes the kept count."""
    if rewrite_shuffle(gm, node, kept):  # a channel shuffle: one index_select
        return
    out = kept.changed(node)
    if out is not None:
        dim, k, n = out
        name = SIZE_ARG[node.target]
        sizes = list(arg(node, name))
        sizes[dim] = _kept_size(gm, node, dim, k, n, sizes[dim])
        set_arg(node, name, sizes)


def _rewrite_unflatten(gm: torch.fx.GraphModule, node: torch.fx.Node,
                       kept: KeptChannels) -> None:
    """unflatten sizes: the entry of the channel dim becomes the kept count."""
    if rewrite_shuffle(gm, node, kept):  # a channel shuffle: one index_select
        return
    out = kept.changed(node)
    if out is not None:
        dim, k, n = out
        start = arg(node, "dim") % len(tensor_val(node.args[0]).shape)
        sizes = list(arg(node, "sizes"))
        if start <= dim < start + len(sizes):
            sizes[dim - start] = _kept_size(gm, node, dim, k, n, sizes[dim - start])
            set_arg(node, "sizes", sizes)


# Ops a dim can be followed through when looking for who consumes it (:func:`_only_indexed`).
_FOLLOW = op_sets.COPIES | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                            aten.transpose.int, aten.permute.default}


def _follow_dim(user: torch.fx.Node, dim: int, nd: int) -> int | None:
    """Where dim ``dim`` of ``user``'s input lands in its output (None: it does not)."""
    t = user.target
    if t in op_sets.COPIES:
        return dim
    if t is aten.unsqueeze.default:
        d = norm_dim(arg(user, "dim"), nd + 1)
        return dim + (d <= dim)
    if t is aten.transpose.int:
        d0, d1 = norm_dim(user.args[1], nd), norm_dim(user.args[2], nd)
        return {d0: d1, d1: d0}.get(dim, dim)
    if t is aten.permute.default:
        return [norm_dim(d, nd) for d in arg(user, "dims")].index(dim)
    shape = tensor_val(user.args[0]).shape
    dims = arg(user, "dim")
    gone = [d for d in (norm_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims))
            if shape[d] == 1]
    return None if dim in gone else dim - sum(d < dim for d in gone)


def _only_indexed(node: torch.fx.Node, dim: int, depth: int = 8) -> bool:
    """Every use of dim ``dim`` of ``node`` picks it apart: ``select``/``unbind`` along it,
    reached through copies, (un)squeezes and transposes only (a packed q/k/v)."""
    val = tensor_val(node)
    if val is None or not node.users or depth == 0:
        return False
    nd = val.dim()
    for user in node.users:
        if user.op != "call_function" or user.args[0] is not node:
            return False
        if user.target in (aten.select.int, aten.unbind.int) and \
                norm_dim(arg(user, "dim", 0), nd) == dim:
            continue
        if user.target not in _FOLLOW:
            return False
        nxt = _follow_dim(user, dim, nd)
        if nxt is None or not _only_indexed(user, nxt, depth - 1):
            return False
    return True


def _indexed_dims(node: torch.fx.Node, grid: np.ndarray, dims: list[int]) -> tuple[int, ...]:
    """Grid dims of a reshape's output that the graph only picks apart (see from_grid)."""
    return tuple(k for k in range(grid.ndim) if grid.shape[k] > 1 and
                 _only_indexed(node, dims[k]))


def _tail_split(b: list, gj: list[int], tail: int) -> tuple[int, int, Any] | None:
    """(position in ``gj``, its inner factor f, tile) where the trailing output dims hold the
    ``tail`` innermost input elements: ``gj[pos+1:]`` exactly, times ``f`` of ``gj[pos]``,
    whose size is ``f * tile`` (None: no such split)."""
    p = 1
    for pos in range(len(gj) - 1, -1, -1):
        size = b[gj[pos]]
        cs = concrete(size)
        if cs is not None and cs and tail % (p * cs) == 0:
            p *= cs
            if p == tail:
                return pos, cs, 1
            continue
        if tail % p:
            return None
        f = tail // p
        tile = sympy.simplify(size / f)
        if sympy.fraction(sympy.together(tile))[1] != 1:
            return None
        return pos, f, (concrete(tile) if tile.is_number else tile)
    return None


def _regroup_tiled(an: Any, node: torch.fx.Node, lab: Label, a: list, b: list,
                   gi: list[int], gj: list[int]) -> Label | None:
    """Reshape of a channel dim grouped with dynamic dims (``[L, B, E] -> [L, B*H, D]``,
    ``[B*H, L, D] -> [B, H, L, D]``): the channel dim and the concrete dims inside it form a
    tail of the flat order; the output dims holding that tail get its atoms, and the one
    straddling the tail's edge is tiled (:class:`Label` ``tile``)."""
    inner = [concrete(a[i]) for i in gi[gi.index(lab.dim) + 1:]]
    if None in inner:
        an.pin(lab, node, f"{node.target}: reshape mixes the channel dim with a dynamic dim")
        return None
    shape_in = [len(lab.atoms), *inner]
    split = _tail_split(b, gj, int(np.prod(shape_in)))
    if split is None:
        an.pin(lab, node, f"{node.target}: reshape mixes the channel dim with a dynamic dim")
        return None
    pos, f, tile = split
    dims = gj[pos:]
    grid = np.broadcast_to(lab.atoms.reshape([-1] + [1] * len(inner)), shape_in).reshape(
        [f] + [concrete(b[j]) for j in dims[1:]])
    new = an.from_grid(grid, dims, lab.ok, _indexed_dims(node, grid, dims))
    if new.dim != dims[0] or tile == 1:
        return new
    if isinstance(tile, int):
        return Label(new.dim, np.tile(new.atoms, tile), new.ok)
    return Label(new.dim, new.atoms, new.ok, tile)


@channel_rule(*SIZE_ARG, rewrite=_rewrite_sizes, tiled=True)
@channel_rule(aten.unflatten.int, rewrite=_rewrite_unflatten, tiled=True)
@channel_rule(aten.view_as.default, aten.reshape_as.default, aten.flatten.using_ints,
              aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
              aten.unsqueeze.default, aten.expand_as.default, aten.alias_copy.default,
              no_rewrite=DERIVED, tiled=True)
def _reshape(an: Any, node: torch.fx.Node) -> Label | None:
    if (shuffled := shuffle_label(an, node)) is not NOT_A_SHUFFLE:
        return shuffled  # a channel shuffle's split, or its merge: an index map
    lab = an.label(node.args[0])
    if lab is None:
        return None
    a = an.shape(node.args[0])
    b = an.shape(node)
    if node.target in (aten.expand.default, aten.expand_as.default, aten.expand_copy.default):
        shift = len(b) - len(a)
        d = lab.dim + shift
        if lab.tile is not None:
            return lab.moved(d) if (a[lab.dim] - b[d]) == 0 else an.pin_inputs(
                node, "expand of a tiled channel dim")
        if concrete(b[d]) != len(lab.atoms):  # size-1 channel dim expanded
            return Label(d, np.repeat(lab.atoms, concrete(b[d])), lab.ok)
        return lab.moved(d)
    if lab.dim == len(a) - 1 and b and (a[-1] - b[-1]) == 0 and lab.tile is None:
        return lab.moved(len(b) - 1)  # innermost dim kept (Swin's windows): c stays c
    groups = reshape_groups(a, b)
    if groups is None:
        return an.pin_inputs(node, f"{node.target}: cannot match reshape dims")
    for gi, gj in groups:
        if lab.dim not in gi:
            continue
        if gi == [lab.dim] and len(gj) == 1 and (a[gi[0]] - b[gj[0]]) == 0:
            return lab.moved(gj[0])
        sizes_in = [concrete(a[i]) for i in gi]
        sizes_out = [concrete(b[j]) for j in gj]
        if not gj:
            an.pin(lab, node, f"{node.target}: reshape drops the channel dim")
            return None
        if None in sizes_in or None in sizes_out or lab.tile is not None:
            return _regroup_tiled(an, node, lab, a, b, gi, gj)
        shape = [1] * len(gi)
        shape[gi.index(lab.dim)] = len(lab.atoms)
        grid = np.broadcast_to(lab.atoms.reshape(shape), sizes_in).reshape(sizes_out)
        return an.from_grid(grid, gj, lab.ok, _indexed_dims(node, grid, gj))
    return an.pin_inputs(node, f"{node.target}: lost track of the channel dim")


@channel_rule(aten.permute.default, aten.permute_copy.default, no_rewrite=DERIVED, tiled=True)
def _permute(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    perm = [norm_dim(d, nd) for d in arg(node, "dims")]
    return lab.moved(perm.index(lab.dim))


@channel_rule(aten.transpose.int, aten.transpose_copy.int, aten.swapaxes.default,
              aten.t.default, aten.numpy_T.default, aten.movedim.int, no_rewrite=DERIVED,
              tiled=True)
def _transpose(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    if node.target in (aten.t.default,):
        d0, d1 = 0, 1
    elif node.target is aten.movedim.int:
        src = norm_dim(arg(node, "source"), nd)
        dst = norm_dim(arg(node, "destination"), nd)
        order = [d for d in range(nd) if d != src]
        order.insert(dst, src)
        return lab.moved(order.index(lab.dim))
    else:  # transpose(dim0, dim1), swapaxes(axis0, axis1): the two dims after self
        d0, d1 = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
    return lab.moved({d0: d1, d1: d0}.get(lab.dim, lab.dim))


@channel_rule(aten.repeat.default, no_rewrite=DERIVED + " (repeats count copies, not channels)")
def _repeat(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    reps = list(arg(node, "repeats"))
    nd_in = len(an.shape(node.args[0]))
    d = lab.dim + len(reps) - nd_in
    return Label(d, np.tile(lab.atoms, reps[d]), lab.ok)


# --------------------------------------------------------------------------- slicing

def _channel_input(node: torch.fx.Node, kept: KeptChannels
                   ) -> tuple[int, np.ndarray, int] | None:
    """(dim, kept, n) when the op slices its input's pruned channel dim, else None."""
    inp = kept.changed(node.args[0])
    if inp is None:
        return None
    nd = len(tensor_val(node.args[0]).shape)
    dim = arg(node, "dim", 0) % nd
    return (dim, inp[1], inp[2]) if dim == inp[0] else None


def _rewrite_slice(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> None:
    """slice bounds over the channel dim, mapped onto the kept channels."""
    found = _channel_input(node, kept)
    if found is None:
        return
    dim, k, n = found
    start, end = arg(node, "start"), arg(node, "end")
    sl = range(n)[slice(*(min(v, n) if isinstance(v, int) and v > n else v
                          for v in (start, end)))]
    set_arg(node, "dim", dim)
    set_arg(node, "start", int(np.searchsorted(k, sl.start)))
    set_arg(node, "end", int(np.searchsorted(k, sl.stop)))


def _rewrite_narrow(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> None:
    """narrow(start, length) over the channel dim, mapped onto the kept channels."""
    found = _channel_input(node, kept)
    if found is None:
        return
    dim, k, n = found
    start, length = arg(node, "start") % n, arg(node, "length")
    new_start = int(np.searchsorted(k, start))
    new_end = int(np.searchsorted(k, start + length))
    set_arg(node, "dim", dim)
    set_arg(node, "start", new_start)
    set_arg(node, "length", new_end - new_start)


def _rewrite_select(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> None:
    """select's index over the channel dim becomes its position among the kept channels."""
    found = _channel_input(node, kept)
    if found is None:
        return
    _, k, n = found
    idx = arg(node, "index") % n
    pos = np.searchsorted(k, idx)
    if pos >= len(k) or k[pos] != idx:
        raise NodeError(node, "selects a channel that was pruned")
    set_arg(node, "index", int(pos))


@channel_rule(aten.slice.Tensor, aten.slice_copy.Tensor, rewrite=_rewrite_slice)
@channel_rule(aten.narrow.default, rewrite=_rewrite_narrow)
def _slice(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    dim = norm_dim(arg(node, "dim", 0), nd)
    if dim != lab.dim:
        return lab
    n = len(lab.atoms)
    if node.target is aten.narrow.default:
        start, length = arg(node, "start"), arg(node, "length")
        sl = slice(start, start + length, 1)
    else:
        sl = slice(arg(node, "start"), arg(node, "end"), arg(node, "step", 1))
    if any(isinstance(v, torch.fx.Node) for v in (sl.start, sl.stop, sl.step)):
        return an.pin_inputs(node, "slice of the channel dim with dynamic bounds")
    idx = range(n)[slice(sl.start, None if sl.stop is not None and sl.stop > n else sl.stop,
                         sl.step)]
    if idx.step != 1:
        return an.pin_inputs(node, "strided slice of the channel dim")
    return Label(lab.dim, lab.atoms[idx.start: idx.stop], lab.ok)


@channel_rule(aten.select.int, aten.select_copy.int, rewrite=_rewrite_select)
def _select(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    dim = norm_dim(arg(node, "dim"), nd)
    if dim == lab.dim:
        index = arg(node, "index")
        an.pin(lab.atoms[index: index + 1 or None], node, "select picks one channel")
        return None
    return lab.moved(lab.dim - (dim < lab.dim))


@channel_rule(aten.index_select.default, aten.gather.default, aten.index.Tensor,
              aten.take_along_dim.default,
              no_rewrite="indexing along the channel dim is pinned; other dims keep them")
def _index(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    if node.target is aten.index.Tensor:
        idx = arg(node, "indices")
        touched = [i for i, t in enumerate(idx) if t is not None]
        if lab.dim in touched or len(touched) != 1 or lab.dim < touched[0]:
            return an.pin_inputs(node, "advanced indexing touches the channel dim")
        idx_nd = len(an.shape(idx[touched[0]]))
        return lab.moved(lab.dim + idx_nd - 1)
    if node.target is aten.take_along_dim.default:  # its indices may run along the channels
        return an.pin_inputs(node, f"{node.target}: indices broadcast against the channels")
    dim = norm_dim(arg(node, "dim"), nd)
    if dim == lab.dim:
        return an.pin_inputs(node, f"{node.target}: gathers along the channel dim")
    return lab


# --------------------------------------------------------------------------- split / cat

def _rewrite_split(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> None:
    """A split along the channel dim becomes ``split_with_sizes`` of the kept counts."""
    inp = kept.changed(node.args[0])
    labels = kept.labels.get(node.name)
    if inp is None or not isinstance(labels, list):
        return
    nd = len(tensor_val(node.args[0]).shape)
    dim = arg(node, "dim", 0) % nd
    if dim != inp[0]:
        return
    sizes = [len(kept.of(node, i)[1]) for i in range(len(labels))]
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


@channel_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
              aten.unsafe_split.Tensor, aten.split_with_sizes_copy.default,
              aten.tensor_split.sections, rewrite=_rewrite_split)
@channel_rule(aten.unbind.int, no_rewrite="unbind along the channel dim is pinned")
def _split(an: Any, node: torch.fx.Node) -> list[Label | None] | None:
    outs = node.meta.get("val")
    lab = an.label(node.args[0])
    if not isinstance(outs, (list, tuple)):
        return an.pin_inputs(node, "split with unknown outputs")
    if lab is None:
        return [None] * len(outs)
    nd = len(an.shape(node.args[0]))
    dim = norm_dim(arg(node, "dim", 0), nd)
    if dim != lab.dim:
        if node.target is aten.unbind.int:
            return [lab.moved(lab.dim - (dim < lab.dim)) for _ in outs]
        return [lab for _ in outs]
    if node.target is aten.unbind.int:
        an.pin(lab, node, "unbind along the channel dim")
        return [None] * len(outs)
    labels: list[Label | None] = []
    start = 0
    for o in outs:
        size = concrete(an.shape_of_val(o)[dim])
        labels.append(Label(lab.dim, lab.atoms[start: start + size], lab.ok))
        start += size
    return labels


#: Ops between a class token parameter and the cat reading it (:func:`_token_param`).
_TOKEN_VIEWS = op_sets.COPIES | {aten.expand.default, aten.expand_copy.default,
                                 aten.unsqueeze.default, aten.view.default,
                                 aten.reshape.default, aten._unsafe_view.default}


def _token_param(an: Any, t: Any, d: int) -> tuple[str, int, bool] | None:
    """``(fqn, its dim along the cat's channel dim d, trainable)`` of a parameter operand: one
    :meth:`param` resolves, or a token reaching the cat through expands, unsqueezes and views
    that keep its last dim as the channel dim (CLIP's ``class_embedding.expand(B, 1, -1)`` of
    a 1-D parameter)."""
    src = an.param(t)
    if src is not None:
        return src[0], src[1][d], src[2]
    val = tensor_val(t)
    if val is None or d != val.dim() - 1:
        return None
    x = t
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and \
            x.target in _TOKEN_VIEWS and tensor_val(x).shape[-1] == val.shape[-1]:
        x = x.args[0]
    if not isinstance(x, torch.fx.Node) or x.op != "get_attr" or \
            tensor_val(x) is None or tensor_val(x).shape[-1] != val.shape[-1]:
        return None
    p = get_attr_tensor(an.gm, str(x.target))
    return str(x.target), p.dim() - 1, isinstance(p, torch.nn.Parameter) and p.requires_grad


def _cat_lined_up(an: Any, node: torch.fx.Node, tensors: list, live: list,
                  out_nd: int) -> Label | None:
    """cat along a non-channel dim (e.g. ViT's [cls; patches] along tokens): the channel
    dims must line up; a parameter input (cls token) joins the units."""
    dims = {lab.dim for lab, _ in live if lab is not None}
    if len(dims) != 1:
        return an.pin_inputs(node, "cat of tensors whose channel dims do not line up")
    d = dims.pop()
    atoms = next(lab for lab, _ in live if lab is not None).atoms
    for t, (lab, shp) in zip([t for t in tensors if len(an.shape(t)) == out_nd], live,
                             strict=True):
        if lab is not None:
            an.unify(atoms, lab.atoms)
            continue
        src = _token_param(an, t, d)
        if src is None or concrete(shp[d]) != len(atoms):
            return an.pin_inputs(node, "cat of a channel-carrying tensor with one "
                                       "whose channels no layer produces")
        an.label_param(src[0], src[1], atoms, "out" if src[2] else "in")
    return Label(d, atoms, all(lab.ok for lab, _ in live if lab is not None))


@channel_rule(aten.cat.default, aten.concat.default,
              no_rewrite=DERIVED + " (the sizes of the pruned inputs)")
def _cat(an: Any, node: torch.fx.Node) -> Label | None:
    tensors = list(arg(node, "tensors"))
    out_nd = len(an.shape(node))
    dim = norm_dim(arg(node, "dim", 0), out_nd)
    labels = [an.label(t) for t in tensors]
    shapes = [an.shape(t) for t in tensors]
    if all(lab is None for lab in labels):
        return None
    live = [(lab, shp) for lab, shp in zip(labels, shapes, strict=True) if len(shp) == out_nd]
    if any(lab is not None and lab.dim != dim for lab, _ in live):
        return _cat_lined_up(an, node, tensors, live, out_nd)
    parts = []
    for lab, shp in live:
        if lab is None:
            parts.append(np.zeros(concrete(shp[dim]), dtype=np.int64))  # untracked channels
        else:
            parts.append(lab.atoms)
    ok = all(lab.ok for lab, _ in live if lab is not None)
    return Label(dim, np.concatenate(parts), ok)


@channel_rule(aten.stack.default, no_rewrite=DERIVED + " (the sizes of the pruned inputs)")
def _stack(an: Any, node: torch.fx.Node) -> Label | None:
    tensors = list(arg(node, "tensors"))
    labels = [an.label(t) for t in tensors]
    if all(lab is None for lab in labels):
        return None
    nd = len(an.shape(tensors[0]))
    dim = norm_dim(arg(node, "dim", 0), nd + 1)
    if any(lab is None for lab in labels) or len({lab.dim for lab in labels}) != 1:
        return an.pin_inputs(node, "stack of tensors whose channels do not line up")
    atoms = labels[0].atoms
    for lab in labels[1:]:
        an.unify(atoms, lab.atoms)
    d = labels[0].dim
    return Label(d if d < dim else d + 1, atoms, all(lab.ok for lab in labels))


# --------------------------------------------------------------------------- pixel shuffle

@channel_rule(aten.pixel_shuffle.default,
              no_rewrite=DERIVED + " (a unit is a whole block of r*r channels)")
def _pixel_shuffle(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    if lab.dim != nd - 3:
        an.pin(lab, node, "pixel_shuffle over a channel-carrying spatial dim")
        return None
    r2 = arg(node, "upscale_factor") ** 2
    blocks = lab.atoms.reshape(-1, r2)
    an.unify(blocks, blocks[:, :1])
    return Label(lab.dim, blocks[:, 0].copy(), lab.ok)


@channel_rule(aten.pixel_unshuffle.default, no_rewrite=DERIVED)
def _pixel_unshuffle(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    if lab.dim != len(an.shape(node.args[0])) - 3:
        an.pin(lab, node, "pixel_unshuffle over a channel-carrying spatial dim")
        return None
    return Label(lab.dim, np.repeat(lab.atoms, arg(node, "downscale_factor") ** 2), lab.ok)


# --------------------------------------------------------------------------- getitem

@channel_rule(operator.getitem, no_rewrite="picks one output of a multi-output op")
def _getitem(an: Any, node: torch.fx.Node) -> Label | None:
    parent = node.args[0]
    labels = an.labels.get(parent)
    if isinstance(labels, list) and isinstance(node.args[1], int) and node.args[1] < len(labels):
        return labels[node.args[1]]
    return None
