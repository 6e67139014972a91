"""Pipeline: validated order, PassRecords, errors naming the pass and what ran before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.passes import DependencyGroups, FoldQuant, Normalize, ShapeProp
from geta_fx.pipeline import PassResult, Pipeline


def _gm() -> torch.fx.GraphModule:
    return geta_fx.capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                           (torch.randn(2, 4),)).graph_module


def test_order_is_validated_before_running() -> None:
    with pytest.raises(geta_fx.PipelineOrderError, match="fold_quant requires"):
        Pipeline([ShapeProp(), FoldQuant()]).validate(frozenset({"graph"}))
    with pytest.raises(geta_fx.PipelineOrderError, match="dependency_groups requires"):
        geta_fx.transform(nn.Linear(2, 2), (torch.randn(1, 2),), pipeline=[DependencyGroups()])


def test_records_per_pass() -> None:
    gm = _gm()
    Pipeline([ShapeProp(), Normalize(), DependencyGroups()])(gm)
    log = gm.meta[meta.LOG]
    assert [r.name for r in log] == ["shape_prop", "normalize", "dependency_groups"]
    assert all(r.seconds >= 0 and r.nodes_before > 0 for r in log)
    assert log[2].modified is False
    assert "geta.group" in gm.meta[meta.FACTS]


@dataclass(frozen=True)
class Boom:
    name: ClassVar[str] = "boom"
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        raise geta_fx.NodeError(node, "cannot handle this")


def test_errors_name_pass_node_and_previous_passes() -> None:
    with pytest.raises(geta_fx.PassError) as info:
        Pipeline([ShapeProp(), Boom()])(_gm())
    msg = str(info.value)
    assert "pass 'boom' failed" in msg and "linear" in msg and "shape_prop" in msg
    assert info.value.node is not None


def test_normalize_is_idempotent_and_honest() -> None:
    gm = _gm()
    Normalize()(gm)
    gm.recompile()
    code = gm.code
    assert Normalize()(gm).modified is False
    assert gm.code == code


def test_passes_run_standalone() -> None:
    gm = _gm()
    assert DependencyGroups()(gm).modified is False
    assert len(gm.meta[meta.GROUPS]) == 2


def test_every_provided_fact_has_a_checker() -> None:
    from geta_fx import passes

    provided = set()
    for name in passes.__all__:
        provided |= set(getattr(getattr(passes, name), "provides", ()))
    assert provided and provided <= set(meta.FACT_CHECKS), provided - set(meta.FACT_CHECKS)
    with pytest.raises(ValueError, match="already has a checker"):
        meta.fact_check("val")(lambda gm: None)


def test_required_fact_is_derived_from_the_graph_when_it_holds() -> None:
    """A slim quantized graph whose recorded facts lack 'geta.quantizer' still lowers (its
    quantizer nodes are the evidence); a graph without quantizers does not."""
    from geta_fx.passes import LowerQuant

    x = torch.randn(2, 4)
    slim = geta_fx.transform(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(),
                             (x,), quantize="weight").compress()
    slim.meta[meta.FACTS] = frozenset({"graph"})
    low = Pipeline([LowerQuant()])(slim).graph_module
    assert "geta.lowbit" in low.meta[meta.FACTS]
    plain = geta_fx.transform(nn.Linear(4, 2).eval(), (x,)).compress()
    with pytest.raises(geta_fx.PipelineOrderError, match="lower_quant requires"):
        Pipeline([LowerQuant()])(plain)


def test_compress_is_a_pipeline_and_logged() -> None:
    gm = geta_fx.transform(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(),
                           (torch.randn(2, 4),))
    slim = gm.compress()
    assert [r.name for r in slim.meta[meta.LOG]][-1] == "physical_prune"
    assert "slim" in slim.meta[meta.FACTS] and "geta.group" not in slim.meta[meta.FACTS]
