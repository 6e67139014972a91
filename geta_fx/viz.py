"""Draw what the compiler did: prune groups, quantizers, ops; before/after dumps per pass.

``to_dot(gm, color_by=...)`` returns Graphviz DOT text (no dependency); ``draw`` writes it, or
renders SVG/PNG/PDF through the ``graphviz`` Python package (which needs Graphviz's ``dot``
program: ``apt-get install graphviz``).  ``DotDumper`` is a Pipeline observer writing
``{i:02d}_{pass}_before.dot`` / ``_after.dot`` for every pass that changed the graph or its
drawing, created nodes yellow and erased nodes grey-dashed (the GraphTransformObserver idea,
with public APIs only).

Drawing conventions (meta-driven, FxGraphDrawer style):

* a node shows its name, op, output shape and dtype;
* ``color_by="group"``: each prune group has one md5-stable colour, and nodes carrying its
  channels are filled with it and tagged ``g<id>: <units>x<unit_size>``; parameters are
  filled with the colour of the group whose *rows* (outputs) they hold and list the groups
  whose columns they hold; a node carrying several groups is striped; unprunable groups are
  grey and dashed (border in the group's colour), with the reason as the tooltip;
* quantizer nodes are hexagons labelled ``Qw 4b`` / ``Qa 8b`` (rounded learned bit width);
  ``color_by="quant"`` fills compute layers by their weight bit width (red 2 bits ... green
  16 bits, white unquantized);
* ``color_by="op"`` fills by op category (conv, linear/matmul, attention, norm, ...);
* nodes are clustered by module path (``nn_module_stack``); ``collapse=True`` draws one
  node in place of consecutive sibling blocks (``layers.1`` .. ``layers.N``) whose graphs
  repeat the first one.

Group colours come from ``md5`` of the group id, so a group keeps its colour across passes,
runs and files.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx

from geta_fx.errors import GetaFxError, InputError
from geta_fx.ir import meta
from geta_fx.ir.query import tensor_val

__all__ = ["HAS_GRAPHVIZ", "DotDumper", "VizError", "draw", "dump_observer", "group_color",
           "render", "to_dot"]

try:  # the Python binding is optional: DOT text needs nothing, rendering needs `dot`
    import graphviz as _graphviz

    HAS_GRAPHVIZ = True
except ImportError:  # pragma: no cover - depends on the environment
    _graphviz = None
    HAS_GRAPHVIZ = False

ColorBy = Literal["group", "quant", "op"]
COLOR_BY = ("group", "quant", "op")

CREATED_FILL = "#fff176"      # yellow: created by the pass
CREATED_BORDER = "#f9a825"
ERASED_FILL = "#eeeeee"       # grey, dashed: erased by the pass
UNPRUNABLE_FILL = "#e0e0e0"
_SUFFIX_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg"}
_DOT_SUFFIXES = {".dot", ".gv"}


class VizError(GetaFxError):
    """A drawing could not be written (unknown format, Graphviz missing, ...)."""


# ------------------------------------------------------------------------------ colours
def _hex(h: float, s: float, v: float) -> str:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def group_color(group_id: int) -> str:
    """The fill colour of a prune group, a pure function of its id.

    The hue steps by the golden ratio per id (neighbouring ids, which are usually drawn
    side by side, land far apart on the colour wheel); md5 of the id varies saturation, so
    ids whose hues come close still differ.  Stable across passes, runs and files.
    """
    digest = hashlib.md5(f"geta.group/{group_id}".encode()).digest()
    hue = (group_id * 0.618033988749895 + 0.1) % 1.0
    sat = 0.30 + 0.30 * digest[0] / 255
    return _hex(hue, sat, 0.97)


def bits_color(bits: float | None) -> str:
    """Red (2 bits) -> yellow -> green (16 bits); white for unquantized (None or >= 32)."""
    if bits is None or bits >= 32:
        return "#ffffff"
    frac = min(max((bits - 2) / 14, 0.0), 1.0)
    return _hex(0.33 * frac, 0.55, 0.97)


_OP_CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv": ("#8dd3c7", ("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                         "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")),
    "linear": ("#80b1d3", ("linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "einsum")),
    "attention": ("#fb8072", ("scaled_dot_product_attention", "softmax", "_softmax",
                              "_safe_softmax", "log_softmax")),
    "norm": ("#ffffb3", ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
                         "_native_batch_norm_legit_no_training", "native_layer_norm",
                         "mean", "var", "rsqrt", "pow")),
    "activation": ("#bebada", ("relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh",
                               "hardswish", "leaky_relu", "elu", "relu6", "mish", "softplus")),
    "elementwise": ("#fdb462", ("add", "add_", "sub", "mul", "div", "neg", "where", "maximum",
                                "minimum", "exp", "cos", "sin")),
    "shape": ("#e5e5e5", ("view", "_unsafe_view", "reshape", "permute", "transpose", "t",
                          "expand", "contiguous", "clone", "unsqueeze", "squeeze", "flatten",
                          "cat", "stack", "split", "split_with_sizes", "chunk", "slice",
                          "select", "narrow", "getitem", "to", "_to_copy", "unflatten")),
    "pool": ("#b3de69", ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool1d",
                         "avg_pool1d", "adaptive_avg_pool1d", "max_pool3d")),
    "embedding": ("#fccde5", ("embedding",)),
}
_OP_COLOR = {op: color for color, ops in _OP_CATEGORIES.values() for op in ops}
_OP_CATEGORY = {op: cat for cat, (_, ops) in _OP_CATEGORIES.items() for op in ops}
_IO_COLOR = "#d9ead3"
_PARAM_COLOR = "#f5f5f5"
_QUANT_COLOR = "#ffe0b2"


def _op_color(op: str) -> str:
    color = _OP_COLOR.get(op)
    if color is not None:
        return color
    digest = hashlib.md5(op.encode()).digest()
    return _hex(int.from_bytes(digest[:4], "big") / 2**32, 0.15, 0.98)


# ------------------------------------------------------------------------------ snapshot
@dataclass
class _DNode:
    """One drawn node; plain strings only, so snapshots outlive graph edits."""

    name: str
    lines: list[str]
    attrs: dict[str, str]
    cluster: tuple[str, ...]          # enclosing module paths, outermost first
    inputs: list[str]
    tooltip: str
    signature: str                    # op + relative position, for repeated-block detection


@dataclass
class _Snapshot:
    nodes: dict[str, _DNode] = field(default_factory=dict)
    clusters: dict[str, str] = field(default_factory=dict)   # path -> "path: Type"
    legend: list[tuple[str, str, str]] = field(default_factory=list)  # (fill, text, style)
    title: str = ""


def _short_dtype(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    table = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
             "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "bool"}
    return table.get(name, name)


def _shape_text(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(s) for s in val.shape)
        return f"[{dims}] {_short_dtype(val.dtype)}"
    if isinstance(val, (tuple, list)):
        parts = [_shape_text(v) for v in val[:3]]
        more = f" +{len(val) - 3}" if len(val) > 3 else ""
        return "(" + ", ".join(p for p in parts if p) + more + ")" if any(parts) else ""
    if isinstance(val, (torch.SymInt, int)):
        return f"int {val}"
    return ""


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        packet = getattr(getattr(target, "overloadpacket", None), "__name__", None)
        return (packet or getattr(target, "__name__", str(target))).split(".")[-1]
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _module_stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    from geta_fx.report import _clean_path

    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, typ = value[0], value[1]
        typ_name = typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1]
        path = _clean_path(str(path))
        if path:
            out.append((path, typ_name.rstrip("'>")))
    return out


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    from geta_fx.report import _quantizer_module

    return _quantizer_module(gm, node)


def _quant_bits(q: Any) -> tuple[int, float]:
    from geta_fx.report import quantizer_bits

    b = quantizer_bits(q)
    return int(round(b)), b


def _layer_bits(gm: torch.fx.GraphModule) -> dict[str, tuple[int, int]]:
    """node name -> (weight bits, activation bits) of compute layers (32 = unquantized)."""
    from geta_fx.report import _find_layers, _Sizes, _bits_of

    out: dict[str, tuple[int, int]] = {}
    try:
        layers = _find_layers(gm, _Sizes(gm, None))
    except Exception:  # noqa: BLE001 - a drawing never fails on a size it cannot resolve
        return out
    for lay in layers:
        w = _bits_of(lay.weight) if lay.weight is not None else (
            _bits_of(lay.other) if lay.other is not None else 32)
        a = _bits_of(lay.act) if lay.act is not None else 32
        out[lay.node.name] = (w, a)
    return out


def _is_buffer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    from geta_fx.ir.query import get_attr_tensor

    try:
        return not isinstance(get_attr_tensor(gm, str(node.target)), torch.nn.Parameter)
    except AttributeError:
        return False


@dataclass
class _Used:
    """What the drawn nodes use, for the legend."""

    groups: set[int] = field(default_factory=set)
    bits: set[int | None] = field(default_factory=set)
    ops: set[str] = field(default_factory=set)


def _param_sides(groups: dict[int, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """parameter FQN -> ids of groups whose rows ("out") / columns ("in") it holds."""
    p_out: dict[str, list[int]] = {}
    p_in: dict[str, list[int]] = {}
    for g in groups.values():
        for m in g.members:
            side = p_out if m.role == "out" else p_in
            if g.id not in side.setdefault(m.fqn, []):
                side[m.fqn].append(g.id)
    return p_out, p_in


def _visible_nodes(gm: torch.fx.GraphModule, snap: _Snapshot, params: bool, buffers: bool
                   ) -> tuple[list[torch.fx.Node], set[str]]:
    """The nodes to draw (and the module clusters they sit in)."""
    cluster_paths: set[str] = set()
    visible: list[torch.fx.Node] = []
    hidden: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            hidden.add(node.name)
            continue  # export's guard-check module: no data flows through it
        if node.op == "get_attr" and not (buffers if _is_buffer(gm, node) else params):
            hidden.add(node.name)
            continue
        if (not buffers and not node.users and node.op == "call_function"
                and node.all_input_nodes
                and all(a.name in hidden for a in node.all_input_nodes)):
            hidden.add(node.name)
            continue  # e.g. BatchNorm's num_batches_tracked += 1, drawn with buffers=True
        visible.append(node)
        for path, typ in _module_stack(node):
            cluster_paths.add(path)
            snap.clusters.setdefault(path, f"{path}: {typ}")
    return visible, cluster_paths


def _group_tags(node: torch.fx.Node, groups: dict[int, Any], sides: Any, used: _Used
                ) -> tuple[list[str], list[Any], list[Any]]:
    """(label tags, prunable groups, unprunable groups) of a node."""
    p_out, p_in = sides
    fills: list[Any] = []
    unprunable: list[Any] = []
    tags: list[str] = []
    if node.op == "get_attr":
        fqn = str(node.target)
        outs, ins = p_out.get(fqn, []), p_in.get(fqn, [])
        for gid in outs:
            g = groups[gid]
            tags.append(f"g{gid}: {g.num_units}x{g.unit_size} out")
            (fills if g.prunable else unprunable).append(g)
        if ins:
            tags.append("in: " + ", ".join(f"g{i}" for i in ins))
        used.groups.update(outs)
        return tags, fills, unprunable
    seen: list[int] = []
    for member in node.meta.get(meta.GROUP, ()) or ():
        if member.group_id in seen:
            continue
        seen.append(member.group_id)
        g = groups.get(member.group_id)
        if g is None:
            tags.append(f"g{member.group_id}")
            continue
        tags.append(f"g{g.id}: {g.num_units}x{g.unit_size}"
                    + ("" if g.prunable else " (unprunable)"))
        (fills if g.prunable else unprunable).append(g)
    used.groups.update(seen)
    return tags, fills, unprunable


def _quantizer_label(node: torch.fx.Node, q: Any, attrs: dict[str, str],
                     tooltip: list[str]) -> list[str]:
    rounded, cont = _quant_bits(q)
    kind = getattr(q, "kind", "?")
    sign = "" if getattr(q, "signed", True) else " unsigned"
    attrs["shape"] = "hexagon"
    attrs["margin"] = "0.02,0.02"
    tooltip.append(f"{kind} quantizer, {cont:.3f} bits (rounded {rounded})"
                   + (f", quantizes {q.param_fqn}" if getattr(q, "param_fqn", None) else ""))
    return [f"Q{'w' if kind == 'weight' else 'a'} {rounded}b{sign}",
            node.name.removeprefix("geta_quant_"), f"{cont:.2f} bits"]


def _fill_by_group(attrs: dict[str, str], fills: list[Any], unprunable: list[Any],
                   q: Any) -> None:
    if fills:
        colors = [group_color(g.id) for g in fills]
        if len(colors) > 1:
            attrs["style"] = "striped" if attrs["shape"] == "box" else "wedged"
            attrs["fillcolor"] = ":".join(colors)
        else:
            attrs["fillcolor"] = colors[0]
    elif unprunable:
        attrs["fillcolor"] = UNPRUNABLE_FILL
        attrs["style"] = "filled,dashed"
        attrs["color"] = group_color(unprunable[0].id)
        attrs["penwidth"] = "2"
    elif q is not None:
        attrs["fillcolor"] = _QUANT_COLOR
    if unprunable and fills:
        attrs["color"] = group_color(unprunable[0].id)
        attrs["penwidth"] = "2"


def _fill_by_quant(node: torch.fx.Node, attrs: dict[str, str], lines: list[str], q: Any,
                   bits: dict[str, Any], used: _Used) -> None:
    if q is not None:
        b = _quant_bits(q)[0]
        attrs["fillcolor"] = bits_color(b)
        used.bits.add(b)
    elif node.name in bits:
        wb, ab = bits[node.name]
        lines.append(f"W{wb} A{ab}")
        attrs["fillcolor"] = bits_color(wb)
        used.bits.add(wb if wb < 32 else None)


def _fill_by_op(node: torch.fx.Node, attrs: dict[str, str], op: str, q: Any,
                used: _Used) -> None:
    if q is not None:
        attrs["fillcolor"] = _QUANT_COLOR
        used.ops.add("quantizer")
    elif node.op == "call_function":
        attrs["fillcolor"] = _op_color(op)
        used.ops.add(_OP_CATEGORY.get(op, "other"))
    elif node.op == "get_attr":
        attrs["fillcolor"] = _PARAM_COLOR


def _shape_by_kind(node: torch.fx.Node, attrs: dict[str, str]) -> None:
    if node.op in ("placeholder", "output"):
        attrs["shape"] = "oval"
        attrs["style"] = attrs["style"] + ",bold"
        if attrs["fillcolor"] == "#ffffff":
            attrs["fillcolor"] = _IO_COLOR
    elif node.op == "get_attr":
        attrs["shape"] = "note"
        attrs["fontsize"] = "9"


def _draw_node(gm: torch.fx.GraphModule, node: torch.fx.Node, color_by: ColorBy,
               groups: dict[int, Any], sides: Any, bits: dict[str, Any],
               cluster_paths: set[str], used: _Used) -> _DNode:
    op = _op_name(node)
    lines = [node.name]
    if node.op in ("call_function", "call_method") and not node.name.startswith(op):
        lines.append(op)
    shape = _shape_text(node.meta.get("val", tensor_val(node)))
    if shape:
        lines.append(shape)
    attrs: dict[str, str] = {"shape": "box", "style": "filled", "fillcolor": "#ffffff"}
    tooltip = [node.format_node() or node.name]
    q = _quantizer(gm, node)
    tags, fills, unprunable = _group_tags(node, groups, sides, used)
    for g in [*fills, *unprunable]:
        state = "prunable" if g.prunable else f"unprunable: {g.reason}"
        tooltip.append(f"group {g.id}: {g.num_units} units x {g.unit_size} channels, {state}")
    if q is not None:
        lines = _quantizer_label(node, q, attrs, tooltip)
    if tags and color_by == "group":
        lines.extend(tags)
    if color_by == "group":
        _fill_by_group(attrs, fills, unprunable, q)
    elif color_by == "quant":
        _fill_by_quant(node, attrs, lines, q, bits, used)
    else:
        _fill_by_op(node, attrs, op, q, used)
    _shape_by_kind(node, attrs)
    stack = [p for p, _ in _module_stack(node)]
    if node.op == "get_attr" and not stack:
        owner = str(node.target).rpartition(".")[0]
        prefixes = [p for p in cluster_paths if owner == p or owner.startswith(p + ".")]
        stack = sorted(prefixes, key=len)
    rel = _relative_signature(node, stack[-1] if stack else "") + "|" + shape
    inputs = [a.name for a in node.all_input_nodes]
    return _DNode(node.name, lines, attrs, tuple(stack), inputs, "\n".join(tooltip), rel)


def _legend(snap: _Snapshot, color_by: ColorBy, groups: dict[int, Any], used: _Used) -> None:
    if color_by == "group":
        for gid in sorted(used.groups):
            g = groups.get(gid)
            if g is None:
                continue
            if g.prunable:
                snap.legend.append((group_color(gid),
                                    f"g{gid}: {g.num_units} units x {g.unit_size} ch", ""))
            else:
                snap.legend.append((UNPRUNABLE_FILL, f"g{gid}: {g.num_units} x {g.unit_size}"
                                    f" unprunable: {g.reason}", group_color(gid)))
    elif color_by == "quant":
        for b in sorted(used.bits, key=lambda x: 99 if x is None else x):
            snap.legend.append((bits_color(b), "unquantized (32 bits)" if b is None
                                else f"{b} bits", ""))
    else:
        for cat in sorted(used.ops):
            color = _QUANT_COLOR if cat == "quantizer" else (
                _OP_CATEGORIES[cat][0] if cat in _OP_CATEGORIES else "#ffffff")
            snap.legend.append((color, cat, ""))


def _snapshot(gm: torch.fx.GraphModule, color_by: ColorBy, params: bool,
              buffers: bool = False) -> _Snapshot:
    """What a drawing of ``gm`` shows: visible nodes (labels, fills, clusters) and a legend."""
    if color_by not in COLOR_BY:
        raise InputError(f"color_by must be one of {COLOR_BY}, got {color_by!r}")
    snap = _Snapshot()
    groups = {g.id: g for g in meta.get_groups(gm)}
    sides = _param_sides(groups)
    bits = _layer_bits(gm) if color_by == "quant" else {}
    visible, cluster_paths = _visible_nodes(gm, snap, params, buffers)
    used = _Used()
    for node in visible:
        snap.nodes[node.name] = _draw_node(gm, node, color_by, groups, sides, bits,
                                           cluster_paths, used)
    _legend(snap, color_by, groups, used)
    return snap


def _relative_signature(node: torch.fx.Node, block: str) -> str:
    op = _op_name(node) if node.op != "get_attr" else "param"
    if node.op == "call_module":  # per-block submodules: geta_quant.h_0_attn_... ~ h_1_...
        op = re.sub(r"\d+", "#", op)
    target = str(node.target) if node.op == "get_attr" else ""
    if block and target.startswith(block + "."):
        target = target[len(block):]
    return f"{node.op}:{op}:{target}"


# ------------------------------------------------------------------------------ emit
_BLOCK = re.compile(r"^(?P<parent>.*\.)?(?P<index>\d+)$")


def _collapse(snap: _Snapshot) -> dict[str, str]:
    """node name -> summary-node name for nodes hidden in repeated sibling blocks."""
    members: dict[str, list[str]] = {}
    for node in snap.nodes.values():
        for path in node.cluster:
            members.setdefault(path, []).append(node.name)
    # candidate blocks: paths ending in an integer, grouped by parent and type
    siblings: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for path in members:
        m = _BLOCK.match(path)
        if m is None:
            continue
        typ = snap.clusters.get(path, "").rpartition(": ")[2]
        siblings.setdefault((m.group("parent") or "", typ), []).append((int(m.group("index")),
                                                                        path))
    hidden: dict[str, str] = {}
    # outer blocks first: blocks nested in a collapsed block vanish with it
    for key in sorted(siblings, key=lambda k: (k[0].count("."), k)):
        typ = key[1]
        blocks = sorted(siblings[key])
        if len(blocks) < 2 or all(n in hidden for n in members[blocks[0][1]]):
            continue

        def sig(path: str) -> tuple[tuple[str, str], ...]:
            return tuple((snap.nodes[n].signature,
                          snap.nodes[n].cluster[-1].replace(path, "#", 1))
                         for n in members[path])

        def flush(run: list[str], head: str) -> None:
            if not run:
                return
            name = f"collapsed__{re.sub(r'[^0-9A-Za-z_]', '_', run[0])}"
            outer = snap.nodes[members[run[0]][0]].cluster
            label = f"{run[0]} .. {run[-1]}" if len(run) > 1 else run[0]
            snap.nodes[name] = _DNode(
                name, [label, f"{len(run)} x {typ}, same graph as {head}"],
                {"shape": "box3d", "style": "filled", "fillcolor": "#f0f0f0"},
                outer[:outer.index(run[0])], [],
                f"{len(run)} repeated blocks drawn as one: " + ", ".join(run), "collapsed")
            for p in run:
                for n in members[p]:
                    hidden[n] = name

        # a run of consecutive blocks whose ops, params and shapes repeat the block before
        # the run (its head, drawn in full) becomes one node
        head, head_sig, run = "", None, []
        for _, path in blocks:
            if any(n in hidden for n in members[path]):
                continue
            s_ = sig(path)
            if s_ == head_sig:
                run.append(path)
                continue
            flush(run, head)
            head, head_sig, run = path, s_, []
        flush(run, head)
    return hidden


def _node_line(n: _DNode, indent: str, created: set[str], erased: set[str]) -> str:
    attrs = dict(n.attrs)
    text = list(n.lines)
    if n.name in created:
        attrs.update(fillcolor=CREATED_FILL, color=CREATED_BORDER, penwidth="2.5",
                     style="filled,bold")
        text.append("+ created by this pass")
    elif n.name in erased:
        attrs.update(fillcolor=ERASED_FILL, color="#9e9e9e", fontcolor="#757575",
                     style="filled,dashed")
        text.append("- erased by this pass")
    attrs["label"] = "\n".join(text)
    attrs["tooltip"] = n.tooltip
    body = ", ".join(f"{k}={_q(v)}" for k, v in attrs.items())
    return f"{indent}{_q(n.name)} [{body}];"


def _cluster_lines(snap: _Snapshot, drawn: list[_DNode], cluster: bool | str,
                   node_line: Any) -> list[str]:
    """Nodes inside dashed boxes per module (``cluster="all"``: every module; else containers
    only); boxes holding a single node (nested ones included) are drawn flat."""
    lines: list[str] = []
    order: dict[str, int] = {}
    for i, n in enumerate(drawn):
        for p in n.cluster:
            order.setdefault(p, i)
    if cluster == "all":
        boxed = set(order)
    else:  # container modules only: a leaf module's nodes sit in its parent's box
        boxed = {p for p in order if any(q.startswith(p + ".") for q in order)}
    tree: dict[tuple[str, ...], list[_DNode]] = {}
    for n in drawn:
        tree.setdefault(tuple(p for p in n.cluster if p in boxed), []).append(n)
    counts: dict[tuple[str, ...], int] = {}
    for key, ns in tree.items():
        for i in range(1, len(key) + 1):
            counts[key[:i]] = counts.get(key[:i], 0) + len(ns)
    paths = sorted({key[:i] for key in tree for i in range(1, len(key) + 1)},
                   key=lambda k: (order[k[-1]], len(k)))

    def emit_cluster(prefix: tuple[str, ...], depth: int) -> None:
        indent = "  " * (depth + 1)
        for n in tree.get(prefix, []):
            lines.append(node_line(n, indent))
        children = [p for p in paths if len(p) == len(prefix) + 1 and p[:-1] == prefix]
        for child in children:
            if counts.get(child, 0) > 1:
                cid = re.sub(r"[^0-9A-Za-z_]", "_", child[-1])
                lines.append(f"{indent}subgraph cluster_{cid}_{len(child)} {{")
                label = snap.clusters.get(child[-1], child[-1])
                lines.append(f'{indent}  graph [label={_q(label)}, style="rounded,dashed", '
                             f'color="#9e9e9e", fontsize=9, labeljust=l];')
                emit_cluster(child, depth + 1)
                lines.append(f"{indent}}}")
            else:
                emit_cluster(child, depth)

    emit_cluster((), 0)
    return lines


def _edge_lines(snap: _Snapshot, hidden: dict[str, str], erased: set[str]) -> list[str]:
    edges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for n in snap.nodes.values():
        dst = hidden.get(n.name, n.name)
        for src in n.inputs:
            if src not in snap.nodes:
                continue
            s = hidden.get(src, src)
            if s == dst or (s, dst) in seen:
                continue
            seen.add((s, dst))
            edges.append((s, dst))
    dashed = ' [style=dashed, color="#9e9e9e"]'
    return [f"  {_q(s)} -> {_q(d)}{dashed if s in erased or d in erased else ''};"
            for s, d in edges]


def _legend_line(snap: _Snapshot) -> str:
    rows = "".join(
        f'<tr><td bgcolor="{fill}"{_border(border)}>&nbsp;&nbsp;&nbsp;</td>'
        f'<td align="left">{html.escape(text)}</td></tr>'
        for fill, text, border in snap.legend)
    return (f'  legend__ [shape=plaintext, label=<<table border="0" cellborder="1" '
            f'cellspacing="0" cellpadding="3"><tr><td colspan="2"><b>legend</b></td>'
            f'</tr>{rows}</table>>];')


def _emit(snap: _Snapshot, *, created: Iterable[str] = (), erased: Iterable[str] = (),
          cluster: bool | str = True, collapse: bool = False, legend: bool = True,
          title: str | None = None, rankdir: str = "TB") -> str:
    """The dot text of a snapshot (created nodes yellow, erased grey-dashed)."""
    created, erased = set(created), set(erased)
    hidden = _collapse(snap) if collapse else {}
    title_attr = f", label={_q(title)}, labelloc=t" if title else ""
    lines = ["digraph G {",
             f'  graph [rankdir={rankdir}, fontname="Helvetica", fontsize=11, ranksep=0.3, '
             f'nodesep=0.2, newrank=true{title_attr}];',
             '  node [fontname="Helvetica", fontsize=10, margin="0.08,0.03", height=0.3];',
             '  edge [arrowsize=0.6, color="#555555"];']

    def node_line(n: _DNode, indent: str) -> str:
        return _node_line(n, indent, created, erased)

    drawn = [n for n in snap.nodes.values() if n.name not in hidden]
    if cluster:
        lines += _cluster_lines(snap, drawn, cluster, node_line)
    else:
        lines += [node_line(n, "  ") for n in drawn]
    lines += _edge_lines(snap, hidden, erased)
    if legend and snap.legend:
        lines.append(_legend_line(snap))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _border(color: str) -> str:
    return f' color="{color}"' if color else ""


def _q(value: str) -> str:
    return f'"{_escape(str(value))}"'


# ------------------------------------------------------------------------------ public API
def _graph_module(m: Any) -> torch.fx.GraphModule:
    gm = getattr(m, "graph_module", m)
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"expected a GetaModule or torch.fx.GraphModule, got {type(m).__name__}")
    from geta_fx.distributed import flat_graph_module

    return flat_graph_module(gm)


def to_dot(m: Any, color_by: ColorBy = "group", *, params: bool = True, buffers: bool = False,
           cluster: bool | str = True, collapse: bool = False, legend: bool = True,
           created: Iterable[str] = (),
           erased: Iterable[str] = (), title: str | None = None, rankdir: str = "TB") -> str:
    """DOT text for a GetaModule or GraphModule (transformed or slim).

    Args:
        color_by: "group" (prune groups), "quant" (bit widths) or "op" (op categories).
        params: draw parameter (get_attr) nodes.
        buffers: draw buffers (BatchNorm running statistics) and their updates.
        cluster: box nodes by container-module path (``nn_module_stack``); ``"all"`` boxes
            leaf modules (each Linear/Conv) too; False draws no boxes.
        collapse: draw repeated sibling blocks after the first as one node.
        legend: add a legend node (groups, bit widths or op categories).
        created / erased: node names to highlight (yellow / grey-dashed).
        title: graph label.
    """
    snap = _snapshot(_graph_module(m), color_by, params, buffers)
    return _emit(snap, created=created, erased=erased, cluster=cluster, collapse=collapse,
                 legend=legend, title=title, rankdir=rankdir)


def dot_binary() -> str | None:
    """Path of Graphviz's ``dot`` program, or None."""
    return shutil.which("dot")


