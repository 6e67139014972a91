"""geta_fx.save(m, "x.onnx"): slim and lowered models (weight and activation quantizers,
packed low-bit weights) run in ONNX Runtime with the torch graph's outputs, at other sizes.

Low-bit weights: <= 4 bits are INT4/UINT4 initializers feeding DequantizeLinear, whose output
is bit for bit the torch graph's dequantized weight (checked by running the DequantizeLinear
nodes in ONNX Runtime); 5-8 bits are INT8 (UINT8 unsigned); ``MatMulNBits`` (opt-in) where it
applies.  Model outputs are compared within float32 summation-order rounding (ORT's Gemm/Conv/
MatMulNBits add in another order than torch): ``rtol=1e-5`` plus ``1e-6`` of the output scale.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import geta_fx

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install "
                          "'geta_fx[deploy]')")
pytest.importorskip("onnxscript", reason="onnxscript not installed")
onnx = pytest.importorskip("onnx", reason="onnx not installed")

from geta_fx.export_onnx import save_onnx  # noqa: E402
from geta_fx.ops.lowbit import lowbit_linear, pack_levels  # noqa: E402

LOWBIT = (torch.ops.geta.unpack_weight.default, torch.ops.geta.lowbit_linear.default)


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                      nn.Linear(16, 4)).eval()
    return m, torch.randn(2, 3, 16, 16)


def _mixed_model() -> tuple[nn.Module, torch.Tensor]:
    """Conv (W3), Linear K=8 (W4: K not a multiple of 16), Linear K=32 (W8), K=16 (W4)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                      nn.Linear(16, 4)).eval()
    return m, torch.randn(2, 3, 12, 12)


def _lowered(model: nn.Module, x: torch.Tensor, bits: list[float]) -> torch.fx.GraphModule:
    gm = geta_fx.transform(model, (x,), quantize="weight")
    for q, b in zip(gm.quantizers.values(), bits, strict=True):
        q.set_bit_width(b)
    gm.eval()
    return geta_fx.lower(gm.compress(), reference=gm)


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def _packed_weights(gm: torch.fx.GraphModule) -> dict[str, dict[str, Any]]:
    """ONNX levels-initializer name -> bits, signedness and the torch dequantized weight."""
    from geta_fx.ir.query import get_attr_tensor

    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in LOWBIT:
            continue
        if n.target is LOWBIT[0]:
            packed, scale, bits, signed, shape, _ = n.args
        else:
            _, packed, scale, bits, k, signed, _ = n.args
            shape = [packed.meta["val"].shape[0], k]
        p, s = (get_attr_tensor(gm, str(a.target)) for a in (packed, scale))
        w = torch.ops.geta.unpack_weight.default(p, s, bits, signed, list(shape), torch.float32)
        out[str(packed.target).replace(".", "_")] = {"bits": bits, "signed": signed, "w": w}
    return out


def _initializer_types(path: Path) -> dict[str, int]:
    return {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}


