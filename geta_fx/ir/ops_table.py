"""The channel rules of every op, loaded into one registry (``geta_fx.ir.registry``).

Importing this module registers every rule; ``RULES`` maps an ATen ``OpOverload`` to its
:class:`~geta_fx.ir.registry.ChannelRule`, whose ``analyze(an, node)`` receives the
analyzer of ``passes/dependency_groups.py`` (``an.label(x)``, ``an.shape(x)``,
``an.fresh(n, node)``, ``an.unify(a, b)``, ``an.pin(label, node, reason)``, ``an.param(x)``,
``an.label_param(...)``, ``an.external(...)``, ``an.from_grid(...)``) and whose
``rewrite(gm, node, kept)`` is run by ``passes/physical_prune.py``.  Ops missing from the
registry pin every channel they touch (unprunable with a reason): geta_fx is conservative,
never wrong.

Rule kinds (DESIGN §4), one module each: pointwise ops keep or unify channels
(``rules_pointwise``: activations, dropout, copies, add/mul/... with broadcasting); stems
open a channel space and norms keep it (``rules_layers``: conv, linear, matmul/addmm with a
parameter, embedding, batch/group/layer norms); index-moving ops carry it
(``rules_shape``: view/reshape, permute, slice, split, cat); reductions, pooling and
attention (``rules_reduce``) carry it or pin it when they reduce over it; recurrent layers
(``rules_rnn``: LSTM/GRU/RNN) open one space of hidden units; einsum follows its subscripts
(``rules_attention``).
"""

from __future__ import annotations

from typing import Any

import torch

from geta_fx.ir import (  # noqa: F401
    rules_attention,
    rules_layers,
    rules_pointwise,
    rules_reduce,
    rules_rnn,
    rules_shape,
    rules_vision,
)
from geta_fx.ir.op_sets import ASSERTS, SHAPE_QUERIES
from geta_fx.ir.query import quantizer_of
from geta_fx.ir.registry import RULES, ChannelRule, channel_rule, rule_for

__all__ = ["IGNORED", "RULES", "ChannelRule", "channel_rule", "is_geta_op", "quantizer_module",
           "rule_for"]

#: Ops that only consume shapes or have no tensor output touching channels.
IGNORED = ASSERTS | SHAPE_QUERIES


# --------------------------------------------------------------------------- geta's own


def is_geta_op(target: Any, *names: str) -> bool:
    """``target`` is one of the ``geta::<name>`` ops (checked without importing geta_fx.ops,
    which loads the kernels)."""
    return getattr(target, "namespace", None) == "geta" and \
        str(getattr(target, "__name__", "")).split(".")[0] in names


#: Kept for the callers of the old name; the one identity is ``geta_fx.ir.query.quantizer_of``.
quantizer_module = quantizer_of
