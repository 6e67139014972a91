"""``geta_fx.report``: what a (transformed, slim, lowered or loaded) model costs.

Counts, per compute layer of the ATen graph and in total (GETA_SPEC §E, with the reference's
metric defects of §G.2 #3 and #15 fixed):

* parameters (model parameters once each, tied weights once; quantizer scalars separately);
* MACs, from ``node.meta["val"]`` shapes at the example batch:
  conv (incl. transposed/grouped) ``numel(out) * C_in/groups * prod(k)``, linear/matmul family
  ``numel(out) * K``, einsum ``numel(out) * prod(contracted sizes)``, and
  ``scaled_dot_product_attention`` ``QK^T + AV``.  Matmuls between two activations (attention)
  are counted and listed as their own line, never dropped;
* BOPs ``= MACs * b_w * b_a`` with learned, rounded bit widths (32 where unquantized), absolute
  and **relative to FP32 (32 x 32 bits)** -- not to the W16/A32 init as the reference does;
* weight storage in bytes at the learned bit widths (unquantized parameters at their dtype
  width; quantizer scalars at 32 bits, listed separately), vs FP32 storage;
* average weight bit width (model parameters only);
* group sparsity: zero units / units of prunable groups (GetaModule or graphs with group meta).

The FP32 reference is the same graph at 32 x 32 bits unless ``reference=`` names another model
(e.g. ``report(gm.compress(), reference=gm)``: the slim model vs the unpruned FP32 model).
The reference is read, never modified (the reference GETA prunes in place and then reports
"full" numbers that equal the compressed ones, §E).  A slim graph knows its dense origin without
``reference=``: ``GetaModule.compress`` records it (:func:`dense_origin`, ``meta["geta.dense"]``)
and ``geta_fx.lower``/``save``/``load`` carry it, with the lowering records, into the artifact.

So a slim model, the lowered model (packed weights, ``geta`` low-bit ops) and the loaded artifact
of the same network report the same parameters (a packed weight counts its logical elements),
``param_bytes``, bits per layer and on average, MACs/BOPs (also vs the dense FP32 model) and
channels kept/total; the cost model behind them is :mod:`geta_fx.ir.cost`.  What differs is
honest: node names and ops (``lowbit_linear`` for ``linear``), and the quantizer scalars (a
slim model's quantizers learn ``d``, ``q_m`` and ``t``; a lowered weight keeps only its step).

Symbolic (dynamic) sizes take the example inputs' sizes when ``example_inputs`` is given, else
the sizes of the inputs the graph was captured with (the symbols' hints).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir import cost, meta
from geta_fx.ir.cost import FP_BITS, module_path, quantizer_bits

__all__ = ["DENSE", "BitCost", "GroupRow", "LayerRow", "Report", "dense_origin", "module_path",
           "bit_cost", "quantizer_bits", "record_dense_origin", "report"]

logger = logging.getLogger(__name__)

#: gm.meta key of a slim/lowered/loaded graph's dense origin (:func:`dense_origin`, JSON-able).
#: NOTE: belongs in geta_fx/ir/meta.py with the others (as passes.lower_quant.LOWBIT does).
DENSE = "geta.dense"

# The cost model lives in geta_fx.ir.cost; geta_fx.viz reads these names from here.
_clean_path = cost.clean_path
_quantizer_module = cost.quantizer_module
_find_layers = cost.find_layers
_Sizes = cost.Sizes
_bits_of = cost.bits_of


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class LayerRow:
    """One compute node. ``w_bits``/``a_bits`` are the rounded bit widths used for BOPs."""

    name: str                 # graph node name
    module: str               # module path from nn_module_stack ("" at the top level)
    op: str                   # aten op, short ("conv2d", "linear", "scaled_dot_product_attention")
    kind: str                 # conv | linear | matmul | attention | embedding
    weight: str | None        # parameter FQN of the weight operand (None: activation x activation)
    in_channels: int | None
    out_channels: int | None  # output channels of the current graph
    kept_channels: int | None  # output channels whose weight slice is not all zero
    ref_channels: int | None  # output channels of the reference model (same weight FQN)
    params: int               # weight (+ bias) elements of this layer
    macs: int
    w_bits: int
    a_bits: int
    bops: int


@dataclass(frozen=True)
class GroupRow:
    id: int
    units: int
    unit_size: int
    prunable: bool
    zero_units: int
    reason: str | None
    params: tuple[str, ...]


@dataclass(frozen=True)
class QuantRow:
    name: str
    kind: str
    target: str | None       # weight FQN (weight quantizers) or the consuming nodes (act)
    bits: float              # continuous bit width
    bits_rounded: int


@dataclass
class Report:
    """Cost of a model; ``str(report)`` is the terminal table, ``to_json()`` the same as JSON."""

    model: str
    batch: int | None
    shapes_from: str                # "example inputs" | "capture-time sizes"
    reference: str                  # what the FP32 denominators describe
    params: int
    quantizer_params: int
    macs: int
    macs_weight_layers: int
    macs_act_matmuls: int
    bops: int
    bops_act_matmuls: int
    fp32_macs: int
    fp32_bops: int
    weight_bytes: float             # model params at learned bits (+ quantizer scalars)
    param_bytes: float              # model params at learned bits (no quantizer scalars)
    quantizer_bytes: float
    fp32_weight_bytes: int
    avg_weight_bits: float | None
    avg_quantized_weight_bits: float | None
    group_sparsity: float | None
    zero_units: int | None
    prunable_units: int | None
    sparsity_from: str | None
    layers: list[LayerRow] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)
    quantizers: list[QuantRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # derived ------------------------------------------------------------------------------
    @property
    def relative_bops(self) -> float | None:
        return self.bops / self.fp32_bops if self.fp32_bops else None

    @property
    def relative_macs(self) -> float | None:
        return self.macs / self.fp32_macs if self.fp32_macs else None

    @property
    def relative_weight_bytes(self) -> float | None:
        return self.weight_bytes / self.fp32_weight_bytes if self.fp32_weight_bytes else None

    @property
    def relative_param_bytes(self) -> float | None:
        return self.param_bytes / self.fp32_weight_bytes if self.fp32_weight_bytes else None

    # serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_bops"] = self.relative_bops
        d["relative_macs"] = self.relative_macs
        d["relative_weight_bytes"] = self.relative_weight_bytes
        d["relative_param_bytes"] = self.relative_param_bytes
        d["definitions"] = {
            "params": "model parameter elements, tied ones once, quantizer scalars apart; a "
                      "packed low-bit weight counts its logical elements, not its bytes",
            "macs": "multiply-accumulates at the reported batch; activation x activation "
                    "matmuls (attention) included, also listed as macs_act_matmuls",
            "bops": "sum over layers of MACs * weight bits * activation bits (rounded learned "
                    f"bits, {FP_BITS} where unquantized)",
            "fp32_bops": f"reference MACs * {FP_BITS} * {FP_BITS} (FP32 weights and "
                         "activations), not the W16/A32 denominator of the GETA reference code",
            "weight_bytes": "model parameters at their learned bit widths (unquantized ones at "
                            "their dtype width) plus quantizer scalars at 32 bits, in bytes",
            "param_bytes": "model parameters at their learned bit widths, no quantizer "
                           "scalars, no packing padding: the same for a slim, lowered and "
                           "loaded model",
            "avg_weight_bits": "model-parameter bits / model parameters (quantizer scalars "
                               "excluded)",
            "avg_quantized_weight_bits": "the same over the quantized weights only (what "
                                         "QASSO(target_avg_bits=) meets)",
            "group_sparsity": "zero units / units of prunable groups",
        }
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, *, layers: bool = True, groups: bool = False,
                quantizers: bool = True) -> str:
        """Terminal table: totals, then the per-layer table (and optionally groups)."""
        batch = self.batch if self.batch is not None else "?"
        out = [f"geta_fx report: {self.model}  (batch {batch}, sizes from {self.shapes_from})"]
        q = f" (+ {self.quantizer_params:,} quantizer scalars)" if self.quantizer_params else ""
        rows = [
            ("parameters", f"{self.params:,}{q}"),
            ("MACs", f"{_si(self.macs)}  (weight layers {_si(self.macs_weight_layers)}, "
                     f"activation x activation matmuls {_si(self.macs_act_matmuls)})"),
            ("MACs vs reference", f"{_pct(self.relative_macs)}  of {_si(self.fp32_macs)}"),
            ("BOPs", f"{_si(self.bops)}  (MACs x weight bits x activation bits; "
                     f"attention matmuls {_si(self.bops_act_matmuls)})"),
            ("BOPs vs FP32", f"{_pct(self.relative_bops)}  of {_si(self.fp32_bops)} = "
                             f"MACs x 32 x 32 of {self.reference}"),
            ("weight storage", f"{_bytes(self.param_bytes)} at learned bit widths "
                               f"(+ quantizer scalars {_bytes(self.quantizer_bytes)}); FP32 "
                               f"{_bytes(self.fp32_weight_bytes)}: "
                               f"{_pct(self.relative_param_bytes)}"),
            ("average weight bits", "n/a" if self.avg_weight_bits is None else
             f"{self.avg_weight_bits:.2f} per model parameter"
             + ("" if self.avg_quantized_weight_bits is None else
                f", {self.avg_quantized_weight_bits:.2f} per quantized weight")),
            ("group sparsity", "n/a (no group metadata; pass reference=the GetaModule)"
             if self.group_sparsity is None else
             f"{_pct(self.group_sparsity)}  ({self.zero_units}/{self.prunable_units} units of "
             f"prunable groups are zero{', ' + self.sparsity_from if self.sparsity_from else ''})"),
        ]
        width = max(len(k) for k, _ in rows)
        out += [f"  {k:<{width}}  {v}" for k, v in rows]
        out += [f"  note: {n}" for n in self.notes]
        if layers and self.layers:
            out += ["", "layers"]
            out += _table(
                ["node", "module", "kind", "ch kept/total", "w_bits", "a_bits", "MACs", "BOPs"],
                [[r.name, r.module or "-", r.kind, _channels(r),
                  str(r.w_bits), str(r.a_bits), _si(r.macs), _si(r.bops)] for r in self.layers],
                right={3, 4, 5, 6, 7})
        if quantizers and self.quantizers:
            out += ["", "quantizers"]
            out += _table(["name", "kind", "target", "bits", "rounded"],
                          [[r.name, r.kind, r.target or "-", f"{r.bits:.2f}",
                            str(r.bits_rounded)] for r in self.quantizers], right={3, 4})
        if groups and self.groups:
            out += ["", "groups"]
            out += groups_table(self.groups)
        return "\n".join(out)


def groups_table(groups: Sequence[GroupRow], width: int = 100) -> list[str]:
    """Text table of prune groups: units x channels per unit, zero units, params or reason."""
    def what(g: GroupRow) -> str:
        text = (f"{len(g.params)} params: {', '.join(g.params)}" if g.prunable
                else f"unprunable: {g.reason}")
        return text if len(text) <= width else text[:width - 3] + "..."

    return _table(["id", "units", "ch/unit", "prunable", "zero", "params / reason"],
                  [[str(g.id), str(g.units), str(g.unit_size), "yes" if g.prunable else "no",
                    str(g.zero_units), what(g)] for g in groups], right={0, 1, 4})


# ------------------------------------------------------------------------------ formatting
def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bytes(x: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:g} B"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _channels(r: LayerRow) -> str:
    if r.out_channels is None or r.kind == "attention":
        return "-"
    total = r.ref_channels if r.ref_channels is not None else r.out_channels
    kept = r.kept_channels if r.kept_channels is not None else r.out_channels
    return f"{kept}/{total}"


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header), "  " + "  ".join("-" * w for w in widths), *map(fmt, rows)]


# ------------------------------------------------------------------------------ the report
def _unwrap(m: Any, example_inputs: Any) -> tuple[torch.fx.GraphModule, str]:
    from geta_fx.module import GetaModule

    if isinstance(m, GetaModule):
        from geta_fx.distributed import flat_graph_module

        return flat_graph_module(m.graph_module), "GetaModule"
    if isinstance(m, torch.fx.GraphModule):
        return m, "GraphModule"
    if isinstance(m, nn.Module):
        if example_inputs is None:
            raise InputError(f"report: a plain {type(m).__name__} needs example_inputs to be "
                             "captured (or pass geta_fx.transform(...)'s result)")
        from geta_fx.capture import capture

        return capture(m, example_inputs).graph_module, type(m).__name__
    raise InputError(f"report: expected a GetaModule, GraphModule or nn.Module, "
                     f"got {type(m).__name__}")


def _group_rows(gm: torch.fx.GraphModule) -> list[GroupRow] | None:
    groups = meta.get_groups(gm)
    if meta.GROUPS not in gm.meta:
        return None
    from geta_fx.ir.units import zero_mask

    rows = []
    for g in groups:
        zero = int(zero_mask(gm, g).sum()) if g.prunable and g.num_units else 0
        rows.append(GroupRow(g.id, g.num_units, g.unit_size, g.prunable, zero, g.reason,
                             tuple(sorted({m.fqn for m in g.members if m.is_param}))))
    return rows


# ------------------------------------------------------------------------------ the reference
@dataclass(frozen=True)
class _Reference:
    """The model whose FP32 cost and channel counts the relative numbers compare with."""

    name: str
    channels: dict[str, int]                    # "<weight FQN>:<output dim>" -> channels
    layers: list[tuple[str, str | None, int]]   # (kind, weight FQN, MACs), graph order
    params: int
    groups: list[GroupRow] | None
    sizes: list[list[int]]                      # the input sizes its MACs are at


def _out_channels(gm: torch.fx.GraphModule, lay: cost.Layer, fqn: str | None
                  ) -> tuple[str, int] | None:
    """(``"<weight FQN>:<output dim>"``, output channels) of a weight layer; keyed by the dim
    too because a tied weight has other output channels in each of its layers (an embedding's
    dim 1, the tied head's dim 0)."""
    if fqn is None or lay.weight is None or lay.w_out_dim is None:
        return None
    shape = cost.weight_shape(gm, lay.weight)
    if not shape:
        return None
    dim = lay.w_out_dim % len(shape)
    return f"{fqn}:{dim}", int(shape[dim])


def _measure(gm: torch.fx.GraphModule, name: str, sz: cost.Sizes) -> _Reference:
    stored = cost.stored_weights(gm)
    channels: dict[str, int] = {}
    layers = []
    for lay in cost.find_layers(gm, sz):
        fqn = cost.weight_fqn(lay.weight, stored) if lay.weight is not None else None
        out = _out_channels(gm, lay, fqn)
        if out is not None:
            channels[out[0]] = out[1]
        layers.append((lay.kind, fqn, lay.macs + lay.extra_macs))
    return _Reference(name, channels, layers, cost.storage(gm).params, _group_rows(gm),
                      sz.inputs)


#: Version of the :func:`dense_origin` record.
DENSE_FORMAT = 1


def dense_origin(m: Any, example_inputs: Any = None) -> dict[str, Any]:
    """What a slim model's report needs to know of the dense model it came from (JSON-able).

    :meth:`GetaModule.compress` stores it as ``slim.meta["geta.dense"]``; :func:`geta_fx.lower`
    and :func:`geta_fx.save` carry it into the artifact's ``geta_fx.json`` (``"dense"``) and
    :func:`geta_fx.load` back into ``meta["geta.dense"]``, so ``report(slim)``,
    ``report(lowered)`` and ``report(loaded)`` all compare with the dense model: its output
    channels per weight, its MACs per layer at ``example_inputs`` (default: the capture-time
    sizes), its parameter count and its prune groups with their zero units.
    """
    gm, kind = _unwrap(m, example_inputs)
    ref = _measure(gm, kind, cost.Sizes(gm, example_inputs))
    return json.loads(json.dumps({
        "format": DENSE_FORMAT, "model": kind, "input_sizes": ref.sizes, "params": ref.params,
        "channels": ref.channels, "layers": ref.layers,
        "groups": None if ref.groups is None else [asdict(g) for g in ref.groups]}))


def record_dense_origin(slim: torch.fx.GraphModule, dense: Any) -> None:
    """``slim.meta["geta.dense"] = dense_origin(dense)``; a dense graph the cost model cannot
    read leaves no record (logged as a warning) instead of failing the caller (``compress``)."""
    try:
        slim.meta[DENSE] = dense_origin(dense)
    except Exception as e:  # noqa: BLE001 - metadata is informative; compress must not fail
        slim.meta.pop(DENSE, None)
        logger.warning("no dense-origin record for the slim graph (%s: %s); report(slim) "
                       "needs reference= for vs-dense numbers", type(e).__name__, e)


def _from_origin(d: Any) -> _Reference | None:
    """The reference a :func:`dense_origin` record describes (None: not such a record)."""
    if not isinstance(d, dict) or d.get("format") != DENSE_FORMAT:
        return None
    try:
        return _parse_origin(d)
    except (KeyError, TypeError, ValueError):
        return None


def _parse_origin(d: dict[str, Any]) -> _Reference:
    groups = d.get("groups")
    return _Reference(
        f"the dense {d.get('model', 'model')} (slim-graph metadata)",
        {str(k): int(v) for k, v in d["channels"].items()},
        [(str(k), w, int(n)) for k, w, n in d["layers"]], int(d["params"]),
        None if groups is None else [GroupRow(**{**g, "params": tuple(g["params"])})
                                     for g in groups],
        [[int(s) for s in shape] for shape in d["input_sizes"]])


def _reference_macs(ref: _Reference, gm: torch.fx.GraphModule, layers: list[cost.Layer],
                    sz: cost.Sizes, notes: list[str]) -> int:
    """The dense MACs at this report's sizes, from the dense MACs at ``ref.sizes``.

    A layer's MACs are a product of channel dims (what pruning changes) and input-derived
    sizes (batch, sequence, spatial; what pruning never changes), so each dense layer scales
    from ``ref.sizes`` to ``sz`` as the matching layer of this graph does.
    """
    total = sum(n for _, _, n in ref.layers)
    if sz.inputs == ref.sizes:
        return total
    stored = cost.stored_weights(gm)
    at_ref = cost.find_layers(gm, cost.Sizes(gm, None, default_sizes=ref.sizes))

    def sig(lays: list[cost.Layer]) -> list[tuple[str, str | None]]:
        return [(lay.kind, cost.weight_fqn(lay.weight, stored) if lay.weight else None)
                for lay in lays]

    if sig(at_ref) != sig(layers) or sig(layers) != [(k, w) for k, w, _ in ref.layers]:
        notes.append(f"dense MACs are at the sizes {ref.sizes} the dense model was costed at: "
                     "this graph's layers do not match its layers one to one")
        return total
    out = 0
    for (_, _, dense), base, now in zip(ref.layers, at_ref, layers, strict=True):
        b, n = base.macs + base.extra_macs, now.macs + now.extra_macs
        out += dense if b == 0 else (dense * n + b // 2) // b
    return out


# ------------------------------------------------------------------------------ the report
def report(m: Any, example_inputs: Any = None, *, reference: Any = None,
           compressed: bool = False) -> Report:
    """Cost report of a model (see the module docstring for every definition).

    Args:
        m: a GetaModule, a (slim, lowered or loaded) GraphModule, or a plain nn.Module
            (captured with ``example_inputs``).
        example_inputs: inputs fixing symbolic sizes (batch, sequence); default: the sizes the
            graph (or its dense origin) was captured with.
        reference: the model whose FP32 (32 x 32 bit) cost is the denominator of the relative
            numbers, e.g. the GetaModule a slim graph came from; default: the dense origin a
            slim, lowered or loaded graph records (``meta["geta.dense"]``), else ``m`` itself.
        compressed: with a GetaModule, report ``m.compress()`` against ``m`` (what the slim
            model would cost now).
    """
    from geta_fx.module import GetaModule

    if compressed:
        if not isinstance(m, GetaModule):
            raise InputError("report(compressed=True) needs a GetaModule")
        slim = report(m.compress(), example_inputs, reference=m)
        slim.model = "GetaModule.compress()"
        return slim
    gm, kind, notes, sz, layers, stored, st, ref, fp32_macs, sparsity_from = _costed(
        m, example_inputs, reference)
    rows, macs_w, macs_a, bops, bops_a = _layer_rows(gm, layers, stored, ref)
    group_rows, sparsity, zero_units, prunable_units, sparsity_from = _sparsity(
        gm, ref, sparsity_from)
    notes += _notes(layers, st, macs_a) + _param_notes(gm)
    quant_bytes = st.quantizer_scalars * FP_BITS / 8
    return Report(
        model=kind, batch=sz.batch,
        shapes_from="example inputs" if sz.from_inputs else "capture-time sizes",
        reference=ref.name, params=st.params, quantizer_params=st.quantizer_scalars,
        macs=macs_w + macs_a, macs_weight_layers=macs_w, macs_act_matmuls=macs_a,
        bops=bops, bops_act_matmuls=bops_a, fp32_macs=fp32_macs,
        fp32_bops=fp32_macs * FP_BITS * FP_BITS,
        weight_bytes=st.bits / 8 + quant_bytes, param_bytes=st.bits / 8,
        quantizer_bytes=quant_bytes, fp32_weight_bytes=ref.params * FP_BITS // 8,
        avg_weight_bits=st.bits / st.params if st.params else None,
        avg_quantized_weight_bits=st.quant_bits / st.quant_params if st.quant_params else None,
        group_sparsity=sparsity, zero_units=zero_units, prunable_units=prunable_units,
        sparsity_from=sparsity_from, layers=rows, groups=group_rows or [],
        quantizers=_quant_rows(gm, stored), notes=notes)


def _costed(m: Any, example_inputs: Any, reference: Any) -> tuple[Any, ...]:
    """What :func:`report` and :func:`bit_cost` read: the graph, its kind, notes, sizes,
    layers, stored weights, storage, the dense reference, its FP32 MACs, sparsity source."""
    gm, kind = _unwrap(m, example_inputs)
    notes: list[str] = []
    origin = _from_origin(gm.meta.get(DENSE)) if reference is None else None
    if reference is None and gm.meta.get(DENSE) is not None and origin is None:
        notes.append(f"meta[{DENSE!r}] is not a format-{DENSE_FORMAT} dense-origin record: "
                     "ignored")
    sz = cost.Sizes(gm, example_inputs, default_sizes=origin.sizes if origin else None)
    layers = cost.find_layers(gm, sz)
    stored = cost.stored_weights(gm)
    st = cost.storage(gm)
    ref, fp32_macs, sparsity_from = _reference(gm, kind, reference, origin, example_inputs,
                                               layers, st, sz, notes)
    return gm, kind, notes, sz, layers, stored, st, ref, fp32_macs, sparsity_from


@dataclass(frozen=True)
class BitCost:
    """A model's cost as a function of its quantizers' rounded bit widths: :func:`report`'s
    quantized-weight storage and BOPs with the bits left open (what ``QASSO(target_avg_bits=,
    target_bops=)`` allocates against; a test checks both agree with :func:`report`).

    Quantizers are named as in the graph (``GetaModule.quantizers`` keys); a term's bit source
    is such a name or a fixed width.
    """

    weight_numel: dict[str, int]        # weight quantizer -> parameters stored at its bits
    terms: tuple[tuple[int, str | int, str | int], ...]  # (MACs, weight/2nd operand, act)
    fp32_bops: int                      # the dense FP32 reference (32 x 32 bits)

    def bops(self, bits: Any) -> int:
        """BOPs with ``bits[name]`` (rounded) for every quantizer a term names."""
        def b(src: str | int) -> int:
            return src if isinstance(src, int) else int(round(float(bits[src])))

        return sum(macs * b(w) * b(a) for macs, w, a in self.terms)

    def avg_bits(self, bits: Any) -> float | None:
        """Parameter-weighted mean of the quantized weights' rounded bits."""
        n = sum(self.weight_numel.values())
        if not n:
            return None
        return sum(k * round(float(bits[q])) for q, k in self.weight_numel.items()) / n



def bit_cost(m: Any, example_inputs: Any = None, *, reference: Any = None) -> BitCost:
    """The :class:`BitCost` of a model (arguments as for :func:`report`)."""
    gm, _, _, _, layers, stored, st, _, fp32_macs, _ = _costed(m, example_inputs, reference)
    names = {id(q): n for n, q in cost.quantizers(gm).items()}

    def name(src: cost.BitSource) -> str | int:
        return src if isinstance(src, int) else names[id(src)]

    terms = tuple((t.macs, name(t.w), name(t.a)) for lay in layers
                  for t in cost.bops_terms(lay, stored))
    return BitCost(dict(st.by_quantizer), terms, fp32_macs * FP_BITS * FP_BITS)


def _reference(gm: torch.fx.GraphModule, kind: str, reference: Any, origin: Any,
               example_inputs: Any, layers: list[cost.Layer], st: cost.Storage,
               sz: cost.Sizes, notes: list[str]) -> tuple[Any, int, str | None]:
    """The dense model the relative numbers compare with: ``reference=``, the recorded dense
    origin, or the graph itself (with a note); its FP32 MACs and where sparsity comes from."""
    if reference is not None:
        ref_gm, ref_kind = _unwrap(reference, example_inputs)
        ref = _measure(ref_gm, f"the reference {ref_kind}", cost.Sizes(ref_gm, example_inputs))
        return ref, sum(n for _, _, n in ref.layers), "zero units of the reference"
    if origin is not None:
        return (origin, _reference_macs(origin, gm, layers, sz, notes),
                "zero units of the dense model (slim-graph metadata)")
    ref = _Reference("the same graph", {}, [(lay.kind, None, lay.macs + lay.extra_macs)
                                            for lay in layers], st.params, None, sz.inputs)
    if kind != "GetaModule":
        notes.append(f"no dense-origin metadata (meta[{DENSE!r}]) and no reference=: "
                     "channel totals, MACs/BOPs vs FP32 and storage vs FP32 describe this "
                     "graph itself, not the dense model it may have been pruned from")
    return ref, sum(n for _, _, n in ref.layers), None


def _layer_rows(gm: torch.fx.GraphModule, layers: list[cost.Layer], stored: Any, ref: Any
                ) -> tuple[list[LayerRow], int, int, int, int]:
    """Per-layer rows and the totals: weight-layer MACs, act x act MACs, BOPs of each."""
    rows: list[LayerRow] = []
    macs_w = macs_a = bops = bops_a = 0
    for lay in layers:
        row = _layer_row(gm, lay, stored, ref.channels)
        if lay.weight is None:
            macs_a += row.macs
            bops_a += row.bops
        else:
            macs_w += row.macs
        bops += row.bops
        rows.append(row)
    return rows, macs_w, macs_a, bops, bops_a


def _sparsity(gm: torch.fx.GraphModule, ref: Any, sparsity_from: str | None
              ) -> tuple[Any, float | None, int | None, int | None, str | None]:
    """Group rows and group sparsity: the graph's own groups, else the reference's."""
    group_rows = _group_rows(gm)
    if group_rows is None:
        group_rows = ref.groups
    else:
        sparsity_from = None
    if group_rows is None:
        return None, None, None, None, None
    prunable_units = sum(g.units for g in group_rows if g.prunable)
    zero_units = sum(g.zero_units for g in group_rows if g.prunable)
    sparsity = zero_units / prunable_units if prunable_units else 0.0
    return group_rows, sparsity, zero_units, prunable_units, sparsity_from


def _layer_row(gm: torch.fx.GraphModule, lay: cost.Layer,
               stored: dict[str, cost.StoredWeight], ref_channels: dict[str, int]) -> LayerRow:
    terms = cost.bops_terms(lay, stored)
    w_bits, a_bits = cost.source_bits(terms[0].w), cost.source_bits(terms[0].a)
    layer_bops = sum(t.macs * cost.source_bits(t.w) * cost.source_bits(t.a) for t in terms)
    wfqn = cost.weight_fqn(lay.weight, stored) if lay.weight is not None else None
    out = _out_channels(gm, lay, wfqn)
    n_params = 0
    kept = None
    if lay.weight is not None and lay.weight.param is not None:
        n_params = cost.weight_numel(gm, lay.weight) + cost.bias_numel(gm, lay.node)
        kept = cost.kept_channels(gm, lay.weight, lay.w_out_dim)
    return LayerRow(
        name=lay.node.name, module=cost.module_path(lay.node), op=cost.packet(lay.node),
        kind=lay.kind, weight=wfqn, in_channels=lay.in_channels,
        out_channels=lay.out_channels, kept_channels=kept,
        ref_channels=ref_channels.get(out[0]) if out else None, params=n_params,
        macs=lay.macs + lay.extra_macs, w_bits=w_bits, a_bits=a_bits, bops=layer_bops)


def _quant_rows(gm: torch.fx.GraphModule, stored: dict[str, cost.StoredWeight]
                ) -> list[QuantRow]:
    """Quantizer modules; in a lowered graph, the quantizers its lowered weights and frozen
    ``geta::quantize`` calls stand for (named by their ``geta_lowbit`` holder)."""
    consumers: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if cost.quantizer_module(gm, node) is not None:
            consumers.setdefault(str(node.target), []).extend(u.name for u in node.users)
    rows = []
    for name, q in cost.quantizers(gm).items():
        bits = quantizer_bits(q)
        target = getattr(q, "param_fqn", None) or ", ".join(consumers.get(name, [])) or None
        rows.append(QuantRow(name, str(getattr(q, "kind", "?")), target, bits, int(round(bits))))
    for s in stored.values():
        if s.learned_bits is not None:
            rows.append(QuantRow(s.path.rpartition(".")[0], "weight", s.param, s.learned_bits,
                                 s.bits))
    for node in gm.graph.nodes:
        act_bits = cost.frozen_quantize_bits(gm, node)
        if act_bits is not None:
            holder = str(node.args[1].target).rpartition(".")[0]  # type: ignore[union-attr]
            rows.append(QuantRow(holder, "act", ", ".join(u.name for u in node.users) or None,
                                 act_bits, int(round(act_bits))))
    return rows


def _param_notes(gm: torch.fx.GraphModule) -> list[str]:
    """Parameters the passes left out of every group or unquantized, with their reasons."""
    notes = [f"{n.fqn} is in no prunable group: {n.reason}" for n in meta.get_ungrouped(gm)]
    notes += [f"{n.fqn} is not quantized: {n.reason}" for n in meta.get_unquantized(gm)]
    return notes


def _notes(layers: list[cost.Layer], st: cost.Storage, macs_a: int) -> list[str]:
    notes = []
    if macs_a:
        notes.append("activation x activation matmuls (attention) are counted in MACs/BOPs "
                     f"at {FP_BITS} bits unless their inputs are quantized")
    if st.unlearned:
        notes.append(f"{len(st.unlearned)} lowered weight(s) without a lowering record "
                     f"(meta[{cost.LOWBIT!r}]): their bits are the storage bits (packed bits "
                     "may exceed the learned bit width by one; a frozen float weight counts at "
                     f"its dtype width): {', '.join(st.unlearned)}")
    if not layers:
        notes.append("no compute layer with known shapes: MACs and BOPs are 0 (the graph has "
                     "no ATen conv/linear/matmul/attention nodes with meta['val']; capture "
                     "with geta_fx.capture or torch.export)")
    return notes