def _dequantized_in_ort(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Levels-initializer name -> the output of its DequantizeLinear, computed by ORT."""
    model = onnx.load(str(path))
    dq = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for out in dq.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            out, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()}), strict=True))
    return {levels: got[out] for levels, out in dq.items()}


@pytest.mark.slow  # the ONNX exporter: ~3 s per model
@pytest.mark.parametrize("lowered", [False, True])
def test_slim_and_lowered_run_in_onnxruntime(tmp_path: Path, lowered: bool) -> None:
    model, x = _model()
    gm = geta_fx.transform(model, (x,), quantize="weight_act")
    for q in gm.quantizers.values():
        q.set_bit_width(4.0 if q.kind == "weight" else 6.0)
    gm.zero_units(0, [1, 3])
    gm.eval()
    slim = gm.compress(lower=lowered)
    path = tmp_path / "m.onnx"
    geta_fx.save(slim, path, lower_first=False)
    for shape in [(2, 3, 16, 16), (5, 3, 20, 24)]:  # dims dynamic at capture stay dynamic
        xx = torch.randn(shape)
        _assert_close(_run(path, xx), slim(xx).detach().numpy())
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    weights = {n: i.data_type for n, i in inits.items() if len(i.dims) >= 2}
    assert weights, inits.keys()
    want = onnx.TensorProto.INT4 if lowered else onnx.TensorProto.FLOAT
    assert set(weights.values()) == {want}, weights  # lowered: 4-bit levels, no float weights


@pytest.mark.slow  # two ONNX exports
@pytest.mark.parametrize("matmul_nbits", [False, True])
def test_mixed_widths_int4_int8_and_matmulnbits(tmp_path: Path, matmul_nbits: bool) -> None:
    model, x = _mixed_model()
    low = _lowered(model, x, [3.0, 4.0, 8.0, 4.0])
    packed = _packed_weights(low)
    assert sorted(p["bits"] for p in packed.values()) == [3, 4, 4, 8]
    path = tmp_path / "m.onnx"
    geta_fx.save(low, path, lower_first=False, onnx_matmulnbits=matmul_nbits)
    types = _initializer_types(path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # MatMulNBits only where K % 16 == 0 (K=32 W8, K=16 W4); conv and K=8 keep DequantizeLinear
    assert ops.count("MatMulNBits") == (2 if matmul_nbits else 0), ops
    dq = _dequantized_in_ort(path, x)
    assert len(dq) == (2 if matmul_nbits else 4), dq.keys()
    for base, p in packed.items():
        if base + "_levels" not in dq:
            assert types[base + "_nbits_b"] == onnx.TensorProto.UINT8
            continue
        want = onnx.TensorProto.INT4 if p["bits"] <= 4 else onnx.TensorProto.INT8
        assert types[base + "_levels"] == want, (base, p["bits"])
        got = dq[base + "_levels"]
        assert got.shape == tuple(p["w"].shape)
        assert np.array_equal(got, p["w"].numpy()), base  # bit for bit the torch weight
    for batch in (2, 7):
        xx = torch.randn(batch, 3, 12, 12)
        _assert_close(_run(path, xx), low(xx).detach().numpy())


class _PackedLinear(nn.Module):
    """One ``geta::lowbit_linear`` on random levels (unsigned ones too, which GETA's
    symmetric quantizer does not produce but the packed format allows)."""

    def __init__(self, bits: int, signed: bool, n: int = 12, k: int = 64) -> None:
        super().__init__()
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        levels = torch.randint(-hi if signed else 0, hi + 1, (n, k))
        levels[0, :2] = torch.tensor([-hi if signed else 0, hi])  # the extremes occur
        self.register_buffer("packed", pack_levels(levels, bits, signed))
        self.register_buffer("scale", torch.tensor([0.0173]))
        self.register_buffer("bias", torch.randn(n))
        self.bits, self.signed, self.k = bits, signed, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_linear(x, self.packed, self.scale, bits=self.bits, in_features=self.k,
                             signed=self.signed, bias=self.bias)


@pytest.mark.slow  # six ONNX exports
@pytest.mark.parametrize("signed", [True, False])
def test_packed_linear_unsigned_and_matmulnbits(tmp_path: Path, signed: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    dyn = ({0: torch.export.Dim("batch")},)
    for bits in (2, 4, 8):
        m = _PackedLinear(bits, signed)
        gm = torch.export.export(m, (x,), dynamic_shapes=dyn).module()
        want = {8: onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8,
                4: onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4}
        for nbits in (False, True):
            path = tmp_path / f"w{bits}_{nbits}.onnx"
            save_onnx(gm, path, (x,), dyn, matmul_nbits=nbits)
            types = _initializer_types(path)
            if nbits:
                assert "packed_levels" not in types and "packed_nbits_b" in types
                assert ("packed_nbits_zp" in types) == (not signed)  # signed: default 2^(b-1)
            else:
                assert types["packed_levels"] == want[min(8, max(4, bits))], (bits, types)
            xx = torch.randn(5, 64)
            _assert_close(_run(path, xx), m(xx).numpy())


@pytest.mark.slow  # one ONNX export
def test_old_opset_keeps_int8_levels_with_a_warning(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model, x = _mixed_model()
    low = _lowered(model, x, [3.0, 4.0, 8.0, 4.0])
    path = tmp_path / "m.onnx"
    with caplog.at_level(logging.WARNING, logger="geta_fx.export_onnx"):
        geta_fx.save(low, path, lower_first=False, onnx_opset=18)
    assert "opset 18 has no INT4" in caplog.text
    assert onnx.load(str(path)).opset_import[0].version == 18
    levels = {n: t for n, t in _initializer_types(path).items() if n.endswith("_levels")}
    assert len(levels) == 4 and set(levels.values()) == {onnx.TensorProto.INT8}, levels
    _assert_close(_run(path, x), low(x).detach().numpy())


@pytest.mark.slow  # one ONNX export
def test_unreachable_opset_is_a_clear_error(tmp_path: Path) -> None:
    model, x = _model()
    slim = geta_fx.transform(model, (x,)).compress()
    path = tmp_path / "m.onnx"
    with pytest.raises(geta_fx.InputError, match="onnx_opset=13.*wrote opset 18"):
        geta_fx.save(slim, path, lower_first=False, onnx_opset=13)
    assert not path.exists()


def test_onnx_options_need_an_onnx_path(tmp_path: Path) -> None:
    model, x = _model()
    slim = geta_fx.transform(model, (x,)).compress()
    with pytest.raises(geta_fx.InputError, match="onnx_matmulnbits"):
        geta_fx.save(slim, tmp_path / "m.pt2", lower_first=False, onnx_matmulnbits=True)


def test_missing_onnx_packages_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    import sys

    model, x = _model()
    slim = geta_fx.transform(model, (x,)).compress()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(geta_fx.InputError, match="onnxscript"):
        geta_fx.save(slim, tmp_path / "m.onnx", lower_first=False)
