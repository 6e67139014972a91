"""The op registry (geta_fx.ir.registry) and the op sets (geta_fx.ir.op_sets).

    channel_rule(aten.conv2d.default, rewrite=...)(analyze)  ->  RULES[op] = ChannelRule
    a string / packet / lambda / second registration          ->  RegistryError
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers import max_rel_err
from torch import nn

import geta_fx
from geta_fx.ir import op_sets, ops_table
from geta_fx.ir.args import arg, has_arg, set_arg
from geta_fx.ir.registry import PYTHON_TARGETS, RULES, ChannelRule, RegistryError, channel_rule
from geta_fx.ir.rules_reduce import _reduce_dims

aten = torch.ops.aten


def _resolve(op: torch._ops.OpOverload) -> object:
    """Look ``op`` up again by its qualified name (``aten::conv2d`` + ``default``)."""
    ns, name = op._schema.name.split("::")
    return getattr(getattr(getattr(torch.ops, ns), name), op._overloadname)


def test_every_registered_op_resolves_to_a_real_overload() -> None:
    assert len(RULES) > 200 and RULES is ops_table.RULES
    for op, rule in RULES.items():
        assert rule.op is op
        if op in PYTHON_TARGETS:
            continue
        assert isinstance(op, torch._ops.OpOverload), op
        assert _resolve(op) is op


def test_every_rule_has_both_halves_or_says_why_not() -> None:
    rewrites = set()
    for op, rule in RULES.items():
        assert callable(rule.analyze), op
        if rule.rewrite is None:
            assert isinstance(rule.no_rewrite, str) and len(rule.no_rewrite) > 10, op
        else:
            assert rule.no_rewrite is None, op
            rewrites.add(rule.rewrite.__name__)
    # physical_prune's rewrites all live on rules now
    assert rewrites == {"_rewrite_sizes", "_rewrite_unflatten", "_rewrite_split",
                        "_rewrite_slice", "_rewrite_narrow", "_rewrite_select",
                        "_rewrite_num_groups", "_rewrite_conv_groups", "keep_original_count",
                        "_rewrite_state_sizes"}
    assert RULES[aten.mean.dim].rewrite is RULES[aten.layer_norm.default].rewrite
    assert RULES[aten.relu.default].rewrite is None


def test_rule_needs_exactly_one_of_rewrite_and_reason() -> None:
    def analyze(an: object, node: torch.fx.Node) -> None:
        return None

    with pytest.raises(RegistryError, match="either a rewrite"):
        ChannelRule(aten.relu.default, analyze)
    with pytest.raises(RegistryError, match="either a rewrite"):
        ChannelRule(aten.relu.default, analyze, rewrite=lambda gm, n, k: None, no_rewrite="x")


@pytest.mark.parametrize("target", ["linear", aten.linear, len, lambda x: x],
                         ids=["string", "packet", "builtin", "lambda"])
def test_unknown_target_raises(target: object) -> None:
    with pytest.raises(RegistryError, match="not an OpOverload"):
        channel_rule(target, no_rewrite="test")
    assert target not in RULES


def test_duplicate_registration_raises_and_keeps_the_first() -> None:
    first = RULES[aten.conv2d.default]
    with pytest.raises(RegistryError, match="duplicate registration for aten.conv2d.default"):
        channel_rule(aten.conv2d.default, no_rewrite="test")(lambda an, node: None)
    with pytest.raises(RegistryError, match="duplicate"):  # nothing registered on failure
        channel_rule(aten.lgamma.default, aten.linear.default, no_rewrite="t")(
            lambda an, node: None)
    assert RULES[aten.conv2d.default] is first and aten.lgamma.default not in RULES


def test_op_sets_hold_real_overloads_and_compose() -> None:
    sets = {k: v for k, v in vars(op_sets).items() if isinstance(v, frozenset)}
    assert {"ASSERTS", "VIEWS", "NON_NEGATIVE", "KEEPS_SIGN", "ELEMENTWISE", "INPLACE",
            "COPIES", "CONVS"} <= set(sets)
    for name, ops in sets.items():
        assert ops, name
        for op in ops:
            assert isinstance(op, torch._ops.OpOverload) and _resolve(op) is op, (name, op)
    # in-place variants are never in a value category: they resolve to their sibling's rule
    assert not op_sets.INPLACE & (op_sets.ZERO_PRESERVING | op_sets.ELEMENTWISE)
    assert {op_sets.out_of_place(op) for op in op_sets.INPLACE} <= \
        op_sets.ZERO_PRESERVING | op_sets.NOT_ZERO_PRESERVING | op_sets.ELEMENTWISE
    assert aten.relu_.default in op_sets.INPLACE and aten.relu.default not in op_sets.INPLACE
    assert op_sets.ADDS | op_sets.MULS <= op_sets.ELEMENTWISE
    assert ops_table.IGNORED == op_sets.ASSERTS | op_sets.SHAPE_QUERIES
    for op, stem in op_sets.STEMS.items():  # stem argument names exist in the schemas
        for name in (stem.data, stem.weight, stem.bias):
            assert name is None or has_arg(op, name), (op, name)


def test_an_op_that_does_not_exist_fails_at_attribute_access() -> None:
    # The old table kept a "fill_" rule that resolved to nothing and was dropped silently.
    with pytest.raises(AttributeError):
        _ = aten.fill_.default
    assert not any(getattr(op, "__name__", "").startswith("fill_") for op in RULES)
    assert operator.getitem in RULES


def _call(target: object, *args: object, **kwargs: object) -> torch.fx.Node:
    g = torch.fx.Graph()
    xs = [g.placeholder(f"x{i}") if a is None else a for i, a in enumerate(args)]
    return g.call_function(target, tuple(xs), kwargs)


def test_arg_reads_by_schema_name_and_rejects_unknown_names() -> None:
    conv = _call(aten.conv2d.default, None, None, None, [1, 1], [0, 0], [1, 1], 2)
    assert arg(conv, "groups") == 2 and arg(conv, "stride") == [1, 1]
    kw = _call(aten.conv2d.default, None, None, groups=3)
    assert arg(kw, "groups", 1) == 3 and arg(kw, "bias") is None
    with pytest.raises(KeyError, match="no argument 'group'"):
        arg(kw, "group")
    # kwarg-only arguments are never read positionally
    var = _call(aten.var.correction, None, [1], keepdim=True)
    assert arg(var, "keepdim", False) is True and arg(var, "correction") is None


def test_set_arg_fills_schema_defaults_for_a_positional_slot() -> None:
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    g = torch.fx.Graph()
    xs, ws = g.placeholder("x"), g.placeholder("w")
    conv = g.call_function(aten.conv2d.default, (xs, ws), {"padding": [1, 1], "groups": 2})
    g.output(conv)
    set_arg(conv, "groups", 2, positional=True)
    assert len(conv.args) == 7 and conv.args[4] == [1, 1] and conv.kwargs == {}
    gm = torch.fx.GraphModule(nn.Module(), g)
    torch.testing.assert_close(gm(x, w), F.conv2d(x, w, padding=1, groups=2))
    sl = _call(aten.slice.Tensor, None, 1)
    set_arg(sl, "start", 0)
    set_arg(sl, "end", 3)
    assert sl.args[1:] == (1, 0, 3) and sl.kwargs == {}


def test_reductions_read_keepdim_and_dims_by_name() -> None:
    # var.dim(self, dim, unbiased=True, keepdim=False): positions 2 and 3 differ from sum's
    assert _reduce_dims(_call(aten.var.dim, None, [2], True), 4) == ([2], False)
    assert _reduce_dims(_call(aten.var.dim, None, [2], True, True), 4) == ([2], True)
    # norm.ScalarOpt_dim(self, p, dim, keepdim): the dims are the third argument
    assert _reduce_dims(_call(aten.norm.ScalarOpt_dim, None, 2, [3]), 4) == ([3], False)
    assert _reduce_dims(_call(aten.sum.default, None), 3) == ([0, 1, 2], False)


class TensorSplit(nn.Module):
    """conv(8) -> tensor_split(2, dim=1) -> (b(p) + c(q)): split sizes become the kept ones"""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.tensor_split(self.a(x), 2, dim=1)
        return self.b(p) + self.c(q)


def test_tensor_split_along_pruned_channels_compresses_exactly() -> None:
    x = torch.randn(2, 3, 4, 4)
    gm = geta_fx.transform(TensorSplit().eval(), (x,))
    (group,) = [g for g in gm.groups if g.prunable]
    assert group.num_units == 8
    gm.zero_units(group.id, [0, 1, 2])  # 1 of p's 4 channels left, all 4 of q's
    slim = gm.compress()
    assert max_rel_err(gm(x), slim(x)) <= 1e-5
    assert slim.b.weight.shape[1] == 1 and slim.c.weight.shape[1] == 4
