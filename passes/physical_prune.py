"""physical_prune: drop every all-zero unit and rewrite the graph to the slim shapes.

Why: a zeroed channel still costs memory and MACs; this pass removes it for real
(GETA_SPEC §D).  Which units go is decided by zero-ness of their "out"
parameter slices (§D.1), or passed explicitly.

What it rewrites, from dependency_groups' ChannelAnalysis:
* parameter and buffer slices (rows, consumer columns, running stats);
* at each op, what its rule in the op registry (``geta_fx.ir.registry``) rewrites:
  view/reshape/expand/unflatten sizes, split sizes (chunk becomes split_with_sizes),
  slice/narrow bounds, select indices, group_norm's group count, grouped convolutions'
  ``groups``, mean/LayerNorm/RMSNorm over pruned channels (original counts kept);
* computed operands broadcast against pruned channels (``an.external``) get an
  ``index_select``.

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
from geta_fx.ir.channels import KeptChannels
from geta_fx.ir.ops_table import rule_for
from geta_fx.ir.query import create_node_with_meta, get_attr_tensor, set_attr_tensor
from geta_fx.ir.units import zero_mask
from geta_fx.pipeline import PassResult

logger = logging.getLogger(__name__)
aten = torch.ops.aten

def removed_units_from_zeros(gm: torch.fx.GraphModule) -> np.ndarray:
    """Global bool mask of units to remove: all-zero units of prunable groups."""
    analysis: meta.ChannelAnalysis = gm.meta[meta.CHANNELS]
    removed = np.zeros(analysis.num_units, dtype=bool)
    for g in gm.meta[meta.GROUPS]:
        if g.prunable and g.num_units:
            mask = zero_mask(gm, g).cpu().numpy()
            removed[g.unit_offset: g.unit_offset + g.num_units] = mask
    return removed


#: ``align="auto"`` (``GetaModule.compress``'s default): a group's kept channel count is rounded
#: up to a multiple of ``AUTO_ALIGN`` when that adds at most ``AUTO_MAX_EXTRA`` of its kept
#: channels.  Measured rule (benchmarks/README.md "Deploy", table (c), CPU time of one thread on
#: this project's 2-core AVX-512 VMs, 2026-12-02): rounding up to a multiple of 8 made the slim
#: ResNet-18 and GPT 1.01-1.15x faster than the odd widths, single convs/linears at 31/45/63/89/
#: 269 channels 3-9% faster at 32/48/64/96/272 *despite* the extra channels (up to +8% of them,
#: +16% MACs); a ResNet-8 group of 11 channels rounded to 16 (+45%) was slower.  So alignment pays
#: while the extra channels stay under 1/8 of the kept ones.  CUDA: not measured yet (cuDNN and
#: cuBLAS tensor-core tiles also want multiples of 8).
AUTO_ALIGN = 8
AUTO_MAX_EXTRA = 1 / 8


def _check_align(align: object, who: str) -> None:
    if align == "auto":
        return
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"{who}: align must be an int >= 1 or 'auto', got {align!r}")


def _aligned_target(kept: int, num_units: int, unit_size: int, align: int | str) -> int:
    """Units a group keeps under ``align``: ``kept`` or more, never more than ``num_units``.

    An int keeps the next multiple of ``align`` channels (all units if there is none);
    ``"auto"`` keeps the next multiple of :data:`AUTO_ALIGN` only if it exists below the
    dense width and adds at most :data:`AUTO_MAX_EXTRA` of the kept units, else ``kept``.
    """
    step = AUTO_ALIGN if align == "auto" else int(align)
    target = kept
    while target < num_units and (target * unit_size) % step:
        target += 1
    if align == "auto" and ((target * unit_size) % step
                            or target - kept > AUTO_MAX_EXTRA * kept):
        return kept
    return target


def align_removed_units(gm: torch.fx.GraphModule, removed: np.ndarray,
                        align: int | str) -> np.ndarray:
    """``removed`` with some units kept back so that every prunable group keeps a multiple of
    ``align`` channels (kept units x ``unit_size``), or all of its units; ``"auto"``: a
    multiple of :data:`AUTO_ALIGN` where that adds at most :data:`AUTO_MAX_EXTRA` of the kept
    channels (the measured rule above), else the exact count.

    Odd channel counts make oneDNN/MKL kernels slower per channel (and cuDNN/cuBLAS tiles on
    GPUs); QASSO's ``group_divisible`` avoids them while training, this aligns after the fact.
    The units kept back are the group's lowest-index removed ones; all-zero units stay exact,
    so the slim model's outputs do not change.
    """
    _check_align(align, "align_removed_units")
    if align == 1:
        return removed
    removed = removed.copy()
    for g in gm.meta[meta.GROUPS]:
        if not g.prunable or not g.num_units:
            continue
        group = removed[g.unit_offset: g.unit_offset + g.num_units]  # a view into `removed`
        kept = g.num_units - int(group.sum())
        target = _aligned_target(kept, g.num_units, g.unit_size, align)
        group[np.flatnonzero(group)[: target - kept]] = False
    return removed


@dataclass(frozen=True)
class PhysicalPrune:
    """Remove units (default: the all-zero units of prunable groups) in place.

    ``align`` > 1 keeps every prunable group's channel count a multiple of it, ``"auto"``
    where the measured rule says it pays (see :func:`align_removed_units`).
    """

    name: ClassVar[str] = "physical_prune"
    requires: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    provides: ClassVar[frozenset[str]] = frozenset({"slim"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    removed_units: Any = None
    align: int | str = 1

    def __post_init__(self) -> None:
        _check_align(self.align, "physical_prune")

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        analysis: meta.ChannelAnalysis = gm.meta[meta.CHANNELS]
        removed_atom = removed_atoms(gm, self.removed_units, self.align)
        if removed_atom is None:
            return PassResult(gm, False)
        keep = KeptChannels(removed_atom, analysis.node_labels)
        _slice_params(gm, kept_indices(gm, removed_atom=removed_atom))
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


def removed_atoms(gm: torch.fx.GraphModule, removed_units: Any = None,
                  align: int | str = 1) -> np.ndarray | None:
    """The channel atoms physical pruning removes (None: nothing to remove).

    Units: ``removed_units`` (global bool mask) or the all-zero units of prunable groups,
    aligned (:func:`align_removed_units`), then one unit given back to any tensor that
    would lose every channel.
    """
    analysis: meta.ChannelAnalysis = gm.meta[meta.CHANNELS]
    removed = (np.asarray(removed_units, dtype=bool) if removed_units is not None
               else removed_units_from_zeros(gm))
    prunable = getattr(analysis, "prunable_units", np.ones(analysis.num_units, bool))
    removed = align_removed_units(gm, removed & prunable, align)
    if not removed.any():
        return None
    return _keep_every_tensor_nonempty(analysis, removed)


def kept_indices(gm: torch.fx.GraphModule, removed_units: Any = None, align: int | str = 1, *,
                 removed_atom: np.ndarray | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """``(attribute fqn, dim) -> kept indices`` for every attribute dim that loses channels:
    the one source of the slices, for this pass and for ``compress(into=model)``."""
    analysis: meta.ChannelAnalysis = gm.meta[meta.CHANNELS]
    if removed_atom is None:
        removed_atom = removed_atoms(gm, removed_units, align)
    if removed_atom is None:
        return {}
    out = {}
    for (fqn, dim), atoms in sorted(analysis.param_labels.items()):
        kept = np.nonzero(~removed_atom[atoms])[0]
        if len(kept) < len(atoms):
            out[(fqn, dim)] = torch.from_numpy(kept)
    return out


def _slice_params(gm: torch.fx.GraphModule, kept: dict[tuple[str, int], torch.Tensor]) -> None:
    for (fqn, dim), idx in kept.items():
        t = get_attr_tensor(gm, fqn)
        with torch.no_grad():
            new = t.detach().index_select(dim, idx.to(t.device)).clone()
        set_attr_tensor(gm, fqn, new)


def _rewrite_node(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> None:
    """Run the registry's rewrite of ``node``'s op (shape constants, group counts, ...)."""
    rule = rule_for(node.target) if node.op == "call_function" else None
    if rule is not None and rule.rewrite is not None:
        rule.rewrite(gm, node, kept)


def _insert_index_selects(gm: torch.fx.GraphModule, analysis: meta.ChannelAnalysis,
                          keep: KeptChannels) -> None:
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
            idx = create_node_with_meta(gm.graph, "get_attr", buf_name, anchor=node)
            sel = create_node_with_meta(gm.graph, "call_function", aten.index_select.default,
                                        (operand, dim, idx), anchor=node)
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
