"""Channel rules of recurrent layers: ``aten.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``
(``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; any number of layers, bidirectional, batch_first).

Why: their hidden units are channels like a Linear's outputs, but the op hides the layers: one
call reads every layer's weights from a flat list (per layer and direction: ``weight_ih``
``[G*H, in]``, ``weight_hh`` ``[G*H, H]``, then ``bias_ih``/``bias_hh`` ``[G*H]``, G the
gates: 4 for LSTM (i, f, g, o), 3 for GRU (r, z, n), 1 for a plain RNN).

A unit is hidden unit j: row j of every gate block of every ``weight_ih``/``weight_hh``/bias
("out" slices), column j of every ``weight_hh`` and of the next layer's ``weight_ih`` (both
directions' halves), and channel j of the output (both halves when bidirectional).  One
``hx`` tensor ``[layers*directions, B, H]`` fixes a single hidden size for the whole op, so
unit j is the same index in every layer and direction.

Zero-invariance (exact): with unit j's rows zero its gate pre-activations are 0, so
LSTM: g = tanh(0) = 0, c' = f*c + i*g = c/2 and h = o*tanh(c) stay 0 from c0 = h0 = 0;
GRU: n = tanh(0 + r*0) = 0 and h' = (1-z)*n + z*h = h/2 stays 0 from h0 = 0; RNN: tanh(0) =
relu(0) = 0.  So the initial state must be zero at pruned units: an in-graph
``zeros``/``new_zeros`` (what ``nn.LSTM`` builds when no state is passed), whose size the
rewrite shrinks to the kept count; any other initial state pins the units.  Projections
(``proj_size``: a fifth weight per layer) are pinned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from geta_fx.ir.args import arg, set_arg
from geta_fx.ir.channels import KeptChannels, Label, concrete
from geta_fx.ir.registry import channel_rule

aten = torch.ops.aten

#: Gate blocks stacked in the rows of each weight/bias.
GATES = {aten.lstm.input: 4, aten.gru.input: 3, aten.rnn_tanh.input: 1, aten.rnn_relu.input: 1}
#: In-graph initial states known to be zero.
ZERO_STATES = frozenset({aten.zeros.default, aten.new_zeros.default})


def _states(node: torch.fx.Node) -> list[Any]:
    """The initial-state operands: ``[h0, c0]`` of an LSTM, ``[h0]`` otherwise."""
    hx = arg(node, "hx")
    return list(hx) if isinstance(hx, (list, tuple)) else [hx]


def _zero_state(an: Any, node: torch.fx.Node, h: Any) -> bool:
    """``h`` is an in-graph zeros tensor read by ``node`` only (its size can be rewritten)."""
    return (isinstance(h, torch.fx.Node) and h.op == "call_function" and
            h.target in ZERO_STATES and set(h.users) == {node} and an.label(h) is None)


def _layer_params(an: Any, node: torch.fx.Node, per: int) -> list[list[Any]] | None:
    """The flat weight list as ``[layer*direction][w_ih, w_hh(, b_ih, b_hh)]`` of resolved
    parameters (None: a weight is computed, or the list has another layout)."""
    params = list(arg(node, "params"))
    dirs = 2 if arg(node, "bidirectional") else 1
    if len(params) != arg(node, "num_layers") * dirs * per:
        return None
    srcs = [an.param(p) for p in params]
    if any(s is None for s in srcs):
        return None
    return [srcs[i: i + per] for i in range(0, len(srcs), per)]


def _label_layer(an: Any, node: torch.fx.Node, layer: list[Any], gates: int,
                 atoms: np.ndarray, inp: Label | None) -> None:
    """Slice one layer-direction's weights: gate rows "out", weight_hh columns and
    weight_ih columns "in" (the latter along the layer's input label ``inp``)."""
    rows = np.tile(atoms, gates)
    w_ih, w_hh, *biases = layer
    for fqn, perm, _ in (w_ih, w_hh, *biases):
        an.label_param(fqn, perm[0], rows, "out")
    an.label_param(w_hh[0], w_hh[1][1], atoms, "in")
    if inp is None:
        an.reads_fixed_channels(w_ih[0], w_ih[1][1], node)
    else:
        an.label_param(w_ih[0], w_ih[1][1], inp.atoms, "in")


def _rewrite_state_sizes(gm: torch.fx.GraphModule, node: torch.fx.Node,
                         kept: KeptChannels) -> None:
    """The in-graph zero initial states shrink to the kept hidden size (the weights are
    sliced by physical_prune; the op reads its hidden size from them and from ``hx``)."""
    out = kept.changed(node, 1)
    if out is None:
        return
    for h in _states(node):
        sizes = list(arg(h, "size"))
        sizes[-1] = len(out[1])
        set_arg(h, "size", sizes)


@channel_rule(*GATES, rewrite=_rewrite_state_sizes)
def _rnn(an: Any, node: torch.fx.Node) -> list[Label | None] | None:
    x = arg(node, "input")
    lab = an.label(x)
    outs = node.meta.get("val")
    if lab is not None and lab.dim != len(an.shape(x)) - 1:
        return an.pin_inputs(node, f"{node.target}: input channels off the feature dim")
    per = 4 if arg(node, "has_biases") else 2
    layers = _layer_params(an, node, per)
    if layers is None or not isinstance(outs, (list, tuple)):
        return an.pin_inputs(node, f"{node.target}: computed weights or projections "
                                   "(proj_size) are not supported")
    hidden = concrete(an.shape(_states(node)[0])[-1])
    atoms = an.fresh(hidden, node)
    dirs = 2 if arg(node, "bidirectional") else 1
    if lab is not None and not lab.ok:
        an.pin(lab, node, f"{node.target}: input channels are not zero when pruned")
    inp = lab
    for k, layer in enumerate(layers):
        _label_layer(an, node, layer, GATES[node.target], atoms, inp)
        if k % dirs == dirs - 1:  # the next layer reads both directions' outputs
            inp = Label(0, np.tile(atoms, dirs))
    if not all(_zero_state(an, node, h) for h in _states(node)):
        for h in _states(node):  # the input side stays prunable: its columns see zeros
            if an.label(h) is not None:
                an.pin(an.label(h), node, f"{node.target}: a computed initial state")
        an.pin(atoms, node, f"{node.target}: the initial state is not an in-graph zeros "
                            "tensor (pruned hidden units must start at 0)")
    out = Label(len(an.shape(x)) - 1, np.tile(atoms, dirs))
    return [out] + [Label(2, atoms) for _ in outs[1:]]
