"""geta_fx.save(m, "x.onnx"): slim and lowered models (weight and activation quantizers,
packed low-bit weights) run in ONNX Runtime with the slim model's outputs, at other sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import geta_fx

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install "
                          "'geta_fx[deploy]')")
pytest.importorskip("onnxscript", reason="onnxscript not installed")


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                      nn.Linear(16, 4)).eval()
    return m, torch.randn(2, 3, 16, 16)


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


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
        ref = slim(xx).detach().numpy()
        np.testing.assert_allclose(_run(path, xx), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    import onnx

    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    weights = {n: i.data_type for n, i in inits.items() if len(i.dims) >= 2}
    assert weights, inits.keys()
    want = onnx.TensorProto.INT8 if lowered else onnx.TensorProto.FLOAT
    assert set(weights.values()) == {want}, weights  # lowered: int8 levels, no float weights


def test_missing_onnx_packages_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    import sys

    model, x = _model()
    slim = geta_fx.transform(model, (x,)).compress()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(geta_fx.InputError, match="onnxscript"):
        geta_fx.save(slim, tmp_path / "m.onnx", lower_first=False)
