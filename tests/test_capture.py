"""capture: export by default, symbolic_trace on request; the model is never touched;
bad input fails early with a clear error."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err, zero_random_units
from torch import nn
from zoo import ZOO, ResNetCifar

import geta_fx


def test_capture_shares_weights_and_keeps_mode() -> None:
    model = ResNetCifar().train()
    x = torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = geta_fx.capture(model, (x,))
    assert model.training
    ptrs = {p.data_ptr() for p in cap.graph_module.parameters()}
    assert ptrs == {p.data_ptr() for p in model.parameters()}  # no weight copies
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_dynamic_batch_and_pytree_outputs() -> None:
    model, inputs = ZOO["multi_io"]()
    gm = geta_fx.transform(model, inputs)
    x, y = torch.randn(5, 3, 8, 8), torch.randn(5, 1, 8, 8)
    out = gm(x, y)
    assert isinstance(out, dict) and isinstance(out["aux"], tuple)
    assert max_rel_err(model(x, y), out) == 0.0


def test_hf_model_output_type_is_preserved() -> None:
    model, inputs = ZOO["hf_bert"]()
    gm = geta_fx.transform(model, inputs)
    assert type(gm(*inputs)) is type(model(*inputs))


def test_symbolic_trace_path_groups_and_compress() -> None:
    model, inputs = ZOO["resnet20"]()
    gm = geta_fx.transform(model, inputs, capture_method="symbolic_trace")
    assert sum(g.num_units for g in gm.groups if g.prunable) == 448
    assert max_rel_err(model(*inputs), gm(*inputs)) == 0.0
    zero_random_units(gm)
    zeroed = gm(*inputs)
    assert max_rel_err(zeroed, gm.compress()(*inputs)) <= 1e-4


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_uncapturable_model_names_construct_and_options() -> None:
    with pytest.raises(geta_fx.CaptureError) as info:
        geta_fx.transform(DataDependent(), (torch.randn(3),))
    msg = str(info.value)
    assert "data-dependent" in msg and "symbolic_trace" in msg and "strict" in msg
    assert "x.sum() > 0" in msg  # the user's line


def test_wrong_example_inputs() -> None:
    model = ZOO["mlp"]()[0]
    with pytest.raises(geta_fx.InputError, match="too many positional"):
        geta_fx.transform(model, (torch.randn(4, 12), torch.randn(3)))
    with pytest.raises(geta_fx.InputError, match="do not fit MLP"):
        geta_fx.transform(model, (torch.randn(4, 13),))
    with pytest.raises(geta_fx.InputError, match="NaN"):
        geta_fx.transform(model, (torch.full((4, 12), float("nan")),))
    with pytest.raises(geta_fx.InputError, match="nn.Module"):
        geta_fx.transform(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]
    with pytest.raises(geta_fx.InputError, match="capture method"):
        geta_fx.capture(model, (torch.randn(4, 12),), method="jit")  # type: ignore[arg-type]
    assert issubclass(geta_fx.InputError, geta_fx.GetaFxError)


def test_unknown_op_is_unprunable_with_reason() -> None:
    class WithPReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.p, self.c2 = nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.p(self.c(x)))

    gm = geta_fx.transform(WithPReLU(), (torch.randn(1, 3, 6, 6),))
    first = gm.groups[0]
    assert not first.prunable and "prelu" in first.reason
