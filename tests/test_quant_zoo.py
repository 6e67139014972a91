"""QADG invariance with quantizers (issue #3 item 5), on the whole zoo.

    transform(m)                       -> groups G0
    transform(m, quantize="weight_act") -> groups G1      assert G1 == G0
    set every quantizer to 4-6 bits, zero units, compress -> exact (Q(0) = 0)
"""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err, num_params, zero_random_units
from zoo import ZOO

import geta_fx


def _signature(gm: geta_fx.GetaModule) -> list:
    return [(g.num_units, g.prunable,
             sorted((m.fqn, m.dim, m.role, tuple(m.indices.tolist()), tuple(m.units.tolist()))
                    for m in g.members)) for g in gm.groups]


#: the transformers models of the zoo take ~3.5 s each here: they run with the slow tests
_SLOW = {"hf_gpt2", "hf_llama_gqa"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in sorted(ZOO)])
def test_quantized_zoo_same_groups_and_exact_compress(name: str) -> None:
    model, inputs = ZOO[name]()
    plain = geta_fx.transform(model, inputs)
    gm = geta_fx.transform(model, inputs, quantize="weight_act")
    assert _signature(gm) == _signature(plain)
    # 16-bit init: close to the float model.
    assert max_rel_err(model(*inputs), gm(*inputs)) < 1e-3
    qs = gm.quantizers
    assert any(q.kind == "weight" for q in qs.values())
    assert any(q.kind == "act" for q in qs.values())
    for q in qs.values():
        q.set_bit_width(4.0 if q.kind == "weight" else 6.0)
    zero_random_units(gm, 0.5)
    zeroed = gm(*inputs)
    slim = gm.compress()
    assert max_rel_err(zeroed, slim(*inputs)) <= 1e-4
    assert num_params(slim) < num_params(gm)
    # the slim graph keeps every trained quantizer, and re-exports with geta::quantize
    slim_qs = {n: m for n, m in slim.named_modules() if getattr(m, "is_geta_quantizer", False)}
    assert set(slim_qs) == set(qs)
    for n, q in slim_qs.items():
        assert torch.equal(q.log_d, qs[n].log_d)
    ep = torch.export.export(slim, inputs)
    assert any(node.target is torch.ops.geta.quantize.default for node in ep.graph.nodes)