def render(dot_text: str, fmt: str) -> bytes:
    """Render DOT text with Graphviz (``graphviz`` package, else the ``dot`` program)."""
    if dot_binary() is None:
        raise VizError(f"rendering {fmt.upper()} needs Graphviz's 'dot' program "
                       "(Debian/Ubuntu: apt-get install graphviz); write a .dot file instead")
    if _graphviz is not None:
        try:
            return _graphviz.Source(dot_text).pipe(format=fmt, engine="dot")
        except Exception as e:  # noqa: BLE001 - re-raised with the cause named
            raise VizError(f"graphviz could not render {fmt}: {type(e).__name__}: {e}") from e
    proc = subprocess.run([dot_binary() or "dot", f"-T{fmt}"], input=dot_text.encode(),
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise VizError(f"dot -T{fmt} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _write(path: Path, dot_text: str) -> Path:
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _DOT_SUFFIXES:
        path.write_text(dot_text)
    elif suffix in _SUFFIX_FORMATS:
        path.write_bytes(render(dot_text, _SUFFIX_FORMATS[suffix]))
    else:
        known = sorted(_DOT_SUFFIXES | set(_SUFFIX_FORMATS))
        raise InputError(f"cannot tell the drawing format from {path.name!r}; use one of "
                         f"{', '.join(known)}")
    return path


def draw(m: Any, path: str | os.PathLike[str], color_by: ColorBy = "group",
         **options: Any) -> Path:
    """Draw a GetaModule/GraphModule to ``path``: .svg, .png, .pdf (rendered) or .dot/.gv.

    ``options`` are :func:`to_dot`'s keywords (``collapse=True`` for long stacks of blocks).
    Returns the path written.
    """
    path = Path(path)
    if path.suffix.lower() not in _DOT_SUFFIXES | set(_SUFFIX_FORMATS):
        _write(path, "")  # raises the format error before any work
    return _write(path, to_dot(m, color_by, **options))


class DotDumper:
    """Pipeline observer: before/after drawings of every pass that changed the drawing.

    ``transform(..., observers=[DotDumper(dir).start(gm)])`` (``start`` records the graph
    the first pass sees).  For pass ``i`` named ``name`` that modified the graph, or whose
    metadata changed the drawing (an analysis pass that found groups), it writes
    ``{i:02d}_{name}_before.<fmt>`` (erased nodes grey-dashed) and ``_after.<fmt>``
    (created nodes yellow), and keeps ``passes.json`` listing every pass and its files.

    Args:
        out_dir: directory (created).
        color_by: as in :func:`to_dot`.
        formats: file formats per drawing: "dot" (always possible), "svg", "png", "pdf".
        options: further :func:`to_dot` keywords (``collapse``, ``params``, ...).
    """

    def __init__(self, out_dir: str | os.PathLike[str], color_by: ColorBy = "group", *,
                 formats: Sequence[str] = ("dot",), **options: Any) -> None:
        if color_by not in COLOR_BY:
            raise InputError(f"color_by must be one of {COLOR_BY}, got {color_by!r}")
        for fmt in formats:
            if fmt not in ("dot", "gv", *_SUFFIX_FORMATS.values()):
                raise InputError(f"unknown drawing format {fmt!r}")
        self.out_dir = Path(out_dir)
        self.color_by = color_by
        self.formats = tuple(formats)
        self.params = bool(options.pop("params", True))
        self.buffers = bool(options.pop("buffers", False))
        self.options = options
        self.files: list[Path] = []
        self.records: list[dict[str, Any]] = []
        self._last: _Snapshot | None = None
        self._last_plain: str | None = None

    def start(self, gm: Any) -> DotDumper:
        """Record the graph before the first pass; returns self."""
        self._last = _snapshot(_graph_module(gm), self.color_by, self.params, self.buffers)
        self._last_plain = _emit(self._last, **self.options)
        return self

    def __call__(self, index: int, pass_: Any, gm: torch.fx.GraphModule, _unused: Any = None,
                 record: meta.PassRecord | None = None, names_before: Any = None) -> None:
        if index < 0 or record is None:
            self.start(gm)
            return
        after = _snapshot(gm, self.color_by, self.params, self.buffers)
        plain = _emit(after, **self.options)
        if self._last is None:  # not started: the first pass's input is unknown
            changed = record.modified
        else:
            changed = record.modified or plain != self._last_plain
        written: list[str] = []
        if changed:
            stem = f"{index:02d}_{record.name}"
            if self._last is not None:
                before = _emit(self._last, erased=record.erased,
                               title=f"before {record.name} (erased: grey, dashed)",
                               **self.options)
                written += self._save(f"{stem}_before", before)
            after_text = _emit(after, created=record.created,
                               title=f"after {record.name} (created: yellow)", **self.options)
            written += self._save(f"{stem}_after", after_text)
        self.records.append({"index": index, "name": record.name, "modified": record.modified,
                             "drawing_changed": changed, "seconds": record.seconds,
                             "nodes_before": record.nodes_before,
                             "nodes_after": record.nodes_after,
                             "created": list(record.created), "erased": list(record.erased),
                             "files": written})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "passes.json").write_text(json.dumps(self.records, indent=2))
        self._last, self._last_plain = after, plain

    def _save(self, stem: str, dot_text: str) -> list[str]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for fmt in self.formats:
            path = self.out_dir / f"{stem}.{fmt}"
            _write(path, dot_text)
            self.files.append(path)
            names.append(path.name)
        return names


def dump_observer(dump_dir: str | os.PathLike[str] | DotDumper,
                  gm: torch.fx.GraphModule) -> DotDumper:
    """The observer behind ``transform(..., dump_dir=...)``: a DotDumper started on ``gm``.

    ``dump_dir`` is a directory (DOT files, group colouring) or a configured DotDumper.
    """
    dumper = dump_dir if isinstance(dump_dir, DotDumper) else DotDumper(dump_dir)
    return dumper.start(gm)
