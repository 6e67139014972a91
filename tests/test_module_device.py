"""GetaModule device moves: factory ops captured with the capture device follow ``.to()``.

CPU-only runs use the ``meta`` device as the move target; the CUDA test runs where a GPU is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.module import move_to_device


class PosMLP(nn.Module):
    """``torch.arange(T, device=x.device)`` is captured as ``arange(..., device=cpu)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.pos, self.fc2 = nn.Linear(4, 16), nn.Embedding(8, 16), nn.Linear(16, 3)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        y = self.fc2(torch.relu(self.fc1(x) + self.pos(pos)))
        return self.bn(y * torch.ones(y.shape, device=x.device))  # a second factory op


def _graph_devices(gm: torch.fx.GraphModule) -> list[torch.device]:
    return [torch.device(n.kwargs["device"]) for n in gm.graph.nodes if "device" in n.kwargs]


def _make() -> tuple[geta_fx.GetaModule, torch.Tensor]:
    x = torch.randn(2, 5, 4)
    return geta_fx.transform(PosMLP().eval(), (x,)), x


def test_to_meta_retargets_factory_ops() -> None:
    gm, x = _make()
    assert _graph_devices(gm.graph_module) == [torch.device("cpu")] * 2
    assert gm.to("meta") is gm
    assert _graph_devices(gm.graph_module) == [torch.device("meta")] * 2
    assert "device(type='meta')" in gm.graph_module.code
    assert {p.device.type for p in gm.parameters()} == {"meta"}
    y = gm(x.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 3)
    vals = [n.meta["val"] for n in gm.graph_module.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)]
    assert vals and all(v.device.type == "meta" for v in vals)


def test_dtype_conversion_keeps_devices() -> None:
    gm, x = _make()
    code = gm.graph_module.code
    gm.to(torch.float64)
    assert gm.graph_module.fc1.weight.dtype == torch.float64
    assert _graph_devices(gm.graph_module) == [torch.device("cpu")] * 2
    assert gm.graph_module.code == code
    assert gm(x.double()).dtype == torch.float64


def test_constant_tensors_follow_the_move() -> None:
    class WithConst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.tensor([1.0, 2.0, 3.0])  # a lifted plain-tensor constant

    x = torch.randn(2, 3)
    gm = geta_fx.transform(WithConst().eval(), (x,))
    consts = [n.target for n in gm.graph_module.graph.nodes if n.op == "get_attr"
              and n.target not in dict(gm.graph_module.named_parameters())]
    gm.to("meta")
    assert gm(x.to("meta")).device.type == "meta"
    for name in consts:
        assert getattr(gm.graph_module, name).device.type == "meta"


def test_split_devices_leave_graph_alone() -> None:
    gm, _ = _make()
    code = gm.graph_module.code
    # parameters to meta, buffers (bn running stats) stay on cpu: two devices, no retarget
    gm._apply(lambda t: t.to("meta") if isinstance(t, nn.Parameter) else t)
    assert {p.device.type for p in gm.parameters()} == {"meta"}
    assert {b.device.type for b in gm.buffers()} == {"cpu"}
    assert _graph_devices(gm.graph_module) == [torch.device("cpu")] * 2
    assert gm.graph_module.code == code
    # a single buffer moved by hand, then a dtype conversion: still untouched
    gm2, _ = _make()
    gm2.graph_module.bn.running_mean = gm2.graph_module.bn.running_mean.to("meta")
    gm2.to(torch.float64)
    assert _graph_devices(gm2.graph_module) == [torch.device("cpu")] * 2


def test_no_parameters_is_a_no_op() -> None:
    class Free(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.arange(x.shape[-1], device=x.device)

    x = torch.randn(2, 4)
    gm = geta_fx.transform(Free(), (x,))
    gm.to("meta")
    assert _graph_devices(gm.graph_module) == [torch.device("cpu")]


def test_move_to_device_on_the_slim_graph() -> None:
    gm, x = _make()
    (g,) = [g for g in gm.groups if g.prunable]
    gm.zero_units(g.id, [0, 3, 7])
    slim = gm.compress()
    assert slim.fc1.weight.shape[0] == 13
    ref = slim(x)
    torch.testing.assert_close(ref, gm(x))
    slim.to("meta")  # a plain GraphModule moves its parameters but not the graph
    assert _graph_devices(slim) == [torch.device("cpu")] * 2
    assert geta_fx.move_to_device is move_to_device
    assert move_to_device(slim, "meta") is slim
    assert _graph_devices(slim) == [torch.device("meta")] * 2
    y = slim(x.to("meta"))
    assert y.device.type == "meta" and y.shape == ref.shape
    with pytest.raises(geta_fx.InputError, match="use gm.to"):
        move_to_device(gm, "meta")  # type: ignore[arg-type]


def test_compress_after_move_keeps_the_device() -> None:
    gm, x = _make()
    gm.to("meta")
    num_units = sum(g.num_units for g in gm.groups)
    slim = gm.compress(np.zeros(num_units, dtype=bool))  # meta has no data to find zeros in
    assert {p.device.type for p in slim.parameters()} == {"meta"}
    assert _graph_devices(slim) == [torch.device("meta")] * 2
    assert slim(x.to("meta")).shape == (2, 5, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_matches_cpu() -> None:
    gm, x = _make()
    ref = gm(x)
    gm.cuda()
    torch.testing.assert_close(gm(x.cuda()).cpu(), ref, atol=1e-5, rtol=1e-4)
    slim = gm.compress()
    torch.testing.assert_close(slim(x.cuda()).cpu(), ref, atol=1e-5, rtol=1e-4)
    move_to_device(slim, "cpu")
    torch.testing.assert_close(slim(x), ref, atol=1e-5, rtol=1e-4)
    gm.cpu()
    torch.testing.assert_close(gm(x), ref)
