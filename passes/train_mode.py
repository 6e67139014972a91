"""train_mode: set the train/eval flags torch.export baked into the graph.

An exported graph captures one mode: ``dropout(x, p, train)`` and ``batch_norm(..., training,
...)`` carry it as a literal argument.  ``ExportedProgram.module()`` forbids ``.train()``; PT2E
rewrites the flags instead (``move_exported_model_to_eval``), and so does this pass, for
``SetTrainingMode(training=True|False)``, in the graph and every nested graph (branches of
``torch.cond``).  ``GetaModule.train()/eval()``, ``compress`` and ``lower`` run it.

Invariant after it: every train flag in the graph is ``training`` (fact ``train_flags``: the
flags agree).  Honest ``modified``; idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from geta_fx.pipeline import PassResult

aten = torch.ops.aten

#: Ops whose literal train flag export bakes in, and that argument's name in the schema.
TRAIN_FLAGS: dict[torch._ops.OpOverload, str] = {
    aten.dropout.default: "train",
    aten.feature_dropout.default: "train",
    aten.alpha_dropout.default: "train",
    aten.feature_alpha_dropout.default: "train",
    aten.native_dropout.default: "train",
    aten.batch_norm.default: "training",
    # recurrent layers: dropout between layers (nn.LSTM/GRU/RNN ``dropout=``)
    aten.lstm.input: "train", aten.gru.input: "train", aten.rnn_tanh.input: "train",
    aten.rnn_relu.input: "train",
}


def _flag_index(op: torch._ops.OpOverload) -> int:
    names = [a.name for a in op._schema.arguments]
    return names.index(TRAIN_FLAGS[op])


_INDEX = {op: _flag_index(op) for op in TRAIN_FLAGS}


def _flag_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.GraphModule, torch.fx.Node,
                                                         int]]:
    found = []
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            idx = _INDEX.get(node.target) if node.op == "call_function" else None
            if idx is not None and len(node.args) > idx:
                found.append((sub, node, idx))
    return found


def graph_modes(gm: torch.fx.GraphModule) -> dict[bool, int]:
    """How many train flags of ``gm`` (nested graphs included) say True / False."""
    modes: dict[bool, int] = {}
    for _, node, idx in _flag_nodes(gm):
        flag = bool(node.args[idx])
        modes[flag] = modes.get(flag, 0) + 1
    return modes


def graph_is_training(gm: torch.fx.GraphModule) -> bool:
    """Whether any baked-in train flag of ``gm`` is True."""
    return graph_modes(gm).get(True, 0) > 0


@dataclass(frozen=True)
class SetTrainingMode:
    training: bool
    name: ClassVar[str] = "train_mode"
    requires: ClassVar[frozenset[str]] = frozenset({"graph"})
    provides: ClassVar[frozenset[str]] = frozenset({"train_flags"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        changed: set[torch.fx.GraphModule] = set()
        for sub, node, idx in _flag_nodes(gm):
            if node.args[idx] is not self.training:
                node.update_arg(idx, self.training)
                changed.add(sub)
        for sub in changed:
            if sub is not gm:  # the Pipeline recompiles gm itself
                sub.recompile()
        return PassResult(gm, bool(changed))
